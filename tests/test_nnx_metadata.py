"""Every NNX Variable keeps its full metadata through the functions that rebuild Variables.

A Variable's metadata is its sharding names (``nnx.with_partitioning``), its mesh, and any key a user or a model
library put there (``nnx.with_metadata``). The model here is built under a 1 x 1 mesh so its kernels are really
placed with ``NamedSharding`` s, as a model built for a mesh is; one device is enough to check that the names
survive (tests/test_sharding.py runs the 8-device cases in a subprocess).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _workers import run_worker
from flax import nnx
from jax.sharding import PartitionSpec as P

import lorajax

TARGETS = ["fc1", "fc2"]


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.5)
        self.fc1 = nnx.Linear(
            16,
            32,
            kernel_init=nnx.with_partitioning(normal, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
            rngs=rngs,
        )
        # A custom key next to the sharding names: a model library's own annotation.
        init = nnx.with_metadata(normal, sharding_names=("mlp", "embed"), origin="hf:down_proj", tied=False)
        self.fc2 = nnx.Linear(32, 16, kernel_init=init, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def build():
    mesh = jax.make_mesh((1, 1), ("embed", "mlp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        net = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    return mesh, graphdef, state


@pytest.fixture(scope="module")
def model():
    return build()


def is_variable(x):
    return isinstance(x, nnx.Variable)


def metadata(tree):
    """``{path: (Variable type, full metadata)}`` for every Variable of ``tree`` (LoRA nodes' bases included)."""
    out = {}
    stop = lambda x: is_variable(x) or lorajax.is_lora(x)
    for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]:
        v = v.base if lorajax.is_lora(v) else v
        assert is_variable(v), f"{lorajax.path_str(path)} is a bare {type(v).__name__}, not an nnx.Variable"
        out[lorajax.path_str(path)] = (type(v), v.get_metadata())
    return out


def lorafied(state, **kw):
    return lorajax.lorafy(state, rank=2, where=TARGETS, key=jax.random.key(1), init="gaussian", **kw)


def test_the_model_carries_metadata(model):
    _, _, state = model
    before = metadata(state)
    assert before["fc1/kernel"][1]["out_sharding"] == ("embed", "mlp")
    assert before["fc2/kernel"][1]["origin"] == "hf:down_proj"
    assert state["fc1"]["kernel"].get_value().sharding.spec == P("embed", "mlp")


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_merge_keeps_metadata(model, dora, donate):
    _, _, state = build() if donate else model  # donate=True consumes the bases, the state's own arrays
    merged = lorajax.merge(lorafied(state, dora=dora), donate=donate)
    assert metadata(merged) == metadata(state)
    if donate:  # written into the base's buffer: its sharding too (a jit-ed merge's placement is XLA's choice)
        assert merged["fc1"]["kernel"].get_value().sharding.spec == P("embed", "mlp")


def test_lorafy_and_unlorafy_keep_the_base_metadata(model):
    _, _, state = model
    for init in ("gaussian", "pissa"):  # PiSSA rewrites the base (W - s*a@b) into a new Variable
        lora = lorafied(state) if init == "gaussian" else lorajax.lorafy(state, rank=2, where=TARGETS, init=init)
        assert metadata(lora) == metadata(state)
        assert metadata(lorajax.unlorafy(lora)) == metadata(state)


def test_factors_keep_the_base_metadata_with_their_own_names(model):
    _, _, state = model
    node = lorafied(state, dora=True)["fc2"]["kernel"]
    base = node.base.get_metadata()
    for box, names in ((node.a, ("mlp", None)), (node.b, (None, "embed")), (node.magnitude, ("embed",))):
        assert type(box) is nnx.Param
        assert box.get_metadata() == {**base, "out_sharding": names}


def test_swap_keeps_metadata(model):
    _, _, state = model
    one, two = lorafied(state), lorajax.lorafy(state, rank=2, where=TARGETS, key=jax.random.key(2), init="gaussian")
    swapped = lorajax.swap(lorajax.merge(one), one, two)
    assert metadata(swapped) == metadata(state)
    want = lorajax.merge(two)["fc2"]["kernel"].get_value()
    np.testing.assert_allclose(swapped["fc2"]["kernel"].get_value(), want, atol=1e-6)


def test_quantize_keeps_metadata(model):
    _, _, state = model
    quantized = lorajax.quantize(state, where=TARGETS, dtype="int8")
    assert lorajax.is_quantized(quantized["fc1"]["kernel"].get_value())
    assert metadata(quantized) == metadata(state)
    assert metadata(lorajax.dequantize(quantized)) == metadata(state)
    assert metadata(lorajax.merge(lorafied(quantized))) == metadata(state)
    assert metadata(lorajax.requantize(lorafied(quantized))) == metadata(state)


def test_attach_and_load_adapter_keep_metadata(model, tmp_path):
    _, _, state = model
    lora = lorafied(state)
    lorajax.save_adapter(tmp_path / "a.safetensors", lora)
    for back in (lorajax.attach(state, lorajax.adapter(lora)), lorajax.load_adapter(tmp_path / "a.safetensors", state)):
        assert metadata(back) == metadata(state)
        assert back["fc1"]["kernel"].a.get_metadata()["out_sharding"] == ("embed", None)
        assert metadata(lorajax.merge(back)) == metadata(state)


def seen_by(fn_wrapper, state, graphdef, x):
    """The metadata of every Variable the model sees inside ``fn_wrapper(apply)``."""
    seen = {}

    def apply(s, x):
        net = nnx.merge(graphdef, s)
        for path, v in nnx.iter_graph(net):
            if is_variable(v):
                seen["/".join(map(str, path))] = (type(v), v.get_metadata())
        return net(x)

    fn_wrapper(apply, state, x)
    return seen


def test_factored_and_infer_layouts_hand_the_model_its_metadata(model):
    _, graphdef, state = model
    x = jnp.ones((2, 16))
    expected = seen_by(lambda f, s, x: f(s, x), state, graphdef, x)
    assert expected["fc1/kernel"][1]["out_sharding"] == ("embed", "mlp")
    assert seen_by(lambda f, s, x: lorajax.infer_layouts(f, s, x), state, graphdef, x) == expected
    lora = lorafied(state)
    for fuse in (True, False):
        assert seen_by(lambda f, s, x: lorajax.factored(f, fuse=fuse)(lora, x), state, graphdef, x) == expected
        assert seen_by(lambda f, s, x: jax.jit(lorajax.factored(f, fuse=fuse))(lora, x), state, graphdef, x) == expected


def test_a_merged_model_runs_sharded_like_the_original(model):
    mesh, graphdef, state = model
    x = jnp.ones((2, 16))
    lora = lorafied(state)
    merged_net = nnx.merge(graphdef, lorajax.merge(lora))
    with jax.set_mesh(mesh):
        assert nnx.get_partition_spec(nnx.state(merged_net)) == nnx.get_partition_spec(state)
    want = lorajax.factored(lambda s, x: nnx.merge(graphdef, s)(x))(lora, x)
    np.testing.assert_allclose(merged_net(x), want, rtol=1e-5, atol=1e-5)


_MESH = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
sys.path.insert(0, sys.argv[1])
from test_nnx_metadata import Net, TARGETS
import lorajax
mesh = jax.make_mesh((2, 2), ("embed", "mlp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
out = {}
for donate in (False, True):
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(Net(nnx.Rngs(0)))
        specs = nnx.get_partition_spec(state)
        lora = lorajax.lorafy(state, rank=2, where=TARGETS, key=jax.random.key(1), init="gaussian")
        want = lorajax.factored(lambda s, x: nnx.merge(graphdef, s)(x))(lora, jnp.ones((4, 16)))
        merged = lorajax.merge(lora, donate=donate)
        # What a user of a mesh does with the merged state: place it by its own annotations, then run.
        placed = jax.device_put(merged, nnx.get_named_sharding(merged, mesh))
        got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(placed, jnp.ones((4, 16)))
        out[str(donate)] = {
            "specs": nnx.get_partition_spec(merged) == specs,
            "kernel": list(placed["fc1"]["kernel"].get_value().sharding.spec),
            "donated": list(merged["fc2"]["kernel"].get_value().sharding.spec),
            "err": float(jnp.abs(got - want).max()),
        }
print(json.dumps(out))
"""


def test_a_model_on_a_4_device_mesh_keeps_its_sharding_after_merge():
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    results = run_worker("-c", _MESH, here, timeout=300)
    for donate, r in results.items():
        assert r["specs"], donate
        assert r["kernel"] == ["embed", "mlp"], donate
        assert r["err"] < 1e-5, donate
    assert results["True"]["donated"] == ["mlp", "embed"]  # written into the base's own buffer

"""Sharding: factor specs, partition_specs, placed init, Flax boxes, and 8-device mesh runs.

The mesh runs need 8 virtual CPU devices, which must be forced before JAX starts; they run in ONE
subprocess (tests/_mesh_worker.py) so this pytest process keeps its single device.
"""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize(
    "spec,layout,want_a,want_b",
    [
        (P("fsdp", "tp"), "io", P("fsdp", None), P(None, "tp")),
        (P("tp", "fsdp"), "oi", P("fsdp", None), P(None, "tp")),  # Equinox/torch weight: (out, in)
        (P("fsdp", "tp", None), "ioo", P("fsdp", None), P(None, "tp", None)),  # q kernel, heads on tp
        (P("tp", None, "fsdp"), "iio", P("tp", None, None), P(None, "fsdp")),  # out kernel, heads on tp
        (P("stage", "fsdp", "tp"), "sio", P("stage", "fsdp", None), P("stage", None, "tp")),  # scanned layers
        (P("vocab", None), "eo", P("vocab", None), P(None, None)),  # embedding
        (P(None, None, "fsdp", "tp"), "wwio", P(None, None, "fsdp", None), P(None, "tp")),  # conv
        (P(("data", "fsdp")), "io", P(("data", "fsdp"), None), P(None, None)),  # multi-axis entry, short spec
        (None, "io", P(None, None), P(None, None)),  # replicated
    ],
)
def test_factor_specs_follow_the_base_axes(spec, layout, want_a, want_b):
    assert lorajax.factor_specs(spec, layout) == (want_a, want_b)


def test_factor_specs_per_example_and_errors():
    assert lorajax.factor_specs(P("x", "y"), "io", per_example=True) == (P(None, "x", None), P(None, None, "y"))
    with pytest.raises(ValueError, match="3 entries for a 2-axis kernel"):
        lorajax.factor_specs(P("x", "y", "z"), "io")


def _params():
    return {
        "attn": {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.zeros((2, 4))}},
        "mlp": {"kernel": jnp.ones((8, 16))},
        "norm": {"scale": jnp.ones(8)},
    }


def _specs():
    return {
        "attn": {"query": {"kernel": P("fsdp", "tp", None), "bias": P("tp", None)}},
        "mlp": {"kernel": P("fsdp", "tp")},
        "norm": {"scale": None},
    }


def test_partition_specs_tree():
    lora = lorajax.lorafy(_params(), rank=2, where=["query", "mlp"], key=jax.random.key(0))
    specs = lorajax.partition_specs(lora, _specs())
    q, m = specs["attn"]["query"]["kernel"], specs["mlp"]["kernel"]
    assert (q.base, q.a, q.b) == (P("fsdp", "tp", None), P("fsdp", None), P(None, "tp", None))
    assert (m.base, m.a, m.b) == (P("fsdp", "tp"), P("fsdp", None), P(None, "tp"))
    assert specs["attn"]["query"]["bias"] == P("tp", None) and specs["norm"]["scale"] is None
    assert (q.rank, q.layout) == (2, lora["attn"]["query"]["kernel"].layout)
    # Abstract trees work the same (the planning path: no allocation).
    abstract = jax.eval_shape(
        lambda p: lorajax.lorafy(p, rank=2, where=["query", "mlp"], key=jax.random.key(0)), _params()
    )
    assert lorajax.partition_specs(abstract, _specs()) == specs


def test_partition_specs_rejects_a_mismatched_tree():
    lora = lorajax.lorafy(_params(), rank=2, where=["mlp"], key=jax.random.key(0))
    with pytest.raises(ValueError, match="structure of the params before lorafy"):
        lorajax.partition_specs(lora, {"mlp": {"kernel": P()}})
    bad = _specs()
    bad["mlp"]["kernel"] = P("a", "b", "c")
    with pytest.raises(ValueError, match=r"mlp/kernel with shape \(8, 16\)"):
        lorajax.partition_specs(lora, bad)


def _mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))


def test_partition_specs_drive_jit_on_abstract_trees():
    mesh = _mesh()
    params = _params()
    lora = lorajax.lorafy(params, rank=2, where=["query", "mlp"], key=jax.random.key(0))
    shardings = lorajax.partition_specs(lora, jax.tree.map(lambda s: NamedSharding(mesh, s), _specs()))
    m = shardings["mlp"]["kernel"]
    assert isinstance(m.a, NamedSharding) and m.a.spec == P("fsdp", None) and m.b.spec == P(None, "tp")
    merged = jax.jit(lorajax.merge, in_shardings=(shardings,))(lora)
    chex.assert_trees_all_equal(merged, params)


def test_lorafy_places_factors_like_a_sharded_base():
    mesh = _mesh()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s if s is not None else P()), _specs())
    params = jax.device_put(_params(), shardings)
    lora = lorajax.lorafy(params, rank=2, where=["query", "mlp"], key=jax.random.key(0))
    node = lora["mlp"]["kernel"]
    assert node.a.sharding.spec == P("fsdp", None) and node.b.sharding.spec == P(None, "tp")
    q = lora["attn"]["query"]["kernel"]
    assert q.a.sharding.spec == P("fsdp", None) and q.b.sharding.spec == P(None, "tp", None)
    # The same numbers as an unsharded lorafy (placement changes where values live, not what they are).
    plain = lorajax.lorafy(_params(), rank=2, where=["query", "mlp"], key=jax.random.key(0))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, lora), jax.tree.map(np.asarray, plain))


def test_lorafy_on_sharded_shape_dtype_structs_gives_sharded_abstract_factors():
    mesh = _mesh()
    base = {"mlp": {"kernel": jax.ShapeDtypeStruct((8, 16), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))}}
    node = lorajax.lorafy(base, rank=4, where=["mlp"], key=jax.random.key(0))["mlp"]["kernel"]
    assert node.a.shape == (8, 4) and node.a.dtype == jnp.float32 and node.a.sharding.spec == P("fsdp", None)
    assert node.b.shape == (4, 16) and node.b.sharding.spec == P(None, None)


class _Logical(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(16, kernel_init=nn.with_partitioning(init, ("embed", "mlp")), name="fc1")(x)
        q = nn.DenseGeneral((2, 4), kernel_init=nn.with_partitioning(init, ("mlp", "heads", "kv")), name="query")
        return q(x)


def test_flax_partitioned_boxes_keep_logical_names():
    variables = _Logical().init(jax.random.key(0), jnp.ones((1, 8)))
    # (d_model 16, heads 2, head_dim 4): 16 != 2 * 4, so names and sizes cannot settle it; state it.
    lora = lorajax.lorafy(variables, rank=2, where=["fc1", "query"], key=jax.random.key(1), layout={"query": "ioo"})
    node = lora["params"]["query"]["kernel"]
    assert isinstance(node.base, nn.Partitioned) and isinstance(node.a, nn.Partitioned)
    specs = nn.get_partition_spec(lora)
    q, f = specs["params"]["query"]["kernel"], specs["params"]["fc1"]["kernel"]
    assert (q.base, q.a, q.b) == (P("mlp", "heads", "kv"), P("mlp", None), P(None, "heads", "kv"))
    assert (f.base, f.a, f.b) == (P("embed", "mlp"), P("embed", None), P(None, "mlp"))
    # partition_specs from the base's logical specs agrees with Flax's own reading of the boxes.
    assert lorajax.partition_specs(lora, nn.get_partition_spec(variables)) == specs
    # Logical -> mesh shardings through Flax's rules, then a jitted merge on them.
    rules = (("embed", "fsdp"), ("mlp", "tp"), ("heads", None), ("kv", None))
    shardings = nn.logical_to_mesh_sharding(specs, _mesh(), rules)
    merged = jax.jit(lorajax.merge, in_shardings=(shardings,))(lora)
    chex.assert_trees_all_equal(nn.unbox(merged), nn.unbox(variables))


def test_nnx_sharded_params_get_sharded_factors_and_metadata():
    from flax import nnx
    from jax.sharding import AxisType

    mesh = jax.make_mesh((1, 1), ("embed", "mlp"), axis_types=(AxisType.Auto,) * 2)
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    with jax.set_mesh(mesh):  # NNX places annotated variables eagerly
        model = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    node = lorajax.lorafy(state, rank=2, where=lambda p, x: lorajax.path_str(p) == "kernel", key=jax.random.key(0))[
        "kernel"
    ]
    assert isinstance(node.a, nnx.Param)
    assert node.a.get_value().sharding.spec == P("embed", None)  # placed by lorafy
    assert node.b.get_value().sharding.spec == P(None, "mlp")
    spec = nnx.get_partition_spec(nnx.State({"kernel": node}))["kernel"]  # and described by NNX metadata
    assert (spec.a.get_value(), spec.b.get_value()) == (P("embed", None), P(None, "mlp"))


# ----------------------------------------------------------------------------------------------
# 8 virtual devices, one subprocess for every mesh case.


# One worker runs this whole module (pytest -n 2 --dist loadgroup), so the 8-device subprocess starts once.
pytestmark = pytest.mark.xdist_group("mesh")


@pytest.fixture(scope="module")
def mesh_results():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_mesh_worker.py")], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# scan_tp: a transformer whose layers are stacked by nn.scan ("sioo"/"siio"/"sio" kernels), tensor parallel.
CASES = ["dp", "fsdp", "tp", "scan_tp"]
# Loss: float32 reductions in a different order on 8 shards; factors: two masked-adam steps (eps=1e-3,
# so the update is a smooth function of the gradient) compared element-wise with the one-device run.
LOSS_TOL = 1e-5
FACTOR_TOL = 1e-5


@pytest.mark.parametrize("case", CASES)
def test_mesh_lorafy_places_factors(mesh_results, case):
    r = mesh_results["cases"][case]
    assert r["factors_placed"], "factors are not sharded like partition_specs derives from the base"
    if case in ("tp", "scan_tp"):  # the default (threefry) init on the mesh gives the one-device numbers
        assert r["init_matches_single_device"]


@pytest.mark.parametrize("case", CASES)
def test_mesh_merge_keeps_sharding_without_collectives(mesh_results, case):
    r = mesh_results["cases"][case]
    assert r["merge_keeps_sharding"]
    assert r["merge_collectives"] == [], "merge moved a full kernel between devices"


@pytest.mark.parametrize("case", ["tp", "scan_tp"])
def test_mesh_donated_merge_keeps_sharding_without_collectives(mesh_results, case):
    r = mesh_results["cases"][case]
    assert r["donated_merge_ok"], "merge(donate=True) differs from jit(merge) in values or shardings"
    assert r["donated_merge_collectives"] == []


STEPS = [(case, kind) for case in CASES for kind in ("merge", "factored") if case != "scan_tp" or kind == "factored"]


@pytest.mark.parametrize("case,kind", STEPS)
def test_mesh_training_step_matches_one_device(mesh_results, case, kind):
    r = mesh_results["cases"][case][kind]
    assert r["loss_err"] < LOSS_TOL, (r["loss"], r["ref_loss"])
    assert r["factor_err"] < FACTOR_TOL
    assert r["keeps_sharding"]


@pytest.mark.parametrize("case,kind", STEPS)
def test_mesh_training_step_gathers_no_full_weight(mesh_results, case, kind):
    r = mesh_results["cases"][case]
    if case == "fsdp":
        # FSDP gathers every weight for its forward by design (ZeRO-3). LoRA must add no gather of its own:
        # at most what a full fine-tune of the same model on the same mesh gathers.
        assert len(r[kind]["gathers"]) <= len(r["full_finetune_gathers"]), r[kind]["gathers"]
    else:
        assert r[kind]["gathers"] == [], r[kind]["gathers"]


@pytest.mark.parametrize("case", CASES)
def test_mesh_factored_step_never_reduces_a_full_weight_gradient(mesh_results, case):
    # The factored path forms no d x k weight gradient, so no device ever sends one (the merge path can: under
    # FSDP XLA all-reduces dW of the attention output kernel).
    assert mesh_results["cases"][case]["factored"]["weight_reductions"] == []


@pytest.mark.parametrize("case", CASES)
def test_mesh_factored_step_forms_no_weight(mesh_results, case):
    # lorajax.factored warns (FallbackWarning) wherever it has to form W; the sharded step never does,
    # including inside nn.scan over stacked kernels.
    assert mesh_results["cases"][case]["factored"]["fallbacks"] == []

"""Sharding: factor specs, partition_specs, placed init, Flax boxes, and 8-device mesh runs.

The mesh runs need 8 virtual CPU devices, which must be forced before JAX starts; they run in ONE
subprocess (tests/_mesh_worker.py) so this pytest process keeps its single device.
"""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _workers import run_worker
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
    return run_worker(os.path.join(HERE, "_mesh_worker.py"))


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


# ----------------------------------------------------------------------------------------------
# Quantized kernels (QLoRA bases): codes and scales placed after the dense kernel's sharding.


@pytest.mark.parametrize(
    "shape,layout,spec,kind,want",
    [
        # NF4 codes are (slices, out * in / 2) in PyTorch order: the fan-out axis (major there) carries over; the
        # double-quantization absmaxes (one per 256 blocks) only where every mesh gives whole ones (with a mesh, more).
        ((256, 512), "io", P(None, "tp"), "nf4", (P(None, "tp"), P(None, "tp"), P(None, None), P(None))),
        # ... the fan-in axis (minor: each device's columns are strided through the flat codes) does not.
        ((256, 512), "io", P("fsdp", None), "nf4", (P(None, None), P(None, None), P(None, None), P(None))),
        ((256, 512), "io", P("fsdp", "tp"), "nf4", (P(None, None), P(None, None), P(None, None), P(None))),
        # Stacked layers: one row of codes per layer, sharded like the layer axis.
        ((4, 64, 96), "sio", P("stage", None, None), "nf4", (P("stage", None),) * 3 + (P("stage"),)),
        # Query kernel (d_model, heads, head_dim): heads lead in PyTorch order (out = heads x head_dim, in).
        ((32, 4, 64), "ioo", P(None, "tp", None), "nf4", (P(None, "tp"), P(None, "tp"), P(None, None), P(None))),
        # 96 weights a row: a device's share is not whole 64-weight blocks on every mesh, so absmaxes replicate.
        ((96, 256), "io", P(None, "tp"), "nf4", (P(None, "tp"), P(None, None), P(None, None), P(None))),
        # int8/fp8 codes are (slices, rows, cols): rows follow fan-out, cols the fan-in.
        ((256, 128), "io", P("fsdp", "tp"), "int8", (P(None, "tp", "fsdp"), P(None, "tp"), None, None)),
        ((3, 3, 16, 32), "wwio", P(None, None, None, "tp"), "fp8", (P(None, "tp", None), P(None, "tp"), None, None)),
        # (heads, head_dim, in): rows are heads; head_dim leads the columns, so they follow it.
        ((64, 8, 16), "ioo", P(None, None, "tp"), "int8", (P(None, None, "tp"), P(None, None), None, None)),
    ],
)
def test_quantized_code_specs_follow_the_kernel(shape, layout, spec, kind, want):
    from lorajax.quant._placement import code_specs

    abstract = {"k": jax.ShapeDtypeStruct(shape, jnp.float32)}
    q = lorajax.quantize(abstract, where=["k"], dtype=kind, layout={".*": layout})["k"]
    got = code_specs(spec, q)
    assert (got.codes, got.scales, got.nested, got.offset) == want
    assert lorajax.is_quantized(got) and (got.shape, got.layout, got.kind) == (q.shape, q.layout, q.kind)


@pytest.mark.parametrize(
    "shape,layout,spec,kind",
    [
        ((256, 512), "io", P(None, "tp"), "nf4"),
        ((4, 64, 96), "sio", P("stage", None, "tp"), "nf4"),
        ((32, 4, 64), "ioo", P(None, "tp", None), "nf4"),
        ((256, 128), "io", P("fsdp", "tp"), "int8"),
        ((3, 3, 16, 32), "wwio", P(None, None, None, "tp"), "fp8"),
        ((256, 64), "eo", P("vocab", None), "nf4"),
    ],
)
def test_dense_spec_inverts_code_specs_where_nothing_is_dropped(shape, layout, spec, kind):
    from lorajax.quant._placement import code_specs, dense_spec

    abstract = {"k": jax.ShapeDtypeStruct(shape, jnp.float32)}
    q = lorajax.quantize(abstract, where=["k"], dtype=kind, layout={".*": layout})["k"]
    padded = P(*(tuple(spec) + (None,) * (len(shape) - len(spec))))
    assert dense_spec(code_specs(spec, q).codes, q) == padded


def _qlora_tree():
    params = {"fc1": {"kernel": jnp.ones((64, 256))}, "fc2": {"kernel": jnp.ones((256, 64))}, "norm": jnp.ones(64)}
    q = lorajax.quantize(params, where=["fc1", "fc2"])
    return lorajax.lorafy(q, rank=2, where=["fc1"], key=jax.random.key(0)), params


def test_partition_specs_on_a_qlora_tree():
    lora, _ = _qlora_tree()
    specs = {"fc1": {"kernel": P(None, "tp")}, "fc2": {"kernel": P("tp", None)}, "norm": P()}
    got = lorajax.partition_specs(lora, specs)
    fc1, fc2 = got["fc1"]["kernel"], got["fc2"]["kernel"]
    # fc1 (LoRA on NF4, fan-out sharded): codes (1, 256 * 64 / 2) split by fan-out rows, factors like the kernel.
    assert (fc1.base.codes, fc1.base.scales, fc1.base.offset) == (P(None, "tp"), P(None, "tp"), P(None))
    assert (fc1.a, fc1.b) == (P(None, None), P(None, "tp"))
    # fc2 (a bare quantized kernel, fan-in sharded): its flat codes cannot follow, so they replicate.
    assert lorajax.is_quantized(fc2) and (fc2.codes, fc2.scales) == (P(None, None), P(None, None))
    assert got["norm"] == P()
    # The specs have the params' structure: they drive jit (here on a 1 x 1 mesh), and a tree of code specs given
    # at a quantized kernel (as from shardings_of) gives the same result as the dense kernel's spec.
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), got)
    merged = jax.jit(lorajax.merge, in_shardings=(shardings,))(lora)
    assert np.array_equal(merged["fc1"]["kernel"], lorajax.merge(lora)["fc1"]["kernel"])
    again = lorajax.partition_specs(lora, {**specs, "fc2": {"kernel": fc2}})
    assert again == got
    with pytest.raises(ValueError, match=r"fc2/kernel with shape \(256, 64\)"):
        lorajax.partition_specs(lora, {**specs, "fc2": {"kernel": P("a", "b", "c")}})


def test_quantize_on_sharded_abstract_kernels_carries_shardings():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    sharding = NamedSharding(mesh, P(None, "tp"))
    abstract = {"fc": {"kernel": jax.ShapeDtypeStruct((128, 512), jnp.bfloat16, sharding=sharding)}}
    q = lorajax.quantize(abstract, where=["fc"])["fc"]["kernel"]
    assert q.codes.sharding == NamedSharding(mesh, P(None, "tp")) and q.scales.sharding.spec == P(None, "tp")
    assert q.offset.sharding.spec == P(None)
    # lorafy plans factors after it; dequantize describes the dense kernel with the kernel's own sharding.
    node = lorajax.lorafy({"fc": {"kernel": q}}, rank=4, where=["fc"])["fc"]["kernel"]
    assert node.a.sharding.spec == P(None, None) and node.b.sharding.spec == P(None, "tp")
    assert lorajax.dequantize(q).sharding.spec == P(None, "tp")


# On the 8-device mesh ('data' 2 x 'model' 4): what tests/_mesh_worker.py's QUANT_KERNELS quantize to.
_R = P(None, None)
QUANT_MESH = {
    # name: (codes, scales, nested, offset); None where the format has no such array
    "fan_out_nf4": (P(None, "model"), P(None, "model"), P(None, "model"), P(None)),  # 32 x 512 weights a device
    "fan_in_nf4": (P(None, None, "model"), P(None, None, "model"), _R, P(None)),  # row form, columns sharded
    "fan_in_int8": (P(None, None, "model"), _R, None, None),
    "fan_out_fp8": (P(None, "model", None), P(None, "model"), None, None),
    "stacked_nf4": (P("model", None), P("model", None), P("model", None), P("model")),
    "heads_nf4": (P(None, "model"), P(None, "model"), None, None),
    "two_axes_nf4": (P(None, "model", "data"), P(None, "model", "data"), _R, P(None)),
}
KEPT = {
    "fan_out_nf4",
    "fan_in_int8",
    "fan_out_fp8",
    "stacked_nf4",
    "heads_nf4",
    "fan_in_nf4",
    "two_axes_nf4",
}  # codes keep the whole spec


@pytest.mark.parametrize("name", list(QUANT_MESH))
def test_mesh_quantize_places_codes_and_scales_like_the_kernel(mesh_results, name):
    r = mesh_results["quantized_kernels"][name]
    want = {f: str(s) for f, s in zip(("codes", "scales", "nested", "offset"), QUANT_MESH[name]) if s is not None}
    assert r["specs"] == want
    assert r["abstract_specs"] == want, "quantize on a sharded ShapeDtypeStruct plans other shardings"
    assert r["codes_equal"], "the sharded kernel's codes and scales differ from the one-device quantization"


@pytest.mark.parametrize("name", list(QUANT_MESH))
def test_mesh_dequantize_is_bit_exact_and_in_place(mesh_results, name):
    r = mesh_results["quantized_kernels"][name]
    assert r["dequantize_equal"], "dequantize on the mesh differs from the one-device result"
    assert r["dequantize_collectives"] == [], "dequantize moved data between devices"
    if name in KEPT:  # back in the kernel's own sharding, and described so for abstract codes
        assert r["dequantize_is_kernel_sharding"] and r["abstract_dequantize_is_kernel_sharding"]
    else:  # replicated codes dequantize to a replicated kernel
        assert r["dequantize_sharding"] == r["abstract_dequantize_sharding"] == str(_R)


def test_mesh_qlora_model_matches_one_device(mesh_results):
    r = mesh_results["qlora_model"]
    assert r["placed"], "codes, scales or factors are not where partition_specs derives from the dense specs"
    assert r["planned_like_concrete"], "sharded ShapeDtypeStructs plan other shardings than the arrays get"
    assert r["query_codes_spec"] == str(P(None, "model"))  # heads on 'model'
    assert r["forward_err"] < 1e-5 and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    assert r["fallbacks"] == []
    assert r["int_collectives"] == []  # dequantize-at-use adds no communication

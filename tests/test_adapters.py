"""Native adapters: adapter/attach, safetensors files, Orbax, swap and combine_adapters."""

import dataclasses
import itertools
import json
import logging
import math
import os
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorajax

WHERE = lorajax.attn_all | lorajax.mlp


def model_params(d=16, seed=0):
    """A small transformer's parameter tree (Flax names and layouts), built without Flax to keep tests fast."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)

    def block():
        attn = {n: {"kernel": w(d, 2, 4), "bias": jnp.zeros((2, 4))} for n in ("query", "key", "value")}
        attn["out"] = {"kernel": w(2, 4, d), "bias": jnp.zeros(d)}
        return {"SelfAttention_0": attn, "fc1": {"kernel": w(d, 2 * d)}, "fc2": {"kernel": w(2 * d, d)}}

    return {"Block_0": block(), "Block_1": block(), "embed": {"embedding": w(32, d)}, "lm_head": {"kernel": w(d, 32)}}


def trained(base, seed, rank=2, where=WHERE, alpha=None, rslora=False, dtype=jnp.float32, **kw):
    """lorafy, then give every factor random values, as after training."""
    lora = lorajax.lorafy(
        base, rank=rank, where=where, key=jax.random.key(seed), alpha=alpha, rslora=rslora, dtype=dtype, **kw
    )
    rng = np.random.default_rng(seed + 1000)
    # Flax boxes (nn.Partitioned, nnx.Param) are pytrees around one array: tree.map refills them, boxes kept.
    rand = lambda box: jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), dtype), box)
    return jax.tree.map(
        lambda x: dataclasses.replace(x, a=rand(x.a), b=rand(x.b)) if lorajax.is_lora(x) else x,
        lora,
        is_leaf=lorajax.is_lora,
    )


@pytest.fixture(scope="module")
def gpt():
    return None, model_params(), None


def np64(x):
    return np.asarray(x, np.float64)


def dense_delta(f):
    """scale * A.B in float64 numpy, in the kernel layout (independent of lorajax's einsum)."""
    lay = f.layout
    stack = [f.shape[k] for k in lay.stack]
    fan_in = [f.shape[k] for k in lay.fan_in]
    fan_out = [f.shape[k] for k in lay.fan_out]
    a = np64(f.a).reshape(math.prod(stack), math.prod(fan_in), -1)
    b = np64(f.b).reshape(math.prod(stack), -1, math.prod(fan_out))
    d = (a @ b).reshape(stack + fan_in + fan_out)
    order = list(lay.stack) + list(lay.fan_in) + list(lay.fan_out)
    return f.scale * np.transpose(d, np.argsort(order))


def get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


# ---------------------------------------------------------------------------------------------------------------------
# adapter / attach


def test_adapter_is_small_and_attach_restores_the_lorafied_params(gpt):
    _, base, _ = gpt
    lora = trained(base, 0, alpha=4.0)
    ad = lorajax.adapter(lora, metadata={"task": "demo"})
    lora_paths = sorted(
        lorajax.path_str(p)
        for p, x in jax.tree_util.tree_flatten_with_path(lora, is_leaf=lorajax.is_lora)[0]
        if lorajax.is_lora(x)
    )
    assert ad.targets == tuple(lora_paths) and len(ad) == 12
    leaves = jax.tree.leaves(ad)
    assert len(leaves) == 24  # a and b per target, no base weight
    assert sum(x.size for x in leaves) == 2 * (4 * 48 + 2 * 96)  # per block: q, k, v, out 48 each; fc1, fc2 96
    assert ad.metadata == {"task": "demo"}
    assert ad["Block_0/SelfAttention_0/query/kernel"].shape == (16, 2, 4)
    back = lorajax.attach(base, ad)
    chex.assert_trees_all_equal_structs(back, lora)
    chex.assert_trees_all_equal(back, lora)
    assert back["Block_0"]["fc1"]["kernel"].base is base["Block_0"]["fc1"]["kernel"]


def test_attach_onto_lorafied_params_replaces_their_adapter(gpt):
    _, base, _ = gpt
    other = trained(base, 5, where=lorajax.all_linear)  # a different target set (includes lm_head)
    ad = lorajax.adapter(trained(base, 0))
    chex.assert_trees_all_equal(lorajax.attach(other, ad), lorajax.attach(base, ad))


def test_attach_lists_every_mismatch_in_one_error(gpt):
    _, base, _ = gpt
    ad = lorajax.adapter(trained(base, 0))
    wrong = jax.tree.map(lambda x: x, base)  # a copy of the dict structure
    wrong["Block_0"] = dict(wrong["Block_0"])
    del wrong["Block_0"]["fc1"]  # missing path
    wrong["Block_0"]["fc2"] = {"kernel": jnp.zeros((32, 8))}  # wrong shape
    wrong["Block_1"] = dict(wrong["Block_1"], fc1={"kernel": jnp.zeros((16,))})  # wrong number of axes
    with pytest.raises(ValueError, match=r"3 problems") as err:
        lorajax.attach(wrong, ad)
    msg = str(err.value)
    assert "missing: Block_0/fc1/kernel" in msg
    assert "Block_0/fc2/kernel: the adapter was made for a base kernel of shape (32, 16), this base has (32, 8)" in msg
    assert "layout: Block_1/fc1/kernel: layout 'io' has 2 axes but the base kernel has shape (16,)" in msg


def test_attach_rejects_inconsistent_factors_and_checks_dtype_on_request(gpt):
    _, base, _ = gpt
    ad = lorajax.adapter(trained(base, 0))
    name = "Block_0/fc1/kernel"
    bad = lorajax.Adapter({**ad.factors, name: dataclasses.replace(ad[name], a=jnp.zeros((16, 3)))})
    with pytest.raises(ValueError, match=re.escape(f"{name}: factor a has shape (16, 3), expected (16, 2)")):
        lorajax.attach(base, bad)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    assert lorajax.attach(bf16, ad)["Block_0"]["fc1"]["kernel"].dtype == jnp.bfloat16  # allowed by default
    with pytest.raises(ValueError, match=r"made for a float32 base kernel, this base is bfloat16"):
        lorajax.attach(bf16, ad, check_dtype=True)


def test_adapter_requires_lora_nodes():
    with pytest.raises(ValueError, match="no LoRA node"):
        lorajax.adapter({"w": jnp.ones((2, 2))})


class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        return nn.Dense(8, kernel_init=init, name="fc")(x)


def test_adapter_unboxes_and_attach_reboxes_like_lorafy():
    base = Boxed().init(jax.random.key(0), jnp.ones((1, 4)))
    lora = trained(base, 1, where=".*/fc/kernel")
    node = lora["params"]["fc"]["kernel"]
    assert isinstance(node.a, nn.Partitioned)
    ad = lorajax.adapter(lora)
    assert not isinstance(ad["params/fc/kernel"].a, nn.Partitioned)
    back = lorajax.attach(base, ad)
    chex.assert_trees_all_equal_structs(back, lora)
    chex.assert_trees_all_equal(back, lora)
    assert back["params"]["fc"]["kernel"].a.names == ("embed", None)


def test_nnx_state_round_trips_through_a_file(tmp_path):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(0)))
    lora = trained(state, 2, where=["fc1", "fc2"])
    ad = lorajax.adapter(lora)
    assert ad.targets == ("fc1/kernel", "fc2/kernel")
    lorajax.save_adapter(tmp_path / "nnx.safetensors", ad)
    back = lorajax.load_adapter(tmp_path / "nnx.safetensors", state)
    assert isinstance(back["fc1"]["kernel"].a, nnx.Param)
    chex.assert_trees_all_equal(back, lora)


def test_adapter_is_a_pytree_that_orbax_checkpoints(gpt, tmp_path):
    import orbax.checkpoint as ocp

    _, base, _ = gpt
    ad = lorajax.adapter(trained(base, 0, dtype=jnp.bfloat16), metadata={"step": 7})
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", ad)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: ad))
    assert isinstance(restored, lorajax.Adapter) and restored.metadata == {"step": 7}
    chex.assert_trees_all_equal(restored, ad)  # structure, static metadata, dtypes and values
    chex.assert_trees_all_equal(lorajax.attach(base, restored), lorajax.attach(base, ad))


def test_adapter_passes_through_jit(gpt):
    _, base, _ = gpt
    ad = lorajax.adapter(trained(base, 0))
    doubled = jax.jit(lambda t: jax.tree.map(lambda x: 2 * x, t))(ad)
    assert isinstance(doubled, lorajax.Adapter)
    np.testing.assert_array_equal(doubled["Block_0/fc1/kernel"].a, 2 * ad["Block_0/fc1/kernel"].a)


# ---------------------------------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_is_bit_exact(gpt, tmp_path, dtype):
    _, base, _ = gpt
    lora = trained(base, 3, alpha=8.0, rslora=True, dtype=dtype, rank_pattern={"fc1": 4})
    path = tmp_path / "task.safetensors"
    lorajax.save_adapter(path, lora)
    loaded = lorajax.load_adapter(path, base)
    chex.assert_trees_all_equal_structs(loaded, lora)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(lora)):
        assert x.dtype == y.dtype
        # Compare raw bits (a NaN-proof, rounding-proof equality).
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
    assert os.listdir(tmp_path) == ["task.safetensors"]  # no temp file left behind


def test_file_header_records_everything(gpt, tmp_path):
    from safetensors import safe_open

    _, base, _ = gpt
    lora = trained(base, 0, alpha=4.0, rank_pattern={"fc2": 3})
    path = tmp_path / "task.safetensors"
    lorajax.save_adapter(path, lorajax.adapter(lora, {"a": 1}), metadata={"task": "qa", "epochs": [1, 2]})
    with safe_open(path, framework="np") as fh:
        keys = set(fh.keys())
        header = fh.metadata()
    assert header["format"] == "lorajax-adapter"
    info = json.loads(header["lorajax"])
    assert info["lorajax_version"] == lorajax.__version__
    assert info["metadata"] == {"a": 1, "task": "qa", "epochs": [1, 2]}
    t = info["targets"]["Block_1/fc2/kernel"]
    assert t == {
        "rank": 3,
        "alpha": 4.0,
        "rslora": False,
        "scale": 4.0 / 3,
        "layout": "io",
        "base_shape": [32, 16],
        "base_dtype": "float32",
        "a_dtype": "float32",
        "b_dtype": "float32",
    }
    assert info["targets"]["Block_0/SelfAttention_0/out/kernel"]["layout"] == "iio"
    assert keys == {f"{p}.{s}" for p in info["targets"] for s in "ab"}
    assert "Block_0/fc1/kernel.a" in keys
    assert len(info["fingerprint"]) == 64 and info["fingerprint"] == lorajax.adapter(lora).fingerprint
    assert lorajax.read_adapter(path).metadata == {"a": 1, "task": "qa", "epochs": [1, 2]}


def test_loading_onto_the_wrong_base_names_path_and_both_shapes(tmp_path):
    small = model_params(d=16)
    big = model_params(d=24)
    path = tmp_path / "small.safetensors"
    lorajax.save_adapter(path, trained(small, 0))
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        lorajax.load_adapter(path, big)
    msg = str(err.value)
    assert "12 problems" in msg
    assert "Block_0/fc1/kernel: the adapter was made for a base kernel of shape (16, 32), this base has (24, 48)" in msg


@pytest.mark.parametrize("cut", [0, 4, 8, 40, -1, -100])
def test_truncated_file_raises_a_clear_error(gpt, tmp_path, cut):
    _, base, _ = gpt
    path = tmp_path / "task.safetensors"
    lorajax.save_adapter(path, trained(base, 0))
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*(truncated|corrupted|unreadable)"):
        lorajax.load_adapter(path, base)


def test_corrupted_files_raise_clear_errors(gpt, tmp_path):
    from safetensors.numpy import save_file

    _, base, _ = gpt
    path = tmp_path / "task.safetensors"
    lorajax.save_adapter(path, trained(base, 0))
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-5] ^= 0x40  # one bit of tensor data
    flipped.write_bytes(bytes(data))
    data[-5] ^= 0x40
    with pytest.raises(ValueError, match="flipped.safetensors fails its checksum"):
        lorajax.load_adapter(flipped, base)

    header_len = int.from_bytes(data[:8], "little")
    header = bytes(data[8 : 8 + header_len])
    broken = tmp_path / "header.safetensors"
    bad_header = header.replace(b'\\"rank\\": 2', b'\\"rank\\": 9', 1)  # the JSON stays valid, the rank lies
    assert bad_header != header
    broken.write_bytes(bytes(data[:8]) + bad_header + bytes(data[8 + header_len :]))
    with pytest.raises(ValueError, match=r"(?s)header.safetensors is inconsistent.*expected \(16, 9\)"):
        lorajax.read_adapter(broken)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, foreign)
    with pytest.raises(ValueError, match="foreign.safetensors is a safetensors file but not a lorajax adapter"):
        lorajax.load_adapter(foreign, base)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable safetensors file"):
        lorajax.load_adapter(garbage, base)


def test_read_and_load_errors_name_the_function_called(gpt, tmp_path):
    _, base, _ = gpt
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"^read_adapter: .*garbage.safetensors is not a readable safetensors file"):
        lorajax.read_adapter(garbage)
    with pytest.raises(ValueError, match=r"^load_adapter: .*garbage.safetensors is not a readable safetensors file"):
        lorajax.load_adapter(garbage, base)
    path = tmp_path / "small.safetensors"
    lorajax.save_adapter(path, trained(base, 0))
    with pytest.raises(ValueError, match=r"^load_adapter: .*small.safetensors: the adapter does not fit"):
        lorajax.load_adapter(path, model_params(d=24))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_refuses_nonfinite_factors_naming_every_target(gpt, tmp_path, dtype):
    _, base, _ = gpt
    lora = trained(base, 0, dtype=dtype)
    poison = {"Block_0/fc1/kernel": ("a", np.nan), "Block_1/SelfAttention_0/out/kernel": ("b", -np.inf)}

    def poisoned(path, node):
        if lorajax.path_str(path) not in poison:
            return node
        which, value = poison[lorajax.path_str(path)]
        box = getattr(node, which)
        return dataclasses.replace(node, **{which: box.at[(0,) * box.ndim].set(value)})

    bad = jax.tree_util.tree_map_with_path(poisoned, lora, is_leaf=lorajax.is_lora)
    path = tmp_path / "task.safetensors"
    with pytest.raises(ValueError, match=r"^save_adapter: the factors hold NaN or Inf \(2 problems\)") as err:
        lorajax.save_adapter(path, bad)
    msg = str(err.value)
    assert "non-finite: Block_0/fc1/kernel: factor a holds 1 NaN/Inf of 32 entries" in msg  # a is (16, 2)
    assert "non-finite: Block_1/SelfAttention_0/out/kernel: factor b holds 1 NaN/Inf of 32 entries" in msg  # (2, 16)
    assert "allow_nonfinite=True" in msg
    assert not path.exists()  # nothing written
    lorajax.save_adapter(path, bad, allow_nonfinite=True)
    back = lorajax.read_adapter(path)
    assert np.isnan(np.float32(back["Block_0/fc1/kernel"].a[0, 0]))
    assert np.float32(back["Block_1/SelfAttention_0/out/kernel"].b[0, 0]) == -np.inf
    lorajax.save_adapter(path, lora)  # finite factors save without the flag


def test_writes_are_atomic(gpt, tmp_path, monkeypatch):
    _, base, _ = gpt
    path = tmp_path / "task.safetensors"
    lorajax.save_adapter(path, trained(base, 0))
    before = path.read_bytes()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        lorajax.save_adapter(path, trained(base, 1), metadata={"bad": object()})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        lorajax.save_adapter(path, trained(base, 1))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["task.safetensors"]


def test_written_files_follow_the_umask_not_mkstemp(gpt, tmp_path):
    _, base, _ = gpt
    old = os.umask(0o022)
    try:
        lorajax.save_adapter(tmp_path / "task.safetensors", trained(base, 0))
    finally:
        os.umask(old)
    assert (tmp_path / "task.safetensors").stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0o600


# ---------------------------------------------------------------------------------------------------------------------
# swap


def test_swap_matches_a_dense_reference(gpt):
    _, base, _ = gpt
    a1 = lorajax.adapter(trained(base, 1, alpha=4.0))
    a2 = lorajax.adapter(trained(base, 2, rank=3, where=lorajax.attn_qv))  # other targets, other rank
    merged = lorajax.merge(lorajax.attach(base, a1))
    swapped = lorajax.swap(merged, a1, a2)
    for name in sorted(set(a1.targets) | set(a2.targets)):
        want = np64(get(merged, name))
        if name in a1.factors:
            want = want - dense_delta(a1[name])
        if name in a2.factors:
            want = want + dense_delta(a2[name])
        np.testing.assert_allclose(np64(get(swapped, name)), want, rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(swapped["lm_head"]["kernel"], base["lm_head"]["kernel"])  # untouched


def test_swap_from_none_is_bitwise_merge_and_to_none_unmerges(gpt):
    _, base, _ = gpt
    lora = trained(base, 1)
    merged = lorajax.merge(lora)
    chex.assert_trees_all_equal(lorajax.swap(base, None, lora), merged)
    chex.assert_trees_all_close(lorajax.swap(merged, lora, None), base, atol=1e-5, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.sampled_from([(1, 3), (6, 2), (5, 7)]),  # a few shapes: values vary freely, compilations stay few
    rank=st.integers(1, 3),
    alpha=st.floats(0.1, 16.0),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_swap_there_and_back_gives_w_back(shape, rank, alpha, scale, seed):
    rank = min(rank, *shape)
    w0 = scale * np.random.default_rng(seed).normal(size=shape)
    base = {"q": {"kernel": jnp.asarray(w0, jnp.float32)}}
    old = lorajax.adapter(trained(base, seed + 1, rank=rank, where=".*", alpha=alpha))
    new = lorajax.adapter(trained(base, seed + 2, rank=rank, where=".*"))
    w = lorajax.merge(lorajax.attach(base, old))
    back = lorajax.swap(lorajax.swap(w, old, new), new, old)
    # Two float32 roundings of values bounded by |W| + |ΔW|: a few ulps of that magnitude.
    big = float(jnp.abs(w["q"]["kernel"]).max()) + float(np.abs(dense_delta(new["q/kernel"])).max()) + 1.0
    np.testing.assert_allclose(back["q"]["kernel"], w["q"]["kernel"], rtol=0, atol=8 * big * 2**-23)


def test_swap_bf16_rounds_once_per_swap(gpt):
    _, base, _ = gpt
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    a1, a2 = (lorajax.adapter(trained(bf, s)) for s in (1, 2))
    w = lorajax.merge(lorajax.attach(bf, a1))
    once = lorajax.swap(w, a1, a2)
    name = "Block_0/fc1/kernel"
    exact = np64(get(w, name)) - dense_delta(a1[name]) + dense_delta(a2[name])
    got = np64(get(once, name))
    # One rounding to bf16 (at most half an ulp, i.e. 2**-8 relative), not one per add.
    np.testing.assert_array_less(np.abs(got - exact), np.abs(exact) * 2**-8 + 1e-6)
    back = lorajax.swap(once, a2, a1)
    # Back again: two roundings, each at most half an ulp of the value rounded.
    bound = 2**-8 * (np.abs(got) + np.abs(np64(get(back, name)))) + 1e-6
    np.testing.assert_array_less(np.abs(np64(get(back, name)) - np64(get(w, name))), bound)


def test_swap_compiles_once_per_kernel_shape_not_per_alpha(caplog):
    base = {"q": {"kernel": jnp.ones((6, 4))}}
    ads = [lorajax.adapter(trained(base, s, where=".*", alpha=float(s + 1))) for s in range(4)]
    w = lorajax.swap(base, None, ads[0])
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        for old, new in itertools.pairwise(ads):
            w = lorajax.swap(w, old, new)
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert len(compiles) <= 1, compiles  # one signature (old and new both present), whatever the alphas


def test_swap_rejects_lorafied_params_and_wrong_bases(gpt):
    _, base, _ = gpt
    lora = trained(base, 1)
    with pytest.raises(ValueError, match=r"lora: Block_0/fc1/kernel is a LoRA node; swap works on merged params"):
        lorajax.swap(lora, None, lora)
    big = model_params(d=24)
    with pytest.raises(ValueError, match=re.escape("(16, 32), this base has (24, 48)")):
        lorajax.swap(big, lora, None)


# ---------------------------------------------------------------------------------------------------------------------
# combine


def test_combine_cat_is_exact(gpt):
    _, base, _ = gpt
    a1 = lorajax.adapter(trained(base, 1, alpha=4.0))
    a2 = lorajax.adapter(trained(base, 2, rank=3, where=lorajax.attn_qv, rslora=True, alpha=2.0))
    w = [0.7, -1.3]
    cat = lorajax.combine_adapters([a1, a2], w, method="cat")
    assert cat.metadata["combine"]["method"] == "cat"
    assert cat["Block_0/SelfAttention_0/query/kernel"].rank == 5
    assert cat["Block_0/fc1/kernel"].rank == 2 and cat["Block_0/fc1/kernel"].scale == 1.0
    merged = lorajax.merge(lorajax.attach(base, cat))
    for name in cat.targets:
        want = np64(get(base, name))
        for k, ad in enumerate((a1, a2)):
            if name in ad.factors:
                want = want + w[k] * dense_delta(ad[name])
        np.testing.assert_allclose(np64(get(merged, name)), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_combine_svd_reports_the_eckart_young_error(gpt):
    _, base, _ = gpt
    where = r".*/(fc1|out)/kernel"  # a plain and a multi-head layout; few shapes keep compilations few
    a1 = lorajax.adapter(trained(base, 1, rank=2, where=where))
    a2 = lorajax.adapter(trained(base, 2, rank=3, where=where))
    w = [0.5, 0.5]
    full = lorajax.combine_adapters([a1, a2], w, method="svd", rank=5)
    assert full.metadata["combine"]["max_relative_error"] < 1e-5
    svd = lorajax.combine_adapters([a1, a2], w, method="svd", rank=2)
    errors = svd.metadata["combine"]["relative_error"]
    assert set(errors) == set(svd.targets)
    for name in ("Block_0/fc1/kernel", "Block_1/SelfAttention_0/out/kernel"):
        f = svd[name]
        assert f.rank == 2 and f.scale == 1.0
        want = w[0] * dense_delta(a1[name]) + w[1] * dense_delta(a2[name])
        got = dense_delta(f)
        # Independent reference: best rank-2 approximation of the fan-in x fan-out matrix (numpy, float64).
        fan_in = math.prod(f.shape[k] for k in f.layout.fan_in)
        mat = np.transpose(want, list(f.layout.fan_in) + list(f.layout.fan_out)).reshape(fan_in, -1)
        s = np.linalg.svd(mat, compute_uv=False)
        best = np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2))
        actual = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 0.05 < best < 1  # the truncation matters here
        np.testing.assert_allclose(errors[name], best, rtol=1e-4)
        np.testing.assert_allclose(actual, best, rtol=1e-4)
    default = lorajax.combine_adapters([a1, a2], w, method="svd")
    assert default["Block_0/fc1/kernel"].rank == 3  # the largest input rank, as in PEFT


def test_combine_svd_handles_stacked_layers():
    base = {"layers": {"kernel": jax.random.normal(jax.random.key(0), (3, 6, 5))}}
    ads = [lorajax.adapter(trained(base, s, rank=2, where=".*", layout={".*": "sio"})) for s in (1, 2)]
    svd = lorajax.combine_adapters(ads, [1.0, 1.0], method="svd", rank=4)
    f = svd["layers/kernel"]
    assert f.a.shape == (3, 6, 4) and f.b.shape == (3, 4, 5)
    want = dense_delta(ads[0]["layers/kernel"]) + dense_delta(ads[1]["layers/kernel"])
    np.testing.assert_allclose(dense_delta(f), want, rtol=1e-4, atol=1e-5)


def test_combine_validates_its_inputs(gpt):
    _, base, _ = gpt
    a1 = lorajax.adapter(trained(base, 1))
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        lorajax.combine_adapters([a1, a1], [1.0])
    with pytest.raises(ValueError, match="method must be one of 'cat', "):
        lorajax.combine_adapters([a1], [1.0], method="task")
    with pytest.raises(ValueError, match="rank applies to the SVD methods only"):
        lorajax.combine_adapters([a1], [1.0], method="cat", rank=2)
    sq = {"w": {"kernel": jnp.ones((4, 4))}}
    io = lorajax.adapter(trained(sq, 1, where=".*", layout={".*": "io"}))
    oi = lorajax.adapter(trained(sq, 2, where=".*", layout={".*": "oi"}))
    with pytest.raises(ValueError, match=r"layout: w/kernel: adapter 0 has layout 'io', adapter 1 'oi'"):
        lorajax.combine_adapters([io, oi], [1.0, 1.0])

"""Trainable tokens in lorajax's own adapter files, and the LoRA bias (lora_bias) born sharded like ``b``.

The first part goes params -> ``save_adapter`` -> ``load_adapter`` onto the plain base and compares ``merge`` with the
original's bit for bit (the rows and factors are stored in their own dtype, the indices as JSON in the header). The
mesh cases run in one subprocess with 8 virtual CPU devices (forced before JAX starts), as tests/test_sharding.py does.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _workers import run_worker

import lorajax

ROWS, DIM, OUT = 16, 4, 6
IDS = [3, 9]


def _base():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (ROWS, DIM))},
        "fc": {"kernel": jax.random.normal(k[1], (DIM, OUT)), "bias": jax.random.normal(k[2], (OUT,))},
        "head": {"kernel": jnp.zeros((OUT, 2)), "bias": jnp.zeros(2)},
    }


def _trained(base, **kw):
    """Lorafied params whose every trained leaf holds nonzero values (as after training)."""
    p = lorajax.lorafy(base, rank=2, where=["fc"], trainable_tokens={"embed": IDS}, key=jax.random.key(1), **kw)
    trained, frozen = lorajax.partition(p)
    leaves, tree = jax.tree.flatten(trained)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [x + jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return lorajax.combine(jax.tree.unflatten(tree, leaves), frozen)


def _header(f):
    with open(f, "rb") as fh:
        n = int(np.frombuffer(fh.read(8), "<u8")[0])
        return json.loads(json.loads(fh.read(n))["__metadata__"]["lorajax"])


def _equal(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kw", [{}, {"lora_bias": True, "also": ["head"]}], ids=["tokens", "tokens+bias+also"])
def test_round_trip_merges_bit_for_bit(tmp_path, kw):
    base = _base()
    p = _trained(base, **kw)
    f = tmp_path / "a.safetensors"
    lorajax.save_adapter(f, p)
    back = lorajax.load_adapter(f, base)
    node = back["embed"]["embedding"]
    assert isinstance(node, lorajax.TrainableTokens) and node.indices == tuple(IDS)
    assert node.base is base["embed"]["embedding"]  # the base's own table, not a copy from the file
    _equal(lorajax.merge(back), lorajax.merge(p))
    _equal(lorajax.partition(back)[0], lorajax.partition(p)[0])  # every trained leaf, the rows included
    assert jax.tree.structure(lorajax.mask(back)) == jax.tree.structure(lorajax.mask(p))
    assert lorajax.summary(back).trainable == lorajax.summary(p).trainable
    merged = lorajax.merge(back)["embed"]["embedding"]
    assert not np.array_equal(merged[jnp.array(IDS)], base["embed"]["embedding"][jnp.array(IDS)])  # rows moved
    np.testing.assert_array_equal(np.delete(merged, IDS, 0), np.delete(base["embed"]["embedding"], IDS, 0))


def test_adapter_carries_rows_and_indices_and_the_file_is_format_3(tmp_path):
    base = _base()
    p = _trained(base)
    ad = lorajax.adapter(p)
    t = ad.trainables["embed/embedding"]
    assert isinstance(t, lorajax.AdapterTokens)
    assert (t.values.shape, t.indices, t.shape, t.dtype) == ((2, DIM), tuple(IDS), (ROWS, DIM), "float32")
    np.testing.assert_array_equal(t.values, p["embed"]["embedding"].values)
    assert set(ad.trainables) == {"embed/embedding"} and ad.targets == ("fc/kernel",)
    # one row of DIM per index beside fc's a (DIM, 2) and b (2, OUT)
    assert lorajax.summary(p).trainable == len(IDS) * DIM + DIM * 2 + 2 * OUT
    assert sum(x.size for x in jax.tree.leaves(ad)) == lorajax.summary(p).trainable
    plain = lorajax.adapter(lorajax.lorafy(base, rank=2, where=["fc"], key=jax.random.key(1)))
    assert ad.fingerprint != plain.fingerprint
    f = tmp_path / "a.safetensors"
    lorajax.save_adapter(f, ad)
    h = _header(f)
    assert h["format_version"] == 3 and "trainables" not in h
    assert h["tokens"] == {"embed/embedding": {"indices": IDS, "table_shape": [ROWS, DIM], "table_dtype": "float32"}}
    read = lorajax.read_adapter(f)
    assert read.fingerprint == ad.fingerprint and read.trainables["embed/embedding"].indices == tuple(IDS)
    # files without trainable tokens keep their formats (1: factors only, 2: also= leaves)
    lorajax.save_adapter(f, plain)
    assert _header(f)["format_version"] == 1
    lorajax.save_adapter(f, lorajax.lorafy(base, rank=2, where=["fc"], also=["head"]))
    assert _header(f)["format_version"] == 2


def test_tokens_only_params_and_attach_replaces_earlier_tokens(tmp_path):
    base = _base()
    p = lorajax.trainable_tokens(base, {"embed": [1]})
    p["embed"]["embedding"] = dataclasses.replace(p["embed"]["embedding"], values=jnp.full((1, DIM), 7.0))
    ad = lorajax.adapter(p)
    assert ad.targets == () and set(ad.trainables) == {"embed/embedding"}
    other = _trained(base)  # lorafied with tokens at rows 3, 9: attach gives exactly this adapter
    out = lorajax.attach(other, ad)
    assert out["embed"]["embedding"].indices == (1,) and not lorajax.is_lora(out["fc"]["kernel"])
    _equal(lorajax.merge(out), lorajax.merge(p))
    # an adapter without tokens attached onto params with tokens gives the base table back there
    back = lorajax.attach(other, lorajax.adapter(lorajax.lorafy(base, rank=2, where=["fc"])))
    assert back["embed"]["embedding"] is base["embed"]["embedding"]


def test_a_table_of_another_shape_or_bad_indices_are_named(tmp_path):
    base = _base()
    f = tmp_path / "a.safetensors"
    lorajax.save_adapter(f, _trained(base))
    small = {**base, "embed": {"embedding": jnp.zeros((ROWS - 4, DIM))}}
    with pytest.raises(ValueError, match=r"shape: embed/embedding: .*table of shape \(16, 4\), this base has \(12, 4"):
        lorajax.load_adapter(f, small)
    with pytest.raises(ValueError, match=r"missing: embed/embedding: .*tokens for a table of shape \(16, 4\)"):
        lorajax.load_adapter(f, {k: v for k, v in base.items() if k != "embed"})
    lora_there = lorajax.lorafy(base, rank=2, where=["embed"])
    with pytest.raises(ValueError, match=r"tokens: embed/embedding: .*the params hold LoRA"):
        lorajax.attach(lora_there, lorajax.read_adapter(f))
    bad = lorajax.Adapter({}, "{}", {"embed/embedding": lorajax.AdapterTokens(jnp.zeros((2, DIM)), (3, 99))})
    with pytest.raises(ValueError, match=r"embed/embedding: token indices \[99\] repeat or lie outside the table"):
        lorajax.attach(base, bad)
    wide = lorajax.Adapter({}, "{}", {"embed/embedding": lorajax.AdapterTokens(jnp.zeros((2, DIM + 1)), (3, 9))})
    with pytest.raises(ValueError, match=r"need rows of shape \(2, 4\), the adapter has \(2, 5\)"):
        lorajax.attach(base, wide)


def test_a_header_whose_indices_do_not_fit_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    f = tmp_path / "a.safetensors"
    lorajax.save_adapter(f, _trained(_base()))
    tensors = load_file(f)
    h = _header(f)
    h["tokens"]["embed/embedding"]["indices"] = [3, 99]
    save_file(tensors, f, metadata={"format": "lorajax-adapter", "lorajax": json.dumps(h)})
    with pytest.raises(ValueError, match=r"tokens: embed/embedding: token indices \[99\] repeat or lie outside"):
        lorajax.read_adapter(f)
    h["tokens"]["embed/embedding"]["indices"] = [3, 9, 10]
    save_file(tensors, f, metadata={"format": "lorajax-adapter", "lorajax": json.dumps(h)})
    with pytest.raises(ValueError, match=r"3 token indices into a table \(16, 4\) need rows of shape \(3, 4\)"):
        lorajax.read_adapter(f)


def test_operations_that_cannot_carry_tokens_refuse_them():
    base = _base()
    p = _trained(base)
    with pytest.raises(ValueError, match=r"(?s)swap: .*tokens: embed/embedding: the adapter carries trainable token"):
        lorajax.swap(lorajax.merge(lorajax.unlorafy(p)), None, lorajax.adapter(p))
    with pytest.raises(ValueError, match=r"(?s)stack_adapters: .*embed/embedding.*trainable_tokens"):
        lorajax.stack_adapters([p, p], base=base)
    with pytest.raises(ValueError, match=r"(?s)combine_adapters: .*embed/embedding"):
        lorajax.combine_adapters([p, p], [0.5, 0.5], method="cat")


# --------------------------------------------------------------------------------------------------------------------
# On a mesh: 8 virtual CPU devices, in one subprocess.

_MESH = textwrap.dedent(
    """
    import os, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, lorajax, tempfile
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((2, 4), ("data", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    put = lambda x, *s: jax.device_put(x, NamedSharding(mesh, P(*s)))
    base = {
        "fc": {"kernel": put(jnp.ones((8, 16)), "data", "tp"), "bias": put(jnp.zeros(16), "tp")},
        "qkv": {"kernel": put(jnp.ones((8, 4, 8)), "data", "tp", None), "bias": put(jnp.zeros((4, 8)), "tp", None)},
        "layers": {
            "kernel": put(jnp.ones((2, 8, 16)), "data", None, "tp"), "bias": put(jnp.zeros((2, 16)), "data", "tp")
        },
        "embed": {"embedding": put(jnp.arange(64.0).reshape(16, 4), "data", "tp")},
    }
    layout = {"fc/kernel": "io", "qkv/kernel": "ioo", "layers/kernel": "sio"}
    p = lorajax.lorafy(base, rank=2, where=["fc", "qkv", "layers"], layout=layout, lora_bias=True,
                       trainable_tokens={"embed": [1, 5]})
    out = {k: str(p[k]["kernel"].bias.sharding.spec) for k in ("fc", "qkv", "layers")}
    out["b"] = {k: str(p[k]["kernel"].b.sharding.spec) for k in ("fc", "qkv", "layers")}
    f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    p["embed"]["embedding"] = lorajax.TrainableTokens(base["embed"]["embedding"], jnp.ones((2, 4)), (1, 5))
    lorajax.save_adapter(f, p)
    back = lorajax.load_adapter(f, base)
    out["rows"] = str(back["embed"]["embedding"].values.sharding.spec)
    out["loaded_bias"] = str(back["fc"]["kernel"].bias.sharding.spec)
    out["same"] = all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(lorajax.merge(back)),
                                                             jax.tree.leaves(lorajax.merge(p))))
    print(json.dumps(out))
    """
)


def test_on_a_mesh_the_lora_bias_is_born_like_b_and_token_rows_load_like_the_table():
    out = run_worker("-c", _MESH, timeout=300)
    assert out["b"] == {"fc": "P(None, 'tp')", "qkv": "P(None, 'tp', None)", "layers": "P('data', None, 'tp')"}
    assert (out["fc"], out["qkv"], out["layers"]) == ("P('tp',)", "P('tp', None)", "P('data', 'tp')")
    assert out["rows"] == "P(None, 'tp')" and out["loaded_bias"] == "P('tp',)" and out["same"]

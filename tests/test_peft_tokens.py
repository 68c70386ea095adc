"""PEFT's ``lora_bias`` and ``trainable_token_indices``: files PEFT 0.21.2 wrote, and lorajax's own.

The fixtures in tests/fixtures/peft/{lora_bias,tokens,tokens_dict}/ were written by PEFT on a tiny random
Qwen2 (q/k/v projections with biases, input embeddings tied to the LM head) by
tests/fixtures/make_peft_tokens_fixtures.py. A plain-JAX Qwen2 over the PyTorch state dict (PyTorch's names
and layouts) runs them; the logits are compared with PEFT's within 1e-5 of the largest logit, through
``merge`` and ``factored``. The torch-marked tests write lorajax's adapters with ``save_peft`` and run them
in PEFT.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
SCRIPT = Path(__file__).parent / "fixtures" / "make_peft_tokens_fixtures.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_peft_tokens_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CFG = _script().QWEN2


# --------------------------------------------------------------------------------------------------------------------
# A plain-JAX Qwen2 over PyTorch's state dict (the test's own oracle for the base model).


def nest(state: dict[str, np.ndarray]) -> dict:
    """``{"model": {"layers": {"0": {"self_attn": {"q_proj": {"weight": ...}}}}}}`` from PyTorch's flat names."""
    out: dict = {}
    for key, value in state.items():
        *mods, leaf = key.split(".")
        node = out
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = jnp.asarray(value)
    return out


def _linear(p, x):
    y = x @ p["weight"].T
    return y + p["bias"] if "bias" in p else y


def _rms(w, x, eps=CFG["rms_norm_eps"]):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta=CFG["rope_theta"]):  # x: (B, T, H, hd)
    hd, t = x.shape[-1], x.shape[1]
    inv = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * inv
    emb = jnp.concatenate([freqs, freqs], -1)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * jnp.cos(emb) + jnp.concatenate([-x2, x1], -1) * jnp.sin(emb)


def qwen2(params, ids):
    m = params["model"]
    nh, nkv = CFG["num_attention_heads"], CFG["num_key_value_heads"]
    hd = CFG["hidden_size"] // nh
    h = m["embed_tokens"]["weight"][ids]
    b, t = ids.shape
    causal = jnp.tril(jnp.ones((t, t), bool))
    for i in range(CFG["num_hidden_layers"]):
        layer = m["layers"][str(i)]
        at = layer["self_attn"]
        x = _rms(layer["input_layernorm"]["weight"], h)
        q = _rope(_linear(at["q_proj"], x).reshape(b, t, nh, hd))
        k = _rope(_linear(at["k_proj"], x).reshape(b, t, nkv, hd))
        v = _linear(at["v_proj"], x).reshape(b, t, nkv, hd)
        k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd)
        s = jnp.where(causal, s, -jnp.inf)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, nh * hd)
        h = h + _linear(at["o_proj"], o)
        x = _rms(layer["post_attention_layernorm"]["weight"], h)
        mlp = layer["mlp"]
        h = h + _linear(mlp["down_proj"], jax.nn.silu(_linear(mlp["gate_proj"], x)) * _linear(mlp["up_proj"], x))
    return _rms(m["norm"]["weight"], h) @ m["embed_tokens"]["weight"].T  # tied LM head


def fixture(case: str):
    d = FIXTURES / case
    return nest(load_file(str(d / "base.safetensors"))), load_file(str(d / "io.safetensors"))


def close(got, want, tol=1e-5):
    want = np.asarray(want)
    err = float(np.abs(np.asarray(got) - want).max())
    print(f"max error {err:.3g} of max logit {float(np.abs(want).max()):.3g}")
    assert err <= tol * float(np.abs(want).max()), err
    return err


def test_the_adapter_moves_the_logits():
    # The adapter changes the logits: the base twin alone must not match PEFT's (the oracle can fail).
    base, io = fixture("lora_bias")
    got = np.asarray(qwen2(base, jnp.asarray(io["ids"])))
    assert np.abs(got - io["logits"]).max() > 1e-3 * np.abs(io["logits"]).max()


# --------------------------------------------------------------------------------------------------------------------
# lora_bias


def test_lora_bias_fixture_gives_peft_logits_merged_and_factored():
    base, io = fixture("lora_bias")
    p = lorajax.load_peft(FIXTURES / "lora_bias", base)
    node = p["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert node.spec.bias and node.bias.shape == (16,)
    ids = jnp.asarray(io["ids"])
    close(qwen2(lorajax.merge(p), ids), io["logits_merged"])
    close(qwen2(lorajax.merge(p), ids), io["logits"])
    close(lorajax.factored(qwen2)(p, ids), io["logits"])
    # Without the biases (zeroed), the logits move: the bias is read, not ignored.
    no_bias = jax.tree.map(
        lambda x: dataclasses.replace(x, bias=jnp.zeros_like(x.bias)) if lorajax.is_lora(x) else x,
        p,
        is_leaf=lorajax.is_lora,
    )
    got = np.asarray(qwen2(lorajax.merge(no_bias), ids))
    assert np.abs(got - io["logits"]).max() > 1e-3 * np.abs(io["logits"]).max()


def test_lora_bias_merge_folds_into_the_layer_bias_exactly():
    base, _ = fixture("lora_bias")
    p = lorajax.load_peft(FIXTURES / "lora_bias", base)
    tensors = load_file(str(FIXTURES / "lora_bias" / "adapter_model.safetensors"))
    config = json.loads((FIXTURES / "lora_bias" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    key = "model.layers.1.self_attn.v_proj"
    want = (
        base["model"]["layers"]["1"]["self_attn"]["v_proj"]["bias"]
        + scale * tensors[f"base_model.model.{key}.lora_B.bias"]
    )
    merged = lorajax.merge(p)
    np.testing.assert_allclose(merged["model"]["layers"]["1"]["self_attn"]["v_proj"]["bias"], want, rtol=0, atol=1e-7)
    # merge keeps the tree's structure: the same paths and shapes as the base
    assert jax.tree.structure(merged) == jax.tree.structure(base)


def test_lora_bias_gradient_reaches_the_bias_not_the_frozen_leaves():
    base, io = fixture("lora_bias")
    p = lorajax.load_peft(FIXTURES / "lora_bias", base)
    ids = jnp.asarray(io["ids"])
    gm = jax.jit(jax.grad(lambda q: jnp.sum(jnp.tanh(qwen2(lorajax.merge(q), ids)))))(p)
    gf = jax.jit(jax.grad(lambda q: jnp.sum(jnp.tanh(lorajax.factored(qwen2)(q, ids)))))(p)
    for g in (gm, gf):
        at = g["model"]["layers"]["0"]["self_attn"]
        assert float(jnp.abs(at["q_proj"]["weight"].bias).max()) > 0
        assert float(jnp.abs(at["q_proj"]["weight"].base).max()) == 0
        assert float(jnp.abs(at["q_proj"]["bias"]).max()) == 0  # the layer's own bias stays frozen
    for layer, proj in (("0", "q_proj"), ("1", "k_proj"), ("1", "v_proj")):  # merge and factored agree
        node_m = gm["model"]["layers"][layer]["self_attn"][proj]["weight"]
        node_f = gf["model"]["layers"][layer]["self_attn"][proj]["weight"]
        np.testing.assert_allclose(node_m.bias, node_f.bias, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(node_m.b, node_f.b, rtol=1e-4, atol=1e-6)
    m = lorajax.mask(p)["model"]["layers"]["0"]["self_attn"]
    assert m["q_proj"]["weight"].bias is True and m["q_proj"]["bias"] is False


def test_lora_bias_save_peft_writes_peft_keys_and_round_trips(tmp_path):
    base, io = fixture("lora_bias")
    p = lorajax.load_peft(FIXTURES / "lora_bias", base)
    lorajax.save_peft(tmp_path / "out", p)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    want = load_file(str(FIXTURES / "lora_bias" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_lora_bias_on_stacked_layers_round_trips_bit_exact(tmp_path):
    # One (layers, out, in) kernel and (layers, out) bias for q_proj of both layers, named with a layer template.
    base, _ = fixture("lora_bias")
    layers = base["model"]["layers"]
    q = [layers[i]["self_attn"]["q_proj"] for i in "01"]
    stacked = {"q": {"weight": jnp.stack([x["weight"] for x in q]), "bias": jnp.stack([x["bias"] for x in q])}}
    names = {"q": "model.layers.{}.self_attn.q_proj"}
    p = lorajax.load_peft(FIXTURES / "lora_bias", stacked, name_map=names, layout={"q/weight": "soi"}, partial=True)
    assert p["q"]["weight"].bias.shape == (2, 16)
    want = lorajax.merge(lorajax.load_peft(FIXTURES / "lora_bias", base))["model"]["layers"]
    got = lorajax.merge(p)["q"]
    for i in range(2):
        np.testing.assert_array_equal(got["bias"][i], want[str(i)]["self_attn"]["q_proj"]["bias"])
    lorajax.save_peft(tmp_path / "out", p, name_map=names)
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    original = load_file(str(FIXTURES / "lora_bias" / "adapter_model.safetensors"))
    assert len(written) == 6
    for k, v in written.items():
        np.testing.assert_array_equal(v, original[k])


def test_lora_bias_in_adapter_files(tmp_path):
    base, io = fixture("lora_bias")
    p = lorajax.load_peft(FIXTURES / "lora_bias", base)
    lorajax.save_adapter(tmp_path / "a.safetensors", lorajax.adapter(p))
    q = lorajax.load_adapter(tmp_path / "a.safetensors", base)
    node = q["model"]["layers"]["0"]["self_attn"]["k_proj"]["weight"]
    assert node.spec.bias
    ids = jnp.asarray(io["ids"])
    close(qwen2(lorajax.merge(q), ids), io["logits"])


def test_lorafy_lora_bias_starts_at_the_base_and_trains():
    base, io = fixture("lora_bias")
    p = lorajax.lorafy(base, rank=2, where=["q_proj", "v_proj"], lora_bias=True)
    node = p["model"]["layers"]["0"]["self_attn"]["v_proj"]["weight"]
    assert node.spec.bias and node.bias.shape == (8,) and not node.bias.any()
    ids = jnp.asarray(io["ids"])
    np.testing.assert_array_equal(
        lorajax.merge(p)["model"]["layers"]["0"]["self_attn"]["v_proj"]["bias"],
        base["model"]["layers"]["0"]["self_attn"]["v_proj"]["bias"],
    )
    g = jax.jit(jax.grad(lambda q: jnp.sum(lorajax.factored(qwen2)(q, ids) ** 2)))(p)
    assert float(jnp.abs(g["model"]["layers"]["0"]["self_attn"]["v_proj"]["weight"].bias).max()) > 0


def test_lorafy_lora_bias_errors():
    base, _ = fixture("lora_bias")
    with pytest.raises(ValueError, match=r"o_proj/weight: has a LoRA bias .* no model/layers/0/self_attn/o_proj/bias"):
        lorajax.lorafy(base, rank=2, where=["o_proj"], lora_bias=True)
    with pytest.raises(ValueError, match=r"lora_bias=True with dora=True"):
        lorajax.lorafy(base, rank=2, where=["q_proj"], lora_bias=True, dora=True)
    with pytest.raises(ValueError, match=r"lora_bias=True with init='olora'"):
        lorajax.lorafy(base, rank=2, where=["q_proj"], lora_bias=True, init="olora")
    with pytest.raises(ValueError, match=r"lora_bias must be True or False, got 'yes'"):
        lorajax.lorafy(base, rank=2, where=["q_proj"], lora_bias="yes")
    with pytest.raises(ValueError, match=r"an embedding; PEFT has no lora_bias on embeddings"):
        lorajax.lorafy(base, rank=2, where=["embed_tokens"], lora_bias=True)


def test_lora_bias_tensor_without_the_config_flag_is_refused(tmp_path):
    d = tmp_path / "a"
    shutil.copytree(FIXTURES / "lora_bias", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": False}))
    base, _ = fixture("lora_bias")
    with pytest.raises(ValueError, match=r"q_proj.lora_B.bias: a LoRA bias, but the config does not set lora_bias"):
        lorajax.load_peft(d, base)


# --------------------------------------------------------------------------------------------------------------------
# With PEFT: lorajax's files in PeftModel.from_pretrained.


def _peft_logits(case: str, folder: Path) -> np.ndarray:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel

    model = PeftModel.from_pretrained(_script().base_model(case), str(folder)).eval()
    with torch.no_grad():
        return model(torch.tensor(_script().IDS)).logits.numpy()


@pytest.mark.torch
def test_lora_bias_lorajax_adapter_in_peft(tmp_path):
    base, io = fixture("lora_bias")
    p = lorajax.lorafy(base, rank=2, where=["q_proj", "k_proj"], lora_bias=True, alpha=3.0, key=1)
    p = jax.tree.map(  # train: random b and biases
        lambda x: (
            dataclasses.replace(x, b=jnp.full_like(x.b, 0.3), bias=jnp.linspace(-1, 1, x.bias.size))
            if lorajax.is_lora(x)
            else x
        ),
        p,
        is_leaf=lorajax.is_lora,
    )
    lorajax.save_peft(tmp_path / "out", p)
    ids = jnp.asarray(io["ids"])
    want = np.asarray(lorajax.factored(qwen2)(p, ids))
    close(_peft_logits("lora_bias", tmp_path / "out"), want)
    close(qwen2(lorajax.merge(p), ids), want)


# --------------------------------------------------------------------------------------------------------------------
# trainable_token_indices


def _table(p):
    return p["model"]["embed_tokens"]["weight"]


@pytest.mark.parametrize("case", ["tokens", "tokens_dict"])
def test_trainable_tokens_fixture_gives_peft_logits_merged_and_factored(case):
    base, io = fixture(case)
    p = lorajax.load_peft(FIXTURES / case, base)
    node = _table(p)
    assert isinstance(node, lorajax.TrainableTokens) and node.indices == (3, 17, 30) and node.values.shape == (3, 16)
    ids = jnp.asarray(io["ids"])
    close(qwen2(lorajax.merge(p), ids), io["logits_merged"])
    close(qwen2(lorajax.merge(p), ids), io["logits"])
    close(lorajax.factored(qwen2)(p, ids), io["logits"])


def test_trainable_tokens_replace_rows_as_peft_does():
    # PEFT's trainable_tokens_delta holds the rows' new values, not a difference: merged rows equal them exactly.
    base, _ = fixture("tokens")
    p = lorajax.load_peft(FIXTURES / "tokens", base)
    rows = load_file(str(FIXTURES / "tokens" / "adapter_model.safetensors"))[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ]
    merged = np.asarray(_table(lorajax.merge(p)))
    np.testing.assert_array_equal(merged[[3, 17, 30]], rows)
    others = [i for i in range(32) if i not in (3, 17, 30)]
    np.testing.assert_array_equal(merged[others], np.asarray(_table(base))[others])
    assert jax.tree.structure(lorajax.merge(p)) == jax.tree.structure(base)
    assert lorajax.unlorafy(p)["model"]["embed_tokens"]["weight"] is _table(base)


def test_trainable_tokens_gradient_reaches_the_rows_only():
    base, io = fixture("tokens")
    p = lorajax.load_peft(FIXTURES / "tokens", base)
    ids = jnp.asarray(io["ids"])
    gm = jax.jit(jax.grad(lambda q: jnp.sum(jnp.tanh(qwen2(lorajax.merge(q), ids)))))(p)
    gf = jax.jit(jax.grad(lambda q: jnp.sum(jnp.tanh(lorajax.factored(qwen2)(q, ids)))))(p)
    for g in (gm, gf):
        assert float(jnp.abs(_table(g).values).min()) > 0  # every trained row is read (ids and the tied head)
        assert float(jnp.abs(_table(g).base).max()) == 0
        assert float(jnp.abs(g["model"]["norm"]["weight"]).max()) == 0
    np.testing.assert_allclose(_table(gm).values, _table(gf).values, rtol=1e-4, atol=1e-6)
    m = lorajax.mask(p)
    assert _table(m).values is True and _table(m).base is False


def test_trainable_tokens_save_peft_writes_peft_keys_bit_exact(tmp_path):
    base, _ = fixture("tokens")
    p = lorajax.load_peft(FIXTURES / "tokens", base)
    lorajax.save_peft(tmp_path / "out", p)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": [3, 17, 30]}
    want = load_file(str(FIXTURES / "tokens" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_lorafy_trainable_tokens_starts_at_the_base():
    base, io = fixture("tokens")
    p = lorajax.lorafy(base, rank=2, where=["q_proj"], trainable_tokens={"embed_tokens": [5, 1]})
    node = _table(p)
    assert node.indices == (5, 1)
    np.testing.assert_array_equal(node.values, np.asarray(_table(base))[[5, 1]])
    np.testing.assert_array_equal(_table(lorajax.merge(p)), _table(base))


def test_trainable_tokens_errors(tmp_path):
    base, _ = fixture("tokens")
    with pytest.raises(ValueError, match=r"token indices \[40, 2\] repeat or lie outside the table of 32 rows"):
        lorajax.lorafy(base, rank=2, where=["q_proj"], trainable_tokens={"embed_tokens": [2, 40, 2]})
    with pytest.raises(ValueError, match=r"'lm_head' matches no 2-D table"):
        lorajax.trainable_tokens(base, {"lm_head": [1]})
    with pytest.raises(ValueError, match=r"already a lorajax node"):
        lorajax.lorafy(base, rank=2, where=["embed_tokens"], trainable_tokens={"embed_tokens": [1]})
    d = tmp_path / "a"
    shutil.copytree(FIXTURES / "tokens", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "trainable_token_indices": [1, 2]}))
    with pytest.raises(ValueError, match=r"rows of shape \(3, 16\) for the 2 indices \[1, 2\]"):
        lorajax.load_peft(d, base)


@pytest.mark.torch
def test_trainable_tokens_lorajax_adapter_in_peft(tmp_path):
    base, io = fixture("tokens")
    p = lorajax.lorafy(base, rank=2, where=["v_proj"], trainable_tokens={"embed_tokens": [0, 9, 17]}, key=3)
    node = _table(p)
    p["model"]["embed_tokens"]["weight"] = dataclasses.replace(node, values=node.values * -2.0 + 0.25)
    lorajax.save_peft(tmp_path / "out", p)
    ids = jnp.asarray(io["ids"])
    want = np.asarray(lorajax.factored(qwen2)(p, ids))
    assert np.abs(want - np.asarray(qwen2(base, ids))).max() > 1e-3 * np.abs(want).max()  # the rows matter
    close(_peft_logits("tokens", tmp_path / "out"), want)


def test_trainable_tokens_are_counted_and_not_dropped_by_adapters():
    base, _ = fixture("tokens")
    p = lorajax.lorafy(base, rank=2, where=["q_proj"], trainable_tokens={"embed_tokens": [4]})
    rows = lorajax.adapter(p).trainables["model/embed_tokens/weight"]  # lorajax adapters carry them (format 3)
    assert rows.indices == (4,) and rows.values.shape == (1, 16)
    assert lorajax.summary(p).trainable == 1 * 16 + 2 * (16 * 2 + 2 * 16)  # one row, and q_proj's a, b in 2 layers


def test_lora_bias_is_refused_where_it_would_be_dropped():
    base, _ = fixture("lora_bias")
    p = lorajax.lorafy(base, rank=2, where=["q_proj"], lora_bias=True)
    with pytest.raises(ValueError, match=r"combine_adapters: .*q_proj/weight have a LoRA bias"):
        lorajax.combine_adapters([p, p], [0.5, 0.5], method="cat")
    with pytest.raises(ValueError, match=r"stack_adapters: .*q_proj/weight have a LoRA bias"):
        lorajax.stack_adapters([p, p], base=base)
    with pytest.raises(ValueError, match=r"swap: .*a LoRA bias"):
        lorajax.swap(base, None, lorajax.adapter(p))

"""Naming conventions, tuple names for fused kernels and layouts settled by the adapter file (no PyTorch).

A gemma-shaped tree (tunix's Gemma 3 paths: ``q_einsum`` (N, D, H) with D != N*H, ``kv_einsum`` (2, K, D, H),
``attn_vec_einsum`` (N, H, D), MLP ``kernel``s) and PEFT files written by hand in PEFT's layout: each module's
``B @ A`` is an ``(out, in)`` PyTorch weight, which tunix's loader turns into the kernel by transposing and
reshaping (``(K*H, D) -> (D, K, H) -> (K, D, H)``). The checks compare the merged kernels against that dense
computation in float64.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import lorajax
from lorajax.peft import name_map_from_key_mapping

N, K, D, H, F, R = 2, 1, 12, 4, 6, 2  # d_model 12 != heads * head_dim 8
ATTN, MLP = "model.layers.{}.self_attn.", "model.layers.{}.mlp."


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    layer = lambda: {
        "attn": {
            "q_einsum": {"w": rng.normal(size=(N, D, H)).astype(np.float32)},
            "kv_einsum": {"w": rng.normal(size=(2, K, D, H)).astype(np.float32)},
            "attn_vec_einsum": {"w": rng.normal(size=(N, H, D)).astype(np.float32)},
        },
        "mlp": {name: {"kernel": rng.normal(size=shape).astype(np.float32)} for name, shape in
                (("gate_proj", (D, F)), ("up_proj", (D, F)), ("down_proj", (F, D)))},
    }  # fmt: skip
    tree = {"embedder": {"input_embedding": rng.normal(size=(16, D)).astype(np.float32)}, "layers": [layer(), layer()]}
    return jax.tree.map(jnp.asarray, tree)  # (a NumPy leaf's .base hides its shape from _layout.attention_shapes)


# Each HF module: (in, out) of its PyTorch weight and how tunix lays (out, in) into the kernel.
def _to_kernel(module, w_oi):
    """A PyTorch (out, in) weight as the tunix Gemma kernel it loads into."""
    t = w_oi.T
    if module in ("q_proj", "k_proj", "v_proj"):
        heads = N if module == "q_proj" else K
        return t.reshape(D, heads, H).transpose(1, 0, 2)
    if module == "o_proj":
        return t.reshape(N, H, D)
    return t  # gate/up/down: (in, out)


_SIZES = {"q_proj": (D, N * H), "k_proj": (D, K * H), "v_proj": (D, K * H), "o_proj": (N * H, D),
          "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}  # fmt: skip


def _write_adapter(path, modules, layers=(0, 1), alpha=4, seed=1, dora=False):
    rng = np.random.default_rng(seed)
    tensors, full = {}, {}
    for layer in layers:
        for m in modules:
            n_in, n_out = _SIZES[m]
            name = (ATTN if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else MLP).format(layer) + m
            A, B = rng.normal(size=(R, n_in)).astype(np.float32), rng.normal(size=(n_out, R)).astype(np.float32)
            tensors[f"base_model.model.{name}.lora_A.weight"] = A
            tensors[f"base_model.model.{name}.lora_B.weight"] = B
            if dora:
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = rng.uniform(1, 2, n_out).astype(np.float32)
            full[(layer, m)] = (alpha / R) * B.astype(np.float64) @ A.astype(np.float64)
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": R, "lora_alpha": alpha, "target_modules": list(modules), "use_dora": dora}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return full


def _expected(base, full):
    """The merged tree in float64: every module's update, laid into its (slice of a) kernel."""
    want = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
    for (layer, m), delta in full.items():
        attn, mlp = want["layers"][layer]["attn"], want["layers"][layer]["mlp"]
        if m == "q_proj":
            attn["q_einsum"]["w"] += _to_kernel(m, delta)
        elif m in ("k_proj", "v_proj"):
            attn["kv_einsum"]["w"][0 if m == "k_proj" else 1] += _to_kernel(m, delta)
        elif m == "o_proj":
            attn["attn_vec_einsum"]["w"] += _to_kernel(m, delta)
        else:
            mlp[m]["kernel"] += _to_kernel(m, delta)
    return want


def _close(got, want, tol=1e-5):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=tol, atol=tol), got, want)


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_tunix_convention_loads_fused_and_gemma3_kernels_exactly(tmp_path):
    base = _tree()
    full = _write_adapter(tmp_path / "a", ALL)
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")
    kv = loaded["layers"][0]["attn"]["kv_einsum"]["w"]
    q = loaded["layers"][0]["attn"]["q_einsum"]["w"]
    assert kv.layout == lorajax.Layout("soio") and q.layout == lorajax.Layout("oio")  # q: from the file's A, B
    _close(lorajax.merge(loaded), _expected(base, full))


def test_adapter_on_k_only_leaves_the_v_slice_as_it_was(tmp_path):
    base = _tree()
    full = _write_adapter(tmp_path / "a", ("k_proj",), layers=(1,))
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")
    _close(lorajax.merge(loaded), _expected(base, full))


def test_tuple_names_round_trip_per_slice_and_shared_a(tmp_path):
    """save_peft writes one module per slice: a stacked node as it is, a fan-out one with its shared A."""
    base = _tree()
    full = _write_adapter(tmp_path / "a", ALL)
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")
    lorajax.save_peft(tmp_path / "b", loaded, name_map="tunix")
    _close(lorajax.merge(lorajax.load_peft(tmp_path / "b", base, name_map="tunix")), _expected(base, full))
    # kv_einsum with its fused axis as fan-out (what infer_layouts reads off 'BSD,CKDH->CBSKH'): one shared a.
    layout = {r".*kv_einsum/w": "ooio", r".*q_einsum/w": "oio", r".*attn_vec_einsum/w": "iio"}
    shared = lorajax.lorafy(base, rank=3, where=lorajax.all_linear, layout=layout, key=jax.random.key(1))
    shared = jax.tree.map(  # b != 0: a real update in every slice
        lambda x: dataclasses.replace(x, b=x.b + 0.1) if lorajax.is_lora(x) else x, shared, is_leaf=lorajax.is_lora
    )
    want = jax.tree.map(lambda x: np.asarray(x, np.float64), lorajax.merge(shared))
    lorajax.save_peft(tmp_path / "c", shared, name_map="tunix")
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight" in _keys(tmp_path / "c")
    _close(lorajax.merge(lorajax.load_peft(tmp_path / "c", base, name_map="tunix")), want)
    # ... and back onto the fan-out nodes themselves: a rank-2r block (a side by side, b block-diagonal).
    back = lorajax.load_peft(tmp_path / "c", shared, name_map="tunix")
    kv = back["layers"][0]["attn"]["kv_einsum"]["w"]
    assert kv.layout == lorajax.Layout("ooio") and kv.rank == 6 and kv.alpha == 6
    _close(lorajax.merge(back), want)


def _keys(path):
    from safetensors.numpy import load_file

    return set(load_file(str(path / "adapter_model.safetensors")))


def test_dora_on_fused_kernels(tmp_path):
    base = _tree()
    _write_adapter(tmp_path / "a", ALL, dora=True)
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")
    kv = loaded["layers"][0]["attn"]["kv_einsum"]["w"]
    assert kv.spec.variant == "dora" and kv.magnitude.shape == (2, K, H)
    lorajax.save_peft(tmp_path / "b", loaded, name_map="tunix")
    again = lorajax.load_peft(tmp_path / "b", base, name_map="tunix")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), lorajax.merge(loaded), lorajax.merge(again))


def test_gemma_convention_splits_gating_einsum(tmp_path):
    rng = np.random.default_rng(0)
    base = {"transformer": {"layer_0": {"mlp": {"gating_einsum": rng.normal(size=(2, D, F)).astype(np.float32)}}}}
    full = _write_adapter(tmp_path / "a", ("gate_proj", "up_proj"), layers=(0,))
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="gemma")
    got = np.asarray(lorajax.merge(loaded)["transformer"]["layer_0"]["mlp"]["gating_einsum"], np.float64)
    want = base["transformer"]["layer_0"]["mlp"]["gating_einsum"].astype(np.float64)
    want = want + np.stack([full[(0, "gate_proj")].T, full[(0, "up_proj")].T])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tuple_names_in_a_dict_and_their_errors(tmp_path):
    base = _tree()
    _write_adapter(tmp_path / "a", ("k_proj", "v_proj"), layers=(0,))
    names = {"layers/0/attn/kv_einsum": (ATTN.format(0) + "k_proj", ATTN.format(0) + "v_proj")}
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map=names)
    assert loaded["layers"][0]["attn"]["kv_einsum"]["w"].layout == lorajax.Layout("soio")
    with pytest.raises(TypeError, match="a tuple of names for a fused kernel"):
        lorajax.load_peft(tmp_path / "a", base, name_map={"layers/0/attn/kv_einsum": ("only_one",)})
    three = {"layers/0/attn/kv_einsum": (ATTN.format(0) + "k_proj", ATTN.format(0) + "v_proj", "x")}
    with pytest.raises(ValueError, match=r"3 modules .* kernel has shape \(2, 1, 12, 4\)"):
        lorajax.save_peft(tmp_path / "b", loaded, name_map=three)


def test_layout_from_the_file_and_an_ambiguous_file(tmp_path):
    # q_einsum (N, D, H) = (2, 12, 4): names and sizes alone do not settle it (12 != 2*4); the file's A (r, 12) does.
    with pytest.raises(ValueError, match="cannot tell the layout"):
        lorajax.lorafy({"attn": {"q_einsum": {"w": jnp.ones((N, D, H))}}}, rank=2, where=lorajax.all_linear)
    base = _tree()
    _write_adapter(tmp_path / "a", ("q_proj",), layers=(0,))
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")
    assert loaded["layers"][0]["attn"]["q_einsum"]["w"].layout == lorajax.Layout("oio")
    # A (r, 8), B (4, r) on a (4, 4, 2) 'proj' kernel: 'ioi' and 'oii' both give (in 8, out 4); no name, no
    # (*fan_in, *fan_out) split picks one.
    tree = {"blk": {"proj": {"w": np.ones((4, 4, 2), np.float32)}}, "other": {"w": np.ones((2, 2), np.float32)}}
    d = tmp_path / "amb"
    d.mkdir()
    save_file(
        {"base_model.model.blk.proj.lora_A.weight": np.ones((2, 8), np.float32),
         "base_model.model.blk.proj.lora_B.weight": np.ones((4, 2), np.float32)},
        str(d / "adapter_model.safetensors"),
    )  # fmt: skip
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(
        ValueError, match=r"blk/proj/w with shape \(4, 4, 2\) in more than one way: readings 'ioi' and 'oii'"
    ):
        lorajax.load_peft(d, tree)
    assert lorajax.load_peft(d, tree, layout={"blk/proj/w": "oii"})["blk"]["proj"]["w"].layout == lorajax.Layout("oii")


def test_no_match_error_teaches_name_map(tmp_path):
    base = _tree()
    _write_adapter(tmp_path / "a", ALL)
    with pytest.raises(ValueError, match=r"name_map=None .* matches no kernel") as info:
        lorajax.load_peft(tmp_path / "a", base)
    message = str(info.value)
    assert "layers/0/attn/q_einsum/w -> 'layers.0.attn.q_einsum'" in message
    assert "model.layers.0.mlp.down_proj" in message
    assert "name_map='tunix' matches 14 of the 14 modules" in message and "'gemma' matches" not in message
    with pytest.raises(ValueError, match="no built-in naming convention; use one of"):
        lorajax.load_peft(tmp_path / "a", base, name_map="tunixx")


def test_conventions_name_every_family():
    from lorajax.peft._conventions import convention_namer

    tunix, gemma, maxtext = (convention_namer(c, "t") for c in ("tunix", "gemma", "maxtext"))
    assert tunix("layers/3/attn/o_proj/w") == "model.layers.3.self_attn.o_proj"  # Llama 3, Qwen 2/3
    assert tunix("layers/1/attn/qkv_einsum/w") == tuple(ATTN.format(1) + m for m in ("q_proj", "k_proj", "v_proj"))
    assert tunix("layers/2/mlp/up_proj") == "model.layers.2.mlp.experts.{}.up_proj"  # Qwen3-MoE expert bank
    assert tunix("layers/2/mlp/router/kernel") == "model.layers.2.mlp.gate"
    assert gemma("params/transformer/layer_4/mlp/linear") == "model.layers.4.mlp.down_proj"
    assert maxtext("params/decoder/layers/self_attention/query/kernel") == "model.layers.{}.self_attn.q_proj"
    assert maxtext("decoder/layers_0/mlp/wi_1/kernel") == "model.layers.0.mlp.up_proj"


def test_name_map_from_a_library_key_mapping():
    mapping = {
        r"(?:language_model\.)?model\.layers\.([0-9]+)\.mlp\.experts\.([0-9]+)\.(gate|up|down)_proj\.weight": (
            r"layers.\1.mlp.experts.\2.\3_proj.kernel",
            None,
        ),
        r"model\.norm\.weight": ("final_norm.w", None),
    }
    namer = name_map_from_key_mapping(mapping)
    assert namer("layers/5/mlp/experts/7/down_proj/kernel") == "model.layers.5.mlp.experts.7.down_proj"
    assert namer("layers/5/attn/q_proj/w") is None


def test_qkv_einsum_takes_three_modules(tmp_path):
    """Gemma with as many key/value heads as query heads: one (3, N, D, H) kernel for q, k and v."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, N, D, H)).astype(np.float32)
    base = {"layers": [{"attn": {"qkv_einsum": {"w": jnp.asarray(w)}}}]}
    d = tmp_path / "a"
    d.mkdir()
    tensors, want = {}, w.astype(np.float64).copy()
    for j, m in enumerate(("q_proj", "k_proj", "v_proj")):
        A, B = rng.normal(size=(R, D)).astype(np.float32), rng.normal(size=(N * H, R)).astype(np.float32)
        tensors[f"base_model.model.{ATTN.format(0)}{m}.lora_A.weight"] = A
        tensors[f"base_model.model.{ATTN.format(0)}{m}.lora_B.weight"] = B
        want[j] += (B.astype(np.float64) @ A).T.reshape(D, N, H).transpose(1, 0, 2)  # scale alpha/r = 1
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": R}))
    loaded = lorajax.load_peft(d, base, name_map="tunix")
    assert loaded["layers"][0]["attn"]["qkv_einsum"]["w"].layout == lorajax.Layout("soio")
    got = lorajax.merge(loaded)["layers"][0]["attn"]["qkv_einsum"]["w"]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)

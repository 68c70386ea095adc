"""Models as the libraries write them (gemma, tunix, penzai, keras-hub): layouts read from the computation,
presets that find every kernel, factored equal to merge, and name-only lorafy right or loud, never silently wrong.

The stand-ins in tests/_library_models.py copy each library's names, kernel shapes and einsum strings; the real
libraries run under the `libraries` marker at the end, where they are installed.
"""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _library_models import CASES, TOKENS

import lorajax


def _random_init(key, base, layout, rank, dtype):
    # Nonzero b, so the adapters change the output and factored-vs-merge compares something.
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, layout.a_shape(base.shape, rank), dtype) * 0.3
    b = jax.random.normal(kb, layout.b_shape(base.shape, rank), dtype) * 0.3
    return a, b


def _nodes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorajax.is_lora)[0]
    return {lorajax.path_str(p): x for p, x in leaves if lorajax.is_lora(x)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    c = CASES[request.param]()
    c.layouts = lorajax.infer_layouts(c.apply, c.params, *c.inputs)
    return c


def test_infer_layouts_reads_every_kernel_from_the_computation(case):
    got = {path: layout.axes for path, layout in case.layouts.items()}
    assert got == case.linear | case.not_linear
    assert not case.layouts.unresolved


def test_attn_qv_finds_exactly_the_query_and_value_projections(case):
    lora = lorajax.lorafy(case.params, rank=2, where=lorajax.attn_qv, layout=case.layouts)
    assert set(_nodes(lora)) == case.qv


def test_all_linear_takes_every_linear_kernel_with_the_contracted_axes_as_fan_in(case):
    lora = lorajax.lorafy(case.params, rank=2, where=lorajax.all_linear, layout=case.layouts)
    nodes = _nodes(lora)
    assert {p: n.layout.axes for p, n in nodes.items()} == case.linear  # embeddings and the head left out
    for path, node in nodes.items():
        # The a factor spans the stacked and fan-in axes: its size is what the model contracts, not the heads.
        shape = node.shape
        lay = node.layout
        assert node.a.shape == tuple(shape[k] for k in lay.stack + lay.fan_in) + (2,), path


def test_factored_strict_equals_merge(case):
    lora = lorajax.lorafy(case.params, rank=2, where=lorajax.all_linear, layout=case.layouts, init=_random_init)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorajax.FallbackWarning)
        got = lorajax.factored(case.apply, strict=True)(lora, *case.inputs)
    want = case.apply(lorajax.merge(lora), *case.inputs)
    base = case.apply(case.params, *case.inputs)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert float(jnp.max(jnp.abs(want - base))) > 1e-2  # the adapters do change the output


# Gradients on three structurally different cases (fused kv + GQA, indexed expert banks, a scanned layer stack):
# each compiles two backward passes, so the full set would cost minutes of CI for little more coverage.
@pytest.mark.parametrize("name", ["gemma_gqa", "tunix_qwen3_moe", "penzai_llamalike_stack"])
def test_gradients_of_the_factors_agree_with_the_merge_path(name):
    case = CASES[name]()
    layouts = lorajax.infer_layouts(case.apply, case.params, *case.inputs)
    lora = lorajax.lorafy(case.params, rank=2, where=lorajax.all_linear, layout=layouts, init=_random_init)
    train, frozen = lorajax.partition(lora)

    def loss(fn):
        return lambda t: jnp.mean(fn(lorajax.combine(t, frozen), *case.inputs) ** 2)

    g_fact = jax.grad(loss(lorajax.factored(case.apply, strict=True)))(train)
    g_merge = jax.grad(loss(lambda p, *a: case.apply(lorajax.merge(p), *a)))(train)
    for x, y in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_merge)):
        # float32 sums in a different order: agreement to 1e-5 of the gradient's own scale.
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(y)))))


@pytest.mark.parametrize("preset", ["attn_qv", "all_linear"])
def test_name_only_lorafy_is_right_or_raises(case, preset):
    """Without the traced layouts, names either settle each kernel's layout correctly or lorafy raises."""
    where = getattr(lorajax, preset)
    try:
        lora = lorajax.lorafy(case.params, rank=2, where=where)
    except ValueError as e:
        assert str(e).startswith("lorafy: ")
        assert "layout" in str(e) and ("infer_layouts" in str(e) or "matched no parameter" in str(e))
        return
    for path, node in _nodes(lora).items():
        assert node.layout == case.layouts[path], path


def test_one_error_lists_every_unresolved_kernel():
    c = CASES["gemma_gqa"]()
    with pytest.raises(ValueError) as e:
        lorajax.lorafy(c.params, rank=2, where=lorajax.all_linear)
    msg = str(e.value)
    # Both layers' fused kv kernels and bare MLP banks, in one error, each with its shape.
    for i in (0, 1):
        assert f"params/layer_{i}/attn/kv_einsum/w with shape (2, 2, 64, 16)" in msg
        assert f"params/layer_{i}/mlp/gating_einsum with shape (2, 64, 96)" in msg
    assert "4 problems" in msg and "lorajax.infer_layouts" in msg


def test_heads_are_the_weights_whose_product_is_the_output():
    c = CASES["tunix_qwen3"]()
    layouts = lorajax.infer_layouts(c.apply, c.params, TOKENS)
    assert layouts.heads == {"lm_head/w"}
    p = CASES["penzai_llamalike"]()
    layouts = lorajax.infer_layouts(p.apply, p.params, TOKENS)
    head = "body/sublayers/3/weights/data_array"  # penzai's output Linear has no name
    assert layouts.heads == {head}
    assert head not in _nodes(lorajax.lorafy(p.params, rank=2, where=lorajax.all_linear, layout=layouts))
    # A preset that names it by regex still takes it: exclusion is all_linear's, not a ban.
    assert head in _nodes(lorajax.lorafy(p.params, rank=2, where=".*sublayers/3/weights/data_array", layout=layouts))


# --- the real libraries, where they are installed ----------------------------------------------------------------


@pytest.mark.libraries
@pytest.mark.skipif(importlib.util.find_spec("penzai") is None, reason="penzai is not installed (pip install penzai)")
@pytest.mark.parametrize("layer_stack", [False, True])
def test_real_penzai_llamalike(layer_stack):
    from penzai import pz
    from penzai.models.transformer.variants import llamalike_common

    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=2,
        query_head_multiplier=2,
        embedding_dim=64,
        projection_dim=16,
        mlp_hidden_dim=96,
        num_decoder_blocks=2,
        vocab_size=101,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        use_layer_stack=layer_stack,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="pz.freeze_params"):
        lorajax.lorafy(model, rank=2, where=lorajax.all_linear)
    frozen = pz.freeze_params(model)
    tokens = pz.nx.wrap(TOKENS).tag("batch", "seq")

    def apply(m, toks):
        return m(toks, token_positions=pz.nx.arange("seq", toks.named_shape["seq"])).unwrap(
            "batch", "seq", "vocabulary"
        )

    layouts = lorajax.infer_layouts(apply, frozen, tokens)
    assert not layouts.unresolved
    qv = _nodes(lorajax.lorafy(frozen, rank=2, where=lorajax.attn_qv, layout=layouts))
    per_block = 1 if layer_stack else 2
    assert len(qv) == 2 * per_block and all("input_to_query" in p or "input_to_value" in p for p in qv)
    lora = lorajax.lorafy(frozen, rank=2, where=lorajax.all_linear, layout=layouts, init=_random_init)
    nodes = _nodes(lora)
    assert len(nodes) == 7 * per_block  # q, k, v, out, gating, value, out_linear; no embedding, no head
    assert not any(p in layouts.heads for p in nodes)
    if layer_stack:
        assert all(n.layout.axes.startswith("s") for n in nodes.values())
    got = lorajax.factored(apply, strict=True)(lora, tokens)
    np.testing.assert_allclose(got, apply(lorajax.merge(lora), tokens), rtol=2e-4, atol=2e-4)


@pytest.mark.libraries
@pytest.mark.examples
@pytest.mark.skipif(importlib.util.find_spec("penzai") is None, reason="penzai is not installed (pip install penzai)")
def test_model_library_example_runs():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "model_library_finetune.py"), "--steps", "25"],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "loss before" in proc.stdout and "output head left out" in proc.stdout

"""Layouts: names settle a kernel's layout only where nothing else fits; otherwise lorafy raises (listing every
such kernel at once), and infer_layouts reads the layouts from the model's computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax


def _nodes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorajax.is_lora)[0]
    return {lorajax.path_str(p): x for p, x in leaves if lorajax.is_lora(x)}


def _count(node):
    return node.a.size + node.b.size


# --- names and shapes: one reading or an error -------------------------------------------------------------------


def test_flax_query_kernels_keep_their_layout_by_name():
    # Flax SelfAttention / NNX MultiHeadAttention: (d_model, heads, head_dim), d_model == heads * head_dim.
    params = {"attn": {"query": {"kernel": jnp.ones((64, 4, 16))}, "out": {"kernel": jnp.ones((4, 16, 64))}}}
    nodes = _nodes(lorajax.lorafy(params, rank=4, where=lorajax.attn_all))
    assert nodes["attn/query/kernel"].layout.axes == "ioo"
    assert nodes["attn/out/kernel"].layout.axes == "iio"


def test_a_heads_first_query_kernel_is_read_by_its_sizes():
    # keras-hub Gemma / gemma's q_einsum: (heads, d_model, head_dim); only d_model = heads * head_dim fits.
    params = {"attention": {"query": {"kernel": jnp.ones((4, 64, 16))}}}
    node = _nodes(lorajax.lorafy(params, rank=4, where=lorajax.attn_qv))["attention/query/kernel"]
    assert node.layout.axes == "oio" and node.a.shape == (64, 4) and node.b.shape == (4, 4, 16)


def test_a_query_kernel_no_size_rule_settles_raises_instead_of_guessing():
    # The case: an (8, 64, 16) query kernel. Read as Flax's 'ioo' it would train 8*4 + 4*64*16 = 4,128
    # parameters with the heads axis as fan-in; the model contracts the 64-wide axis (768 parameters).
    params = {"attention": {"query": {"kernel": jnp.ones((8, 64, 16))}}}
    with pytest.raises(ValueError) as e:
        lorajax.lorafy(params, rank=4, where=lorajax.attn_qv)
    msg = str(e.value)
    assert msg.startswith("lorafy: ")
    assert "attention/query/kernel with shape (8, 64, 16)" in msg
    assert "'ioo' or 'oio' or 'ooi'" in msg and "lorajax.infer_layouts" in msg and "layout=" in msg

    def apply(p, x):
        return jnp.einsum("btd,ndh->btnh", x, p["attention"]["query"]["kernel"])

    layouts = lorajax.infer_layouts(apply, params, jnp.ones((1, 3, 64)))
    assert layouts == {"attention/query/kernel": lorajax.Layout("oio")}
    node = _nodes(lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, layout=layouts))["attention/query/kernel"]
    assert _count(node) == 64 * 4 + 4 * 8 * 16 == 768


def test_an_attention_output_kernel_is_read_by_its_sizes_or_raises():
    ok = {"attn": {"o_proj": {"w": jnp.ones((4, 16, 64))}}}
    assert _nodes(lorajax.lorafy(ok, rank=2, where=lorajax.attn_all))["attn/o_proj/w"].layout.axes == "iio"
    bad = {"attn": {"o_proj": {"w": jnp.ones((4, 16, 32))}}}
    with pytest.raises(ValueError, match=r"attn/o_proj/w with shape \(4, 16, 32\).*'oii' or 'ioi' or 'iio'"):
        lorajax.lorafy(bad, rank=2, where=lorajax.attn_all)


def test_every_unresolved_kernel_is_listed_in_one_error():
    params = {
        f"layer_{i}": {
            "attn": {"query": {"kernel": jnp.ones((8, 64, 16))}, "value": {"kernel": jnp.ones((8, 64, 16))}},
            "mlp": {"wi": {"kernel": jnp.ones((64, 3, 32))}},  # t5x's scan: (d_model, layers, mlp)
        }
        for i in range(2)
    }
    with pytest.raises(ValueError) as e:
        lorajax.lorafy(params, rank=2, where=lorajax.all_linear)
    msg = str(e.value)
    assert "(6 problems)" in msg
    for i in range(2):
        for name, shape in (("attn/query/kernel", "(8, 64, 16)"), ("attn/value/kernel", "(8, 64, 16)")):
            assert f"layer_{i}/{name} with shape {shape}" in msg
        assert f"layer_{i}/mlp/wi/kernel with shape (64, 3, 32)" in msg


def test_bare_weights_named_like_projections_are_kernels():
    # gemma's mlp/linear (F, D) is a bare array: all_linear takes it ('io') instead of skipping it silently.
    params = {"mlp": {"linear": jnp.ones((32, 16)), "scale": jnp.ones((16,))}, "norm": {"scale": jnp.ones(16)}}
    nodes = _nodes(lorajax.lorafy(params, rank=2, where=lorajax.all_linear))
    assert {p: n.layout.axes for p, n in nodes.items()} == {"mlp/linear": "io"}


# --- flat dicts keyed by paths ------------------------------------------------------------------------------------


def test_flat_dicts_with_slash_or_dotted_keys_match_like_nested_ones():
    keras = {
        "block_0/attention/query/kernel": jnp.ones((16, 2, 8)),
        "block_0/attention/key/kernel": jnp.ones((16, 2, 8)),
        "block_0/attention/value/kernel": jnp.ones((16, 2, 8)),
    }
    assert set(_nodes(lorajax.lorafy(keras, rank=2, where=lorajax.attn_qv))) == {
        "block_0/attention/query/kernel",
        "block_0/attention/value/kernel",
    }
    hf = {
        "model.layers.0.self_attn.q_proj.weight": jnp.ones((16, 8)),
        "model.layers.0.self_attn.v_proj.weight": jnp.ones((16, 8)),
        "model.layers.0.mlp.up_proj.weight": jnp.ones((32, 8)),
        "model.embed_tokens.weight": jnp.ones((50, 8)),
    }
    lora = lorajax.lorafy(hf, rank=2, where=["q_proj", "v_proj"])
    nodes = _nodes(lora)
    assert set(nodes) == {"model/layers/0/self_attn/q_proj/weight", "model/layers/0/self_attn/v_proj/weight"}
    assert all(n.layout.axes == "oi" for n in nodes.values())  # PyTorch (out, in)
    assert lorajax.lorafy(hf, rank=2, where=lorajax.all_linear).keys() == hf.keys()
    assert set(_nodes(lorajax.lorafy(hf, rank=2, where=lorajax.all_linear))) == {
        "model/layers/0/self_attn/q_proj/weight",
        "model/layers/0/self_attn/v_proj/weight",
        "model/layers/0/mlp/up_proj/weight",
    }


def test_layout_keys_that_are_exact_paths_are_not_read_as_regexes():
    params = {"h[0]": {"kernel": jnp.ones((4, 8, 6))}}  # '[0]' as a regex would match 'h0', never 'h[0]'
    lora = lorajax.lorafy(params, rank=2, where=r".*kernel", layout={"h[0]/kernel": "sio"})
    assert _nodes(lora)["h[0]/kernel"].layout.axes == "sio"


# --- infer_layouts on Flax models ----------------------------------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.SelfAttention(num_heads=2, deterministic=True)(nn.LayerNorm()(x))
        return x + nn.Dense(16)(nn.gelu(nn.Dense(32, name="fc")(x))), None


class _Stacked(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(50, 16)(tokens)
        x = nn.Conv(16, (3,), name="conv")(x)
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = scan(name="layers")(x, None)
        return nn.Dense(50, name="lm_head")(x)


def test_infer_layouts_reads_flax_scan_stacks_convs_embeddings_and_the_head():
    model = _Stacked()
    tokens = jnp.zeros((2, 5), jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    layouts = lorajax.infer_layouts(model.apply, params, tokens)
    got = {p: lay.axes for p, lay in layouts.items()}
    assert got["params/Embed_0/embedding"] == "eo"
    assert got["params/conv/kernel"] == "wio"
    assert got["params/lm_head/kernel"] == "io"
    assert got["params/layers/SelfAttention_0/query/kernel"] == "sioo"  # scanned-over axis: stacked
    assert got["params/layers/SelfAttention_0/out/kernel"] == "siio"
    assert got["params/layers/fc/kernel"] == "sio"
    assert layouts.heads == {"params/lm_head/kernel"}
    lora = lorajax.lorafy(params, rank=2, where=lorajax.all_linear, layout=layouts)
    nodes = _nodes(lora)
    assert "params/lm_head/kernel" not in nodes and "params/Embed_0/embedding" not in nodes
    assert "params/conv/kernel" not in nodes  # PEFT's all-linear leaves convolutions too
    assert len(nodes) == 6  # q, k, v, out, fc, Dense_0 of the stacked block
    x = lorajax.factored(model.apply, strict=True)(lora, tokens)
    np.testing.assert_allclose(x, model.apply(lorajax.merge(lora), tokens), rtol=1e-5, atol=1e-5)


def test_infer_layouts_agrees_with_the_names_where_they_settle_it():
    model = _Block()
    x = jnp.ones((2, 5, 16))
    params = model.init(jax.random.key(0), x, None)
    layouts = lorajax.infer_layouts(lambda p, x: model.apply(p, x, None)[0], params, x)
    by_name = _nodes(lorajax.lorafy(params, rank=2, where=lorajax.all_linear))
    assert {p: n.layout for p, n in by_name.items()} == dict(layouts)


def test_infer_layouts_needs_plain_params():
    params = {"q": {"kernel": jnp.ones((4, 4))}}
    lora = lorajax.lorafy(params, rank=1, where=lorajax.attn_qv)
    with pytest.raises(ValueError, match="infer_layouts: params already hold LoRA"):
        lorajax.infer_layouts(lambda p, x: x @ p["q"]["kernel"], lora, jnp.ones(4))


def test_a_weight_used_two_ways_is_reported_not_guessed():
    params = {"w": {"kernel": jnp.ones((8, 8))}}
    layouts = lorajax.infer_layouts(lambda p, x: (x @ p["w"]["kernel"]) @ p["w"]["kernel"].T, params, jnp.ones(8))
    assert layouts == {}
    assert "contracted in one use and kept in another" in layouts.unresolved["w/kernel"]


def test_factored_refuses_a_layout_the_model_does_not_contract_that_way():
    params = {"attention": {"query": {"kernel": jax.random.normal(jax.random.key(0), (4, 64, 16))}}}

    def apply(p, x):  # gemma / keras-hub Gemma: (heads, d_model, head_dim), d_model contracted
        return jnp.einsum("btd,ndh->btnh", x, p["attention"]["query"]["kernel"])

    x = jnp.ones((1, 3, 64))
    wrong = lorajax.lorafy(params, rank=2, where=lorajax.attn_qv, layout={"attention/query/kernel": "ioo"})
    with pytest.raises(
        ValueError,
        match=r"factored: the LoRA kernel 'attention/query/kernel' \(layout 'ioo'.*"
        r"contracted with the activations over axis 1 \(fan-out\).*infer_layouts",
    ):
        lorajax.factored(apply)(wrong, x)
    right = lorajax.lorafy(params, rank=2, where=lorajax.attn_qv, layout=lorajax.infer_layouts(apply, params, x))
    np.testing.assert_allclose(
        lorajax.factored(apply, strict=True)(right, x), apply(lorajax.merge(right), x), atol=1e-5
    )

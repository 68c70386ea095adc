"""lorafy: layouts, init, options, abstract trees and every bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import tiny_gpt

import lorajax


def test_attn_qv_on_linen_transformer():
    _, params, _ = tiny_gpt()
    lora = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, key=jax.random.key(0))
    nodes = {lorajax.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(lora, is_leaf=lorajax.is_lora)[0]}
    targets = {k: v for k, v in nodes.items() if lorajax.is_lora(v)}
    assert sorted(targets) == [f"Block_{i}/SelfAttention_0/{m}/kernel" for i in (0, 1) for m in ("query", "value")]
    node = targets["Block_0/SelfAttention_0/query/kernel"]
    assert node.layout == lorajax.Layout("ioo") and node.a.shape == (32, 4) and node.b.shape == (4, 4, 8)
    assert node.base is params["Block_0"]["SelfAttention_0"]["query"]["kernel"]  # the very same array
    assert node.alpha == 4.0 and node.scale == 1.0 and node.a.dtype == jnp.float32


def test_kaiming_init_matches_peft_bound_and_b_is_zero():
    params = {"fc": {"kernel": jnp.zeros((400, 300))}}
    node = lorajax.lorafy(params, rank=16, where=["fc"], key=jax.random.key(0))["fc"]["kernel"]
    bound = 1 / math.sqrt(400)
    assert float(jnp.abs(node.a).max()) <= bound and float(jnp.abs(node.a).max()) > 0.95 * bound
    np.testing.assert_allclose(float(node.a.std()), bound / math.sqrt(3), rtol=0.05)  # uniform's std
    chex.assert_trees_all_equal(node.b, jnp.zeros((16, 300)))


def test_gaussian_and_callable_init():
    params = {"fc": {"kernel": jnp.ones((400, 300))}}
    node = lorajax.lorafy(params, rank=8, where=["fc"], key=jax.random.key(0), init="gaussian")["fc"]["kernel"]
    np.testing.assert_allclose(float(node.a.std()), 1 / 8, rtol=0.05)

    def init(key, base, layout, rank, dtype):
        assert base.shape == (400, 300) and layout.axes == "io"
        return jnp.full((400, 8), 2.0, dtype), jnp.zeros((8, 300), dtype)  # ignores rank: wrong for rank 4

    node = lorajax.lorafy(params, rank=8, where=["fc"], key=jax.random.key(0), init=init)["fc"]["kernel"]
    assert float(node.a[0, 0]) == 2.0
    with pytest.raises(ValueError, match="init returned a"):
        lorajax.lorafy(params, rank=4, where=["fc"], key=jax.random.key(0), init=init)
    with pytest.raises(ValueError, match="init must be"):
        lorajax.lorafy(params, rank=4, where=["fc"], key=jax.random.key(0), init="orthogonal")


def test_embedding_init_follows_peft():
    node = lorajax.lorafy({"embed": {"embedding": jnp.ones((50, 8))}}, rank=4, where=["embed"], key=jax.random.key(0))
    node = node["embed"]["embedding"]
    assert node.layout.axes == "eo"
    chex.assert_trees_all_equal(node.a, jnp.zeros((50, 4)))
    assert float(jnp.abs(node.b).mean()) > 0.5  # standard normal


def test_per_target_keys_do_not_depend_on_other_targets():
    _, params, _ = tiny_gpt()
    key = jax.random.key(7)
    qv = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, key=key)
    everything = lorajax.lorafy(params, rank=4, where=lorajax.all_linear, key=key)
    path = ("Block_1", "SelfAttention_0", "value", "kernel")
    get = lambda t: t[path[0]][path[1]][path[2]][path[3]].a
    chex.assert_trees_all_equal(get(qv), get(everything))
    other = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, key=jax.random.key(8))
    assert not np.allclose(get(qv), get(other))


def test_rank_and_alpha_patterns_and_factor_dtype():
    _, params, _ = tiny_gpt()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lora = lorajax.lorafy(
        params,
        rank=4,
        alpha=16,
        where=lorajax.all_linear,
        key=jax.random.key(0),
        rank_pattern={"fc1": 8},
        alpha_pattern={r"Block_1/.*/query": 2.0},
    )
    b0, b1 = lora["Block_0"], lora["Block_1"]
    assert b0["fc1"]["kernel"].rank == 8 and b0["fc1"]["kernel"].alpha == 16.0
    assert b0["fc2"]["kernel"].rank == 4
    assert b1["SelfAttention_0"]["query"]["kernel"].alpha == 2.0
    assert b0["fc1"]["kernel"].a.dtype == jnp.float32 and b0["fc1"]["kernel"].base.dtype == jnp.bfloat16
    lora16 = lorajax.lorafy(params, rank=4, where=["fc1"], key=jax.random.key(0), dtype=jnp.bfloat16)
    assert lora16["Block_0"]["fc1"]["kernel"].a.dtype == jnp.bfloat16


def test_stacked_layers_need_declaring_and_get_own_factors():
    params = {"layers": {"Dense_0": {"kernel": jnp.ones((3, 16, 8))}}}
    with pytest.raises(ValueError, match=r"cannot tell the layout of layers/Dense_0/kernel with shape \(3, 16, 8\)"):
        lorajax.lorafy(params, rank=2, where=r".*kernel", key=jax.random.key(0))
    lora = lorajax.lorafy(params, rank=2, where=r".*kernel", key=jax.random.key(0), layout={"layers/.*": "s..."})
    node = lora["layers"]["Dense_0"]["kernel"]
    assert node.layout.axes == "sio" and node.a.shape == (3, 16, 2) and node.b.shape == (3, 2, 8)
    assert not np.allclose(node.a[0], node.a[1])  # each layer has its own A


def test_layout_callable_and_layout_objects():
    params = {"blk": {"kernel": jnp.ones((4, 5, 6))}}
    lora = lorajax.lorafy(params, rank=2, where=r".*", key=jax.random.key(0), layout=lambda p, x: lorajax.Layout("iio"))
    assert lora["blk"]["kernel"].a.shape == (4, 5, 2)
    with pytest.raises(ValueError, match="has 2 axes but blk/kernel has shape"):
        lorajax.lorafy(params, rank=2, where=r".*", key=jax.random.key(0), layout={"blk": "io"})
    with pytest.raises(ValueError, match="unknown axis codes"):
        lorajax.lorafy(params, rank=2, where=r".*", key=jax.random.key(0), layout={"blk": "ixo"})


def test_runs_under_jit_and_eval_shape():
    _, params, _ = tiny_gpt()
    f = lambda p, k: lorajax.lorafy(p, rank=4, where=lorajax.attn_qv, key=k)
    eager = f(params, jax.random.key(0))
    jitted = jax.jit(f)(params, jax.random.key(0))
    chex.assert_trees_all_close(eager, jitted, rtol=0, atol=0)
    abstract = jax.eval_shape(f, params, jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, eager)


def roberta_base_abstract():
    d, ffn, vocab, layers = 768, 3072, 50265, 12
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    dense = lambda i, o: {"kernel": s(i, o), "bias": s(o)}
    norm = {"scale": s(d), "bias": s(d)}
    layer = {
        "attention": {
            "self": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d)},
            "output": {"dense": dense(d, d), "LayerNorm": norm},
        },
        "intermediate": {"dense": dense(d, ffn)},
        "output": {"dense": dense(ffn, d), "LayerNorm": norm},
    }
    return {
        "embeddings": {
            "word_embeddings": {"embedding": s(vocab, d)},
            "position_embeddings": {"embedding": s(514, d)},
            "token_type_embeddings": {"embedding": s(1, d)},
            "LayerNorm": norm,
        },
        "encoder": {"layer": {str(i): layer for i in range(layers)}},
    }


def test_eval_shape_on_roberta_base_gives_peft_trainable_count():
    abstract = roberta_base_abstract()
    lora = jax.eval_shape(lambda p: lorajax.lorafy(p, rank=8, where=lorajax.attn_qv, key=jax.random.key(0)), abstract)
    s = lorajax.summary(lora)
    assert s.trainable == 12 * 2 * 8 * (768 + 768) == 294_912  # PEFT reports 294,912 for r=8 on query/value
    pooler = 768 * 768 + 768
    assert s.total == 124_645_632 - pooler + 294_912  # HF's roberta-base count, less its pooler, plus the factors
    # Directly on ShapeDtypeStructs too, no eval_shape needed.
    assert lorajax.summary(lorajax.lorafy(abstract, rank=8, where=lorajax.attn_qv, key=jax.random.key(0))) == s


def test_input_is_never_mutated():
    _, params, _ = tiny_gpt()
    before = jax.tree.map(np.array, params)
    structure = jax.tree.structure(params)
    lorajax.lorafy(params, rank=4, where=lorajax.all_linear, key=jax.random.key(0))
    assert jax.tree.structure(params) == structure
    chex.assert_trees_all_equal(params, before)


# ---- bad input: every error names the path, the shape and the fix ----


def test_rank_below_one():
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        lorajax.lorafy({"q": {"kernel": jnp.ones((4, 4))}}, rank=0, where=["q"], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank_pattern\['q'\] must be an integer >= 1, got -1"):
        lorajax.lorafy(
            {"q": {"kernel": jnp.ones((4, 4))}}, rank=2, where=["q"], key=jax.random.key(0), rank_pattern={"q": -1}
        )


def test_rank_above_min_fan():
    with pytest.raises(
        ValueError, match=r"rank 8 for q/kernel with shape \(16, 4\).*exceeds min\(fan_in, fan_out\) = 4"
    ):
        lorajax.lorafy({"q": {"kernel": jnp.ones((16, 4))}}, rank=8, where=["q"], key=jax.random.key(0))


def test_where_matching_nothing_lists_paths():
    _, params, _ = tiny_gpt()
    with pytest.raises(ValueError, match=r"matched no parameter. Kernel paths available: Block_0/SelfAttention_0/"):
        lorajax.lorafy(params, rank=4, where=["nothing_like_this"], key=jax.random.key(0))


def test_already_lorafied():
    lora = lorajax.lorafy({"q": {"kernel": jnp.ones((4, 4))}}, rank=2, where=["q"], key=jax.random.key(0))
    with pytest.raises(ValueError, match="q/kernel is already a LoRA node; merge or unlorafy it first"):
        lorajax.lorafy(lora, rank=2, where=["q"], key=jax.random.key(0))


def test_non_float_kernel():
    with pytest.raises(TypeError, match=r"q/kernel with shape \(4, 4\) has dtype int32; LoRA needs a float"):
        lorajax.lorafy({"q": {"kernel": jnp.ones((4, 4), jnp.int32)}}, rank=2, where=["q"], key=jax.random.key(0))


def test_ambiguous_layout_names_path_shape_and_fix():
    with pytest.raises(
        ValueError, match=r"cannot tell the layout of mix/kernel with shape \(4, 5, 6\).*layout=\{'mix/kernel'"
    ):
        lorajax.lorafy({"mix": {"kernel": jnp.ones((4, 5, 6))}}, rank=2, where=r".*", key=jax.random.key(0))

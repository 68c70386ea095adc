"""Target selection: presets over the common naming conventions, regexes, module lists, callables."""

import jax
import jax.numpy as jnp
import pytest

import lorajax
from lorajax._targets import compile_where, match_pattern, path_str

K2 = jnp.zeros((8, 8))


def selected(tree, where):
    pred = compile_where(where)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted(path_str(p) for p, x in leaves if pred(p, x))


def layer(**modules):
    return {name: {"kernel": K2, "bias": jnp.zeros(8)} for name in modules}


LINEN = {"SelfAttention_0": layer(query=1, key=1, value=1, out=1), "Dense_0": {"kernel": K2}}
HF_LLAMA = {
    "layers": {
        "0": {
            "self_attn": layer(q_proj=1, k_proj=1, v_proj=1, o_proj=1),
            "mlp": layer(gate_proj=1, up_proj=1, down_proj=1),
        }
    },
    "embed_tokens": {"embedding": jnp.zeros((32, 8))},
    "lm_head": {"kernel": K2},
}
BERT = {
    "layer": {
        "0": {
            "attention": {"self": layer(query=1, key=1, value=1), "output": layer(dense=1)},
            "intermediate": layer(dense=1),
            "output": layer(dense=1),
        }
    },
    "word_embeddings": {"embedding": jnp.zeros((32, 8))},
}
T5 = {"SelfAttention": layer(q=1, k=1, v=1, o=1), "DenseReluDense": layer(wi=1, wo=1)}
EQX = {"attn": {"query_proj": {"weight": K2}, "key_proj": {"weight": K2}, "value_proj": {"weight": K2}}}
GPT2 = {"h": {"0": {"attn": layer(c_attn=1, c_proj=1), "mlp": layer(c_fc=1, c_proj=1)}}, "wte": {"embedding": K2}}


@pytest.mark.parametrize(
    "tree,preset,expected",
    [
        (LINEN, lorajax.attn_qv, ["SelfAttention_0/query/kernel", "SelfAttention_0/value/kernel"]),
        (LINEN, lorajax.attn_all, [f"SelfAttention_0/{m}/kernel" for m in ("key", "out", "query", "value")]),
        (
            LINEN,
            lorajax.all_linear,
            ["Dense_0/kernel"] + [f"SelfAttention_0/{m}/kernel" for m in ("key", "out", "query", "value")],
        ),
        (HF_LLAMA, lorajax.attn_qkv, [f"layers/0/self_attn/{m}/kernel" for m in ("k_proj", "q_proj", "v_proj")]),
        (HF_LLAMA, lorajax.mlp, [f"layers/0/mlp/{m}/kernel" for m in ("down_proj", "gate_proj", "up_proj")]),
        (
            HF_LLAMA,
            lorajax.all_linear,
            sorted(
                [f"layers/0/self_attn/{m}/kernel" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
                + [f"layers/0/mlp/{m}/kernel" for m in ("gate_proj", "up_proj", "down_proj")]
            ),
        ),
        (BERT, lorajax.attn_qv, ["layer/0/attention/self/query/kernel", "layer/0/attention/self/value/kernel"]),
        (
            BERT,
            lorajax.attn_all,
            [f"layer/0/attention/self/{m}/kernel" for m in ("key", "query", "value")]
            + ["layer/0/attention/output/dense/kernel"],
        ),
        (BERT, lorajax.mlp, ["layer/0/intermediate/dense/kernel", "layer/0/output/dense/kernel"]),
        (T5, lorajax.attn_qv, ["SelfAttention/q/kernel", "SelfAttention/v/kernel"]),
        (T5, lorajax.attn_all, [f"SelfAttention/{m}/kernel" for m in ("k", "o", "q", "v")]),
        (T5, lorajax.mlp, ["DenseReluDense/wi/kernel", "DenseReluDense/wo/kernel"]),
        (EQX, lorajax.attn_qv, ["attn/query_proj/weight", "attn/value_proj/weight"]),
        (GPT2, lorajax.attn_qv, ["h/0/attn/c_attn/kernel"]),
        (GPT2, lorajax.attn_all, ["h/0/attn/c_attn/kernel", "h/0/attn/c_proj/kernel"]),
        (GPT2, lorajax.mlp, ["h/0/mlp/c_fc/kernel", "h/0/mlp/c_proj/kernel"]),
        (LINEN, lorajax.attn_qv | lorajax.mlp, ["SelfAttention_0/query/kernel", "SelfAttention_0/value/kernel"]),
    ],
)
def test_presets(tree, preset, expected):
    assert selected(tree, preset) == sorted(expected)


def test_presets_skip_biases_embeddings_and_1d_leaves():
    tree = {"query": {"kernel": jnp.zeros((8,)), "bias": jnp.zeros((8, 8))}, "embed": {"embedding": K2}}
    assert selected(tree, lorajax.attn_qv) == []
    assert selected(tree, lorajax.all_linear) == []


def test_regex_is_a_full_match_on_the_slash_joined_path():
    assert selected(LINEN, r"SelfAttention_0/(query|key)/kernel") == [
        "SelfAttention_0/key/kernel",
        "SelfAttention_0/query/kernel",
    ]
    assert selected(LINEN, r"query/kernel") == []  # not a search: the whole path must match


def test_module_names_follow_peft_suffix_rule():
    assert selected(BERT, ["self.query", "intermediate.dense"]) == [
        "layer/0/attention/self/query/kernel",
        "layer/0/intermediate/dense/kernel",
    ]
    assert selected(HF_LLAMA, ["q_proj"]) == ["layers/0/self_attn/q_proj/kernel"]


def test_callable_gets_jax_key_paths():
    seen = []
    selected(LINEN, lambda path, leaf: seen.append(path) or False)
    assert all(isinstance(p, tuple) and isinstance(p[0], jax.tree_util.DictKey) for p in seen)


def test_bad_where_raises():
    with pytest.raises(TypeError, match="where must be a preset"):
        compile_where(42)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compile_where("(")


def test_match_pattern_rules():
    path = jax.tree_util.tree_flatten_with_path(BERT)[0]
    names = {path_str(p): p for p, _ in path}
    p = names["layer/0/attention/self/query/kernel"]
    assert match_pattern({"self.query": 4}, p) == 4  # PEFT suffix rule, dots allowed
    assert match_pattern({r".*attention/self/q\w+": 5}, p) == 5  # regex on the module path
    assert match_pattern({"key": 6}, p) is None

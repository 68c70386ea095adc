"""Target selection: presets over the common naming conventions, regexes, module lists, callables; PEFT's name rules."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import lorajax

K2 = jnp.zeros((8, 8))


def _zeros(key, base, layout, rank, dtype):
    # A lorafy init without random draws: these tests look at which kernels are chosen, not at the factors.
    return np.zeros(layout.a_shape(base.shape, rank), dtype), np.zeros(layout.b_shape(base.shape, rank), dtype)


def lora_nodes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorajax.is_lora)[0]
    return {lorajax.path_str(p): x for p, x in leaves if lorajax.is_lora(x)}


def selected(tree, where):
    """The paths lorafy(where=...) adapts ([] where it matches nothing)."""
    try:
        lora = lorajax.lorafy(tree, rank=1, where=where, init=_zeros)
    except ValueError as e:
        if "matched no parameter" not in str(e):
            raise
        return []
    return sorted(lora_nodes(lora))


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
        lorajax.lorafy(LINEN, rank=1, where=42)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lorajax.lorafy(LINEN, rank=1, where="(")


def test_match_pattern_rules():
    query = "layer/0/attention/self/query/kernel"

    def rank_of(rank_pattern):  # the default rank is 1: 1 means no key matched
        lora = lorajax.lorafy(BERT, rank=1, where=["self.query"], rank_pattern=rank_pattern, init=_zeros)
        return lora_nodes(lora)[query].rank

    assert rank_of({"self.query": 4}) == 4  # PEFT suffix rule, dots allowed
    assert rank_of({r".*attention/self/q\w+": 5}) == 5  # regex on the module path
    assert rank_of({"key": 6}) == 1


# ---------------------------------------------------------------------------------------------------------------------
# PEFT's name rules, pinned through the public API: rank_pattern/alpha_pattern (a key names a module when the regex
# "(.*\.)?(key)$" matches its dotted name: the name itself, or its end after a '.'; the first such key wins) and
# target_modules (a list entry names a module it equals or ends, after a '.', literally).

#: (pattern keys, dotted module name, the key PEFT picks or None), from PEFT's documented matching.
PATTERN_CASES = [
    (["q_proj"], "q_proj", "q_proj"),  # the exact name
    (["q_proj"], "model.layers.0.self_attn.q_proj", "q_proj"),  # the end of the name after a '.'
    (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", "self_attn.q_proj"),  # a dotted end
    (["proj"], "model.layers.0.self_attn.q_proj", None),  # an end, but not after a '.'
    (["attn.q_proj"], "model.layers.0.self_attn.q_proj", None),  # ditto, dotted
    (["self_attn"], "model.layers.0.self_attn.q_proj", None),  # a key must reach the end of the name
    (["q_proj"], "model.q_proj_x", None),
    ([r"layers\.0\..*q_proj"], "model.layers.0.self_attn.q_proj", r"layers\.0\..*q_proj"),  # keys are regexes
    ([r"layers\.0\..*q_proj"], "model.layers.10.self_attn.q_proj", None),  # ...starting after a '.'
    ([r"layers\.\d+\.self_attn\.q_proj"], "model.layers.12.self_attn.q_proj", r"layers\.\d+\.self_attn\.q_proj"),
    (["layers.1.q"], "layers_1_q", "layers.1.q"),  # an unescaped '.' matches any character, as in PEFT
    (["^fc"], "fc", "^fc"),  # '^' anchors a key at the start of the name
    (["^fc"], "block.fc", None),
    (["fc"], "block.fc", "fc"),
    (["q_proj", "self_attn.q_proj"], "model.self_attn.q_proj", "q_proj"),  # the first matching key wins...
    (["self_attn.q_proj", "q_proj"], "model.self_attn.q_proj", "self_attn.q_proj"),  # ...not the longest
    (["k_proj", "q_proj"], "model.q_proj", "q_proj"),
    ([".*"], "model.anything", ".*"),
]

#: (target_modules, dotted module name, adapted?), from PEFT's documented matching.
TARGET_CASES = [
    (["q_proj"], "q_proj", True),
    (["q_proj"], "model.layers.0.self_attn.q_proj", True),
    (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", True),
    (["proj"], "model.q_proj", False),  # an end, but not after a '.'
    (["attn.q_proj"], "model.self_attn.q_proj", False),
    (["self_attn"], "model.self_attn.q_proj", False),  # the module itself, not one inside it
    (["q.proj"], "q_proj", False),  # list entries are names, not regexes
    (["k_proj", "fc"], "block.fc", True),
]


def module_tree(modules, shape=(8, 8)):
    """Flax-style params with one kernel per dotted module name (default module name: the name itself)."""
    tree: dict = {}
    for module in modules:
        node = tree
        for part in module.split("."):
            node = node.setdefault(part, {})
        node["kernel"] = jnp.zeros(shape)
    return tree


def write_adapter(folder, modules, config):
    """A rank-1 PEFT adapter for 2x2 Linear ``modules``, written the way PEFT lays it out."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m}.lora_A.weight"] = np.ones((1, 2), np.float32)
        tensors[f"base_model.model.{m}.lora_B.weight"] = np.ones((2, 1), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1, **config}))
    return folder


def keys_chosen_by_load_peft(tmp_path, keys, modules):
    """The alpha_pattern key load_peft applies to each module (None: the default), read off each node's alpha."""
    folder = write_adapter(tmp_path, modules, {"alpha_pattern": {k: float(i + 2) for i, k in enumerate(keys)}})
    loaded = lora_nodes(lorajax.load_peft(folder, module_tree(modules, (2, 2))))
    alphas = {m: loaded[m.replace(".", "/") + "/kernel"].alpha for m in modules}
    return {m: None if a == 1.0 else keys[int(a) - 2] for m, a in alphas.items()}


def keys_chosen_by_lorafy(keys, modules):
    """The rank_pattern key lorafy applies to each module (None: the default), read off each node's rank."""
    lora = lora_nodes(
        lorajax.lorafy(
            module_tree(modules),
            rank=1,
            where=lambda p, x: True,
            init=_zeros,
            rank_pattern={k: i + 2 for i, k in enumerate(keys)},
        )
    )
    ranks = {m: lora[m.replace(".", "/") + "/kernel"].rank for m in modules}
    return {m: None if r == 1 else keys[r - 2] for m, r in ranks.items()}


def adapted_by_lorafy(names, modules):
    """Which modules lorafy(where=target_modules) adapts."""
    chosen = set(selected(module_tree(modules), list(names)))
    return {m: m.replace(".", "/") + "/kernel" in chosen for m in modules}


@pytest.mark.parametrize(("keys", "module", "expected"), PATTERN_CASES)
def test_pattern_rule_is_peft_documented_rule(tmp_path, keys, module, expected):
    assert keys_chosen_by_load_peft(tmp_path, keys, [module]) == {module: expected}
    assert keys_chosen_by_lorafy(keys, [module]) == {module: expected}


@pytest.mark.parametrize(("names", "module", "expected"), TARGET_CASES)
def test_target_modules_rule_is_peft_documented_rule(names, module, expected):
    assert adapted_by_lorafy(names, [module]) == {module: expected}


def test_save_peft_pattern_keys_survive_peft_rule(tmp_path):
    # save_peft's rank_pattern keys resolve, under the same rule, to each module's own rank and no other's.
    modules = ["fc", "block.fc", "block_fc", "layers.0.fc", "layers.10.fc"]
    ranks = {"fc": 2, "block.fc": 3, "block_fc": 1, "layers.0.fc": 4, "layers.10.fc": 1}
    lora = lorajax.lorafy(
        module_tree(modules),
        rank=1,
        where=lambda p, x: True,
        init=_zeros,
        rank_pattern={"^" + re.escape(m.replace(".", "/")) + "/kernel$": r for m, r in ranks.items() if r != 1},
    )
    config = lorajax.save_peft(tmp_path / "a", lora)
    back = lora_nodes(lorajax.load_peft(tmp_path / "a", module_tree(modules)))
    assert {m: back[m.replace(".", "/") + "/kernel"].rank for m in modules} == ranks
    assert config["r"] == 1 and len(config["rank_pattern"]) == 3


# With PyTorch + PEFT: the same rules against PEFT's own functions, on many generated names.

_PARTS = ["model", "layers", "0", "1", "10", "self_attn", "q_proj", "proj", "q", "fc", "block", "block_fc"]


@pytest.mark.torch
def test_pattern_and_target_rules_agree_with_peft(tmp_path_factory):
    pytest.importorskip("torch")
    other = pytest.importorskip("peft.utils.other")
    tuners = pytest.importorskip("peft.tuners.tuners_utils")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from peft import LoraConfig

    name = st.lists(st.sampled_from(_PARTS), min_size=1, max_size=4).map(".".join)

    def as_key(draw):
        parts = draw(st.lists(st.sampled_from(_PARTS), min_size=1, max_size=3))
        style = draw(st.sampled_from(["plain", "escaped", "digits", "wild", "anchored", "any"]))
        if style == "escaped":
            return r"\.".join(parts)
        if style == "digits":
            return ".".join(r"\d+" if p.isdigit() else p for p in parts)
        if style == "wild":
            return ".*" + ".".join(parts)
        if style == "anchored":
            return "^" + ".".join(parts)
        if style == "any":
            return ".".join(parts).replace("_", ".")
        return ".".join(parts)

    key = st.composite(as_key)()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        modules=st.lists(name, min_size=1, max_size=4, unique=True),
        keys=st.lists(key, min_size=1, max_size=3, unique=True),
    )
    def check(modules, keys):
        def peft_key(module):
            hit = other.get_pattern_key(keys, module)  # PEFT returns the module name itself where no key matches
            return None if hit == module and module not in keys else hit

        expected = {m: peft_key(m) for m in modules}
        assert keys_chosen_by_load_peft(tmp_path_factory.mktemp("adapter"), keys, modules) == expected
        config = LoraConfig(target_modules=list(keys))
        assert adapted_by_lorafy(keys, modules) == {
            m: bool(tuners.check_target_module_exists(config, m)) for m in modules
        }

    check()

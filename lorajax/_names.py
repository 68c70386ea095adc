"""The module-name conventions of model libraries, in one place.

Presets (``lorajax._targets``) pick kernels by these names, and layout
inference (``lorajax._layout``) reads the kernel kind from them. Each constant is
a regex alternation over one '/'-separated module name (or a short suffix path).

Covered: Flax linen/NNX, Equinox, Hugging Face-style checkpoints (``q_proj``,
``self_attn/o_proj``, dotted names split on '.'), T5/MaxText (``query``/``key``/
``value``/``out``, ``wi_0``/``wi_1``/``wo``), gemma (``q_einsum``, ``kv_einsum``,
``qkv_einsum``, ``attn_vec_einsum``, ``gating_einsum``, ``mlp/linear``), tunix
(``q_proj``/``o_proj`` einsums, MoE ``gate_proj``/``up_proj``/``down_proj`` expert
banks and ``router``), penzai (``input_to_query``/``_key``/``_value``,
``attn_value_to_output``, ``gating_linear``/``value_linear``/``out_linear``) and
keras-hub (``query``/``key``/``value``, ``attention_output``,
``feedforward_gate_dense``/``_intermediate_dense``/``_output_dense``, Gemma's
``ffw_gating``/``ffw_gating_2``/``ffw_linear``), and mixtures of experts: MaxText's ``MoeBlock_0/wi_0``/``wi_1``/``wo``
banks and ``MoeBlock_0/gate`` router, tunix's bare ``mlp/gate_proj`` banks and ``mlp/router``, Hugging Face's
``mlp/experts/...`` and ``mlp/gate`` (``block_sparse_moe/gate`` in Mixtral), and banks of vmapped modules
(``experts/wi/kernel``).
"""

from __future__ import annotations

import re

#: Leaf names that hold a weight matrix (Flax ``kernel``/``embedding``, Equinox/PyTorch ``weight``).
KERNEL_NAMES = frozenset({"kernel", "weight", "embedding", "w"})

#: Leaf names of an array that a parameter wrapper holds (penzai's ``weights/data_array``): the module is
#: the path before the wrapper.
WRAPPED_LEAVES = {"data_array": frozenset({"weights", "weight", "w", "kernel", "embeddings", "embedding"})}

EMBED_MODULES = re.compile(
    r"(?i)(embed|embedding|embeddings|embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe|"
    r"tok_embeddings|shared|token_embedding|pos_embedding|embedder|input_embedding|token_embedder|embedding_table|"
    r"embedding_lookup)"
)
CONV_MODULES = re.compile(r"(?i)(?:\w*_)?conv\w*")
HEAD_MODULES = re.compile(r"(?i)(lm_head|head|output_head|classifier|logits|unembed|embed_out|score|decoder_head)")

QUERY = r"query|q_proj|q|query_proj|to_q|q_lin|wq|q_einsum|input_to_query|query_dense"
KEY = r"key|k_proj|k|key_proj|to_k|k_lin|wk|k_einsum|input_to_key|key_dense"
VALUE = r"value|v_proj|v|value_proj|to_v|v_lin|wv|v_einsum|input_to_value|value_dense"
#: Fused projections that hold the query or value among others: adapted whole, as PEFT does with ``c_attn``.
FUSED_QKV = r"c_attn|qkv|query_key_value|Wqkv|qkv_proj|in_proj|qkv_einsum|kv_einsum|wqkv"
ATTN_OUT = (
    r"out|o_proj|o|out_proj|output_proj|to_out|out_lin|attn_vec_einsum|attn_value_to_output|attention_output|"
    r"output_dense|attention/output/dense|attn/c_proj|self_attn/dense|attention/dense"
)
#: Modules that hold a mixture of experts' banks: every kernel inside is one slice per expert (``s`` axes first).
#: DeepSeek's ``shared_experts`` is a dense MLP, not a bank: the names must equal one of these, not contain it.
EXPERTS = r"experts?|MoeBlock(?:_\d+)?|RoutedMoE(?:_\d+)?|moe|moe_block|sparse_moe_block|block_sparse_moe"
MLP = (
    r"gate_proj|up_proj|down_proj|fc1|fc2|fc_in|fc_out|c_fc|mlp/c_proj|intermediate/dense|(?<!attention/)output/dense|"
    r"wi|wo|wi_0|wi_1|w1|w2|w3|dense_h_to_4h|dense_4h_to_h|gating_einsum|mlp/linear|gating_linear|value_linear|"
    r"out_linear|feedforward_gate_dense|feedforward_intermediate_dense|feedforward_output_dense|ffw_gating|ffw_gating_2|"
    r"ffw_linear|gate_up_proj|"
    r"[^/]*(?:mlp|Mlp|MLP|MlpBlock|ffn|FFN|feed_forward|FeedForward)[^/]*/[^/]+|"
    r"(?:" + EXPERTS + r")/.+"
)


#: Routers (gating networks) of mixtures of experts: a linear kernel that ``all_linear`` adapts (as PEFT's
#: ``all-linear`` does with Qwen3-MoE's ``mlp.gate``) and the ``mlp`` preset leaves plain.
ROUTER = (
    r"router|routers|router_weights(?:/w)?|gate_logit|"
    r"(?:[^/]*(?:mlp|Mlp|MLP|ffn|feed_forward|moe|Moe|MoE)[^/]*|experts|MoeBlock(?:_\d+)?|RoutedMoE(?:_\d+)?)/gate"
)

#: Projections of a tunix MoE layer (``mlp`` is the layer): bare expert banks ``(experts, ...)``.
_TUNIX_BANKS = re.compile(r"(?:.*/)?mlp/(?:gate_proj|up_proj|down_proj)")
#: transformers 5's fused expert parameters (bare, in ``experts``): (E, out, in) in Qwen3-MoE, Mixtral, DeepSeek,
#: (E, in, out) in Llama 4 and gpt-oss, so their names do not say which axis is the fan-in.
_TORCH_BANKS = re.compile(r"(?:.*/)?experts/(?:gate_up_proj|gate_proj|up_proj|down_proj)")


def suffix_regex(*alternations: str) -> re.Pattern[str]:
    """A regex that fully matches a module path ending in one of ``alternations``."""
    return re.compile(r"(?:.*/)?(?:" + "|".join(f"(?:{a})" for a in alternations) + ")")


def module_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The names of the module that owns a weight leaf: the path minus the leaf name.

    A wrapped array (penzai's ``input_to_query/weights/data_array``) drops its wrapper too,
    and so do the positions in a penzai ``Sequential`` that hold it (``sublayers/0``).

    >>> module_parts(("attn", "input_to_query", "sublayers", "0", "weights", "data_array"))
    ('attn', 'input_to_query')
    >>> module_parts(("attn", "query", "kernel"))
    ('attn', 'query')
    """
    wrappers = WRAPPED_LEAVES.get(parts[-1]) if parts else None
    if not (wrappers and len(parts) > 1 and parts[-2] in wrappers):
        return parts[:-1]
    module = parts[:-2]
    while len(module) > 2 and module[-2] == "sublayers" and module[-1].isdigit():
        module = module[:-2]
    return module


_EXPERT_MODULE = re.compile(r"(?:" + EXPERTS + r")")
_ROUTER = suffix_regex(ROUTER)


def is_router(module: str) -> bool:
    """Whether a module path names the router of a mixture of experts (``mlp/router``, MaxText's ``MoeBlock_0/gate``).

    >>> is_router("layers/0/mlp/router"), is_router("decoder/MoeBlock_0/gate"), is_router("mlp/gate_proj")
    (True, True, False)
    """
    return _ROUTER.fullmatch(module) is not None


def expert_bank(parts: tuple[str, ...]) -> str | None:
    """How names mark a weight leaf as a bank of experts: ``"bank"``, ``"torch"`` (a bank whose axis order names
    cannot tell) or ``None`` (no bank: a dense kernel, a router, a shared expert).

    A bank is a leaf inside a module :data:`EXPERTS` names (MaxText's ``MoeBlock_0/wi_0``, ``experts/wi/kernel``),
    or a bare tunix ``mlp/gate_proj``. Its leading axes are the experts (stacked), its last two the matrix.

    >>> expert_bank(("layers", "0", "mlp", "gate_proj")), expert_bank(("layers", "0", "mlp", "gate_proj", "kernel"))
    ('bank', None)
    >>> expert_bank(("decoder", "MoeBlock_0", "wi_0")), expert_bank(("mlp", "experts", "gate_up_proj"))
    ('bank', 'torch')
    >>> expert_bank(("MoeBlock_0", "gate", "kernel")), expert_bank(("shared_experts", "wi_0", "kernel"))
    (None, None)
    """
    if not parts:
        return None
    module = module_parts(parts)
    bare = parts[-1] not in KERNEL_NAMES and parts[-1] not in WRAPPED_LEAVES
    full = "/".join(parts)
    if is_router("/".join(module)) or (bare and is_router(full)):
        return None
    if bare and _TORCH_BANKS.fullmatch(full):
        return "torch"
    if bare and _TUNIX_BANKS.fullmatch(full):
        return "bank"
    return "bank" if any(_EXPERT_MODULE.fullmatch(p) for p in module) else None

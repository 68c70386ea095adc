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
``ffw_gating``/``ffw_gating_2``/``ffw_linear``).
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
MLP = (
    r"gate_proj|up_proj|down_proj|fc1|fc2|fc_in|fc_out|c_fc|mlp/c_proj|intermediate/dense|(?<!attention/)output/dense|"
    r"wi|wo|wi_0|wi_1|w1|w2|w3|dense_h_to_4h|dense_4h_to_h|gating_einsum|mlp/linear|gating_linear|value_linear|"
    r"out_linear|feedforward_gate_dense|feedforward_intermediate_dense|feedforward_output_dense|ffw_gating|ffw_gating_2|"
    r"ffw_linear|"
    r"[^/]*(?:mlp|Mlp|MLP|MlpBlock|ffn|FFN|feed_forward|FeedForward)[^/]*/[^/]+"
)


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

"""The module-name conventions of model libraries, in one place.

Presets (``lorajax._targets``) pick kernels by these names, and layout
inference (``lorajax._layout``) reads the kernel kind from them. Each constant is
a regex alternation over one '/'-separated module name (or a short suffix path).
"""

from __future__ import annotations

import re

#: Leaf names that hold a weight matrix (Flax ``kernel``/``embedding``, Equinox/PyTorch ``weight``).
KERNEL_NAMES = frozenset({"kernel", "weight", "embedding", "w"})

EMBED_MODULES = re.compile(
    r"(?i)(embed|embedding|embeddings|embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe|"
    r"tok_embeddings|shared|token_embedding|pos_embedding)"
)
CONV_MODULES = re.compile(r"(?i)(?:\w*_)?conv\w*")
HEAD_MODULES = re.compile(r"(?i)(lm_head|head|output_head|classifier|logits|unembed|embed_out|score|decoder_head)")

QUERY = r"query|q_proj|q|query_proj|to_q|q_lin|wq"
KEY = r"key|k_proj|k|key_proj|to_k|k_lin|wk"
VALUE = r"value|v_proj|v|value_proj|to_v|v_lin|wv"
FUSED_QKV = r"c_attn|qkv|query_key_value|Wqkv|qkv_proj|in_proj"
ATTN_OUT = (
    r"out|o_proj|o|out_proj|output_proj|to_out|out_lin|"
    r"attention/output/dense|attn/c_proj|self_attn/dense|attention/dense"
)
MLP = (
    r"gate_proj|up_proj|down_proj|fc1|fc2|fc_in|fc_out|c_fc|mlp/c_proj|intermediate/dense|(?<!attention/)output/dense|"
    r"wi|wo|wi_0|wi_1|w1|w2|w3|dense_h_to_4h|dense_4h_to_h|"
    r"[^/]*(?:mlp|Mlp|MLP|MlpBlock|ffn|FFN|feed_forward|FeedForward)[^/]*/[^/]+"
)


def suffix_regex(*alternations: str) -> re.Pattern[str]:
    """A regex that fully matches a module path ending in one of ``alternations``."""
    return re.compile(r"(?:.*/)?(?:" + "|".join(f"(?:{a})" for a in alternations) + ")")

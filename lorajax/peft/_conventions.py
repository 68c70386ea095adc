"""Built-in naming conventions: the parameter paths of JAX model libraries <-> Hugging Face module names.

``name_map="tunix"`` (or ``"gemma"``, ``"maxtext"``) in :func:`lorajax.load_peft` and
:func:`lorajax.save_peft` names every kernel of such a model after the module that holds the same weight in the
Hugging Face checkpoint (``layers/0/attn/q_proj/w`` <-> ``model.layers.0.self_attn.q_proj``). A fused kernel
names a tuple of modules, one per slice of its leading axis (gemma's ``kv_einsum`` ``(2, K, D, H)`` is
``(k_proj, v_proj)``); a bank of experts names a template with ``{}`` for the expert index.

Each convention is a short table of regexes over '/'-joined parameter paths. A library that publishes its own
Hugging Face key mapping (tunix's ``params.py`` ``_get_key_and_transform_mapping``: ``{hf_key_regex: (path,
transform)}``) can be read directly with :func:`name_map_from_key_mapping`, so a model the tables do not know
needs no code here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

#: What a name map gives one kernel: a module name, a tuple of them (a fused kernel), or None.
ModuleName: TypeAlias = "str | tuple[str, ...] | None"

_ATTN = "model.layers.{L}.self_attn."
_MLP = "model.layers.{L}.mlp."
_QKV = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}

# (path regex, module name or names); "{L}" stands for the regex's group "L" (a layer index), "{P}" for the
# group "P" translated through the rule's table, "{}" stays (a stacked axis: one module per index).
_Rule = tuple[str, "str | tuple[str, ...]", "Mapping[str, str] | None"]

_TUNIX: tuple[_Rule, ...] = (
    # Llama 3, Qwen 2/3: DenseGeneral-style einsums named after HF's modules.
    (r"layers/(?P<L>\d+)/attn/(?P<P>[qkvo])_proj/w", _ATTN + "{P}", _QKV),
    # Gemma 1/2/3: q, the fused kv or qkv, and the output einsum.
    (r"layers/(?P<L>\d+)/attn/q_einsum/w", _ATTN + "q_proj", None),
    (r"layers/(?P<L>\d+)/attn/kv_einsum/w", (_ATTN + "k_proj", _ATTN + "v_proj"), None),
    (r"layers/(?P<L>\d+)/attn/qkv_einsum/w", (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj"), None),
    (r"layers/(?P<L>\d+)/attn/attn_vec_einsum/w", _ATTN + "o_proj", None),
    # Dense MLPs (every family) and Qwen3-MoE's router and expert banks (E, ...): one module per expert.
    (r"layers/(?P<L>\d+)/mlp/(?P<P>gate|up|down)_proj/kernel", _MLP + "{P}_proj", None),
    (r"layers/(?P<L>\d+)/mlp/(?P<P>gate|up|down)_proj", _MLP + "experts.{}.{P}_proj", None),
    (r"layers/(?P<L>\d+)/mlp/router/kernel", _MLP + "gate", None),
    (r"embedder/input_embedding", "model.embed_tokens", None),
    (r"lm_head/w", "lm_head", None),
)

_GEMMA: tuple[_Rule, ...] = (
    # google-deepmind/gemma (Flax linen): transformer/layer_N/...; gating_einsum (2, ...) is gate and up.
    (r"layer_(?P<L>\d+)/attn/q_einsum/w", _ATTN + "q_proj", None),
    (r"layer_(?P<L>\d+)/attn/kv_einsum/w", (_ATTN + "k_proj", _ATTN + "v_proj"), None),
    (r"layer_(?P<L>\d+)/attn/qkv_einsum/w", (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj"), None),
    (r"layer_(?P<L>\d+)/attn/attn_vec_einsum/w", _ATTN + "o_proj", None),
    (r"layer_(?P<L>\d+)/mlp/gating_einsum(?:/w)?", (_MLP + "gate_proj", _MLP + "up_proj"), None),
    (r"layer_(?P<L>\d+)/mlp/linear(?:/w)?", _MLP + "down_proj", None),
    (r"embedder/input_embedding", "model.embed_tokens", None),
)

_SCANNED = "model.layers.{}."
_MAXTEXT_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
_MAXTEXT_MLP = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
_MAXTEXT: tuple[_Rule, ...] = (
    # MaxText: decoder/layers_N/... unscanned, decoder/layers/... scanned (one module per layer: '{}').
    (r"decoder/layers_(?P<L>\d+)/self_attention/(?P<P>query|key|value|out)/kernel", _ATTN + "{P}", _MAXTEXT_PROJ),
    (r"decoder/layers_(?P<L>\d+)/mlp/(?P<P>wi_0|wi_1|wo)/kernel", _MLP + "{P}", _MAXTEXT_MLP),
    (r"decoder/layers/self_attention/(?P<P>query|key|value|out)/kernel", _SCANNED + "self_attn.{P}", _MAXTEXT_PROJ),
    (r"decoder/layers/mlp/(?P<P>wi_0|wi_1|wo)/kernel", _SCANNED + "mlp.{P}", _MAXTEXT_MLP),
    (r"token_embedder/embedding", "model.embed_tokens", None),
    (r"decoder/logits_dense/kernel", "lm_head", None),
)

#: Built-in conventions by name: ``name_map="tunix"`` and so on.
CONVENTIONS: dict[str, tuple[_Rule, ...]] = {"tunix": _TUNIX, "gemma": _GEMMA, "maxtext": _MAXTEXT}


def _fill(template: str, match: re.Match[str], table: Mapping[str, str] | None) -> str:
    groups = match.groupdict()
    out = template
    if "L" in groups:
        out = out.replace("{L}", groups["L"])
    if "P" in groups:
        out = out.replace("{P}", table[groups["P"]] if table is not None else groups["P"])
    return out


def convention_namer(name: str, caller: str) -> Callable[[str], ModuleName]:
    """The ``path -> module name(s) | None`` function of the built-in convention ``name``.

    >>> convention_namer("tunix", "load_peft")("layers/3/attn/kv_einsum/w")
    ('model.layers.3.self_attn.k_proj', 'model.layers.3.self_attn.v_proj')
    """
    if name not in CONVENTIONS:
        raise ValueError(
            f"{caller}: name_map={name!r} is no built-in naming convention; use one of {sorted(CONVENTIONS)}, "
            "a dict {parameter path: module name} or a callable path -> module name."
        )
    rules = [(re.compile(r"(?:.*/)?" + rx), target, table) for rx, target, table in CONVENTIONS[name]]

    def namer(path: str) -> ModuleName:
        path = path.replace(".", "/").removeprefix("params/")
        for rx, target, table in rules:
            m = rx.fullmatch(path)
            if m is not None:
                if isinstance(target, tuple):
                    return tuple(_fill(t, m, table) for t in target)
                return _fill(target, m, table)
        return None

    return namer


def _unescape(regex: str) -> str:
    return re.sub(r"\\(.)", r"\1", regex)


def name_map_from_key_mapping(mapping: Mapping[str, Any]) -> Callable[[str], str | None]:
    r"""A ``name_map`` read from a model library's own Hugging Face key mapping.

    ``mapping`` is ``{hf_key_regex: (path_template, ...)}`` as the key-mapping function of a tunix model's
    ``params`` module returns it for a config: a regex over Hugging Face weight names and the '.'-joined
    parameter path it loads into, with ``\1``, ``\2`` for its groups. The name map inverts it: a kernel path
    that a template produces maps to the weight's module (the key less its ``.weight``). Paths the mapping
    renames on the way (tunix's Gemma fuses ``tmp...q``/``k``/``v`` into one einsum) are not in it: use
    ``name_map="tunix"`` there.

    Args:
        mapping: the library's ``{hf_key_regex: (path_template, transform)}`` (or ``{regex: path_template}``).

    Returns:
        A callable ``path -> module name | None`` for ``name_map=``.

    Example:
        >>> mapping = {r"model\.layers\.([0-9]+)\.self_attn\.q_proj\.weight": (r"layers.\1.attn.q_proj.w", None)}
        >>> name_map_from_key_mapping(mapping)("layers/2/attn/q_proj/w")
        'model.layers.2.self_attn.q_proj'
    """
    rules = []
    for hf_regex, target in mapping.items():
        template = target[0] if isinstance(target, tuple) else target
        if not isinstance(template, str) or not hf_regex.endswith(r"\.weight"):
            continue
        # The path template's \N back-references become groups; the HF regex's groups are refilled in order.
        parts = re.split(r"\\(\d)", template)
        rx, seen = "", set()
        for k, p in enumerate(parts):
            rx += re.escape(p) if k % 2 == 0 else (f"(?P=g{p})" if p in seen else f"(?P<g{p}>[^./]+)")
            seen |= {p} if k % 2 else set()
        hf_groups = re.findall(r"\((?!\?)[^()]*\)", hf_regex)
        rules.append((re.compile(rx), hf_regex[: -len(r"\.weight")], hf_groups))

    def namer(path: str) -> str | None:
        dotted = path.replace("/", ".").removeprefix("params.")
        for rx, hf_regex, hf_groups in rules:
            m = rx.fullmatch(dotted)
            if m is None:
                continue
            groups = m.groupdict()
            if any(f"g{k}" not in groups for k in range(1, len(hf_groups) + 1)):
                continue  # a group the path does not hold (an alternation of names): no one module
            name = re.sub(r"\(\?:[^()]*\)\?", "", hf_regex)  # optional prefixes (?:language_model\.)? drop out
            for k, group in enumerate(hf_groups, start=1):
                name = name.replace(group, groups[f"g{k}"], 1)
            return _unescape(name)
        return None

    return namer

"""Expert banks in traced layouts: every bank of one mixture-of-experts block gets one LoRA per expert.

:func:`lorajax.infer_layouts` reads each kernel's layout from its own products; an expert axis the product keeps
free reads as fan-out. This module settles such axes against the block's other banks (:func:`banks_alike`).
"""

from __future__ import annotations

from lorajax._layout import Layout

_LEAF_NAMES = frozenset({"kernel", "w", "weight", "value", "embedding"})


def _block(name: str) -> str:
    """The module holding weight ``name``: its path without the weight's own name (and a generic leaf name)."""
    parts = name.split("/")
    if len(parts) > 1 and parts[-1] in _LEAF_NAMES:
        parts = parts[:-1]
    return "/".join(parts[:-1])


def banks_alike(out: dict, shapes: dict) -> None:
    """Every expert bank of one block per expert: a leading fan-out axis the size of a sibling's stacked axes.

    tunix's dense MoE form applies gate and up to every token with the experts' axis free (``td,edf->tef``, read
    ``oio``: one LoRA shared by all experts), and down with it a batch axis (``tef,efd->ted``, ``sio``). The free
    axis is the same experts' axis: where a kernel of the same block is stacked over leading axes of the same
    sizes, those leading fan-out axes are stacked too, so each expert gets its own LoRA in every bank.
    ``out`` (``{path: Layout}``) is changed in place.

    >>> out = {"moe/gate": Layout("oio"), "moe/down": Layout("sio"), "attn/q": Layout("oio")}
    >>> banks_alike(out, {"moe/gate": (4, 8, 6), "moe/down": (4, 6, 8), "attn/q": (4, 8, 6)})
    >>> out
    {'moe/gate': Layout('sio'), 'moe/down': Layout('sio'), 'attn/q': Layout('oio')}
    """
    stacks: dict[str, set[tuple[int, ...]]] = {}
    for name, layout in out.items():
        n = len(layout.axes) - len(layout.axes.lstrip("s"))
        if n and len(layout.axes) >= 3:
            stacks.setdefault(_block(name), set()).add(tuple(shapes[name][:n]))
    for name, layout in list(out.items()):
        axes = layout.axes
        for lead in stacks.get(_block(name), ()):
            n = len(lead)
            rest = axes[n:]
            if axes[:n] == "o" * n and tuple(shapes[name][:n]) == lead and "i" in rest and "o" in rest:
                out[name] = Layout("s" * n + rest)
                break

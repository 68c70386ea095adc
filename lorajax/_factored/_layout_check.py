"""The factored path's layout check: a kernel must be contracted over the axes its layout calls fan-in.

``merge`` and ``factored`` agree with each other whatever the layout, so a wrong layout (the heads
axis of a ``(heads, d_model, head_dim)`` query kernel read as fan-in) would train unnoticed: the
update is then not low-rank in the layer's real input-to-output map. Each ``dot_general`` that
consumes a LoRA kernel shows which axes the model contracts; this module compares them with the layout.
"""

from __future__ import annotations

from typing import Any

from lorajax._factored._ref import KernelRef

_GROUP = {"i": "fan-in", "o": "fan-out", "s": "stacked"}


def check_contraction(ref: KernelRef, k_side: int, dimension_numbers: Any) -> None:
    """Raise where ``dot_general`` contracts a kernel over axes its layout does not call fan-in.

    Accepted: the contracted axes all fan-in and the kept axes fan-out or stacked (``x @ W``), or the
    contracted axes all fan-out and the kept ones fan-in or stacked (``x @ W.T``, as ``Embed.attend``
    does), or no axis kept at all. Batch axes (experts, heads summed later) may be of any group.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    kc, kb = (rc, rb) if k_side == 1 else (lc, lb)
    groups = lambda dims: {ref.labels[p][0] for p in dims} - {"u"}
    kept = [p for p in range(len(ref.labels)) if p not in kc and p not in kb]
    contracted, free = groups(kc), groups(kept)
    # A use that keeps no axis (the kernel contracted whole, as in a bilinear form) fits any layout.
    if (
        not contracted
        or not free
        or (contracted <= {"i"} and free <= {"o", "s"})
        or (contracted <= {"o"} and free <= {"i", "s"})
    ):
        return
    says = lambda dims: ", ".join(f"axis {p} ({_GROUP[ref.labels[p][0]]})" for p in dims if ref.labels[p][0] != "u")
    raise ValueError(
        f"lorajax.factored: the LoRA kernel {ref.info.path!r} (layout {ref.info.spec.layout.axes!r}, view shape "
        f"{ref.shape}) is contracted with the activations over {says(kc)} and keeps {says(kept) or 'no axis'}: its "
        "layout does not say which axes the model contracts, so the adapter would not be low-rank in the layer's "
        "input-to-output map. lorafy it with the layouts the model uses: "
        "layout=lorajax.infer_layouts(fn, params, *inputs), or layout={path: spec} with 'i' on the contracted axes."
    )

"""The LoRA node and its static spec, and the one implementation of the LoRA arithmetic.

:class:`LoRASpec` holds what every LoRA-carrying type shares (rank, alpha, layout,
rsLoRA, the variant): :class:`LoRA` nodes, adapter entries and bank entries all keep
one, so a new option is added in one place. :func:`lora_delta` is the update
``scale * a @ b`` in a kernel's layout, used by ``merge``, ``swap``, combining
adapters and the factored path's fallback; :func:`fold_scale` folds a scale into
``b`` for banks, combined adapters and PEFT layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes
from lorajax._layout import Layout

VARIANTS = ("lora", "dora")


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski 2023), as PEFT scales."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The static description of one adapted kernel: rank, alpha, layout, rsLoRA and variant.

    Shared by :class:`LoRA` nodes, :class:`lorajax.AdapterFactors` and
    :class:`lorajax.BankNode`. It is static pytree metadata: never trained,
    and changing it retraces.

    >>> LoRASpec(rank=4, alpha=8.0, layout=Layout("io")).scale
    2.0
    >>> LoRASpec(rank=4, alpha=8.0, layout=Layout("io"), rslora=True).scale
    4.0
    """

    rank: int
    alpha: float
    layout: Layout
    rslora: bool = False
    variant: str = "lora"
    #: ``"default"``, or the init that rewrote the node's base: ``"pissa"``, ``"pissa_niter_<k>"``, ``"olora"``
    #: (a residual base), ``"loftq"``/``"loftq_iter_<k>..."`` (a quantized base fitted with the factors).
    init: str = "default"
    #: PEFT's ``lora_bias``: the node carries a trained bias on ``b``'s output (:attr:`LoRA.bias`, shaped like
    #: ``b`` without its rank axis), added as ``scale * bias`` to the layer's own bias (``lorajax/_lora_bias.py``).
    bias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRASpec: rank must be an integer >= 1, got {self.rank!r}.")
        if not isinstance(self.layout, Layout):
            raise TypeError(f"LoRASpec: layout must be a lorajax.Layout, got {self.layout!r}.")
        if self.variant not in VARIANTS:
            raise ValueError(f"LoRASpec: variant must be one of {VARIANTS}, got {self.variant!r}.")

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    def replace(self, **changes: Any) -> LoRASpec:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


class HasSpec:
    """Read-only views of a ``spec`` field, shared by the types that carry one."""

    spec: LoRASpec

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return self.spec.rank

    @property
    def alpha(self) -> float:
        """LoRA alpha."""
        return self.spec.alpha

    @property
    def layout(self) -> Layout:
        """The kernel's :class:`lorajax.Layout`."""
        return self.spec.layout

    @property
    def rslora(self) -> bool:
        """Whether the scale is ``alpha / sqrt(rank)`` (rsLoRA)."""
        return self.spec.rslora

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return self.spec.scale


class OnBase:
    """The shape and dtype of a node's frozen ``base`` (unboxed), shared by the nodes that stand where it was."""

    base: Any

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the base (the kernel a LoRA node merges into, the table of trainable tokens)."""
        return tuple(_boxes.unbox(self.base).shape)

    @property
    def dtype(self) -> Any:
        """Dtype of the base."""
        return _boxes.unbox(self.base).dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA(HasSpec, OnBase):
    """A targeted kernel: frozen ``base`` plus trainable factors ``a`` and ``b``.

    The effective kernel is ``base + scale * a @ b``, contracted back into the
    base's layout (see :class:`lorajax.Layout`). ``base`` is the caller's very
    array (or its Flax box), never a copy. ``spec`` (:class:`lorajax.LoRASpec`:
    rank, alpha, layout, rsLoRA) is static pytree metadata, so it is never
    trained and changing it retraces; ``node.rank``, ``node.scale`` and the like
    read it.

    With ``per_example=True`` (made by :func:`lorajax.select` for mixed-adapter
    batches) ``a`` and ``b`` carry one extra leading axis that indexes the
    examples of the batch, and only the factored path can run the node.

    Children may be Flax boxes (``nn.Partitioned``, ``nnx.Variable``); ``a`` and
    ``b`` then carry boxes of the same type whose axis names follow the base's.

    >>> import jax.numpy as jnp
    >>> spec = LoRASpec(rank=2, alpha=4.0, layout=Layout("io"))
    >>> node = LoRA(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), spec)
    >>> node.scale, node.rank
    (2.0, 2)
    """

    base: Any
    a: Any
    b: Any
    spec: LoRASpec = dataclasses.field(metadata=dict(static=True))
    per_example: bool = dataclasses.field(default=False, metadata=dict(static=True))
    #: DoRA's trainable per-output-feature magnitude (``lorafy(..., dora=True)``, see ``lorajax/_dora.py``);
    #: ``None`` for plain LoRA. Last among the children, so ``LoRA(base, a, b, spec)`` keeps working.
    #: Read only where ``spec.variant == "dora"`` (tree maps such as sharding trees may put values in its place).
    magnitude: Any = None
    #: PEFT's ``lora_bias``: a trained bias on ``b``'s output (``lorafy(..., lora_bias=True)``), shaped like ``b``
    #: without its rank axis; ``merge`` and ``factored`` add ``scale * bias`` to the sibling ``bias`` leaf of the
    #: kernel's module. Read only where ``spec.bias`` (``lorajax/_lora_bias.py``).
    bias: Any = None


def is_lora(x: Any) -> bool:
    """True for a :class:`LoRA` node; handy as ``is_leaf`` in tree maps.

    >>> jax.tree.map(lambda x: is_lora(x), {"w": 1})
    {'w': False}
    """
    return isinstance(x, LoRA)


def compute_dtype(dtype: Any) -> Any:
    """The dtype LoRA arithmetic runs in: float32 at least (float64 bases in x64 mode keep theirs)."""
    return jnp.promote_types(dtype, jnp.float32)


def lora_delta(a: jax.Array, b: jax.Array, spec: LoRASpec, dtype: Any) -> jax.Array:
    """``scale * a @ b`` contracted into the kernel's layout, in ``dtype``.

    The one implementation of the LoRA update. It runs at ``Precision.HIGHEST`` so
    TPUs and GPUs do not round it through bf16/TF32 passes.

    >>> a, b = jnp.ones((2, 1)), jnp.ones((1, 3))
    >>> lora_delta(a, b, LoRASpec(rank=1, alpha=2.0, layout=Layout("io")), jnp.float32).tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    d = jnp.einsum(
        spec.layout.einsum_subscripts(),
        jnp.asarray(a).astype(dtype),
        jnp.asarray(b).astype(dtype),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=dtype,
    )
    return d * jnp.asarray(spec.scale, dtype)


def fold_scale(b: Any, scale: float, dtype: Any = None, xp: Any = jnp) -> Any:
    """``b * scale`` computed in float32 (at least) and rounded once to ``dtype`` (default: ``b``'s).

    Where a scale is folded into ``b`` (adapter banks, combined adapters, PEFT
    layers stacked into one kernel), the result has scale 1 and gives the same
    update up to one rounding. ``xp`` is ``jax.numpy`` or ``numpy``.

    >>> fold_scale(jnp.ones((1, 2), jnp.bfloat16), 0.5).tolist()
    [[0.5, 0.5]]
    """
    dtype = b.dtype if dtype is None else dtype
    wide = xp.promote_types(b.dtype, xp.float32)
    return (xp.asarray(b, wide) * xp.asarray(scale, wide)).astype(dtype)

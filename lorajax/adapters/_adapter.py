"""The adapter types: LoRA factors without their base, as a pytree, and how to take them from lorafied params."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes
from lorajax._node import HasSpec, LoRASpec, is_lora
from lorajax._paths import path_str, tree_paths
from lorajax._tokens import is_tokens
from lorajax._trainable import is_node, is_trainable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterFactors(HasSpec):
    """The LoRA factors of one target kernel, without the kernel.

    ``a`` and ``b`` are plain arrays (never Flax boxes) shaped as in
    :class:`lorajax.LoRA`. Everything else is static metadata: the
    :class:`lorajax.LoRASpec` (``.rank``, ``.alpha``, ``.layout``, ``.rslora`` and
    ``.scale`` read it) and the ``shape`` and ``dtype`` of the base kernel the
    factors were made for, so an adapter can tell a wrong base from the right one.

    >>> import jax.numpy as jnp, lorajax
    >>> spec = lorajax.LoRASpec(rank=2, alpha=4.0, layout=lorajax.Layout("io"))
    >>> f = lorajax.AdapterFactors(jnp.zeros((4, 2)), jnp.zeros((2, 3)), spec, shape=(4, 3), dtype="float32")
    >>> f.rank, f.scale
    (2, 2.0)
    """

    a: Any
    b: Any
    spec: LoRASpec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: str = dataclasses.field(default="", metadata=dict(static=True))
    #: A DoRA adapter's magnitude (``spec.variant == "dora"``), one entry per output feature; ``None`` for LoRA.
    magnitude: Any = None
    #: A LoRA bias on ``b``'s output (``spec.bias``, PEFT's ``lora_bias``), shaped like ``b`` without its rank axis.
    bias: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterTokens:
    """The trained rows of one embedding table (a :class:`lorajax.TrainableTokens` node), without the table.

    ``values`` (``(len(indices), dim)``, a plain array) is the only leaf; ``indices`` and the table's
    ``shape`` and ``dtype`` are static, so attaching checks the base's table before the rows replace its
    own. It sits in :attr:`Adapter.trainables` under the table's path.

    >>> import jax.numpy as jnp, lorajax
    >>> t = lorajax.AdapterTokens(jnp.zeros((2, 4)), (5, 7), shape=(8, 4), dtype="float32")
    >>> t.values.shape, t.indices, t.shape
    ((2, 4), (5, 7), (8, 4))
    """

    values: Any
    indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: str = dataclasses.field(default="", metadata=dict(static=True))


def is_adapter_tokens(x: Any) -> bool:
    """True for an :class:`AdapterTokens` entry of :attr:`Adapter.trainables`."""
    return isinstance(x, AdapterTokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter on its own: ``{path: AdapterFactors}``, the trained ``also=`` leaves, and JSON metadata.

    ``trainables`` holds every :class:`lorajax.Trainable` leaf of the params it was taken
    from (a head, a norm, a bias trained beside the factors): ``{path: array}``, unboxed, so
    that attaching the adapter to the base restores them (as ``Trainable`` nodes that keep
    training) and :func:`lorajax.save_adapter` writes them. An embedding table with trainable
    tokens (:class:`lorajax.TrainableTokens`) is there as an :class:`AdapterTokens` entry: its
    trained rows and their indices, reattached as a ``TrainableTokens`` node on the base's table.

    A plain pytree whose only leaves are the factor and trainable arrays, so it can be
    jitted, ``device_put``, sharded or checkpointed with Orbax like any other
    tree. Paths are '/'-joined parameter paths (``"params/Dense_0/kernel"``).
    ``metadata`` is user metadata (JSON-serialisable); it is kept as static
    JSON text so the tree stays hashable.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.ones((4, 4))}}, rank=2, where=".*", key=jax.random.key(0))
        >>> ad = lorajax.adapter(p)
        >>> ad.targets, ad["q/kernel"].a.shape
        (('q/kernel',), (4, 2))
    """

    factors: dict[str, AdapterFactors]
    metadata_json: str = dataclasses.field(default="{}", metadata=dict(static=True))
    #: ``{path: array}``: the leaves declared trainable (``lorafy(..., also=...)``), as trained; trainable
    #: token rows (``lorafy(..., trainable_tokens=...)``) as ``{path: AdapterTokens}``.
    trainables: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        """User metadata (a fresh dict on every access)."""
        return json.loads(self.metadata_json)

    @property
    def targets(self) -> tuple[str, ...]:
        """Paths of the targeted kernels, sorted."""
        return tuple(sorted(self.factors))

    @property
    def fingerprint(self) -> str:
        """sha256 over the targets' paths, base shapes and base dtypes (and the trainable leaves' where any)."""
        return fingerprint(self.factors, self.trainables)

    def __getitem__(self, path: str) -> AdapterFactors:
        return self.factors[path]

    def __len__(self) -> int:
        return len(self.factors)

    def with_metadata(self, metadata: Mapping[str, Any] | None) -> Adapter:
        """A copy whose metadata is updated with ``metadata``."""
        merged = {**self.metadata, **dict(metadata or {})}
        return Adapter(dict(self.factors), dump_metadata(merged), dict(self.trainables))


def fingerprint(factors: Mapping[str, AdapterFactors], trainables: Mapping[str, Any] | None = None) -> str:
    """sha256 over ``[path, base shape, base dtype]`` of every target: which base an adapter belongs to.

    Trainable leaves add ``["trainable", path, shape, dtype]`` entries, trainable tokens
    ``["tokens", path, table shape, table dtype, indices]``; an adapter without them
    keeps the fingerprint it had before they were carried (format 1 files).
    """
    spec: list[Any] = [[p, list(f.shape), f.dtype] for p, f in sorted(factors.items())]
    for p, x in sorted((trainables or {}).items()):
        if is_adapter_tokens(x):
            spec.append(["tokens", p, [int(d) for d in x.shape], x.dtype, [int(i) for i in x.indices]])
        else:
            spec.append(["trainable", p, [int(d) for d in x.shape], jnp.dtype(x.dtype).name])
    return hashlib.sha256(json.dumps(spec, separators=(",", ":")).encode()).hexdigest()


def reject_trainables(ads: Any, caller: str, why: str, todo: str) -> None:
    """Raise a ValueError naming every trainable (``also=``) leaf the adapters ``ads`` carry (``None`` skipped)."""
    found = sorted({path for ad in ads if ad is not None for path in ad.trainables})
    if found:
        raise ValueError(
            f"{caller}: the adapters carry trained leaves besides their factors ({', '.join(found)}, declared with "
            f"lorafy(..., also=...) or trainable_tokens=...): {why}. {todo}"
        )


def reject_dora(ads: Any, caller: str, why: str, todo: str) -> None:
    """Raise a ValueError naming every DoRA entry of the adapters ``ads`` (``None`` entries are skipped)."""
    found = sorted({name for ad in ads if ad is not None for name, f in ad.factors.items() if f.spec.variant == "dora"})
    if found:
        raise ValueError(
            f"{caller}: {', '.join(found)} {'is a DoRA target' if len(found) == 1 else 'are DoRA targets'}: "
            f"{why}. {todo}"
        )


def reject_lora_bias(ads: Any, caller: str, todo: str) -> None:
    """Raise a ValueError naming every entry with a LoRA bias (PEFT's ``lora_bias``) of the adapters ``ads``."""
    found = sorted({name for ad in ads if ad is not None for name, f in ad.factors.items() if f.spec.bias})
    if found:
        raise ValueError(
            f"{caller}: {', '.join(found)} {'has' if len(found) == 1 else 'have'} a LoRA bias (lora_bias), which "
            f"{caller} does not carry: it would be dropped. {todo}"
        )


def dump_metadata(metadata: Mapping[str, Any] | None) -> str:
    """User metadata as canonical JSON text; a TypeError says what is not serialisable."""
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of JSON-serialisable values, got {type(metadata).__name__}.")
    try:
        return json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable (str, number, bool, None, list, dict): {e}") from None


def adapter(params: Any, metadata: Mapping[str, Any] | None = None) -> Adapter:
    """The LoRA factors of lorafied ``params`` with their metadata, without any base weight.

    Args:
        params: lorafied params (or an :class:`Adapter`, returned with ``metadata`` added).
        metadata: optional JSON-serialisable user metadata carried along (and saved by
            :func:`save_adapter`).

    Returns:
        An :class:`Adapter`: ``{path: AdapterFactors}``, plus in ``trainables`` every leaf
        declared trainable (:class:`lorajax.Trainable`, ``lorafy(..., also=...)``) and, as
        :class:`AdapterTokens`, the trained rows of every :class:`lorajax.TrainableTokens` table. The arrays
        are the caller's own (unboxed), not copies.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> ad = lorajax.adapter(lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0)))
        >>> ad.targets
        ('dense/kernel',)
    """
    return as_adapter(params, metadata, caller="adapter")


def as_adapter(params: Any, metadata: Mapping[str, Any] | None = None, *, caller: str) -> Adapter:
    """:func:`adapter`, with errors that name ``caller`` (the public function that took ``params``)."""
    if isinstance(params, Adapter):
        return params.with_metadata(metadata) if metadata else params
    factors: dict[str, AdapterFactors] = {}
    trainables: dict[str, Any] = {}
    for path, leaf in tree_paths(params, is_leaf=is_node):
        if is_trainable(leaf):
            trainables[path_str(path)] = _boxes.unbox(leaf.value)
        if is_tokens(leaf):  # the trained rows and their indices, not the frozen table
            trainables[path_str(path)] = AdapterTokens(
                _boxes.unbox(leaf.values), tuple(leaf.indices), leaf.shape, jnp.dtype(leaf.dtype).name
            )
        if not is_lora(leaf):
            continue
        name = path_str(path)
        if leaf.per_example:
            raise ValueError(
                f"{caller}: {name} is a per-example LoRA node (made by lorajax.select for a mixed batch); take the "
                f"adapter from the params you stacked into the bank instead."
            )
        base = _boxes.unbox(leaf.base)
        factors[name] = AdapterFactors(
            a=_boxes.unbox(leaf.a),
            b=_boxes.unbox(leaf.b),
            spec=leaf.spec,
            shape=tuple(int(d) for d in base.shape),
            dtype=jnp.dtype(base.dtype).name,
            magnitude=_boxes.unbox(leaf.magnitude) if leaf.spec.variant == "dora" else None,
            bias=_boxes.unbox(leaf.bias) if leaf.spec.bias else None,
        )
    if not factors and not trainables:
        raise ValueError(f"{caller}: params hold no LoRA node; call lorajax.lorafy (or lorajax.load_adapter) first.")
    return Adapter(factors, dump_metadata(metadata), trainables)

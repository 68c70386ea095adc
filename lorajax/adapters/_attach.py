"""Fitting adapters to a base: the checks every adapter operation shares, and ``attach``.

Each check returns problem lines rather than raising, so the public functions can
report every mismatch of a whole model in one error (:class:`lorajax._problems.Problems`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes
from lorajax._dora import magnitude_entries
from lorajax._fit import fit_problems
from lorajax._layout import factor_names
from lorajax._lora_bias import lora_bias_names
from lorajax._node import LoRA, is_lora
from lorajax._paths import KeyPath, path_str, rebuild, tree_paths
from lorajax._problems import Problems
from lorajax._tokens import TrainableTokens, check_indices, is_tokens, rows_like
from lorajax._trainable import Trainable, is_trainable
from lorajax.adapters._adapter import Adapter, AdapterFactors, as_adapter, is_adapter_tokens
from lorajax.quant import is_quantized


def factor_problems(name: str, f: AdapterFactors) -> list[str]:
    """Inconsistencies inside one entry: its layout against its recorded base shape against its factor shapes."""
    m = None if f.magnitude is None else tuple(f.magnitude.shape)
    return fit_problems(name, f.spec, f.shape, tuple(f.a.shape), tuple(f.b.shape), m)


def base_problems(name: str, f: AdapterFactors, leaf: Any, check_dtype: bool) -> list[str]:
    """Whether the base's ``leaf`` (a kernel, its box, or a LoRA node on it) is the kernel ``f`` was made for."""
    if is_lora(leaf):
        leaf = leaf.base
    base = _boxes.unbox(leaf)
    if not hasattr(base, "shape"):
        return [f"missing: {name}: the base has {type(base).__name__} there, not an array"]
    shape = tuple(int(d) for d in base.shape)
    if len(shape) != f.layout.ndim:
        return [
            f"layout: {name}: layout {f.layout.axes!r} has {f.layout.ndim} axes but the base kernel has shape {shape}"
        ]
    if shape != f.shape:
        return [f"shape: {name}: the adapter was made for a base kernel of shape {f.shape}, this base has {shape}"]
    if check_dtype and f.dtype and jnp.dtype(base.dtype).name != f.dtype:
        return [
            f"dtype: {name}: the adapter was made for a {f.dtype} base kernel, "
            f"this base is {jnp.dtype(base.dtype).name}"
        ]
    return []


def _unit(x: Any) -> bool:
    """LoRA, Trainable and TrainableTokens nodes and quantized kernels are single leaves of a params tree."""
    return is_lora(x) or is_trainable(x) or is_tokens(x) or is_quantized(x)


def _shape(x: Any) -> tuple[int, ...] | None:
    x = _boxes.unbox(x)
    return tuple(int(d) for d in x.shape) if hasattr(x, "shape") else None


def place_like(base: Any, value: Any) -> Any:
    """``value`` as a JAX array placed like the (unboxed) ``base`` leaf: on its sharding where it has one."""
    sharding = getattr(_boxes.unbox(base), "sharding", None)
    if isinstance(value, jax.core.Tracer) or not isinstance(sharding, jax.sharding.Sharding):
        return jnp.asarray(value)
    return jax.device_put(value, sharding)


def trainable_problems(
    trainables: dict[str, Any], leaves: list[tuple[KeyPath, Any]], index: dict[str, int], *, expect: bool
) -> list[str]:
    """Whether the base has each trained leaf ``trainables`` carries, of its shape (and, with ``expect``, no
    :class:`lorajax.Trainable` node the adapter lacks: params that declare a leaf trainable expect its value)."""
    out = []
    for name, x in sorted(trainables.items()):
        if is_adapter_tokens(x):  # attach_as checks these itself (token_problems); swap cannot write them
            out.append(
                f"tokens: {name}: the adapter carries trainable token rows; merged params keep no copy of the table's "
                "own rows to put back, so attach the adapter to the base params instead (lorajax.attach)"
            )
            continue
        want = tuple(int(d) for d in x.shape)
        if name not in index:
            near = difflib.get_close_matches(name, list(index), n=3, cutoff=0.75)
            out.append(
                f"missing: {name}: the adapter carries a trained leaf of shape {want} (declared with "
                f"lorafy(..., also=...)) but the base has no such parameter"
                + (f" (similar: {', '.join(near)})" if near else "")
            )
            continue
        leaf = leaves[index[name]][1]
        if is_lora(leaf):
            out.append(f"lora: {name}: the adapter carries it as a trained leaf, the params hold a LoRA node there")
        elif (got := _shape(leaf.value if is_trainable(leaf) else leaf)) != want:
            out.append(f"shape: {name}: the adapter carries a trained leaf of shape {want}, this base has {got}")
    if expect:
        out += [
            f"trainable: {path_str(p)}: the params declare it trainable (a Trainable node, lorafy(..., also=...)) "
            "but the adapter carries no trained value for it"
            for p, leaf in leaves
            if is_trainable(leaf) and path_str(p) not in trainables
        ]
    return out


def token_problems(tokens: dict[str, Any], leaves: list[tuple[KeyPath, Any]], index: dict[str, int]) -> list[str]:
    """Whether the base has each table ``tokens`` (``{path: AdapterTokens}``) was made for, and the rows fit it."""
    out = []
    for name, t in sorted(tokens.items()):
        rows = tuple(int(d) for d in t.values.shape)
        if name not in index:
            near = difflib.get_close_matches(name, list(index), n=3, cutoff=0.75)
            out.append(
                f"missing: {name}: the adapter carries trainable tokens for a table of shape {t.shape} but the base "
                "has no such parameter" + (f" (similar: {', '.join(near)})" if near else "")
            )
            continue
        leaf = leaves[index[name]][1]
        got = _shape(leaf.base if is_tokens(leaf) else leaf)
        if is_lora(leaf) or is_trainable(leaf) or got is None or len(got) != 2:
            out.append(
                f"tokens: {name}: the adapter carries trainable tokens there, the params hold {type(leaf).__name__}"
            )
        elif t.shape and got != tuple(t.shape):
            out.append(
                f"shape: {name}: the adapter's trainable tokens were made for a table of shape {tuple(t.shape)}, "
                f"this base has {got}"
            )
        elif why := check_indices(list(t.indices), got[0], name):
            out.append(f"tokens: {why}")
        elif rows != (len(t.indices), got[1]):
            out.append(
                f"shape: {name}: {len(t.indices)} token indices into a table {got} need rows of shape "
                f"{(len(t.indices), got[1])}, the adapter has {rows}"
            )
    return out


def with_tokens(
    tokens: dict[str, Any], leaves: list[tuple[KeyPath, Any]], index: dict[str, int], replaced: dict[int, Any]
) -> None:
    """Put each table's trained rows into ``replaced`` as a :class:`lorajax.TrainableTokens` node on the base table.

    The rows are boxed like the table with its row axis unnamed, and placed on its sharding with rows replicated.
    """
    for name, t in tokens.items():
        n = index[name]
        leaf = leaves[n][1]
        table = leaf.base if is_tokens(leaf) else leaf
        rows = rows_like(table, t.values)
        replaced[n] = TrainableTokens(table, rows, tuple(int(i) for i in t.indices))


def with_trainables(
    trainables: dict[str, Any], leaves: list[tuple[KeyPath, Any]], index: dict[str, int], replaced: dict[int, Any]
) -> None:
    """Put each trained leaf into ``replaced`` as a :class:`lorajax.Trainable` node, boxed and placed like its base."""
    for name, x in trainables.items():
        n = index[name]
        leaf = leaves[n][1]
        box = leaf.value if is_trainable(leaf) else leaf
        replaced[n] = Trainable(_boxes.rebox(box, place_like(box, x)))


def index_paths(tree: Any) -> tuple[list[tuple[KeyPath, Any]], dict[str, int]]:
    """The leaves of ``tree`` (stopping at boxes and LoRA nodes) and ``{path string: leaf number}``."""
    leaves = tree_paths(tree, is_leaf=_unit)
    return leaves, {path_str(p): n for n, (p, _) in enumerate(leaves)}


def rebuild_params(tree: Any, leaves: list[tuple[KeyPath, Any]], replaced: dict[int, Any]) -> Any:
    """``tree`` with the leaves of :func:`index_paths` numbered in ``replaced`` swapped in."""
    return rebuild(tree, leaves, replaced, is_leaf=_unit)


def group_targets(ads: Sequence[Adapter], caller: str) -> dict[str, list[tuple[int, AdapterFactors]]]:
    """``{path: [(adapter index, factors), ...]}``, sorted, with layouts and base shapes checked to agree."""
    groups: dict[str, list[tuple[int, AdapterFactors]]] = {}
    for k, ad in enumerate(ads):
        for name, f in ad.factors.items():
            groups.setdefault(name, []).append((k, f))
    problems = Problems(caller)
    for name, members in sorted(groups.items()):
        ref_k, ref = members[0]
        for k, f in members:
            problems.extend(factor_problems(f"{name} (adapter {k})", f))
            if f.layout != ref.layout:
                problems.add(
                    f"layout: {name}: adapter {ref_k} has layout {ref.layout.axes!r}, adapter {k} {f.layout.axes!r}"
                )
            if f.shape != ref.shape:
                problems.add(
                    f"shape: {name}: adapter {ref_k} was made for base shape {ref.shape}, adapter {k} for {f.shape}"
                )
    problems.raise_if_any(
        "the adapters do not share one base", "Combine or stack only adapters of the same base model."
    )
    return dict(sorted(groups.items()))


def attach(base_params: Any, adapter: Adapter, *, check_dtype: bool = False) -> Any:
    """Lorafied params again: ``adapter``'s factors on ``base_params``' kernels.

    ``base_params`` may be plain or lorafied; LoRA nodes already there are
    replaced by their base first, so the result carries exactly this adapter.
    Factors are re-boxed like their base (``nn.Partitioned``, ``nnx.Param``).

    Args:
        base_params: the base model's params (any pytree lorafy accepts).
        adapter: an :class:`Adapter` (or lorafied params to take it from).
        check_dtype: also require each base kernel's dtype to be the one the adapter
            was made for (off by default: serving a float32-trained adapter on a
            bfloat16 base is normal).

    Returns:
        Params with a :class:`lorajax.LoRA` node at every target of the adapter, and a
        :class:`lorajax.Trainable` node holding each trained leaf the adapter carries
        (``adapter.trainables``: heads, norms, biases trained with ``lorafy(..., also=...)``),
        boxed and placed (sharded) like the base leaf it replaces, so it keeps training; a
        :class:`lorajax.TrainableTokens` node on the base's table for each
        :class:`lorajax.AdapterTokens` entry (the trained rows, placed like the table's columns).

    Raises:
        ValueError: listing every mismatch at once: targets missing from the base,
            kernels of another shape or rank of axes than the adapter was made for,
            factors inconsistent with their rank or layout, trained leaves the base lacks
            or has in another shape, tables of another shape than the trainable tokens were
            made for (or indices outside them), and ``Trainable`` nodes of ``base_params`` the
            adapter carries no value for.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> ad = lorajax.adapter(lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0)))
        >>> lorajax.attach(base, ad)["dense"]["kernel"].rank
        2
    """
    return attach_as(base_params, adapter, check_dtype=check_dtype, caller="attach", what="")


def attach_as(base_params: Any, adapter: Any, *, check_dtype: bool, caller: str, what: str) -> Any:
    """:func:`attach`, with errors that name ``caller`` and, before the problems, ``what`` (a file name)."""
    ad = as_adapter(adapter, caller=caller)
    tokens = {k: x for k, x in ad.trainables.items() if is_adapter_tokens(x)}
    trained = {k: x for k, x in ad.trainables.items() if k not in tokens}
    leaves, index = index_paths(base_params)
    problems = Problems(caller)
    for name, f in sorted(ad.factors.items()):
        problems.extend(factor_problems(name, f))
        if name not in index:
            near = difflib.get_close_matches(name, list(index), n=3, cutoff=0.75)
            problems.add(
                f"missing: {name}: no such parameter in the base" + (f" (similar: {', '.join(near)})" if near else "")
            )
        else:
            problems.extend(base_problems(name, f, leaves[index[name]][1], check_dtype))
    declared = trainable_problems(trained, leaves, index, expect=True)
    problems.extend(declared + token_problems(tokens, leaves, index))
    problems.raise_if_any(
        f"{what}the adapter does not fit these base params",
        "Attach an adapter only to the base model it was trained on (compare adapter.targets with the base's paths)."
        + (
            " An adapter without the trained leaves the params declare comes from a save that lost them: attach it "
            "onto lorajax.unlorafy(params) to run it with the base's values there."
            if any(p.startswith("trainable:") for p in declared)
            else ""
        ),
    )
    replaced: dict[int, Any] = {n: leaf.base for n, (_, leaf) in enumerate(leaves) if is_lora(leaf) or is_tokens(leaf)}
    with_trainables(trained, leaves, index, replaced)
    with_tokens(tokens, leaves, index, replaced)
    for name, f in ad.factors.items():
        n = index[name]
        leaf = leaves[n][1]
        base = leaf.base if is_lora(leaf) else leaf
        names_a, names_b = factor_names(base, f.layout)
        m = None
        if f.spec.variant == "dora":
            names = _boxes.names(base)
            m = _boxes.rebox(base, f.magnitude, None if names is None else magnitude_entries(f.layout, names))
        replaced[n] = LoRA(
            base=base,
            a=_boxes.rebox(base, f.a, names_a),
            b=_boxes.rebox(base, f.b, names_b),
            spec=f.spec,
            magnitude=m,
            bias=None if f.bias is None else _boxes.rebox(base, f.bias, lora_bias_names(base, f.layout)),
        )
    return rebuild_params(base_params, leaves, replaced)

"""Adapter banks: many adapters on one base, one adapter per example of a batch; DoRA and plain LoRA side by side."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import _boxes
from lorajax._dora import bank_gains, magnitude_shape
from lorajax._factored._banked import FORMS, BankedLoRA, Gains, Rows
from lorajax._factored._base import in_turn
from lorajax._node import HasSpec, LoRA, LoRASpec, compute_dtype, fold_scale, is_lora
from lorajax._problems import Problems
from lorajax.adapters._adapter import Adapter, as_adapter, reject_lora_bias, reject_trainables
from lorajax.adapters._attach import base_problems, group_targets, index_paths, rebuild_params
from lorajax.quant import dense_base


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BankNode(HasSpec):
    """One target of an :class:`AdapterBank`: the base kernel and every adapter's factors.

    ``a`` is ``(num_adapters + 1, *a_shape)`` and ``b`` is
    ``(num_adapters + 1, *b_shape)`` at the bank's common ``rank`` (smaller
    ranks padded with zeros); each adapter's scale is folded into its ``b``
    rows, and the last row is all zeros (the base model, id ``-1``). ``spec``
    has ``alpha = rank`` (scale 1), since the scales are folded. Not a
    :class:`lorajax.LoRA`, so ``merge``/``mask`` never mistake it for one.

    Where any adapter is DoRA (and in DoRA-capable slots), ``magnitude`` is
    ``(num_adapters + 1, *magnitude shape)`` and ``dora`` ``(num_adapters + 1,)``
    booleans: row ``k``'s gain is ``m_k / ‖W + A_k·B_k‖`` where ``dora[k]``, and 1
    (plain LoRA, the zero row) where not. Both are ``None`` elsewhere.
    """

    base: Any
    a: Any
    b: Any
    spec: LoRASpec = dataclasses.field(metadata=dict(static=True))
    magnitude: Any = None
    dora: Any = None


def is_bank_node(x: Any) -> bool:
    """True for a :class:`BankNode`."""
    return isinstance(x, BankNode)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """The base params with a :class:`BankNode` at every target of any adapter.

    A pytree (pass it through ``jax.jit``); build it with :func:`stack_adapters`
    and pick one adapter per example with :func:`select`. ``names`` are the
    adapters' names in bank order (``"0"``, ``"1"``, ... for a list).
    """

    params: Any
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """Adapter ids for a batch given by adapter names (``None`` = base model, id -1).

        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"q": {"kernel": jnp.ones((4, 4))}}
        >>> ps = {n: lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(k)) for k, n in enumerate("xy")}
        >>> lorajax.stack_adapters(ps).ids(["y", None, "x"]).tolist()
        [1, -1, 0]
        """
        pos = {n: k for k, n in enumerate(self.names)}
        unknown = sorted({str(n) for n in names if n is not None and n not in pos})
        if unknown:
            raise ValueError(f"AdapterBank.ids: unknown adapter names {unknown}; the bank holds {list(self.names)}.")
        return np.asarray([-1 if n is None else pos[n] for n in names], np.int32)


def bank_row(f: Any, rank: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """One adapter's ``(a, b)`` rows of a bank node: rank zero-padded to ``rank``, scale folded into ``b``."""
    pad = rank - f.rank
    a_pad = [(0, 0)] * (f.a.ndim - 1) + [(0, pad)]
    b_pad = [(0, 0)] * f.b.ndim
    b_pad[len(f.layout.stack)] = (0, pad)
    return jnp.pad(jnp.asarray(f.a, dtype), a_pad), jnp.pad(fold_scale(jnp.asarray(f.b), f.scale, dtype), b_pad)


def is_dora(f: Any) -> bool:
    """Whether the adapter entry ``f`` is DoRA."""
    return f.spec.variant == "dora"


def with_dora_rows(node: BankNode, adapters: Mapping[int, Any]) -> BankNode:
    """``node`` with DoRA rows: ``magnitude`` and ``dora`` from the entries ``{row: AdapterFactors}``, others plain."""
    count = node.a.shape[0]
    shape = magnitude_shape(node.layout, tuple(int(d) for d in _boxes.unbox(node.base).shape))
    dt = compute_dtype(node.a.dtype)
    rows = [jnp.zeros(shape, dt)] * count
    flags = np.zeros(count, bool)
    for k, f in adapters.items():
        if is_dora(f):
            rows[k], flags[k] = jnp.asarray(f.magnitude, dt), True
    return dataclasses.replace(node, magnitude=jnp.stack(rows), dora=jnp.asarray(flags))


def refuse_trainables(ads: Sequence[Adapter], caller: str) -> None:
    """A bank holds factors per adapter, not whole leaves: refuse adapters that carry trained leaves."""
    reject_trainables(
        ads,
        caller,
        "a bank shares one base between its adapters and holds only their factors per row; each adapter would need "
        "its own copy of these leaves (a per-example head or norm), which a bank cannot select per row",
        "Serve such adapters one at a time (lorajax.attach onto the base params, then lorajax.merge), or bank "
        "adapters without trained leaves.",
    )
    reject_lora_bias(ads, caller, "Serve such adapters one at a time (lorajax.attach, then lorajax.merge).")


def stack_adapters(
    adapters: Sequence[Any] | Mapping[str, Any], *, base: Any = None, dtype: Any = None, rank: int = 0
) -> AdapterBank:
    """Stack adapters of one base model into an :class:`AdapterBank`.

    Every target of any adapter gets a :class:`BankNode` holding all adapters'
    factors along a leading adapter axis. This is exact: ranks are padded with
    zeros to the largest rank at that target, an adapter that does not target a
    kernel gets zero factors there, and each adapter's own scale (alpha/rank or
    rsLoRA) is folded into its ``b``, so every selected node has scale 1.

    DoRA adapters stack beside plain ones (PEFT refuses ``adapter_names=`` with DoRA): at a target
    where any adapter is DoRA the node also keeps every adapter's magnitude, and :func:`select` gives
    each row the gain ``g = m / ‖W + s·A·B‖`` of its adapter (1 for plain adapters and the base model).

    Args:
        adapters: lorafied params or :class:`Adapter` objects, as a list (names
            ``"0"``, ``"1"``, ...) or a dict ``{name: adapter}``.
        base: the base params. Default: the first entry that is lorafied params,
            with its LoRA nodes replaced by their base. All adapters must belong to
            this base; non-targeted leaves come from it.
        dtype: factor dtype of the bank (default: the common dtype of all factors).
        rank: pad every target to at least this rank (default: the largest rank of the adapters there).

    Returns:
        An :class:`AdapterBank`.

    Raises:
        ValueError: listing every target that is missing from the base, has another
            shape there, has different layouts in different adapters, or is a DoRA entry whose
            magnitude does not fit the kernel; or naming the trained leaves (``lorafy(..., also=...)``,
            ``Adapter.trainables``) an adapter carries: a bank cannot give each row its own head or norm.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"q": {"kernel": jnp.ones((8, 8))}}
        >>> p1 = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(1))
        >>> p2 = lorajax.lorafy(base, rank=4, where=".*", key=jax.random.key(2))
        >>> bank = lorajax.stack_adapters([p1, p2])
        >>> bank.params["q"]["kernel"].a.shape  # 2 adapters + the zero row, rank padded to 4
        (3, 8, 4)
        >>> p3 = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(3), dora=True)
        >>> lorajax.stack_adapters([p1, p3]).params["q"]["kernel"].dora.tolist()  # DoRA beside plain LoRA
        [False, True, False]
    """
    min_rank = int(rank)
    if isinstance(adapters, Mapping):
        names, items = tuple(str(k) for k in adapters), list(adapters.values())
    else:
        items = list(adapters)
        names = tuple(str(k) for k in range(len(items)))
    if not items:
        raise ValueError("stack_adapters: give at least one adapter.")
    if base is None:
        base = next((x for x in items if not isinstance(x, Adapter)), None)
        if base is None:
            raise ValueError("stack_adapters: all entries are Adapter objects; pass the base params as base=...")
    ads = [as_adapter(x, caller="stack_adapters") for x in items]
    refuse_trainables(ads, "stack_adapters")
    groups = group_targets(ads, "stack_adapters")
    leaves, index = index_paths(base)
    problems = Problems("stack_adapters")
    for name, members in groups.items():
        if name not in index:
            problems.add(f"missing: {name}: no such parameter in the base")
        else:
            problems.extend(base_problems(name, members[0][1], leaves[index[name]][1], False))
    problems.raise_if_any("the adapters do not fit the base", "Stack only adapters of this base.")

    replaced: dict[int, Any] = {n: leaf.base for n, (_, leaf) in enumerate(leaves) if is_lora(leaf)}
    for name, members in groups.items():
        ref = members[0][1]
        rank = max([f.rank for _, f in members] + [min_rank])
        dt = dtype or jnp.result_type(*[f.a.dtype for _, f in members], *[f.b.dtype for _, f in members])
        a_rows = [jnp.zeros(ref.layout.a_shape(ref.shape, rank), dt) for _ in range(len(ads) + 1)]
        b_rows = [jnp.zeros(ref.layout.b_shape(ref.shape, rank), dt) for _ in range(len(ads) + 1)]
        for k, f in members:
            a_rows[k], b_rows[k] = bank_row(f, rank, dt)
        n = index[name]
        leaf = leaves[n][1]
        node = BankNode(
            base=leaf.base if is_lora(leaf) else leaf,
            a=jnp.stack(a_rows),
            b=jnp.stack(b_rows),
            spec=LoRASpec(rank=rank, alpha=float(rank), layout=ref.layout),
        )
        replaced[n] = with_dora_rows(node, dict(members)) if any(is_dora(f) for _, f in members) else node
    return AdapterBank(rebuild_params(base, leaves, replaced), names)


def select(bank: AdapterBank, ids: Any, *, form: str = "auto") -> Any:
    """Params in which row ``n`` of a batch uses adapter ``ids[n]``.

    Run the result with :func:`lorajax.factored` (``merge`` refuses it). Jit-able with traced
    ``ids``: a new batch of ids never retraces. Every form is exact (it equals each adapter's
    merged model up to float rounding); they differ in cost:

    * ``"gather"``: each :class:`BankNode` becomes a ``LoRA(per_example=True)`` node whose factors
      are the rows ``a[ids]``, ``b[ids]`` (``(batch, *a_shape)``); batched einsums per example. Needs
      one id per example. Runs every use factored does (stacked/scanned layers, any dot).
    * ``"onehot"``: no gather. The bank runs as one LoRA of rank ``N * r`` in 2-D matmuls,
      ``(x @ A_all)`` with other adapters' columns zeroed per row, then ``@ B_all``. Its cost per row
      is ``N * r * (d_in + d_out)`` (the zero row gets no columns): it pays when the bank's total rank is
      small next to the layer.
    * ``"ragged"``: rows sorted by adapter and two ``jax.lax.ragged_dot`` calls (static group count
      ``N + 1``), then put back; ``r * (d_in + d_out)`` per row where ragged_dot is a grouped kernel
      (GPU/TPU); on XLA:CPU it is slower than both others.
    * DoRA adapters (see :func:`stack_adapters`) run in every form: row ``n``'s output is
      ``g ⊙ (x·W + (x·A)·B)`` with ``g = m / ‖W + s·A·B‖`` of adapter ``ids[n]``. ``select`` computes
      ``g`` once per adapter and call (factored norms: no ``fan_in × fan_out`` array per adapter); under
      ``jax.jit`` with the bank as an argument, a slot's change of kind does not retrace.
    * ``"auto"`` (default): per-token ids run ``"onehot"`` (a gather per token would copy factors for every
      token). Per-example ids are decided at each ``dot_general`` from the activations' shape: ``"onehot"``
      while (rows per example) x (adapters) is at most 64, as in a decode step of one token per example
      (2.3-2.6x faster than gathering there on XLA:CPU), ``"gather"`` beyond (a prompt of 64 tokens: the one-hot
      form cost 1.12-1.18x the gather form's time with 8 adapters of rank 16).

    ``onehot``/``ragged`` accept ids shaped like the activations' leading axes: ``(batch,)`` or
    ``(batch, seq)`` (one adapter per token, e.g. a continuous batch of requests packed into rows).
    A ``dot_general`` they cannot flatten to rows (a stacked kernel no scan slices) runs in the gather
    form, which needs per-example ids. Convolutions run no per-example adapters in any form.

    Args:
        bank: from :func:`stack_adapters` (or :attr:`AdapterSlots.bank`).
        ids: integer array of shape ``(batch,)`` or, except for ``"gather"``, ``(batch, seq)``: an adapter
            index in ``[0, bank.num_adapters)``, or ``-1`` for the base model alone. Concrete ids are
            range-checked; under ``jit`` an out-of-range id yields NaN factors (gather) or no adapter.
        form: ``"auto"``, ``"gather"``, ``"onehot"`` or ``"ragged"``.

    Returns:
        The bank's params with per-example LoRA nodes.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"q": {"kernel": jnp.ones((8, 8))}}
        >>> adapters = [lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(k)) for k in range(3)]
        >>> bank = lorajax.stack_adapters(adapters)
        >>> node = lorajax.select(bank, jnp.array([2, -1, 0, 0]), form="gather")["q"]["kernel"]
        >>> node.per_example, node.a.shape, node.b.shape
        (True, (4, 8, 2), (4, 2, 8))
        >>> x = jnp.ones((4, 8))
        >>> fn = lambda p, x: x @ p["q"]["kernel"]
        >>> ys = [lorajax.factored(fn)(lorajax.select(bank, jnp.array([2, -1, 0, 0]), form=f), x) for f in FORMS]
        >>> bool(jnp.allclose(ys[0], ys[1], atol=1e-5) and jnp.allclose(ys[0], ys[2], atol=1e-5))
        True
    """
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"select: bank must be an AdapterBank from lorajax.stack_adapters, got {type(bank).__name__}.")
    if form not in ("auto", *FORMS):
        raise ValueError(f"select: form={form!r}; use 'auto', 'gather', 'onehot' or 'ragged'.")
    ids = jnp.asarray(ids)
    if ids.ndim not in (1, 2) or not jnp.issubdtype(ids.dtype, jnp.integer) or (form == "gather" and ids.ndim != 1):
        want = "a 1-D" if form == "gather" else "a 1-D or 2-D"
        raise ValueError(
            f"select: ids must be {want} integer array (one adapter id per example"
            f"{'' if form == 'gather' else ', or per token'}), got {ids.dtype}{ids.shape}."
        )
    count = bank.num_adapters
    if not isinstance(ids, jax.core.Tracer):
        host = np.asarray(ids)
        bad = host[(host < -1) | (host >= count)]
        if bad.size:
            raise ValueError(
                f"select: ids {sorted(set(bad.tolist()))} are out of range; use 0..{count - 1} for the bank's adapters "
                f"{list(bank.names)} or -1 for the base model."
            )
    rows = jnp.where(ids < 0, count, ids).astype(jnp.int32)  # the last row of every bank node is the zero adapter
    norm_done: tuple = ()  # DoRA gains one kernel after another (_factored/_base.in_turn)

    def pick(node: Any) -> Any:
        nonlocal norm_done
        if not is_bank_node(node):
            return node
        f = form if form != "auto" or ids.ndim == 1 else "onehot"  # auto, per example: decided at each use
        spec, g = node.spec, None
        if node.magnitude is not None:  # DoRA rows: every adapter's gain, once (lorajax/_dora.py)
            base = dense_base(in_turn(_boxes.unbox(node.base), norm_done))  # one kernel's transient at a time
            spec, g = spec.replace(variant="dora"), bank_gains(base, node.a, node.b, node.magnitude, node.dora, spec)
            norm_done = (jnp.sum(g),)
        if f == "gather":
            a, b = jnp.take(node.a, rows, axis=0), jnp.take(node.b, rows, axis=0)
            m = None if g is None else Gains(jnp.take(g, rows, axis=0))
            return LoRA(base=node.base, a=a, b=b, spec=spec, per_example=True, magnitude=m)
        m = None if g is None else Gains(g)
        return BankedLoRA(node.base, node.a, node.b, spec, per_example=True, magnitude=m, rows=Rows(rows, f))

    return jax.tree.map(pick, bank.params, is_leaf=lambda x: is_bank_node(x) or _boxes.is_box(x))

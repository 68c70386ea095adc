"""summary: trainable and total parameter counts, per target, and a training-memory plan."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lorajax import _boxes, _paths
from lorajax._merge import unlorafy
from lorajax._node import is_lora
from lorajax._train import mask, partition, reject_also
from lorajax._trainable import is_node, is_trainable
from lorajax.quant import dense_shapes, is_quantized


@dataclasses.dataclass(frozen=True)
class TargetRow:
    """One LoRA target of a :class:`Summary`.

    ``params`` counts its factors (and DoRA magnitude): ``adapters · rank · (fan_in + fan_out)`` for plain LoRA,
    where ``adapters`` is the number of independent LoRAs it holds, one per slice of its stacked ``s`` axes (per
    expert of a mixture-of-experts bank, per layer of a scanned stack), 1 for a plain kernel.
    """

    path: str
    shape: tuple[int, ...]
    layout: str
    rank: int
    alpha: float
    scale: float
    params: int
    adapters: int = 1


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a lorafied tree; ``print()`` it for a per-target table.

    Attributes:
        trainable: trainable parameters (LoRA factors plus any :class:`lorajax.Trainable` leaves).
        total: all parameters, frozen base included.
        trainable_bytes: bytes of the trainable parameters.
        total_bytes: bytes of all parameters.
        targets: one :class:`TargetRow` per LoRA node.
        memory: the :class:`MemoryPlan` when ``summary`` was given an ``optimizer``.
        trained_leaves: paths of the :class:`lorajax.Trainable` leaves (``lorafy(..., also=...)``), which
            train whole. ``save_adapter`` carries them with the factors; ``save_peft`` writes them as PEFT's
            ``modules_to_save`` where they make up whole modules, and refuses them otherwise.
    """

    trainable: int
    total: int
    trainable_bytes: int
    total_bytes: int
    targets: tuple[TargetRow, ...]
    memory: MemoryPlan | None = None
    trained_leaves: tuple[str, ...] = ()

    @property
    def trainable_fraction(self) -> float:
        """``trainable / total``."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        head = ("target", "shape", "layout", "adapters", "rank", "alpha", "scale", "params")
        rows = [
            (
                t.path,
                "x".join(map(str, t.shape)),
                t.layout,
                f"{t.adapters:,}",
                str(t.rank),
                f"{t.alpha:g}",
                f"{t.scale:g}",
                f"{t.params:,}",
            )
            for t in self.targets
        ]
        widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
        if any(t.adapters > 1 for t in self.targets):
            lines.append(
                "adapters: independent LoRAs per target, one per slice of its stacked 's' axes (each expert of a "
                "bank, each scanned layer); params = adapters x rank x (fan_in + fan_out), plus DoRA's magnitudes"
            )
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.trainable_fraction:.4f}"
        )
        if self.trained_leaves:
            lines.append(
                f"trained whole (also=): {', '.join(self.trained_leaves)}; saved with the factors by save_adapter, "
                "and by save_peft as modules_to_save (whole modules only)"
            )
        if self.memory is not None:
            lines += ["", str(self.memory)]
        return "\n".join(lines)


def _size(x: Any) -> tuple[int, int]:
    x = _boxes.unbox(x)
    if is_quantized(x):  # its weights, at the bytes its codes and scales take
        return x.size, x.nbytes
    if not hasattr(x, "shape"):
        return 0, 0
    n = math.prod(x.shape)
    return n, n * np.dtype(x.dtype).itemsize


def summary(params: Any, also: Any = None, *, optimizer: Any = None, devices: int = 1) -> Summary:
    """Count trainable and total parameters, per LoRA target.

    Works on concrete arrays and on abstract trees (``jax.eval_shape`` output,
    ``ShapeDtypeStruct``), so a 70B plan costs no memory. With ``optimizer``
    the summary also carries (and prints) a :class:`MemoryPlan`: the training
    state of this LoRA run next to full fine-tuning's, see :func:`memory_plan`.

    Args:
        params: a pytree with :class:`LoRA` nodes.
        also: removed; raises ``TypeError`` (declare extra leaves with ``lorafy(..., also=...)``).
        optimizer: the plain optax optimizer (e.g. ``optax.adamw(1e-4)``, not
            ``lorajax.masked(...)``) to plan training-state memory for.
        devices: devices the state is sharded over, for the per-device line.

    Returns:
        A :class:`Summary`.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.ones((64, 64))}}, rank=4, where=["q"], key=jax.random.key(0))
        >>> s = lorajax.summary(p)
        >>> s.trainable, s.total
        (512, 4608)
    """
    reject_also(also, "summary")
    flags = [not is_quantized(f) and f for f in jax.tree.leaves(mask(params), is_leaf=is_quantized)]
    sizes = [_size(x) for x in jax.tree.leaves(params, is_leaf=is_quantized)]
    rows, trained = [], []
    for path, node in _paths.tree_paths(params, is_leaf=is_node):
        if is_trainable(node):
            trained.append(_paths.path_str(path))
        if is_lora(node):
            n = sum(_size(x)[0] for x in jax.tree.leaves((node.a, node.b, node.magnitude, node.bias)))
            adapters = math.prod(node.shape[k] for k in node.layout.stack)
            row = (_paths.path_str(path), node.shape, node.layout.axes, node.rank, node.alpha, node.scale, n, adapters)
            rows.append(TargetRow(*row))
    return Summary(
        trainable=sum(s[0] for s, f in zip(sizes, flags) if f),
        total=sum(s[0] for s in sizes),
        trainable_bytes=sum(s[1] for s, f in zip(sizes, flags) if f),
        total_bytes=sum(s[1] for s in sizes),
        targets=tuple(rows),
        memory=None if optimizer is None else memory_plan(params, optimizer, devices=devices),
        trained_leaves=tuple(trained),
    )


def _bytes(tree: Any) -> int:
    return sum(_size(x)[1] for x in jax.tree.leaves(tree))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes of one training setup's state (activations not included)."""

    frozen: int
    trainable: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        """Sum of all four parts."""
        return self.frozen + self.trainable + self.gradients + self.optimizer


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Training-state bytes of a LoRA run next to full fine-tuning of the same model.

    ``print()`` it for a table. Activations, and the transient ``d x k``
    weight gradient that the merge path forms per target (the factored path
    never does), are not included: they depend on batch, sequence length and
    rematerialisation, not on the parameters.

    Attributes:
        lora: state of the LoRA run (frozen base and other frozen leaves, the
            factors, their gradients, the optimizer state of the factors).
        full: state of full fine-tuning (every weight trainable, its gradient
            and optimizer state; nothing frozen).
        devices: devices the state is assumed to be evenly sharded over.
    """

    lora: StateBytes
    full: StateBytes
    devices: int = 1

    @property
    def saving(self) -> float:
        """``full.total / lora.total``: how many times less state LoRA keeps."""
        return self.full.total / self.lora.total if self.lora.total else float("inf")

    def __str__(self) -> str:
        parts: list[tuple[str, float, float]] = [
            ("frozen weights", self.lora.frozen, self.full.frozen),
            ("trainable params", self.lora.trainable, self.full.trainable),
            ("gradients", self.lora.gradients, self.full.gradients),
            ("optimizer state", self.lora.optimizer, self.full.optimizer),
            ("total", self.lora.total, self.full.total),
        ]
        if self.devices > 1:
            parts.append(
                (f"per device (/{self.devices})", self.lora.total / self.devices, self.full.total / self.devices)
            )
        head = ("training state", "LoRA", "full fine-tune")
        rows = [(name, _human(lo), _human(fu)) for name, lo, fu in parts]
        widths = [max(len(r[k]) for r in [head, *rows]) for k in range(3)]
        fmt = lambda r: "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
        lines.append(f"LoRA keeps {self.saving:.1f}x less training state (activations not included).")
        lines.append(
            f"An adapter file (save_adapter or save_peft) holds about {_human(self.lora.trainable)} of tensors: every "
            "trainable leaf, LoRA factors and also= leaves alike."
        )
        return "\n".join(lines)


def memory_plan(params: Any, optimizer: Any, *, also: Any = None, devices: int = 1) -> MemoryPlan:
    """Estimate training-state bytes of LoRA next to full fine-tuning, allocating nothing.

    The optimizer state is not guessed: its shapes come from
    ``jax.eval_shape(optimizer.init, trainable)`` on the abstract trainable
    tree, so any optax optimizer (adam's two moments, adafactor's factored
    moments, ``mu_dtype``, a schedule's count) is counted exactly. Gradients are
    counted in the dtype of their parameters.

    * LoRA: frozen = every non-trainable leaf (the base model), trainable = the
      factors (and :class:`lorajax.Trainable` leaves: exactly what an adapter file,
      ``save_adapter``'s or ``save_peft``'s, holds), gradients = one per trainable leaf,
      optimizer = ``optimizer.init`` on the trainable leaves only (what
      :func:`lorajax.masked` keeps).
    * Full fine-tuning: ``lorajax.unlorafy(params)`` all trainable, with its
      gradients and ``optimizer.init`` on all of it.

    Args:
        params: a lorafied pytree, concrete or abstract (``jax.eval_shape`` of
            ``lorafy``; ``ShapeDtypeStruct`` leaves).
        optimizer: the plain ``optax.GradientTransformation`` (not ``lorajax.masked``).
        also: removed; raises ``TypeError`` (declare extra leaves with ``lorafy(..., also=...)``).
        devices: devices the state is evenly sharded over (FSDP/ZeRO-3), for the
            per-device line of the table.

    Returns:
        A :class:`MemoryPlan`; ``print()`` it.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> w = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
        >>> p = lorajax.lorafy({"q": {"kernel": w}}, rank=8, where=["q"], key=jax.random.key(0))
        >>> plan = lorajax.memory_plan(p, optax.adam(1e-4))
        >>> plan.lora.frozen, plan.lora.trainable, plan.lora.optimizer  # bf16 base; f32 A, B; adam mu, nu + count
        (2097152, 65536, 131076)
        >>> plan.full.total  # bf16 weight + bf16 grad + bf16 mu, nu + count
        8388612
    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"memory_plan: devices must be an integer >= 1, got {devices!r}.")
    if not callable(getattr(optimizer, "init", None)):
        raise TypeError(
            f"memory_plan: optimizer must be an optax.GradientTransformation (e.g. optax.adamw(1e-4)), "
            f"got {optimizer!r}."
        )
    reject_also(also, "memory_plan")
    trainable, frozen = partition(params)
    full = dense_shapes(unlorafy(params))  # full fine-tuning trains dense kernels
    lora_opt = jax.eval_shape(optimizer.init, trainable)
    full_opt = jax.eval_shape(optimizer.init, full)
    trainable_bytes, full_bytes = _bytes(trainable), _bytes(full)
    return MemoryPlan(
        lora=StateBytes(_bytes(frozen), trainable_bytes, trainable_bytes, _bytes(lora_opt)),
        full=StateBytes(0, full_bytes, full_bytes, _bytes(full_opt)),
        devices=devices,
    )

"""LoftQ (Li et al. 2023): a quantized base ``Q`` and factors fitted together so that ``Q + scale * a @ b ≈ W``.

Quantizing ``W`` alone leaves the error ``W - Q``. LoftQ alternates: quantize the
part of ``W`` the factors do not hold, ``Q_t = quant(W - A_{t-1} B_{t-1})``
(``A_0 B_0 = 0``), then fit the factors to what the quantizer missed, the best
rank-``r`` approximation of ``W - Q_t`` (truncated SVD). After ``T`` rounds the
node's base is ``Q_T`` (a :class:`lorajax.QuantizedKernel`) and its factors come
from the SVD of ``W - Q_T``, split as PiSSA splits them (``sqrt(S / scale)`` into
each factor), so ``merge`` at init gives ``Q_T + U_r S_r Vh_r``.

This is PEFT's ``loftq_init`` (``init_lora_weights="loftq"``), whose quantizer is
bitsandbytes' NF4 (block 64, no double quantization) or its row-wise int8, with
one difference: PEFT puts ``sqrt(S)`` into each factor whatever the LoRA scale,
so its model starts at ``Q + scale * B @ A``, which is near ``W`` only when
``alpha == r``. Here the scale is divided out, so the start is near ``W`` for any
alpha; ``scale * a @ b`` equals PEFT's ``B @ A`` and the bases are the same.

The alternation runs on the whole kernel in its own layout (one quantization of
the kernel, as :func:`lorajax.quantize` does it, stacked layers included) and the
SVD on its matrix view ``(*stacked, fan_in, fan_out)``, one per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._layout import Layout
from lorajax._node import LoRASpec, lora_delta
from lorajax.inits._matrix import as_matrix, replicated
from lorajax.quant._kernel import QuantizedKernel, dense, is_quantized, quantize_kernel

#: ``loftq`` or ``loftq_iter_<k>`` (k >= 1), then optionally the storage: ``_nodq`` (NF4 without double
#: quantization, PEFT's ``loftq_bits=4``), ``_int8`` (PEFT's ``loftq_bits=8``) or ``_fp8``.
LOFTQ = re.compile(r"loftq(?:_iter_([1-9][0-9]*))?(?:_(nodq|int8|fp8))?")
#: NF4 block size: bitsandbytes' and PEFT's default, ``lorajax.quantize``'s too.
BLOCK = 64


@dataclasses.dataclass(frozen=True)
class LoftQ:
    """What a ``loftq...`` init name says: the rounds and the base's storage format."""

    iters: int
    kind: str
    double_quant: bool
    block_size: int = BLOCK


def parse_loftq(init: Any) -> LoftQ | None:
    """The :class:`LoftQ` settings an init name asks for, or None if it is not a LoftQ name.

    >>> parse_loftq("loftq_iter_5_nodq")
    LoftQ(iters=5, kind='nf4', double_quant=False, block_size=64)
    >>> parse_loftq("loftq"), parse_loftq("loftq_iter_0")
    (LoftQ(iters=1, kind='nf4', double_quant=True, block_size=64), None)
    """
    found = LOFTQ.fullmatch(init) if isinstance(init, str) else None
    if found is None:
        return None
    iters, storage = found.groups()
    kind = storage if storage in ("int8", "fp8") else "nf4"
    return LoftQ(int(iters or 1), kind, double_quant=kind == "nf4" and storage != "nodq")


def loftq_problem(init: Any, base: Any, layout: Layout) -> str | None:
    """Why LoftQ cannot run on ``base`` (one target of ``lorafy``), or None when it can."""
    cfg = parse_loftq(init)
    if cfg is None:
        return None
    if is_quantized(base):
        return (
            f"init={init!r} quantizes the float kernel itself, and this base is already a {type(base).__name__}; "
            "lorafy the float params (PEFT: do not pass a quantized model to LoftQ)"
        )
    per_matrix = int(np.prod([base.shape[k] for k in range(base.ndim) if k not in layout.stack]))
    if cfg.kind == "nf4" and per_matrix < cfg.block_size:
        return (
            f"holds {per_matrix} weights per matrix, fewer than one NF4 block of {cfg.block_size}; LoftQ quantizes "
            "the kernel, which saves nothing here: leave it out of where"
        )
    concrete = isinstance(base, jax.Array | np.ndarray) and not isinstance(base, jax.core.Tracer)
    if concrete and not bool(jnp.isfinite(base).all()):
        return "holds NaN or Inf; quantizing it would spread them over its blocks"
    return None


def _svd_factors(res: jax.Array, layout: Layout, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` with ``scale * a @ b`` the best rank-``rank`` approximation of the float32 kernel ``res``."""
    shape = tuple(res.shape)
    u, s, vh = jnp.linalg.svd(replicated(as_matrix(res, layout)), full_matrices=False)  # batched over stacked axes
    root = jnp.sqrt(s[..., :rank] / scale)
    a = u[..., :rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., :rank, :]
    return a.reshape(layout.a_shape(shape, rank)), b.reshape(layout.b_shape(shape, rank))


def _quantize(x: jax.Array, layout: Layout, cfg: LoftQ) -> QuantizedKernel:
    return quantize_kernel(x, layout, cfg.kind, cfg.block_size, cfg.double_quant)


@functools.partial(jax.jit, static_argnames=("layout", "rank", "cfg"))
def _compiled_rounds(target: jax.Array, rounds: jax.Array, *, layout: Layout, rank: int, cfg: LoftQ) -> QuantizedKernel:
    """``Q_T`` of the float32 kernel ``target``: ``rounds = T - 1`` quantize-then-SVD rounds, then one quantization.

    One compiled program per kernel shape, rank and storage, whatever ``T``: the rounds are a ``fori_loop``.
    """
    unit = LoRASpec(rank=rank, alpha=float(rank), layout=layout)  # scale exactly 1: rounds subtract U_r S_r Vh_r

    def round_(_: Any, res: jax.Array) -> jax.Array:
        a, b = _svd_factors(target - dense(_quantize(res, layout, cfg), jnp.float32), layout, rank, 1.0)
        return target - lora_delta(a, b, unit, jnp.float32)

    return _quantize(jax.lax.fori_loop(0, rounds, round_, target), layout, cfg)


def _rounds(target: jax.Array, *, layout: Layout, rank: int, cfg: LoftQ) -> QuantizedKernel:
    storage = dataclasses.replace(cfg, iters=1)  # the count is an argument, not part of the compiled program
    return _compiled_rounds(target, jnp.int32(cfg.iters - 1), layout=layout, rank=rank, cfg=storage)


@functools.partial(jax.jit, static_argnames=("layout", "rank"))
def _last_svd(target: jax.Array, q: QuantizedKernel, scale: Any, *, layout: Layout, rank: int) -> Any:
    return _svd_factors(target - dense(q, jnp.float32), layout, rank, scale)


def loftq_base(init: str, w: Any, layout: Layout, rank: int) -> Any:
    """``Q_T``: the LoftQ base of kernel ``w`` (``T - 1`` SVDs and ``T`` quantizations, all in float32).

    The factors do not enter ``Q_T`` with their LoRA scale (each round subtracts
    ``U_r S_r Vh_r``), so the base depends on the rank, not on alpha. It is quantized
    from float32 and stands for a kernel of ``w``'s dtype. Abstract kernels give an
    abstract ``QuantizedKernel``.
    """
    cfg = parse_loftq(init)
    assert cfg is not None
    if isinstance(w, jax.ShapeDtypeStruct):
        return jax.eval_shape(lambda x: loftq_base(init, x, layout, rank), w)
    q = _rounds(jnp.asarray(w).astype(jnp.float32), layout=layout, rank=rank, cfg=cfg)
    return dataclasses.replace(q, dtype=np.dtype(w.dtype))


def loftq_factors(init: str, w: Any, layout: Layout, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` in float32: the last round's SVD of ``W - Q_T``, ``scale`` divided out.

    :func:`lorajax.inits.residual_base` recomputes ``Q_T`` for the node's base with the
    same compiled rounds (so ``T - 1`` SVDs run twice; one round, the default, runs none).
    """
    target = jnp.asarray(w).astype(jnp.float32)
    cfg = parse_loftq(init)
    assert cfg is not None
    q = _rounds(target, layout=layout, rank=rank, cfg=cfg)
    return _last_svd(target, q, jnp.float32(scale), layout=layout, rank=rank)

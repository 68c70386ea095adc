"""Blockwise and row-wise quantization of flat float32 arrays, as bitsandbytes computes them.

Every function takes and returns arrays whose leading axes are batch axes (one
row per independently quantized weight, e.g. one per stacked layer) and whose
last axis runs over one weight in PyTorch's row-major ``(out, in, ...)`` order.
All arithmetic is float32 and follows bitsandbytes' operation order (a
reciprocal multiply for full blocks, a division for the partial last block), so
the codes agree bit for bit; see docs/guide/qlora.md for where they may not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lorajax.quant import _codes

#: Smallest absmax bitsandbytes divides by (an all-zero block quantizes to zeros, not NaN).
TINY = 1e-38
#: bitsandbytes' double quantization: the absmaxes are quantized 256 per block.
NESTED_BLOCK = 256
#: int8 dequantization multiplies by this float32 constant (bitsandbytes' 1/127).
INV127 = np.float32(7.874015718698502e-3)
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def num_blocks(n: int, block: int) -> int:
    """How many blocks of ``block`` values cover ``n`` values (the last may be partial)."""
    return -(-n // block)


def ieee_divisor(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x`` broadcast to ``shape`` behind an optimization barrier, to divide by.

    XLA rewrites a division by a broadcast value into a multiplication by its
    rounded reciprocal, which is off by one ulp in about a third of the cases;
    bitsandbytes divides. A divisor of the full shape that XLA cannot see
    through keeps the division correctly rounded, eagerly and under jit.
    """
    return jax.lax.optimization_barrier(jnp.broadcast_to(x, shape))


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array, int]:
    """``x (..., n)`` zero-padded to ``(..., blocks, block)``, its float32 absmax per block, and ``n``."""
    n = x.shape[-1]
    nb = num_blocks(n, block)
    padded = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
    blocks = padded.reshape(*x.shape[:-1], nb, block)
    return blocks, jnp.max(jnp.abs(blocks), axis=-1), n


def _scaled(blocks: jax.Array, absmax: jax.Array, n: int, block: int, divide_all: bool) -> jax.Array:
    """Values over their block's absmax, clamped to [-1, 1], in bitsandbytes' rounding order."""
    am = jnp.maximum(absmax, TINY)[..., None]
    quotient = blocks / ieee_divisor(am, blocks.shape)
    if divide_all:
        return jnp.clip(quotient, -1, 1)
    # Full blocks multiply by a float32 reciprocal; a partial last block divides.
    product = blocks * (jnp.float32(1.0) / am)
    partial = jnp.arange(blocks.shape[-2])[:, None] * block + block > n
    return jnp.clip(jnp.where(partial, quotient, product), -1, 1)


def nf4_quantize(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """``x (..., n)`` -> packed NF4 codes ``(..., ceil(n / 2))`` uint8 and float32 absmax ``(..., blocks)``.

    Two codes per byte, the first in the high nibble; an odd ``n`` is padded with the code of 0.
    """
    blocks, absmax, n = _blocks(x, block)
    scaled = _scaled(blocks, absmax, n, block, divide_all=False).reshape(*x.shape[:-1], -1)[..., :n]
    scaled = jnp.pad(scaled, [(0, 0)] * (x.ndim - 1) + [(0, n % 2)])
    q = _codes.nearest_by_midpoint(scaled, _codes.NF4)
    return (q[..., 0::2] << 4) | q[..., 1::2], absmax


def nf4_unpack(packed: jax.Array, n: int) -> jax.Array:
    """The ``n`` 4-bit code indices held by ``packed (..., ceil(n / 2))``."""
    both = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :n]


def scale_blocks(values: jax.Array, absmax: jax.Array, block: int) -> jax.Array:
    """``values (..., n)`` times their block's ``absmax (..., blocks)``, in float32."""
    n = values.shape[-1]
    nb = absmax.shape[-1]
    padded = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, nb * block - n)])
    out = padded.reshape(*values.shape[:-1], nb, block) * absmax[..., None].astype(jnp.float32)
    return out.reshape(*values.shape[:-1], nb * block)[..., :n]


def nf4_dequantize(packed: jax.Array, absmax: jax.Array, n: int, block: int) -> jax.Array:
    """float32 values of packed NF4 codes: ``code[q] * absmax`` (float32, as bitsandbytes)."""
    values = jnp.asarray(_codes.NF4)[nf4_unpack(packed, n).astype(jnp.int32)]
    return scale_blocks(values, absmax, block)


def _mean(x: jax.Array) -> jax.Array:
    """Mean over the last axis, the same bits eagerly and under jit: a pairwise sum over one IEEE division.

    ``jnp.mean`` leaves the summation order (and the division by a constant) to XLA, which fuses differently
    under jit. The last bit may still differ from PyTorch's cascade sum, whose order depends on the SIMD width.
    """
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    total = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while total.shape[-1] > 1:
        half = total.shape[-1] // 2
        total = total[..., :half] + total[..., half:]
    return total[..., 0] / ieee_divisor(jnp.float32(n), total.shape[:-1])


def dq_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double quantization: ``absmax (..., m)`` -> uint8 codes, float32 nested absmax and the offset (the mean).

    The absmaxes minus their mean are quantized 256 per block to bitsandbytes' dynamic 8-bit map.
    """
    offset = _mean(absmax)
    centered = absmax - offset[..., None]
    blocks, nested, m = _blocks(centered, NESTED_BLOCK)
    scaled = _scaled(blocks, nested, m, NESTED_BLOCK, divide_all=True).reshape(*absmax.shape[:-1], -1)[..., :m]
    return _codes.nearest_by_distance(scaled, _codes.dynamic_map()), nested, offset


def dq_dequantize(codes: jax.Array, nested: jax.Array, offset: jax.Array, code: jax.Array | None = None) -> jax.Array:
    """float32 absmaxes from double-quantized ``codes``: ``code[q] * nested + offset``."""
    table = jnp.asarray(_codes.dynamic_map() if code is None else code, jnp.float32)
    return scale_blocks(table[codes.astype(jnp.int32)], nested, NESTED_BLOCK) + offset[..., None]


def dq_dequantize_rows(codes: jax.Array, nested: jax.Array, offset: jax.Array) -> jax.Array:
    """:func:`dq_dequantize` for absmax codes kept per row, ``(slices, rows, blocks_per_row)``.

    The nested blocks run over the flat absmaxes (across rows), so each code finds its nested absmax by its flat
    index: the same float32 products and sums as the flat form, and no reshape of a row-sharded array.
    """
    rows, per_row = codes.shape[-2:]
    flat = np.arange(rows)[:, None] * per_row + np.arange(per_row)[None, :]
    table = jnp.asarray(_codes.dynamic_map(), jnp.float32)
    return table[codes.astype(jnp.int32)] * nested[..., flat // NESTED_BLOCK] + offset[..., None, None]


def int8_quantize(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise absmax int8 (bitsandbytes' ``int8_vectorwise_quant``): ``round(127 * x / absmax)``, ties to even.

    An all-zero row gets codes 0 (bitsandbytes would divide by zero).
    """
    x = rows.astype(jnp.float32)
    stats = jnp.max(jnp.abs(x), axis=-1)
    # PyTorch computes ``127 / stats`` as ``reciprocal(stats) * 127``: two roundings, kept here.
    q = jnp.round(x * ((jnp.float32(1.0) / stats) * jnp.float32(127.0))[..., None])
    return jnp.where(stats[..., None] > 0, q, 0).astype(jnp.int8), stats


def int8_dequantize(codes: jax.Array, stats: jax.Array) -> jax.Array:
    """``codes * absmax * (1 / 127)`` in float32, in bitsandbytes' operation order."""
    return codes.astype(jnp.float32) * stats[..., None] * INV127


def fp8_quantize(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float8 e4m3 (``float8_e4m3fn``) codes with one float32 scale per row: ``absmax * (1 / 448)``.

    Each row's largest magnitude maps onto e4m3's largest finite value; values round to nearest, ties to even.
    """
    x = rows.astype(jnp.float32)
    # A multiply by the float32 reciprocal of 448 (XLA may turn a division by a constant into one anyway).
    scale = jnp.max(jnp.abs(x), axis=-1) * jnp.float32(1.0 / FP8_MAX)
    safe = jnp.where(scale > 0, scale, 1.0)
    return (x / ieee_divisor(safe[..., None], x.shape)).astype(FP8), scale


def fp8_dequantize(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """``codes * scale`` in float32."""
    return codes.astype(jnp.float32) * scale[..., None]

"""The code tables of bitsandbytes' formats and the nearest-code rounding they use.

NF4 (QLoRA's NormalFloat) has 16 values: quantiles of a standard normal scaled
to [-1, 1], with an exact zero. The dynamic 8-bit map (Dettmers 2015) holds the
double-quantized block scales. Both are rebuilt here from their definitions, in
float32 exactly as bitsandbytes builds them, so the tables agree bit for bit
(tests/test_quant.py checks them against the tables bitsandbytes wrote).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

#: The 16 NF4 values, as QLoRA lists them (``create_normal_map(offset=0.9677083)``), in float32.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    # PyTorch's float32 linspace: the first half counts up from start, the second half down from end, each point
    # one fused multiply-add (one rounding; a float32 product is exact in float64, so float64 then one cast is it).
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = np.float64(start32) + step * i
    down = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """The signed dynamic 8-bit map (7 exponent bits): 256 sorted float32 values in [-1, 1].

    Each decade ``10**-6 .. 10**0`` holds twice as many fraction steps as the one
    below it; the values are the midpoints of evenly spaced boundaries in
    [0.1, 1], scaled by the decade, with both signs, plus 0 and 1.

    >>> m = dynamic_map()
    >>> m.shape, float(m[-1]), float(m[127])
    ((256,), 1.0, 0.0)
    """
    values: list[float] = []
    for i in range(7):
        bounds = _linspace32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = (np.float32(10.0 ** (-6 + i)) * means).astype(np.float32)
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return np.sort(np.array(values, np.float32))


def midpoints(code: np.ndarray) -> np.ndarray:
    """The float32 midpoints between consecutive values of a sorted code table."""
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


def nearest_by_midpoint(scaled: jnp.ndarray, code: np.ndarray) -> jnp.ndarray:
    """Index of the nearest code value; a value exactly on a midpoint takes the lower code (``torch.bucketize``)."""
    return jnp.searchsorted(jnp.asarray(midpoints(code)), scaled, side="left").astype(jnp.uint8)


def nearest_by_distance(scaled: jnp.ndarray, code: np.ndarray) -> jnp.ndarray:
    """Index of the nearest code value by distance; a tie takes the lower code.

    bitsandbytes' CPU 8-bit kernel searches for the code at or below the value,
    then moves up only when the upper neighbour is strictly closer (distances in
    float32), which can differ from midpoint rounding in the last bit.
    """
    table = jnp.asarray(code)
    low = jnp.clip(jnp.searchsorted(table, scaled, side="right") - 1, 0, len(code) - 2)
    up = jnp.abs(scaled - table[low + 1]) < jnp.abs(scaled - table[low])
    return jnp.where(up, low + 1, low).astype(jnp.uint8)

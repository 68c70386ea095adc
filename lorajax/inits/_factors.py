"""Factor initialisations: the random ones (kaiming, gaussian) and those read off the kernel (PiSSA, OLoRA, LoftQ).

PiSSA and OLoRA factor the kernel itself, so they change the frozen base: the
node's ``base`` becomes the *residual* ``W - scale * a @ b`` and the model starts
exactly at ``W``. LoftQ (``lorajax/inits/_loftq.py``) changes it too: the base
becomes a quantized kernel fitted with the factors, and the model starts near
``W``. Each kernel is viewed as the matrix its LoRA update lives in,
``(fan_in, fan_out)`` (see :class:`lorajax.Layout`); a stacked kernel gets one
SVD or QR per layer (vmapped over the stacked axes). PyTorch keeps the same
matrix transposed, ``(out, in)``, so PEFT's ``B @ A`` is our ``(a @ b).T``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._layout import Layout
from lorajax._node import LoRASpec, lora_delta
from lorajax.inits._loftq import loftq_base, loftq_factors, loftq_problem, parse_loftq
from lorajax.inits._matrix import as_matrix, replicated

#: The inits that factor the kernel and leave the residual ``W - scale * a @ b`` as the base.
RESIDUAL = re.compile(r"pissa|pissa_niter_(\d+)|olora")
RANDOM = ("kaiming", "gaussian")
NAMES = (
    "'kaiming', 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora', 'loftq', 'loftq_iter_<k>' (k >= 1; either LoftQ "
    "name optionally ending in '_nodq', '_int8' or '_fp8'), or a callable"
)


def is_residual(init: Any) -> bool:
    """Whether ``init`` (a name, or a :class:`lorajax.LoRASpec`'s ``init``) rewrites the base.

    PiSSA and OLoRA leave the residual ``W - scale * a @ b``, LoftQ a quantized
    kernel fitted with the factors: either way the factors fit only that base.

    >>> is_residual("pissa_niter_4"), is_residual("loftq_iter_2"), is_residual("kaiming")
    (True, True, False)
    """
    return isinstance(init, str) and (RESIDUAL.fullmatch(init) is not None or parse_loftq(init) is not None)


def init_problem(init: Any, base: Any, layout: Layout) -> str | None:
    """Why ``init`` cannot run on this target's ``base`` (``lorafy`` names the path), or None.

    Only LoftQ refuses kernels here (an already quantized base, fewer weights than one
    NF4 block, NaN or Inf); other inits take any float kernel.

    >>> init_problem("loftq", jnp.ones((4, 4)), Layout("io"))[:9]
    'holds 16 '
    """
    return loftq_problem(init, base, layout)


def check_init(init: Any, caller: str = "lorafy") -> None:
    """Raise a ValueError naming the valid inits unless ``init`` is one of them."""
    if callable(init) or init in RANDOM or is_residual(init):
        return
    raise ValueError(f"{caller}: init must be {NAMES}; got {init!r}.")


def _per_layer(fn: Any, m: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``fn(matrix, key) -> (u, v)`` for each layer of ``m`` (``(*stacked, fan_in, fan_out)``)."""
    lead = m.shape[:-2]
    if not lead:
        return fn(m, key)
    count = math.prod(lead)
    u, v = jax.vmap(fn)(m.reshape(count, *m.shape[-2:]), jax.random.split(key, count))
    return u.reshape(*lead, *u.shape[1:]), v.reshape(*lead, *v.shape[1:])


def _pissa(rank: int, scale: float, niter: int | None) -> Any:
    def one(m: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        if niter is None:
            u, s, vh = jnp.linalg.svd(m, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        else:
            u, s, vh = randomized_svd(m, rank, niter, key)
        root = jnp.sqrt(s / scale)  # PEFT's Sr /= scaling, then sqrt(Sr) into each factor
        return u * root, root[:, None] * vh

    return one


def randomized_svd(m: jax.Array, rank: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``rank`` SVD of ``m`` from a random subspace refined by ``niter`` power iterations.

    Halko et al. (2011), as ``torch.svd_lowrank(m, q=rank, niter=niter)`` (what PEFT's
    ``pissa_niter_k`` calls): a ``rank``-column Gaussian sketch, re-orthonormalised
    by QR after every product with ``m`` or ``m.T``.

    >>> m = jnp.outer(jnp.arange(1.0, 5.0), jnp.arange(1.0, 4.0))
    >>> u, s, vh = randomized_svd(m, 1, 2, jax.random.key(0))
    >>> bool(jnp.allclose((u * s) @ vh, m, atol=1e-4))
    True
    """
    q = jnp.linalg.qr(m @ jax.random.normal(key, (m.shape[1], rank), m.dtype))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(m.T @ q)[0]
        q = jnp.linalg.qr(m @ q)[0]
    u, s, vh = jnp.linalg.svd(q.T @ m, full_matrices=False)
    return q @ u, s, vh


def _olora(rank: int) -> Any:
    def one(m: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        # PEFT: Q, R = qr(W) with W = (out, in), our m.T; B = Q[:, :r], A = R[:r].
        q, r = jnp.linalg.qr(m.T)
        return r[:rank].T, q[:, :rank].T

    return one


def kernel_factors(init: str, key: jax.Array, base: Any, layout: Layout, rank: int, scale: float) -> Any:
    """``(a, b)`` in float32 read off ``base`` by PiSSA, ``pissa_niter_<k>``, OLoRA (one SVD/QR per layer) or LoftQ."""
    shape = tuple(base.shape)
    if parse_loftq(init) is not None:
        return loftq_factors(init, base, layout, rank, scale)
    m = replicated(as_matrix(base.astype(jnp.float32), layout))
    found = RESIDUAL.fullmatch(init)
    assert found is not None
    if init == "olora":
        fn = _olora(rank)
    else:
        fn = _pissa(rank, scale, None if found.group(1) is None else int(found.group(1)))
    u, v = _per_layer(fn, m, key)
    return u.reshape(layout.a_shape(shape, rank)), v.reshape(layout.b_shape(shape, rank))


def init_factors(
    init: Any, key: jax.Array, base: Any, layout: Layout, rank: int, dtype: Any, scale: float = 1.0
) -> tuple[Any, Any]:
    """``(a, b)`` of one target for ``lorafy(..., init=...)``.

    ``base`` may be a ``ShapeDtypeStruct`` (abstract factors come back). ``scale`` is
    the node's LoRA scale, which PiSSA divides out of the singular values.

    >>> a, b = init_factors("pissa", jax.random.key(0), jnp.eye(3), Layout("io"), 1, jnp.float32)
    >>> (a @ b).tolist()[0]
    [1.0, 0.0, 0.0]
    """
    shape = tuple(base.shape)
    a_shape, b_shape = layout.a_shape(shape, rank), layout.b_shape(shape, rank)
    if isinstance(base, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a_shape, dtype), jax.ShapeDtypeStruct(b_shape, dtype)
    if callable(init):
        a, b = init(key, base, layout, rank, dtype)
        if a.shape != a_shape or b.shape != b_shape:
            raise ValueError(f"lorafy: init returned a {a.shape}, b {b.shape}; expected a {a_shape}, b {b_shape}.")
        return a, b
    if is_residual(init):
        if not isinstance(base, jax.Array | np.ndarray):
            raise ValueError(
                f"lorafy: init={init!r} reads and rewrites the kernel, and this base of shape {shape} is a "
                f"{type(base).__name__}, not a dense array. Lorafy the float model with init={init!r} and quantize "
                "the residual bases afterwards (PEFT's advice for PiSSA on quantized models)."
            )
        a, b = kernel_factors(init, key, base, layout, rank, scale)
        return a.astype(dtype), b.astype(dtype)
    if layout.kind == "embed":
        # PEFT's embedding init: A zero, B standard normal, so a looked-up row trains from the first step.
        return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
    fan_in, _ = layout.sizes(shape)
    if init == "kaiming":
        # PEFT's default: kaiming_uniform(a=sqrt(5)) over fan-in, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / (fan_in**0.5)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank  # PEFT's init_lora_weights="gaussian": std 1/r.
    else:
        raise ValueError(f"lorafy: init must be {NAMES}; got {init!r}.")
    return a, jnp.zeros(b_shape, dtype)


def residual_base(base: Any, a: Any, b: Any, spec: LoRASpec) -> Any:
    """``base - scale * a @ b``, computed in float32 from the factors as stored and rounded once to base's dtype.

    The same :func:`lorajax._node.lora_delta` that ``merge`` adds back, so merging
    at init returns ``base`` up to one rounding (exactly where the subtraction is exact).

    For LoftQ (``spec.init`` a ``loftq`` name) the base is instead the quantized kernel
    ``Q_T`` the factors were fitted to (:func:`lorajax.inits._loftq.loftq_base`, recomputed
    from ``base``: the same deterministic rounds that :func:`init_factors` ran).

    >>> spec = LoRASpec(rank=1, alpha=1.0, layout=Layout("io"))
    >>> residual_base(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)) / 2, spec).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    if parse_loftq(spec.init) is not None:
        return loftq_base(spec.init, base, spec.layout, spec.rank)
    if isinstance(base, jax.ShapeDtypeStruct):
        return base
    wide = jnp.promote_types(base.dtype, jnp.float32)
    return (base.astype(wide) - lora_delta(a, b, spec, wide)).astype(base.dtype)

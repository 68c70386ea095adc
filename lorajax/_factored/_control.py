"""Rules for control flow: calls (jit, pjit), custom derivatives, remat, scan, cond and while.

Each enters the sub-jaxpr with the kernels still symbolic, so the uses inside are factored too.
A stacked kernel scanned over (``nn.scan`` layers) is sliced factor by factor; kernels carried
through a loop or returned from a branch are formed (they must be plain arrays there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from lorajax._factored._ref import KernelRef, normalize
from lorajax._factored._registry import register_rule


def _open(j: Any) -> tuple[Any, list]:
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def _split(vals: list) -> tuple[dict[int, KernelRef], list]:
    """The kernels of ``vals`` by position, and the plain values in order."""
    return {k: v for k, v in enumerate(vals) if isinstance(v, KernelRef)}, [
        v for v in vals if not isinstance(v, KernelRef)
    ]


def _join(refs: dict[int, KernelRef], plain: Any, n: int) -> list:
    it = iter(plain)
    return [refs[k] if k in refs else next(it) for k in range(n)]


@register_rule("pjit", "jit", "closed_call", "core_call")
def call(interp: Any, eqn: Any, invals: list) -> list:
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return interp.eval(*_open(closed), invals)


@register_rule("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
def custom_derivative(interp: Any, eqn: Any, invals: list) -> list:
    # The kernel flows into a custom-derivative function: run its primal body factored (the body's
    # own autodiff replaces the custom rule for this call; results are exact).
    return interp.eval(*_open(eqn.params["call_jaxpr"]), invals)


@register_rule("remat2", "checkpoint", "remat")
def remat(interp: Any, eqn: Any, invals: list) -> list:
    p = eqn.params
    refs, plain = _split(invals)
    jaxpr, consts = _open(p["jaxpr"])

    def body(plain_in: list, refs_in: dict) -> list:
        return interp.eval(jaxpr, consts, _join(refs_in, plain_in, len(invals)), arrays_out=True, where="remat output")

    return jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(plain, refs)


@register_rule("scan")
def scan(interp: Any, eqn: Any, invals: list) -> list:
    p = eqn.params
    nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
    consts = invals[:nc]
    init = interp.arrays(invals[nc : nc + ncar], "scan carry")
    xs: list[Any] = []
    sliced: dict[int, tuple[KernelRef, Callable]] = {}
    for k, v in enumerate(invals[nc + ncar :]):
        if isinstance(v, KernelRef) and v.labels and v.labels[0][0] == "s":
            v = normalize(v)
            a, b = v.a, v.b
            if v.info.per_example:  # stacked axis sits behind the per-example axis
                a, b = jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)
            keys = None if v.key is None else jax.random.split(v.key, length)
            base_xs, one_layer = v.base.layers()
            xs.append((base_xs, a, b, keys))
            sliced[k] = (v, one_layer)
        elif isinstance(v, KernelRef):
            xs.append(interp.fallback(v, "scan xs (not sliced along a stacked axis)"))
        else:
            xs.append(v)
    closed = p["jaxpr"]

    def body(carry: list, x: list) -> tuple[list, list]:
        vals = []
        for k, v in enumerate(x):
            if k in sliced:
                ref, one_layer = sliced[k]
                base, a, b, key = v
                labels = tuple((g, j - 1) if g == "s" else (g, j) for g, j in ref.labels[1:])
                vals.append(ref.replace(base=one_layer(base), a=a, b=b, key=key, labels=labels))
            else:
                vals.append(v)
        outs = interp.eval(closed.jaxpr, closed.consts, consts + list(carry) + vals, arrays_out=True, where="scan")
        return outs[:ncar], outs[ncar:]

    carry, ys = lax.scan(body, init, xs, length=length, reverse=p["reverse"], unroll=p["unroll"])
    return list(carry) + list(ys)


@register_rule("cond")
def cond(interp: Any, eqn: Any, invals: list) -> list:
    index, ops = invals[0], invals[1:]
    refs, plain = _split(ops)

    def branch(closed: Any) -> Callable:
        def run(*plain_in: Any) -> list:
            return interp.eval(
                closed.jaxpr, closed.consts, _join(refs, plain_in, len(ops)), arrays_out=True, where="cond"
            )

        return run

    return list(lax.switch(index, [branch(b) for b in eqn.params["branches"]], *plain))


@register_rule("while")
def while_(interp: Any, eqn: Any, invals: list) -> list:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:cn], invals[cn : cn + bn]
    init = interp.arrays(invals[cn + bn :], "while carry")
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fun(c: Any) -> Any:
        return interp.eval(cj.jaxpr, cj.consts, list(cconsts) + list(c), arrays_out=True, where="while")[0]

    def body_fun(c: Any) -> Any:
        return tuple(interp.eval(bj.jaxpr, bj.consts, list(bconsts) + list(c), arrays_out=True, where="while"))

    return list(lax.while_loop(cond_fun, body_fun, tuple(init)))

"""The factored interpreter: evaluate a jaxpr in which LoRA kernels are symbolic KernelRefs.

Equations that touch no kernel are bound as they are. An equation with a kernel input goes to
the rule registered for its primitive (:mod:`lorajax._factored._registry`); where there is none,
or the rule declines, the kernel is formed for that one use (:meth:`Interpreter.fallback`).
Before a jaxpr runs, the sibling-fusion pre-pass (:mod:`lorajax._factored._fusion`) groups the
``dot_general``\\ s that share an activation.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

# Imported for their rule registrations.
from lorajax._factored import _consumers, _control, _experts, _shard_map, _views  # noqa: F401
from lorajax._factored._fusion import fuse_siblings, sibling_groups
from lorajax._factored._ref import KernelRef, materialize
from lorajax._factored._registry import rule_for


class FallbackWarning(UserWarning):
    """A LoRA kernel reached an operation that lorajax.factored cannot factor; W was formed for that use.

    Emitted once per (primitive, parameter path) per trace.
    """


class Interpreter:
    """State of one factored evaluation (one trace): options, dropout draws, warnings, fused products."""

    def __init__(self, *, strict: bool, fuse: bool, flatten: bool, rate: float, active: bool):
        self.strict = strict
        self.fuse = fuse
        self.flatten = flatten
        self.rate = rate
        self.active = active
        self.uses = 0
        self.warned: set[tuple[str, str]] = set()
        # First products ``x @ A`` that sibling fusion computed ahead, keyed by the consuming dot's output var.
        self.first_products: dict[Any, jax.Array] = {}

    def fallback(self, ref: KernelRef, where: str) -> jax.Array:
        """The kernel formed for one use it reaches at ``where`` (or the error that forbids it)."""
        msg = (
            f"lorajax.factored: the LoRA kernel {ref.info.path!r} (view shape {ref.shape}) reaches `{where}`, "
            "which cannot be factored"
        ) + _experts.way_out(ref, where)
        if ref.info.per_example:
            raise ValueError(
                msg + ". It holds per-example factors (from lorajax.select), so no single W exists; only dot_general "
                "and embedding gathers (with the examples on the activations' leading axis) can run it."
            )
        if self.strict:
            raise ValueError(msg + "; strict=True forbids forming W. Pass strict=False to allow it for this use.")
        if (where, ref.info.path) not in self.warned:
            self.warned.add((where, ref.info.path))
            warnings.warn(FallbackWarning(msg + "; W = base + scale*A@B is formed for this one use."), stacklevel=2)
        return materialize(ref)

    def dropout(self, ref: KernelRef, x: jax.Array) -> jax.Array:
        """``x`` with LoRA dropout applied (a fresh mask per use), or ``x`` when dropout is off."""
        if not self.active or ref.key is None:
            return x
        self.uses += 1
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(jax.random.fold_in(ref.key, self.uses), keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    def arrays(self, vals: list, where: str) -> list:
        """``vals`` with every kernel formed (for a use that needs plain arrays)."""
        return [self.fallback(v, where) if isinstance(v, KernelRef) else v for v in vals]

    def eval(self, jaxpr: Any, consts: list, args: list, *, arrays_out: bool = False, where: str = "") -> list:
        """Evaluate ``jaxpr``; outputs stay KernelRefs unless ``arrays_out``."""
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        def write(v: Any, val: Any) -> None:
            if not isinstance(v, jcore.DropVar):
                env[v] = val

        for v, val in zip(jaxpr.constvars, consts):
            write(v, val)
        for v, val in zip(jaxpr.invars, args):
            write(v, val)
        # Dropout draws a mask per target, so fused first products would share one: no fusion then.
        groups = sibling_groups(jaxpr) if self.fuse and self.flatten and not self.active else {}
        for idx, eqn in enumerate(jaxpr.eqns):
            invals = [read(v) for v in eqn.invars]
            if any(isinstance(v, KernelRef) for v in invals):
                for side, members in groups.get(idx, ()):
                    fuse_siblings(self, side, [jaxpr.eqns[j] for j in members], env)
                outs = self.apply_rule(eqn, invals)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
            for v, val in zip(eqn.outvars, outs):
                write(v, val)
        outs = [read(v) for v in jaxpr.outvars]
        return self.arrays(outs, where or "output") if arrays_out else outs

    def apply_rule(self, eqn: Any, invals: list) -> list:
        """Run ``eqn`` by its registered rule, or form the kernels it reads when there is none or it declines."""
        name = eqn.primitive.name
        rule = rule_for(name)
        outs = rule(self, eqn, invals) if rule is not None else None
        if outs is not None:
            return outs
        vals = self.arrays(invals, name)
        out = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
        return out if eqn.primitive.multiple_results else [out]

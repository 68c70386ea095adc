"""Sibling fusion, a pre-pass over a jaxpr: targets that read the same activation share one matmul.

Attention's q, k and v (or an MLP's gate and up) each start with ``x @ A``. When their
``dot_general``\\ s read the same activation with the same dimension numbers, the first
products are one rank-``(r1 + r2 + ...)`` matmul ``x @ [A1 | A2 | ...]``, which is faster than
several thin ones. :func:`sibling_groups` finds the candidate groups from the jaxpr's structure
before it runs; when the interpreter reaches a group's first equation, :func:`fuse_siblings`
computes the fused product for the members whose kernel operand is a LoRA kernel by then and
leaves each member's slice for the ``dot_general`` rule to pick up.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.extend import core as jcore

from lorajax._factored._dora import lora_part
from lorajax._factored._products import DotPlan, first_matmul
from lorajax._factored._ref import KernelRef


def _params_key(params: dict) -> Any:
    try:
        return tuple(sorted((k, v) for k, v in params.items()))
    except TypeError:  # unhashable or unorderable params: such dots are not fused
        return None


def sibling_groups(jaxpr: Any) -> dict[int, list[tuple[int, list[int]]]]:
    """``{first equation index: [(side, [indices of the group]), ...]}`` for dot_generals sharing an operand.

    The shared operand (on the same side, with equal parameters) is the candidate activation; the
    other operand the candidate kernel. Which of them really is a LoRA kernel is only known when
    the jaxpr runs, so the groups are candidates.

    >>> import jax, jax.numpy as jnp
    >>> j = jax.make_jaxpr(lambda x, a, b: (x @ a, x @ b, a @ b))(jnp.ones((2, 3)), jnp.ones((3, 3)), jnp.ones((3, 3)))
    >>> sibling_groups(j.jaxpr)  # x on the left of dots 0 and 1; b on the right of dots 1 and 2
    {0: [(0, [0, 1])], 1: [(1, [1, 2])]}
    """
    seen: dict[Any, list[int]] = {}
    for idx, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "dot_general":
            continue
        pkey = _params_key(eqn.params)
        if pkey is None:
            continue
        for side in (0, 1):
            shared, other = eqn.invars[side], eqn.invars[1 - side]
            if isinstance(shared, jcore.Var) and isinstance(other, jcore.Var):
                seen.setdefault((shared, side, pkey), []).append(idx)
    groups: dict[int, list[tuple[int, list[int]]]] = {}
    for (_, side, _), members in seen.items():
        if len(members) > 1:
            groups.setdefault(members[0], []).append((side, members))
    return groups


def fuse_siblings(interp: Any, side: int, eqns: list, env: dict) -> None:
    """Compute the fused first products of the group ``eqns`` (sharing operand ``side``) into the interpreter."""
    lead = eqns[0]
    x, k_side = env.get(lead.invars[side]), 1 - side
    if x is None or isinstance(x, KernelRef) or x.ndim < 1:
        return
    members: list[tuple[Any, DotPlan, KernelRef]] = []
    for eqn in eqns:
        ref = env.get(eqn.invars[k_side])
        if not isinstance(ref, KernelRef):
            continue
        ref = lora_part(ref)  # a DoRA member's first product is its LoRA term's, at rank r
        plan = DotPlan(ref, k_side, eqn.params["dimension_numbers"], x.ndim)
        if plan.ok and plan.first == "a":
            members.append((eqn, plan, ref))
    if len(members) < 2:
        return
    f1s = [plan.first_2d(ref, x.dtype) for _, plan, ref in members]
    t_all = first_matmul(members[0][1].x_2d(x), jnp.concatenate(f1s, axis=1), lead.params)
    start = 0
    for (eqn, _, ref), f in zip(members, f1s):
        t = t_all[:, start : start + f.shape[1]] * jnp.asarray(ref.info.scale, t_all.dtype)
        interp.first_products[eqn.outvars[0]] = t
        start += f.shape[1]

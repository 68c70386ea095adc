"""EVA (Paischer et al. 2024): A from the principal directions of each target's inputs, ranks by explained variance.

The user's function runs on a few batches under a small jaxpr interpreter that sees
every ``dot_general`` whose operand is a target kernel and accumulates, per target,
the count, sum and Gram matrix of its inputs (one ``fan_in²`` buffer per target, in
float32, on device). The PCA of those running statistics is exact for the batches
seen (PEFT's incremental PCA approximates the same). Ranks are then redistributed
across targets by explained variance as PEFT's ``get_eva_state_dict`` does.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lorajax import _boxes, _lorafy  # _lorafy as a module: docs/architecture.md, "Import order"
from lorajax._config import check_config, target_config
from lorajax._layout import Layout, LayoutArg, factor_names
from lorajax._node import LoRA, LoRASpec, is_lora
from lorajax._paths import path_str, rebuild, tree_paths
from lorajax._problems import Problems
from lorajax._trainable import is_node

CALLER = "eva_init"
_LOOPS = ("scan", "while", "cond", "map", "custom_linear_solve")
_SUBJAXPR = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub(eqn: Any) -> Any:
    if eqn.primitive.name in _LOOPS:
        return None
    for key in _SUBJAXPR:
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, sub.consts
        if isinstance(sub, jcore.Jaxpr):
            return sub, ()
    return None


def _input_matrix(x: jax.Array, kernel_axes: Any, x_axes: Any, layout: Layout) -> jax.Array | None:
    """``x`` as ``(rows, fan_in)``, its contracted axes in the kernel's fan-in order; None if it is not that use."""
    if sorted(kernel_axes) != list(layout.fan_in):
        return None
    pairs = sorted(zip(kernel_axes, x_axes))
    rest = [d for d in range(x.ndim) if d not in x_axes]
    fan_in = int(np.prod([x.shape[d] for _, d in pairs]))
    return jnp.transpose(x, rest + [d for _, d in pairs]).reshape(-1, fan_in)


class _Recorder:
    def __init__(self, layouts: dict[str, Layout]):
        self.layouts = layouts
        self.stats: dict[str, list[jax.Array]] = {}
        self.problems: list[str] = []

    def add(self, name: str, xm: jax.Array) -> None:
        xm = xm.astype(jnp.float32)
        gram = jnp.einsum("ni,nj->ij", xm, xm, precision=jax.lax.Precision.HIGHEST)
        new = [jnp.asarray(xm.shape[0], jnp.float32), xm.sum(0), gram]
        old = self.stats.get(name)
        self.stats[name] = new if old is None else [o + n for o, n in zip(old, new)]

    def run(self, jaxpr: Any, consts: Any, args: Any, tags: dict[Any, Any]) -> list[Any]:
        """Evaluate ``jaxpr``; ``tags`` maps a variable to ``(target, kernel axis of each of its axes)``."""
        env: dict[Any, Any] = {}
        tag = dict(tags)

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            names = [None if isinstance(v, jcore.Literal) else tag.get(v) for v in eqn.invars]
            sub = _sub(eqn) if any(names) else None
            if sub is not None:
                inner, inner_consts = sub
                inner_tags = {v: n for v, n in zip(inner.invars, names) if n}  # the same kernel inside the call
                outs = self.run(inner, inner_consts, vals, inner_tags)
            else:
                self._look(eqn, vals, names, tag)
                outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def _look(self, eqn: Any, vals: list[Any], names: list[Any], tag: dict[Any, Any]) -> None:
        prim = eqn.primitive.name
        if prim == "convert_element_type" and names[0]:
            tag[eqn.outvars[0]] = names[0]  # the kernel cast to the compute dtype is still the kernel
            return
        if prim == "transpose" and names[0]:
            name, axes = names[0]
            tag[eqn.outvars[0]] = (name, tuple(axes[p] for p in eqn.params["permutation"]))  # W.T is still W
            return
        if prim == "dot_general" and any(names):
            k = 0 if names[0] else 1
            name, axes = names[k]
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            kc, xc = (lc, rc) if k == 0 else (rc, lc)
            kc = tuple(axes[d] for d in kc)
            xm = None if (lb or rb) else _input_matrix(vals[1 - k], kc, xc, self.layouts[name])
            if xm is None:
                self.problems.append(f"{name}: used by a dot_general that does not contract its fan-in axes")
            else:
                self.add(name, xm)
            return
        if any(names) and prim not in ("pjit", "jit"):
            used = next(n for n in names if n)[0]
            loop = " (a loop: lax.scan/while/cond is not looked into)" if prim in _LOOPS else ""
            self.problems.append(f"{used}: consumed by {prim}{loop}; EVA reads the inputs of a dot_general")


def _recorder(fn: Callable[..., Any], params: Any, targets: dict[str, Layout], problems: Problems) -> Any:
    """A jitted ``(leaves, batch) -> {target: [count, sum, gram]}``; tracing problems go to ``problems``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    index = {path_str(p): k for k, (p, _) in enumerate(flat)}

    def run(leaves: list[Any], batch: Any) -> Any:
        closed = jax.make_jaxpr(lambda lv, b: fn(jax.tree_util.tree_unflatten(treedef, lv), b))(leaves, batch)
        tags = {closed.jaxpr.invars[index[name]]: (name, tuple(range(layout.ndim))) for name, layout in targets.items()}
        rec = _Recorder(targets)
        rec.run(closed.jaxpr, closed.consts, [*leaves, *jax.tree.leaves(batch)], tags)
        problems.extend(rec.problems)
        flagged = " ".join(rec.problems)
        for name in targets:
            if name not in rec.stats and name + ":" not in flagged:
                problems.add(f"{name}: fn never multiplied it (is it a parameter fn reads from params?)")
        return rec.stats

    return [x for _, x in flat], jax.jit(run)


def pca(stat: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(components, explained_variance_ratio, singular_values)`` of the centred inputs, largest first."""
    n, s, gram = float(stat[0]), np.asarray(stat[1], np.float64), np.asarray(stat[2], np.float64)
    cov = (gram - np.outer(s, s) / n) / max(n - 1.0, 1.0)
    vals, vecs = np.linalg.eigh(cov)
    vals, vecs = np.clip(vals[::-1], 0.0, None), vecs[:, ::-1]
    total = vals.sum()
    return vecs.T, vals / (total if total > 0 else 1.0), np.sqrt(vals * max(n - 1.0, 1.0))


def rank_distribution(ratios: Mapping[str, np.ndarray], budget: int) -> dict[str, int]:
    """PEFT's redistribution: the ``budget`` largest explained-variance ratios over all targets, counted per target.

    ``ratios[name]`` holds each target's ratios up to its ``round(rank * rho)`` components.

    >>> rank_distribution({"a": np.array([0.6, 0.3]), "b": np.array([0.5, 0.1])}, 2)
    {'a': 1, 'b': 1}
    """
    keys = [k for k, v in ratios.items() for _ in v]
    values = np.concatenate([np.asarray(v, np.float64) for v in ratios.values()])
    order = np.argsort(-values, kind="stable")
    counts = Counter(keys[i] for i in order[:budget])
    return {k: counts.get(k, 0) for k in ratios}


def eva_init(
    fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    *,
    rank: int,
    where: Any,
    alpha: float | None = None,
    rslora: bool = False,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    adjust_scaling_factors: bool = True,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layout: LayoutArg = None,
    dtype: Any = jnp.float32,
) -> Any:
    """Lorafy ``params`` with EVA: ``a`` from the principal directions of each target's inputs, ``b`` zero.

    ``fn(params, batch)`` is run on the batches (any pytrees of arrays, one shape) under a small jaxpr
    interpreter that records, at every ``dot_general`` with a target kernel, the kernel's input as
    ``(rows, fan_in)`` rows; it keeps the running count, sum and Gram matrix per target, so the PCA of
    the centred inputs is exact for the batches seen. Each target's top ``round(rank * rho)``
    components compete for the budget ``sum(rank)`` by explained-variance ratio (PEFT's
    redistribution); a target's ``a`` holds its top ``k`` components (its rows the principal
    directions), and a target that wins none is left a plain kernel. Batches stop once every
    target's needed components changed by less than ``tau`` (cosine similarity) from one batch to
    the next; a ``UserWarning`` says when the batches ran out first.

    Like PEFT (Linear layers only), EVA needs kernels that are multiplied by their inputs:
    Dense, DenseGeneral and PyTorch-style weights; embeddings, convolutions and kernels used
    inside ``lax.scan`` are reported in one error.

    Args:
        fn: ``(params, batch) -> anything``: the model's forward pass.
        params: the base params (as for :func:`lorajax.lorafy`).
        batches: an iterable of batches.
        rank: the rank budget per target (``rank_pattern`` overrides per target).
        where: which kernels, as for :func:`lorajax.lorafy`.
        alpha: LoRA alpha (``None``: each target's rank), as for :func:`lorajax.lorafy`.
        rslora: scale by ``alpha / sqrt(rank)``.
        rho: each target may take up to ``round(rank * rho)`` components (PEFT's ``rho``; 1 keeps the ranks).
        tau: cosine-similarity threshold for convergence (PEFT's ``tau``).
        whiten: divide each component by the square root of its singular value (PEFT's ``whiten``).
        adjust_scaling_factors: scale alpha with the new rank, ``alpha * k / rank``, so ``alpha / rank``
            is unchanged (PEFT's default).
        rank_pattern: ``{name or regex: rank}`` per-target budgets, as for :func:`lorajax.lorafy`.
        alpha_pattern: ``{name or regex: alpha}`` per-target overrides.
        layout: kernel layouts where names and shapes do not settle them, as for :func:`lorajax.lorafy`.
        dtype: the factors' dtype.

    Returns:
        Lorafied params (``spec.init`` is ``"default"``: the base is untouched).

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
        >>> batches = [jax.random.normal(jax.random.key(k), (32, 6)) for k in range(4)]
        >>> lora = lorajax.eva_init(lambda p, x: x @ p["fc"]["kernel"], params, batches, rank=2, where=["fc"], tau=0.0)
        >>> lora["fc"]["kernel"].a.shape, float(jnp.abs(lora["fc"]["kernel"].b).max())
        ((6, 2), 0.0)
    """
    check_config(CALLER, rank=rank, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    probe = _lorafy.lorafy(params, rank=1, where=where, layout=layout, alpha=alpha, rslora=rslora, dtype=dtype)
    leaves = tree_paths(probe, is_leaf=is_node)
    nodes = {path_str(p): (n, x) for n, (p, x) in enumerate(leaves) if is_lora(x)}
    layouts = {name: x.layout for name, (_, x) in nodes.items()}
    ranks, caps = {}, {}
    for name, (n, x) in nodes.items():
        path = leaves[n][0]
        r, _ = target_config(path, rank, alpha, rank_pattern, alpha_pattern)
        ranks[name] = r
        caps[name] = min(round(r * rho), x.layout.sizes(x.shape)[0])
    budget = sum(ranks.values())
    problems = Problems(CALLER)
    flat, record = _recorder(fn, params, layouts, problems)
    stats: dict[str, Any] = {}
    previous: dict[str, Any] = {}
    dist, converged, seen = dict(caps), False, 0
    for batch in batches:
        got = record(flat, batch)
        problems.raise_if_any("cannot record the inputs of every target", "Leave those targets out of where.")
        stats = got if not stats else {k: [a + b for a, b in zip(stats[k], got[k])] for k in stats}
        seen += 1
        current = {k: pca(v) for k, v in stats.items()}
        dist = rank_distribution({k: c[1][: caps[k]] for k, c in current.items()}, budget)
        if previous:
            sims = {k: np.abs(np.sum(current[k][0][: dist[k]] * previous[k][0][: dist[k]], axis=1)) for k in current}
            converged = all(bool((s >= tau).all()) for s in sims.values())
        previous = current
        if converged:
            break
    if not seen:
        raise ValueError(f"{CALLER}: batches is empty; pass at least two batches.")
    if not converged:
        warnings.warn(
            f"{CALLER}: the principal directions did not converge to tau={tau} within {seen} batches; "
            "the ranks and directions come from the batches seen. Pass more batches or a lower tau.",
            UserWarning,
            stacklevel=2,
        )
    chosen: dict[int, Any] = {}
    for name, (n, x) in nodes.items():
        k = dist[name]
        if k == 0:
            chosen[n] = x.base  # PEFT drops the layer's adapter: the kernel stays plain
            continue
        comps, _, singular = previous[name]
        rows = comps[:k] / (np.sqrt(singular[:k])[:, None] if whiten else 1.0)
        a = jnp.asarray(rows.T, dtype).reshape(x.layout.a_shape(x.shape, k))
        b = jnp.zeros(x.layout.b_shape(x.shape, k), dtype)
        path = leaves[n][0]
        _, a_alpha = target_config(path, ranks[name], alpha, None, alpha_pattern)
        if adjust_scaling_factors:
            a_alpha *= k / ranks[name]
        spec = LoRASpec(rank=k, alpha=a_alpha, layout=x.layout, rslora=rslora)
        names_a, names_b = factor_names(x.base, x.layout)
        chosen[n] = LoRA(x.base, _boxes.rebox(x.base, a, names_a), _boxes.rebox(x.base, b, names_b), spec)
    return rebuild(probe, leaves, chosen, is_node)

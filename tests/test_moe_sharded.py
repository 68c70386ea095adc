"""Expert parallelism: LoRA on expert banks sharded over a mesh axis, the MoE block inside ``jax.shard_map``.

Forcing 4 host devices must happen before JAX starts, so the mesh cases run once, in a subprocess that runs this
file as a script (one XLA start-up); it prints one JSON document on its last stdout line and the tests assert on
it. Run it by hand to debug: ``PYTHONPATH=. python tests/test_moe_sharded.py``.

The block is expert parallelism as real code writes it: tokens sharded over the ``expert`` axis, routed top-k,
sent to the devices that own their experts by an ``all_to_all``, run through the local experts by a dense einsum
(an ``(E, d, f)`` bank adapted per expert, layout ``sio``), sent back by a second ``all_to_all`` and combined;
a shared expert (DeepSeek) enters the body replicated, so JAX casts it with ``pvary``. ``factored(strict=True)``
must equal the merge path, gradients of every factor included, without a FallbackWarning, and never gather an
expert or form an array of an expert bank's size other than the frozen base.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # only as a script: the test run imports this module with its own single device
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses
import json
import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from _jaxprs import computed_shapes
from _workers import run_worker
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

HERE = os.path.dirname(os.path.abspath(__file__))
E, D, F, T, K, RANK = 8, 8, 12, 32, 2, 3  # experts, model width, expert width, tokens, top-k, LoRA rank
# float32 against float32 (the merged kernel's sums against the rank products'), relative to the largest entry:
# the longest chain here is a few dozen products of length <= F, so a few hundred roundings of 6e-8 at most.
REL_TOL = 2e-5


# ----------------------------------------------------------------------------------------------
# The worker (runs as a script with 4 devices).


def _params(key, mesh, specs, *, down_stored_transposed=False):
    ks = jax.random.split(key, 6)
    down_shape = (E, D, F) if down_stored_transposed else (E, F, D)
    raw = {
        "router": {"kernel": jax.random.normal(ks[0], (D, E)) / D**0.5},
        "shared": {"kernel": jax.random.normal(ks[1], (D, D)) / D**0.5},
        "experts": {
            "up": {"kernel": jax.random.normal(ks[2], (E, D, F)) / D**0.5},
            "down": {"kernel": jax.random.normal(ks[3], down_shape) / F**0.5},
        },
    }
    placed = jax.device_put(raw, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    layout = {"experts/up/kernel": "sio", "experts/down/kernel": "soi" if down_stored_transposed else "sio"}
    layout["shared/kernel"] = "io"
    lp = lorajax.lorafy(placed, rank=RANK, where=["up", "down", "shared"], layout=layout, key=ks[4])

    def nonzero_b(node):  # B starts at zero; make the LoRA term count
        noise = 0.3 * jax.random.normal(ks[5], node.b.shape, node.b.dtype)
        return dataclasses.replace(node, b=jax.device_put(node.b + noise, node.b.sharding))

    return jax.tree.map(lambda x: nonzero_b(x) if isinstance(x, lorajax.LoRA) else x, lp, is_leaf=lorajax.is_lora)


def _ep_block(mesh, *, tp=None, transposed_down=False):
    """Top-K MoE with experts sharded over ``expert`` (and their widths over ``tp`` when given)."""

    def block(p, x):
        up, down = p["experts"]["up"]["kernel"], p["experts"]["down"]["kernel"]
        if transposed_down:  # stored (E, D, F), used (E, F, D): the kernel enters the body viewed
            down = jnp.swapaxes(down, 1, 2)

        def body(up, down, shared, router, x):
            gates, idx = jax.lax.top_k(jax.nn.softmax(x @ router), K)  # local tokens (t, d)
            combine = jnp.einsum("tk,tke->te", gates, jax.nn.one_hot(idx, E, dtype=x.dtype))
            xe = jnp.einsum("te,td->etd", (combine > 0).astype(x.dtype), x)  # every expert's tokens, masked
            xe = jax.lax.all_to_all(xe, "expert", 0, 1, tiled=True)  # (E/n, n*t, d): my experts, all tokens
            h = jax.nn.gelu(jnp.einsum("etd,edf->etf", xe, up))
            ye = jnp.einsum("etf,efd->etd", h, down)
            if tp is not None:
                ye = jax.lax.psum(ye, tp)  # down contracts the tp-sharded width
            ye = jax.lax.all_to_all(ye, "expert", 1, 0, tiled=True)  # back: (E, t, d)
            return jnp.einsum("etd,te->td", ye, combine) + x @ shared

        w = P("expert", None, tp)
        specs = (w, P("expert", tp, None), P(), P(), P("expert"))
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("expert"))(
            up, down, p["shared"]["kernel"], p["router"]["kernel"], x
        )

    return block


def _ragged_block(mesh):
    """Top-1 MoE, tokens replicated, each device's experts run by ``ragged_dot`` over tokens sorted by expert."""
    n = mesh.shape["expert"]
    local = E // n

    def block(p, x):
        def body(up, down, router, x):
            gate, idx = jax.lax.top_k(jax.nn.softmax(x @ router), 1)
            first = jax.lax.axis_index("expert") * local
            mine = (idx[:, 0] >= first) & (idx[:, 0] < first + local)
            key = jnp.where(mine, idx[:, 0] - first, local)  # other devices' tokens sort last
            order = jnp.argsort(key)
            sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)
            xs = x[order]
            h = jax.nn.gelu(jax.lax.ragged_dot(xs, up, sizes))
            ys = jax.lax.ragged_dot(h, down, sizes) * mine[order][:, None]
            y = jnp.zeros_like(x).at[order].set(ys) * gate
            return jax.lax.psum(y, "expert")

        up, down = p["experts"]["up"]["kernel"], p["experts"]["down"]["kernel"]
        specs = (P("expert"), P("expert"), P(), P())
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())(up, down, p["router"]["kernel"], x)

    return block


def _factors(tree):
    nodes = jax.tree.leaves(tree, is_leaf=lorajax.is_lora)
    return [f for node in nodes if lorajax.is_lora(node) for f in (node.a, node.b)]


def _rel(u, v):
    scale = max(float(jnp.abs(v).max()), 1e-30)
    return float(jnp.abs(u - v).max()) / scale


def _gathers(hlo):
    return [line.strip()[:160] for line in hlo.splitlines() if re.search(r"\sall-gather(-start)?\(", line)]


def _local(shape, spec, mesh):
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    sizes = [mesh.shape[e] if isinstance(e, str) else 1 for e in entries]
    return tuple(n // k for n, k in zip(shape, sizes))


def _placement(mesh, specs):
    """The shardings ``lorafy`` gives the factors of expert banks placed by ``specs``."""
    lp = _params(jax.random.key(0), mesh, specs)
    nodes = lp["experts"]["up"]["kernel"], lp["experts"]["down"]["kernel"]
    return {name: [str(n.a.sharding.spec), str(n.b.sharding.spec)] for name, n in zip(("up", "down"), nodes)}


def _case(mesh, specs, block, *, transposed_down=False, unplaced=False):
    lp = _params(jax.random.key(0), mesh, specs, down_stored_transposed=transposed_down)
    up, down = lp["experts"]["up"]["kernel"], lp["experts"]["down"]["kernel"]
    out: dict = {}
    # Every expert bank's size, global and one device's shard: the merge path forms them, factored must not.
    bank = {(E, D, F), (E, F, D)}
    spec_of = (up.base.sharding.spec, down.base.sharding.spec, P("expert"))
    bank |= {_local(s, spec, mesh) for s in bank for spec in spec_of}
    if unplaced:  # factors on the host: the shard_map rule reshards them (explicit meshes check in_specs)
        lp = jax.tree.map(
            lambda x: dataclasses.replace(x, a=jax.device_get(x.a), b=jax.device_get(x.b)) if lorajax.is_lora(x) else x,
            lp,
            is_leaf=lorajax.is_lora,
        )
    x = jax.device_put(jax.random.normal(jax.random.key(1), (T, D)), NamedSharding(mesh, P("expert")))
    trainable, frozen = lorajax.partition(lp)
    fac = lorajax.factored(block, strict=True)
    loss_f = lambda t: jnp.sum(jnp.sin(fac(lorajax.combine(t, frozen), x)))
    loss_m = lambda t: jnp.sum(jnp.sin(block(lorajax.merge(lorajax.combine(t, frozen)), x)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y_f, y_m = fac(lp, x), block(lorajax.merge(lp), x)
        step_f = jax.jit(jax.grad(loss_f)).lower(trainable).compile()
        g_f, g_m = step_f(trainable), jax.jit(jax.grad(loss_m))(trainable)
    out["warnings"] = [str(w.message)[:200] for w in caught if issubclass(w.category, lorajax.FallbackWarning)]
    out["out_err"] = _rel(y_f, y_m)
    out["grad_errs"] = [_rel(u, v) for u, v in zip(_factors(g_f), _factors(g_m))]
    out["grad_specs"] = [str(f.sharding.spec) for f in _factors(g_f)][:4]
    out["gathers"] = _gathers(step_f.as_text())
    out["bank_sized"] = sorted(
        {str(s) for s in computed_shapes(jax.make_jaxpr(jax.grad(loss_f))(trainable).jaxpr) if s in bank}
    )
    merge_shapes = computed_shapes(jax.make_jaxpr(jax.grad(loss_m))(trainable).jaxpr)
    out["merge_bank_sized"] = sorted({str(s) for s in merge_shapes if s in bank})
    return out


def _dropout_case(mesh, specs, block):
    lp = _params(jax.random.key(0), mesh, specs)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (T, D)), NamedSharding(mesh, P("expert")))
    fac = lorajax.factored(block, dropout=0.5, strict=True)
    y0 = fac(lp, x, lora_deterministic=True)
    y1, y2 = fac(lp, x, lora_rng=jax.random.key(3)), fac(lp, x, lora_rng=jax.random.key(4))
    return {
        "deterministic_err": _rel(y0, block(lorajax.merge(lp), x)),
        "draws_differ": bool(jnp.abs(y1 - y2).max() > 0),
        "finite": bool(jnp.isfinite(y1).all()),
    }


def _run(fn):
    try:
        return fn()
    except Exception as e:  # reported, not raised: the other cases still run
        return {"error": f"{type(e).__name__}: {e}"[:600]}


def worker() -> dict:
    auto = jax.make_mesh((4,), ("expert",), axis_types=(AxisType.Auto,))
    explicit = jax.make_mesh((4,), ("expert",), axis_types=(AxisType.Explicit,))
    two_d = jax.make_mesh((2, 2), ("expert", "tp"), axis_types=(AxisType.Auto,) * 2)
    ep = {"router": {"kernel": P()}, "shared": {"kernel": P()}}
    ep["experts"] = {"up": {"kernel": P("expert")}, "down": {"kernel": P("expert")}}
    tp = {"router": {"kernel": P()}, "shared": {"kernel": P()}}
    tp["experts"] = {"up": {"kernel": P("expert", None, "tp")}, "down": {"kernel": P("expert", "tp", None)}}
    cases = {
        "ep": lambda: _case(auto, ep, _ep_block(auto)),
        "ep_explicit": lambda: _case(explicit, ep, _ep_block(explicit), unplaced=True),
        "ep_tp": lambda: _case(two_d, tp, _ep_block(two_d, tp="tp")),
        "ep_viewed": lambda: _case(auto, ep, _ep_block(auto, transposed_down=True), transposed_down=True),
        "ragged_dot": lambda: _case(auto, ep, _ragged_block(auto)),
    }
    results = {name: _run(fn) for name, fn in cases.items()}
    results["placed"] = {
        "ep": _run(lambda: _placement(auto, ep)),
        "ep_explicit": _run(lambda: _placement(explicit, ep)),
        "ep_tp": _run(lambda: _placement(two_d, tp)),
    }
    results["dropout"] = _run(lambda: _dropout_case(auto, ep, _ep_block(auto)))
    return results


# ----------------------------------------------------------------------------------------------
# The tests (single-device pytest process; the worker runs once per module).

pytestmark = pytest.mark.xdist_group("moe_mesh")


@pytest.fixture(scope="module")
def moe_results():
    return run_worker(__file__, timeout=900)


DENSE = ["ep", "ep_explicit", "ep_tp", "ep_viewed"]


def _ok(results, case):
    r = results[case]
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.parametrize("case", ["ep", "ep_explicit", "ep_tp"])
def test_lorafy_factors_follow_expert_sharding(moe_results, case):
    placed = moe_results["placed"][case]
    assert "error" not in placed, placed
    want = {
        "ep": ("P('expert', None, None)", "P('expert', None, None)"),
        "ep_tp": ("P('expert', None, None)", "P('expert', None, 'tp')"),
    }
    key = "ep_tp" if case == "ep_tp" else "ep"
    assert tuple(placed["up"]) == want[key]
    if case == "ep_tp":  # down: fan-in sharded over tp, so a carries it and b does not
        assert tuple(placed["down"]) == ("P('expert', 'tp', None)", "P('expert', None, None)")


@pytest.mark.parametrize("case", DENSE)
def test_shard_map_factored_equals_merge(moe_results, case):
    r = _ok(moe_results, case)
    assert r["out_err"] < REL_TOL, r["out_err"]
    assert len(r["grad_errs"]) == 6  # a and b of the shared expert, up and down
    assert max(r["grad_errs"]) < REL_TOL, r["grad_errs"]
    assert r["warnings"] == []


# ep_viewed: the expert bank enters the body transposed, so its dense view (the frozen base's, sharded as the base,
# never W) is what goes in; only the plain cases are held to "no array of a bank's size".
@pytest.mark.parametrize("case", ["ep", "ep_explicit", "ep_tp"])
def test_shard_map_factored_never_forms_or_gathers_experts(moe_results, case):
    r = _ok(moe_results, case)
    assert r["merge_bank_sized"], "the check must see what the merge path forms"
    assert r["bank_sized"] == [], r["bank_sized"]
    assert r["gathers"] == [], r["gathers"]


def test_expert_factor_gradients_keep_expert_sharding(moe_results):
    r = _ok(moe_results, "ep")
    # Leaves in tree order: experts/down (a, b), experts/up (a, b); stacked axis sharded over expert.
    assert all(s.startswith("P('expert'") for s in r["grad_specs"]), r["grad_specs"]


def test_shard_map_with_lora_dropout(moe_results):  # deterministic equals merge; two keys draw two masks
    r = _ok(moe_results, "dropout")
    assert r["deterministic_err"] < REL_TOL
    assert r["draws_differ"] and r["finite"]


def test_shard_map_ragged_dot_factored_equals_merge(moe_results):
    r = _ok(moe_results, "ragged_dot")
    assert r["out_err"] < REL_TOL and max(r["grad_errs"]) < REL_TOL
    assert r["bank_sized"] == [] and r["warnings"] == []


if __name__ == "__main__":
    print(json.dumps(worker()))

"""Mixture-of-experts dispatch forms through lorajax.factored: each equals the merge path, never forms W.

One tiny MoE block (a router, per-expert up/down banks ``(E, d, f)`` and ``(E, f, d)``, a DeepSeek-style shared
expert) written in the forms real MoE code uses: a dense all-experts einsum weighted by the router, MaxText's
capacity-factor dispatch (``EBCM,EMH->EBCH``), a gather of the experts' kernels by top-k index (``W[idx]``) and
``jax.lax.ragged_dot`` over tokens sorted by expert. Each runs ``factored(strict=True)`` with warnings as errors,
against ``fn(lorajax.merge(params))`` in float32; the adapters are random (``b`` nonzero) so the LoRA term counts.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxprs import computed_shapes
from jax.experimental import pallas as pl

import lorajax

E, D, F, T, K, R, C = 4, 8, 6, 10, 2, 2, 5  # experts, d_model, ffn, tokens, top-k, rank, capacity per expert
EXPERTS = ("experts/up", "experts/down")
KERNELS = {"experts/up": (E, D, F), "experts/down": (E, F, D)}
# Per expert, every bank the same kind: one LoRA per expert.
LAYOUTS = {"experts/up": "sio", "experts/down": "sio"}


def _normal(seed, shape, scale=0.3):
    # NumPy draws: no XLA compile per shape (eager jax.random costs seconds each on a busy CI machine).
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params():
    return {
        "router": {"kernel": _normal(0, (D, E))},
        "experts": {"up": _normal(1, (E, D, F)), "down": _normal(2, (E, F, D))},
        "shared": {"up": {"kernel": _normal(3, (D, F))}, "down": {"kernel": _normal(4, (F, D))}},
    }


X = _normal(5, (T, D), 1.0)


def _route(p, x):
    probs = jax.nn.softmax(x @ p["router"]["kernel"], axis=-1)  # (T, E)
    weights, idx = jax.lax.top_k(probs, K)
    return probs, weights, idx


def _shared(p, x):
    return jax.nn.silu(x @ p["shared"]["up"]["kernel"]) @ p["shared"]["down"]["kernel"]


def dense(p, x):
    """All experts on every token, weighted by the router (tunix's CPU form, Mixtral's reference)."""
    probs, _, _ = _route(p, x)
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, p["experts"]["up"]))
    y = jnp.einsum("tef,efd->ted", h, p["experts"]["down"])
    return jnp.einsum("ted,te->td", y, probs) + _shared(p, x)


def capacity(p, x):
    """MaxText's capacity-factor dispatch: tokens into (E, batch, capacity) slots, ``EBCM,EMH->EBCH``."""
    _, weights, idx = _route(p, x)
    onehot = jax.nn.one_hot(idx, E)  # (T, K, E)
    # Position of each (token, choice) in its expert's queue; over capacity C: dropped.
    slot = (jnp.cumsum(onehot.reshape(T * K, E), axis=0).reshape(T, K, E) - 1).astype(jnp.int32)
    keep = onehot * (slot < C)
    dispatch = jnp.einsum("tke,tkec->tec", keep, jax.nn.one_hot(slot, C))[None]  # (B=1, T, E, C)
    combine = jnp.einsum("tke,tk,tkec->tec", keep, weights, jax.nn.one_hot(slot, C))[None]
    xe = jnp.einsum("BTM,BTEC->EBCM", x[None], dispatch)
    h = jax.nn.silu(jnp.einsum("EBCM,EMH->EBCH", xe, p["experts"]["up"]))
    y = jnp.einsum("EBCH,EHM->EBCM", h, p["experts"]["down"])
    return jnp.einsum("EBCM,BTEC->BTM", y, combine)[0] + _shared(p, x)


def gathered(p, x):
    """Each token's top-k experts' kernels gathered by index, then a batched product with the token."""
    _, weights, idx = _route(p, x)
    h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, p["experts"]["up"][idx]))
    y = jnp.einsum("tkf,tkfd->tkd", h, p["experts"]["down"][idx])
    return jnp.einsum("tkd,tk->td", y, weights) + _shared(p, x)


def ragged(p, x):
    """MaxText/megablox: (token, expert) pairs sorted by expert, two grouped matmuls, unsorted and combined."""
    _, weights, idx = _route(p, x)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[order // K]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, p["experts"]["up"], sizes))
    y = jax.lax.ragged_dot(h, p["experts"]["down"], sizes) * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[order // K].add(y) + _shared(p, x)


FORMS = {"dense": dense, "capacity": capacity, "gathered": gathered, "ragged": ragged}


def _random_init(key, base, layout, rank, dtype):
    # Nonzero b, so the adapters change the output; seeded by the kernel's shape (up and down differ).
    seed = int(np.ravel_multi_index(base.shape[-2:], (64, 64)))
    return (
        _normal(seed, layout.a_shape(base.shape, rank)).astype(dtype),
        _normal(seed + 1, layout.b_shape(base.shape, rank)).astype(dtype),
    )


def _lora(fn, dora=False):
    params = _params()
    layouts = lorajax.infer_layouts(fn, params, X)
    where = list(EXPERTS) + ["shared/up/kernel", "shared/down/kernel"]
    lora = lorajax.lorafy(params, rank=R, where="|".join(where), layout=layouts, init=_random_init, dora=dora)
    return layouts, lora


def _close(got, want):
    # float32 sums in another order (rank-r products against the merged kernel): 1e-5 of the output's scale.
    scale = max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("form", FORMS)
def test_each_form_equals_the_merge_path_with_no_fallback(form):
    fn = FORMS[form]
    layouts, lora = _lora(fn)
    assert {k: layouts[k].axes for k in EXPERTS} == LAYOUTS
    for path in EXPERTS:  # one LoRA per expert
        node = lora["experts"][path.split("/")[1]]
        assert node.a.shape[0] == E and node.b.shape[0] == E
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(lorajax.factored(fn, strict=True))(lora, X)
    want = jax.jit(lambda p, x: fn(lorajax.merge(p), x))(lora, X)
    assert float(jnp.max(jnp.abs(want - fn(_params(), X)))) > 1e-2  # the adapters change the output
    _close(got, want)


def _loss(fn):
    return lambda train, frozen: jnp.mean(fn(lorajax.combine(train, frozen), X) ** 2)


@pytest.mark.parametrize("form", FORMS)
def test_gradients_of_the_factors_equal_the_merge_path(form):
    fn = FORMS[form]
    _, lora = _lora(fn)
    train, frozen = lorajax.partition(lora)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g_fact = jax.jit(jax.grad(_loss(lorajax.factored(fn, strict=True))))(train, frozen)
    g_merge = jax.jit(jax.grad(_loss(lambda p, x: fn(lorajax.merge(p), x))))(train, frozen)
    for a, b in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_merge), strict=True):
        _close(a, b)


@pytest.mark.parametrize("form", FORMS)
def test_dora_experts_equal_the_merge_path_values_and_gradients(form):
    """Per-expert DoRA (a magnitude per expert and output): ``g = m/n`` rides in B, gathered with the experts."""
    fn = FORMS[form]
    _, lora = _lora(fn, dora=True)
    assert lora["experts"]["up"].magnitude.shape == (E, F)
    train, frozen = lorajax.partition(lora)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jax.value_and_grad(_loss(lorajax.factored(fn, strict=True))))(train, frozen)
    want = jax.jit(jax.value_and_grad(_loss(lambda p, x: fn(lorajax.merge(p), x))))(train, frozen)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _close(a, b)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("form", FORMS)
def test_training_step_forms_no_expert_sized_array_but_the_base(form, dora):
    """The jitted step's jaxpr computes no value of an expert kernel's shape or size: no merged W, no dW."""
    fn = FORMS[form]
    _, lora = _lora(fn, dora=dora)
    train, frozen = lorajax.partition(lora)
    step = jax.jit(jax.value_and_grad(_loss(lorajax.factored(fn, strict=True))))
    shapes = computed_shapes(jax.make_jaxpr(step)(train, frozen).jaxpr)
    sizes = {int(np.prod(s)) for s in KERNELS.values()}
    bad = [s for s in shapes if s in KERNELS.values() or int(np.prod(s)) in sizes]
    assert not bad, bad
    # The check can fail: the merge path's step forms them.
    merged = jax.jit(jax.value_and_grad(_loss(lambda p, x: fn(lorajax.merge(p), x))))
    assert any(s in KERNELS.values() for s in computed_shapes(jax.make_jaxpr(merged)(train, frozen).jaxpr))


def test_gathered_lora_runs_through_rank_r():
    """The gathered form gathers the factors (tokens x k x rank), never a per-token merged weight."""
    _, lora = _lora(gathered)
    shapes = computed_shapes(jax.make_jaxpr(lorajax.factored(gathered, strict=True))(lora, X).jaxpr, "gather")
    assert (T, K, D, R) in shapes and (T, K, R, F) in shapes  # A[idx], B[idx] of the up bank
    merged_per_token = [s for s in shapes if s == (T, K, D, F)]
    assert len(merged_per_token) == 1  # the base's own gather only (the model's), no merged one


@pytest.mark.parametrize("form", ["gathered", "ragged"])
def test_infer_layouts_follows_the_dispatch_with_the_true_fan_in(form):
    layouts = lorajax.infer_layouts(FORMS[form], _params(), X)
    assert {k: layouts[k].axes for k in EXPERTS} == LAYOUTS
    assert layouts["router/kernel"].axes == "io" and not layouts.unresolved


def test_every_expert_bank_of_a_block_gets_the_same_kind():
    """tunix's dense form: gate/up keep the expert axis free (``td,edf->tef``), down batches it; all per expert."""

    def tunix_like(p, x):
        gate = jnp.einsum("td,edf->tef", x, p["experts"]["gate"])
        up = jnp.einsum("td,edf->tef", x, p["experts"]["up"])
        return jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, p["experts"]["down"]).sum(axis=1)

    params = {"experts": {"gate": jnp.ones((E, D, F)), "up": jnp.ones((E, D, F)), "down": jnp.ones((E, F, D))}}
    layouts = lorajax.infer_layouts(tunix_like, params, X)
    assert {k: v.axes for k, v in layouts.items()} == {f"experts/{n}": "sio" for n in ("gate", "up", "down")}
    # A query kernel's leading heads axis stays fan-out: no bank beside it is stacked.
    attn = {"q": jnp.ones((2, D, F))}
    assert lorajax.infer_layouts(lambda p, x: jnp.einsum("td,ndh->tnh", x, p["q"]), attn, X)["q"].axes == "oio"


def _pallas_experts(w, x):
    """A stand-in for tunix's Pallas grouped matmul: all experts in one opaque ``pallas_call`` (interpreted on CPU)."""

    def kernel(w_ref, x_ref, o_ref):
        o_ref[...] = jnp.einsum("td,edf->tef", x_ref[...], w_ref[...])

    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0], w.shape[2]), x.dtype)
    return pl.pallas_call(kernel, out_shape=out, interpret=True)(w, x)


def test_an_opaque_pallas_kernel_names_the_way_out():
    """No rule sees through a Pallas kernel: strict names ragged_dot and the merge path; else W is formed, right."""
    _, lora = _lora(dense)

    def fn(p, x):
        return jnp.einsum("tef,te->tf", _pallas_experts(p["experts"]["up"], x), _route(p, x)[0])

    with pytest.raises(
        ValueError, match=r"experts/up.*`pallas_call` is an opaque kernel.*jax\.lax\.ragged_dot.*lorajax\.merge"
    ):
        lorajax.factored(fn, strict=True)(lora, X)
    with pytest.warns(lorajax.FallbackWarning, match="ragged_dot"):
        got = lorajax.factored(fn)(lora, X)
    _close(got, fn(lorajax.merge(lora), X))

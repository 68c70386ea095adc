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
from _moe_models import (
    EXPERTS,
    FORMS,
    KERNELS,
    LAYOUTS,
    D,
    E,
    F,
    K,
    R,
    T,
    X,
    close,
    dense,
    gathered,
    params,
    random_init,
    route,
)
from jax.experimental import pallas as pl

import lorajax


def _lora(fn, dora=False):
    p = params()
    layouts = lorajax.infer_layouts(fn, p, X)
    where = list(EXPERTS) + ["shared/up/kernel", "shared/down/kernel"]
    lora = lorajax.lorafy(p, rank=R, where="|".join(where), layout=layouts, init=random_init, dora=dora)
    return layouts, lora


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
    assert float(jnp.max(jnp.abs(want - fn(params(), X)))) > 1e-2  # the adapters change the output
    close(got, want)


def _loss(fn):
    return lambda train, frozen: jnp.mean(fn(lorajax.combine(train, frozen), X) ** 2)


def _assert_loss_and_gradients_equal_merge(fn, lora):
    """``factored(strict=True)`` with warnings as errors against the merge path: the loss and every factor's
    (and magnitude's) gradient."""
    train, frozen = lorajax.partition(lora)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jax.value_and_grad(_loss(lorajax.factored(fn, strict=True))))(train, frozen)
    want = jax.jit(jax.value_and_grad(_loss(lambda p, x: fn(lorajax.merge(p), x))))(train, frozen)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        close(a, b)


@pytest.mark.parametrize("form", FORMS)
def test_gradients_of_the_factors_equal_the_merge_path(form):
    _, lora = _lora(FORMS[form])
    _assert_loss_and_gradients_equal_merge(FORMS[form], lora)


@pytest.mark.parametrize("form", FORMS)
def test_dora_experts_equal_the_merge_path_values_and_gradients(form):
    """Per-expert DoRA (a magnitude per expert and output): ``g = m/n`` rides in B, gathered with the experts."""
    _, lora = _lora(FORMS[form], dora=True)
    assert lora["experts"]["up"].magnitude.shape == (E, F)
    _assert_loss_and_gradients_equal_merge(FORMS[form], lora)


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
    layouts = lorajax.infer_layouts(FORMS[form], params(), X)
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
        return jnp.einsum("tef,te->tf", _pallas_experts(p["experts"]["up"], x), route(p, x)[0])

    with pytest.raises(
        ValueError, match=r"experts/up.*`pallas_call` is an opaque kernel.*jax\.lax\.ragged_dot.*lorajax\.merge"
    ):
        lorajax.factored(fn, strict=True)(lora, X)
    with pytest.warns(lorajax.FallbackWarning, match="ragged_dot"):
        got = lorajax.factored(fn)(lora, X)
    close(got, fn(lorajax.merge(lora), X))

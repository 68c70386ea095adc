"""Mixture-of-experts LoRA through lorafy: one independent adapter per expert (DoRA too), the presets on expert
banks and routers, also= on a router, and the counts summary and memory_plan give.

Numerical checks are against float64 NumPy: a merged float32 kernel ``W0[e] + s·A[e]@B[e]`` is one rounding of
``W0`` plus a rank-r product (r terms), so it lands within ``gamma(r + 1)`` of the float64 value, relative to
``|W0| + s·|A|@|B|`` (tests/_tolerances.py); DoRA adds a norm over fan-in (``d_in`` terms) and a division.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _library_models import tunix_qwen3
from _tolerances import gamma

import lorajax

E, D, F, L, T = 5, 8, 12, 2, 6  # experts, d_model, expert hidden size, scanned layers, tokens


def _normal(key, shape, scale=0.3):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _random_init(key, base, layout, rank, dtype):
    # Nonzero b: the adapters change the merged kernel, so per-expert arithmetic is visible.
    ka, kb = jax.random.split(key)
    return _normal(ka, layout.a_shape(base.shape, rank)), _normal(kb, layout.b_shape(base.shape, rank))


def tiny_moe(key=0):
    """A tunix-named MoE block: a router kernel (D, E) and bare expert banks (E, D, F), (E, F, D)."""
    k = iter(jax.random.split(jax.random.key(key), 8))
    return {
        "norm": {"scale": jnp.ones(D)},
        "mlp": {
            "router": {"kernel": _normal(next(k), (D, E))},
            "gate_proj": _normal(next(k), (E, D, F)),
            "up_proj": _normal(next(k), (E, D, F)),
            "down_proj": _normal(next(k), (E, F, D)),
        },
    }


def moe_apply(p, x):
    """Dense dispatch: every expert on every token, weighted by the router's probabilities."""
    m = p["mlp"]
    x = x * p["norm"]["scale"]
    probs = jax.nn.softmax(x @ m["router"]["kernel"], axis=-1)  # (T, E)
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, m["gate_proj"])) * jnp.einsum("td,edf->tef", x, m["up_proj"])
    y = jnp.einsum("tef,efd->ted", h, m["down_proj"])  # each expert on its own: e is a batch axis
    return jnp.einsum("ted,te->td", y, probs)


def maxtext_moe(scan: bool = False):
    """MaxText's names: MoeBlock_0 holds the router `gate` and bare banks wi_0, wi_1 (E, D, F), wo (E, F, D); a
    scanned decoder puts the layer axis second ((E, L, D, F)) and its dense shared experts' kernels (D, L, F)."""
    k = iter(jax.random.split(jax.random.key(1), 16))
    lay = (L,) if scan else ()
    block = {
        "self_attention": {
            "query": {"kernel": _normal(next(k), (D, 2, 4))},
            "out": {"kernel": _normal(next(k), (2, 4, D))},
        },
        "MoeBlock_0": {
            "gate": {"kernel": _normal(next(k), (D, E)), "bias": jnp.zeros(E)},
            "wi_0": _normal(next(k), (E, *lay, D, F)),
            "wi_1": _normal(next(k), (E, *lay, D, F)),
            "wo": _normal(next(k), (E, *lay, F, D)),
        },
        "shared_experts": {"wi_0": {"kernel": _normal(next(k), (D, F))}, "wo": {"kernel": _normal(next(k), (F, D))}},
    }
    if scan:  # attention and shared experts of a scanned stack are ambiguous by names: keep this tree to the banks
        block = {"MoeBlock_0": block["MoeBlock_0"]}
    return {"params": {"decoder": {"layers" if scan else "layers_0": block}}}


def _shapes(build, *args):
    """The tree ``build`` makes, abstract (``ShapeDtypeStruct`` leaves): lorafy, summary and the presets read
    only names and shapes, and an abstract tree compiles no init."""
    return jax.eval_shape(lambda: build(*args))


def _nodes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorajax.is_lora)[0]
    return {lorajax.path_str(p): x for p, x in leaves if lorajax.is_lora(x)}


# ---- one adapter per expert -------------------------------------------------------------------------------------


def test_expert_banks_get_per_expert_factors_from_names_alone():
    lora = lorajax.lorafy(_shapes(tiny_moe), rank=3, where=lorajax.mlp)
    nodes = _nodes(lora)
    assert set(nodes) == {"mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"}  # the router left plain
    for name, (d_in, d_out) in {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}.items():
        node = nodes[f"mlp/{name}"]
        assert node.layout.axes == "sio"
        assert node.a.shape == (E, d_in, 3) and node.b.shape == (E, 3, d_out)


@pytest.mark.parametrize("scan", [False, True])
def test_maxtext_banks_are_per_expert_and_per_layer(scan):
    lora = lorajax.lorafy(_shapes(maxtext_moe, scan), rank=2, where=lorajax.mlp)
    nodes = _nodes(lora)
    prefix = "params/decoder/" + ("layers" if scan else "layers_0") + "/MoeBlock_0"
    lay = (L,) if scan else ()
    for name, (d_in, d_out) in {"wi_0": (D, F), "wi_1": (D, F), "wo": (F, D)}.items():
        node = nodes[f"{prefix}/{name}"]
        assert node.layout.axes == ("ssio" if scan else "sio")
        assert node.a.shape == (E, *lay, d_in, 2) and node.b.shape == (E, *lay, 2, d_out)
    assert f"{prefix}/gate/kernel" not in nodes  # mlp leaves MaxText's router plain


def test_changing_one_experts_factors_changes_only_that_experts_kernel():
    lora = lorajax.lorafy(tiny_moe(), rank=2, where=lorajax.mlp, init=_random_init, alpha=3.0)
    node = lora["mlp"]["gate_proj"]
    before = np.asarray(lorajax.merge(lora)["mlp"]["gate_proj"])
    bumped = lambda f: f.at[3].add(1.0)
    lora["mlp"]["gate_proj"] = dataclasses.replace(node, a=bumped(node.a), b=bumped(node.b))
    after = np.asarray(lorajax.merge(lora)["mlp"]["gate_proj"])
    others = [e for e in range(E) if e != 3]
    np.testing.assert_array_equal(after[others], before[others])  # bit for bit: no factor is shared
    assert np.abs(after[3] - before[3]).min() > 0


def test_merged_kernel_is_the_base_plus_each_experts_own_product_in_float64():
    params = tiny_moe()
    lora = lorajax.lorafy(params, rank=3, where=lorajax.mlp, init=_random_init, alpha=6.0)
    merged = lorajax.merge(lora)
    for name in ("gate_proj", "up_proj", "down_proj"):
        node = lora["mlp"][name]
        w0, a, b = (np.asarray(v, np.float64) for v in (params["mlp"][name], node.a, node.b))
        s = node.scale
        assert s == 2.0
        want = w0 + s * np.einsum("eir,ero->eio", a, b)
        bound = gamma(3 + 1) * (np.abs(w0) + s * np.einsum("eir,ero->eio", np.abs(a), np.abs(b)))
        err = np.abs(np.asarray(merged["mlp"][name], np.float64) - want)
        assert (err <= bound + 1e-30).all(), (name, float((err - bound).max()))


def test_dora_keeps_one_magnitude_per_expert_and_output_feature():
    params = tiny_moe()
    lora = lorajax.lorafy(params, rank=2, where=lorajax.mlp, init=_random_init, dora=True)
    node = lora["mlp"]["down_proj"]
    w0, a, b = (np.asarray(v, np.float64) for v in (params["mlp"]["down_proj"], node.a, node.b))
    w = w0 + node.scale * np.einsum("eir,ero->eio", a, b)
    # Initial magnitude: the column norms of W + ΔW, per expert, over the fan-in axis only.
    assert node.magnitude.shape == (E, D)
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(w, axis=1), rtol=1e-6)
    # A trained magnitude: each expert's columns rescaled by its own m / ‖W + ΔW‖.
    m = np.asarray(_normal(jax.random.key(7), (E, D)) + 1.0, np.float64)
    lora["mlp"]["down_proj"] = dataclasses.replace(node, magnitude=jnp.asarray(m, jnp.float32))
    want = (m / np.linalg.norm(w, axis=1))[:, None, :] * w
    np.testing.assert_allclose(lorajax.merge(lora)["mlp"]["down_proj"], want, rtol=2e-6, atol=1e-6)


# ---- targeting -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tunix_moe():
    return tunix_qwen3(moe=True)


def test_all_linear_adapts_the_router_and_mlp_leaves_it_plain_on_the_tunix_stand_in(tunix_moe):
    case = tunix_moe
    every = _nodes(lorajax.lorafy(case.params, rank=2, where=lorajax.all_linear))
    assert {p: n.layout.axes for p, n in every.items()} == case.linear  # names alone, as the trace reads them
    mlp = _nodes(lorajax.lorafy(case.params, rank=2, where=lorajax.mlp))
    want = {f"layers/{i}/mlp/{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")}
    assert set(mlp) == want and all(n.layout.axes == "sio" for n in mlp.values())


def test_all_linear_on_a_maxtext_tree_takes_attention_banks_router_and_shared_experts():
    nodes = _nodes(lorajax.lorafy(_shapes(maxtext_moe), rank=2, where=lorajax.all_linear))
    b = "params/decoder/layers_0"
    assert {p: n.layout.axes for p, n in nodes.items()} == {
        f"{b}/self_attention/query/kernel": "ioo",
        f"{b}/self_attention/out/kernel": "iio",
        f"{b}/MoeBlock_0/gate/kernel": "io",
        f"{b}/MoeBlock_0/wi_0": "sio",
        f"{b}/MoeBlock_0/wi_1": "sio",
        f"{b}/MoeBlock_0/wo": "sio",
        f"{b}/shared_experts/wi_0/kernel": "io",  # a dense MLP beside the banks: one LoRA
        f"{b}/shared_experts/wo/kernel": "io",
    }
    mlp = _nodes(lorajax.lorafy(_shapes(maxtext_moe), rank=2, where=lorajax.mlp))
    assert f"{b}/MoeBlock_0/gate/kernel" not in mlp and f"{b}/MoeBlock_0/wi_0" in mlp


def test_names_never_read_a_non_expert_axis_as_experts():
    # A scanned shared expert (d_model, layers, mlp) and a scanned router (d_model, layers, experts) stay ambiguous.
    params = {
        "shared_experts": {"wi_0": {"kernel": jax.ShapeDtypeStruct((D, L, F), jnp.float32)}},
        "MoeBlock_0": {"gate": {"kernel": jax.ShapeDtypeStruct((D, L, E), jnp.float32)}},
    }
    with pytest.raises(
        ValueError,
        match=r"(?s)\(2 problems\).*MoeBlock_0/gate/kernel with shape \(8, 2, 5\).*shared_experts/wi_0/kernel",
    ):
        lorajax.lorafy(params, rank=2, where=lorajax.all_linear)


def test_transformers_fused_expert_parameters_ask_for_their_axis_order():
    bank = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    params = {"mlp": {"experts": {"gate_up_proj": bank(E, 2 * F, D), "down_proj": bank(E, D, F)}}}
    with pytest.raises(
        ValueError,
        match=r"mlp/experts/down_proj with shape \(5, 8, 12\): a bank of experts stored as transformers 5 does .*"
        r"\(experts, out, in\) 'soi' in Qwen3-MoE.*'sio' in Llama 4",
    ):
        lorajax.lorafy(params, rank=2, where=lorajax.mlp)
    nodes = _nodes(lorajax.lorafy(params, rank=2, where=lorajax.mlp, layout={r".*experts/.*": "soi"}))
    assert nodes["mlp/experts/gate_up_proj"].a.shape == (E, D, 2)  # fan-in D, per expert


def test_a_router_narrower_than_the_rank_says_what_to_do():
    with pytest.raises(
        ValueError,
        match=r"rank 8 for mlp/router/kernel .* mlp/router is a router \(its fan-out is the number of experts\): "
        r"give it rank_pattern=\{'router': 5\}, or leave it plain with where=lorajax.attn_all \| lorajax.mlp",
    ):
        lorajax.lorafy(_shapes(tiny_moe), rank=8, where=lorajax.all_linear)
    lora = lorajax.lorafy(_shapes(tiny_moe), rank=8, where=lorajax.all_linear, rank_pattern={"router": 5})
    assert lora["mlp"]["router"]["kernel"].rank == 5


# ---- also= on a router and on bare banks ----------------------------------------------------------------------


def test_also_router_trains_the_router_whole_and_nothing_frozen_moves():
    params = tiny_moe()
    lora = lorajax.lorafy(params, rank=2, where=lorajax.mlp, also=["router"])
    assert lorajax.is_trainable(lora["mlp"]["router"]["kernel"])
    x = _normal(jax.random.key(3), (T, D))
    y = _normal(jax.random.key(4), (T, D))
    tx = optax.masked(optax.adam(1e-2), lorajax.mask)
    state = tx.init(lora)

    @jax.jit
    def step(p, s):
        loss = lambda p: jnp.mean((moe_apply(lorajax.merge(p), x) - y) ** 2)
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = lora
    for _ in range(3):
        p, state = step(p, state)
    router = np.asarray(p["mlp"]["router"]["kernel"].value)
    assert np.abs(router - params["mlp"]["router"]["kernel"]).max() > 1e-3  # trained whole
    for name in ("gate_proj", "up_proj", "down_proj"):
        np.testing.assert_array_equal(p["mlp"][name].base, params["mlp"][name])  # frozen banks: bit for bit
        assert np.abs(np.asarray(p["mlp"][name].b)).max() > 0  # the per-expert factors moved
    np.testing.assert_array_equal(p["norm"]["scale"], params["norm"]["scale"])
    assert lorajax.summary(p).trained_leaves == ("mlp/router/kernel",)


def test_also_names_a_bare_expert_bank_by_its_module_name(tunix_moe):
    lora = lorajax.lorafy(_shapes(tiny_moe), rank=2, where=["router"], also=["down_proj", "mlp/up_proj"])
    assert lorajax.is_trainable(lora["mlp"]["down_proj"]) and lorajax.is_trainable(lora["mlp"]["up_proj"])
    assert isinstance(lora["mlp"]["gate_proj"], jax.ShapeDtypeStruct)  # frozen, plain
    lora = lorajax.lorafy(tunix_moe.params, rank=2, where=lorajax.attn_qv, also=["mlp/router", "gate_proj"])
    assert set(lorajax.summary(lora).trained_leaves) == {
        f"layers/{i}/mlp/{n}" for i in range(2) for n in ("router/kernel", "gate_proj")
    }


def test_also_errors_name_the_router_and_the_way_out():
    with pytest.raises(ValueError, match=r"'router' names mlp/router/kernel, already adapted .* A router: all_linear"):
        lorajax.lorafy(_shapes(tiny_moe), rank=2, where=lorajax.all_linear, also=["router"])
    with pytest.raises(ValueError, match=r"also='router' matched no leaf.* a list names modules.*\(\['router'\]\)"):
        lorajax.lorafy(_shapes(tiny_moe), rank=2, where=lorajax.mlp, also="router")


# ---- counts --------------------------------------------------------------------------------------------------


def test_summary_and_memory_plan_count_every_expert():
    r = 3
    lora = lorajax.lorafy(_shapes(tiny_moe), rank=r, where=lorajax.mlp, also=["router"])
    s = lorajax.summary(lora)
    per_bank = E * r * (D + F)
    assert [t.params for t in s.targets] == [per_bank] * 3
    assert [t.adapters for t in s.targets] == [E] * 3
    assert s.trainable == 3 * per_bank + D * E  # the factors plus the router, trained whole
    assert s.trainable_bytes == 4 * s.trainable
    assert s.total == 3 * E * D * F + D * E + D + 3 * per_bank
    text = str(s)
    assert f"mlp/gate_proj  {E}x{D}x{F}  sio" in text and "params = adapters x rank x (fan_in + fan_out)" in text
    plan = lorajax.memory_plan(lora, optax.adam(1e-3))
    assert plan.lora.trainable == plan.lora.gradients == 4 * s.trainable
    assert plan.lora.optimizer == 2 * 4 * s.trainable + 4  # adam's mu, nu and its count
    assert plan.lora.frozen == 4 * (3 * E * D * F + D)
    assert plan.full.trainable == 4 * (3 * E * D * F + D * E + D)
    # DoRA: one magnitude per expert and output feature on top.
    dora = lorajax.summary(lorajax.lorafy(_shapes(tiny_moe), rank=r, where=lorajax.mlp, dora=True))
    assert dora.trainable == 3 * per_bank + E * (F + F + D)
    # Scanned MaxText banks: one adapter per expert and layer.
    scanned = lorajax.summary(lorajax.lorafy(_shapes(maxtext_moe, True), rank=2, where=lorajax.mlp))
    assert [t.adapters for t in scanned.targets] == [E * L] * 3
    assert scanned.trainable == 3 * E * L * 2 * (D + F)


def test_summary_is_the_same_on_abstract_trees():
    f = lambda p: lorajax.lorafy(p, rank=2, where=lorajax.all_linear, dora=True)
    assert lorajax.summary(jax.eval_shape(f, tiny_moe())) == lorajax.summary(f(tiny_moe()))


def test_factored_equals_merge_on_the_dense_dispatch_block():
    lora = lorajax.lorafy(tiny_moe(), rank=2, where=lorajax.all_linear, init=_random_init)
    x = _normal(jax.random.key(5), (T, D))
    got = lorajax.factored(moe_apply, strict=True)(lora, x)
    want = moe_apply(lorajax.merge(lora), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(want - moe_apply(tiny_moe(), x)).max()) > 1e-2

"""Adapter banks: stack_adapters / select, and mixed-adapter batches run by lorajax.factored."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxprs import computed_shapes
from _models import TinyGPT
from _tolerances import assert_within, sum_bound

import lorajax


def trained(base, seed, rank=2, where=".*kernel", alpha=None, rslora=False, **kw):
    """lorafy, then give every factor random values, as after training."""
    lora = lorajax.lorafy(base, rank=rank, where=where, key=jax.random.key(seed), alpha=alpha, rslora=rslora, **kw)
    rng = np.random.default_rng(seed + 1000)
    # Flax boxes (nn.Partitioned, nnx.Param) are pytrees around one array: tree.map refills them, boxes kept.
    rand = lambda box: jax.tree.map(lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape), jnp.float32), box)
    return jax.tree.map(
        lambda x: dataclasses.replace(x, a=rand(x.a), b=rand(x.b)) if lorajax.is_lora(x) else x,
        lora,
        is_leaf=lorajax.is_lora,
    )


def small_params():
    rng = np.random.default_rng(0)
    return {
        "q": {"kernel": jnp.asarray(rng.normal(size=(6, 2, 3)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
        "lm_head": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)},
    }


def dense(a, b, layout, shape, scale):
    """scale * A.B in float64 numpy, contracted back into the kernel layout."""
    d = scale * np.einsum(layout.einsum_subscripts(), np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert d.shape == shape
    return d


def test_stack_pads_ranks_folds_scales_and_zero_fills():
    base = small_params()
    p0 = trained(base, 0, rank=2, where=r"(q|fc)/kernel", alpha=4.0, layout={"q": "ioo"})
    p1 = trained(base, 1, rank=3, where=r"fc/kernel", alpha=1.0, rslora=True)
    bank = lorajax.stack_adapters({"x": p0, "y": p1})
    assert bank.names == ("x", "y") and bank.num_adapters == 2
    fc = bank.params["fc"]["kernel"]
    assert isinstance(fc, lorajax.BankNode) and fc.rank == 3
    assert fc.a.shape == (3, 6, 3) and fc.b.shape == (3, 3, 5)
    n0, n1 = p0["fc"]["kernel"], p1["fc"]["kernel"]
    np.testing.assert_array_equal(fc.a[0, :, :2], n0.a)
    np.testing.assert_array_equal(fc.a[0, :, 2], 0)  # rank padding
    np.testing.assert_allclose(fc.b[0, :2], 2.0 * n0.b, rtol=1e-7)  # scale 4/2 folded in
    np.testing.assert_array_equal(fc.b[0, 2], 0)
    np.testing.assert_allclose(fc.b[1], n1.b / np.sqrt(3.0), rtol=1e-6)  # rsLoRA scale 1/sqrt(3)
    np.testing.assert_array_equal(fc.a[2], 0)  # the base-model row
    np.testing.assert_array_equal(fc.b[2], 0)
    q = bank.params["q"]["kernel"]
    assert q.a.shape == (3, 6, 2) and q.b.shape == (3, 2, 2, 3)
    np.testing.assert_array_equal(q.a[1], 0)  # adapter y does not target q
    np.testing.assert_array_equal(q.b[1], 0)
    assert bank.params["lm_head"]["kernel"] is base["lm_head"]["kernel"]
    assert bank.params["fc"]["kernel"].base is base["fc"]["kernel"]


def test_select_gathers_one_adapter_per_example_exactly():
    base = small_params()
    ps = [
        trained(base, 0, rank=2, where=r"(q|fc)/kernel", alpha=4.0, layout={"q": "ioo"}),
        trained(base, 1, rank=3, where=r"fc/kernel", alpha=1.0, rslora=True),
        trained(base, 2, rank=1, where=r"q/kernel", alpha=0.5, layout={"q": "ioo"}),
    ]
    bank = lorajax.stack_adapters(ps)
    ids = np.array([2, -1, 0, 1, 0])
    sel = lorajax.select(bank, ids, form="gather")
    for name in ("q", "fc"):
        node = sel[name]["kernel"]
        assert node.per_example and node.scale == 1.0 and node.rslora is False
        assert node.a.shape[0] == node.b.shape[0] == len(ids)
        for n, k in enumerate(ids):
            got = dense(node.a[n], node.b[n], node.layout, node.shape, 1.0)
            if k < 0 or not lorajax.is_lora(ps[k][name]["kernel"]):
                np.testing.assert_array_equal(got, np.zeros(node.shape), err_msg=f"{name} example {n}")
                continue
            src = ps[k][name]["kernel"]
            want = dense(src.a, src.b, src.layout, src.shape, src.scale)
            # The bank folds the scale into b in float32: two roundings per entry of b (the scale's, the product's).
            bound = sum_bound(dense(abs(src.a), abs(src.b), src.layout, src.shape, src.scale), 2)
            assert_within(got, want, bound, f"{name} example {n}")
    with pytest.raises(ValueError, match="per-example"):
        lorajax.merge(sel)


def test_select_validates_ids_and_bank_ids_maps_names():
    base = small_params()
    bank = lorajax.stack_adapters({"a": trained(base, 0), "b": trained(base, 1)})
    with pytest.raises(ValueError, match=r"ids \[-2, 2\] are out of range; use 0..1"):
        lorajax.select(bank, np.array([0, 2, -2]))
    with pytest.raises(ValueError, match="1-D integer array"):
        lorajax.select(bank, np.zeros((2, 2), np.int32), form="gather")  # per-token ids need another form
    with pytest.raises(ValueError, match="1-D or 2-D integer array"):
        lorajax.select(bank, np.zeros((2, 2, 2), np.int32))
    with pytest.raises(ValueError, match="1-D or 2-D integer array"):
        lorajax.select(bank, np.array([0.0, 1.0]))
    assert bank.ids(["b", None, "a"]).tolist() == [1, -1, 0]
    with pytest.raises(ValueError, match=r"unknown adapter names \['c'\]"):
        bank.ids(["c"])


def test_stack_rejects_adapters_of_another_base():
    base = small_params()
    sq = {"fc": {"kernel": jnp.ones((5, 5))}}
    io = trained(sq, 0, layout={".*": "io"})
    oi = trained(sq, 1, layout={".*": "oi"})
    with pytest.raises(ValueError, match=r"layout: fc/kernel: adapter 0 has layout 'io', adapter 1 'oi'"):
        lorajax.stack_adapters([io, oi])
    with pytest.raises(ValueError, match=r"fc/kernel: the adapter was made for a base kernel of shape \(5, 5\)"):
        lorajax.stack_adapters([io], base=base)
    with pytest.raises(ValueError, match="pass the base params as base="):
        lorajax.stack_adapters([lorajax.adapter(io)])


# ---------------------------------------------------------------------------------------------------------------------
# mixed batches through lorajax.factored on a small transformer


@pytest.fixture(scope="module")
def gpt_bank():
    model = TinyGPT(vocab=64, d_model=32)
    tokens = jax.random.randint(jax.random.key(1), (6, 8), 0, 64)
    base = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # jitted: much faster than eager init
    ps = [
        trained(base, 0, rank=2, where=lorajax.attn_qv, alpha=4.0),
        trained(base, 1, rank=4, where=lorajax.mlp, alpha=8.0, rslora=True),
        trained(base, 2, rank=3, where=r"embed/embedding|.*/(query|value|fc1)/kernel", alpha=3.0),
    ]
    return model, base, tokens, ps, lorajax.stack_adapters(ps)


@pytest.mark.parametrize("form", ["gather", "onehot", "ragged"])
def test_mixed_batch_equals_each_example_with_its_own_merged_model(gpt_bank, form):
    model, base, tokens, ps, bank = gpt_bank
    ids = np.array([2, -1, 0, 1, 1, 2])
    # strict: every form runs factored end to end (the embedding lookup included), never forming a kernel.
    mixed = lorajax.factored(model.apply, strict=True)({"params": lorajax.select(bank, ids, form=form)}, tokens)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for n, k in enumerate(ids):
        params = base if k < 0 else lorajax.merge(ps[k])
        alone = apply(params, tokens[n : n + 1])
        np.testing.assert_allclose(mixed[n : n + 1], alone, rtol=1e-5, atol=1e-5, err_msg=f"example {n}")
    # -1 everywhere is the base model (zero factors; equal up to float32 rounding of the reordered sums).
    only_base = lorajax.factored(model.apply)({"params": lorajax.select(bank, np.full(6, -1), form=form)}, tokens)
    np.testing.assert_allclose(only_base, apply(base, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["gather", "onehot", "ragged"])
def test_new_ids_do_not_retrace(gpt_bank, form):
    model, _, tokens, _, bank = gpt_bank
    run = lorajax.factored(model.apply)
    chex.clear_trace_counter()  # one counter per function name: the parametrized runs would add up

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(bank, ids, tokens):
        return run({"params": lorajax.select(bank, ids, form=form)}, tokens)

    a = serve(bank, jnp.array([0, 1, 2, -1, 0, 1]), tokens)
    b = serve(bank, jnp.array([2, 2, 2, 2, 2, 2]), tokens)
    assert a.shape == b.shape == (6, 8, 64)
    assert not np.allclose(a, b)


@pytest.mark.torch
def test_mixed_batch_matches_peft_adapter_names_forward():
    """Same weights in PyTorch/PEFT and lorajax: PEFT's mixed-batch forward (adapter_names=) is the reference."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    net = Net()
    base = {
        name: {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}
        for name, m in (("fc1", net.fc1), ("fc2", net.fc2))
    }
    configs = {
        "t1": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False),
        "t2": peft.LoraConfig(r=4, lora_alpha=2, target_modules=["fc1"], use_rslora=True, init_lora_weights=False),
    }
    model = peft.get_peft_model(net, configs["t1"], adapter_name="t1")
    model.add_adapter("t2", configs["t2"])
    model.eval()

    ours = {}
    for name, cfg in configs.items():
        nodes = {}
        for module in cfg.target_modules:
            layer = getattr(model.base_model.model, module)
            nodes[module] = lorajax.LoRA(
                base[module]["kernel"],
                jnp.asarray(layer.lora_A[name].weight.detach().numpy().T),  # (in, r)
                jnp.asarray(layer.lora_B[name].weight.detach().numpy().T),  # (r, out)
                lorajax.LoRASpec(cfg.r, float(cfg.lora_alpha), lorajax.Layout("io"), rslora=cfg.use_rslora),
            )
        ours[name] = {m: {**base[m], **({"kernel": nodes[m]} if m in nodes else {})} for m in base}

    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    names = ["t1", "t2", "__base__", "t2", "t1"]
    with torch.no_grad():
        want = model(torch.from_numpy(x), adapter_names=names).numpy()

    def fn(p, x):
        h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
        return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]

    bank = lorajax.stack_adapters(ours)
    ids = bank.ids([None if n == "__base__" else n for n in names])
    got = lorajax.factored(fn)(lorajax.select(bank, ids), jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_equinox_mlp_mixed_batch_with_torch_layout_weights():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))  # Linear weights are (out, in): layout "oi"
    ps = [trained(mlp, s, rank=r, where=r".*weight") for s, r in ((1, 2), (2, 3))]
    bank = lorajax.stack_adapters(ps)
    assert bank.params.layers[0].weight.layout == lorajax.Layout("oi")
    x = jax.random.normal(jax.random.key(3), (5, 4))
    ids = np.array([1, 0, -1, 1, 0])
    got = lorajax.factored(lambda m, x: jax.vmap(m)(x))(lorajax.select(bank, ids), x)
    for n, k in enumerate(ids):
        own = mlp if k < 0 else lorajax.merge(ps[k])
        np.testing.assert_allclose(got[n], own(x[n]), rtol=1e-5, atol=1e-6, err_msg=f"example {n}")


# ---------------------------------------------------------------------------------------------------------------------
# execution forms: per-token ids, the auto rule, errors


def mlp_fn(p, x):
    """A per-token model (no mixing across positions): each token's output depends on its own adapter only."""
    h = jnp.tanh(x @ p["fc"]["kernel"])
    return h @ p["lm_head"]["kernel"]


@pytest.mark.parametrize("form", ["onehot", "ragged"])
def test_per_token_ids_equal_each_tokens_merged_model(form):
    base = small_params()
    base = {"fc": base["fc"], "lm_head": base["lm_head"]}
    ps = [
        trained(base, 0, rank=2, where=r"(fc|lm_head)/kernel", alpha=4.0),
        trained(base, 1, rank=3, where=r"fc/kernel", alpha=1.0, rslora=True),
    ]
    assert_per_token_merged(base, ps, np.array([[0, 1, -1, 0], [1, 1, 0, -1], [-1, -1, 1, 0]]), form)


def assert_per_token_merged(base, ps, ids, form):
    """A bank of ``ps`` run with one adapter per token (``ids``) equals each token's own merged model to 1e-5."""
    bank = lorajax.stack_adapters(ps)
    x = jax.random.normal(jax.random.key(5), ids.shape + (6,))
    got = lorajax.factored(mlp_fn, strict=True)(lorajax.select(bank, ids, form=form), x)
    for n, s_ in np.ndindex(ids.shape):
        k = ids[n, s_]
        want = mlp_fn(base if k < 0 else lorajax.merge(ps[k]), x[n, s_])
        np.testing.assert_allclose(got[n, s_], want, rtol=1e-5, atol=1e-5, err_msg=f"token {n},{s_}")


def test_auto_runs_onehot_for_few_rows_per_example_and_gathers_for_many():
    rng = np.random.default_rng(0)
    base = {"wide": {"kernel": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)}}
    base["narrow"] = {"kernel": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)}
    adapters = [trained(base, k, rank=2) for k in range(3)]
    bank = lorajax.stack_adapters(adapters)
    ids = np.array([0, 2])
    sel = lorajax.select(bank, ids)  # per-example ids: the whole bank (3 adapters + zero row), decided per use
    assert sel["wide"]["kernel"].a.shape == (4, 256, 2)
    run = lorajax.factored(lambda p, x: x @ p["wide"]["kernel"])
    for rows, onehot in ((1, True), (64, False)):  # 1 x 3 adapters <= 64: one-hot; 64 x 3 > 64: gather
        x = jnp.asarray(rng.normal(size=(2, rows, 256)), jnp.float32)
        dots = computed_shapes(jax.make_jaxpr(run)(sel, x).jaxpr, only="dot_general")
        # x @ A_all: every adapter's rank columns (the zero row gets none), one 2-D matmul
        assert ((2 * rows, 6) in dots) == onehot
        assert ((2, rows, 2) in dots) != onehot  # per-example x[n] @ a[ids[n]]: the gather form's einsum
        for n, k in enumerate(ids):
            want = x[n] @ lorajax.merge(adapters[k])["wide"]["kernel"]
            np.testing.assert_allclose(run(sel, x)[n], want, rtol=1e-5, atol=1e-4)
    per_token = lorajax.select(bank, np.zeros((2, 5), np.int32))  # one-hot: the whole bank (3 adapters + zero row)
    assert per_token["wide"]["kernel"].a.shape == (4, 256, 2) and per_token["narrow"]["kernel"].a.shape == (4, 16, 2)
    with pytest.raises(ValueError, match="form='fast'"):
        lorajax.select(bank, np.array([0]), form="fast")
    with pytest.raises(ValueError, match="1-D integer array"):
        lorajax.select(bank, np.zeros((2, 2), np.int32), form="gather")


def test_per_token_ids_that_do_not_match_the_activations_are_refused():
    base = small_params()
    bank = lorajax.stack_adapters([trained(base, 0, where=r"fc/kernel")])
    x = jnp.ones((3, 4, 6))
    with pytest.raises(ValueError, match=r"ids have shape \(3, 5\) but the activations"):
        lorajax.factored(mlp_fn)(lorajax.select(bank, np.zeros((3, 5), np.int32), form="onehot"), x)


# ---------------------------------------------------------------------------------------------------------------------
# hot-swappable slots


def test_slots_put_and_evict_never_retrace_and_stay_exact():
    base = small_params()
    base = {"fc": base["fc"], "lm_head": base["lm_head"]}
    ps = {
        "a": trained(base, 0, rank=2, where=r"(fc|lm_head)/kernel", alpha=4.0),
        "b": trained(base, 1, rank=4, where=r"fc/kernel", alpha=2.0, rslora=True),
        "c": trained(base, 2, rank=1, where=r"lm_head/kernel"),
    }
    slots = lorajax.adapter_slots({"a": ps["a"]}, 2, rank=4)
    run = lorajax.factored(mlp_fn)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(bank, ids, x):
        return run(lorajax.select(bank, ids, form="onehot"), x)

    x = jax.random.normal(jax.random.key(7), (3, 6))

    def check(slots, names):
        got = serve(slots.bank, slots.ids(names), x)
        for n, name in enumerate(names):
            want = mlp_fn(base if name is None else lorajax.merge(ps[name]), x[n])
            np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-5, err_msg=f"{names}: row {n}")

    check(slots, ["a", None, "a"])
    slots = slots.put("b", ps["b"])  # rank 4 = slot rank; "b" does not adapt lm_head: zeros there
    check(slots, ["b", "a", None])
    with pytest.raises(ValueError, match=r"all 2 slots are taken"):
        slots.put("c", ps["c"])
    slots = slots.evict("a").put("c", ps["c"])  # rank 1, padded to 4; "c" lands in a's old slot
    assert slots.names == ("c", "b")
    check(slots, ["c", "b", "c"])
    slots = slots.put("b", ps["a"])  # replaced in place under the same name
    np.testing.assert_allclose(
        serve(slots.bank, slots.ids(["b"] * 3), x),
        jax.vmap(lambda v: mlp_fn(lorajax.merge(ps["a"]), v))(x),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match=r"unknown adapter names \['a'\]"):
        slots.ids(["a"])
    with pytest.raises(ValueError, match="no adapter 'zz'"):
        slots.evict("zz")


def test_slots_refuse_larger_rank_and_unknown_targets():
    base = small_params()
    slots = lorajax.adapter_slots({"a": trained(base, 0, rank=2, where=r"fc/kernel")}, 3)
    big = trained(base, 1, rank=3, where=r"(fc|q)/kernel", layout={"q": "ioo"})
    with pytest.raises(
        ValueError, match=r"(?s)AdapterSlots.put: .*rank: fc/kernel: rank 3 is larger than the slot rank 2"
    ):
        slots.put("big", big)
    with pytest.raises(ValueError, match=r"missing: q/kernel: no slot holds this kernel"):
        slots.put("big", big)
    with pytest.raises(ValueError, match="capacity=0 is below"):
        lorajax.adapter_slots({"a": trained(base, 0)}, 0)


@pytest.mark.parametrize("form", ["gather", "onehot", "ragged"])
def test_stacked_kernels_scanned_or_not_run_in_every_form(form):
    rng = np.random.default_rng(0)
    base = {"w": {"kernel": jnp.asarray(0.3 * rng.normal(size=(3, 8, 8)), jnp.float32)}}  # (layers, in, out)

    def scanned(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"]["kernel"])[0]

    def unsliced(p, x):  # the stacked kernel reaches one dot whole: the bank forms fall back to the gather form
        return jnp.einsum("bd,lde->ble", x, p["w"]["kernel"])

    ps = [trained(base, k, rank=2, where=".*", layout={".*": "sio"}) for k in range(2)]
    bank = lorajax.stack_adapters(ps)
    x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    ids = np.array([0, 1, -1, 1])
    for fn in (scanned, unsliced):
        _assert_rows_are_their_adapters(fn, bank, ids, ps, base, x, form)


# ---------------------------------------------------------------------------------------------------------------------
# DoRA and plain LoRA adapters side by side (PEFT refuses adapter_names= with DoRA). Each row's output must equal its
# adapter's merged model (lorajax.merge: the dense (m / ‖W + ΔW‖) ⊙ (W + ΔW) kernel, tests/test_dora.py checks it
# against PEFT) to 1e-5 in float32.

FORMS = ["gather", "onehot", "ragged", "auto"]


def trained_dora(base, seed, **kw):
    """trained(..., dora=True), the magnitudes moved off their start too: every gain m / ‖W + ΔW‖ is far from 1."""
    p = trained(base, seed, dora=True, **kw)
    rng = np.random.default_rng(seed + 2000)
    move = lambda m: jax.tree.map(lambda v: v * jnp.asarray(1.0 + 0.3 * rng.normal(size=v.shape), v.dtype), m)
    return jax.tree.map(
        lambda x: dataclasses.replace(x, magnitude=move(x.magnitude)) if lorajax.is_lora(x) else x,
        p,
        is_leaf=lorajax.is_lora,
    )


def as_plain(p):
    """The same factors as plain LoRA: what a bank that ignored the gains would compute."""
    plain = lambda x: dataclasses.replace(x, spec=x.spec.replace(variant="lora"), magnitude=None)
    return jax.tree.map(lambda x: plain(x) if lorajax.is_lora(x) else x, p, is_leaf=lorajax.is_lora)


@pytest.fixture(scope="module")
def dora_gpt_bank():
    model = TinyGPT(vocab=64, d_model=32)
    tokens = jax.random.randint(jax.random.key(1), (6, 8), 0, 64)
    base = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    ps = [
        trained_dora(base, 0, rank=2, where=lorajax.attn_qv, alpha=4.0),  # DenseGeneral "ioo": (heads, dim) gains
        trained(base, 1, rank=4, where=lorajax.mlp, alpha=8.0, rslora=True),  # plain
        trained_dora(base, 2, rank=3, where=r"embed/embedding|.*/(query|value|fc1)/kernel", alpha=3.0),  # + lookup
    ]
    return model, base, tokens, ps, lorajax.stack_adapters(ps)


def test_dora_bank_keeps_magnitudes_and_flags_per_row(dora_gpt_bank):
    _, _, _, ps, bank = dora_gpt_bank
    fc1 = bank.params["Block_0"]["fc1"]["kernel"]  # adapter 1 plain, adapter 2 DoRA, adapter 0 absent
    assert fc1.magnitude.shape == (4, 128) and fc1.dora.tolist() == [False, False, True, False]
    np.testing.assert_array_equal(fc1.magnitude[2], ps[2]["Block_0"]["fc1"]["kernel"].magnitude)
    q = bank.params["Block_0"]["SelfAttention_0"]["query"]["kernel"]
    assert q.magnitude.shape == (4, 4, 8) and q.dora.tolist() == [True, False, True, False]
    assert bank.params["Block_0"]["fc2"]["kernel"].magnitude is None  # only plain adapters there: no gains to pay


@pytest.mark.parametrize("form", FORMS)
def test_dora_and_plain_mixed_batch_equals_each_merged_model(dora_gpt_bank, form):
    model, base, tokens, ps, bank = dora_gpt_bank
    ids = np.array([2, -1, 0, 1, 1, 2])
    mixed = lorajax.factored(model.apply, strict=True)({"params": lorajax.select(bank, ids, form=form)}, tokens)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    worst = 0.0
    for n, k in enumerate(ids):
        alone = apply(base if k < 0 else lorajax.merge(ps[k]), tokens[n : n + 1])
        np.testing.assert_allclose(mixed[n : n + 1], alone, rtol=1e-5, atol=1e-5, err_msg=f"example {n}")
        worst = max(worst, float(np.max(np.abs(mixed[n : n + 1] - alone))))
        if k in (0, 2):  # the check can fail: ignoring the gains is far off
            assert np.max(np.abs(apply(lorajax.merge(as_plain(ps[k])), tokens[n : n + 1]) - alone)) > 1e-2
    print(f"{form}: max |bank - merged| = {worst:.2e}")


@pytest.mark.parametrize("form", ["onehot", "ragged", "auto"])
def test_dora_per_token_ids_equal_each_tokens_merged_model(form):
    base = small_params()
    base = {"fc": base["fc"], "lm_head": base["lm_head"]}
    ps = [
        trained_dora(base, 0, rank=2, where=r"(fc|lm_head)/kernel", alpha=4.0),
        trained(base, 1, rank=3, where=r"fc/kernel", alpha=1.0, rslora=True),
        trained_dora(base, 2, rank=1, where=r"lm_head/kernel"),
    ]
    assert_per_token_merged(base, ps, np.array([[0, 1, -1, 2], [1, 2, 0, -1], [-1, -1, 1, 0]]), form)


@pytest.mark.parametrize("form", FORMS)
def test_dora_stacked_kernels_scanned_or_not_run_in_every_form(form):
    rng = np.random.default_rng(0)
    base = {"w": {"kernel": jnp.asarray(0.3 * rng.normal(size=(3, 8, 8)), jnp.float32)}}  # (layers, in, out)

    def scanned(p, x):  # g (one per layer and output) rides through the per-layer slices
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"]["kernel"])[0]

    def unsliced(p, x):  # the stacked kernel reaches one dot whole: the gather form, g per layer on the output
        return jnp.einsum("bd,lde->ble", x, p["w"]["kernel"])

    ps = [trained_dora(base, 0, rank=2, where=".*", layout={".*": "sio"}), trained(base, 1, layout={".*": "sio"})]
    bank = lorajax.stack_adapters(ps)
    assert bank.params["w"]["kernel"].magnitude.shape == (3, 3, 8)
    x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    ids = np.array([0, 1, -1, 0])
    for fn in (scanned, unsliced):
        _assert_rows_are_their_adapters(fn, bank, ids, ps, base, x, form)


@pytest.mark.parametrize("form", FORMS)
def test_dora_gains_come_from_factored_norms_without_a_kernel_per_adapter(form):
    rng = np.random.default_rng(3)
    base = {"fc": {"kernel": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)}}
    ps = [trained_dora(base, k, rank=2) for k in range(3)]
    bank = lorajax.stack_adapters(ps)
    run = lorajax.factored(lambda p, x: x @ p["fc"]["kernel"], strict=True)
    x = jnp.ones((2, 64))
    big = lambda jaxpr: [s for s in computed_shapes(jaxpr) if int(np.prod(s)) >= 64 * 48]
    assert big(jax.make_jaxpr(lorajax.merge)(ps[0]).jaxpr), "the check must be able to see W + ΔW"
    served = jax.make_jaxpr(lambda bank, ids, x: run(lorajax.select(bank, ids, form=form), x))(
        bank, np.array([0, 2]), x
    )
    assert big(served.jaxpr) == []


@pytest.mark.parametrize("form", ["gather", "onehot", "ragged"])
def test_slots_change_between_dora_and_plain_without_retracing(form):
    base = small_params()
    base = {"fc": base["fc"], "lm_head": base["lm_head"]}
    ps = {
        "d": trained_dora(base, 0, rank=2, where=r"(fc|lm_head)/kernel", alpha=4.0),
        "p": trained(base, 1, rank=4, where=r"fc/kernel", alpha=2.0, rslora=True),
        "e": trained_dora(base, 2, rank=1, where=r"lm_head/kernel"),
        "q": trained(base, 3, rank=3, where=r"(fc|lm_head)/kernel"),
    }
    slots = lorajax.adapter_slots({"d": ps["d"]}, 2, rank=4)  # a DoRA adapter given: DoRA-capable slots
    run = lorajax.factored(mlp_fn)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(bank, ids, x):
        return run(lorajax.select(bank, ids, form=form), x)

    x = jax.random.normal(jax.random.key(7), (3, 6))

    def check(slots, names, adapters=ps):
        got = serve(slots.bank, slots.ids(names), x)
        for n, name in enumerate(names):
            want = mlp_fn(base if name is None else lorajax.merge(adapters[name]), x[n])
            np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-5, err_msg=f"{names}: row {n}")

    check(slots, ["d", None, "d"])
    slots = slots.put("p", ps["p"])  # plain into a free slot: gain 1 there
    check(slots, ["p", "d", None])
    slots = slots.evict("d").put("e", ps["e"])  # DoRA where DoRA was, fc left plain for "e"
    assert slots.names == ("e", "p")
    check(slots, ["e", "p", "e"])
    slots = slots.put("p", ps["d"])  # slot 1: plain -> DoRA
    slots = slots.put("e", ps["q"])  # slot 0: DoRA -> plain
    check(slots, ["e", "p", None], {"e": ps["q"], "p": ps["d"]})
    slots = slots.evict("e").evict("p")  # all free: the base model, every gain 1
    np.testing.assert_allclose(serve(slots.bank, np.full(3, -1), x), mlp_fn(base, x), rtol=1e-5, atol=1e-5)


def test_plain_slots_refuse_dora_saying_how_to_build_them():
    base = small_params()
    plain = trained(base, 0, rank=2, where=r"fc/kernel")
    dora = trained_dora(base, 1, rank=2, where=r"fc/kernel")
    with pytest.raises(
        ValueError, match=r"(?s)AdapterSlots.put: .*dora: fc/kernel: .*adapter_slots\(\.\.\., dora=True\)"
    ):
        lorajax.adapter_slots({"p": plain}, 2).put("d", dora)
    slots = lorajax.adapter_slots({"p": plain}, 2, dora=True).put("d", dora)
    got = lorajax.factored(mlp_fn)(lorajax.select(slots.bank, slots.ids(["d", "p"])), jnp.ones((2, 6)))
    for n, p in enumerate((dora, plain)):
        np.testing.assert_allclose(got[n], mlp_fn(lorajax.merge(p), jnp.ones(6)), rtol=1e-5, atol=1e-5)


def test_stack_refuses_a_dora_entry_whose_magnitude_does_not_fit():
    base = small_params()
    ad = lorajax.adapter(trained_dora(base, 0, where=r"fc/kernel"))
    f = ad["fc/kernel"]
    bad = lorajax.Adapter({"fc/kernel": dataclasses.replace(f, magnitude=f.magnitude[:3])})
    with pytest.raises(
        ValueError, match=r"shape: fc/kernel \(adapter 0\): a DoRA entry needs a magnitude of shape \(5,\).*got \(3,\)"
    ):
        lorajax.stack_adapters([bad], base=base)


def _assert_rows_are_their_adapters(fn, bank, ids, ps, base, x, form):
    """Row ``n`` of the bank's factored output equals ``fn`` on adapter ``ids[n]``'s merged params (the base for -1)."""
    got = lorajax.factored(fn, strict=True)(lorajax.select(bank, ids, form=form), x)
    for n, k in enumerate(ids):
        want = fn(base if k < 0 else lorajax.merge(ps[k]), x[n : n + 1])[0]
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-5, err_msg=f"{fn.__name__} row {n}")

"""combine_adapters' merging methods against PEFT's add_weighted_adapter, and DARE's draw.

The torch-marked tests build one tiny PyTorch model with three LoRA adapters made by PEFT (random, non-zero B),
load each saved adapter with lorajax.load_peft, combine with both libraries and compare the merged updates
(get_delta_weight of PEFT's new adapter against lorajax.delta of ours). The SVD methods are compared as products,
not factors (singular vectors' signs are the solver's choice).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

#: PEFT 0.21.2's combination types: the `combination_type` Literal of LoraModel.add_weighted_adapter
#: (peft/tuners/lora/model.py), also listed in its docstring. test_peft_lists_the_same_methods checks it.
PEFT_METHODS = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
#: The options each method needs (density: the pruning methods; key: DARE).
OPTIONS = {
    m: {
        **({"density": 0.5} if m not in ("svd", "linear", "cat") else {}),
        **({"key": jax.random.key(3)} if m.startswith("dare") else {}),
    }
    for m in PEFT_METHODS
}
DETERMINISTIC = [m for m in PEFT_METHODS if not m.startswith("dare")]
WEIGHTS = [0.7, -0.4, 1.1]


def np64(x):
    return np.asarray(x, np.float64)


def nodes(params) -> dict[str, lorajax.LoRA]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lorajax.is_lora)[0]
    return {lorajax.path_str(p): leaf for p, leaf in leaves if lorajax.is_lora(leaf)}


def deltas(base, combined: lorajax.Adapter) -> dict[str, np.ndarray]:
    return {name: np64(lorajax.delta(node)) for name, node in nodes(lorajax.attach(base, combined)).items()}


def rel(got, want) -> float:
    return float(np.abs(np64(got) - np64(want)).max() / np.abs(np64(want)).max())


def random_adapter(base, seed, rank=2, alpha=4.0, where=".*", **kw) -> lorajax.Adapter:
    """An adapter with random a and b, as after training."""
    p = lorajax.lorafy(base, rank=rank, alpha=alpha, where=where, key=jax.random.key(seed), **kw)
    rng = np.random.default_rng(seed)
    rand = lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    p = jax.tree.map(
        lambda x: dataclasses.replace(x, a=rand(x.a), b=rand(x.b)) if lorajax.is_lora(x) else x,
        p,
        is_leaf=lorajax.is_lora,
    )
    return lorajax.adapter(p)


# ---------------------------------------------------------------------------------------------------------------------
# Without PyTorch: every method runs, DARE's statistics, the options' checks


@pytest.fixture(scope="module")
def small():
    base = {"fc": {"kernel": jnp.ones((6, 5))}, "emb": {"embedding": jnp.ones((7, 4))}}
    return base, [random_adapter(base, s, alpha=2.0 + s) for s in (1, 2, 3)]


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_peft_method_runs(small, method):
    base, ads = small
    out = lorajax.combine_adapters(ads, WEIGHTS, method=method, **OPTIONS[method])
    assert out.metadata["combine"]["method"] == method
    assert out.targets == ads[0].targets
    want_rank = 6 if method == "cat" else 2
    assert all(out[t].rank == want_rank and out[t].scale == 1.0 for t in out.targets)
    assert all(np.isfinite(d).all() and np.abs(d).max() > 0 for d in deltas(base, out).values())


def test_one_adapter_is_merged_linearly_as_in_peft(small):
    # PEFT turns every method into 'linear' for a single adapter: w·ΔW exactly, nothing pruned.
    base, ads = small
    want = deltas(base, lorajax.combine_adapters(ads[:1], [-0.6], method="cat"))
    for method in ("ties", "dare_ties_svd", "magnitude_prune"):
        out = lorajax.combine_adapters(ads[:1], [-0.6], method=method, **OPTIONS[method])
        assert out.metadata["combine"]["applied"] == "linear"
        for name, d in deltas(base, out).items():
            assert rel(d, want[name]) < 1e-6, (method, name)


def test_linear_has_peft_cross_terms(small):
    # linear merges a and b separately: (Σ ±√|wᵢsᵢ| aᵢ)(Σ √|wⱼsⱼ| bⱼ), cross terms included (float64 reference).
    base, ads = small
    out = lorajax.combine_adapters(ads, WEIGHTS, method="linear")
    for name in out.targets:
        ws = [w * ad[name].scale for w, ad in zip(WEIGHTS, ads)]
        a = sum(math.copysign(math.sqrt(abs(w)), w) * np64(ad[name].a) for w, ad in zip(ws, ads))
        b = sum(math.sqrt(abs(w)) * np64(ad[name].b) for w, ad in zip(ws, ads))
        np.testing.assert_allclose(deltas(base, out)[name], a @ b, rtol=1e-5, atol=1e-5)


def test_dare_keeps_density_and_rescales():
    base = {"w": {"kernel": jnp.ones((64, 48))}}
    ads = [random_adapter(base, s, rank=8) for s in (1, 2)]
    name, d = "w/kernel", 0.3
    for method, part in (("dare_linear", "a"), ("dare_linear", "b"), ("dare_linear_svd", "delta")):
        # Weight 0 on the second adapter: what is left is the first one, dropped and rescaled.
        svd = {"rank": 8} if part == "delta" else {}
        out = lorajax.combine_adapters(ads, [2.0, 0.0], method=method, density=d, key=jax.random.key(7), **svd)
        masks = lorajax.dare_masks(ads, method, d, jax.random.key(7))[name][part]
        f0 = ads[0][name]
        if part == "delta":
            got, dense, scale = np64(lorajax.delta(nodes(lorajax.attach(base, out))[name])), np64(f0.a @ f0.b), 2.0
            dense = dense * f0.scale
            # The SVD keeps the top 8 of a full-rank dropped update: compare the dropped update's own best rank 8.
            kept = np.where(np.asarray(masks[0]), dense / d * scale, 0.0)
            u, s, vh = np.linalg.svd(kept)
            np.testing.assert_allclose(got, (u[:, :8] * s[:8]) @ vh[:8], rtol=1e-4, atol=1e-4 * np.abs(kept).max())
            mask = np.asarray(masks[0])
        else:
            w = math.sqrt(2.0 * f0.scale)
            got = np64(getattr(out[name], part))
            mask = got != 0
            np.testing.assert_array_equal(mask, np.asarray(masks[0]))  # dare_masks shows exactly what was dropped
            np.testing.assert_allclose(got[mask], (w * np64(getattr(f0, part)) / d)[mask], rtol=1e-6)
        n = mask.size
        sigma = math.sqrt(d * (1 - d) / n)
        assert abs(mask.mean() - d) <= 3 * sigma, (method, part, mask.mean(), d, sigma)
    again = lorajax.combine_adapters(ads, [2.0, 0.5], method="dare_ties", density=d, key=jax.random.key(7))
    same = lorajax.combine_adapters(ads, [2.0, 0.5], method="dare_ties", density=d, key=jax.random.key(7))
    other = lorajax.combine_adapters(ads, [2.0, 0.5], method="dare_ties", density=d, key=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(again[name].a), np.asarray(same[name].a))
    assert not np.array_equal(np.asarray(again[name].a), np.asarray(other[name].a))


def test_pruning_counts_each_stacked_layer_on_its_own():
    # A stacked ("sio") kernel is one PEFT module per layer: TIES on the stack equals TIES on each layer alone.
    base = {"layers": {"kernel": jnp.ones((3, 6, 5))}}
    ads = [random_adapter(base, s, rank=2, layout={".*": "sio"}) for s in (1, 2)]
    for method in ("ties", "magnitude_prune_svd"):
        svd = {"rank": 2} if method.endswith("svd") else {}
        stacked = lorajax.combine_adapters(ads, [1.0, 0.5], method=method, density=0.4, **svd)
        got = np64(lorajax.delta(nodes(lorajax.attach(base, stacked))["layers/kernel"]))
        for layer in range(3):
            one = {"k": {"kernel": jnp.ones((6, 5))}}
            sliced = [
                lorajax.Adapter(
                    {
                        "k/kernel": lorajax.AdapterFactors(
                            ad["layers/kernel"].a[layer],
                            ad["layers/kernel"].b[layer],
                            dataclasses.replace(ad["layers/kernel"].spec, layout=lorajax.Layout("io")),
                            shape=(6, 5),
                            dtype="float32",
                        )
                    }
                )
                for ad in ads
            ]
            alone = lorajax.combine_adapters(sliced, [1.0, 0.5], method=method, density=0.4, **svd)
            want = np64(lorajax.delta(nodes(lorajax.attach(one, alone))["k/kernel"]))
            assert rel(got[layer], want) < 1e-5, (method, layer)


def test_combine_checks_the_options(small):
    _, ads = small
    with pytest.raises(ValueError, match="method must be one of 'cat', 'linear', 'ties'"):
        lorajax.combine_adapters(ads, WEIGHTS, method="tie")
    with pytest.raises(ValueError, match="'ties' prunes each adapter: give density="):
        lorajax.combine_adapters(ads, WEIGHTS, method="ties")
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        lorajax.combine_adapters(ads, WEIGHTS, method="ties", density=0.0)
    with pytest.raises(ValueError, match="density applies to ties, "):
        lorajax.combine_adapters(ads, WEIGHTS, method="linear", density=0.5)
    with pytest.raises(ValueError, match="give key=jax.random.key"):
        lorajax.combine_adapters(ads, WEIGHTS, method="dare_ties", density=0.5)
    with pytest.raises(ValueError, match="key applies to the DARE methods only"):
        lorajax.combine_adapters(ads, WEIGHTS, method="ties", density=0.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="majority_sign_method must be 'total' or 'frequency', got 'mean'"):
        lorajax.combine_adapters(ads, WEIGHTS, method="ties", density=0.5, majority_sign_method="mean")
    with pytest.raises(ValueError, match="majority_sign_method applies to ties, "):
        lorajax.combine_adapters(ads, WEIGHTS, method="magnitude_prune", density=0.5, majority_sign_method="total")
    with pytest.raises(ValueError, match="rank applies to the SVD methods only"):
        lorajax.combine_adapters(ads, WEIGHTS, method="ties", density=0.5, rank=2)
    with pytest.raises(ValueError, match="clamp applies to the SVD methods only"):
        lorajax.combine_adapters(ads, WEIGHTS, method="linear", clamp=0.9)
    with pytest.raises(ValueError, match=r"clamp must be a quantile in \[0, 1\]"):
        lorajax.combine_adapters(ads, WEIGHTS, method="svd", clamp=2)
    with pytest.raises(ValueError, match="dare_masks: method must be one of 'dare_linear'"):
        lorajax.dare_masks(ads, "ties", 0.5, jax.random.key(0))


def test_factor_methods_need_equal_ranks(small):
    base, ads = small
    r3 = random_adapter(base, 9, rank=3)
    same_rank = r"same rank at each target \(2 problems\):\n  - rank: emb/embedding: adapter 0 rank 2, adapter 1 rank 3"
    with pytest.raises(ValueError, match=same_rank):
        lorajax.combine_adapters([ads[0], r3], [1.0, 1.0], method="ties", density=0.5)
    assert lorajax.combine_adapters([ads[0], r3], [1.0, 1.0], method="ties_svd", density=0.5)["fc/kernel"].rank == 3


# ---------------------------------------------------------------------------------------------------------------------
# Against PEFT: adapters PEFT wrote, merged by both libraries

#: (module, kind, lorajax path) of the PyTorch model below, in PEFT's module order.
MODULES = (
    ("emb", "embed", "params/emb/embedding"),
    ("fc1", "dense", "params/fc1/kernel"),
    ("fc2", "dense", "params/fc2/kernel"),
    ("conv", "conv", "params/conv/kernel"),
)


@pytest.fixture(scope="module")
def peft_side(tmp_path_factory):
    """A PEFT model with three random LoRA adapters (rsLoRA, other alphas, one on two modules only), and ours."""
    import torch
    from _peft_twins import twin_params
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc1 = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 8)
            self.fc2, self.conv = torch.nn.Linear(8, 5), torch.nn.Conv2d(3, 4, 2)

    torch.manual_seed(0)
    net = Net()
    base = twin_params({k: v.detach().numpy() for k, v in net.state_dict().items()}, lambda m: (m,), in_out=False)
    every = [m for m, _, _ in MODULES]
    configs = [  # init_lora_weights=False: B random too, as after training
        LoraConfig(r=2, lora_alpha=4, target_modules=every, init_lora_weights=False),
        LoraConfig(r=2, lora_alpha=3, target_modules=every, init_lora_weights=False, use_rslora=True),
        LoraConfig(r=2, lora_alpha=5, target_modules=["fc1", "fc2"], init_lora_weights=False),
    ]
    pm = get_peft_model(net, configs[0], adapter_name="t0")
    for k in (1, 2):
        pm.add_adapter(f"t{k}", configs[k])
    root = tmp_path_factory.mktemp("peft_adapters")
    pm.save_pretrained(str(root))  # the first adapter at the root is "t0" in its own folder like the others
    ads = [lorajax.adapter(lorajax.load_peft(root / f"t{k}", base)) for k in range(3)]
    return pm, base, ads


def peft_deltas(pm, name: str) -> dict[str, np.ndarray]:
    """get_delta_weight of PEFT's adapter ``name`` at every module, in lorajax's layouts."""
    import torch

    modules = dict(pm.base_model.model.named_modules())
    out = {}
    for module, kind, path in MODULES:
        with torch.no_grad():
            d = modules[module].get_delta_weight(name).numpy()
        out[path] = np.transpose(d, (2, 3, 1, 0)) if kind == "conv" else d if kind == "embed" else d.T
    return out


def both(peft_side, method: str, **options) -> tuple[dict, dict]:
    """(PEFT's merged updates, ours) for one method and its options (PEFT's names: density, svd_clamp, ...)."""
    pm, base, ads = peft_side
    name = f"merged{len(pm.peft_config)}"
    pm.add_weighted_adapter(["t0", "t1", "t2"], WEIGHTS, name, combination_type=method, **options)
    ours = {"clamp" if k == "svd_clamp" else k: v for k, v in options.items()}
    if method.startswith("dare"):
        ours["key"] = jax.random.key(11)  # the key test_dare_equals_peft_given_the_same_masks draws its masks from
    return peft_deltas(pm, name), deltas(base, lorajax.combine_adapters(ads, WEIGHTS, method=method, **ours))


def canonical_svd(svd):
    """torch.linalg.svd with lorajax's signs: the largest entry of each right singular vector (PEFT's lora_A) > 0."""
    import torch

    def fixed(a, *args, **kw):
        u, s, vh = svd(a, *args, **kw)
        k = len(s)
        pick = vh[:k].abs().argmax(dim=1, keepdim=True)
        sign = torch.where(vh[:k].gather(1, pick) < 0, -1.0, 1.0)  # (k, 1)
        vh, u = vh.clone(), u.clone()
        vh[:k] *= sign
        u[:, :k] *= sign.T
        return u, s, vh

    return fixed


@pytest.mark.torch
def test_peft_lists_the_same_methods():
    import typing

    from peft.tuners.lora import LoraModel

    hints = typing.get_type_hints(LoraModel.add_weighted_adapter)
    assert set(typing.get_args(hints["combination_type"])) == set(PEFT_METHODS)


@pytest.mark.torch
@pytest.mark.parametrize(
    "method, options",
    [(m, {"density": 0.5} if OPTIONS[m] else {}) for m in DETERMINISTIC]
    + [
        ("ties", {"density": 0.4, "majority_sign_method": "frequency"}),
        ("ties_svd", {"density": 0.7, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 1.0}),  # nothing pruned: PEFT's 'linear'
    ],
)
def test_deterministic_methods_equal_peft(peft_side, method, options):
    theirs, ours = both(peft_side, method, **options)
    assert set(ours) == set(theirs)
    for path, want in theirs.items():
        assert np.abs(want).max() > 0.1
        assert rel(ours[path], want) < 1e-5, (method, path, rel(ours[path], want))


@pytest.mark.torch
@pytest.mark.parametrize("method", ["svd", "ties_svd"])
def test_svd_clamp_equals_peft_given_the_same_signs(peft_side, method, monkeypatch):
    import torch

    # The clamp cuts at a quantile of the factors' entries, which depends on the singular vectors' signs; PEFT leaves
    # them to the solver, so its SVD runs with lorajax's sign rule here.
    monkeypatch.setattr(torch.linalg, "svd", canonical_svd(torch.linalg.svd))
    options = {"density": 0.6} if method == "ties_svd" else {}
    theirs, ours = both(peft_side, method, svd_clamp=0.8, **options)
    unclamped = both(peft_side, method, **options)[1]
    for path, want in theirs.items():
        assert rel(ours[path], want) < 1e-5, (method, path, rel(ours[path], want))
        assert rel(unclamped[path], want) > 1e-3  # the clamp changed something


@pytest.mark.torch
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_equals_peft_given_the_same_masks(peft_side, method, monkeypatch):
    import torch

    pm, base, ads = peft_side
    masks = lorajax.dare_masks(ads, method, 0.6, jax.random.key(11))
    factors = not method.endswith("_svd")
    # PEFT draws one torch.bernoulli mask per tensor: module by module, the A of each adapter then the B of each
    # (factor methods) or each adapter's update (SVD methods). Hand it ours, in torch's layout, in that order.
    queue = []
    for _, kind, path in MODULES:
        for part in ("a", "b") if factors else ("delta",):
            for m in masks[path][part]:
                if m is None:
                    continue
                m = np.asarray(m)
                if kind == "conv" and part != "b":
                    m = np.transpose(m, (3, 2, 0, 1))  # (kh, kw, in, r|out) -> (r|out, in, kh, kw)
                elif kind == "conv":
                    m = m.T[:, :, None, None]  # (r, out) -> (out, r, 1, 1)
                elif not (kind == "embed" and part == "delta"):
                    m = m.T
                queue.append(torch.from_numpy(m.copy()))

    def bernoulli(p, *args, **kw):
        m = queue.pop(0)
        assert tuple(m.shape) == tuple(p.shape)
        assert float(p.flatten()[0]) == pytest.approx(0.6)
        return m.to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    theirs, ours = both(peft_side, method, density=0.6)
    assert not queue
    for path, want in theirs.items():
        assert rel(ours[path], want) < 1e-5, (method, path, rel(ours[path], want))


@pytest.mark.torch
def test_where_peft_rescales_by_rslora_we_do_not(peft_side):
    # PEFT 0.21.2 copies the first adapter's config into the merged one with lora_alpha = r: if that adapter uses
    # rsLoRA, the merged update is scaled by r/√r = √r. lorajax gives Σ wᵢ·ΔWᵢ (scale 1) whatever the order.
    pm, base, ads = peft_side
    order = [1, 0, 2]  # t1, the rsLoRA adapter, first
    name = f"merged{len(pm.peft_config)}"
    pm.add_weighted_adapter([f"t{k}" for k in order], [WEIGHTS[k] for k in order], name, combination_type="cat")
    theirs = peft_deltas(pm, name)
    ours = deltas(base, lorajax.combine_adapters([ads[k] for k in order], [WEIGHTS[k] for k in order], method="cat"))
    rank = 6  # PEFT's merged r for "cat": the sum of the configs' r (2 + 2 + 2), the same for every module
    for path, want in theirs.items():
        assert rel(ours[path] * math.sqrt(rank), want) < 1e-5, path


def test_combine_refuses_adapters_with_trained_leaves():
    base = {"fc": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
    ad = lorajax.adapter(lorajax.lorafy(base, rank=2, where=["fc"], also=["head"]))
    with pytest.raises(ValueError, match=r"combine_adapters: the adapters carry trained leaves .*head/kernel"):
        lorajax.combine_adapters([ad, ad], [0.5, 0.5], method="linear")

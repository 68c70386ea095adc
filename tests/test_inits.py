"""PiSSA, pissa_niter_k and OLoRA inits, and the export of such adapters to plain LoRA.

Parity with PEFT 0.21 runs on committed fixtures (tests/fixtures/make_peft_init_fixtures.py):
products ``s * B @ A`` and residual bases are compared (singular-vector and QR signs are free).
Other layouts are checked against NumPy's SVD/QR of the kernel's matrix view.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import assert_within, order_bound, sum_bound
from safetensors.numpy import load_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
PEFT_CASES = {"pissa": "pissa", "pissa_rslora": "pissa", "olora": "olora"}


def _case(case):
    folder = FIXTURES / case
    config = json.loads((folder / "initial" / "adapter_config.json").read_text())
    base = load_file(folder / "base.safetensors")
    params = {
        m: {"weight": jnp.asarray(base[f"{m}.weight"]), "bias": jnp.asarray(base[f"{m}.bias"])} for m in ("fc1", "fc2")
    }
    return folder, config, params


def _lorafy_case(case, params, config):
    return lorajax.lorafy(
        params,
        rank=config["r"],
        alpha=config["lora_alpha"],
        rslora=config["use_rslora"],
        where=["fc1", "fc2"],
        init=PEFT_CASES[case],
    )


def _mlp(kernels, x):
    h = jnp.tanh(x @ kernels["fc1"]["weight"].T + kernels["fc1"]["bias"])
    return h @ kernels["fc2"]["weight"].T + kernels["fc2"]["bias"]


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_init_matches_peft(case):
    folder, config, params = _case(case)
    lora = _lorafy_case(case, params, config)
    init = load_file(folder / "initial" / "adapter_model.safetensors")
    residual = load_file(folder / "residual.safetensors")
    r, alpha = config["r"], config["lora_alpha"]
    s = alpha / (np.sqrt(r) if config["use_rslora"] else r)
    for m in ("fc1", "fc2"):
        node = lora[m]["weight"]
        assert node.spec.init == PEFT_CASES[case]
        A = init[f"base_model.model.{m}.lora_A.weight"].astype(np.float64)
        B = init[f"base_model.model.{m}.lora_B.weight"].astype(np.float64)
        # Layout "oi" is PyTorch's own, so our delta is PEFT's s * B @ A directly.
        np.testing.assert_allclose(np.asarray(lorajax.delta(node)), s * B @ A, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(node.base), residual[f"{m}.weight"], atol=1e-5, rtol=0)
    merged = lorajax.merge(lora)
    for m in ("fc1", "fc2"):
        np.testing.assert_allclose(np.asarray(merged[m]["weight"]), np.asarray(params[m]["weight"]), atol=1e-6, rtol=0)


def _svd_top(m, r):
    u, sv, vh = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return (u[:, :r] * sv[:r]) @ vh[:r]


LAYOUTS = {
    # name: (path, shape, layout string or None, matrix view of the kernel as numpy (fan_in, fan_out))
    "dense": ("fc/kernel", (12, 10), None, lambda w: w),
    "torch_linear": ("fc/weight", (10, 12), None, lambda w: w.T),
    "dense_general": ("attn/query/kernel", (12, 2, 5), "ioo", lambda w: w.reshape(12, 10)),
    "attn_out": ("attn/out/kernel", (2, 5, 12), "iio", lambda w: w.reshape(10, 12)),
    "conv": ("Conv_0/kernel", (3, 3, 2, 4), None, lambda w: w.reshape(18, 4)),
    "embedding": ("Embed_0/embedding", (10, 6), None, lambda w: w),
}


def _tree(path, w):
    out = w
    for part in reversed(path.split("/")):
        out = {part: out}
    return out


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_against_numpy(name, init):
    path, shape, layout, view = LAYOUTS[name]
    w = jax.random.normal(jax.random.key(3), shape)
    r, alpha = 2, 3.0
    lay = None if layout is None else {".*": layout}
    lora = jax.jit(lambda p: lorajax.lorafy(p, rank=r, alpha=alpha, where=".*", init=init, layout=lay))(_tree(path, w))
    node = _get(lora, path)
    m = view(np.asarray(w, np.float64))
    if init == "pissa":
        want = _svd_top(m, r)
    else:  # PEFT: Q, R = qr(W) of the (out, in) matrix; s * Q[:, :r] @ R[:r] (no division by the scale)
        q, rr = np.linalg.qr(m.T)
        want = (alpha / r) * (q[:, :r] @ rr[:r]).T
    got = view(np.asarray(lorajax.delta(node), np.float64))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(view(np.asarray(node.base, np.float64)), m - want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(_get(lorajax.merge(lora), path)), np.asarray(w), atol=1e-6, rtol=0)
    assert lorajax.unlorafy(lora) is not None and _get(lorajax.unlorafy(lora), path) is node.base


def test_stacked_one_factorisation_per_layer():
    w = jax.random.normal(jax.random.key(4), (3, 8, 6))
    lora = jax.jit(lambda p: lorajax.lorafy(p, rank=2, where=".*", init="pissa", layout={".*": "sio"}))(
        {"h": {"kernel": w}}
    )
    node = lora["h"]["kernel"]
    assert node.a.shape == (3, 8, 2) and node.b.shape == (3, 2, 6)
    d = np.asarray(lorajax.delta(node), np.float64)
    for k in range(3):
        np.testing.assert_allclose(d[k], _svd_top(w[k], 2), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lorajax.merge(lora)["h"]["kernel"]), np.asarray(w), atol=1e-6, rtol=0)


def test_pissa_niter_starts_at_the_base_and_finds_the_top_subspace():
    # A kernel with a clear spectral gap: the randomized SVD's top-2 product must be the exact one.
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    u = jnp.linalg.qr(jax.random.normal(k1, (64, 64)))[0]
    v = jnp.linalg.qr(jax.random.normal(k2, (48, 48)))[0]
    sv = jnp.concatenate([jnp.array([10.0, 8.0]), 0.1 * jax.random.uniform(k3, (46,))])
    w = (u[:, :48] * sv) @ v.T
    lora = lorajax.lorafy({"fc": {"kernel": w}}, rank=2, where=["fc"], init="pissa_niter_4")
    node = lora["fc"]["kernel"]
    assert node.spec.init == "pissa_niter_4"
    np.testing.assert_allclose(np.asarray(lorajax.merge(lora)["fc"]["kernel"]), np.asarray(w), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(lorajax.delta(node)), _svd_top(w, 2), atol=1e-3, rtol=0)
    # niter matters: different keys, same product; and the key reaches the sketch
    other = lorajax.lorafy({"fc": {"kernel": w}}, rank=2, where=["fc"], init="pissa_niter_4", key=jax.random.key(9))
    np.testing.assert_allclose(np.asarray(lorajax.delta(other["fc"]["kernel"])), _svd_top(w, 2), atol=1e-3, rtol=0)


def test_bf16_base_residual_and_abstract():
    w = jax.random.normal(jax.random.key(6), (16, 8)).astype(jnp.bfloat16)
    lora = lorajax.lorafy({"fc": {"kernel": w}}, rank=2, where=["fc"], init="pissa")
    node = lora["fc"]["kernel"]
    assert node.base.dtype == jnp.bfloat16 and node.a.dtype == jnp.float32
    merged = np.asarray(lorajax.merge(lora)["fc"]["kernel"], np.float32)
    # The residual is rounded to bfloat16 (as in PEFT), then the merge once more: half an ulp of each.
    ulp = (np.abs(np.asarray(w, np.float32)) + np.abs(np.asarray(node.base, np.float32))) * 2.0**-8
    assert (np.abs(merged - np.asarray(w, np.float32)) <= ulp).all()
    out = jax.eval_shape(lambda p: lorajax.lorafy(p, rank=2, where=["fc"], init="olora"), {"fc": {"kernel": w}})
    assert out["fc"]["kernel"].base.shape == (16, 8) and out["fc"]["kernel"].a.shape == (16, 2)


def test_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match=r"lorafy: init must be .*pissa_niter_<k>.*got 'pisa'"):
        lorajax.lorafy({"fc": {"kernel": jnp.ones((4, 4))}}, rank=2, where=["fc"], init="pisa")


def _trained(case):
    folder, config, params = _case(case)
    initial = _lorafy_case(case, params, config)
    io = load_file(folder / "io.safetensors")

    def put(node, m):
        a = jnp.asarray(io[f"base_model.model.{m}.lora_A.default.weight"]).T
        b = jnp.asarray(io[f"base_model.model.{m}.lora_B.default.weight"]).T
        return node.__class__(node.base, a, b, node.spec)

    trained = {m: {**initial[m], "weight": put(initial[m]["weight"], m)} for m in ("fc1", "fc2")}
    return folder, config, params, initial, trained, io


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_to_plain_lora_matches_peft_conversion(case):
    folder, config, params, initial, trained, io = _trained(case)
    y = _mlp(lorajax.merge(trained), jnp.asarray(io["x"]))
    np.testing.assert_allclose(np.asarray(y), io["y"], atol=1e-5, rtol=0)  # our residual runs PEFT's trained model
    plain = lorajax.to_plain_lora(trained, initial)
    conv = load_file(folder / "converted" / "adapter_model.safetensors")
    conv_cfg = json.loads((folder / "converted" / "adapter_config.json").read_text())
    base = load_file(folder / "base.safetensors")
    s2 = conv_cfg["lora_alpha"] / (np.sqrt(conv_cfg["r"]) if conv_cfg["use_rslora"] else conv_cfg["r"])
    for m in ("fc1", "fc2"):
        node = plain[m]["weight"]
        assert node.rank == conv_cfg["r"] == 2 * config["r"] and node.spec.init == "default"
        assert node.alpha == pytest.approx(conv_cfg["lora_alpha"])
        np.testing.assert_allclose(np.asarray(node.base), base[f"{m}.weight"], atol=1e-6, rtol=0)
        A, B = conv[f"base_model.model.{m}.lora_A.weight"], conv[f"base_model.model.{m}.lora_B.weight"]
        np.testing.assert_allclose(np.asarray(lorajax.delta(node)), s2 * B.astype(np.float64) @ A, atol=1e-5, rtol=0)
    y_plain = _mlp(lorajax.merge(plain), jnp.asarray(io["x"]))
    np.testing.assert_allclose(np.asarray(y_plain), io["y"], atol=1e-5, rtol=0)


def test_save_peft_initial_writes_the_conversion(tmp_path):
    folder, config, params, initial, trained, io = _trained("pissa_rslora")
    with pytest.raises(ValueError, match=r"save_peft: PiSSA/OLoRA nodes need initial= (?s:.*)residual base"):
        lorajax.save_peft(tmp_path / "no", trained)
    cfg = lorajax.save_peft(tmp_path / "out", trained, initial=initial)
    want = json.loads((folder / "converted" / "adapter_config.json").read_text())
    assert cfg["r"] == want["r"] == 6 and cfg["lora_alpha"] == pytest.approx(want["lora_alpha"])
    assert cfg["init_lora_weights"] is True and cfg["use_rslora"] is True
    loaded = lorajax.load_peft(tmp_path / "out", params)
    y = _mlp(lorajax.merge(loaded), jnp.asarray(io["x"]))
    np.testing.assert_allclose(np.asarray(y), io["y"], atol=1e-5, rtol=0)


def test_to_plain_lora_refuses_a_missing_initial():
    w = jnp.eye(6)
    lora = lorajax.lorafy({"fc": {"kernel": w}, "g": {"kernel": w}}, rank=2, where=["fc", "g"], init="olora")
    with pytest.raises(ValueError, match=r"to_plain_lora: .*\n.*g/kernel: initial holds no LoRA node"):
        lorajax.to_plain_lora(lora, {"fc": lora["fc"], "g": {"kernel": w}})


def test_adapter_file_records_the_init(tmp_path):
    w = jax.random.normal(jax.random.key(7), (8, 6))
    lora = lorajax.lorafy({"fc": {"kernel": w}}, rank=2, where=["fc"], init="pissa")
    f = os.fspath(tmp_path / "a.safetensors")
    lorajax.save_adapter(f, lora)
    assert lorajax.read_adapter(f)["fc/kernel"].spec.init == "pissa"
    with pytest.raises(ValueError, match=r"load_adapter: (?s:.*)fc/kernel: .*pissa residual"):
        lorajax.load_adapter(f, {"fc": {"kernel": w}})
    again = lorajax.load_adapter(f, lorajax.lorafy({"fc": {"kernel": w}}, rank=2, where=["fc"], init="pissa"))
    np.testing.assert_allclose(np.asarray(lorajax.merge(again)["fc"]["kernel"]), np.asarray(w), atol=1e-6, rtol=0)


@pytest.mark.torch
def test_peft_loads_the_export(tmp_path):
    import importlib.util

    import torch
    from peft import PeftModel

    spec = importlib.util.spec_from_file_location("mpf", Path(__file__).parent / "fixtures" / "make_peft_fixtures.py")
    mpf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mpf)
    for case in sorted(PEFT_CASES):
        folder, config, params, initial, trained, io = _trained(case)
        lorajax.save_peft(tmp_path / case, trained, initial=initial)
        pm = PeftModel.from_pretrained(mpf.base_model("linear"), str(tmp_path / case)).eval()
        with torch.no_grad():
            y = pm(torch.from_numpy(io["x"])).numpy()
        np.testing.assert_allclose(y, io["y"], atol=1e-5, rtol=0)


# EVA ---------------------------------------------------------------------------------------------------------------

EVA = FIXTURES / "eva"


def _eva_case():
    base = load_file(EVA / "base.safetensors")
    params = {
        m: {"weight": jnp.asarray(base[f"{m}.weight"]), "bias": jnp.asarray(base[f"{m}.bias"])}
        for m in ("fc1", "fc2", "fc3")
    }
    xs = load_file(EVA / "batches.safetensors")
    batches = [jnp.asarray(xs[f"x{k}"]) for k in range(len(xs))]
    return params, batches, json.loads((EVA / "eva.json").read_text())


def _eva_fn(p, x):
    h = jnp.tanh(x @ p["fc1"]["weight"].T + p["fc1"]["bias"])
    h = jnp.tanh(h @ p["fc2"]["weight"].T + p["fc2"]["bias"])
    return h @ p["fc3"]["weight"].T + p["fc3"]["bias"]


def test_eva_rank_redistribution_matches_peft():
    params, batches, cfg = _eva_case()
    lora = lorajax.eva_init(
        _eva_fn, params, batches, rank=cfg["r"], rho=cfg["rho"], tau=cfg["tau"], where=["fc1", "fc2", "fc3"]
    )
    ranks = {m: lora[m]["weight"].rank for m in ("fc1", "fc2", "fc3")}
    assert ranks == cfg["ranks"] == {"fc1": 2, "fc2": 3, "fc3": 4}
    peft_rows = load_file(EVA / "eva.safetensors")
    for m, k in ranks.items():
        node = lora[m]["weight"]
        assert node.alpha == pytest.approx(k) and node.scale == pytest.approx(1.0)  # adjust_scaling_factors
        assert float(jnp.abs(node.b).max()) == 0.0
        a = np.asarray(node.a).T  # (k, fan_in): our rows, PEFT's lora_A rows
        cos = np.abs(np.sum(a * peft_rows[m], axis=1))
        assert (cos >= 0.99).all(), (m, cos)
    merged = lorajax.merge(lora)
    for m in ("fc1", "fc2", "fc3"):
        assert (np.asarray(merged[m]["weight"]) == np.asarray(params[m]["weight"])).all()


def test_eva_directions_against_numpy_svd():
    params, batches, _ = _eva_case()
    with pytest.warns(UserWarning, match="did not converge"):
        lora = lorajax.eva_init(_eva_fn, params, batches[:6], rank=3, rho=1.0, tau=2.0, where=["fc2"])
    x = np.concatenate([np.asarray(b, np.float64) for b in batches[:6]])
    p = {m: {k: np.asarray(v, np.float64) for k, v in params[m].items()} for m in params}
    h = np.tanh(x @ p["fc1"]["weight"].T + p["fc1"]["bias"])  # fc2's inputs, recorded independently
    _, _, vh = np.linalg.svd(h - h.mean(0), full_matrices=False)
    a = np.asarray(lora["fc2"]["weight"].a, np.float64)
    cos = np.abs(np.sum(a.T * vh[:3], axis=1)) / np.linalg.norm(a, axis=0)
    assert (cos >= 0.999).all(), cos
    assert not lorajax.is_lora(lora["fc1"]["weight"])


def test_eva_reports_unsupported_uses():
    w = jnp.ones((10, 4))
    with pytest.raises(ValueError, match=r"eva_init: cannot record (?s:.*)emb/embedding: consumed by"):
        lorajax.eva_init(
            lambda p, i: p["emb"]["embedding"][i], {"emb": {"embedding": w}}, [jnp.arange(3)], rank=2, where=["emb"]
        )


_SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, json, lorajax
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2, 2), ("fsdp", "tp"))
w = jax.device_put(jax.random.normal(jax.random.key(0), (2, 16, 8)), NamedSharding(mesh, P(None, "fsdp", "tp")))
out = {}
for init in ("pissa", "pissa_niter_2", "olora"):
    run = lambda p, init=init: lorajax.lorafy(p, rank=2, where="fc/kernel", init=init, layout={"fc": "sio"})
    for how, f in (("eager", run), ("jit", jax.jit(run))):
        n = f({"fc": {"kernel": w}})["fc"]["kernel"]
        err = float(jnp.abs(lorajax.merge({"k": n})["k"] - w).max())
        out[init + "/" + how] = [str(n.a.sharding.spec), str(n.b.sharding.spec), str(n.base.sharding.spec), err]
print(json.dumps(out))
"""


def test_sharded_bases_keep_their_sharding():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for case, (a, b, base, err) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        if case.endswith("eager"):  # under jit the placement is the caller's out_shardings (lorajax.partition_specs)
            assert (a, b, base) == ("P(None, 'fsdp', None)", "P(None, None, 'tp')", "P(None, 'fsdp', 'tp')"), case
        assert err <= 1e-6, case


def _regenerated_init_bounds(config, files):
    """Bounds on ``|run1 - run2|`` for a PiSSA/OLoRA fixture's computed tensors, from perturbation theory.

    Each run's SVD/QR is backward stable: the exact factorisation of ``W + E`` with ``||E||_2 <= gamma(m n)
    ||W||_F`` (two runs: twice that, ``dw``). First order (Wedin; Stewart & Sun), a singular vector moves by
    ``dw / gap`` (its gap to the other singular values, 0 included when W is not square), a singular value by
    ``dw``; the rank-r projector by ``dw / gap_r`` on each side (OLoRA: ``dw / sigma_min(W[:, :r])``, the
    leading columns' span), so ``s B A`` and the residual by ``dw (1 + 2 ||W|| / gap_r)``; every factor entry
    also carries its own few roundings. The output y: these parameter errors pushed through the MLP (tanh is
    1-Lipschitz) plus the order_bound of its forward on absolute values.
    """
    r, alpha = config["r"], config["lora_alpha"]
    s = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
    base, io_want = files["base"][1], files["io"][1]
    bounds, w_eff = {}, {}
    for layer in ("fc1", "fc2"):
        w = np.asarray(base[f"{layer}.weight"], np.float64)
        m, n = w.shape
        dw = order_bound(np.linalg.norm(w), m * n)
        sig = np.linalg.svd(w, compute_uv=False)
        norm2 = sig[0]
        if config["init_lora_weights"] == "olora":
            sig_r = np.linalg.svd(w[:, :r], compute_uv=False)[-1]
            e_b = 2 * dw / sig_r  # Q's leading r columns
            e_a = e_b * norm2 + dw  # R's rows: Q_r.T W
            proj = 2 * norm2 / sig_r
        else:
            others = np.concatenate([sig, [0.0]]) if m != n else sig
            gaps = [np.min(np.abs(np.delete(others, i) - sig[i])) for i in range(r)]
            e_b = e_a = max(
                (np.sqrt(sig[i]) * 2 * dw / gaps[i] + dw / (2 * np.sqrt(sig[i]))) / np.sqrt(s) for i in range(r)
            )
            proj = 2 * norm2 / (sig[r - 1] - sig[r])
        b0 = np.asarray(files["initial/adapter_model"][1][f"base_model.model.{layer}.lora_B.weight"], np.float64)
        a0 = np.asarray(files["initial/adapter_model"][1][f"base_model.model.{layer}.lora_A.weight"], np.float64)
        bounds["initial/adapter_model", f"base_model.model.{layer}.lora_B.weight"] = e_b + sum_bound(abs(b0), 4)
        bounds["initial/adapter_model", f"base_model.model.{layer}.lora_A.weight"] = e_a + sum_bound(abs(a0), 4)
        res = np.asarray(files["residual"][1][f"{layer}.weight"], np.float64)
        e_res = dw * (1 + proj) + sum_bound(abs(w) + s * abs(b0) @ abs(a0), r + 2)
        bounds["residual", f"{layer}.weight"] = e_res
        bounds["residual", f"{layer}.bias"] = np.zeros_like(res[:, 0])  # copied
        tb = np.asarray(io_want[f"base_model.model.{layer}.lora_B.default.weight"], np.float64)
        ta = np.asarray(io_want[f"base_model.model.{layer}.lora_A.default.weight"], np.float64)
        e_tb, e_ta = e_b + sum_bound(abs(tb), 4 + 1), e_a + sum_bound(abs(ta), 4 + 1)  # + noise: one rounding more
        bounds["io", f"base_model.model.{layer}.lora_B.default.weight"] = e_tb
        bounds["io", f"base_model.model.{layer}.lora_A.default.weight"] = e_ta
        conv = files["converted/adapter_model"][1]  # [A | A0] and [B | -B0]: copies of the entries above
        bounds["converted/adapter_model", f"base_model.model.{layer}.lora_A.weight"] = np.concatenate(
            [np.broadcast_to(e_ta, ta.shape), np.broadcast_to(e_a + sum_bound(abs(a0), 4), a0.shape)], 0
        )
        bounds["converted/adapter_model", f"base_model.model.{layer}.lora_B.weight"] = np.concatenate(
            [np.broadcast_to(e_tb, tb.shape), np.broadcast_to(e_b + sum_bound(abs(b0), 4), b0.shape)], 1
        )
        assert conv[f"base_model.model.{layer}.lora_A.weight"].shape == (2 * r, n)
        # The trained layer's kernel res + s B A: its entries' error, first order, and its absolute-value twin.
        err = e_res + s * (np.broadcast_to(e_tb, tb.shape) @ abs(ta) + abs(tb) @ np.broadcast_to(e_ta, ta.shape))
        w_eff[layer] = (err, abs(res) + s * abs(tb) @ abs(ta), abs(base[f"{layer}.bias"]).astype(np.float64), n)
    x = abs(np.asarray(io_want["x"], np.float64))
    (e1, w1, b1, n1), (e2, w2, b2, n2) = w_eff["fc1"], w_eff["fc2"]
    h = x @ w1.T + b1  # bounds |fc1(x)| and |tanh(fc1(x))|
    y_err = (x @ e1.T) @ w2.T + h @ e2.T  # parameter errors through fc2(tanh(fc1(x)))
    y_err += order_bound(h @ w2.T + b2, (n1 + r + 4) + 4 + (n2 + r + 4))
    bounds["io", "y"] = y_err
    return bounds


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_fixtures_regenerate(case, tmp_path):
    import importlib.util
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    try:
        path = Path(__file__).parent / "fixtures" / "make_peft_init_fixtures.py"
        spec = importlib.util.spec_from_file_location("make_peft_init_fixtures", path)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        script.write_case(case, tmp_path)
    finally:
        sys.path.pop(0)
    files = {}
    for name in ("base", "residual", "io", "initial/adapter_model", "converted/adapter_model"):
        got, want = load_file(tmp_path / f"{name}.safetensors"), load_file(FIXTURES / case / f"{name}.safetensors")
        assert sorted(got) == sorted(want)
        files[name] = (got, want)
    for name in ("base",):  # seeded: bit for bit
        for key, want in files[name][1].items():
            np.testing.assert_array_equal(files[name][0][key], want, err_msg=f"{case}/{name}: {key}")
    np.testing.assert_array_equal(files["io"][0]["x"], files["io"][1]["x"])
    bounds = _regenerated_init_bounds(script.CASES[case], files)
    for name, (got, want) in files.items():
        for key in want:
            if (name, key) in bounds:
                assert_within(got[key], want[key], bounds[name, key], f"{case}/{name}: {key}")
    assert set(bounds) == {(n, k) for n, (_, w) in files.items() for k in w if n != "base" and k != "x"}


def test_quantized_base_is_refused_with_the_way_out():
    q = lorajax.quantize({"fc": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}, where=["fc"])
    with pytest.raises(ValueError, match=r"lorafy: init='olora' .* QuantizedKernel, not a dense array.*quantize"):
        lorajax.lorafy(q, rank=2, where=["fc"], init="olora")

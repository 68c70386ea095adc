"""Adapter files carry every trained leaf: also= heads, norms and biases through save_adapter and save_peft.

A tiny classifier (tests/_tiny_classifier.py) is trained for a few steps with LoRA on fc1 plus whole leaves
declared with ``lorafy(..., also=...)``; each file is loaded onto the original base in a fresh Python process,
whose logits must be the trained model's. The torch-marked tests do the same through Hugging Face PEFT.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_classifier import CLASSES, IN, Classifier, apply, save_tree

import lorajax

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
#: The head, the norm (scale and bias) and fc2's bias alone (its kernel frozen), beside LoRA on fc1.
ALSO = r"(head|norm)/.*|fc2/bias"
WHOLE = ["head", "norm"]  # whole modules only: what PEFT's modules_to_save can hold


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(1), (16, IN))
    labels = jax.random.randint(jax.random.key(2), (16,), 0, CLASSES)
    base = Classifier().init(jax.random.key(0), x)["params"]
    return base, x, labels


TX = optax.masked(optax.adam(5e-2), lorajax.mask)


@jax.jit
def _step(params, state, x, labels):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(lorajax.merge(p), x), labels).mean()
    updates, state = TX.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state


def train(base, x, labels, also, steps=5):
    """LoRA on fc1 plus the ``also`` leaves, trained with optax (adam, through merge) for a few steps."""
    params = lorajax.lorafy(base, rank=2, where=["fc1"], also=also)
    state = TX.init(params)
    for _ in range(steps):
        params, state = _step(params, state, x, labels)
    return params


def moved(trained, base, path):
    *parents, leaf = path.split("/")
    t, b = trained, base
    for part in parents:
        t, b = t[part], b[part]
    return float(jnp.max(jnp.abs(lorajax.merge(t)[leaf] - b[leaf])))


def fresh(tmp_path, files, base, x):
    """Logits of each ``(kind, adapter)`` of ``files`` loaded onto ``base``, in one new Python process."""
    save_tree(tmp_path / "base.npz", base)
    np.save(tmp_path / "x.npy", np.asarray(x))
    outs = [tmp_path / f"logits{k}.npy" for k in range(len(files))]
    specs = [tmp_path / f"specs{k}.json" for k in range(len(files))]
    base_file = str(tmp_path / "base.npz")
    code = f"import sys; sys.path.insert(0, {TESTS!r}); import _tiny_classifier as m\n" + "".join(
        f"m.fresh_logits({kind!r}, {str(f)!r}, {base_file!r}, {str(tmp_path / 'x.npy')!r}, {str(out)!r})\n"
        f"m.placed_specs({kind!r}, {str(f)!r}, {base_file!r}, {str(spec)!r})\n"
        for (kind, f), out, spec in zip(files, outs, specs)
    )
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [np.load(out) for out in outs], [json.loads(spec.read_text()) for spec in specs]


@pytest.fixture(scope="module")
def trained_all(data):
    base, x, labels = data
    return train(base, x, labels, ALSO)


@pytest.fixture(scope="module")
def trained_whole(data):
    base, x, labels = data
    return train(base, x, labels, WHOLE)


def test_training_moves_every_declared_leaf_and_no_other(data, trained_all):
    base, _, _ = data
    for path in ("head/kernel", "head/bias", "norm/scale", "norm/bias", "fc2/bias"):
        assert moved(trained_all, base, path) > 1e-3, path  # else the file tests below could not fail
    assert moved(trained_all, base, "fc2/kernel") == 0.0


def test_both_formats_restore_head_norm_and_bias_in_a_fresh_process(data, trained_all, trained_whole, tmp_path):
    base, x, _ = data
    want_all = np.asarray(apply(lorajax.merge(trained_all), x))
    want_whole = np.asarray(apply(lorajax.merge(trained_whole), x))
    lorajax.save_adapter(tmp_path / "task.safetensors", trained_all)
    cfg = lorajax.save_peft(tmp_path / "peft", trained_whole)
    assert cfg["modules_to_save"] == ["head", "norm"] and cfg["target_modules"] == ["fc1"]
    files = [("native", tmp_path / "task.safetensors"), ("peft", tmp_path / "peft")]
    (native, peft), specs = fresh(tmp_path, files, base, x)
    for placed in specs:  # each trained leaf is sharded like the base leaf it replaces
        assert placed == {"head/kernel": ["d", None], "norm/scale": ["d"]}
    np.testing.assert_allclose(native, want_all, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(peft, want_whole, rtol=1e-6, atol=1e-6)
    attached = np.asarray(apply(lorajax.merge(lorajax.attach(base, lorajax.adapter(trained_all))), x))
    np.testing.assert_allclose(attached, want_all, rtol=1e-6, atol=1e-6)  # in-process attach agrees
    for want in (want_all, want_whole):
        assert np.abs(np.asarray(apply(base, x)) - want).max() > 1e-2  # the base alone is far off


def test_loaded_leaves_are_trainable_nodes_placed_like_the_base(data, trained_all, tmp_path):
    base, _, _ = data
    f = tmp_path / "task.safetensors"
    lorajax.save_adapter(f, trained_all)
    loaded = lorajax.load_adapter(f, base)
    assert isinstance(loaded["head"]["kernel"], lorajax.Trainable)
    assert isinstance(loaded["fc2"]["bias"], lorajax.Trainable) and not isinstance(
        loaded["fc2"]["kernel"], lorajax.Trainable
    )
    assert loaded["head"]["kernel"].value.sharding == base["head"]["kernel"].sharding
    assert jax.tree.structure(lorajax.mask(loaded)) == jax.tree.structure(lorajax.mask(trained_all))
    lorajax.save_peft(tmp_path / "p", lorajax.lorafy(base, rank=2, where=["fc1"], also=WHOLE))
    assert isinstance(lorajax.load_peft(tmp_path / "p", base)["norm"]["scale"], lorajax.Trainable)
    # Loading onto params that already declare the leaves (lorafy(also=)) fills them, not nests them.
    again = lorajax.load_adapter(f, lorajax.lorafy(base, rank=2, where=["fc1"], also=ALSO))
    assert not isinstance(again["head"]["kernel"].value, lorajax.Trainable)
    assert lorajax.summary(again).trainable == lorajax.summary(trained_all).trainable


def test_file_format_version_is_2_only_with_trained_leaves(data, trained_all, tmp_path):
    base, _, _ = data
    plain = lorajax.lorafy(base, rank=2, where=["fc1"])

    def header(params):
        f = tmp_path / "h.safetensors"
        lorajax.save_adapter(f, params)
        with open(f, "rb") as fh:
            n = int(np.frombuffer(fh.read(8), "<u8")[0])
            fh.seek(8)
            return json.loads(json.loads(fh.read(n))["__metadata__"]["lorajax"])

    old, new = header(plain), header(trained_all)
    assert old["format_version"] == 1 and "trainables" not in old
    assert new["format_version"] == 2
    assert new["trainables"]["head/kernel"] == {"shape": [8, CLASSES], "dtype": "float32"}
    assert set(new["trainables"]) == {"head/kernel", "head/bias", "norm/scale", "norm/bias", "fc2/bias"}
    assert old["fingerprint"] == lorajax.adapter(plain).fingerprint != new["fingerprint"]


def test_load_adapter_refuses_a_base_without_the_trained_leaves(data, trained_all, tmp_path):
    base, _, _ = data
    f = tmp_path / "task.safetensors"
    lorajax.save_adapter(f, trained_all)
    headless = {k: v for k, v in base.items() if k != "head"}
    with pytest.raises(ValueError, match=r"missing: head/kernel: the adapter carries a trained leaf of shape \(8, 3\)"):
        lorajax.load_adapter(f, headless)
    wide = {**base, "head": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(5)}}
    with pytest.raises(
        ValueError,
        match=r"shape: head/kernel: the adapter carries a trained leaf of shape \(8, 3\), this base has \(8, 5\)",
    ):
        lorajax.load_adapter(f, wide)


def test_load_adapter_refuses_a_file_without_the_leaves_the_params_declare(data, tmp_path):
    base, _, _ = data
    f = tmp_path / "old.safetensors"
    lorajax.save_adapter(f, lorajax.lorafy(base, rank=2, where=["fc1"]))  # no trained leaves: format 1, as before
    assert isinstance(lorajax.load_adapter(f, base)["head"]["kernel"], jax.Array)
    declared = lorajax.lorafy(base, rank=2, where=["fc1"], also=WHOLE)
    with pytest.raises(
        ValueError, match=r"(?s)trainable: head/bias: the params declare it trainable .* lorajax.unlorafy"
    ):
        lorajax.load_adapter(f, declared)


def test_save_adapter_refuses_nonfinite_trained_leaves(data, trained_all, tmp_path):
    bad = jax.tree.map(
        lambda n: lorajax.Trainable(n.value.at[0].set(jnp.nan)) if isinstance(n, lorajax.Trainable) else n,
        trained_all,
        is_leaf=lambda n: isinstance(n, lorajax.Trainable),
    )
    with pytest.raises(ValueError, match=r"non-finite: fc2/bias: the trained leaf holds"):
        lorajax.save_adapter(tmp_path / "nan.safetensors", bad)
    assert not (tmp_path / "nan.safetensors").exists()


def test_swap_replaces_trained_leaves_and_refuses_to_drop_them(data, trained_all):
    base, x, labels = data
    other = train(base, x, labels, ALSO, steps=2)
    swapped = lorajax.swap(lorajax.merge(trained_all), trained_all, other)
    np.testing.assert_allclose(apply(swapped, x), apply(lorajax.merge(other), x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(swapped["head"]["kernel"], lorajax.merge(other)["head"]["kernel"])
    with pytest.raises(ValueError, match=r"trainable: head/kernel: old_adapter trained this leaf and new_adapter"):
        lorajax.swap(lorajax.merge(trained_all), trained_all, None)


def test_banks_and_slots_refuse_trained_leaves(data, trained_all):
    base, _, _ = data
    with pytest.raises(ValueError, match=r"stack_adapters: the adapters carry trained leaves .*head/kernel.*a bank"):
        lorajax.stack_adapters([trained_all], base=base)
    slots = lorajax.adapter_slots({"plain": lorajax.lorafy(base, rank=2, where=["fc1"])}, 2)
    with pytest.raises(ValueError, match=r"AdapterSlots.put: the adapters carry trained leaves .*norm/scale"):
        slots.put("x", trained_all)


def test_save_peft_refuses_leaves_that_are_no_whole_module(data, tmp_path):
    base, _, _ = data
    lone_bias = lorajax.lorafy(base, rank=2, where=["fc1"], also=r"fc2/bias")
    with pytest.raises(
        ValueError,
        match=r"fc2/bias: trained while fc2/kernel of the same module stay frozen.*closest PEFT form trains the "
        r"whole module: declare all its leaves trainable \(lorafy\(\.\.\., also=\['fc2'\]\)\)",
    ):
        lorajax.save_peft(tmp_path / "p", lone_bias)
    lora_bias = lorajax.lorafy(base, rank=2, where=["fc1"], also=r"fc1/bias")
    with pytest.raises(ValueError, match=r"fc1/bias: trained beside the LoRA node fc1/kernel.*bias='lora_only'"):
        lorajax.save_peft(tmp_path / "p", lora_bias)
    # PEFT wraps every module whose name ends with a modules_to_save entry: "head" would also catch "lm_head".
    suffix = lorajax.lorafy({**base, "lm_head": base["head"]}, rank=2, where=["lm_head"], also=["head"])
    with pytest.raises(ValueError, match=r"modules_to_save entry 'head' also matches the LoRA module 'lm_head'"):
        lorajax.save_peft(tmp_path / "p", suffix)
    assert not (tmp_path / "p").exists()


def test_peft_modules_to_save_of_stacked_layers_and_kernels_pytorch_lacks(tmp_path):
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    base = {"layers": {"fc": {"kernel": w(2, 4, 4)}, "norm": {"scale": w(2, 4), "bias": w(2, 4)}}}
    params = lorajax.lorafy(base, rank=2, where=["fc"], layout={"fc": "sio"}, also=["norm"])
    norm = {"scale": w(2, 4), "bias": w(2, 4)}  # as trained
    params["layers"]["norm"] = {k: lorajax.Trainable(v) for k, v in norm.items()}
    names = {"layers/fc": "model.layers.{}.fc", "layers/norm": "model.layers.{}.norm"}
    cfg = lorajax.save_peft(tmp_path / "p", params, name_map=names)
    assert cfg["modules_to_save"] == ["model.layers.0.norm", "model.layers.1.norm"]
    _, modules = lorajax.read_peft(tmp_path / "p")
    np.testing.assert_array_equal(modules["model.layers.1.norm"]["params"]["weight"], norm["scale"][1])
    loaded = lorajax.load_peft(tmp_path / "p", base, name_map=names)["layers"]["norm"]
    for leaf in ("scale", "bias"):
        np.testing.assert_array_equal(loaded[leaf].value, norm[leaf])
    heads = {"fc": {"kernel": w(4, 4)}, "attn": {"query": {"kernel": w(8, 2, 4)}}}
    with pytest.raises(ValueError, match=r"attn/query/kernel: a 3-axis kernel \(8, 2, 4\): no PyTorch module"):
        lorajax.save_peft(tmp_path / "q", lorajax.lorafy(heads, rank=2, where=["fc"], also=["query"]))


def test_load_peft_checks_modules_to_save_against_the_base(data, trained_whole, tmp_path):
    base, _, _ = data
    lorajax.save_peft(tmp_path / "p", trained_whole)
    _, modules = lorajax.read_peft(tmp_path / "p")
    assert modules["head"]["kind"] == "saved" and modules["head"]["params"]["weight"].shape == (CLASSES, 8)
    renamed = {("classifier" if k == "head" else k): v for k, v in base.items()}
    with pytest.raises(ValueError, match=r"module to save 'head': no parameter maps to its bias \(3,\)"):
        lorajax.load_peft(tmp_path / "p", renamed)
    wide = {**base, "head": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(5)}}
    with pytest.raises(
        ValueError, match=r"module to save 'head': weight has shape \(3, 8\); the base leaf head/kernel"
    ):
        lorajax.load_peft(tmp_path / "p", wide)
    lorajax.save_peft(tmp_path / "q", lorajax.lorafy(base, rank=2, where=["fc1"]))
    declared = lorajax.lorafy(base, rank=2, where=["fc1"], also=WHOLE)
    with pytest.raises(ValueError, match=r"trainable: norm/scale: the params declare it trainable .* modules_to_save"):
        lorajax.load_peft(tmp_path / "q", declared)


def test_summary_names_the_trained_leaves_and_what_saves_them(trained_all):
    text = str(lorajax.summary(trained_all, optimizer=optax.adam(1e-3)))
    assert "trained whole (also=): fc2/bias, head/bias, head/kernel, norm/bias, norm/scale" in text
    assert "save_peft as modules_to_save (whole modules only)" in text
    assert "An adapter file (save_adapter or save_peft) holds about" in text


# --------------------------------------------------------------------------------------------------------------------
# Against the real PEFT.


def _torch_twin(base):
    """The PyTorch classifier with ``base``'s weights (Flax kernels transposed to PyTorch's (out, in))."""
    import torch
    from torch import nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(IN, 8), nn.Linear(8, 8)
            self.norm, self.head = nn.LayerNorm(8, eps=1e-5), nn.Linear(8, CLASSES)

        def forward(self, x):
            h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
            return self.head(self.norm(h))

    model = Twin()
    state = {}
    for module, leaves in base.items():
        for leaf, x in leaves.items():
            name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
            state[f"{module}.{name}"] = torch.tensor(np.asarray(x).T.copy() if leaf == "kernel" else np.asarray(x))
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.torch
def test_peft_loads_save_peft_with_modules_to_save(data, trained_whole, tmp_path):
    import torch
    from peft import PeftModel

    base, x, _ = data
    want = np.asarray(apply(lorajax.merge(trained_whole), x))
    lorajax.save_peft(tmp_path / "p", trained_whole)
    model = PeftModel.from_pretrained(_torch_twin(base), str(tmp_path / "p")).eval()
    with torch.no_grad():
        got = model(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        untrained = _torch_twin(base)(torch.tensor(np.asarray(x))).numpy()
    assert np.abs(untrained - want).max() > 1e-2


@pytest.mark.torch
def test_lorajax_loads_a_peft_adapter_with_modules_to_save(data, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    base, x, _ = data
    torch.manual_seed(0)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["head", "norm"], init_lora_weights=False
    )
    model = get_peft_model(_torch_twin(base), config)
    with torch.no_grad():  # as after training: the copies PEFT trains move away from the base
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        want = model.eval()(torch.tensor(np.asarray(x))).numpy()
    loaded = lorajax.load_peft(tmp_path / "peft", base)
    assert isinstance(loaded["head"]["kernel"], lorajax.Trainable)
    got = np.asarray(apply(lorajax.merge(loaded), x))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert np.abs(np.asarray(apply(base, x)) - want).max() > 1e-2

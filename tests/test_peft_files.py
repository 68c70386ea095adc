"""save_peft(initial=) against PEFT's weight conversion, load_peft's checks, and to_peft_dict == the files.

The conversion tests use PEFT's own folders: committed ones (tests/fixtures/peft/{pissa,olora}/, written by
tests/fixtures/make_peft_init_fixtures.py) and, under the ``torch`` marker, folders the installed PEFT writes.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures"
#: Config fields PEFT's conversion sets and ours must equal.
FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_dora")


def _torch_params(state):
    """PyTorch-layout params ``{fc1: {weight, bias}, ...}`` from a state dict (the MLP of make_peft_fixtures)."""
    return {
        m: {"weight": jnp.asarray(state[f"{m}.weight"]), "bias": jnp.asarray(state[f"{m}.bias"])}
        for m in ("fc1", "fc2")
    }


def _ours(trained_dir, initial_dir, residual, out):
    """Our export of PEFT's pre-conversion folder: load both adapters on the residual base, save with initial=."""
    params = _torch_params(residual)
    trained = lorajax.load_peft(trained_dir, params)
    initial = lorajax.load_peft(initial_dir, params)
    return lorajax.save_peft(out, trained, initial=initial)


def _assert_same_as_peft(ours_dir, peft_dir, config):
    want_cfg = json.loads((Path(peft_dir) / "adapter_config.json").read_text())
    assert {k: config[k] for k in FIELDS} == {k: want_cfg[k] for k in FIELDS}
    assert sorted(config["target_modules"]) == sorted(want_cfg["target_modules"])
    got, want = (
        load_file(Path(ours_dir) / "adapter_model.safetensors"),
        load_file(Path(peft_dir) / "adapter_model.safetensors"),
    )
    want = {k.replace(".default", ""): v for k, v in want.items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)


@pytest.mark.parametrize("case", ["pissa", "pissa_rslora", "olora"])
def test_save_peft_initial_converts_a_peft_folder_as_peft_does(case, tmp_path):
    folder = FIXTURES / "peft" / case
    io = load_file(folder / "io.safetensors")
    # PEFT's folder before conversion: the trained factors (io.safetensors) under the initial folder's config.
    trained_dir = tmp_path / "trained"
    trained_dir.mkdir()
    config = json.loads((folder / "initial" / "adapter_config.json").read_text())
    (trained_dir / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": case.split("_")[0]}))
    save_file(
        {k.replace(".default", ""): v for k, v in io.items() if "lora_" in k}, trained_dir / "adapter_model.safetensors"
    )
    residual = load_file(folder / "residual.safetensors")
    out = tmp_path / "out"
    cfg = _ours(trained_dir, folder / "initial", residual, out)
    assert cfg["r"] == 2 * config["r"]
    _assert_same_as_peft(out, folder / "converted", cfg)
    # The old behaviour, for contrast: without initial= the residual-base adapter is written at rank r.
    plain = lorajax.save_peft(tmp_path / "as-is", lorajax.load_peft(trained_dir, _torch_params(residual)))
    assert plain["r"] == config["r"]


@pytest.mark.torch
@pytest.mark.parametrize("init, extra", [("pissa", {}), ("olora", {}), ("pissa", {"use_rslora": True})])
def test_save_peft_initial_matches_the_installed_peft(init, extra, tmp_path):
    """PEFT writes the initial, the trained (pre-conversion) and the converted folders; ours equals the last."""
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(FIXTURES))
    from make_peft_fixtures import base_model

    torch.manual_seed(0)
    pm = get_peft_model(
        copy.deepcopy(base_model("linear")),
        LoraConfig(r=2, lora_alpha=3, target_modules=["fc1", "fc2"], init_lora_weights=init, **extra),
    )
    pm.save_pretrained(str(tmp_path / "initial"))
    residual = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().numpy().copy()
        for k, v in pm.state_dict().items()
        if "lora_" not in k
    }
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape) * 0.3)  # a training step
    pm.save_pretrained(str(tmp_path / "trained"))
    pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "trained" / "adapter_config.json").read_text())["init_lora_weights"] == init
    cfg = _ours(tmp_path / "trained", tmp_path / "initial", residual, tmp_path / "ours")
    _assert_same_as_peft(tmp_path / "ours", tmp_path / "converted", cfg)


def _mlp(d=6):
    w = jax.random.normal(jax.random.key(0), (d, 4))
    return {"fc1": {"kernel": w}, "fc2": {"kernel": w.T}}


def test_initial_converts_plain_lora_too(tmp_path):
    base = _mlp()
    initial = lorajax.lorafy(base, rank=2, where=["fc1", "fc2"], alpha=4.0, key=jax.random.key(1))
    trained = jax.tree.map(lambda x, t: x + 0.25 if t else x, initial, lorajax.mask(initial))
    config, tensors = lorajax.to_peft_dict(trained, initial=initial)
    assert config["r"] == 4 and config["lora_alpha"] == 8
    A, B = tensors["base_model.model.fc1.lora_A.weight"], tensors["base_model.model.fc1.lora_B.weight"]
    s = lambda n: n.alpha / n.rank
    t, i = trained["fc1"]["kernel"], initial["fc1"]["kernel"]
    want = s(t) * (np.float64(t.a) @ np.float64(t.b) - np.float64(i.a) @ np.float64(i.b))  # the update since initial
    np.testing.assert_allclose((8 / 4) * (B.astype(np.float64) @ A).T, want, atol=1e-6, rtol=0)


def test_initial_that_is_not_this_adapters_start_is_refused(tmp_path):
    base = _mlp()
    initial = lorajax.lorafy(base, rank=2, where=["fc1", "fc2"], key=jax.random.key(1))
    other_rank = lorajax.lorafy(base, rank=3, where=["fc1", "fc2"], key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"save_peft: initial is not .*start (?s:.*)fc1/kernel: initial node .*rank=3"):
        lorajax.save_peft(tmp_path / "a", initial, initial=other_rank)
    fewer = lorajax.lorafy(base, rank=2, where=["fc1"], key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"fc2/kernel: initial holds no LoRA node here"):
        lorajax.save_peft(tmp_path / "a", initial, initial=fewer)
    with pytest.raises(ValueError, match=r"fc2/kernel: initial holds a LoRA node that the trained params do not"):
        lorajax.save_peft(tmp_path / "a", fewer, initial=initial)
    moved = lorajax.lorafy(jax.tree.map(lambda w: w + 1.0, base), rank=2, where=["fc1", "fc2"], key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"(?s)2 problems.*fc1/kernel: the initial node sits on a different base"):
        lorajax.to_peft_dict(initial, initial=moved)
    pissa = lorajax.lorafy(base, rank=2, where=["fc1", "fc2"], init="pissa")
    with pytest.raises(ValueError, match=r"fc1/kernel: initial node .*init='default'.*the trained one .*init='pissa'"):
        lorajax.save_peft(tmp_path / "a", pissa, initial=initial)
    assert not (tmp_path / "a").exists()


# load_peft's checks ---------------------------------------------------------------------------------------------------


def _saved(tmp_path, base, **kw):
    lora = lorajax.lorafy(base, rank=2, where=list(base), key=jax.random.key(0), **kw)
    lorajax.save_peft(tmp_path / "a", lora)
    return tmp_path / "a", lora


def test_modules_no_kernel_takes_are_an_error_unless_partial(tmp_path):
    base = _mlp()
    folder, lora = _saved(tmp_path, base)
    only = {"fc1": base["fc1"]}
    with pytest.raises(ValueError, match=r"(?s)module 'fc2': no parameter maps to it.*pass partial=True"):
        lorajax.load_peft(folder, only)
    with pytest.raises(ValueError, match=r"module 'fc1': no parameter maps to it"):
        lorajax.load_peft(folder, base, name_map={"fc2": "fc2"})
    got = lorajax.load_peft(folder, only, partial=True)
    np.testing.assert_array_equal(got["fc1"]["kernel"].a, lora["fc1"]["kernel"].a)
    got = lorajax.load_peft(folder, base, name_map={"fc2": "fc2"}, partial=True)
    assert not lorajax.is_lora(got["fc1"]["kernel"]) and lorajax.is_lora(got["fc2"]["kernel"])


def test_two_modules_for_one_layer_of_a_stacked_kernel_are_refused(tmp_path):
    stacked = {"layers": {"fc": {"kernel": jnp.ones((2, 4, 3))}}}
    lora = lorajax.lorafy(stacked, rank=1, where=["fc"], layout={"fc": "sio"}, key=jax.random.key(0))
    name_map = {"layers/fc": "h.{}.fc"}
    lorajax.save_peft(tmp_path / "a", lora, name_map=name_map)
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(f)
    t |= {k.replace("h.1.", "h.01."): v for k, v in t.items() if "h.1." in k}  # "01" and "1": the same layer
    save_file(t, f)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())  # the config names it too
    config["target_modules"].append("h.01.fc")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"modules 'h.01.fc' and 'h.1.fc' are both layer 1|'h.1.fc' and 'h.01.fc'"):
        lorajax.load_peft(tmp_path / "a", stacked, name_map=name_map)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_])
def test_integer_factors_are_refused_naming_the_tensor(tmp_path, dtype):
    folder, _ = _saved(tmp_path, _mlp())
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    key = "base_model.model.fc2.lora_B.weight"
    t[key] = np.ones(t[key].shape, dtype)
    save_file(t, f)
    for allow in (False, True):  # integers are never factors, allow_nonfinite or not
        with pytest.raises(
            ValueError, match=rf"{re.escape(key)}: dtype {np.dtype(dtype).name}; LoRA factors are floats"
        ):
            lorajax.load_peft(folder, _mlp(), allow_nonfinite=allow)
    with pytest.raises(ValueError, match=re.escape(key)):
        lorajax.read_peft(folder)


def test_nonfinite_factors_are_refused_unless_allowed(tmp_path):
    base = _mlp()
    folder, lora = _saved(tmp_path, base)
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.fc1.lora_A.weight"][0, 0] = np.inf
    t["base_model.model.fc2.lora_B.weight"][1, 0] = np.nan
    save_file(t, f)
    with pytest.raises(
        ValueError,
        match=r"(?s)2 problems.*fc1.lora_A.weight: 1 NaN/Inf of 12 entries.*fc2.lora_B.weight: 1 NaN/Inf of 12",
    ):
        lorajax.load_peft(folder, base)
    got = lorajax.load_peft(folder, base, allow_nonfinite=True)
    assert np.isinf(np.asarray(got["fc1"]["kernel"].a)).sum() == 1
    assert lorajax.read_peft(folder, allow_nonfinite=True)[1]["fc1"]["A"][0, 0] == np.inf


def test_bf16_factors_load(tmp_path):
    base = _mlp()
    lora = lorajax.lorafy(base, rank=2, where=["fc1"], key=jax.random.key(0), dtype=jnp.bfloat16)
    lorajax.save_peft(tmp_path / "a", lora)
    got = lorajax.load_peft(tmp_path / "a", base)["fc1"]["kernel"]
    assert got.a.dtype == jnp.bfloat16


# to_peft_dict -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"dora": True}, {"dtype": jnp.bfloat16}, {"rslora": True}])
def test_to_peft_dict_equals_the_files_bit_for_bit(tmp_path, kw):
    import safetensors.numpy

    base = _mlp()
    lora = lorajax.lorafy(base, rank=2, where=["fc1", "fc2"], rank_pattern={"fc2": 3}, key=jax.random.key(0), **kw)
    lora = jax.tree.map(lambda x, t: x + 0.5 if t else x, lora, lorajax.mask(lora))
    config, tensors = lorajax.to_peft_dict(lora, base_model_name_or_path="tiny")
    written = lorajax.save_peft(tmp_path / "a", lora, base_model_name_or_path="tiny")
    assert written == config == json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    data = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert data == safetensors.numpy.save(tensors, metadata={"format": "pt"})
    got = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert isinstance(v, np.ndarray) and v.flags.c_contiguous and got[k].dtype == v.dtype
        assert got[k].tobytes() == v.tobytes()
    if kw.get("dora"):
        assert config["use_dora"] and any(k.endswith("lora_magnitude_vector") for k in tensors)


def test_to_peft_dict_errors_name_it():
    with pytest.raises(ValueError, match=r"^to_peft_dict: params hold no LoRA nodes"):
        lorajax.to_peft_dict(_mlp())

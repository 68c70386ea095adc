"""PEFT's target fields: target_modules as a regex, layers_to_transform/layers_pattern and exclude_modules.

A tiny three-layer model (q, v, o Linear per layer) in PyTorch and as a JAX params dict. Adapters PEFT 0.21.2 writes
with each field load here and give PEFT's outputs; save_peft's adapters of some layers only (or of a module whose
name ends another's) load in PEFT on the full model, which then adapts exactly our modules and gives our outputs.
Configs whose fields disagree with the tensors are refused, naming the module.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

D, LAYERS = 4, 3
TOL = 1e-5  # of the largest output


def _base(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            str(i): {m: {"kernel": rng.normal(size=(D, D)).astype(np.float32)} for m in "qvo"} for i in range(LAYERS)
        },
        "fc": {"kernel": rng.normal(size=(D, D)).astype(np.float32)},
        "enc": {"fc": {"kernel": rng.normal(size=(D, D)).astype(np.float32)}},
    }


def _apply(params, x):
    """Dense params (merged) -> outputs; mirrors _torch_model's forward."""
    for i in range(LAYERS):
        layer = params["layers"][str(i)]
        x = jnp.tanh(x @ layer["q"]["kernel"] + x @ layer["v"]["kernel"]) @ layer["o"]["kernel"]
    return x @ params["fc"]["kernel"] + x @ params["enc"]["fc"]["kernel"]


def _torch_model(base):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(3))

        def forward(self, x):
            return self.o(torch.tanh(self.q(x) + self.v(x)))

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D, bias=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.fc, self.enc = nn.Linear(D, D, bias=False), Enc()

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return self.fc(x) + self.enc.fc(x)

    model = Net()
    with torch.no_grad():
        for i in range(LAYERS):
            for m in "qvo":
                getattr(model.layers[i], m).weight.copy_(torch.from_numpy(base["layers"][str(i)][m]["kernel"].T))
        model.fc.weight.copy_(torch.from_numpy(base["fc"]["kernel"].T))
        model.enc.fc.weight.copy_(torch.from_numpy(base["enc"]["fc"]["kernel"].T))
    return model.eval()


X = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)


def _peft_written(tmp_path, **fields):
    """An adapter PEFT writes for the torch twin with ``fields``; (folder, PEFT's outputs, PEFT's LoRA modules)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(_torch_model(_base()), LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, **fields))
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        y = pm(torch.from_numpy(X)).numpy()
    return tmp_path, y, _peft_lora_modules(pm)


def _peft_lora_modules(pm):
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A"))


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())


def _adapted(params):
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lorajax.is_lora)[0]
    return sorted(".".join(str(k.key) for k in p[:-1]) for p, x in leaves if lorajax.is_lora(x))


PEFT_FIELDS = {
    "layers": {"target_modules": ["q", "v"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    "one_layer": {"target_modules": ["q", "v"], "layers_to_transform": 1, "layers_pattern": ["layers"]},
    "regex": {"target_modules": r"layers\.[02]\.(q|v)"},
    "exclude_list": {"target_modules": ["q", "v", "fc"], "exclude_modules": ["layers.1.q", "enc.fc"]},
    "exclude_regex": {"target_modules": ["q", "v"], "exclude_modules": r"layers\.1\..*"},
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(PEFT_FIELDS))
def test_adapters_peft_writes_with_each_field_load_and_match_peft(tmp_path, case):
    folder, want, peft_modules = _peft_written(tmp_path, **PEFT_FIELDS[case])
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in PEFT_FIELDS[case].items():  # PEFT kept the field as given (lists in any order)
        assert sorted(config[key]) == sorted(value) if isinstance(value, list) else config[key] == value
    params = lorajax.load_peft(folder, _base())
    assert _adapted(params) == peft_modules
    _close(np.asarray(_apply(lorajax.merge(params), X)), want)


def _random_init(key, base, layout, rank, dtype):
    """Random A and B (B = 0 would hide a wrong load), drawn by NumPy."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    a_shape, b_shape = layout.a_shape(base.shape, rank), layout.b_shape(base.shape, rank)
    return jnp.asarray(0.5 * rng.standard_normal(a_shape), dtype), jnp.asarray(
        0.5 * rng.standard_normal(b_shape), dtype
    )


def _partial_adapter():
    where = r"layers/(0|2)/(q|v)/kernel"
    return lorajax.lorafy(_base(), rank=2, alpha=3.0, where=where, key=jax.random.key(0), init=_random_init)


def test_save_peft_writes_layers_to_transform_for_some_layers():
    config, _ = lorajax.to_peft_dict(_partial_adapter())
    assert config["target_modules"] == ["q", "v"]
    assert (config["layers_to_transform"], config["layers_pattern"], config["exclude_modules"]) == (
        [0, 2],
        "layers",
        None,
    )


def test_save_peft_excludes_what_a_name_suffix_would_also_catch():
    params = lorajax.lorafy(_base(), rank=2, where=["fc"], key=jax.random.key(0))  # PEFT's rule: enc.fc as well
    assert _adapted(params) == ["enc.fc", "fc"]
    params["enc"]["fc"]["kernel"] = params["enc"]["fc"]["kernel"].base  # adapt fc only
    config, _ = lorajax.to_peft_dict(params)
    assert (config["target_modules"], config["exclude_modules"], config["layers_to_transform"]) == (
        ["fc"],
        ["enc.fc"],
        None,
    )


def test_a_name_map_for_the_adapted_kernels_only_still_saves():
    table = {f"layers/{i}/{m}/kernel": f"model.layers.{i}.{m}" for i in (0, 2) for m in "qv"}
    config, _ = lorajax.to_peft_dict(_partial_adapter(), name_map=lambda path: table[path])  # KeyError elsewhere
    assert config["target_modules"] == sorted(table.values()) and config["layers_to_transform"] is None


@pytest.mark.torch
@pytest.mark.parametrize("which", ["layers", "exclude"])
def test_peft_loads_our_partial_adapters_and_adapts_exactly_our_modules(tmp_path, which):
    import torch
    from peft import PeftModel

    if which == "layers":
        params = _partial_adapter()
    else:
        params = lorajax.lorafy(_base(), rank=2, where=["fc"], key=jax.random.key(0), init=_random_init)
        params["enc"]["fc"]["kernel"] = params["enc"]["fc"]["kernel"].base
    lorajax.save_peft(tmp_path, params)
    pm = PeftModel.from_pretrained(_torch_model(_base()), tmp_path)
    assert _peft_lora_modules(pm) == _adapted(params)
    with torch.no_grad():
        want = pm(torch.from_numpy(X)).numpy()
    _close(want, np.asarray(_apply(lorajax.merge(params), X)))
    assert np.abs(want - np.asarray(_apply(_base(), X))).max() > 1e-3  # the adapter does change the outputs
    assert _adapted(lorajax.load_peft(tmp_path, _base())) == _adapted(params)


def _edit_config(folder, **fields):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"layers_to_transform": [0]}, r"layers\.2\.q: the tensors adapt it but its layer index 2 is not in"),
        (
            {"layers_pattern": "blocks"},
            r"layers\.0\.q: the tensors adapt it but layers_to_transform=\[0, 2\] is set but",
        ),
        (
            {"exclude_modules": ["layers.2.v"]},
            r"layers\.2\.v: the tensors adapt it but exclude_modules=\['layers.2.v'\]",
        ),
        ({"exclude_modules": r".*\.0\.q"}, r"layers\.0\.q: the tensors adapt it but exclude_modules="),
        ({"target_modules": ["q"]}, r"layers\.0\.v: the tensors adapt it but target_modules=\['q'\] does not name it"),
        (
            {"target_modules": r"layers\.0\..*", "layers_to_transform": None, "layers_pattern": None},
            r"layers\.2\.q: the tensors adapt it but target_modules='layers\\\\.0\\\\..\*' does not full-match it",
        ),
        ({"target_modules": r"layers\..*"}, r"cannot be used when target_modules is a regex string"),
        ({"layers_to_transform": None}, r"layers_pattern='layers' is set without layers_to_transform"),
        ({"layers_to_transform": "0"}, r"layers_to_transform='0': expected a layer index"),
        ({"exclude_modules": "("}, r"exclude_modules='\(' is not a valid regex"),
    ],
)
def test_configs_that_disagree_with_the_tensors_are_refused_naming_the_module(tmp_path, fields, match):
    lorajax.save_peft(tmp_path, _partial_adapter())
    assert _adapted(lorajax.load_peft(tmp_path, _base())) == ["layers.0.q", "layers.0.v", "layers.2.q", "layers.2.v"]
    _edit_config(tmp_path, **fields)
    with pytest.raises(ValueError, match=match):
        lorajax.load_peft(tmp_path, _base())
    with pytest.raises(ValueError, match=match):
        lorajax.read_peft(tmp_path)


@pytest.mark.parametrize(
    "fields",
    [
        {"target_modules": r"layers\.[02]\.(q|v)", "layers_to_transform": None, "layers_pattern": None},
        {"target_modules": "all-linear", "layers_to_transform": None, "layers_pattern": None},  # PEFT expands it
        {"target_modules": None},
    ],
)
def test_a_regex_target_or_an_unlisted_one_loads(tmp_path, fields):
    lorajax.save_peft(tmp_path, _partial_adapter())
    _edit_config(tmp_path, **fields)
    assert _adapted(lorajax.load_peft(tmp_path, _base())) == ["layers.0.q", "layers.0.v", "layers.2.q", "layers.2.v"]


#: Module names (nested layer stacks, MoE experts, a name with no index) against configs of every field's form.
RULE_NAMES = [
    "layers.0.q",
    "model.layers.1.q",
    "model.layers.2.attn.v",
    "model.h.1.q",
    "model.layers.3.experts.0.q",
    "model.layers.1.inner.layers.3.q",
    "enc.fc",
    "fc",
    "q",
]
RULE_CONFIGS = [
    {"target_modules": ["q", "v"]},
    {"target_modules": ["q", "attn.v"], "layers_to_transform": [1, 2]},
    {"target_modules": ["q"], "layers_to_transform": 3, "layers_pattern": "layers"},
    {"target_modules": ["q", "v"], "layers_to_transform": [0, 1], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["q", "fc"], "exclude_modules": ["enc.fc", "model.h.1.q"]},
    {"target_modules": ["fc", "q"], "exclude_modules": r".*layers\.[13]\..*"},
    {"target_modules": r".*\.(q|v)"},
    {"target_modules": r"(model\.)?layers\.\d+\.q", "exclude_modules": ["layers.0.q"]},
    {"target_modules": ["q"], "modules_to_save": ["experts"]},
]


def _refused(folder, fields):
    """The modules read_peft refuses for ``fields``, on an adapter with a rank-1 pair for each of RULE_NAMES."""
    from safetensors.numpy import save_file

    pair = {"lora_A.weight": np.ones((1, 2), np.float32), "lora_B.weight": np.ones((2, 1), np.float32)}
    tensors = {f"base_model.model.{n}.{k}": v for n in RULE_NAMES for k, v in pair.items()}
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, **fields}))
    try:
        lorajax.read_peft(folder)
    except ValueError as e:
        return {line.split(":")[0].strip(" -") for line in str(e).splitlines() if "the tensors adapt it" in line}
    return set()


@pytest.mark.torch
@pytest.mark.parametrize("fields", RULE_CONFIGS, ids=range(len(RULE_CONFIGS)))
def test_the_matching_rule_is_peft_check_target_module_exists(tmp_path, fields):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = LoraConfig(**fields)
    theirs = {n for n in RULE_NAMES if isinstance(m := check_target_module_exists(config, n), _ExcludedModule) or not m}
    assert _refused(tmp_path, fields) == theirs
    assert 0 < len(theirs) < len(RULE_NAMES) or fields == RULE_CONFIGS[0]

"""Reading a PEFT adapter folder: the config checks and the per-module factor pairs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lorajax._files import clean_stale
from lorajax._problems import Problems
from lorajax.peft._experts import parameter_entries
from lorajax.peft._layers import check_targets, why_untargeted
from lorajax.peft._modules_to_save import take_saved
from lorajax.peft._names import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorajax.peft._tokens import take_tokens

#: Tensor-name suffix -> (factor, module kind).
_SUFFIXES = {
    ".lora_A.weight": ("A", "dense"),
    ".lora_B.weight": ("B", "dense"),
    ".lora_embedding_A": ("A", "embed"),
    ".lora_embedding_B": ("B", "embed"),
    ".lora_magnitude_vector": ("M", ""),  # DoRA; the module's kind comes from its A and B
    ".lora_B.bias": ("bias", ""),  # lora_bias=True: lora_B's bias, (out,)
}
# Tensor-name fragments of PEFT features lorajax does not implement, for a precise error.
_UNSUPPORTED_KEYS = (("modules_to_save", "modules_to_save (fully trained copies of modules)"),)
_SUPPORTED = (
    "Only LoRA and DoRA (with rsLoRA, rank_pattern, alpha_pattern) on Linear, Conv1D, ConvNd and Embedding load."
)


def _unsupported_features(config: dict[str, Any]) -> list[str]:
    found = []
    if config.get("bias", "none") != "none":
        found.append(f"bias={config['bias']!r} (trained base biases)")
    for key in ("layer_replication", "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config"):
        if config.get(key):
            found.append(f"{key}={config[key]!r}")
    found += [f"{key}=True" for key in ("use_qalora", "use_bdlora") if config.get(key)]
    if config.get("kasa_config"):  # PEFT's LoRA variants with their own forward (LoraConfig's is_lora_variant)
        found.append("kasa_config (KaSA)")
    if config.get("init_lora_weights") == "mica":
        found.append("init_lora_weights='mica' (MiCA)")
    return found


def check_config(config: Any, where: str, caller: str) -> dict[str, Any]:
    """``config`` if it describes a plain LoRA adapter lorajax can load, else a ValueError naming what it uses."""
    if not isinstance(config, dict):
        raise ValueError(f"{caller}: {where} does not hold a JSON object.")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{caller}: {where} is a {peft_type} adapter; lorajax reads LoRA adapters only.")
    unsupported = _unsupported_features(config)
    if unsupported:
        raise ValueError(
            f"{caller}: {where} uses PEFT features lorajax does not support: {'; '.join(unsupported)}. {_SUPPORTED}"
        )
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{caller}: {where} has r={r!r}; expected a positive integer.")
    return config


def _files(root: Path, caller: str) -> tuple[Path, Path]:
    cfg_file, w_file = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"{caller}: {root} is not a directory; pass the folder holding {CONFIG_NAME}.")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{caller}: {cfg_file} is missing; a PEFT adapter folder holds {CONFIG_NAME}.")
    if not w_file.is_file():
        hint = (
            " (adapter_model.bin is a pickle; lorajax never unpickles: re-save it with safetensors)"
            if (root / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"{caller}: {w_file} is missing{hint}.")
    return cfg_file, w_file


def _group(
    tensors: dict[str, Any], problems: Problems, dora: bool, lora_bias: bool = False
) -> dict[str, dict[str, Any]]:
    """``{module: {"kind": ..., "A": ..., "B": ...}}`` (plus ``"M"``, a DoRA magnitude) from PEFT's tensor names."""
    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        feature = next((f for fragment, f in _UNSUPPORTED_KEYS if fragment in key), None)
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if feature is not None:
            problems.add(f"{key}: {feature} is not supported")
        elif suffix == ".lora_magnitude_vector" and not dora:
            problems.add(
                f"{key}: a DoRA magnitude, but the config does not set use_dora=True; fix the config or drop the tensor"
            )
        elif suffix == ".lora_B.bias" and not lora_bias:
            problems.add(f"{key}: a LoRA bias, but the config does not set lora_bias=True; fix the config or drop it")
        elif suffix is None:
            problems.add(f"{key}: not a LoRA factor (*.lora_A.weight, *.lora_B.weight, *.lora_embedding_A/B)")
        else:
            which, kind = _SUFFIXES[suffix]
            entry = modules.setdefault(key[: -len(suffix)].removeprefix(PREFIX), {})
            entry[which] = value
            if kind:
                entry["kind"] = kind
    return modules


def _check_pair(name: str, entry: dict[str, Any], dora: bool) -> str | None:
    """Settle a module's kind (a 'dense' with a window is a conv); a problem if its A, B are no LoRA pair.

    With ``dora`` (the config's ``use_dora``) every module needs a magnitude of PEFT's shape:
    ``(out,)`` for Linear, Conv1D and Embedding, ``(1, out, 1, ...)`` for ConvNd.
    """
    if "A" not in entry or "B" not in entry:
        has = [f"lora_{k}" for k in ("A", "B") if k in entry] or ["a DoRA magnitude (lora_magnitude_vector)"]
        return f"{name}: has only {has[0]}"
    A, B = entry["A"], entry["B"]
    if entry["kind"] == "dense" and A.ndim > 2:
        entry["kind"] = "conv"
    r, kind = A.shape[0], entry["kind"]
    ok = (
        (kind == "dense" and A.ndim == 2 and B.shape[1:] == (r,))
        or (kind == "embed" and A.ndim == 2 and B.ndim == 2 and B.shape[1] == r)
        or (kind == "conv" and B.ndim == A.ndim and B.shape[1] == r and all(s == 1 for s in B.shape[2:]))
    )
    if not ok:
        return f"{name}: factor shapes A {A.shape}, B {B.shape} do not form a rank-{r} LoRA pair"
    if "bias" in entry and tuple(entry["bias"].shape) != (B.shape[0],):
        return f"{name}: LoRA bias (lora_B.bias) has shape {tuple(entry['bias'].shape)}; expected ({B.shape[0]},)"
    if dora and "M" not in entry:
        return f"{name}: the config sets use_dora=True (DoRA) but the module has no lora_magnitude_vector"
    if dora:
        out = B.shape[0]
        want = (1, out) + (1,) * (A.ndim - 2) if kind == "conv" else (out,)
        if tuple(entry["M"].shape) != want:
            return (
                f"{name}: DoRA magnitude (lora_magnitude_vector) has shape {tuple(entry['M'].shape)}; "
                f"a {kind} module with {out} output features needs {want}"
            )
    return None


def _value_problems(tensors: dict[str, Any], allow_nonfinite: bool) -> list[str]:
    """Tensors that are not floats (always a problem) or hold NaN/Inf (unless ``allow_nonfinite``)."""
    import jax.numpy as jnp  # its dtype rules know bfloat16 and float8 as floats; NumPy's do not

    out = []
    for key, x in sorted(tensors.items()):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            out.append(f"{key}: dtype {x.dtype}; LoRA factors are floats (a corrupted or foreign file?)")
        elif not allow_nonfinite and (bad := int(x.size - np.count_nonzero(np.isfinite(x)))):
            out.append(f"{key}: {bad} NaN/Inf of {x.size} entries (a diverged run? allow_nonfinite=True loads it)")
    return out


def read_files(
    path: str | os.PathLike, caller: str, *, allow_nonfinite: bool = False
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """:func:`read_peft` for ``caller``, the public function whose name the errors carry."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    clean_stale(path)  # what a killed save_peft left beside the folder
    cfg_file, w_file = _files(Path(path), caller)
    for file in (cfg_file, w_file):  # or, in a folder that is a mount point, beside its files
        clean_stale(file)
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{caller}: {cfg_file} is not valid JSON: {e}") from None
    config = check_config(config, str(cfg_file), caller)
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{caller}: cannot read {w_file} (truncated or not a safetensors file?): {e}") from None
    problems = Problems(caller)
    problems.extend(_value_problems(tensors, allow_nonfinite))
    saved = take_saved(config, tensors, problems)  # modules_to_save: whole modules (peft/_modules_to_save.py)
    tokens = take_tokens(config, tensors, problems)  # trainable_token_indices: rows of tables (peft/_tokens.py)
    dora = bool(config.get("use_dora", False))
    modules = _group(tensors, problems, dora, bool(config.get("lora_bias", False)))
    for name, entry in modules.items():
        problem = _check_pair(name, entry, dora)
        if problem is not None:
            problems.add(problem)
    untargeted = lambda module: why_untargeted(config, module) is not None
    modules, params = parameter_entries(config, modules, untargeted, problems)  # target_parameters (_experts.py)
    # target_modules, layers_to_transform, exclude_modules (_layers.py)
    check_targets(config, [m for m in modules if m not in params], problems)
    problems.raise_if_any(f"{w_file} has entries lorajax cannot load")
    if not modules:
        raise ValueError(f"{caller}: {w_file} holds no LoRA factors.")
    return config, {**modules, **saved, **tokens}


def read_peft(
    path: str | os.PathLike, *, allow_nonfinite: bool = False
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The config and per-module factors of a PEFT adapter directory, as NumPy arrays.

    Returns ``(config, modules)`` with ``modules[name] = {"kind": "dense"|"conv"|"embed", "A": ..., "B": ...}``
    in PEFT's own shapes; DoRA adapters (``use_dora``) add ``"M"``, the magnitude, in PEFT's shape. Each module
    of ``modules_to_save`` (trained whole) is ``{"kind": "saved", "params": {"weight": ..., "bias": ...}}``,
    its parameters as PEFT wrote them (PyTorch's names and axis order). Each parameter of ``target_parameters``
    adapted as a bank of experts is ``{"kind": "param", "A": (E*r, .), "B": (., E*r)}`` under the parameter's name.
    Checks the same things as :func:`lorajax.load_peft` (unsupported features,
    factor pairs, float factors, and NaN/Inf unless ``allow_nonfinite``).

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile
        >>> p = lorajax.lorafy({"fc": {"kernel": jnp.ones((4, 3))}}, rank=2, where=["fc"], key=jax.random.key(0))
        >>> d = tempfile.mkdtemp() + "/adapter"
        >>> _ = lorajax.save_peft(d, p)
        >>> config, modules = lorajax.read_peft(d)
        >>> config["r"], modules["fc"]["A"].shape, modules["fc"]["B"].shape
        (2, (2, 4), (3, 2))
    """
    return read_files(path, "read_peft", allow_nonfinite=allow_nonfinite)

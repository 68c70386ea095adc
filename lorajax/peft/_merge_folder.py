"""merge_peft: PEFT's ``merge_and_unload()`` + ``save_pretrained()`` on folders, without PyTorch.

The base folder's safetensors shards are copied byte for byte; the weights a PEFT module adapts are then
rewritten in place in the copy, each merged by the package's one LoRA/DoRA kernel formula
(:func:`lorajax._merge.merged_kernel`: float32, rounded once to the weight's dtype). A merged weight has the
dtype and shape of the base weight, so every shard keeps its header, its size and its place in the index.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.tree_util import DictKey

from lorajax._dora import magnitude_shape
from lorajax._layout import Layout
from lorajax._merge import merged_kernel
from lorajax._node import LoRA, LoRASpec
from lorajax._problems import Problems
from lorajax._targets import pattern_key
from lorajax.peft._convert import guess_layout, peft_shapes, to_ours
from lorajax.peft._experts import FUSED, Ref, bank_factors
from lorajax.peft._read import read_files

CALLER = "merge_peft"
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
#: safetensors dtypes a merged weight can be written in (float32 arithmetic, one rounding to these).
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}
#: Files of other weight formats: never copied, as they would hold the unmerged weights.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors", ".index.json")
_SKIP_DIRS = (".git", ".cache")


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data start, header)`` of a safetensors file: its tensors' dtype, shape and byte range."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise ValueError(f"{CALLER}: cannot read the safetensors header of {path}: {e}") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if path.stat().st_size < 8 + n + end:
        raise ValueError(
            f"{CALLER}: {path} is truncated ({path.stat().st_size} bytes; its header needs {8 + n + end}); "
            "download it again."
        )
    return 8 + n, header


def _shards(base: Path) -> tuple[list[str], dict[str, str]]:
    """The base folder's shard file names and ``{weight name: shard}`` (from the index json, or the one file)."""
    if not base.is_dir():
        raise FileNotFoundError(f"{CALLER}: base_dir {base} is not a directory; pass a Hugging Face model folder.")
    if (base / INDEX).is_file():
        try:
            weight_map = json.loads((base / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{CALLER}: {base / INDEX} is not a safetensors index (no weight_map): {e}") from None
        shards = sorted(set(weight_map.values()))
        odd = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s.startswith(".")]
        if odd:
            raise ValueError(f"{CALLER}: {base / INDEX} names shards that are not file names in {base}: {odd[:3]}")
        missing = [s for s in shards if not (base / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{CALLER}: {base / INDEX} names shard(s) missing from {base}: {', '.join(missing)}. "
                "Download the whole checkpoint."
            )
        return shards, dict(weight_map)
    if (base / SINGLE).is_file():
        return [SINGLE], {name: SINGLE for name in _header(base / SINGLE)[1]}
    raise FileNotFoundError(
        f"{CALLER}: {base} holds neither {SINGLE} nor {INDEX}; merge_peft reads safetensors checkpoints "
        "(re-save a .bin one with save_pretrained(safe_serialization=True))."
    )


class _Plan(NamedTuple):
    """How one weight is merged: its factors in the weight's layout, their spec and DoRA's magnitude."""

    a: np.ndarray
    b: np.ndarray
    spec: LoRASpec
    magnitude: np.ndarray | None


def _plan(entry: dict[str, Any], name: str, info: dict[str, Any], config: dict[str, Any]) -> _Plan | str:
    """How module ``name`` merges into its weight ``info`` (safetensors header entry), or the problem."""
    shape, dtype = tuple(info["shape"]), info["dtype"]
    if "A" not in entry:  # trainable_token_indices (or a module to save): not a LoRA pair
        return f"{name}: not a LoRA module ({entry['kind']}); merge it with lorajax.load_peft and lorajax.merge instead"
    kind, A, B = entry["kind"], entry["A"], entry["B"]
    if "bias" in entry:  # lora_bias: merge_peft rewrites weights only
        return f"{name}: has a LoRA bias (lora_bias); merge it with lorajax.load_peft and lorajax.merge instead"
    if dtype not in _DTYPES:
        return (
            f"{name}.weight: dtype {dtype}; merge_peft writes merged weights in {', '.join(_DTYPES)} only "
            "(dequantize or convert the base first)"
        )
    path = (DictKey(name), DictKey("weight"))
    try:
        lay = guess_layout(kind, path, shape, A, B, bool(config.get("fan_in_fan_out", False)), CALLER)
    except ValueError as e:
        return f"{name}.weight: {e}"
    r = int(A.shape[0])
    want_a, want_b = peft_shapes(kind, lay, shape, r) if lay.ndim == len(shape) else (None, None)
    if (tuple(A.shape), tuple(B.shape)) != (want_a, want_b):
        return (
            f"{name}: the base weight {name}.weight has shape {shape}, which needs lora_A {want_a} and lora_B "
            f"{want_b}; the adapter has {tuple(A.shape)} and {tuple(B.shape)} (an adapter for another model?)"
        )
    alpha_key = pattern_key(dict(config.get("alpha_pattern") or {}), name)
    alpha = config["alpha_pattern"][alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    dora = entry.get("M") is not None
    spec = LoRASpec(r, float(alpha), lay, bool(config.get("use_rslora", False)), "dora" if dora else "lora")
    a, b = to_ours(kind, A, B, lay, shape)
    m = np.reshape(entry["M"], magnitude_shape(lay, shape)) if dora else None  # PEFT's (1, out, 1, 1) too
    return _Plan(a, b, spec, m)


def _plan_all(
    config: dict[str, Any],
    modules: dict[str, dict[str, Any]],
    weight_map: dict[str, str],
    headers: dict[str, Any],
    transposed: bool = False,
) -> dict[str, list[Any]]:
    """``{shard: [(header entry, plan), ...]}`` for every adapter module, with the problems under ``""``."""
    plans: dict[str, list[Any]] = {s: [] for s in headers} | {"": []}
    names = sorted(weight_map)
    for name, entry in sorted(modules.items()):
        if entry.get("kind") == "param":  # PEFT's target_parameters: an expert bank
            for where, item in _plan_bank(entry, name, config, weight_map, headers, transposed):
                plans[where].append(item)
            continue
        shard = weight_map.get(f"{name}.weight")
        info = headers[shard][1].get(f"{name}.weight") if shard is not None else None
        if shard is None or info is None:
            near = [n for n in names if n.endswith(f"{name.rpartition('.')[2]}.weight")][:3] or names[:3]
            plans[""].append(
                f"module {name!r}: the base has no weight {name}.weight"
                + (f" in {shard}" if shard is not None else "")
                + f" (it has e.g. {', '.join(near)})"
            )
            continue
        plan = _plan(entry, name, info, config)
        if isinstance(plan, str):
            plans[""].append(plan)
        else:
            plans[shard].append((info, plan))
    return plans


#: transformers 5 models whose fused expert banks are ``(E, in, out)`` (``is_transposed=True``), kept so on disk.
_TRANSPOSED_EXPERTS = ("gpt_oss", "aria", "ergo", "openai_privacy_filter")


def _transposed_experts(base: Path) -> bool:
    """Whether the base folder's ``config.json`` names a model whose expert banks are ``(E, in, out)``."""
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    text = config.get("text_config")
    types = {config.get("model_type"), text.get("model_type") if isinstance(text, dict) else None}
    return bool(types & set(_TRANSPOSED_EXPERTS))


def _bank_keys(name: str, weight_map: dict[str, str]) -> tuple[list[tuple[str, int, int]], int]:
    """The per-expert weights (``(leaf, slice, slices)`` of :data:`FUSED`) that hold fused parameter ``name``
    (``<block>.experts.gate_up_proj``) in the file, and the number of experts."""
    module, _, param = name.rpartition(".")
    leaves = [
        (leaf, j, n) for leaf, (p, j, n) in FUSED.items() if p == param and f"{module}.0.{leaf}.weight" in weight_map
    ]
    experts = 0
    while leaves and all(f"{module}.{experts}.{leaf}.weight" in weight_map for leaf, _, _ in leaves):
        experts += 1
    return leaves, experts


def _plan_bank(
    entry: dict[str, Any],
    name: str,
    config: dict[str, Any],
    weight_map: dict[str, str],
    headers: dict[str, Any],
    transposed: bool,
) -> list[tuple[str, Any]]:
    """``[(shard, (header entry, plan) or problem)]`` for the expert bank ``name`` (a ``target_parameters`` entry):
    the fused parameter where the file keeps it (``<block>.experts.gate_up_proj``, ``(E, out, in)``), else the
    per-expert weights transformers saves it as (``<block>.experts.<e>.gate_proj.weight``: the first half of
    ``gate_up_proj``'s output, ``up_proj`` the second, as in :data:`FUSED`)."""
    if name in weight_map:  # the fused parameter itself
        info = headers[weight_map[name]][1].get(name)
        if info is None or len(info["shape"]) != 3 or info["dtype"] not in _DTYPES:
            got = "missing" if info is None else f"{info['dtype']} {tuple(info['shape'])}"
            return [("", f"{name}: a 3-D F32/F16/BF16 expert bank in the base, but it is {got}")]
        # transformers 5's (E, out, in) first, (E, in, out) first for the models whose experts are is_transposed
        # (gpt-oss: stored as in memory): a square bank is read as PEFT reads it in memory.
        first, second = (Layout("sio"), Layout("soi")) if transposed else (Layout("soi"), Layout("sio"))
        try:
            f = bank_factors(name, tuple(info["shape"]), first, entry, Ref(name, 0, 1), config)
        except ValueError:
            try:
                f = bank_factors(name, tuple(info["shape"]), second, entry, Ref(name, 0, 1), config)
            except ValueError as err:
                return [("", str(err))]
        spec = LoRASpec(f.rank, f.alpha, f.layout, f.rslora, "lora")
        return [(weight_map[name], (info, _Plan(f.a, f.b, spec, None)))]
    leaves, experts = _bank_keys(name, weight_map)
    module = name.rpartition(".")[0]
    if not experts:
        near = [n for n in sorted(weight_map) if n.startswith(f"{module}.")][:3]
        return [
            (
                "",
                f"parameter {name!r}: the base has neither {name} nor per-expert weights "
                f"({module}.0.<{'|'.join(k for k, v in FUSED.items() if v[0] == name.rpartition('.')[2])}>.weight)"
                + (f"; it has e.g. {', '.join(near)}" if near else ""),
            )
        ]
    if sorted(j for _, j, _ in leaves) != list(range(leaves[0][2])):
        have = ", ".join(leaf for leaf, _, _ in leaves)
        return [("", f"parameter {name!r}: the base has only {have} of its per-expert parts under {module}.<e>")]
    out: list[tuple[str, Any]] = []
    for leaf, j, count in leaves:
        keys = [f"{module}.{e}.{leaf}.weight" for e in range(experts)]
        infos = [headers[weight_map[k]][1].get(k) for k in keys]
        shapes = {None if i is None else (i["dtype"], tuple(i["shape"])) for i in infos}
        if len(shapes) != 1 or None in shapes or len(infos[0]["shape"]) != 2 or infos[0]["dtype"] not in _DTYPES:
            out.append(
                ("", f"{module}.<e>.{leaf}.weight: expected one 2-D F32/F16/BF16 shape, got {sorted(map(str, shapes))}")
            )
            continue
        shape = (experts, *infos[0]["shape"])  # (E, out, in): torch Linear weights stacked
        try:
            f = bank_factors(f"{module}.<e>.{leaf}.weight", shape, Layout("soi"), entry, Ref(name, j, count), config)
        except ValueError as err:
            out.append(("", str(err)))
            continue
        spec = LoRASpec(f.rank, f.alpha, Layout("oi"), f.rslora, "lora")
        for e, (k, info) in enumerate(zip(keys, infos, strict=True)):
            out.append((weight_map[k], (info, _Plan(f.a[e], f.b[e], spec, None))))
    return out


def _merge_into(shard: Path, start: int, info: dict[str, Any], plan: _Plan) -> None:
    """Rewrite one weight of ``shard`` (a copy) with its merged value: the only tensor read into memory."""
    begin, end = (start + int(k) for k in info["data_offsets"])
    dtype = _DTYPES[info["dtype"]]
    with open(shard, "r+b") as fh:
        fh.seek(begin)
        w = np.frombuffer(fh.read(end - begin), dtype=dtype).reshape(info["shape"])
        m = None if plan.magnitude is None else jnp.asarray(plan.magnitude)
        node = LoRA(jnp.asarray(w), jnp.asarray(plan.a), jnp.asarray(plan.b), plan.spec, magnitude=m)
        out = np.asarray(merged_kernel(node)).astype(dtype).tobytes()
        assert len(out) == end - begin, "a merged weight has the base weight's dtype and shape"
        fh.seek(begin)
        fh.write(out)
        fh.flush()
        os.fsync(fh.fileno())


def _copy_other_files(base: Path, out: Path, shards: list[str]) -> None:
    """Copy config, tokenizer and every other non-weight file (subfolders too) of ``base`` into ``out``."""
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(base)
        for f in filenames:
            if rel == Path(".") and (f in shards or f == INDEX):
                continue
            if f.endswith(_OTHER_WEIGHTS):
                continue
            (out / rel).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(dirpath) / f, out / rel / f)


def _check_out(out: Path, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    for src in inputs:
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{CALLER}: out_dir {out} overlaps an input folder ({src}); write the merge elsewhere.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{CALLER}: out_dir {out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{CALLER}: out_dir {out} exists and is not empty; pass overwrite=True to replace it.")


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` folder at ``out``, replacing what was there (an old folder lives until then)."""
    os.chmod(tmp, 0o777 & ~_umask())
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def merge_peft(
    adapter_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Merge a PEFT LoRA/DoRA adapter into a Hugging Face checkpoint folder: ``merge_and_unload`` + ``save_pretrained``.

    Reads the base folder's safetensors (one ``model.safetensors``, or shards with
    ``model.safetensors.index.json``) and the adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``), and writes to ``out_dir`` a folder that
    ``AutoModelForCausalLM.from_pretrained`` (vLLM, a GGUF converter...) loads as the merged model:

    - each weight a PEFT module adapts (``<module>.weight``: Linear, GPT-2 Conv1D with
      ``fan_in_fan_out``, ConvNd, Embedding) merged as ``W + scaling * B @ A``, or DoRA's
      ``(m / ‖W + ΔW‖) ⊙ (W + ΔW)``, in float32 and rounded once to the weight's dtype (bf16
      included), with ``lora_alpha``, ``alpha_pattern`` and ``use_rslora`` from the config: the same
      arithmetic as :func:`lorajax.merge`;
    - each expert bank a ``target_parameters`` adapter adapts (transformers 5's fused
      ``<block>.experts.gate_up_proj`` / ``down_proj``) merged per expert onto the weights the
      file holds: the per-expert ``<block>.experts.<e>.gate_proj.weight`` (first half of
      ``gate_up_proj``'s output), ``up_proj`` (second half) and ``down_proj`` that
      ``save_pretrained`` writes (Mixtral's ``w1``/``w3``/``w2`` likewise), or the fused
      ``(E, out, in)`` parameter where the file keeps it;
    - every other weight unchanged, byte for byte, in the same shard files with the same
      headers, so the shard layout and the index are the base's;
    - ``config.json``, ``generation_config.json``, tokenizer files and every other non-weight file
      (subfolders too) copied. Files of other weight formats (``*.bin``, ``*.pt``, ``*.gguf``,
      safetensors the index does not list) are left out: they would hold unmerged weights.

    Memory: the shards are copied file to file and only the adapted weights are read, one at a
    time, so the peak is the adapter plus about four float32 copies of the largest adapted weight
    (never a whole shard, let alone the model). No PyTorch is needed.

    Everything is checked before anything is written, and the folder is built beside ``out_dir``
    and renamed into place at the end: an error leaves no partial ``out_dir``.

    Args:
        adapter_dir: the PEFT adapter folder (``PeftModel.save_pretrained``, or :func:`lorajax.save_peft`).
        base_dir: the Hugging Face model folder the adapter was trained on.
        out_dir: the folder to write; it must not exist, be empty, or ``overwrite`` must be set.
        overwrite: replace an existing non-empty ``out_dir`` (only once the new folder is complete).

    Returns:
        The path of ``out_dir``.

    Raises:
        ValueError: one message listing every adapter module with no weight in the base, every
            shape mismatch and every weight of a dtype it cannot write (not F32, F16 or BF16),
            or an adapter ``read_peft`` refuses.
        FileNotFoundError: a missing folder, adapter file, or shard named by the index.
        FileExistsError: ``out_dir`` exists and is not empty, without ``overwrite=True``.

    Example:
        >>> import json, pathlib, tempfile, jax, jax.numpy as jnp, numpy as np, lorajax
        >>> from safetensors.numpy import save_file, load_file
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "base").mkdir(); (d / "base" / "config.json").write_text("{}")
        2
        >>> w = np.ones((3, 4), np.float32)  # a torch Linear weight (out, in)
        >>> save_file({"fc.weight": w, "fc.bias": np.zeros(3, np.float32)}, str(d / "base" / "model.safetensors"))
        >>> lora = lorajax.lorafy({"fc": {"kernel": jnp.ones((4, 3))}}, rank=2, where=["fc"], init="gaussian")
        >>> _ = lorajax.save_peft(d / "adapter", lora)
        >>> lorajax.peft.merge_peft(d / "adapter", d / "base", d / "merged").name
        'merged'
        >>> merged = load_file(str(d / "merged" / "model.safetensors"))
        >>> bool(np.allclose(merged["fc.weight"], lorajax.merge(lora)["fc"]["kernel"].T))
        True
        >>> sorted(p.name for p in (d / "merged").iterdir())
        ['config.json', 'model.safetensors']
    """
    adapter, base, out = Path(adapter_dir).absolute(), Path(base_dir).absolute(), Path(out_dir).absolute()
    _check_out(out, overwrite, (adapter, base))
    config, modules = read_files(adapter, CALLER)
    shards, weight_map = _shards(base)
    headers = {s: _header(base / s) for s in shards}
    plans = _plan_all(config, modules, weight_map, headers, _transposed_experts(base))
    problems = Problems(CALLER)
    for problem in (p for p in plans.pop("", []) if isinstance(p, str)):
        problems.add(problem)
    problems.raise_if_any(
        f"{adapter} does not fit the base model in {base}", "Pass the base folder the adapter was trained on."
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for shard in shards:
            shutil.copyfile(base / shard, tmp / shard)
            for info, plan in plans[shard]:
                _merge_into(tmp / shard, headers[shard][0], info, plan)
        if (base / INDEX).is_file():
            shutil.copyfile(base / INDEX, tmp / INDEX)
        _copy_other_files(base, tmp, shards)
        _publish(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return out

"""Read bitsandbytes 4-bit layers from a Hugging Face safetensors checkpoint into quantized kernels.

A ``*-bnb-4bit`` checkpoint stores each ``Linear4bit`` weight as ``<m>.weight``
(packed codes), ``<m>.weight.absmax``, ``<m>.weight.quant_map`` and, with
double quantization, ``<m>.weight.nested_absmax`` and
``<m>.weight.nested_quant_map``, plus a JSON blob ``<m>.weight.quant_state.
bitsandbytes__nf4`` (quant type, block size, dtype, shape, nested offset).
The codes and scales are taken over unchanged, so dequantization gives
bitsandbytes' values bit for bit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorajax._layout import Layout
from lorajax._problems import Problems
from lorajax.quant import _codes
from lorajax.quant._kernel import BLOCK_SIZES, QuantizedKernel

_STATE = ".weight.quant_state.bitsandbytes__"
_PARTS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _read(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    from safetensors import safe_open

    path = Path(os.fspath(source))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"load_bnb_4bit: no safetensors file at {path}.")
    out: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="flax") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def _kernel(module: str, tensors: dict[str, Any], state: dict[str, Any], layout: str) -> QuantizedKernel:
    shape = tuple(int(d) for d in state["shape"])
    if len(shape) != 2:
        raise ValueError(f"load_bnb_4bit: {module}.weight has shape {shape}; only 2-D Linear4bit weights are read.")
    code = np.asarray(tensors[f"{module}.weight.quant_map"], np.float32)
    if not np.array_equal(code, _codes.NF4):
        raise ValueError(f"load_bnb_4bit: {module}.weight.quant_map is not the NF4 table.")
    nested = offset = None
    absmax = jnp.asarray(tensors[f"{module}.weight.absmax"])[None]
    if "nested_offset" in state:
        if int(state.get("nested_blocksize", 256)) != 256:
            raise ValueError(f"load_bnb_4bit: {module}: nested block size {state['nested_blocksize']}, expected 256.")
        nested_code = np.asarray(tensors[f"{module}.weight.nested_quant_map"], np.float32)
        if not np.array_equal(nested_code, _codes.dynamic_map()):
            raise ValueError(f"load_bnb_4bit: {module}.weight.nested_quant_map is not bitsandbytes' dynamic map.")
        nested = jnp.asarray(tensors[f"{module}.weight.nested_absmax"], jnp.float32)[None]
        offset = jnp.asarray([state["nested_offset"]], jnp.float32)
    out_f, in_f = shape
    return QuantizedKernel(
        jnp.asarray(tensors[f"{module}.weight"], jnp.uint8).reshape(1, -1),
        absmax,
        nested,
        offset,
        shape=shape if layout == "oi" else (in_f, out_f),
        dtype=np.dtype(_DTYPES[state["dtype"]]),
        layout=Layout(layout),
        kind="nf4",
        block_size=int(state["blocksize"]),
    )


def load_bnb_4bit(source: Any, *, layout: str = "io") -> dict[str, Any]:
    """Read a bitsandbytes 4-bit (NF4) checkpoint: every ``Linear4bit`` weight becomes a quantized kernel.

    Codes, absmaxes, double-quantization statistics and offset are taken over
    unchanged, so :func:`lorajax.dequantize` gives bitsandbytes' weights bit for
    bit. Every other tensor (biases, norms, embeddings) is returned as it is.

    Args:
        source: a ``.safetensors`` file, a folder of them (sharded checkpoints), or a dict of arrays.
        layout: ``"io"`` (default) names each quantized weight ``<module>.kernel`` with Flax's ``(in, out)``
            shape; ``"oi"`` keeps ``<module>.weight`` with PyTorch's ``(out, in)``. The codes are the same.

    Returns:
        A flat dict from tensor name to array or :class:`lorajax.QuantizedKernel`.

    Raises:
        ValueError: an FP4 layer, a non-2-D weight, a code table that is not NF4's or missing tensors, listing every
            such layer.

    Example:
        >>> import lorajax
        >>> ckpt = lorajax.load_bnb_4bit("tests/fixtures/bnb/linear4bit.safetensors")
        >>> q = ckpt["model.fc1.kernel"]
        >>> q.kind, q.shape, q.block_size, q.double_quant
        ('nf4', (128, 96), 64, True)
    """
    if layout not in ("io", "oi"):
        raise ValueError(f"load_bnb_4bit: layout must be 'io' or 'oi', got {layout!r}.")
    tensors = _read(source)
    problems = Problems("load_bnb_4bit")
    out: dict[str, Any] = {}
    used: set[str] = set()
    for key in sorted(tensors):
        if _STATE not in key:
            continue
        module, kind = key.split(_STATE)
        used.add(key)
        if kind != "nf4":
            problems.add(f"{module}: quant type {kind!r}; only NF4 is read")
            continue
        state = json.loads(bytes(np.asarray(tensors[key], np.uint8).tolist()).decode())
        needed = [f"{module}.{p}" for p in _PARTS if "nested" not in p or "nested_offset" in state]
        missing = [n for n in needed if n not in tensors]
        if missing or int(state["blocksize"]) not in BLOCK_SIZES:
            problems.add(f"{module}: missing {missing}" if missing else f"{module}: block size {state['blocksize']}")
            continue
        try:
            out[f"{module}.{'kernel' if layout == 'io' else 'weight'}"] = _kernel(module, tensors, state, layout)
        except ValueError as e:
            problems.add(str(e).removeprefix("load_bnb_4bit: "))
            continue
        used.update(needed)
    problems.raise_if_any("cannot read these 4-bit layers", "Quantize them with quant_type='nf4' (QLoRA's).")
    out.update({k: v for k, v in tensors.items() if k not in used})
    return dict(sorted(out.items()))

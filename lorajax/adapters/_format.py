"""The adapter file: one safetensors file with a JSON header under ``"lorajax"``.

Format 1: tensor keys are ``"<path>.a"`` / ``"<path>.b"`` (DoRA adds ``"<path>.magnitude"``) in their own dtype; the
header holds per target its rank, alpha, rsLoRA flag, scale, layout, base shape
and base dtype, plus a fingerprint of the base shapes, a sha256 of the tensor
bytes, the lorajax version and user metadata.

Format 2 adds the trained ``also=`` leaves (:class:`lorajax.Trainable`): each under the tensor key
``"<path>"`` in its own dtype, and ``header["trainables"] = {path: {"shape": [...], "dtype": ...}}``.
A file without trainable leaves is still written as format 1, so older lorajax versions read it.

Format 3 adds trainable tokens (:class:`lorajax.TrainableTokens`): the trained rows under the tensor key ``"<path>"``
and ``header["tokens"] = {path: {"indices": [...], "table_shape": [...], "table_dtype": ...}}`` (JSON, never
pickled). Only a file with trainable tokens is written as format 3; the reader takes formats 1 to 3.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lorajax._files import atomic_write, clean_stale
from lorajax._layout import Layout
from lorajax._multihost import gathered, write_once
from lorajax._node import LoRASpec
from lorajax._problems import Problems
from lorajax._sharding import place_factors
from lorajax._tokens import check_indices
from lorajax._version import __version__
from lorajax.adapters._adapter import (
    Adapter,
    AdapterFactors,
    AdapterTokens,
    as_adapter,
    dump_metadata,
    fingerprint,
    is_adapter_tokens,
)
from lorajax.adapters._attach import attach_as, factor_problems
from lorajax.inits import residual_problems

FORMAT = "lorajax-adapter"
FORMAT_VERSION = 3  # the newest format this lorajax reads and writes
#: The format of a file that carries no trainable leaves (what format 1 readers read).
PLAIN_FORMAT_VERSION = 1
#: The format of a file with trained ``also=`` leaves but no trainable tokens (what format 2 readers read).
TRAINABLES_FORMAT_VERSION = 2

# safetensors' numpy loader lacks bfloat16 and float8; map its dtype codes ourselves so bf16 round-trips bit-exactly.
ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over the tensors' names and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + b"\0")
        h.update(np.ascontiguousarray(tensors[key]).tobytes())
    return h.hexdigest()


def _nonfinite(x: np.ndarray) -> int:
    """How many entries of a factor are NaN or ±Inf (0 for integer factors)."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return 0
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def save_adapter(
    path: str | os.PathLike[str],
    params_or_adapter: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Write an adapter to one safetensors file, atomically.

    Tensor keys are the '/'-joined parameter path plus ``".a"`` / ``".b"`` (and ``".magnitude"`` for DoRA),
    stored in their own dtype (bfloat16 included, bit-exact). Every leaf trained beside
    the factors (a :class:`lorajax.Trainable` node: ``lorafy(..., also=...)`` heads, norms,
    biases) is stored whole under its path, in its own dtype, and listed in the header
    (format 2; a file without such leaves stays format 1). The trained rows of a
    :class:`lorajax.TrainableTokens` table are stored under its path, their indices and the
    table's shape in the header (format 3, only for files with trainable tokens). The safetensors
    header carries JSON under ``"lorajax"``: per target its rank, alpha, rsLoRA
    flag, scale, layout and the base kernel's shape and dtype; a fingerprint of
    those base shapes; a sha256 of the tensor bytes; the lorajax version; and
    user metadata. The file is written to a temporary file in the same
    directory and renamed over ``path``, so readers never see half a file; parent
    folders are created, and the temp files of earlier saves that were killed are removed.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        params_or_adapter: lorafied params or an :class:`Adapter`.
        metadata: JSON-serialisable user metadata, merged over the adapter's own.
        allow_nonfinite: write factors (and trained leaves) that hold NaN or Inf anyway. By
            default such an adapter (the trace of a diverged run) is refused.

    Raises:
        ValueError: naming every target whose ``a`` or ``b`` (or trained leaf) holds NaN or
            Inf (unless ``allow_nonfinite=True``); nothing is written then.
        OSError: the file cannot be written (the message names ``path``); an old file stays as it was.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile, os
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> lora = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0))
        >>> f = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> lorajax.save_adapter(f, lora, metadata={"task": "demo"})
        >>> lorajax.load_adapter(f, base)["dense"]["kernel"].rank
        2
        >>> base = {"fc1": {"kernel": jnp.ones((8, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
        >>> lora = lorajax.lorafy(base, rank=2, where=["fc1"], also=["head"])  # the head trains too
        >>> lorajax.save_adapter(f, lora)
        >>> head = lorajax.load_adapter(f, base)["head"]["kernel"]  # comes back as a Trainable node: it trains on
        >>> type(head).__name__, head.value.shape
        ('Trainable', (4, 2))
    """
    from safetensors.numpy import save

    ad = gathered(as_adapter(params_or_adapter, caller="save_adapter"))  # whole factors, in every process
    user = {**ad.metadata, **json.loads(dump_metadata(metadata))}
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, Any] = {}
    problems = Problems("save_adapter")
    for name, f in sorted(ad.factors.items()):
        if isinstance(f.a, jax.core.Tracer) or isinstance(f.b, jax.core.Tracer):
            raise TypeError(f"save_adapter: {name} holds traced arrays; call save_adapter outside jax.jit.")
        a, b = np.ascontiguousarray(jax.device_get(f.a)), np.ascontiguousarray(jax.device_get(f.b))
        bad = [
            f"{which} holds {n} NaN/Inf of {x.size} entries"
            for which, x in (("a", a), ("b", b))
            if (n := _nonfinite(x))
        ]
        if bad:
            problems.add(f"non-finite: {name}: factor {', factor '.join(bad)}")
        tensors[name + ".a"], tensors[name + ".b"] = a, b
        if f.magnitude is not None:  # DoRA
            m = np.ascontiguousarray(jax.device_get(f.magnitude))
            if n_bad := _nonfinite(m):
                problems.add(f"non-finite: {name}: magnitude holds {n_bad} NaN/Inf of {m.size} entries")
            tensors[name + ".magnitude"] = m
        if f.bias is not None:  # lora_bias
            bias = np.ascontiguousarray(jax.device_get(f.bias))
            if n_bad := _nonfinite(bias):
                problems.add(f"non-finite: {name}: LoRA bias holds {n_bad} NaN/Inf of {bias.size} entries")
            tensors[name + ".bias"] = bias
        targets[name] = {
            "rank": f.rank,
            "alpha": f.alpha,
            "rslora": f.rslora,
            "scale": f.scale,
            "layout": f.layout.axes,
            "base_shape": list(f.shape),
            "base_dtype": f.dtype,
            "a_dtype": a.dtype.name,
            "b_dtype": b.dtype.name,
        }
        if f.spec.variant != "lora":  # format 1 files of plain LoRA carry no variant key
            targets[name]["variant"] = f.spec.variant
        if f.spec.init != "default":  # a PiSSA/OLoRA adapter fits only its residual base: say so in the file
            targets[name]["init"] = f.spec.init
        if f.spec.bias:  # lora_bias: its tensor is "<path>.bias"
            targets[name]["bias"] = True
    trainables: dict[str, Any] = {}
    tokens: dict[str, Any] = {}
    for name, x in sorted(ad.trainables.items()):
        rows = x.values if is_adapter_tokens(x) else x
        if isinstance(rows, jax.core.Tracer):
            raise TypeError(f"save_adapter: {name} holds traced arrays; call save_adapter outside jax.jit.")
        if name in tensors:
            raise ValueError(f"save_adapter: the trained leaf {name} has the tensor name of a factor; rename it.")
        value = np.ascontiguousarray(jax.device_get(rows))
        if n_bad := _nonfinite(value):
            problems.add(f"non-finite: {name}: the trained leaf holds {n_bad} NaN/Inf of {value.size} entries")
        tensors[name] = value
        if is_adapter_tokens(x):  # trainable tokens: the rows, their indices and the table they fit, as JSON
            tokens[name] = {
                "indices": [int(i) for i in x.indices],
                "table_shape": list(x.shape),
                "table_dtype": x.dtype,
            }
        else:
            trainables[name] = {"shape": list(value.shape), "dtype": value.dtype.name}
    if not allow_nonfinite:
        problems.raise_if_any(
            "the factors hold NaN or Inf",
            "Such an adapter comes from a diverged run; save an earlier checkpoint, or pass allow_nonfinite=True.",
        )
    header = {
        "format_version": FORMAT_VERSION
        if tokens
        else TRAINABLES_FORMAT_VERSION
        if trainables
        else PLAIN_FORMAT_VERSION,
        "lorajax_version": __version__,
        "targets": targets,
        "fingerprint": ad.fingerprint,
        "sha256": tensor_digest(tensors),
        "metadata": user,
    }
    if trainables:
        header["trainables"] = trainables
    if tokens:
        header["tokens"] = tokens
    data = save(tensors, metadata={"format": FORMAT, "lorajax": json.dumps(header, sort_keys=True)})
    write_once("save_adapter", os.fspath(path), lambda: atomic_write(path, data, caller="save_adapter"))


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read an adapter file written by :func:`save_adapter`, without any base.

    Everything is validated before anything is returned: the safetensors
    structure, the lorajax header, the tensor checksum, that every target
    has exactly its ``.a`` and ``.b`` tensors of the recorded shapes, and that every
    trained leaf the header lists (format 2) is there in its recorded shape and dtype.

    Args:
        path: the adapter file.

    Returns:
        An :class:`Adapter` whose ``metadata`` is the user metadata saved with it.

    Raises:
        ValueError: naming the file, for a truncated, corrupted or foreign file.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile, os
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> f = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> lorajax.save_adapter(f, lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0)), {"task": "x"})
        >>> lorajax.read_adapter(f).metadata
        {'task': 'x'}
    """
    return read_file(path, caller="read_adapter")


def read_file(path: str | os.PathLike[str], *, caller: str) -> Adapter:
    """:func:`read_adapter`, with errors that name ``caller`` (the public function the user called)."""
    import safetensors

    fname = os.fspath(path)
    clean_stale(fname)  # what a killed save_adapter left beside the file
    with open(fname, "rb") as fh:
        data = fh.read()

    def bad(why: str) -> ValueError:
        return ValueError(f"{caller}: {fname} {why}")

    try:
        flat = safetensors.deserialize(data)
    except Exception as e:
        raise bad(f"is not a readable safetensors file ({e}); it is truncated, corrupted or not an adapter.") from None
    try:
        (n,) = np.frombuffer(data[:8], dtype="<u8")
        meta = json.loads(data[8 : 8 + int(n)]).get("__metadata__") or {}
    except Exception as e:
        raise bad(f"has an unreadable header ({e}).") from None
    if meta.get("format") != FORMAT or "lorajax" not in meta:
        raise bad(
            "is a safetensors file but not a lorajax adapter (no 'lorajax' header); "
            "a PEFT adapter directory loads with lorajax.load_peft."
        )
    try:
        header = json.loads(meta["lorajax"])
        targets = header["targets"]
        version = int(header["format_version"])
        declared = dict(header.get("trainables") or {})
        declared_tokens = dict(header.get("tokens") or {})
    except Exception as e:
        raise bad(f"has a corrupted lorajax header ({e}).") from None
    if version > FORMAT_VERSION:
        raise bad(f"uses adapter format {version}; this lorajax reads up to {FORMAT_VERSION}. Upgrade lorajax.")

    tensors: dict[str, np.ndarray] = {}
    for key, view in flat:
        dtype = ST_DTYPES.get(view["dtype"])
        if dtype is None:
            raise bad(f"holds tensor {key!r} of unsupported dtype {view['dtype']}.")
        tensors[key] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
    if header.get("sha256") != tensor_digest(tensors):
        raise bad("fails its checksum: the tensor data is corrupted.")

    factors: dict[str, AdapterFactors] = {}
    problems = Problems(caller)
    try:
        for name, t in sorted(targets.items()):
            a, b = tensors.get(name + ".a"), tensors.get(name + ".b")
            if a is None or b is None:
                problems.add(f"missing: {name}: tensor {name + ('.a' if a is None else '.b')} is not in the file")
                continue
            spec = LoRASpec(
                rank=int(t["rank"]),
                alpha=float(t["alpha"]),
                layout=Layout(t["layout"]),
                rslora=bool(t["rslora"]),
                variant=str(t.get("variant", "lora")),
                init=str(t.get("init", "default")),
                bias=bool(t.get("bias", False)),
            )
            m = tensors.get(name + ".magnitude")
            if spec.variant == "dora" and m is None:
                problems.add(f"missing: {name}: a DoRA entry but tensor {name + '.magnitude'} is not in the file")
                continue
            bias = tensors.get(name + ".bias")
            if spec.bias and bias is None:
                problems.add(f"missing: {name}: a LoRA bias entry but tensor {name + '.bias'} is not in the file")
                continue
            f = AdapterFactors(
                a=jnp.asarray(a),
                b=jnp.asarray(b),
                spec=spec,
                shape=tuple(int(d) for d in t["base_shape"]),
                dtype=str(t["base_dtype"]),
                magnitude=None if spec.variant != "dora" else jnp.asarray(m),
                bias=jnp.asarray(bias) if spec.bias else None,
            )
            problems.extend(factor_problems(name, f))
            if "scale" in t and not math.isclose(float(t["scale"]), spec.scale, rel_tol=1e-6):  # a flipped byte
                problems.add(f"scale: {name}: recorded scale {t['scale']} but rank/alpha/rslora give {spec.scale}")
            factors[name] = f
        trainables = _read_trainables(declared, tensors, problems)
        trainables.update(_read_tokens(declared_tokens, tensors, problems))
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"has a corrupted lorajax header ({type(e).__name__}: {e}).") from None
    known = {name + s for name in targets for s in (".a", ".b")} | set(declared) | set(declared_tokens)
    problems.extend(
        [f"tokens: {name}: listed as a trained leaf and as tokens" for name in set(declared) & set(declared_tokens)]
    )
    known |= {name + ".magnitude" for name, t in targets.items() if t.get("variant") == "dora"}
    known |= {name + ".bias" for name, t in targets.items() if t.get("bias")}
    problems.extend([f"extra: tensor {k!r} belongs to no target in the header" for k in sorted(set(tensors) - known)])
    if not problems and header.get("fingerprint") != fingerprint(factors, trainables):
        problems.add("fingerprint: the base-shape fingerprint does not match the targets in the header")
    problems.raise_if_any(f"{fname} is inconsistent", "The file is corrupted; save it again.")
    return Adapter(factors, dump_metadata(header.get("metadata") or {}), trainables)


def _read_trainables(declared: dict[str, Any], tensors: dict[str, np.ndarray], problems: Problems) -> dict[str, Any]:
    """The trained leaves the header lists, each checked against its tensor's shape and dtype."""
    out = {}
    for name, t in sorted(declared.items()):
        x = tensors.get(name)
        shape, dtype = tuple(int(d) for d in t["shape"]), str(t["dtype"])
        if x is None:
            problems.add(f"missing: {name}: a trained leaf in the header but its tensor is not in the file")
        elif tuple(x.shape) != shape or x.dtype.name != dtype:
            problems.add(
                f"shape: {name}: the header says {dtype}{list(shape)}, the tensor is {x.dtype.name}{list(x.shape)}"
            )
        else:
            out[name] = jnp.asarray(x)
    return out


def _read_tokens(declared: dict[str, Any], tensors: dict[str, np.ndarray], problems: Problems) -> dict[str, Any]:
    """The trainable tokens the header lists, each checked: indices against the table, rows against both."""
    out: dict[str, Any] = {}
    for name, t in sorted(declared.items()):
        x, indices, shape = tensors.get(name), list(t["indices"]), tuple(int(d) for d in t["table_shape"])
        why = "a 2-D table shape" if len(shape) != 2 else check_indices(indices, shape[0], name)
        if x is None:
            problems.add(f"missing: {name}: trainable tokens in the header but their tensor is not in the file")
        elif why:
            problems.add(
                f"tokens: {why}" if len(shape) == 2 else f"tokens: {name}: the header says table {shape}, not {why}"
            )
        elif tuple(x.shape) != (len(indices), shape[1]):
            problems.add(
                f"shape: {name}: {len(indices)} token indices into a table {shape} need rows of shape "
                f"{(len(indices), shape[1])}, the tensor is {tuple(x.shape)}"
            )
        else:
            out[name] = AdapterTokens(jnp.asarray(x), tuple(int(i) for i in indices), shape, str(t["table_dtype"]))
    return out


def load_adapter(path: str | os.PathLike[str], base_params: Any, *, check_dtype: bool = False) -> Any:
    """Read an adapter file and attach it to ``base_params``.

    Args:
        path: a file written by :func:`save_adapter`.
        base_params: the base model's params (plain or lorafied).
        check_dtype: see :func:`attach`.

    Returns:
        Lorafied params, with a :class:`lorajax.Trainable` node (placed like the base leaf)
        for every trained leaf the file carries. Nothing is returned unless the whole file
        was valid and fits the base; a wrong base raises a ValueError naming each path with
        both shapes, as does a file whose trained leaves the base lacks, or ``base_params``
        that declare leaves trainable (``Trainable`` nodes) the file does not carry.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile, os
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> f = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> lorajax.save_adapter(f, lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0)))
        >>> lorajax.load_adapter(f, base)["dense"]["kernel"].a.shape
        (8, 2)
    """
    ad = read_file(path, caller="load_adapter")
    residual = Problems("load_adapter")
    residual.extend(residual_problems(ad.factors, base_params))
    residual.raise_if_any(
        f"{os.fspath(path)}: the adapter needs its residual base",
        "Load it onto lorajax.lorafy(base, init=..., rank=..., alpha=...) as it was made (the residual is recomputed), "
        "or save it as plain LoRA for the original base with lorajax.to_plain_lora(trained, initial).",
    )
    loaded = attach_as(base_params, ad, check_dtype=check_dtype, caller="load_adapter", what=f"{os.fspath(path)}: ")
    return place_factors(loaded)  # sharded like the base says, so the first step does not reshard them

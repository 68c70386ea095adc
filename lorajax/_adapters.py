"""Native adapters: LoRA factors without their base, as pytrees and as safetensors files.

Also the many-adapters-on-one-base operations that work on adapters alone:
swapping on a merged model and combining adapters.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lorajax import _boxes, _targets
from lorajax._files import atomic_write
from lorajax._layout import Layout
from lorajax._node import LoRA, LoRASpec, is_lora, lora_scale

FORMAT = "lorajax-adapter"
FORMAT_VERSION = 1

# safetensors' numpy loader lacks bfloat16 and float8; map its dtype codes ourselves so bf16 round-trips bit-exactly.
_ST_DTYPES: dict[str, Any] = {
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterFactors:
    """The LoRA factors of one target kernel, without the kernel.

    ``a`` and ``b`` are plain arrays (never Flax boxes) shaped as in
    :class:`lorajax.LoRA`. Everything else is static metadata, including the
    ``shape`` and ``dtype`` of the base kernel the factors were made for, so an
    adapter can tell a wrong base from the right one.
    """

    a: Any
    b: Any
    rank: int = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return lora_scale(self.alpha, self.rank, self.rslora)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter on its own: ``{path: AdapterFactors}`` plus JSON metadata.

    A plain pytree whose only leaves are the factor arrays, so it can be
    jitted, ``device_put``, sharded or checkpointed with Orbax like any other
    tree. Paths are '/'-joined parameter paths (``"params/Dense_0/kernel"``).
    ``metadata`` is user metadata (JSON-serialisable); it is kept as static
    JSON text so the tree stays hashable.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.ones((4, 4))}}, rank=2, where=".*", key=jax.random.key(0))
        >>> ad = lorajax.adapter(p)
        >>> ad.targets, ad["q/kernel"].a.shape
        (('q/kernel',), (4, 2))
    """

    factors: dict[str, AdapterFactors]
    metadata_json: str = dataclasses.field(default="{}", metadata=dict(static=True))

    @property
    def metadata(self) -> dict[str, Any]:
        """User metadata (a fresh dict on every access)."""
        return json.loads(self.metadata_json)

    @property
    def targets(self) -> tuple[str, ...]:
        """Paths of the targeted kernels, sorted."""
        return tuple(sorted(self.factors))

    @property
    def fingerprint(self) -> str:
        """sha256 over the targets' paths, base shapes and base dtypes."""
        return _fingerprint(self.factors)

    def __getitem__(self, path: str) -> AdapterFactors:
        return self.factors[path]

    def __len__(self) -> int:
        return len(self.factors)

    def with_metadata(self, metadata: Mapping[str, Any] | None) -> Adapter:
        """A copy whose metadata is updated with ``metadata``."""
        merged = {**self.metadata, **dict(metadata or {})}
        return Adapter(dict(self.factors), _dump_metadata(merged))


def _fingerprint(factors: Mapping[str, AdapterFactors]) -> str:
    spec = [[p, list(f.shape), f.dtype] for p, f in sorted(factors.items())]
    return hashlib.sha256(json.dumps(spec, separators=(",", ":")).encode()).hexdigest()


def _dump_metadata(metadata: Mapping[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of JSON-serialisable values, got {type(metadata).__name__}.")
    try:
        return json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable (str, number, bool, None, list, dict): {e}") from None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lorajax")
    except Exception:
        import lorajax

        return str(getattr(lorajax, "__version__", "0+unknown"))


# --------------------------------------------------------------------------------------------------------------------
# adapter / attach


def adapter(params: Any, metadata: Mapping[str, Any] | None = None) -> Adapter:
    """The LoRA factors of lorafied ``params`` with their metadata, without any base weight.

    Args:
        params: lorafied params (or an :class:`Adapter`, returned with ``metadata`` added).
        metadata: optional JSON-serialisable user metadata carried along (and saved by
            :func:`save_adapter`).

    Returns:
        An :class:`Adapter`: ``{path: AdapterFactors}``. The factor arrays are the
        caller's own (unboxed), not copies.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> ad = lorajax.adapter(lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0)))
        >>> ad.targets
        ('dense/kernel',)
    """
    if isinstance(params, Adapter):
        return params.with_metadata(metadata) if metadata else params
    factors: dict[str, AdapterFactors] = {}
    for path, leaf in _targets.tree_paths(params, is_leaf=is_lora):
        if not is_lora(leaf):
            continue
        name = _targets.path_str(path)
        if leaf.per_example:
            raise ValueError(
                f"adapter: {name} is a per-example LoRA node (made by lorajax.select for a mixed batch); take the "
                f"adapter from the params you stacked into the bank instead."
            )
        base = _boxes.unbox(leaf.base)
        factors[name] = AdapterFactors(
            a=_boxes.unbox(leaf.a),
            b=_boxes.unbox(leaf.b),
            rank=leaf.rank,
            alpha=leaf.alpha,
            layout=leaf.layout,
            rslora=leaf.rslora,
            shape=tuple(int(d) for d in base.shape),
            dtype=jnp.dtype(base.dtype).name,
        )
    if not factors:
        raise ValueError("adapter: params hold no LoRA node; call lorajax.lorafy (or lorajax.load_adapter) first.")
    return Adapter(factors, _dump_metadata(metadata))


_adapter_of = adapter  # attach's argument is named like the function


def _factor_problems(name: str, f: AdapterFactors) -> list[str]:
    """Inconsistencies inside one entry: layout vs recorded shape vs factor shapes."""
    if f.layout.ndim != len(f.shape):
        return [
            f"layout: {name}: layout {f.layout.axes!r} has {f.layout.ndim} axes, "
            f"the kernel shape {f.shape} has {len(f.shape)}"
        ]
    out = []
    want_a, want_b = f.layout.a_shape(f.shape, f.rank), f.layout.b_shape(f.shape, f.rank)
    if tuple(f.a.shape) != want_a:
        out.append(
            f"shape: {name}: factor a has shape {tuple(f.a.shape)}, expected {want_a} "
            f"(rank {f.rank}, layout {f.layout.axes!r})"
        )
    if tuple(f.b.shape) != want_b:
        out.append(
            f"shape: {name}: factor b has shape {tuple(f.b.shape)}, expected {want_b} "
            f"(rank {f.rank}, layout {f.layout.axes!r})"
        )
    return out


def _base_problems(name: str, f: AdapterFactors, leaf: Any, check_dtype: bool) -> list[str]:
    if is_lora(leaf):
        leaf = leaf.base
    base = _boxes.unbox(leaf)
    if not hasattr(base, "shape"):
        return [f"missing: {name}: the base has {type(base).__name__} there, not an array"]
    shape = tuple(int(d) for d in base.shape)
    if len(shape) != f.layout.ndim:
        return [
            f"layout: {name}: layout {f.layout.axes!r} has {f.layout.ndim} axes but the base kernel has shape {shape}"
        ]
    if shape != f.shape:
        return [f"shape: {name}: the adapter was made for a base kernel of shape {f.shape}, this base has {shape}"]
    if check_dtype and f.dtype and jnp.dtype(base.dtype).name != f.dtype:
        return [
            f"dtype: {name}: the adapter was made for a {f.dtype} base kernel, "
            f"this base is {jnp.dtype(base.dtype).name}"
        ]
    return []


def _raise_problems(what: str, problems: list[str], hint: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{what} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}\n{hint}")


def _leaf_index(tree: Any) -> tuple[list[tuple[Any, Any]], dict[str, int]]:
    leaves = _targets.tree_paths(tree, is_leaf=is_lora)
    return leaves, {_targets.path_str(p): n for n, (p, _) in enumerate(leaves)}


def _rebuild(tree: Any, leaves: list[tuple[Any, Any]], replaced: Mapping[int, Any]) -> Any:
    treedef = jax.tree_util.tree_structure(tree, is_leaf=lambda x: _boxes.is_box(x) or is_lora(x))
    return jax.tree_util.tree_unflatten(treedef, [replaced.get(n, leaf) for n, (_, leaf) in enumerate(leaves)])


def attach(base_params: Any, adapter: Adapter, *, check_dtype: bool = False) -> Any:
    """Lorafied params again: ``adapter``'s factors on ``base_params``' kernels.

    ``base_params`` may be plain or lorafied; LoRA nodes already there are
    replaced by their base first, so the result carries exactly this adapter.
    Factors are re-boxed like their base (``nn.Partitioned``, ``nnx.Param``).

    Args:
        base_params: the base model's params (any pytree lorafy accepts).
        adapter: an :class:`Adapter` (or lorafied params to take it from).
        check_dtype: also require each base kernel's dtype to be the one the adapter
            was made for (off by default: serving a float32-trained adapter on a
            bfloat16 base is normal).

    Returns:
        Params with a :class:`lorajax.LoRA` node at every target of the adapter.

    Raises:
        ValueError: listing every mismatch at once: targets missing from the base,
            kernels of another shape or rank of axes than the adapter was made for,
            factors inconsistent with their rank or layout.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> ad = lorajax.adapter(lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0)))
        >>> lorajax.attach(base, ad)["dense"]["kernel"].rank
        2
    """
    from lorajax._layout import factor_names as _factor_names

    ad = adapter if isinstance(adapter, Adapter) else _adapter_of(adapter)
    leaves, index = _leaf_index(base_params)
    problems: list[str] = []
    for name, f in sorted(ad.factors.items()):
        problems += _factor_problems(name, f)
        if name not in index:
            near = difflib.get_close_matches(name, list(index), n=3, cutoff=0.75)
            problems.append(
                f"missing: {name}: no such parameter in the base" + (f" (similar: {', '.join(near)})" if near else "")
            )
        else:
            problems += _base_problems(name, f, leaves[index[name]][1], check_dtype)
    _raise_problems(
        "attach: the adapter does not fit these base params",
        problems,
        "Attach an adapter only to the base model it was trained on (compare adapter.targets with the base's paths).",
    )
    replaced: dict[int, Any] = {}
    for n, (_, leaf) in enumerate(leaves):
        if is_lora(leaf):
            replaced[n] = leaf.base
    for name, f in ad.factors.items():
        n = index[name]
        leaf = leaves[n][1]
        base = leaf.base if is_lora(leaf) else leaf
        names_a, names_b = _factor_names(base, f.layout)
        replaced[n] = LoRA(
            base=base,
            a=_boxes.rebox(base, f.a, names_a),
            b=_boxes.rebox(base, f.b, names_b),
            spec=LoRASpec(rank=f.rank, alpha=f.alpha, layout=f.layout, rslora=f.rslora),
        )
    return _rebuild(base_params, leaves, replaced)


# --------------------------------------------------------------------------------------------------------------------
# files


def _tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + b"\0")
        h.update(np.ascontiguousarray(tensors[key]).tobytes())
    return h.hexdigest()


def save_adapter(
    path: str | os.PathLike[str], params_or_adapter: Any, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write an adapter to one safetensors file, atomically.

    Tensor keys are the '/'-joined parameter path plus ``".a"`` / ``".b"``,
    stored in their own dtype (bfloat16 included, bit-exact). The safetensors
    header carries JSON under ``"lorajax"``: per target its rank, alpha, rsLoRA
    flag, scale, layout and the base kernel's shape and dtype; a fingerprint of
    those base shapes; a sha256 of the tensor bytes; the lorajax version; and
    user metadata. The file is written to a temporary file in the same
    directory and renamed over ``path``, so readers never see half a file.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        params_or_adapter: lorafied params or an :class:`Adapter`.
        metadata: JSON-serialisable user metadata, merged over the adapter's own.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile, os
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> lora = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0))
        >>> f = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> lorajax.save_adapter(f, lora, metadata={"task": "demo"})
        >>> lorajax.load_adapter(f, base)["dense"]["kernel"].rank
        2
    """
    from safetensors.numpy import save

    ad = adapter(params_or_adapter)
    user = {**ad.metadata, **json.loads(_dump_metadata(metadata))}
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, Any] = {}
    for name, f in sorted(ad.factors.items()):
        if isinstance(f.a, jax.core.Tracer) or isinstance(f.b, jax.core.Tracer):
            raise TypeError(f"save_adapter: {name} holds traced arrays; call save_adapter outside jax.jit.")
        a, b = np.ascontiguousarray(jax.device_get(f.a)), np.ascontiguousarray(jax.device_get(f.b))
        tensors[name + ".a"], tensors[name + ".b"] = a, b
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
    header = {
        "format_version": FORMAT_VERSION,
        "lorajax_version": _version(),
        "targets": targets,
        "fingerprint": ad.fingerprint,
        "sha256": _tensor_digest(tensors),
        "metadata": user,
    }
    data = save(tensors, metadata={"format": FORMAT, "lorajax": json.dumps(header, sort_keys=True)})
    atomic_write(path, data)


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read an adapter file written by :func:`save_adapter`, without any base.

    Everything is validated before anything is returned: the safetensors
    structure, the lorajax header, the tensor checksum, and that every target
    has exactly its ``.a`` and ``.b`` tensors of the recorded shapes.

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
    import safetensors

    fname = os.fspath(path)
    with open(fname, "rb") as fh:
        data = fh.read()

    def bad(why: str) -> ValueError:
        return ValueError(f"load_adapter: {fname} {why}")

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
    except Exception as e:
        raise bad(f"has a corrupted lorajax header ({e}).") from None
    if version > FORMAT_VERSION:
        raise bad(f"uses adapter format {version}; this lorajax reads up to {FORMAT_VERSION}. Upgrade lorajax.")

    tensors: dict[str, np.ndarray] = {}
    for key, view in flat:
        dtype = _ST_DTYPES.get(view["dtype"])
        if dtype is None:
            raise bad(f"holds tensor {key!r} of unsupported dtype {view['dtype']}.")
        tensors[key] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
    if header.get("sha256") != _tensor_digest(tensors):
        raise bad("fails its checksum: the tensor data is corrupted.")

    factors: dict[str, AdapterFactors] = {}
    problems: list[str] = []
    try:
        for name, t in sorted(targets.items()):
            a, b = tensors.get(name + ".a"), tensors.get(name + ".b")
            if a is None or b is None:
                problems.append(f"missing: {name}: tensor {name + ('.a' if a is None else '.b')} is not in the file")
                continue
            f = AdapterFactors(
                a=jnp.asarray(a),
                b=jnp.asarray(b),
                rank=int(t["rank"]),
                alpha=float(t["alpha"]),
                layout=Layout(t["layout"]),
                rslora=bool(t["rslora"]),
                shape=tuple(int(d) for d in t["base_shape"]),
                dtype=str(t["base_dtype"]),
            )
            problems += _factor_problems(name, f)
            factors[name] = f
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"has a corrupted lorajax header ({type(e).__name__}: {e}).") from None
    known = {name + s for name in targets for s in (".a", ".b")}
    problems += [f"extra: tensor {k!r} belongs to no target in the header" for k in sorted(set(tensors) - known)]
    if not problems and header.get("fingerprint") != _fingerprint(factors):
        problems.append("fingerprint: the base-shape fingerprint does not match the targets in the header")
    _raise_problems(f"load_adapter: {fname} is inconsistent", problems, "The file is corrupted; save it again.")
    return Adapter(factors, _dump_metadata(header.get("metadata") or {}))


def load_adapter(path: str | os.PathLike[str], base_params: Any, *, check_dtype: bool = False) -> Any:
    """Read an adapter file and attach it to ``base_params``.

    Args:
        path: a file written by :func:`save_adapter`.
        base_params: the base model's params (plain or lorafied).
        check_dtype: see :func:`attach`.

    Returns:
        Lorafied params. Nothing is returned unless the whole file was valid and fits
        the base; a wrong base raises a ValueError naming each path with both shapes.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile, os
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> f = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> lorajax.save_adapter(f, lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0)))
        >>> lorajax.load_adapter(f, base)["dense"]["kernel"].a.shape
        (8, 2)
    """
    ad = read_adapter(path)
    try:
        return attach(base_params, ad, check_dtype=check_dtype)
    except ValueError as e:
        raise ValueError(f"load_adapter: {os.fspath(path)}: {e}") from None


# --------------------------------------------------------------------------------------------------------------------
# swap


def _as_adapter(x: Any, what: str) -> Adapter | None:
    if x is None or isinstance(x, Adapter):
        return x
    try:
        return adapter(x)
    except ValueError as e:
        raise ValueError(f"swap: {what} must be an Adapter, lorafied params or None; {e}") from None


def _delta(a: jax.Array, b: jax.Array, scale: jax.Array, layout: Layout, dt: Any) -> jax.Array:
    # The arithmetic of lorajax.delta, so swap(base, None, ad) equals merge(attach(base, ad)) bit for bit.
    d = jnp.einsum(
        layout.einsum_subscripts(),
        a.astype(dt),
        b.astype(dt),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=dt,
    )
    return d * jnp.asarray(scale, dt)


@partial(jax.jit, static_argnames=("old_layout", "new_layout"))
def _swap_one(w: jax.Array, old: Any, new: Any, old_layout: Any, new_layout: Any) -> jax.Array:
    # Scales are traced (not static) so adapters that differ only in alpha share one compilation.
    dt = jnp.promote_types(w.dtype, jnp.float32)  # float32 at least; float64 (x64) keeps its precision
    acc = w.astype(dt)
    if old_layout is not None:
        acc = acc - _delta(old[0], old[1], old[2], old_layout, dt)
    if new_layout is not None:
        acc = acc + _delta(new[0], new[1], new[2], new_layout, dt)
    return acc.astype(w.dtype)


def swap(merged: Any, old_adapter: Any, new_adapter: Any) -> Any:
    """Trade one merged adapter for another on a deployed model that kept no W0.

    For every target, ``W' = W - s·A·B + s'·A'·B'`` in float32, in one fused
    computation with a single cast back to the kernel's dtype (no intermediate
    rounding to a bf16 base). Targets of only one adapter get only its term.

    Args:
        merged: plain params with ``old_adapter`` merged in (``lorajax.merge`` output).
        old_adapter: the adapter merged now (:class:`Adapter` or lorafied params), or
            ``None`` to merge ``new_adapter`` into a clean base.
        new_adapter: the adapter to merge, or ``None`` to unmerge ``old_adapter``.

    Returns:
        Params of the same structure (boxes kept) with ``new_adapter`` merged.
        Unmerge-then-merge costs one rounding per kernel in the kernel's dtype:
        exact up to float32 rounding for float32 kernels, up to one bf16 ulp per
        swap for bfloat16 kernels.

    Raises:
        ValueError: listing every target missing from ``merged``, of the wrong
            shape, or still a LoRA node.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> lora = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0), init="gaussian")
        >>> merged = lorajax.merge(lora)
        >>> back = lorajax.swap(merged, lora, None)  # unmerge
        >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0, atol=1e-6))
        True
    """
    old, new = _as_adapter(old_adapter, "old_adapter"), _as_adapter(new_adapter, "new_adapter")
    if old is None and new is None:
        return merged
    leaves, index = _leaf_index(merged)
    names = sorted(set(old.factors if old else ()) | set(new.factors if new else ()))
    problems: list[str] = []
    for name in names:
        if name not in index:
            problems.append(f"missing: {name}: no such parameter in the merged params")
            continue
        leaf = leaves[index[name]][1]
        if is_lora(leaf):
            problems.append(f"lora: {name} is a LoRA node; swap works on merged params (call lorajax.merge first)")
            continue
        for ad in (old, new):
            if ad is not None and name in ad.factors:
                problems += _factor_problems(name, ad.factors[name]) + _base_problems(
                    name, ad.factors[name], leaf, False
                )
    _raise_problems(
        "swap: the adapters do not fit these merged params", problems, "Swap only adapters of this base model."
    )

    def term(ad: Adapter | None, name: str) -> tuple[Any, Any]:
        if ad is None or name not in ad.factors:
            return None, None
        f = ad.factors[name]
        return (f.a, f.b, float(f.scale)), f.layout

    replaced: dict[int, Any] = {}
    for name in names:
        n = index[name]
        leaf = leaves[n][1]
        (old_ab, old_layout), (new_ab, new_layout) = term(old, name), term(new, name)
        w = _swap_one(_boxes.unbox(leaf), old_ab, new_ab, old_layout=old_layout, new_layout=new_layout)
        replaced[n] = _boxes.rebox(leaf, w)
    return _rebuild(merged, leaves, replaced)


# --------------------------------------------------------------------------------------------------------------------
# combine


def _matrices(f: AdapterFactors) -> tuple[jax.Array, jax.Array]:
    """``a`` as (*stack, fan_in, r) and ``b`` as (*stack, r, fan_out), in float32."""
    ns = len(f.layout.stack)
    stack = tuple(f.a.shape[:ns])
    a = jnp.asarray(f.a, jnp.float32).reshape(stack + (-1, f.a.shape[-1]))
    b = jnp.asarray(f.b, jnp.float32).reshape(stack + (f.b.shape[ns], -1))
    return a, b


def combine_adapters(
    adapters: Sequence[Any],
    weights: Sequence[float],
    method: str = "cat",
    rank: int | None = None,
) -> Adapter:
    """One adapter whose update is ``Σ wᵢ·ΔWᵢ``, like PEFT's ``add_weighted_adapter``.

    * ``method="cat"``: exact. Factors are concatenated along the rank axis
      (rank ``Σ rᵢ`` per target) with ``wᵢ·scaleᵢ`` folded into each ``b``;
      the result has ``alpha = rank`` (scale 1), so merging it gives
      ``Σ wᵢ·ΔWᵢ`` up to float32 rounding.
    * ``method="svd"``: the combined update is formed in float32 and truncated
      by SVD to ``rank`` (default: the largest input rank; capped at
      ``min(fan_in, fan_out)``), the singular values split evenly between
      ``a`` and ``b``. The relative Frobenius error
      ``‖ΔW - ΔW_svd‖ / ‖ΔW‖`` of each target (0.0 where ΔW is 0) is
      reported in ``result.metadata["combine"]["relative_error"]`` (a dict
      ``{path: error}``) and the largest one in ``["max_relative_error"]``.

    A target present in only some adapters is combined from those alone.
    Factors come out in the common dtype of the inputs.

    Args:
        adapters: :class:`Adapter` objects or lorafied params, all for one base.
        weights: one float per adapter (negative allowed, e.g. to subtract a task).
        method: ``"cat"`` or ``"svd"``.
        rank: target rank for ``"svd"``; must be None for ``"cat"``.

    Returns:
        An :class:`Adapter`; its metadata records the method, weights and (svd) errors.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 6))}}
        >>> p1 = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(1), init="gaussian")
        >>> p2 = lorajax.lorafy(base, rank=3, where=".*", key=jax.random.key(2), init="gaussian")
        >>> lorajax.combine_adapters([p1, p2], [0.5, 0.5], method="cat")["dense/kernel"].rank
        5
        >>> svd = lorajax.combine_adapters([p1, p2], [0.5, 0.5], method="svd", rank=1)
        >>> svd.metadata["combine"]["max_relative_error"] >= 0
        True
    """
    ads = [adapter(x) for x in adapters]
    weights = [float(w) for w in weights]
    if not ads:
        raise ValueError("combine_adapters: give at least one adapter.")
    if len(weights) != len(ads):
        raise ValueError(
            f"combine_adapters: {len(ads)} adapters but {len(weights)} weights; give one weight per adapter."
        )
    if method not in ("cat", "svd"):
        raise ValueError(f"combine_adapters: method must be 'cat' or 'svd', got {method!r}.")
    if method == "cat" and rank is not None:
        raise ValueError("combine_adapters: rank applies to method='svd' only; 'cat' has rank Σ rᵢ by construction.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combine_adapters: rank must be an integer >= 1, got {rank!r}.")
    groups = _group_targets(ads, "combine_adapters")
    out: dict[str, AdapterFactors] = {}
    errors: dict[str, float] = {}
    for name, members in groups.items():
        ref = members[0][1]
        dtype = jnp.result_type(*[f.a.dtype for _, f in members], *[f.b.dtype for _, f in members])
        ns = len(ref.layout.stack)
        mats = [(weights[k] * f.scale, *_matrices(f)) for k, f in members]
        if method == "cat":
            a = jnp.concatenate([a for _, a, _ in mats], axis=-1)
            b = jnp.concatenate([c * b for c, _, b in mats], axis=ns)
            r = int(a.shape[-1])
        else:
            fan_in, fan_out = ref.layout.sizes(ref.shape)
            r = min(rank or max(f.rank for _, f in members), fan_in, fan_out)
            a, b, s = _svd_combine([(jnp.float32(c), a, b) for c, a, b in mats], r)
            s64 = np.asarray(s, np.float64)
            total = float(np.sum(s64**2))
            errors[name] = float(np.sqrt(np.sum(s64[..., r:] ** 2) / total)) if total > 0 else 0.0
        out[name] = AdapterFactors(
            a=a.reshape(ref.layout.a_shape(ref.shape, r)).astype(dtype),
            b=b.reshape(ref.layout.b_shape(ref.shape, r)).astype(dtype),
            rank=r,
            alpha=float(r),
            layout=ref.layout,
            rslora=False,
            shape=ref.shape,
            dtype=ref.dtype,
        )
    info: dict[str, Any] = {"method": method, "weights": weights, "sources": len(ads)}
    if method == "svd":
        info.update(rank=rank, relative_error=errors, max_relative_error=max(errors.values(), default=0.0))
    return Adapter(out, _dump_metadata({"combine": info}))


@partial(jax.jit, static_argnames=("r",))
def _svd_combine(mats: list[tuple[Any, Any, Any]], r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Best rank-``r`` factors of ``Σ c·a@b`` (float32) and all its singular values."""
    delta = sum(c * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) for c, a, b in mats)
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[..., :r])  # split the singular values evenly between a and b
    return u[..., :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :], s


def _group_targets(ads: Sequence[Adapter], what: str) -> dict[str, list[tuple[int, AdapterFactors]]]:
    """``{path: [(adapter index, factors), ...]}`` with layouts and base shapes checked to agree."""
    groups: dict[str, list[tuple[int, AdapterFactors]]] = {}
    for k, ad in enumerate(ads):
        for name, f in ad.factors.items():
            groups.setdefault(name, []).append((k, f))
    problems: list[str] = []
    for name, members in sorted(groups.items()):
        ref_k, ref = members[0]
        for k, f in members:
            problems += _factor_problems(f"{name} (adapter {k})", f)
            if f.layout != ref.layout:
                problems.append(
                    f"layout: {name}: adapter {ref_k} has layout {ref.layout.axes!r}, adapter {k} {f.layout.axes!r}"
                )
            if f.shape != ref.shape:
                problems.append(
                    f"shape: {name}: adapter {ref_k} was made for base shape {ref.shape}, adapter {k} for {f.shape}"
                )
    _raise_problems(
        f"{what}: the adapters do not share one base", problems, "Combine only adapters of the same base model."
    )
    return dict(sorted(groups.items()))

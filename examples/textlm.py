"""Shared pieces of the examples and notebooks: real text from Python's stdlib and a tiny byte-level GPT.

Two bodies of text that every Python installation carries, so nothing is downloaded:

* **prose**: the docstrings of the standard library's top-level modules (``ast.get_docstring`` of every module, class
  and function with more than 200 characters). English technical prose, about 0.7 MB on CPython 3.11.
* **code**: the same modules' Python source with every docstring removed and comments dropped (``ast.unparse``).

The base model is pretrained mostly on the prose, with a 15% share of code windows as a real language model's mix has
(see ``pretrain_base.py``; the result ships as ``assets/base_prose.safetensors``), and the demo adapts it to a small
set of the code: a clearly different register (indentation, keywords, operators, identifiers instead of sentences)
drawn from the same files. Files are split into train and validation by name (every 10th file in sorted order is
validation), so validation text is never trained on.

The model is a plain pre-LayerNorm decoder: byte embeddings + learned positions, ``n_layers`` blocks of Flax's
``MultiHeadDotProductAttention`` (modules ``query``/``key``/``value``/``out``) and an MLP (``fc1``/``fc2``), and an
untied output ``head``. These names are what the ``lorajax.attn_qv`` and ``lorajax.all_linear`` presets target.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import safe_open
from safetensors.numpy import save_file

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASE_CHECKPOINT = ASSETS / "base_prose.safetensors"


# ----------------------------------------------------------------------------------------------------------- corpus


def _stdlib_sources() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        try:
            out.append((path.name, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    if len(out) < 50:
        raise RuntimeError(
            f"Found only {len(out)} .py files in the standard library at {root}; the demo needs its sources."
        )
    return out


def _is_val(name: str, index: int) -> bool:
    del name
    return index % 10 == 9


def _docstrings(tree: ast.AST) -> list[str]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return [d for d in docs if d and len(d) > 200]


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds) and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and validation bytes of one body of text, as uint8 arrays."""

    name: str
    train: np.ndarray
    val: np.ndarray

    def describe(self) -> str:
        return f"{self.name}: {len(self.train) / 1e3:,.0f} kB train, {len(self.val) / 1e3:,.0f} kB validation"


def load_corpora(max_train: int = 1_000_000, max_val: int = 100_000) -> tuple[Corpus, Corpus]:
    """``(prose, code)`` corpora from the stdlib sources (deterministic for a given Python version).

    Example:
        >>> prose, code = load_corpora(max_train=10_000, max_val=2_000)
        >>> prose.train.dtype, len(code.val) <= 2_000
        (dtype('uint8'), True)
    """
    parts: dict[tuple[str, bool], list[str]] = {(k, v): [] for k in ("prose", "code") for v in (False, True)}
    sizes = dict.fromkeys(parts, 0)
    for index, (name, text) in enumerate(_stdlib_sources()):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        if name.startswith("_sysconfigdata"):
            continue  # a generated, machine-specific table of build flags: neither prose nor typical code
        val = _is_val(name, index)  # by position in the full sorted listing, so skipping files moves no split
        cap = max_val if val else max_train
        for kind, texts in (
            ("prose", lambda: _docstrings(tree)),
            ("code", lambda: [ast.unparse(_strip_docstrings(tree))]),
        ):
            if sizes[kind, val] < cap:  # stop unparsing once a split is full (this is the slow part)
                new = texts()
                parts[kind, val].extend(new)
                sizes[kind, val] += sum(len(t) + 2 for t in new)

    def pack(texts: list[str], cap: int) -> np.ndarray:
        data = "\n\n".join(texts).encode("utf-8")[:cap]
        return np.frombuffer(data, dtype=np.uint8).copy()

    return tuple(  # type: ignore[return-value]
        Corpus(k, pack(parts[k, False], max_train), pack(parts[k, True], max_val)) for k in ("prose", "code")
    )


def decode(tokens: Any) -> str:
    """Bytes back to text (invalid UTF-8 shown as U+FFFD)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def encode(text: str) -> np.ndarray:
    """Text to byte tokens."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def train_batches(data: np.ndarray, batch: int, seq_len: int, seed: int) -> Iterator[np.ndarray]:
    """Endless random windows of ``seq_len + 1`` bytes, shape ``(batch, seq_len + 1)``."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
        yield np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def spread_sample(data: np.ndarray, n_bytes: int, piece: int = 4096) -> np.ndarray:
    """About ``n_bytes`` of ``data`` as evenly spaced pieces of ``piece`` bytes: a small dataset of the same mix.

    Example:
        >>> len(spread_sample(np.arange(100_000) % 256, 20_000, piece=1000))
        20000
    """
    n_pieces = len(data) // piece
    if n_bytes >= n_pieces * piece:
        return data
    starts = piece * np.linspace(0, n_pieces - 1, max(1, round(n_bytes / piece))).round().astype(np.int64)
    return np.concatenate([data[s : s + piece] for s in starts])


def val_windows(data: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """``count`` evenly spaced windows of the validation text: the same ones every call."""
    starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
    return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


# ------------------------------------------------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True)
class Config:
    """Shape of the tiny GPT."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    vocab: int = 256


class Block(nn.Module):
    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.n_heads, name="attn")(y, y, mask=mask)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(4 * self.d_model, name="fc1")(y)
        return x + nn.Dense(self.d_model, name="fc2")(nn.gelu(y))


class TinyGPT(nn.Module):
    """Byte-level decoder-only transformer; ``apply`` maps ``(batch, T)`` bytes to ``(batch, T, 256)`` logits."""

    config: Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab, c.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (c.seq_len, c.d_model))
        x = x + pos[: tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for k in range(c.n_layers):
            x = Block(c.d_model, c.n_heads, name=f"block{k}")(x, mask)
        return nn.Dense(c.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


def init_params(config: Config, seed: int = 0) -> Any:
    return TinyGPT(config).init(jax.random.key(seed), jnp.zeros((1, config.seq_len), jnp.int32))


# A KV cache for serving: TinyGPT's computation, one token at a time. The cache is a pair (keys, values), each
# (batch, n_layers, seq_len, n_heads, head_dim): row b holds the keys and values of sequence b at absolute positions
# 0..seq_len-1. The modules below have TinyGPT's parameter tree (same names, shapes and Flax layers), so the same
# params (or lorafied params through lorajax.factored) run either model.


class CachedAttention(nn.Module):
    """Flax's ``MultiHeadDotProductAttention`` (its ``query``/``key``/``value``/``out`` layers) over a KV cache."""

    n_heads: int
    layer: int

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array]) -> Any:
        d = x.shape[-1]
        qkv = dict(features=(self.n_heads, d // self.n_heads), axis=-1)
        q, k, v = (nn.DenseGeneral(**qkv, name=n)(x) for n in ("query", "key", "value"))
        # Write this call's keys/values at their absolute positions (a position >= seq_len is dropped: callers
        # use that to run a row without touching its cache), then attend over the whole row, causally.
        rows = jnp.arange(x.shape[0])[:, None]
        ck, cv = (c.at[rows, self.layer, positions].set(new, mode="drop") for c, new in zip(cache, (k, v)))
        seq_len = ck.shape[2]
        mask = (jnp.arange(seq_len)[None, None, :] <= positions[:, :, None])[:, None]  # (batch, 1, T, seq_len)
        y = nn.dot_product_attention(q, ck[:, self.layer], cv[:, self.layer], mask=mask)
        return nn.DenseGeneral(features=d, axis=(-2, -1), name="out")(y), (ck, cv)


class CachedBlock(nn.Module):
    d_model: int
    n_heads: int
    layer: int

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array]) -> Any:
        y = nn.LayerNorm(name="ln1")(x)
        a, cache = CachedAttention(self.n_heads, self.layer, name="attn")(y, positions, cache)
        x = x + a
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(4 * self.d_model, name="fc1")(y)
        return x + nn.Dense(self.d_model, name="fc2")(nn.gelu(y)), cache


class CachedGPT(nn.Module):
    """TinyGPT with a KV cache: ``apply(params, tokens, start, cache) -> (logits, cache)``.

    ``tokens`` ``(batch, T)`` sit at absolute positions ``start[b] + t``; their keys and values are written into
    ``cache`` there and every token attends to the cached positions at or before its own. ``start = 0`` with
    ``T = seq_len`` is a prefill (it rewrites the whole row and gives TinyGPT's logits for that window); ``T = 1``
    is one decode step. Positions are absolute, as in TinyGPT, so a cache is valid for the first ``seq_len``
    tokens of a sequence only: past that, ``make_generate``'s window slides and every position changes.
    """

    config: Config

    @nn.compact
    def __call__(self, tokens: jax.Array, start: jax.Array, cache: tuple[jax.Array, jax.Array]) -> Any:
        c = self.config
        positions = start[:, None] + jnp.arange(tokens.shape[1])
        x = nn.Embed(c.vocab, c.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (c.seq_len, c.d_model))
        x = x + pos[positions]  # out-of-range positions clamp (their writes are dropped, their logits unused)
        for k in range(c.n_layers):
            x, cache = CachedBlock(c.d_model, c.n_heads, k, name=f"block{k}")(x, positions, cache)
        return nn.Dense(c.vocab, name="head")(nn.LayerNorm(name="ln_f")(x)), cache


def init_cache(config: Config, batch: int) -> tuple[jax.Array, jax.Array]:
    """An empty :class:`CachedGPT` cache: ``(keys, values)``, each ``(batch, n_layers, seq_len, heads, head_dim)``."""
    shape = (batch, config.n_layers, config.seq_len, config.n_heads, config.d_model // config.n_heads)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)


def loss_fn(model: TinyGPT, params: Any, tokens: jax.Array, apply: Any = None) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of ``tokens`` of shape ``(batch, T + 1)``.

    ``apply`` replaces ``model.apply`` (e.g. ``lorajax.factored(model.apply)``).
    """
    logits = (apply or model.apply)(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_eval(model: TinyGPT, batch: int = 64) -> Any:
    """``evaluate(params, windows) -> float``: mean loss over fixed windows, in chunks of ``batch``."""

    @jax.jit
    def chunk_loss(params: Any, tokens: jax.Array) -> jax.Array:
        return loss_fn(model, params, tokens)

    def evaluate(params: Any, windows: np.ndarray) -> float:
        losses = [float(chunk_loss(params, windows[k : k + batch])) for k in range(0, len(windows), batch)]
        return float(np.mean(losses))

    return evaluate


def make_generate(model: TinyGPT) -> Any:
    """``generate(params, prompt, n_new, key, temperature) -> str`` with a sliding window of ``seq_len`` bytes."""
    seq_len = model.config.seq_len

    @jax.jit
    def step(params: Any, buf: jax.Array, i: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
        # Feed the seq_len bytes ending at i (or the first seq_len, right-padded: the mask is causal, so the padding
        # after position i - 1 cannot change its logits) and sample byte i.
        start = jnp.maximum(i - seq_len, 0)
        window = jax.lax.dynamic_slice(buf, (start,), (seq_len,))
        logits = model.apply(params, window[None])[0, i - 1 - start]
        return buf.at[i].set(jax.random.categorical(key, logits / temperature).astype(buf.dtype))

    def generate(params: Any, prompt: str, n_new: int, key: jax.Array, temperature: float = 0.8) -> str:
        p = encode(prompt)
        buf = jnp.zeros(max(len(p) + n_new, seq_len), jnp.int32).at[: len(p)].set(p)
        for i, k in zip(range(len(p), len(p) + n_new), jax.random.split(key, n_new)):
            buf = step(params, buf, jnp.int32(i), k, jnp.float32(temperature))
        return decode(buf[len(p) : len(p) + n_new])

    return generate


# -------------------------------------------------------------------------------------------------------- checkpoints


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """``{"params/block0/fc1/kernel": array}`` for a tree of arrays (dict keys only)."""
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return out


def save_params(path: Path, params: Any, config: Config, dtype: Any = np.float32, **meta: str) -> int:
    """Write a params tree as safetensors (config in the metadata); returns the file size in bytes."""
    tensors = {k: v.astype(dtype) for k, v in flatten(params).items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(dataclasses.asdict(config)), **meta})
    return Path(path).stat().st_size


def load_params(path: Path) -> tuple[Any, Config]:
    """Read a checkpoint written by :func:`save_params`; weights come back as float32 arrays."""
    with safe_open(str(path), framework="np") as f:
        config = Config(**json.loads(f.metadata()["config"]))
        flat = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return unflatten(flat), config


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (optimizer states included)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))

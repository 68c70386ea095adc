"""LoRA+ (Hayou et al. 2024): B learns ``ratio`` times faster than A, as an optax transformation.

The parameter groups are PEFT's ``create_loraplus_optimizer``'s: ``A`` factors (and
other trainable matrices) at ``learning_rate``; ``B`` factors and every trainable
vector (biases, norm scales, DoRA magnitudes) at ``learning_rate * ratio``, without
weight decay for biases and norm parameters; the factors of embedding kernels at
their own ``embedding_lr``. Frozen leaves get exact zero updates and no state.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import optax

from lorajax._node import is_lora
from lorajax._paths import KeyPath, path_str
from lorajax._tokens import is_tokens
from lorajax._train import mask
from lorajax._trainable import is_node, is_trainable

GROUPS = ("a", "b", "b_no_decay", "embedding", "freeze")
# PEFT leaves biases and LayerNorm parameters out of weight decay (transformers' get_parameter_names).
_NO_DECAY = re.compile(r"(?i).*(bias|norm|(^|/)ln[_\w]*/).*")


def _leaf_labels(trains: Any, label: str) -> Any:
    return jax.tree.map(lambda t: label if t else "freeze", trains)


def _trainable_label(path: str, leaf: Any) -> str:
    if getattr(leaf, "ndim", 2) >= 2:
        return "a"  # PEFT's groupA: every trainable matrix that is not a B factor (a head, modules_to_save)
    return "b_no_decay" if _NO_DECAY.fullmatch(path) else "b"


def labels(params: Any) -> Any:
    """The LoRA+ group of every leaf of ``params``: ``"a"``, ``"b"``, ``"b_no_decay"``, ``"embedding"``, ``"freeze"``.

    >>> import jax.numpy as jnp, lorajax
    >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
    >>> g = labels(p)["q"]["kernel"]
    >>> g.base, g.a, g.b
    ('freeze', 'a', 'b')
    """
    trains = mask(params)

    def one(path: KeyPath, x: Any, t: Any) -> Any:
        if is_lora(x):
            embed = x.layout.kind == "embed"
            changes = {}
            for f in dataclasses.fields(x):
                if f.metadata.get("static"):
                    continue
                # A is group A; B and any other trainable child (DoRA's magnitude, a vector) group B, as in PEFT.
                group = "embedding" if embed else ("a" if f.name == "a" else "b")
                changes[f.name] = _leaf_labels(getattr(t, f.name), group)
            return dataclasses.replace(t, **changes)
        if is_trainable(x):
            name = path_str(path)
            value = jax.tree_util.tree_map_with_path(
                lambda p, leaf, keep: _trainable_label(name + "/" + path_str(p), leaf) if keep else "freeze",
                x.value,
                t.value,
            )
            return dataclasses.replace(t, value=value)
        if is_tokens(x):  # trainable token rows: a trained matrix, PEFT's groupA
            return dataclasses.replace(t, base=_leaf_labels(t.base, "a"), values=_leaf_labels(t.values, "a"))
        return jax.tree.map(lambda _: "freeze", t)

    return jax.tree_util.tree_map_with_path(one, params, trains, is_leaf=is_node)


def _scaled(learning_rate: Any, ratio: float) -> Any:
    if callable(learning_rate):
        return lambda step: learning_rate(step) * ratio
    return learning_rate * ratio


def loraplus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: Any,
    *,
    ratio: float = 16.0,
    embedding_lr: Any = 1e-6,
    weight_decay: float | None = None,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+: ``optimizer`` with B's learning rate ``ratio`` times A's (PEFT's ``create_loraplus_optimizer``).

    Groups (labelled from the params at ``init``, like :func:`lorajax.masked`):

    * ``A`` factors and other trainable matrices (:class:`lorajax.Trainable` heads): ``learning_rate``;
    * ``B`` factors, DoRA magnitudes and trainable vectors: ``learning_rate * ratio``; biases and
      norm parameters among them without weight decay;
    * both factors of embedding kernels: ``embedding_lr``;
    * everything frozen: an exact zero update and no optimizer state.

    Args:
        optimizer: an optax factory taking ``learning_rate`` (``optax.adamw``, ``optax.sgd``...).
        learning_rate: A's learning rate, a float or an optax schedule.
        ratio: ``lr_B / lr_A`` (PEFT's ``loraplus_lr_ratio``; the paper suggests 16 for Adam).
        embedding_lr: the learning rate of embedding factors (PEFT's ``loraplus_lr_embedding``).
        weight_decay: passed to ``optimizer`` for every group but the no-decay one (which gets 0.0
            where ``optimizer`` takes ``weight_decay``); ``None`` leaves ``optimizer``'s default.
            PEFT's default is 0.0.
        **kwargs: passed to ``optimizer`` for every group (``b1``, ``eps``...).

    Returns:
        An ``optax.GradientTransformation`` over the whole params tree.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
        >>> tx = lorajax.loraplus(optax.sgd, learning_rate=0.5, ratio=4.0)
        >>> grads = jax.tree.map(jnp.ones_like, p)
        >>> updates, _ = tx.update(grads, tx.init(p), p)
        >>> float(updates["q"]["kernel"].a[0, 0]), float(updates["q"]["kernel"].b[0, 0])
        (-0.5, -2.0)
    """
    takes_decay = "weight_decay" in inspect.signature(optimizer).parameters

    def make(lr: Any, decay: bool) -> optax.GradientTransformation:
        extra = dict(kwargs)
        if takes_decay and not decay:
            extra["weight_decay"] = 0.0
        elif weight_decay is not None:
            extra["weight_decay"] = weight_decay
        return optimizer(learning_rate=lr, **extra)

    transforms = {
        "a": make(learning_rate, True),
        "b": make(_scaled(learning_rate, ratio), True),
        "b_no_decay": make(_scaled(learning_rate, ratio), False),
        "embedding": make(embedding_lr, True),
        "freeze": optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, labels)

"""Training checkpoints: what trains, the optimizer state, the step and the RNG, through Orbax.

The frozen base is never written: it comes back from wherever it came from the first time (a pretrained
checkpoint, ``quantize``), and a restore fills the trainable leaves of the caller's params in place of the
checkpoint's. Orbax's ``CheckpointManager`` does the I/O (asynchronous saves, keep-last-N, atomic step folders,
one writer per shard in a multi-process job), so every process of a job calls ``save`` and ``restore`` as it calls
any JAX function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from lorajax._paths import path_str
from lorajax._problems import Problems
from lorajax._train import mask

CALLER = "Checkpoints"
FORMAT = "lorajax.checkpoint"
VERSION = 1


class Restored(NamedTuple):
    """What :meth:`Checkpoints.restore` gives back."""

    step: int
    params: Any
    opt_state: Any
    key: Any


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # orbax is an optional dependency: training loops that checkpoint install it
        raise ImportError(f"{CALLER} needs orbax-checkpoint: pip install orbax-checkpoint") from e
    return ocp


def _flags(params: Any) -> list[bool]:
    """For every leaf of ``params`` in flattening order, whether it trains (``lorajax.mask``)."""
    return [bool(f) for f in jax.tree.leaves(mask(params))]


def _trained(params: Any, flags: list[bool]) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of ``params`` that trains (``flags``), in flattening order."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if len(flags) != len(leaves):  # mask maps leaf for leaf; anything else is a bug, not a user error
        raise AssertionError(f"{CALLER}: mask has {len(flags)} leaves, params {len(leaves)}")
    return [(path_str(p), x) for (p, x), keep in zip(leaves, flags) if keep]


def _state_leaves(opt_state: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(opt_state)]


def _is_typed_key(key: Any) -> bool:
    return hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def _key_data(key: Any) -> Any:
    return jax.random.key_data(key) if _is_typed_key(key) else key


def _numbered(leaves: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    # Orbax names each array's folder after its key: numbers keep them plain whatever the parameter paths hold.
    return {f"{i:06d}": x for i, (_, x) in enumerate(leaves)}


def _describe(leaves: Sequence[tuple[str, Any]]) -> list[list[Any]]:
    return [
        [name, list(np.shape(x)), str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype)]
        for name, x in leaves
    ]


def _abstract(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


class Checkpoints:
    """Save and resume a LoRA training run: trainable leaves, optimizer state, step and RNG (Orbax).

    Only what trains is written (the LoRA factors, DoRA magnitudes and ``lorafy(..., also=)`` leaves, as
    :func:`lorajax.mask` says), never the frozen base. Saves are asynchronous (the arrays are copied to host
    before ``save`` returns, so the next step may donate them), the last ``max_to_keep`` steps are kept, and a
    step folder appears only once complete, so a job killed at any point resumes from the last complete step.
    Restoring puts every array back with the sharding of the template the caller passes (the freshly built
    params and ``tx.init(params)``), so a run resumes onto the same mesh. In a multi-process job every process
    calls ``save`` and ``restore`` (Orbax writes each shard once and the metadata from the primary process).

    Args:
        directory: the folder holding one sub-folder per saved step (created if missing).
        max_to_keep: how many of the latest steps to keep (``None`` keeps all).
        async_save: write in a background thread; :meth:`wait` or :meth:`close` waits for it.

    Example:
        >>> import jax, jax.numpy as jnp, optax, tempfile, lorajax
        >>> params = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
        >>> tx = lorajax.masked(optax.adam(1e-2))
        >>> opt_state, key = tx.init(params), jax.random.key(0)
        >>> with lorajax.Checkpoints(tempfile.mkdtemp()) as ckpts:
        ...     ckpts.save(7, params, opt_state, key)
        ...     ckpts.wait()
        ...     step, restored, opt_state, key = ckpts.restore(params, opt_state, key)
        True
        >>> step, bool((restored["q"]["kernel"].a == params["q"]["kernel"].a).all())
        (7, True)
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3, async_save: bool = True):
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(f"{CALLER}: max_to_keep must be a positive int or None, got {max_to_keep!r}.")
        ocp = self._ocp = _ocp()
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    @property
    def latest_step(self) -> int | None:
        """The newest complete step in the folder, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step in the folder, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any = None, key: Any = None, *, force: bool = False) -> bool:
        """Save step ``step``: the trainable leaves of ``params``, ``opt_state`` and ``key``.

        Args:
            step: the number of optimizer steps taken (a non-negative int); resuming continues from it.
            params: the training params (LoRA nodes, ``Trainable`` leaves); only what trains is written.
            opt_state: the optimizer state (any pytree of arrays), or ``None``.
            key: the training RNG (a typed ``jax.random.key`` or a raw ``uint32`` key), or ``None``.
            force: save even where Orbax's policy would skip the step.

        Returns:
            Whether a save was started (Orbax skips a step that is already saved).
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"{CALLER}.save: step must be a non-negative int, got {step!r}.")
        trained, state = _trained(params, _flags(params)), _state_leaves(opt_state)
        if not trained:
            raise ValueError(
                f"{CALLER}.save: params hold no trainable leaf (no LoRA node, no Trainable); lorafy them first."
            )
        tree = {"params": _numbered(trained), "opt_state": _numbered(state)}
        if key is not None:
            tree["key"] = _key_data(key)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "params": _describe(trained),
            "opt_state": _describe(state),
            "key": None if key is None else ("typed" if _is_typed_key(key) else "raw"),
        }
        ocp = self._ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        return bool(self._manager.save(int(step), args=args, force=force))

    def restore(self, params: Any, opt_state: Any = None, key: Any = None, *, step: int | None = None) -> Restored:
        """Resume: ``params`` with the saved trainable leaves, the saved optimizer state, step and key.

        Args:
            params: the params as built for training (the frozen base loaded, ``lorafy`` applied): the
                template whose trainable leaves are replaced and whose frozen leaves are kept as they are.
            opt_state: a template of the optimizer state (``tx.init(params)``), or ``None`` if none was saved.
            key: a template key of the same kind as the saved one, or ``None`` if none was saved.
            step: which step to restore; the latest by default.

        Returns:
            ``Restored(step, params, opt_state, key)``; arrays carry the templates' shardings.

        Raises:
            FileNotFoundError: the folder holds no complete step (or not ``step``).
            ValueError: the templates do not match what was saved (the leaves that differ are named).
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"{CALLER}.restore: no checkpoint in {self.directory}; check `latest_step` "
                    "before restoring, or start from step 0."
                )
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{CALLER}.restore: no step {step} in {self.directory} (steps: {steps}).")
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{CALLER}.restore: step {step} in {self.directory} is not a lorajax checkpoint.")
        flags = _flags(params)  # once: the mask walks the whole tree, base included
        trained, state = _trained(params, flags), _state_leaves(opt_state)
        problems = Problems(f"{CALLER}.restore")
        _match("params", _describe(trained), meta["params"], problems)
        _match("opt_state", _describe(state), meta["opt_state"], problems)
        if (key is None) != (meta["key"] is None):
            problems.add(
                f"key: saved {'none' if meta['key'] is None else 'one'}, template {'none' if key is None else 'one'}"
            )
        problems.raise_if_any(
            f"the templates do not match step {step} in {self.directory}",
            "Pass the params, optimizer state and key built as for the saved run (same lorafy, optimizer, key kind).",
        )
        abstract = {
            "params": _numbered([(n, _abstract(x)) for n, x in trained]),
            "opt_state": _numbered([(n, _abstract(x)) for n, x in state]),
        }
        if key is not None:
            abstract["key"] = _abstract(_key_data(key))
        tree = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        new_params = _fill(
            params, flags, [_like(x, tree["params"][k]) for (_, x), k in zip(trained, sorted(tree["params"]))]
        )
        leaves, treedef = jax.tree.flatten(opt_state)
        new_state = jax.tree.unflatten(
            treedef, [_like(x, tree["opt_state"][k]) for x, k in zip(leaves, sorted(tree["opt_state"]))]
        )
        new_key = None
        if key is not None:
            data = _like(_key_data(key), tree["key"])
            new_key = jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if _is_typed_key(key) else data
        return Restored(int(step), new_params, new_state, new_key)

    def wait(self) -> None:
        """Block until every asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _match(what: str, have: list[list[Any]], saved: list[list[Any]], problems: Problems) -> None:
    if len(have) != len(saved):
        problems.add(f"{what}: {len(saved)} saved arrays, {len(have)} in the template")
    for (name, shape, dtype), (s_name, s_shape, s_dtype) in zip(have, saved):
        if [name, shape, dtype] != [s_name, s_shape, s_dtype]:
            problems.add(f"{what}: saved {s_name} {tuple(s_shape)} {s_dtype}, template {name} {tuple(shape)} {dtype}")


def _like(template: Any, restored: Any) -> Any:
    """``restored`` placed as ``template`` is: an uncommitted template (``tx.init`` output) gives an uncommitted
    array, so that jit may still move it next to the sharded params as it would have moved the template."""
    if getattr(template, "committed", True):
        return restored
    return jax.numpy.asarray(np.asarray(restored))


def _fill(params: Any, flags: list[bool], values: list[Any]) -> Any:
    """``params`` with its trainable leaves (``flags``), in flattening order, replaced by ``values``."""
    leaves, treedef = jax.tree.flatten(params)
    it = iter(values)
    return jax.tree.unflatten(treedef, [next(it) if keep else x for x, keep in zip(leaves, flags)])

"""Files from multi-process jobs: gather what is small, one process writes, every process waits for it.

JAX code runs the same in every process of a job (SPMD); so do lorajax's savers. An adapter's factors are small, so
they are gathered whole into every process; process 0 writes; a collective then tells every process whether the
write succeeded, so that all of them return (or raise) together and a reader in any process after the call sees the
complete files. In a single process all of this reduces to the plain write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from lorajax._node import is_lora
from lorajax._tokens import TrainableTokens
from lorajax._trainable import is_node, is_trainable

T = TypeVar("T")


def gathered(tree: Any) -> Any:
    """``tree`` with every array that spans devices of other processes gathered whole into this one.

    Arrays this process can read whole (one process, or replicated onto its devices) are left as they are.

    >>> import jax.numpy as jnp
    >>> gathered({"a": jnp.ones(2)})["a"].shape
    (2,)
    """

    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(fetch, tree)


def write_once(caller: str, target: str, write: Callable[[], T]) -> T | None:
    """Run ``write`` in process 0 only; every process returns once it has finished (or raises if it failed).

    Args:
        caller: the public function, for the error raised in the other processes.
        target: the file or folder written, for that error.
        write: the write itself (atomic, so a failure leaves nothing half-written).

    Returns:
        What ``write`` returned, in process 0; ``None`` in the others.

    >>> write_once("save", "/tmp/x", lambda: "written")
    'written'
    """
    if jax.process_count() == 1:
        return write()
    from jax.experimental import multihost_utils

    result: T | None = None
    error: BaseException | None = None
    if jax.process_index() == 0:
        try:
            result = write()
        except BaseException as e:  # re-raised below, after the others have been told
            error = e
    # A collective every process joins: the others learn that the files are complete, or that the write failed.
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{caller}: process 0 failed to write {target}; its error says why.")
    return result


def gathered_trained(params: Any) -> Any:
    """``params`` with what trains gathered by :func:`gathered`: factors, magnitudes, LoRA biases, ``Trainable``
    values and ``TrainableTokens`` rows.

    The frozen bases are left where they are: they are large, and writing an adapter never reads them.
    """

    def gather(x: Any) -> Any:
        if is_lora(x):
            trained = dict(a=x.a, b=x.b, magnitude=x.magnitude, bias=x.bias)
            return dataclasses.replace(x, **gathered(trained))
        if is_trainable(x):
            return dataclasses.replace(x, value=gathered(x.value))
        if isinstance(x, TrainableTokens):
            return dataclasses.replace(x, values=gathered(x.values))
        return x

    return jax.tree.map(gather, params, is_leaf=is_node)

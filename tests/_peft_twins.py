"""Flax linen twins of the PyTorch models that wrote the PEFT fixtures, and the layout conversion both sides share.

The fixture generators (tests/fixtures/make_peft_fixtures.py, make_dora_fixtures.py) build small PyTorch models;
the tests load the same weights into these twins. Models whose module names differ between the two fixture sets
(GPT-2 blocks, conv stacks) stay in their test modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: (input permutation to channels-last, output permutation back) for PyTorch's NCL and NCHW tensors.
NCL = ((0, 2, 1), (0, 2, 1))
NCHW = ((0, 2, 3, 1), (0, 3, 1, 2))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc2")(jnp.tanh(nn.Dense(8, name="fc1")(x)))


class Conv1d(nn.Module):
    @nn.compact
    def __call__(self, x):  # (N, L, C)
        x = jnp.tanh(nn.Conv(4, (3,), strides=(2,), padding=[(1, 1)], name="conv")(x))
        return nn.Conv(2, (2,), padding="VALID", name="conv_out")(x)


class Embedder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(3, name="proj")(nn.Embed(10, 6, name="emb")(ids))


def twin_params(state: dict[str, np.ndarray], flax_path: Callable[[str], tuple[str, ...]], in_out: bool) -> dict:
    """Flax params from a PyTorch state dict, each layout converted by hand (the tests' own oracle).

    ``flax_path`` maps a PyTorch module name to its Flax module path; ``in_out`` says the kernels are stored
    ``(in, out)`` already (GPT-2's Conv1D), else ``(out, in, *window)`` becomes ``(*window, in, out)``. The module
    ``emb`` is an embedding table, ``(num, dim)`` in both.
    """
    params: dict = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        node = params
        for part in flax_path(module):
            node = node.setdefault(part, {})
        if leaf == "bias":
            node["bias"] = value
        elif module == "emb":
            node["embedding"] = value
        elif in_out:
            node["kernel"] = value
        else:
            node["kernel"] = np.transpose(value, (*range(2, value.ndim), 1, 0))
    return {"params": jax.tree.map(jnp.asarray, params)}


def run_twin(fn: Callable[[Any, jax.Array], jax.Array], perm: Any, params: Any, x: Any) -> jax.Array:
    """``fn(params, x)`` with PyTorch's channels-first ``x`` permuted in and the output permuted back (``perm``)."""
    x = jnp.asarray(x) if perm is None else jnp.transpose(jnp.asarray(x), perm[0])
    y = fn(params, x)
    return y if perm is None else jnp.transpose(y, perm[1])

"""A tiny classifier (fc1 -> fc2 -> LayerNorm -> head) for the adapter-file tests, and the fresh-process loader.

``python -c "import _tiny_classifier as m; m.fresh_logits(...)"`` loads a saved adapter onto the saved base in a new
interpreter (nothing of the training process survives) and writes the logits it gives to a ``.npy`` file.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IN, HIDDEN, CLASSES = 6, 8, 3


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Dense(HIDDEN, name="fc1")(x))
        h = jax.nn.relu(nn.Dense(HIDDEN, name="fc2")(h))
        h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(h)
        return nn.Dense(CLASSES, name="head")(h)


def apply(params, x):
    return Classifier().apply({"params": params}, x)


def save_tree(path, tree) -> None:
    """A dict of arrays as an ``.npz`` keyed by '/'-joined paths."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    np.savez(path, **{"/".join(k.key for k in kp): np.asarray(x) for kp, x in flat})


def load_tree(path) -> dict:
    tree: dict = {}
    with np.load(path) as data:
        for key in data.files:
            *parents, leaf = key.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jnp.asarray(data[key])
    return tree


def fresh_logits(kind: str, adapter: str, base: str, x: str, out: str) -> None:
    """Load ``adapter`` (``kind`` "native" or "peft") onto the base saved at ``base`` and save its logits on ``x``."""
    import lorajax

    params = load_tree(base)
    load = lorajax.load_adapter if kind == "native" else lorajax.load_peft
    lorafied = load(adapter, params)
    np.save(out, np.asarray(apply(lorajax.merge(lorafied), jnp.asarray(np.load(x)))))


def placed_specs(kind: str, adapter: str, base: str, out: str) -> None:
    """Load ``adapter`` onto the base with head/kernel and norm/scale sharded over 2 devices; save the loaded
    trained leaves' ``PartitionSpec``s (as lists) to ``out`` (JSON). Needs 2 devices (XLA_FLAGS)."""
    import json

    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lorajax

    mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
    params = load_tree(base)
    params["head"]["kernel"] = jax.device_put(params["head"]["kernel"], NamedSharding(mesh, P("d", None)))
    params["norm"]["scale"] = jax.device_put(params["norm"]["scale"], NamedSharding(mesh, P("d")))
    load = lorajax.load_adapter if kind == "native" else lorajax.load_peft
    loaded = load(adapter, params)
    specs = {
        f"{m}/{leaf}": list(loaded[m][leaf].value.sharding.spec) for m, leaf in (("head", "kernel"), ("norm", "scale"))
    }
    with open(out, "w") as fh:
        json.dump(specs, fh)

"""LoRA+: PEFT's parameter groups and learning rates as one optax transformation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax


def _params():
    base = {
        "embed": {"embedding": jnp.ones((10, 8))},
        "attn": {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}},
        "norm": {"scale": jnp.ones(8)},
        "head": {"kernel": jnp.ones((8, 3))},
        "frozen": {"kernel": jnp.ones((8, 8))},
    }
    return lorajax.lorafy(base, rank=2, where=["embed", "query"], also=r"head/kernel|norm/scale|attn/query/bias")


def test_one_sgd_step_has_the_ratio_exactly():
    p = _params()
    lr, ratio, emb = 2.0**-4, 16.0, 2.0**-10
    tx = lorajax.loraplus(optax.sgd, learning_rate=lr, ratio=ratio, embedding_lr=emb)
    grads = jax.tree.map(jnp.ones_like, p)
    updates, _ = tx.update(grads, tx.init(p), p)
    q, e = updates["attn"]["query"]["kernel"], updates["embed"]["embedding"]
    da, db = np.asarray(q.a), np.asarray(q.b)
    assert (da == -lr).all() and (db == -lr * ratio).all()
    assert db.flat[0] / da.flat[0] == ratio
    assert (np.asarray(e.a) == -emb).all() and (np.asarray(e.b) == -emb).all()
    # trainable vectors are group B, a trainable matrix group A, as PEFT forms them
    assert (np.asarray(updates["attn"]["query"]["bias"].value) == -lr * ratio).all()
    assert (np.asarray(updates["norm"]["scale"].value) == -lr * ratio).all()
    assert (np.asarray(updates["head"]["kernel"].value) == -lr).all()
    for frozen in (q.base, e.base, updates["frozen"]["kernel"]):
        assert (np.asarray(frozen) == 0).all()


def test_state_only_for_trainable_leaves():
    p = _params()
    state = lorajax.loraplus(optax.adam, learning_rate=1e-3).init(p)
    sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    trainable = sorted(x.size for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(lorajax.mask(p))) if t)
    assert sizes == sorted(trainable * 2)  # adam's mu and nu, nothing for a base or a frozen kernel


def test_weight_decay_groups():
    p = _params()
    lr, ratio, wd = 0.5, 4.0, 0.25
    tx = lorajax.loraplus(optax.adamw, learning_rate=lr, ratio=ratio, weight_decay=wd)
    zeros = jax.tree.map(jnp.zeros_like, p)  # adam's part is zero: only the decay moves leaves
    updates, _ = tx.update(zeros, tx.init(p), p)
    q = updates["attn"]["query"]["kernel"]
    np.testing.assert_allclose(q.a, -lr * wd * p["attn"]["query"]["kernel"].a, rtol=1e-6)
    np.testing.assert_allclose(q.b, -lr * ratio * wd * p["attn"]["query"]["kernel"].b, atol=1e-7)
    assert (np.asarray(updates["attn"]["query"]["bias"].value) == 0).all()  # biases: no decay
    assert (np.asarray(updates["norm"]["scale"].value) == 0).all()  # norm parameters: no decay


def test_schedules_scale_too():
    p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
    tx = lorajax.loraplus(optax.sgd, learning_rate=optax.constant_schedule(0.125), ratio=8.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    assert (
        float(updates["q"]["kernel"].b[0, 0]) == pytest.approx(-1.0) and float(updates["q"]["kernel"].a[0, 0]) == -0.125
    )


def test_dora_magnitude_is_group_b():
    p = lorajax.lorafy({"q": {"kernel": jnp.ones((4, 4))}}, rank=2, where=["q"], dora=True)
    tx = lorajax.loraplus(optax.sgd, learning_rate=0.25, ratio=4.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    node = updates["q"]["kernel"]
    assert (np.asarray(node.magnitude) == -1.0).all() and (np.asarray(node.a) == -0.25).all()

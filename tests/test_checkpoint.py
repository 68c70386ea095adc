"""lorajax.Checkpoints: what trains, the optimizer state, the step and the key, and nothing frozen.

Resuming a killed job bit for bit, in one and in two processes, is tests/test_pods.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax


def setup(rank: int = 2):
    rng = np.random.default_rng(0)
    base = {
        "fc": {"kernel": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)},
        "head": {"kernel": jnp.ones((64, 3)), "bias": jnp.zeros(3)},
    }
    params = lorajax.lorafy(base, rank=rank, where=["fc"], also=r"head/bias", key=jax.random.key(3))
    tx = optax.masked(optax.adam(1e-2), lorajax.mask)
    return params, tx, tx.init(params)


def trained_step(params, tx, opt_state):
    def loss(p):
        return (lorajax.merge(p)["fc"]["kernel"].sum() + lorajax.merge(p)["head"]["bias"].sum()) ** 2

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def test_restore_gives_back_what_trains_and_keeps_the_callers_base(tmp_path):
    params, tx, opt_state = setup()
    params, opt_state = trained_step(params, tx, opt_state)
    key = jax.random.split(jax.random.key(5))[1]
    with lorajax.Checkpoints(tmp_path) as ckpts:
        assert ckpts.latest_step is None
        ckpts.save(1, params, opt_state, key)
        ckpts.wait()
        fresh, _, fresh_state = setup()
        step, restored, state, new_key = ckpts.restore(fresh, fresh_state, jax.random.key(0))
    assert step == 1
    chex_equal = jax.tree.map(
        lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), (restored, state), (params, opt_state)
    )
    assert all(jax.tree.leaves(chex_equal))
    assert restored["fc"]["kernel"].base is fresh["fc"]["kernel"].base  # the frozen base is the caller's own
    assert (jax.random.key_data(new_key) == jax.random.key_data(key)).all()


def test_the_frozen_base_is_never_written(tmp_path):
    params, tx, opt_state = setup()
    with lorajax.Checkpoints(tmp_path, async_save=False) as ckpts:
        ckpts.save(0, params, opt_state)
    written = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    base_bytes = params["fc"]["kernel"].base.nbytes  # 16 KiB; the factors and adam moments are 3 x 2 KiB
    assert written < base_bytes, f"{written} bytes on disk: the 64x64 base was written"


def test_keep_last_n_and_choosing_a_step(tmp_path):
    params, tx, opt_state = setup()
    with lorajax.Checkpoints(tmp_path, max_to_keep=2, async_save=False) as ckpts:
        saved = {}
        for step in range(1, 5):
            params, opt_state = trained_step(params, tx, opt_state)
            ckpts.save(step, params, opt_state)
            saved[step] = params["fc"]["kernel"].b
        assert ckpts.all_steps() == [3, 4]
        _, restored, _, _ = ckpts.restore(params, opt_state, step=3)
        np.testing.assert_array_equal(restored["fc"]["kernel"].b, saved[3])
        with pytest.raises(FileNotFoundError, match=r"no step 1 in .* \(steps: \[3, 4\]\)"):
            ckpts.restore(params, opt_state, step=1)


def test_mismatched_templates_name_every_difference(tmp_path):
    params, tx, opt_state = setup(rank=2)
    with lorajax.Checkpoints(tmp_path, async_save=False) as ckpts:
        with pytest.raises(FileNotFoundError, match="no checkpoint in .*latest_step"):
            ckpts.restore(params, opt_state)
        ckpts.save(0, params, opt_state, jax.random.key(0))
        other, _, other_state = setup(rank=4)
        with pytest.raises(ValueError, match=r"(?s)templates do not match step 0.*fc/kernel/a \(64, 2\).*\(64, 4\)"):
            ckpts.restore(other, other_state, jax.random.key(0))
        with pytest.raises(ValueError, match="key: saved one, template none"):
            ckpts.restore(params, opt_state)


def test_bad_arguments_are_refused(tmp_path):
    params, _, _ = setup()
    with pytest.raises(ValueError, match="max_to_keep must be a positive int"):
        lorajax.Checkpoints(tmp_path, max_to_keep=0)
    with lorajax.Checkpoints(tmp_path) as ckpts:
        with pytest.raises(ValueError, match="step must be a non-negative int"):
            ckpts.save(-1, params)
        with pytest.raises(ValueError, match="no trainable leaf"):
            ckpts.save(0, {"w": jnp.ones(3)})

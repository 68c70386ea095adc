"""Low-precision bases: merge rounds once (correctly rounded vs float64); factored keeps the activation dtype."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lorajax

D, R = 256, 8


def _node(dtype, rel=0.5):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0.0, 0.02, (D, D)), dtype)
    a = jnp.asarray(rng.uniform(-1, 1, (D, R)) / np.sqrt(D), jnp.float32)
    b = rng.standard_normal((R, D))
    b = jnp.asarray(b * rel * 0.02 / np.std(np.asarray(a, np.float64) @ b), jnp.float32)
    return lorajax.LoRA(w, a, b, lorajax.LoRASpec(R, float(R), lorajax.Layout("io")))  # scale 1


def _reference(node):
    return np.asarray(node.base, np.float64) + np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_merge_of_a_low_precision_base_is_correctly_rounded(dtype):
    node = _node(dtype)
    ref = _reference(node)
    floor = ref.astype(ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float16).astype(np.float64)
    merged = np.asarray(jax.jit(lorajax.merge)({"w": node})["w"], np.float64)
    assert jax.jit(lorajax.merge)({"w": node})["w"].dtype == dtype
    # One rounding of a float32 sum: equal to the correctly rounded float64 result except for rare float32 ties.
    assert np.mean(merged == floor) > 0.999
    # The naive merge (update cast to the base dtype, added in the base dtype) rounds twice and is measurably off.
    naive = np.asarray(node.base + lorajax.delta(node).astype(dtype), np.float64)
    assert np.mean(naive == floor) < 0.95
    assert np.abs(merged - ref).mean() < np.abs(naive - ref).mean()


def test_factored_with_bf16_activations_matches_the_merged_bf16_model():
    node = _node(jnp.bfloat16, rel=0.1)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((32, D)), jnp.bfloat16)
    fn = lambda p, x: x @ p["w"]
    y = jax.jit(lorajax.factored(fn))({"w": node}, x)
    assert y.dtype == jnp.bfloat16  # the LoRA branch is added in the activation dtype
    ref = np.asarray(x, np.float64) @ _reference(node)
    err_factored = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
    err_merged = np.linalg.norm(np.asarray(fn({"w": lorajax.merge({"w": node})["w"]}, x), np.float64) - ref)
    err_merged /= np.linalg.norm(ref)
    assert err_factored < 1e-2  # bf16 output rounding is ~2e-3 relative
    assert err_factored < 1.5 * err_merged + 1e-4

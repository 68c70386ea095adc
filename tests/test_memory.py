"""Memory planning (memory_plan / summary(optimizer=...)) against hand-counted bytes."""

import jax
import jax.numpy as jnp
import optax
import pytest

import lorajax

D_IN, D_OUT, R = 64, 32, 4


def _params(abstract=False):
    leaves = {
        "fc": {"kernel": ((D_IN, D_OUT), jnp.bfloat16), "bias": ((D_OUT,), jnp.float32)},
        "norm": {"scale": ((D_IN,), jnp.float32)},
    }
    make = (lambda s, d: jax.ShapeDtypeStruct(s, d)) if abstract else (lambda s, d: jnp.ones(s, d))
    p = jax.tree.map(lambda sd: make(*sd), leaves, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], tuple))
    return lorajax.lorafy(p, rank=R, where=["fc"], key=jax.random.key(0))


# Hand counts (bytes). Factors are float32 by default even for the bf16 kernel.
KERNEL = D_IN * D_OUT * 2
OTHER = D_OUT * 4 + D_IN * 4  # bias + norm scale, float32
FACTORS = (D_IN * R + R * D_OUT) * 4
COUNT = 4  # adam's int32 step counter


def test_adam_plan_matches_hand_count():
    plan = lorajax.memory_plan(_params(), optax.adam(1e-3))
    assert plan.lora == lorajax.StateBytes(
        frozen=KERNEL + OTHER, trainable=FACTORS, gradients=FACTORS, optimizer=2 * FACTORS + COUNT
    )
    full = KERNEL + OTHER
    assert plan.full == lorajax.StateBytes(frozen=0, trainable=full, gradients=full, optimizer=2 * full + COUNT)
    assert plan.lora.total == KERNEL + OTHER + 4 * FACTORS + COUNT
    assert plan.saving == pytest.approx(plan.full.total / plan.lora.total)


def test_optimizer_state_comes_from_the_optimizer_itself():
    # SGD without momentum keeps no state; adam with bf16 first moment halves mu.
    assert lorajax.memory_plan(_params(), optax.sgd(1e-3)).lora.optimizer == 0
    plan = lorajax.memory_plan(_params(), optax.adam(1e-3, mu_dtype=jnp.bfloat16))
    assert plan.lora.optimizer == FACTORS // 2 + FACTORS + COUNT
    # bf16 kernel's mu stays bf16, float32 leaves' mu becomes bf16.
    assert plan.full.optimizer == (KERNEL + OTHER // 2) + (KERNEL + OTHER) + COUNT


def test_also_moves_leaves_from_frozen_to_trainable():
    plan = lorajax.memory_plan(lorajax.trainable(_params(), r"fc/bias"), optax.adam(1e-3))
    bias = D_OUT * 4
    assert plan.lora.frozen == KERNEL + OTHER - bias
    assert plan.lora.trainable == plan.lora.gradients == FACTORS + bias
    assert plan.lora.optimizer == 2 * (FACTORS + bias) + COUNT


def test_abstract_and_concrete_trees_plan_alike():
    tx = optax.adamw(1e-3)
    assert lorajax.memory_plan(_params(abstract=True), tx) == lorajax.memory_plan(_params(), tx)


def test_summary_carries_and_prints_the_plan():
    s = lorajax.summary(_params(abstract=True), optimizer=optax.adam(1e-3), devices=4)
    assert s.memory == lorajax.memory_plan(_params(), optax.adam(1e-3), devices=4)
    text = str(s)
    for row in ("frozen weights", "trainable params", "gradients", "optimizer state", "total", "per device (/4)"):
        assert row in text
    assert "KiB" in text and "less training state" in text
    assert lorajax.summary(_params()).memory is None


def test_memory_plan_errors():
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        lorajax.memory_plan(_params(), "adam")
    with pytest.raises(ValueError, match="devices must be an integer >= 1"):
        lorajax.memory_plan(_params(), optax.adam(1e-3), devices=0)


def llama2_7b_shapes():
    """Llama-2-7B-shaped abstract params (no allocation): 32 layers, d 4096, ffn 11008, vocab 32000, bf16."""
    d, f, v, bf16 = 4096, 11008, 32000, jnp.bfloat16
    s = lambda *shape: jax.ShapeDtypeStruct(shape, bf16)
    layer = {
        "self_attn": {n: {"kernel": s(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": {"kernel": s(d, f)}, "up_proj": {"kernel": s(d, f)}, "down_proj": {"kernel": s(f, d)}},
        "input_layernorm": {"scale": s(d)},
        "post_attention_layernorm": {"scale": s(d)},
    }
    return {
        "embed_tokens": {"embedding": s(v, d)},
        **{f"layers_{i}": layer for i in range(32)},
        "norm": {"scale": s(d)},
        "lm_head": {"kernel": s(d, v)},
    }


def test_llama2_7b_plan_matches_closed_form():
    n = 6_738_415_616  # Llama-2-7B's parameter count
    lora = lorajax.lorafy(llama2_7b_shapes(), rank=16, where=lorajax.attn_qv, key=jax.random.key(0))
    n_lora = 32 * 2 * 16 * (4096 + 4096)
    s = lorajax.summary(lora, optimizer=optax.adamw(1e-4))
    assert s.total - s.trainable == n and s.trainable == n_lora
    plan = s.memory
    assert plan.full == lorajax.StateBytes(0, 2 * n, 2 * n, 4 * n + 4)  # bf16 weights, grads, mu, nu (+ count)
    assert plan.lora == lorajax.StateBytes(2 * n, 4 * n_lora, 4 * n_lora, 8 * n_lora + 4)  # f32 factors


# ------------------------------------------------------------------------------------------------
# Donated merge: one target at a time, the result lands in the base's buffer.

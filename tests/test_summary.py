"""summary: counts against hand arithmetic, on concrete and abstract trees."""

import jax
import jax.numpy as jnp
from _models import tiny_gpt

import lorajax


def test_counts_and_bytes_by_hand():
    params = {
        "q": {"kernel": jnp.ones((64, 32), jnp.bfloat16), "bias": jnp.ones(32)},
        "v": {"kernel": jnp.ones((64, 32))},
    }
    lora = lorajax.lorafy(params, rank=4, where=["q", "v"], key=jax.random.key(0), rank_pattern={"v": 2})
    s = lorajax.summary(lora)
    q_factors, v_factors = 4 * (64 + 32), 2 * (64 + 32)
    assert s.trainable == q_factors + v_factors
    assert s.total == 2 * 64 * 32 + 32 + q_factors + v_factors
    assert s.trainable_bytes == 4 * s.trainable  # float32 factors
    assert s.total_bytes == 2 * 64 * 32 + 4 * 64 * 32 + 4 * 32 + 4 * s.trainable  # bf16 q base, f32 v base
    assert [t.path for t in s.targets] == ["q/kernel", "v/kernel"] and s.targets[1].rank == 2
    assert lorajax.summary(lorajax.trainable(lora, r".*bias")).trainable == s.trainable + 32


def test_table_lists_every_target_and_the_peft_line():
    _, params, _ = tiny_gpt()
    lora = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, key=jax.random.key(0))
    text = str(lorajax.summary(lora))
    assert text.count("SelfAttention_0/query/kernel") == 2 and "ioo" in text
    s = lorajax.summary(lora)
    assert f"trainable params: {s.trainable:,} || all params: {s.total:,}" in text


def test_abstract_equals_concrete():
    _, params, _ = tiny_gpt()
    f = lambda p: lorajax.lorafy(p, rank=4, where=lorajax.all_linear, key=jax.random.key(0))
    assert lorajax.summary(jax.eval_shape(f, params)) == lorajax.summary(f(params))

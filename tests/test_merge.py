"""merge / unlorafy / delta against an independent dense reference, and donated merges."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorajax

# (shape, layout) for every kind of kernel lorajax knows.
LAYOUTS = [
    ((12, 10), "io"),  # Dense
    ((10, 12), "oi"),  # Equinox / PyTorch weight
    ((12, 3, 4), "ioo"),  # DenseGeneral q/k/v
    ((3, 4, 12), "iio"),  # attention output
    ((3, 6, 8), "wio"),  # 1-D conv
    ((3, 3, 4, 8), "wwio"),  # 2-D conv
    ((20, 6), "eo"),  # embedding
    ((3, 12, 10), "sio"),  # Dense stacked by nn.scan
    ((2, 12, 3, 4), "sioo"),  # stacked DenseGeneral
    ((2, 10, 12), "soi"),  # stacked Equinox weight
    ((8, 3, 6, 3), "owiw"),  # axes in any order
]


def dense_reference(base, a, b, layout, scale):
    """W0 + scale * A.B with plain reshapes and one float64 matmul, then transposed into the layout."""
    shape, r = base.shape, a.shape[-1]
    stack = [shape[k] for k in layout.stack]
    fan_in = [shape[k] for k in layout.fan_in]
    fan_out = [shape[k] for k in layout.fan_out]
    a2 = np.asarray(a, np.float64).reshape(math.prod(stack), math.prod(fan_in), r)
    b2 = np.asarray(b, np.float64).reshape(math.prod(stack), r, math.prod(fan_out))
    d = (a2 @ b2).reshape(stack + fan_in + fan_out)
    order = list(layout.stack) + list(layout.fan_in) + list(layout.fan_out)
    return np.asarray(base, np.float64) + scale * np.transpose(d, np.argsort(order))


def lorafied(shape, axes, rank=2, dtype=jnp.float32, seed=0, alpha=None, rslora=False):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    params = {"layer": {"kernel": jax.random.normal(k0, shape, dtype)}}
    lora = lorajax.lorafy(
        params, rank=rank, where=r"layer/kernel", key=k1, layout={"layer": axes}, alpha=alpha, rslora=rslora
    )
    node = lora["layer"]["kernel"]
    # Give B non-zero values so the update is visible.
    node = node.__class__(**{**node.__dict__, "b": jax.random.normal(k2, node.b.shape, node.b.dtype)})
    return params, {"layer": {"kernel": node}}


@pytest.mark.parametrize("shape,axes", LAYOUTS)
def test_merge_at_init_is_bitwise_identity(shape, axes):
    params = {"layer": {"kernel": jax.random.normal(jax.random.key(0), shape)}}
    lora = lorajax.lorafy(params, rank=2, where=r"layer/kernel", key=jax.random.key(1), layout={"layer": axes})
    chex.assert_trees_all_equal(jax.jit(lorajax.merge)(lora), params)


@pytest.mark.parametrize("shape,axes", LAYOUTS)
def test_merge_equals_dense_reference(shape, axes):
    _, lora = lorafied(shape, axes, rank=2, alpha=3.0)
    node = lora["layer"]["kernel"]
    merged = jax.jit(lorajax.merge)(lora)["layer"]["kernel"]
    expected = dense_reference(node.base, node.a, node.b, node.layout, 3.0 / 2)
    assert merged.shape == shape and merged.dtype == jnp.float32
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)


def test_rslora_scale():
    _, lora = lorafied((12, 10), "io", rank=4, alpha=8.0, rslora=True)
    node = lora["layer"]["kernel"]
    assert node.scale == pytest.approx(8.0 / 2.0)
    expected = dense_reference(node.base, node.a, node.b, node.layout, 4.0)
    np.testing.assert_allclose(lorajax.merge(lora)["layer"]["kernel"], expected, rtol=1e-5, atol=1e-5)


def test_bf16_merge_rounds_once():
    """A bf16 base merged in float32 sits at the bf16 rounding floor; the naive bf16 add (PEFT-style) does not."""
    _, lora = lorafied((64, 64), "io", rank=8, dtype=jnp.bfloat16, seed=3)
    node = lora["layer"]["kernel"]
    ours = lorajax.merge(lora)["layer"]["kernel"]
    assert ours.dtype == jnp.bfloat16
    truth = dense_reference(node.base, node.a, node.b, node.layout, node.scale)
    # Naive: delta from bf16 factors, rounded to bf16, then added in bf16 (two roundings).
    bf = jnp.bfloat16
    naive = node.base + (node.scale * (node.a.astype(bf) @ node.b.astype(bf))).astype(bf)
    floor = np.asarray(jnp.asarray(truth, jnp.float32).astype(bf), np.float64)  # correctly rounded truth

    def err(x):
        return np.abs(np.asarray(x, np.float64) - truth).mean()

    assert err(ours) <= 1.01 * err(floor)
    assert err(naive) > 1.05 * err(ours)  # measured ~1.13x here; the double rounding always costs


def test_gradients_through_merge_reach_factors_not_base():
    _, lora = lorafied((12, 10), "io")
    x = jax.random.normal(jax.random.key(5), (3, 12))

    def loss(p):
        return jnp.sum((x @ lorajax.merge(p)["layer"]["kernel"]) ** 2)

    g = jax.jit(jax.grad(loss))(lora)["layer"]["kernel"]
    assert float(jnp.abs(g.a).sum()) > 0 and float(jnp.abs(g.b).sum()) > 0
    chex.assert_trees_all_equal(g.base, jnp.zeros_like(g.base))
    # Gradient of A against the chain rule by hand: dL/dA = s * x^T (2 y) B^T.
    node = lora["layer"]["kernel"]
    y = x @ dense_reference(node.base, node.a, node.b, node.layout, node.scale)
    expected_a = node.scale * (np.asarray(x, np.float64).T @ (2 * y)) @ np.asarray(node.b, np.float64).T
    np.testing.assert_allclose(g.a, expected_a, rtol=1e-4, atol=1e-4)


def test_merge_compiles_once_per_structure():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def merge(p):
        return lorajax.merge(p)

    for seed in range(3):
        merge(lorafied((12, 10), "io", seed=seed)[1])
    chex.clear_trace_counter()


def test_unlorafy_returns_the_very_base_and_merge_keeps_input_untouched():
    params, lora = lorafied((12, 10), "io")
    node = lora["layer"]["kernel"]
    before = jax.tree.map(np.array, lora)
    assert lorajax.unlorafy(lora)["layer"]["kernel"] is node.base
    lorajax.merge(lora)
    chex.assert_trees_all_equal(lora, before)


def test_delta_refuses_per_example_nodes():
    node = lorafied((12, 10), "io")[1]["layer"]["kernel"]
    node = node.__class__(**{**node.__dict__, "per_example": True})
    with pytest.raises(ValueError, match="per-example factors"):
        lorajax.merge({"k": node})


@settings(max_examples=10, deadline=None)
@given(
    case=st.sampled_from(LAYOUTS),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
)
def test_property_merge_at_init_is_identity(case, rank, seed, dtype):
    shape, axes = case
    base = jax.random.normal(jax.random.key(seed), shape, dtype)
    lora = lorajax.lorafy({"m": {"kernel": base}}, rank=rank, where=r".*", key=jax.random.key(seed), layout={"m": axes})
    assert lora["m"]["kernel"].a.dtype == jnp.float32
    chex.assert_trees_all_equal(lorajax.merge(lora)["m"]["kernel"], base)


@settings(max_examples=10, deadline=None)
@given(
    dims=hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=5),
    data=st.data(),
)
def test_property_merge_matches_reference_for_random_layouts(dims, data):
    n = len(dims)
    n_in = data.draw(st.integers(1, n - 1))
    n_stack = data.draw(st.integers(0, n - 1 - n_in))
    codes = list("s" * n_stack + "i" * n_in + "o" * (n - n_in - n_stack))
    axes = "".join(data.draw(st.permutations(codes)))
    layout = lorajax.Layout(axes)
    fan_in, fan_out = layout.sizes(dims)
    rank = data.draw(st.integers(1, min(fan_in, fan_out)))
    params, lora = lorafied(dims, axes, rank=rank, seed=data.draw(st.integers(0, 1000)))
    node = lora["layer"]["kernel"]
    expected = dense_reference(node.base, node.a, node.b, layout, node.scale)
    np.testing.assert_allclose(lorajax.merge(lora)["layer"]["kernel"], expected, rtol=1e-5, atol=1e-5)


def _numpy_init(key, base, layout, rank, dtype):
    # Deterministic numpy factors with a non-zero B: no PRNG program to compile, and merging changes the kernel.
    rng = np.random.default_rng(base.size)
    a_shape, b_shape = layout.a_shape(base.shape, rank), layout.b_shape(base.shape, rank)
    return jnp.asarray(rng.standard_normal(a_shape), dtype), jnp.asarray(rng.standard_normal(b_shape), dtype)


def _lorafied_with_update(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), dtype), "bias": jnp.zeros(8)},
        "b": {"kernel": jnp.asarray(rng.standard_normal((3, 8, 4)), dtype)},
    }
    return lorajax.lorafy(
        params, rank=2, where=["a", "b"], key=jax.random.key(0), layout={"b": "sio"}, init=_numpy_init
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_donated_merge_equals_merge(dtype):
    lora = _lorafied_with_update(dtype)
    expected = jax.tree.map(np.asarray, jax.jit(lorajax.merge)(lora))
    donor = _lorafied_with_update(dtype)  # donation consumes these buffers, keep `lora` for the reference
    merged = lorajax.merge(donor, donate=True)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, merged), expected)
    assert merged["b"]["kernel"].dtype == dtype
    node = donor["a"]["kernel"]
    assert node.base.is_deleted() and node.a.is_deleted() and node.b.is_deleted()  # the buffers were consumed
    assert not donor["a"]["bias"].is_deleted()  # non-LoRA leaves pass through untouched


def test_donated_merge_refuses_tracers():
    with pytest.raises(ValueError, match="donate=True.*outside jax.jit"):
        jax.jit(lambda p: lorajax.merge(p, donate=True))(_lorafied_with_update())

"""The same API over Flax linen (boxed, scanned), Flax NNX and Equinox."""

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerances import assert_within, sum_bound
from flax import nnx

import lorajax


def test_linen_partitioned_boxes_keep_their_metadata():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(16, kernel_init=init, name="fc1")(x)

    params = Net().init(jax.random.key(0), jnp.ones((2, 8)))["params"]
    lora = lorajax.lorafy(params, rank=2, where=["fc1"], key=jax.random.key(1))
    node = lora["fc1"]["kernel"]
    assert isinstance(node.base, nn.Partitioned) and node.base is params["fc1"]["kernel"]
    spec = nn.get_partition_spec(lora)["fc1"]["kernel"]
    assert (spec.base, spec.a, spec.b) == (
        jax.sharding.PartitionSpec("embed", "mlp"),
        jax.sharding.PartitionSpec("embed", None),
        jax.sharding.PartitionSpec(None, "mlp"),
    )
    merged = lorajax.merge(lora)
    assert isinstance(merged["fc1"]["kernel"], nn.Partitioned) and merged["fc1"]["kernel"].names == ("embed", "mlp")
    chex.assert_trees_all_equal(nn.unbox(merged), nn.unbox(params))


class ScannedStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(h.shape[-1], name="fc")(nn.tanh(h)), None

        scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="layers")(x, None)[0]


def test_linen_scanned_layers_each_get_their_own_factors():
    model, x = ScannedStack(), jax.random.normal(jax.random.key(0), (2, 8))
    params = model.init(jax.random.key(1), x)["params"]
    lora = lorajax.lorafy(params, rank=2, where=r".*fc/kernel", key=jax.random.key(2), layout={"layers/.*": "s..."})
    node = lora["layers"]["fc"]["kernel"]
    node = node.__class__(**{**node.__dict__, "b": jax.random.normal(jax.random.key(3), node.b.shape)})
    lora["layers"]["fc"]["kernel"] = node
    merged = lorajax.merge(lora)["layers"]["fc"]["kernel"]
    for layer in range(3):  # every slice is its own W0 + A_l B_l (float64; merge rounds rank 2 sums and one add)
        w, a, b = (np.asarray(v[layer], np.float64) for v in (node.base, node.a, node.b))
        assert_within(merged[layer], w + a @ b, sum_bound(abs(w) + abs(a) @ abs(b), 2 + 2), f"layer {layer}")
    y = model.apply({"params": lorajax.merge(lora)}, x)
    h = x
    for layer in range(3):
        h = h + jnp.tanh(h) @ merged[layer] + params["layers"]["fc"]["bias"][layer]
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
        self.value = nnx.Linear(8, 4, rngs=rngs)  # a submodule named `value`, beside attn's value projection

    def __call__(self, x):
        return self.value(self.attn(x))


def test_nnx_state_lorafy_merge_and_train():
    graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
    lora = lorajax.lorafy(state, rank=2, where=lorajax.attn_qv | ["value"], key=jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=lorajax.is_lora)[0]
    targets = [lorajax.path_str(p) for p, x in leaves if lorajax.is_lora(x)]
    assert targets == ["attn/query/kernel", "attn/value/kernel", "value/kernel"]
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    reference = nnx.merge(graphdef, state)(x)
    np.testing.assert_array_equal(nnx.merge(graphdef, lorajax.merge(lora))(x), reference)

    tx = lorajax.masked(optax.adam(1e-2))
    opt_state = tx.init(lora)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graphdef, lorajax.merge(p))(x) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(5):
        lora, opt_state, loss = step(lora, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert isinstance(lora["attn"]["query"]["kernel"].base, nnx.Param)
    np.testing.assert_array_equal(
        lora["attn"]["query"]["kernel"].base.get_value(), state["attn"]["query"]["kernel"].get_value()
    )


def test_equinox_out_in_weights_against_dense_reference():
    mlp = eqx.nn.MLP(6, 3, 8, depth=2, key=jax.random.key(0))
    lora = lorajax.lorafy(mlp, rank=2, where=r"layers/\d+/weight", key=jax.random.key(1))
    node = lora.layers[0].weight
    assert node.layout.axes == "oi" and node.a.shape == (6, 2) and node.b.shape == (2, 8)
    b = jax.random.normal(jax.random.key(2), node.b.shape)
    lora = eqx.tree_at(lambda m: m.layers[0].weight.b, lora, b)
    merged = lorajax.merge(lora)
    assert isinstance(merged, eqx.nn.MLP)
    w, a, b64 = np.asarray(mlp.layers[0].weight, np.float64), np.asarray(node.a, np.float64), np.asarray(b, np.float64)
    expected = w + (a @ b64).T  # (out, in) = (A B)^T, in float64; merge rounds rank 2 sums and one add
    bound = sum_bound(abs(w) + (abs(a) @ abs(b64)).T, 2 + 2)
    assert_within(merged.layers[0].weight, expected, bound, "layers/0/weight")
    x = jnp.ones(6)
    assert merged(x).shape == (3,)


def test_equinox_partition_combine_training():
    mlp = eqx.nn.MLP(6, 3, 8, depth=2, key=jax.random.key(0))
    lora = lorajax.lorafy(mlp, rank=2, where=r".*weight", key=jax.random.key(1))
    trainable, frozen = lorajax.partition(lora)
    x = jax.random.normal(jax.random.key(3), (16, 6))

    @jax.jit
    def loss(t):
        model = lorajax.merge(lorajax.combine(t, frozen))
        return jnp.mean(jax.vmap(model)(x) ** 2)

    tx = optax.adam(1e-2)
    s = tx.init(trainable)
    first = float(loss(trainable))
    for _ in range(5):
        g = jax.grad(loss)(trainable)
        u, s = tx.update(g, s)
        trainable = optax.apply_updates(trainable, u)
    assert float(loss(trainable)) < first


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_plain_dict_function(dtype):
    w = jax.random.normal(jax.random.key(0), (8, 4), dtype)
    params = {"proj": {"kernel": w}}
    lora = lorajax.lorafy(params, rank=2, where=["proj"], key=jax.random.key(1))
    f = lambda p, x: x @ p["proj"]["kernel"]
    x = jnp.ones((3, 8), dtype)
    np.testing.assert_array_equal(f(lorajax.merge(lora), x), f(params, x))

"""Small stand-ins for the models of gemma, tunix, penzai and keras-hub: their parameter names, kernel shapes
and einsum strings, without the libraries (the real ones are exercised under the `libraries` marker).

Each builder returns a `Case`: params, an apply function `apply(params, tokens)`, its inputs, and what
`lorajax.infer_layouts` must find: the layout of every linear kernel (attention and MLP, experts and routers
included) and which of them are the query/value projections.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

D, N, K, H, F, V, E, L = 64, 4, 2, 16, 96, 101, 3, 2  # d_model, heads, kv heads, head_dim, mlp, vocab, experts, layers
TOKENS = jnp.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 6, 1]], jnp.int32)


@dataclasses.dataclass
class Case:
    params: Any
    apply: Callable[..., Any]
    inputs: tuple
    linear: dict[str, str]  # path -> layout of every kernel all_linear must adapt
    qv: set[str]  # the paths attn_qv must adapt
    not_linear: dict[str, str] = dataclasses.field(default_factory=dict)  # embeddings and heads: path -> layout


def _normal(key, shape, scale=0.2):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _rms(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1.0 + scale)


def _attend(q, k, v):
    """Grouped-query attention: q (B,T,N,H), k and v (B,S,K,H)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k) / jnp.sqrt(h)
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None, :, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


# --- gemma (google-deepmind/gemma, linen): bare-leaf MLP, q_einsum + kv_einsum (GQA) or qkv_einsum ------------


def gemma(fused_qkv: bool = False) -> Case:
    keys = iter(jax.random.split(jax.random.key(0), 64))
    kv = N if fused_qkv else K
    layers = {}
    for i in range(L):
        attn = (
            {"qkv_einsum": {"w": _normal(next(keys), (3, N, D, H))}}
            if fused_qkv
            else {
                "q_einsum": {"w": _normal(next(keys), (N, D, H))},
                "kv_einsum": {"w": _normal(next(keys), (2, kv, D, H))},
            }
        )
        attn["attn_vec_einsum"] = {"w": _normal(next(keys), (N, H, D))}
        layers[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": jnp.zeros(D)},
            "attn": attn,
            "pre_ffw_norm": {"scale": jnp.zeros(D)},
            "mlp": {"gating_einsum": _normal(next(keys), (2, D, F)), "linear": _normal(next(keys), (F, D))},
        }
    params = {"params": {"embedder": {"input_embedding": _normal(next(keys), (V, D))}, **layers}}
    params["params"]["final_norm"] = {"scale": jnp.zeros(D)}

    def apply(variables, tokens):
        p = variables["params"]
        x = p["embedder"]["input_embedding"][(tokens,)] * jnp.sqrt(D).astype(jnp.float32)
        for i in range(L):
            lp = p[f"layer_{i}"]
            h = _rms(x, lp["pre_attention_norm"]["scale"])
            if fused_qkv:
                q, k, v = jnp.einsum("BTD,SNDH->SBTNH", h, lp["attn"]["qkv_einsum"]["w"])
            else:
                q = jnp.einsum("BTD,NDH->BTNH", h, lp["attn"]["q_einsum"]["w"])
                k, v = jnp.einsum("BSD,CKDH->CBSKH", h, lp["attn"]["kv_einsum"]["w"])
            x = x + jnp.einsum("BTNH,NHD->BTD", _attend(q, k, v), lp["attn"]["attn_vec_einsum"]["w"])
            h = _rms(x, lp["pre_ffw_norm"]["scale"])
            gate = jnp.einsum("...D,CDF->...CF", h, lp["mlp"]["gating_einsum"])
            act = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
            x = x + jnp.einsum("...F,FD->...D", act, lp["mlp"]["linear"])
        x = _rms(x, p["final_norm"]["scale"])
        logits = jnp.einsum("BTD,VD->BTV", x, p["embedder"]["input_embedding"])  # tied: embedder.decode
        return jnp.tanh(logits / 30.0) * 30.0

    linear, qv = {}, set()
    for i in range(L):
        a = f"params/layer_{i}/attn"
        if fused_qkv:
            linear[f"{a}/qkv_einsum/w"] = "ooio"
            qv.add(f"{a}/qkv_einsum/w")
        else:
            linear |= {f"{a}/q_einsum/w": "oio", f"{a}/kv_einsum/w": "ooio"}
            qv |= {f"{a}/q_einsum/w", f"{a}/kv_einsum/w"}
        linear[f"{a}/attn_vec_einsum/w"] = "iio"
        linear[f"params/layer_{i}/mlp/gating_einsum"] = "oio"
        linear[f"params/layer_{i}/mlp/linear"] = "io"
    return Case(params, apply, (TOKENS,), linear, qv, {"params/embedder/input_embedding": "eo"})


# --- tunix Qwen3 (google/tunix, NNX): Einsum q/k/v/o with GQA; dense MLP or MoE experts + router ---------------


class _Einsum(nnx.Module):
    def __init__(self, spec, shape, rngs):
        self.spec = spec
        self.w = nnx.Param(_normal(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.spec, x, self.w[...])


class _Norm(nnx.Module):
    def __init__(self, dim):
        self.w = nnx.Param(jnp.zeros(dim))

    def __call__(self, x):
        return _rms(x, self.w[...])


class _Attention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = _Einsum("BTD,DNH->BTNH", (D, N, H), rngs)
        self.k_proj = _Einsum("BSD,DKH->BSKH", (D, K, H), rngs)
        self.v_proj = _Einsum("BSD,DKH->BSKH", (D, K, H), rngs)
        self.o_proj = _Einsum("BTNH,NHD->BTD", (N, H, D), rngs)
        self.q_norm, self.k_norm = _Norm(H), _Norm(H)

    def __call__(self, x):
        q, k = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x))
        return self.o_proj(_attend(q, k, self.v_proj(x)))


class _MLP(nnx.Module):
    def __init__(self, rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
        self.gate_proj, self.up_proj, self.down_proj = lin(D, F), lin(D, F), lin(F, D)

    def __call__(self, x):
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class _MoE(nnx.Module):
    """tunix's MoELayer on CPU: a router, expert banks as bare Params, a loop that indexes each expert."""

    def __init__(self, rngs):
        self.router = nnx.Linear(D, E, use_bias=False, rngs=rngs)
        self.gate_proj = nnx.Param(_normal(rngs.params(), (E, D, F)))
        self.up_proj = nnx.Param(_normal(rngs.params(), (E, D, F)))
        self.down_proj = nnx.Param(_normal(rngs.params(), (E, F, D)))

    def __call__(self, x):
        weights, idx = jax.lax.top_k(jax.nn.softmax(self.router(x), axis=-1), 2)
        dispatch = jnp.swapaxes(jax.nn.one_hot(idx, E), -1, -2)  # (B, T, E, k)
        routed = jnp.einsum("BTID,BTEK->BTED", x[:, :, None, :], dispatch)
        outs = []
        for i in range(E):
            xi = routed[:, :, i, :]
            act = nnx.silu(jnp.einsum("BTD,DF->BTF", xi, self.gate_proj[i]))
            act = act * jnp.einsum("BTD,DF->BTF", xi, self.up_proj[i])
            outs.append(jnp.einsum("BTF,FD->BTD", act, self.down_proj[i]))
        combine = dispatch * jnp.tile(weights[:, :, None, :], (1, 1, E, 1))
        return jnp.einsum("BTED,BTEK->BTD", jnp.stack(outs, axis=2), combine)


class _Block(nnx.Module):
    def __init__(self, moe, rngs):
        self.input_layernorm, self.post_attention_layernorm = _Norm(D), _Norm(D)
        self.attn = _Attention(rngs)
        self.mlp = _MoE(rngs) if moe else _MLP(rngs)

    def __call__(self, x):
        x = x + self.attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _Qwen3(nnx.Module):
    def __init__(self, moe, rngs):
        self.embedder = nnx.Module()
        self.embedder.input_embedding = nnx.Param(_normal(rngs.params(), (V, D)))
        self.layers = nnx.List([_Block(moe, rngs) for _ in range(L)])
        self.final_norm = _Norm(D)
        self.lm_head = _Einsum("BTD,DV->BTV", (D, V), rngs)

    def __call__(self, tokens):
        x = self.embedder.input_embedding[...][(tokens,)]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_norm(x))


def tunix_qwen3(moe: bool = False) -> Case:
    model = _Qwen3(moe, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    apply = lambda s, tokens: nnx.merge(graphdef, s)(tokens)
    linear, qv = {}, set()
    for i in range(L):
        a = f"layers/{i}/attn"
        linear |= {f"{a}/q_proj/w": "ioo", f"{a}/k_proj/w": "ioo", f"{a}/v_proj/w": "ioo", f"{a}/o_proj/w": "iio"}
        qv |= {f"{a}/q_proj/w", f"{a}/v_proj/w"}
        m = f"layers/{i}/mlp"
        if moe:
            linear |= {
                f"{m}/router/kernel": "io",
                f"{m}/gate_proj": "sio",
                f"{m}/up_proj": "sio",
                f"{m}/down_proj": "sio",
            }
        else:
            linear |= {f"{m}/{n}/kernel": "io" for n in ("gate_proj", "up_proj", "down_proj")}
    return Case(state, apply, (TOKENS,), linear, qv, {"embedder/input_embedding": "eo", "lm_head/w": "io"})


# --- penzai llamalike (google-deepmind/penzai): named-axis einsums, data_array leaves, optional layer stack ----


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out


def _named(w, order, want):
    """A penzai NamedArray's data laid out for an einsum: the named axes moved into the order ``want``."""
    return jnp.transpose(w, [order.index(a) for a in want])


# Penzai stores each Linear's weights with its input axes first, then its output axes.
_PZ_BLOCK = {
    "attention/input_to_query/sublayers/0/weights/data_array": ((D, N, H), "dnh"),
    "attention/input_to_key/sublayers/0/weights/data_array": ((D, K, H), "dkh"),
    "attention/input_to_value/sublayers/0/weights/data_array": ((D, K, H), "dkh"),
    "attention/attn_value_to_output/sublayers/1/weights/data_array": ((N, H, D), "nhd"),
    "mlp/sublayers/0/branches/0/sublayers/0/weights/data_array": ((D, F), "df"),  # gating_linear (unnamed path)
    "mlp/sublayers/0/branches/1/weights/data_array": ((D, F), "df"),  # value_linear
    "mlp/sublayers/1/weights/data_array": ((F, D), "fd"),  # out_linear
}
_PZ_LAYOUT = {"dnh": "ioo", "dkh": "ioo", "nhd": "iio", "df": "io", "fd": "io"}


def _pz_block(w: dict, x):
    g = lambda name: w[name][0] if isinstance(w[name], tuple) else w[name]
    h = _rms(x, w["pre_attention_norm/scale/data_array"])
    wq = _named(g("attention/input_to_query/sublayers/0/weights/data_array"), "dnh", "nhd")
    wk = _named(g("attention/input_to_key/sublayers/0/weights/data_array"), "dkh", "khd")
    wv = _named(g("attention/input_to_value/sublayers/0/weights/data_array"), "dkh", "khd")
    q = jnp.einsum("btd,nhd->btnh", h, wq)
    k, v = jnp.einsum("btd,khd->btkh", h, wk), jnp.einsum("btd,khd->btkh", h, wv)
    wo = _named(g("attention/attn_value_to_output/sublayers/1/weights/data_array"), "nhd", "dnh")
    x = x + jnp.einsum("btnh,dnh->btd", _attend(q, k, v), wo)
    h = _rms(x, w["pre_ffw_norm/scale/data_array"])
    gate = jnp.einsum("btd,df->btf", h, g("mlp/sublayers/0/branches/0/sublayers/0/weights/data_array"))
    val = jnp.einsum("btd,df->btf", h, g("mlp/sublayers/0/branches/1/weights/data_array"))
    fd = _named(g("mlp/sublayers/1/weights/data_array"), "fd", "df")
    return x + jnp.einsum("btf,df->btd", jax.nn.silu(gate) * val, fd)


def penzai_llamalike(layer_stack: bool = False) -> Case:
    keys = iter(jax.random.split(jax.random.key(1), 64))
    flat = {"body/sublayers/0/table/embeddings/data_array": _normal(next(keys), (V, D))}
    stack = (L,) if layer_stack else ()
    blocks = ["body/sublayers/1/stacked"] if layer_stack else [f"body/sublayers/{1 + i}" for i in range(L)]
    linear = {}
    for prefix in blocks:
        for name, (shape, axes) in _PZ_BLOCK.items():
            flat[f"{prefix}/{name}"] = _normal(next(keys), stack + shape)
            linear[f"{prefix}/{name}"] = "s" * len(stack) + _PZ_LAYOUT[axes]
        for norm in ("pre_attention_norm", "pre_ffw_norm"):
            flat[f"{prefix}/{norm}/scale/data_array"] = jnp.zeros(stack + (D,))
    head = f"body/sublayers/{len(blocks) + 1}/weights/data_array"  # the unnamed lm_head Linear
    flat[head] = _normal(next(keys), (D, V))
    params = _nest(flat)

    def apply(p, tokens):
        body = p["body"]["sublayers"]
        x = body["0"]["table"]["embeddings"]["data_array"][tokens]
        if layer_stack:
            stacked = _flat(body["1"]["stacked"])
            x, _ = jax.lax.scan(lambda c, w: (_pz_block(w, c), None), x, stacked)
        else:
            for i in range(L):
                x = _pz_block(_flat(body[str(1 + i)]), x)
        return jnp.einsum("btd,dv->btv", x, body[str(len(blocks) + 1)]["weights"]["data_array"])

    qv = {
        f"{b}/attention/{m}/sublayers/0/weights/data_array"
        for b in blocks
        for m in ("input_to_query", "input_to_value")
    }
    return Case(
        params, apply, (TOKENS,), linear, qv, {"body/sublayers/0/table/embeddings/data_array": "eo", head: "io"}
    )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- keras-hub Llama and Gemma backbones (stateless_call): flat dicts keyed by the variables' '/' paths ---------


def keras_hub(variant: str) -> Case:
    """keras-hub EinsumDense kernels: Llama query (d_model, heads, head_dim), Gemma query (heads, d_model, head_dim)."""
    keys = iter(jax.random.split(jax.random.key(2), 64))
    flat = {"token_embedding/embeddings": _normal(next(keys), (V, D))}
    linear, qv = {}, set()
    gemma_like = variant == "gemma"
    for i in range(L):
        if gemma_like:
            b, a = f"decoder_block_{i}", f"decoder_block_{i}/attention"
            attn = {"query": ((N, D, H), "oio"), "key": ((N, D, H), "oio"), "value": ((N, D, H), "oio")}
            mlp = {"ffw_gating": ((D, F), "io"), "ffw_gating_2": ((D, F), "io"), "ffw_linear": ((F, D), "io")}
        else:
            b, a = f"transformer_layer_{i}", f"transformer_layer_{i}/self_attention"
            attn = {"query": ((D, N, H), "ioo"), "key": ((D, K, H), "ioo"), "value": ((D, K, H), "ioo")}
            mlp = {
                "feedforward_gate_dense": ((D, F), "io"),
                "feedforward_intermediate_dense": ((D, F), "io"),
                "feedforward_output_dense": ((F, D), "io"),
            }
        attn["attention_output"] = ((N, H, D), "iio")
        for name, (shape, lay) in attn.items():
            flat[f"{a}/{name}/kernel"] = _normal(next(keys), shape)
            linear[f"{a}/{name}/kernel"] = lay
        qv |= {f"{a}/query/kernel", f"{a}/value/kernel"}
        for name, (shape, lay) in mlp.items():
            flat[f"{b}/{name}/kernel"] = _normal(next(keys), shape)
            linear[f"{b}/{name}/kernel"] = lay
        flat[f"{b}/pre_attention_norm/scale"] = jnp.zeros(D)
        flat[f"{b}/pre_ffw_norm/scale"] = jnp.zeros(D)
    not_linear = {"token_embedding/embeddings": "eo"}
    if not gemma_like:
        flat["token_embedding/reverse_embeddings"] = _normal(next(keys), (D, V))  # untied head
        not_linear["token_embedding/reverse_embeddings"] = "io"

    def apply(p, tokens):
        x = p["token_embedding/embeddings"][tokens]
        for i in range(L):
            b = f"decoder_block_{i}" if gemma_like else f"transformer_layer_{i}"
            a = f"{b}/attention" if gemma_like else f"{b}/self_attention"
            h = _rms(x, p[f"{b}/pre_attention_norm/scale"])
            spec = "btd,ndh->btnh" if gemma_like else "btd,dnh->btnh"
            q, k, v = (jnp.einsum(spec, h, p[f"{a}/{n}/kernel"]) for n in ("query", "key", "value"))
            x = x + jnp.einsum("btnh,nhd->btd", _attend(q, k, v), p[f"{a}/attention_output/kernel"])
            h = _rms(x, p[f"{b}/pre_ffw_norm/scale"])
            if gemma_like:
                act = jax.nn.gelu(h @ p[f"{b}/ffw_gating/kernel"]) * (h @ p[f"{b}/ffw_gating_2/kernel"])
                x = x + act @ p[f"{b}/ffw_linear/kernel"]
            else:
                act = jax.nn.silu(h @ p[f"{b}/feedforward_gate_dense/kernel"])
                act = act * (h @ p[f"{b}/feedforward_intermediate_dense/kernel"])
                x = x + act @ p[f"{b}/feedforward_output_dense/kernel"]
        if gemma_like:
            return x @ p["token_embedding/embeddings"].T
        return x @ p["token_embedding/reverse_embeddings"]

    return Case(flat, apply, (TOKENS,), linear, qv, not_linear)


CASES = {
    "gemma_gqa": lambda: gemma(fused_qkv=False),
    "gemma_qkv": lambda: gemma(fused_qkv=True),
    "tunix_qwen3": lambda: tunix_qwen3(moe=False),
    "tunix_qwen3_moe": lambda: tunix_qwen3(moe=True),
    "penzai_llamalike": lambda: penzai_llamalike(layer_stack=False),
    "penzai_llamalike_stack": lambda: penzai_llamalike(layer_stack=True),
    "keras_hub_llama": lambda: keras_hub("llama"),
    "keras_hub_gemma": lambda: keras_hub("gemma"),
}

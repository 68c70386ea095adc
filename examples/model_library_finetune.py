"""Fine-tune a model from a model library, unmodified: a penzai llamalike transformer with LoRA.

The model is built by penzai itself (a tiny random configuration: 2 blocks, width 64, grouped-query attention).
lorajax never sees penzai's classes: `pz.freeze_params` turns the model into a plain pytree, `infer_layouts`
reads from one abstract trace which axes each weight contracts (penzai stores weights as named arrays, in its own
axis order, and its output head has no name), and `factored` runs the training step without forming any `W`.

    pip install penzai
    python examples/model_library_finetune.py [--steps 60] [--layer-stack]

The task: continue a fixed periodic token sequence. Prints the kernels adapted, the loss before and after, and
checks that the factored loss equals the merged model's.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--layer-stack", action="store_true", help="build the blocks as one penzai LayerStack (a scan)")
    args = parser.parse_args()

    try:
        from penzai import pz
        from penzai.models.transformer.variants import llamalike_common
    except ImportError:
        raise SystemExit("This example needs penzai: pip install penzai") from None

    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=2,
        query_head_multiplier=2,
        embedding_dim=64,
        projection_dim=16,
        mlp_hidden_dim=128,
        num_decoder_blocks=2,
        vocab_size=32,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        use_layer_stack=args.layer_stack,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    params = pz.freeze_params(model)  # mutable pz.Parameters -> a plain pytree of named arrays

    # A periodic sequence the random base model cannot predict; LoRA learns to continue it.
    period = np.array([3, 17, 5, 29, 11, 2, 23, 7])
    seq = np.tile(period, 5)[None, :33].repeat(4, axis=0)
    tokens = pz.nx.wrap(jnp.asarray(seq[:, :-1])).tag("batch", "seq")
    targets = jnp.asarray(seq[:, 1:])

    def apply(m, toks):
        positions = pz.nx.arange("seq", toks.named_shape["seq"])
        return m(toks, token_positions=positions).unwrap("batch", "seq", "vocabulary")

    layouts = lorajax.infer_layouts(apply, params, tokens)
    lora = lorajax.lorafy(params, rank=args.rank, where=lorajax.all_linear, layout=layouts, alpha=2.0 * args.rank)
    print(lorajax.summary(lora))
    print(f"output head left out (found by tracing, it has no name): {sorted(layouts.heads)}")

    def loss_fn(p, toks, y):
        logits = apply(p, toks)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    fast = lorajax.factored(loss_fn, strict=True)
    tx = lorajax.masked(optax.adam(3e-3))
    opt_state = tx.init(lora)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(fast)(p, tokens, targets)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    before = float(fast(lora, tokens, targets))
    for k in range(args.steps):
        lora, opt_state, loss = step(lora, opt_state)
        if k % 20 == 0:
            print(f"step {k:4d}  loss {float(loss):.4f}")
    after = float(fast(lora, tokens, targets))
    merged = float(loss_fn(lorajax.merge(lora), tokens, targets))
    print(f"loss before {before:.4f}  after {after:.4f}  (merged model: {merged:.4f})")
    assert after < before, "LoRA training did not lower the loss"
    assert abs(after - merged) < 1e-3 * max(1.0, abs(merged)), "factored and merged losses disagree"


if __name__ == "__main__":
    main()

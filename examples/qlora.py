"""The memory plan of a Llama-2-7B-shaped QLoRA run next to LoRA on a bf16 base, from shapes alone.

    python examples/qlora.py

Nothing is allocated: the model is a tree of ``jax.ShapeDtypeStruct`` (32 decoder layers stacked as by
``nn.scan``), ``lorajax.quantize`` and ``lorajax.lorafy`` work on it abstractly, and ``lorajax.memory_plan`` counts
bytes from shapes. As in QLoRA, every linear kernel of the decoder is stored NF4 with double quantization (blocks of
64) and gets a rank-16 adapter; embeddings, norms and the LM head stay bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lorajax

LAYERS, D, FFN, VOCAB = 32, 4096, 11008, 32000
LINEAR = {
    "q_proj": (D, D),
    "k_proj": (D, D),
    "v_proj": (D, D),
    "o_proj": (D, D),
    "gate_proj": (D, FFN),
    "up_proj": (D, FFN),
    "down_proj": (FFN, D),
}


def llama2_7b() -> dict:
    """Llama-2-7B's parameter shapes (6.74 B weights) in bf16, decoder layers stacked on a leading axis."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    layers = {name: {"kernel": bf16(LAYERS, *shape)} for name, shape in LINEAR.items()}
    layers |= {"input_norm": {"scale": bf16(LAYERS, D)}, "post_norm": {"scale": bf16(LAYERS, D)}}
    return {
        "embed": {"embedding": bf16(VOCAB, D)},
        "layers": layers,
        "norm": {"scale": bf16(D)},
        "lm_head": {"kernel": bf16(D, VOCAB)},
    }


def plans(rank: int = 16) -> tuple[lorajax.MemoryPlan, lorajax.MemoryPlan]:
    """``(bf16 LoRA, QLoRA)`` memory plans with AdamW."""
    params = llama2_7b()
    targets = list(LINEAR)
    stacked = {r"layers/.*/kernel": "sio"}
    lora = lorajax.lorafy(params, rank=rank, where=targets, layout=stacked)
    quantized = lorajax.quantize(params, where=targets, dtype="nf4", block_size=64, double_quant=True, layout=stacked)
    qlora = lorajax.lorafy(quantized, rank=rank, where=targets)
    opt = optax.adamw(1e-4)
    return lorajax.memory_plan(lora, opt), lorajax.memory_plan(qlora, opt)


def main() -> None:
    bf16, nf4 = plans()
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    print("Llama-2-7B shapes, rank-16 adapters on every decoder linear, AdamW\n")
    print("LoRA, bf16 base\n" + str(bf16) + "\n")
    print("QLoRA, NF4 + double quantization base\n" + str(nf4) + "\n")
    print(f"frozen weights: {gib(bf16.lora.frozen)} (bf16) -> {gib(nf4.lora.frozen)} (NF4 + DQ)")


if __name__ == "__main__":
    main()

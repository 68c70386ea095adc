"""lorajax: functional LoRA for JAX, over any parameter pytree.

>>> import jax, jax.numpy as jnp, optax, lorajax
>>> params = {"query": {"kernel": jnp.ones((8, 8))}, "value": {"kernel": jnp.ones((8, 8))}}
>>> params = lorajax.lorafy(params, rank=2, where=lorajax.attn_qv, key=jax.random.key(0))
>>> tx = lorajax.masked(optax.adam(1e-3))
>>> lorajax.merge(params)["query"]["kernel"].shape
(8, 8)
"""

from lorajax._checkpoint import Checkpoints, Restored
from lorajax._factored import FallbackWarning, factored
from lorajax._infer import TracedLayouts, infer_layouts
from lorajax._layout import Layout, infer_layout
from lorajax._lorafy import lorafy
from lorajax._loraplus import loraplus
from lorajax._merge import delta, merge, unlorafy
from lorajax._node import LoRA, LoRASpec, is_lora
from lorajax._paths import path_str
from lorajax._sharding import factor_specs, partition_specs, shardings_of
from lorajax._summary import MemoryPlan, StateBytes, Summary, TargetRow, memory_plan, summary
from lorajax._targets import Preset, all_linear, attn_all, attn_qkv, attn_qv, mlp
from lorajax._token_rows import trainable_tokens
from lorajax._tokens import TrainableTokens, tokens_table
from lorajax._train import combine, mask, masked, partition
from lorajax._trainable import Trainable, is_trainable, trainable
from lorajax._version import __version__ as __version__
from lorajax.adapters import (
    Adapter,
    AdapterBank,
    AdapterFactors,
    AdapterSlots,
    AdapterTokens,
    BankNode,
    adapter,
    adapter_slots,
    attach,
    combine_adapters,
    dare_masks,
    load_adapter,
    read_adapter,
    save_adapter,
    select,
    stack_adapters,
    swap,
)
from lorajax.inits import eva_init, to_plain_lora
from lorajax.peft import load_peft, merge_peft, name_map_from_key_mapping, read_peft, save_peft, to_peft_dict
from lorajax.quant import QuantizedKernel, dequantize, is_quantized, load_bnb_4bit, quantize, requantize

__all__ = [
    "Adapter",
    "AdapterBank",
    "AdapterFactors",
    "AdapterSlots",
    "AdapterTokens",
    "BankNode",
    "Checkpoints",
    "FallbackWarning",
    "Layout",
    "LoRA",
    "LoRASpec",
    "MemoryPlan",
    "Preset",
    "QuantizedKernel",
    "Restored",
    "StateBytes",
    "Summary",
    "TargetRow",
    "TracedLayouts",
    "Trainable",
    "TrainableTokens",
    "adapter",
    "adapter_slots",
    "all_linear",
    "attach",
    "attn_all",
    "attn_qkv",
    "attn_qv",
    "combine",
    "combine_adapters",
    "dare_masks",
    "delta",
    "dequantize",
    "eva_init",
    "factor_specs",
    "factored",
    "infer_layout",
    "infer_layouts",
    "is_lora",
    "is_quantized",
    "is_trainable",
    "load_adapter",
    "load_bnb_4bit",
    "load_peft",
    "lorafy",
    "loraplus",
    "mask",
    "masked",
    "memory_plan",
    "merge",
    "merge_peft",
    "mlp",
    "name_map_from_key_mapping",
    "partition",
    "partition_specs",
    "path_str",
    "quantize",
    "read_adapter",
    "read_peft",
    "requantize",
    "save_adapter",
    "save_peft",
    "select",
    "shardings_of",
    "stack_adapters",
    "summary",
    "swap",
    "to_peft_dict",
    "to_plain_lora",
    "tokens_table",
    "trainable",
    "trainable_tokens",
    "unlorafy",
]

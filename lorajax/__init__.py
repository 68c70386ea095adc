"""lorajax: functional LoRA for JAX, over any parameter pytree.

>>> import jax, jax.numpy as jnp, optax, lorajax
>>> params = {"query": {"kernel": jnp.ones((8, 8))}, "value": {"kernel": jnp.ones((8, 8))}}
>>> params = lorajax.lorafy(params, rank=2, where=lorajax.attn_qv, key=jax.random.key(0))
>>> tx = lorajax.masked(optax.adam(1e-3))
>>> lorajax.merge(params)["query"]["kernel"].shape
(8, 8)
"""

from lorajax._lorafy import infer_layout, lorafy
from lorajax._merge import delta, merge, unlorafy
from lorajax._node import Layout, LoRA, is_lora
from lorajax._summary import Summary, TargetRow, summary
from lorajax._targets import Preset, all_linear, attn_all, attn_qkv, attn_qv, mlp, path_str
from lorajax._train import combine, mask, masked, partition

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "LoRA",
    "Preset",
    "Summary",
    "TargetRow",
    "all_linear",
    "attn_all",
    "attn_qkv",
    "attn_qv",
    "combine",
    "delta",
    "infer_layout",
    "is_lora",
    "lorafy",
    "mask",
    "masked",
    "merge",
    "mlp",
    "partition",
    "path_str",
    "summary",
    "unlorafy",
]

# --- exports added by feature work below (one block per module) ---

# native adapters, swapping, combining and adapter banks (lorajax/_adapters.py, lorajax/_bank.py)
from lorajax._adapters import (  # noqa: E402
    Adapter,
    AdapterFactors,
    adapter,
    attach,
    combine_adapters,
    load_adapter,
    read_adapter,
    save_adapter,
    swap,
)
from lorajax._bank import AdapterBank, BankNode, select, stack_adapters  # noqa: E402

__all__ += [
    "Adapter",
    "AdapterBank",
    "AdapterFactors",
    "BankNode",
    "adapter",
    "attach",
    "combine_adapters",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "select",
    "stack_adapters",
    "swap",
]

# PEFT interop (lorajax/_peft.py)
from lorajax._peft import load_peft, read_peft, save_peft  # noqa: E402

__all__ += ["load_peft", "read_peft", "save_peft"]

# factored execution (issue 3)
from lorajax._factored import FallbackWarning, factored  # noqa: E402

__all__ += ["FallbackWarning", "factored"]

# sharding, memory planning and large merges (issue 5: lorajax/_sharding.py, lorajax/_summary.py, lorajax/_merge.py)
from lorajax._sharding import factor_specs, partition_specs, shardings_of  # noqa: E402
from lorajax._summary import MemoryPlan, StateBytes, memory_plan  # noqa: E402

__all__ += ["MemoryPlan", "StateBytes", "factor_specs", "memory_plan", "partition_specs", "shardings_of"]

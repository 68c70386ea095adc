"""Native adapters: LoRA factors without their base, their files, and many adapters on one base.

One concept per module: the types and :func:`adapter` (``_adapter``), fitting an
adapter to a base and :func:`attach` (``_attach``), the safetensors file format
(``_format``), :func:`swap` on merged models (``_swap``), :func:`combine_adapters`
(``_combine``), adapter banks for mixed batches (``_bank``) and hot-swappable slots (``_slots``).
PEFT's merging arithmetic (TIES, DARE, magnitude pruning) and :func:`dare_masks` live in ``_merging``.
"""

from lorajax.adapters._adapter import Adapter, AdapterFactors, AdapterTokens, adapter
from lorajax.adapters._attach import attach
from lorajax.adapters._bank import AdapterBank, BankNode, select, stack_adapters
from lorajax.adapters._combine import combine_adapters
from lorajax.adapters._format import load_adapter, read_adapter, save_adapter
from lorajax.adapters._merging import dare_masks
from lorajax.adapters._slots import AdapterSlots, adapter_slots
from lorajax.adapters._swap import swap

__all__ = [
    "Adapter",
    "AdapterBank",
    "AdapterFactors",
    "AdapterSlots",
    "AdapterTokens",
    "BankNode",
    "adapter",
    "adapter_slots",
    "attach",
    "combine_adapters",
    "dare_masks",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "select",
    "stack_adapters",
    "swap",
]

"""Read and write Hugging Face PEFT LoRA adapters (no PyTorch needed).

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. Its tensors are named after the PyTorch module
they adapt, relative to the base model:

- Linear and GPT-2 ``Conv1D``: ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
  ``.lora_B.weight`` ``(out, r)``.
- ``ConvNd``: ``lora_A.weight`` ``(r, in, *window)`` (a conv with the base's kernel size, stride and
  padding) and ``lora_B.weight`` ``(out, r, 1, ...)`` (a 1x1 conv).
- ``Embedding``: ``lora_embedding_A`` ``(r, num)`` and ``lora_embedding_B`` ``(dim, r)``, no ``.weight``.

The update is ``scaling * B @ A`` (for convs: over the flattened window) with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), which is exactly
lorajax's ``scale * a @ b`` once ``a`` and ``b`` are transposed into the
kernel's layout. GPT-2's ``Conv1D`` (``fan_in_fan_out``) stores the same
``(r, in)``/``(out, r)`` factors; only its base weight is transposed.

Where things live: ``_names`` (parameter paths <-> module names, pattern keys),
``_convert`` (one module's factors between the two layouts), ``_read``
(:func:`read_peft` and the config checks), ``_load`` (:func:`load_peft`),
``_write`` (:func:`to_peft_dict`, :func:`save_peft`), ``_conventions`` (built-in ``name_map`` conventions: tunix,
gemma, MaxText), ``_fused`` (tuple names: a fused kernel's slices as modules), ``_teach`` (the error of a name map
that matches nothing), ``_modules_to_save`` (``also=`` leaves as PEFT's ``modules_to_save``), ``_merge_folder``
(:func:`merge_peft`: an adapter merged into a Hugging Face folder). The one rank/alpha pattern rule is
:func:`lorajax._targets.pattern_key`.
"""

from lorajax.peft._conventions import name_map_from_key_mapping
from lorajax.peft._load import load_peft
from lorajax.peft._merge_folder import merge_peft
from lorajax.peft._read import read_peft
from lorajax.peft._write import save_peft, to_peft_dict

__all__ = ["load_peft", "merge_peft", "name_map_from_key_mapping", "read_peft", "save_peft", "to_peft_dict"]

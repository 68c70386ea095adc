"""requantize: a model trained on quantized bases merged for serving, its kernels quantized again.

It sits above :mod:`lorajax._merge` (it merges each node as ``merge`` does), while ``quantize`` and ``dequantize``
(``_api.py``) sit below it. ``_merge`` is imported as a module: importing any module of this package runs its
``__init__``, which imports this one, so ``_merge`` may still be initialising when this module is imported.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes, _merge, _paths
from lorajax._node import is_lora
from lorajax._paths import path_str, rebuild
from lorajax._problems import Problems
from lorajax.quant._api import quantize_placed, walk_stop
from lorajax.quant._kernel import QuantizedKernel


def requantize(params: Any) -> Any:
    """Merge for serving: each LoRA node on a quantized base becomes a quantized kernel again.

    ``dequantize(base) + s·A·B`` is computed in float32 (as :func:`lorajax.merge` does) and quantized with the
    base's own format: kind, block size, double quantization and layout. Other LoRA nodes merge to dense
    kernels as in ``merge``; quantized kernels that no adapter trains stay as they are. Runs eagerly (it checks
    values): a merged kernel holding NaN or Inf raises, naming every such path.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> q = lorajax.quantize({"fc": {"kernel": jnp.ones((64, 8))}}, where=["fc"], dtype="int8")
        >>> served = lorajax.requantize(lorajax.lorafy(q, rank=2, where=["fc"]))
        >>> served["fc"]["kernel"].kind, served["fc"]["kernel"].shape
        ('int8', (64, 8))
    """
    leaves = _paths.tree_paths(params, is_leaf=walk_stop)
    problems = Problems("requantize")
    chosen: dict[int, Any] = {}
    for n, (path, leaf) in enumerate(leaves):
        base = _boxes.unbox(leaf.base) if is_lora(leaf) else None
        if not isinstance(base, QuantizedKernel):
            continue
        kernel = _merge.merged_kernel(leaf)
        if isinstance(kernel, jax.core.Tracer):
            raise ValueError("requantize reads the merged values; call it outside jax.jit.")
        bad = int(kernel.size - jnp.isfinite(kernel).sum())
        if bad:
            problems.add(f"{path_str(path)} ({base.kind}): {bad} of {kernel.size} merged weights are NaN or Inf")
            continue
        q = quantize_placed(kernel, base.layout, base.kind, base.block_size or 64, base.double_quant)
        chosen[n] = _boxes.rebox(leaf.base, q)
    problems.raise_if_any(
        "cannot quantize merged kernels that hold NaN or Inf",
        "Check the adapter's factors (lorajax.adapter(params)) and the training run that produced them.",
    )
    return _merge.merge_nodes(rebuild(params, leaves, chosen, walk_stop), keep_quantized=True)

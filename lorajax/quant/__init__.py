"""Quantized frozen bases for QLoRA: NF4 (with double quantization), int8 and fp8, bit-compatible with bitsandbytes.

Public names are re-exported by ``lorajax``; the modules here are private.
"""

from lorajax.quant._api import (
    dense_base,
    dense_shapes,
    dequantize,
    kernel_view,
    quantize,
    quantized_bytes,
    walk_stop,
)
from lorajax.quant._bnb import load_bnb_4bit
from lorajax.quant._kernel import QuantizedKernel, is_quantized, layer_slices
from lorajax.quant._requantize import requantize

__all__ = [
    "QuantizedKernel",
    "dense_base",
    "dense_shapes",
    "dequantize",
    "is_quantized",
    "kernel_view",
    "layer_slices",
    "load_bnb_4bit",
    "quantize",
    "quantized_bytes",
    "requantize",
    "walk_stop",
]

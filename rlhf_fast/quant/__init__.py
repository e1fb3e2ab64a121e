"""Weight-only int8 / int4 quantization (formats in rlhf_fast.quant.weight)."""

from rlhf_fast.quant.io import load_model, load_quantized, save_quantized
from rlhf_fast.quant.linear import QuantLinear
from rlhf_fast.quant.model import quantize_model
from rlhf_fast.quant.weight import QuantizedWeight, pack_int4, quantize_weight, unpack_int4

__all__ = [
    "QuantLinear",
    "QuantizedWeight",
    "load_model",
    "load_quantized",
    "pack_int4",
    "quantize_model",
    "quantize_weight",
    "save_quantized",
    "unpack_int4",
]

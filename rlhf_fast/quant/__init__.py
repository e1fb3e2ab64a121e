"""Weight-only int8 / int4 quantization (formats in rlhf_fast.quant.weight)."""

from rlhf_fast.quant.weight import QuantizedWeight, pack_int4, quantize_weight, unpack_int4

__all__ = ["QuantizedWeight", "pack_int4", "quantize_weight", "unpack_int4"]

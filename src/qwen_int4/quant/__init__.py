"""Quantized layers: GPTQ (AutoGPTQ checkpoint layout)."""
from qwen_int4.quant.gptq import (
    GPTQLinear,
    dequantize_gptq,
    pack_gptq,
    quantize_rtn,
    replace_linear_with_gptq,
    unpack_gptq,
)

__all__ = ["GPTQLinear", "dequantize_gptq", "pack_gptq", "quantize_rtn", "replace_linear_with_gptq", "unpack_gptq"]

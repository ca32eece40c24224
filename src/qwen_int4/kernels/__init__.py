"""Kernels for quantized linears, each beside (or checked against) a plain-PyTorch reference.

registry.py: the GPTQ kernel interface, the ranked list per device and `select_kernel`.
cpu_int4.py: tinygemm's CPU int4 GEMM for 4- and 8-bit GPTQ ("tinygemm-cpu").
triton_gptq.py: the CUDA GPTQ kernels ("triton-gptq", 4 and 8 bits): picks by rows of x among
    triton_gptq_gemv.py (1 row), triton_gptq_gemm.py (2-16 rows on tensor cores; dequantize +
    cuBLAS in K blocks for prefill), over the layout of gptq_layout.py.
triton_paged.py: paged decode/prefill attention over the engine's block tables.
triton_decode.py: fused decode-step kernels (add+RMSNorm, RoPE + KV write, split-KV decode
    attention, SwiGLU), each beside its torch reference.
"""
from qwen_int4.kernels.registry import (
    KERNEL_ENV_VAR,
    RANKED_KERNELS,
    REFERENCE_KERNEL,
    GPTQKernel,
    NoKernelError,
    kernel_names,
    kernels_for,
    select_kernel,
)

__all__ = [
    "KERNEL_ENV_VAR",
    "RANKED_KERNELS",
    "REFERENCE_KERNEL",
    "GPTQKernel",
    "NoKernelError",
    "kernel_names",
    "kernels_for",
    "select_kernel",
]

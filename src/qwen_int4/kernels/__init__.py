"""Kernels for quantized linears, each beside (or checked against) a plain-PyTorch reference.

registry.py: the GPTQ kernel interface, the ranked list per device and `select_kernel`.
cpu_int4.py: tinygemm's CPU int4 GEMM for 4- and 8-bit GPTQ ("tinygemm-cpu").
triton_gptq.py: the CUDA GPTQ kernels ("triton-gptq": 1-row GEMV, 2-16-row tensor-core GEMM,
    dequantize + cuBLAS for prefill).
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

"""GPTQ int4/int8 linears on CUDA through Triton ("triton-gptq"; CPU-checkable under TRITON_INTERPRET=1).

Reference and oracle: `dequantize_gptq` (quant/gptq.py), W[k, n] = s[g, n] * (q[k, n] - z[g, n]).
The layout the kernels read is made once at load (kernels/gptq_layout.py); `gptq_linear` picks
the kernel by the number of rows of x:

* 1 row (batch-1 decode): `gptq_gemv` (triton_gptq_gemv.py), CUDA cores, streams the weights.
* up to GEMM_MAX_ROWS rows (batched decode): `gptq_gemm` (triton_gptq_gemm.py), tensor cores,
  where `gemm_beats_dequant` says so.
* more (prefill): `gptq_dequantize` W [N, k] for a block of K, then cuBLAS, accumulating the
  K blocks into the output, so the fp16 scratch is bounded (DEQUANT_SCRATCH weights).
"""
from __future__ import annotations

import hashlib
import os
import weakref

import torch
import torch.nn.functional as F

from qwen_int4.kernels.gptq_layout import (
    GPTQWeights,
    check_gptq_shapes,
    to_checkpoint,
    to_kernel_layout,
)
from qwen_int4.kernels.registry import GPTQKernel
from qwen_int4.kernels.triton_gptq_gemm import (
    gemm_beats_dequant,
    gptq_dequantize,
    gptq_gemm,
)
from qwen_int4.kernels.triton_gptq_gemv import gptq_gemv

try:
    import triton
except ImportError:  # CPU-only install: `unavailable_reason` says so
    triton = None

# rows of x up to which the fused GEMM may be used (`gemm_beats_dequant` decides per shape)
GEMM_MAX_ROWS = 256
# Most weights dequantized at once for many rows (prefill): bigger linears are done in K blocks
# (2048-token prefill of mlp.w1/w2 on a 7B model: 45 MB of scratch instead of 90 MB).
DEQUANT_SCRATCH = 1 << 25


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why these kernels cannot run on `device`, or None when they can."""
    if triton is None:
        return "the triton package is not installed"
    if device.type != "cuda" and not _interpreting():
        return f"the Triton GPTQ kernels need a CUDA device, got {device.type} (TRITON_INTERPRET=1 runs them on CPU)"
    return None


def _dequant_matmul(x2: torch.Tensor, w: GPTQWeights) -> torch.Tensor:
    """x2 [M, K] @ W^T + bias through cuBLAS, dequantizing W one block of K at a time."""
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)  # the packed row order of W's columns
    unit = w.unit
    units = w.in_features // unit
    blocks = min(units, -(-(w.in_features * w.out_features) // DEQUANT_SCRATCH))
    per = -(-units // blocks)
    y = None
    for lo in range(0, units, per):
        hi = min(lo + per, units)
        weight = gptq_dequantize(w, x2.dtype, slice(lo, hi))  # [N, k] scratch
        xs = x2[:, lo * unit: hi * unit]
        y = F.linear(xs, weight, w.bias) if y is None else y.addmm_(xs, weight.t())
    return y


def gptq_linear(x: torch.Tensor, w: GPTQWeights) -> torch.Tensor:
    """y = x @ W^T + bias for x [..., K] (fp16/bf16), in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    m = x2.shape[0]
    if m == 1:
        y = gptq_gemv(x2, w)
    elif m <= GEMM_MAX_ROWS and gemm_beats_dequant(m, w.out_features, x2.device):
        y = gptq_gemm(x2, w)
    else:
        y = _dequant_matmul(x2, w)
    return y.reshape(*lead, w.out_features)


def gated_gemv(layer: torch.nn.Module, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor | None:
    """gate * silu(layer(x)) in one launch (the GEMV's epilogue) when `layer` is a GPTQLinear run
    by triton-gptq and x is one row; None otherwise (the caller computes it unfused)."""
    kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, TritonGPTQKernel) or x.numel() != x.shape[-1]:
        return None
    return gptq_gemv(x.reshape(1, -1), kernel.weights(layer), gate=gate.reshape(1, -1)).view(gate.shape)


# act-order permutations by value: layers quantized on the same input (mlp.w1 and mlp.w2) get the
# same one, and sharing the tensor tells `gptq_dual_gemv` so without comparing them on the device
_PERMS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _shared_perm(perm: torch.Tensor) -> torch.Tensor:
    """An earlier layer's tensor equal to `perm` (same device), else perm, remembered (load time: syncs)."""
    key = (str(perm.device), hashlib.sha1(perm.cpu().numpy().tobytes()).hexdigest())
    shared = _PERMS.get(key)
    if shared is not None and torch.equal(shared, perm):
        return shared
    _PERMS[key] = perm
    return perm


class TritonGPTQKernel(GPTQKernel):
    """4- and 8-bit GPTQ on CUDA through the Triton kernels (the registry's interface).

    prepare makes the kernel layout and frees the checkpoint's qweight, qzeros and scales (the
    layout holds the same information); `checkpoint_tensors` rebuilds them bit for bit for
    state_dict().
    """

    name = "triton-gptq"
    buffer_names = ("triton_qweight", "triton_scales", "triton_zeros", "triton_perm")
    _FREED = ("qweight", "qzeros", "scales")

    @classmethod
    def can_implement(cls, bits, group_size, desc_act, in_features, out_features, device, dtype):
        reason = unavailable_reason(torch.device(device))
        if reason is not None:
            return False, reason
        if dtype not in (torch.float16, torch.bfloat16):
            return False, f"computes on float16/bfloat16 activations, the model's dtype is {dtype}"
        return check_gptq_shapes(bits, group_size, in_features, out_features)

    def prepare(self, layer) -> None:
        w = to_kernel_layout(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias,
                             layer.bits, layer.group_size)
        if w.perm is not None:
            w.perm = _shared_perm(w.perm)
        layer.register_buffer("triton_qweight", w.qweight, persistent=False)  # [N, K / P] int32
        layer.register_buffer("triton_scales", w.scales, persistent=False)  # [N, G]
        layer.register_buffer("triton_zeros", w.zeros, persistent=False)  # [N, G] uint8
        layer.register_buffer("triton_perm", w.perm, persistent=False)  # [K] int32 or None
        for name in self._FREED:
            setattr(layer, name, None)  # rebuilt by checkpoint_tensors when state_dict() asks

    def weights(self, layer) -> GPTQWeights:
        """The layer's tensors as the launchers take them."""
        gs = layer.in_features if layer.group_size == -1 else layer.group_size
        return GPTQWeights(layer.triton_qweight, layer.triton_scales, layer.triton_zeros, layer.triton_perm,
                           layer.bias, gs, layer.bits)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return gptq_linear(x, self.weights(layer))

    def checkpoint_tensors(self, layer) -> dict[str, torch.Tensor]:
        if layer.qweight is not None:
            return {}
        return to_checkpoint(self.weights(layer))

"""GPTQ linears on CPU through tinygemm's int4 GEMM (`aten._weight_int4pack_mm_for_cpu`).

tinygemm computes y [M, N] = x [M, K] @ W^T from a packed uint8 [N, K/2] weight and
`scales_and_zeros` [K/gt, N, 2] (gt, its group size, in {32, 64, 128, 256}), with

    W[n, k] = (q[n, k] - 8) * scale[k // gt, n] + zero[k // gt, n]          (tested: test_cpu_int4)

while GPTQ stores W = s * (q - z) (quant/gptq.py). So scale = s and zero = s * (8 - z).
How each GPTQ feature maps onto it, once, in `prepare`:

- group size g: gt = the largest of 256, 128, 64, 32 dividing g (g = K for group_size -1),
  and each GPTQ group's (scale, zero) row is repeated g / gt times.
- act-order (desc_act, g_idx not k // g): input rows are sorted by g_idx so every group is
  contiguous; forward gathers x's columns in the same order (x[:, perm], K values a row).
- 8 bits: q = 16 * hi + lo with two 4-bit halves; W = 16s * (hi - zh) + s * (lo - zl) for
  z = 16 * zh + zl, so the layer becomes one int4 GEMM over K' = 2K: codes [hi | lo],
  x [x | x], groups [16s, 16s(8 - zh) | s, s(8 - zl)]. Same bytes as int8, one call.

Numerics: tinygemm's vectorized path (AVX2 / AVX512) exists for bfloat16 only (fp16 and fp32
take a scalar loop, ~25x slower), so x, scales and zeros are bf16, accumulation fp32, and the
output is cast back to x's dtype: bf16-level error (~2^-9 relative) against the reference.
fp32 models are left to torch-dequant (see `can_implement`).

Memory: the packed weight has exactly qweight's size, so `prepare` frees qweight and
`checkpoint_tensors` rebuilds it bit for bit from the packed bytes, for state_dict(). That
needs the packing layout, which is CPU-capability dependent (blocks of 32 rows on AVX2, 64
on AVX512): `packing_layout()` finds it once by comparing candidates against the op. If none
matches, the op packs and qweight is kept (correct, ~2x the weight memory).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from typing import NamedTuple

import torch

from qwen_int4.kernels.registry import GPTQKernel
from qwen_int4.quant.gptq import (
    act_order_perm,
    pack_codes_u8,
    unpack_codes_u8,
    unpack_int32,
)

TINYGEMM_GROUPS = (256, 128, 64, 32)  # group sizes the CPU op accepts, largest first


def _ops_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def tinygemm_group(group_size: int, in_features: int) -> int | None:
    """tinygemm's group size for a GPTQ group size (-1: one group of in_features), or None."""
    g = in_features if group_size == -1 else group_size
    return next((t for t in TINYGEMM_GROUPS if g % t == 0), None)


# ---------------------------------------------------------------- packing layout


class PackingLayout(NamedTuple):
    """How `_convert_weight_to_int4pack_for_cpu` lays out codes [N, K] as bytes [N, K/2].

    Rows go in blocks of `block_n` (the last may be shorter); a block of b rows is stored as
    [K, b/2] bytes. In a full block with `interleaved`, byte d holds rows d (low nibble) and
    d + b/2 (high); otherwise (and in a short last block) rows 2j and 2j + 1.
    """

    block_n: int
    interleaved: bool


_CANDIDATES = [PackingLayout(b, i) for b in (32, 64, 16) for i in (True, False)]


def pack_int4(codes: torch.Tensor, layout: PackingLayout) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 16) -> tinygemm's packed uint8 [N, K/2] for `layout`."""
    n_out, k_in = codes.shape
    b, full = layout.block_n, n_out // layout.block_n * layout.block_n
    pieces = []
    if full:
        blocks = codes[:full].view(full // b, b, k_in)  # [NB, b, K]
        if layout.interleaved:
            lo, hi = blocks[:, : b // 2], blocks[:, b // 2 :]  # [NB, b/2, K] rows d and d + b/2
        else:
            lo, hi = blocks[:, 0::2], blocks[:, 1::2]  # rows 2j and 2j + 1
        pieces.append((lo | (hi << 4)).transpose(1, 2).reshape(-1))  # [NB, K, b/2]
    if full < n_out:
        tail = codes[full:]  # [t, K]
        pieces.append((tail[0::2] | (tail[1::2] << 4)).t().reshape(-1))  # [K, t/2]
    flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return flat.view(n_out, k_in // 2)


def unpack_int4(packed: torch.Tensor, layout: PackingLayout) -> torch.Tensor:
    """Inverse of `pack_int4`: packed uint8 [N, K/2] -> uint8 codes [N, K]."""
    n_out, k_in = packed.shape[0], packed.shape[1] * 2
    b, full = layout.block_n, n_out // layout.block_n * layout.block_n
    flat = packed.reshape(-1)
    out = torch.empty(n_out, k_in, dtype=torch.uint8, device=packed.device)
    if full:
        byte = flat[: full * k_in // 2].view(full // b, k_in, b // 2).transpose(1, 2)  # [NB, b/2, K]
        blocks = out[:full].view(full // b, b, k_in)
        if layout.interleaved:
            blocks[:, : b // 2], blocks[:, b // 2 :] = byte & 15, byte >> 4
        else:
            blocks[:, 0::2], blocks[:, 1::2] = byte & 15, byte >> 4
    if full < n_out:
        byte = flat[full * k_in // 2 :].view(k_in, (n_out - full) // 2).t()  # [t/2, K]
        out[full::2], out[full + 1 :: 2] = byte & 15, byte >> 4
    return out


@functools.lru_cache(maxsize=1)
def packing_layout() -> PackingLayout | None:
    """The layout this process's op uses, found by packing random codes both ways (or None)."""
    if not _ops_available():
        return None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (240, 6), generator=gen, dtype=torch.int32)  # 240 = 3*64+48 = 7*32+16
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for layout in _CANDIDATES:
        if torch.equal(pack_int4(codes.to(torch.uint8), layout), want):
            return layout
    return None


def _pack(codes: torch.Tensor) -> torch.Tensor:
    layout = packing_layout()
    if layout is not None:
        return pack_int4(codes, layout)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def drop_file_pages(tensor: torch.Tensor) -> int:
    """Unmap from this process the whole pages of a discarded tensor that lives in a file
    mapping (the loader's memory-mapped safetensors): reading qweight once to repack it made
    them resident, and the mapping outlives it (the file's other tensors keep it), so they would
    count in RSS for good. Anonymous memory is left alone. Linux only; returns bytes dropped.
    The pages' contents stay the file's (re-read on access): do not use on a tensor written to.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return 0
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= start and end <= hi:
                if len(fields) < 6 or not fields[5].startswith("/"):
                    return 0  # anonymous (malloc'd) memory
                break
        else:
            return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        return 0
    return end - start


_MADV_DONTNEED = 4


# ---------------------------------------------------------------- the kernel


def _scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """GPTQ scale s and zero point z [G, N] -> tinygemm's (s, s * (8 - z)) [G, N, 2], float32."""
    return torch.stack([scale, scale * (8 - zero)], dim=-1)


class TinygemmCPUKernel(GPTQKernel):
    """4- and 8-bit GPTQ on CPU via tinygemm; bf16 compute. See the module docstring."""

    name = "tinygemm-cpu"
    buffer_names = ("tinygemm_weight", "tinygemm_scales_and_zeros", "tinygemm_x_index")

    @classmethod
    def can_implement(cls, bits, group_size, desc_act, in_features, out_features, device, dtype):
        if torch.device(device).type != "cpu":
            return False, f"runs on CPU only, the layer is on {device}"
        if not _ops_available():
            return False, f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu (needs torch >= 2.5)"
        if bits not in (4, 8):
            return False, f"bits={bits}: supports 4 (and 8 as two 4-bit halves)"
        if dtype not in (torch.bfloat16, torch.float16):
            return False, f"computes in bfloat16, too coarse for a {dtype} model (load in bfloat16/float16 to use it)"
        if out_features % 16:
            return False, f"out_features must be a multiple of 16 (the op packs 16-row blocks), got {out_features}"
        gs = in_features if group_size == -1 else group_size
        if tinygemm_group(group_size, in_features) is None:
            return False, f"group size {gs} is not a multiple of 32 (the op takes groups of 32, 64, 128 or 256)"
        if sys.byteorder != "little":
            return False, "reads int32 words as bytes: needs a little-endian CPU"
        return True, ""

    def prepare(self, layer) -> None:
        bits, k_in = layer.bits, layer.in_features
        gs = k_in if layer.group_size == -1 else layer.group_size
        codes = unpack_codes_u8(layer.qweight.t().contiguous(), bits)  # [N, K] uint8
        scale = layer.scales.to(torch.float32)  # [G, N]
        zero = unpack_int32(layer.qzeros, bits, dim=1) + 1  # [G, N] int32
        perm = act_order_perm(layer.g_idx, gs)
        if perm is not None:
            codes = codes.index_select(1, perm)  # groups contiguous
        x_index = perm
        if bits == 8:
            codes = torch.cat([codes >> 4, codes & 15], dim=1)  # [N, 2K]: hi | lo
            sz = torch.cat([_scale_zero(16 * scale, zero // 16), _scale_zero(scale, zero % 16)])  # [2G, N, 2]
            x_index = torch.cat([perm, perm]) if perm is not None else torch.arange(k_in).repeat(2)
        else:
            sz = _scale_zero(scale, zero)  # [G, N, 2]
        sz = sz.repeat_interleave(gs // tinygemm_group(layer.group_size, k_in), dim=0)  # [K'/gt, N, 2]
        layer.register_buffer("tinygemm_weight", _pack(codes), persistent=False)  # [N, K'/2] uint8
        layer.register_buffer("tinygemm_scales_and_zeros", sz.to(torch.bfloat16).contiguous(), persistent=False)
        layer.register_buffer("tinygemm_x_index", x_index, persistent=False)
        if packing_layout() is not None:
            qweight, layer.qweight = layer.qweight, None  # rebuilt by checkpoint_tensors for state_dict()
            drop_file_pages(qweight)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if layer.tinygemm_x_index is not None:
            x2 = x2.index_select(1, layer.tinygemm_x_index)  # [M, K'] in packed row order
        a = x2.to(torch.bfloat16).contiguous()
        sz = layer.tinygemm_scales_and_zeros  # [K'/gt, N, 2]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, layer.tinygemm_weight, a.shape[1] // sz.shape[0], sz)
        y = y.to(x.dtype)  # [M, N]
        if layer.bias is not None:
            y = y + layer.bias.to(x.dtype)
        return y.view(*x.shape[:-1], layer.out_features)

    def checkpoint_tensors(self, layer) -> dict[str, torch.Tensor]:
        if layer.qweight is not None:
            return {}
        bits, k_in = layer.bits, layer.in_features
        codes = unpack_int4(layer.tinygemm_weight, packing_layout())  # [N, K'] uint8
        if bits == 8:
            codes = (codes[:, :k_in] << 4) | codes[:, k_in:]
        perm = act_order_perm(layer.g_idx, k_in if layer.group_size == -1 else layer.group_size)
        if perm is not None:
            codes = codes.index_select(1, torch.argsort(perm))  # back to checkpoint row order
        return {"qweight": pack_codes_u8(codes, bits).t().contiguous()}  # [K/pf, N] int32

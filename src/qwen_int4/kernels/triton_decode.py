"""Triton kernels of the batch decode step over a static KV cache (engine/cuda_graph.py).

Each kernel sits beside its plain-PyTorch reference (the test oracle, and the formula the
model file uses). Positions come from a device tensor, so one captured CUDA graph serves every
step: nothing here reads a Python int that changes from step to step.

* `add_rms_norm`: h = x + residual (fp16 add, as the model's `x + attn(...)`), y = RMSNorm(h).
* `rope_write_kv`: RoPE on q and k of the fused qkv row at position `pos`, LogN on q, k and v
  written into the cache at `pos` (fp16, or int8 with a scale and zero per token and head).
* `decode_attention`: one query per (row, head) over cache positions [start_b, pos]: split-KV
  ("flash decoding") partials, then a combine kernel.
* `swiglu`: w1(x) * silu(w2(x)) from the two projections; `swiglu_mlp` runs both projections
  and the SwiGLU in one GEMV launch when it can (triton_gptq_gemv.gptq_dual_gemv).

Every kernel takes `PDL` (kernels/pdl.py): launched with Programmatic Dependent Launch on
Hopper, it lets the next kernel start early and waits for the previous one before it reads an
activation, the cache or the position, or writes anything.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .pdl import gdc_launch_dependents, gdc_wait, pdl_enabled
from .triton_gptq import TritonGPTQKernel, gated_gemv
from .triton_gptq_gemv import dual_gemv_problem, gptq_dual_gemv

try:
    import triton
    import triton.language as tl
except ImportError:  # the references below still work
    triton = None

# ----------------------------------------------------------------------------- references


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) as model/qwen.py computes it, h) with h = x + residual (or x)."""
    h = x if residual is None else x + residual
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(h) * weight, h


def quantize_kv_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 over the last dim: (q [..., D] uint8, scale [...], zero [...] float32).

    scale = (max - min) / 255, zero = -min / scale, q = floor(x / scale + zero + 0.5) clamped to 0..255;
    x ~ scale * (q - zero). (The reference's quantize_cache_v truncates and takes min/max over a
    whole chunk of tokens; here every token and head has its own range and q is rounded.)
    """
    x32 = x.float()
    lo, hi = x32.amin(-1), x32.amax(-1)
    scale = ((hi - lo) / 255).clamp_min(1e-8)
    zero = -lo / scale
    q = torch.clamp(torch.floor(x32 / scale[..., None] + zero[..., None] + 0.5), 0, 255).to(torch.uint8)
    return q, scale, zero


def dequantize_kv_reference(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale * (q - zero) in `dtype`."""
    return ((q.float() - zero[..., None]) * scale[..., None]).to(dtype)


def decode_attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, start: torch.Tensor | None = None
) -> torch.Tensor:
    """q [B, H, D] over keys/values [B, S, H, D] positions [start_b, length) -> [B, H * D]."""
    B, H, D = q.shape
    k = keys[:, :length].transpose(1, 2).float()  # [B, H, T, D]
    v = values[:, :length].transpose(1, 2).float()
    mask = None
    if start is not None:
        mask = (torch.arange(length, device=q.device)[None, :] >= start[:, None])[:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask, scale=1.0 / math.sqrt(D))
    return out.reshape(B, H * D).to(q.dtype)


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, n, eps, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
                             PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)  # the norm's weight: a constant, read before the wait
        if PDL:
            gdc_wait()
        x = tl.load(x_ptr + row * n + offs, mask=ok, other=0.0)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * n + offs, mask=ok, other=0.0)  # in the activation dtype
            tl.store(h_ptr + row * n + offs, x, mask=ok)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n + eps)
        normed = (x32 * rstd).to(x.dtype)
        tl.store(y_ptr + row * n + offs, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _quant_store(x1, x2, q_ptr, s_ptr, z_ptr, offs):
        """Quantize one head's two halves (fp32) to uint8 with one scale/zero; store all three."""
        lo = tl.minimum(tl.min(x1, axis=0), tl.min(x2, axis=0))
        hi = tl.maximum(tl.max(x1, axis=0), tl.max(x2, axis=0))
        scale = tl.maximum((hi - lo) / 255.0, 1e-8)
        zero = -lo / scale
        q1 = tl.minimum(tl.maximum(tl.floor(x1 / scale + zero + 0.5), 0.0), 255.0)
        q2 = tl.minimum(tl.maximum(tl.floor(x2 / scale + zero + 0.5), 0.0), 255.0)
        half = offs.shape[0]
        tl.store(q_ptr + offs, q1.to(tl.uint8))
        tl.store(q_ptr + half + offs, q2.to(tl.uint8))
        tl.store(s_ptr, scale.to(s_ptr.dtype.element_ty))
        tl.store(z_ptr, zero.to(z_ptr.dtype.element_ty))

    @triton.jit
    def _rope_head(row, cos_row, sin_row, logn, q_out, hidden, HALF: tl.constexpr, HAS_LOGN: tl.constexpr):
        """One head of a fused qkv row: store rotated (and LogN-scaled) q at q_out; return the rotated k
        halves and the v halves. fp32 math, cast as the model's apply_rotary does."""
        d = tl.arange(0, HALF)
        c1 = tl.load(cos_row + d)
        c2 = tl.load(cos_row + HALF + d)
        s1 = tl.load(sin_row + d)
        s2 = tl.load(sin_row + HALF + d)
        q1 = tl.load(row + d).to(tl.float32)
        q2 = tl.load(row + HALF + d).to(tl.float32)
        k1 = tl.load(row + hidden + d).to(tl.float32)
        k2 = tl.load(row + hidden + HALF + d).to(tl.float32)
        v1 = tl.load(row + 2 * hidden + d)
        v2 = tl.load(row + 2 * hidden + HALF + d)
        dtype = v1.dtype
        # x' = x cos + rotate_half(x) sin, rotate_half([x1, x2]) = [-x2, x1]
        qo1 = (q1 * c1 - q2 * s1).to(dtype)
        qo2 = (q2 * c2 + q1 * s2).to(dtype)
        if HAS_LOGN:
            scale = tl.load(logn).to(dtype)
            qo1 = qo1 * scale
            qo2 = qo2 * scale
        tl.store(q_out + d, qo1)
        tl.store(q_out + HALF + d, qo2)
        return (k1 * c1 - k2 * s1).to(dtype), (k2 * c2 + k1 * s2).to(dtype), v1, v2

    @triton.jit
    def _rope_write_kv_kernel(
        qkv_ptr, cos_ptr, sin_ptr, logn_ptr, pos_ptr, q_out_ptr,
        k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
        H, stride_qkv, stride_cb, stride_cs, stride_sb, stride_ss,
        D: tl.constexpr, HAS_LOGN: tl.constexpr, INT8: tl.constexpr, PDL: tl.constexpr,
    ):
        """One (row b, head h): rotate q and k at position pos (fp32, as apply_rotary), write k, v."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0) // H
        h = tl.program_id(0) % H
        pos = tl.load(pos_ptr)
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, HALF)
        ko1, ko2, v1, v2 = _rope_head(qkv_ptr + b * stride_qkv + h * D, cos_ptr + pos * D, sin_ptr + pos * D,
                                      logn_ptr + pos, q_out_ptr + (b * H + h) * D, H * D, HALF, HAS_LOGN)
        _store_kv_head(ko1, ko2, v1, v2, k_ptr, v_ptr, b * stride_cb + pos * stride_cs + h * D,
                       ks_ptr, kz_ptr, vs_ptr, vz_ptr, b * stride_sb + pos * stride_ss + h, d, INT8)

    @triton.jit
    def _store_kv_head(ko1, ko2, v1, v2, k_ptr, v_ptr, at, ks_ptr, kz_ptr, vs_ptr, vz_ptr, meta, d,
                       INT8: tl.constexpr):
        """One head's rotated key halves and value halves stored at element `at` of the caches: as they
        are, or (INT8) quantized with their scale and zero at element `meta` of the meta tensors."""
        if INT8:
            _quant_store(ko1.to(tl.float32), ko2.to(tl.float32), k_ptr + at, ks_ptr + meta, kz_ptr + meta, d)
            _quant_store(v1.to(tl.float32), v2.to(tl.float32), v_ptr + at, vs_ptr + meta, vz_ptr + meta, d)
        else:
            half = d.shape[0]
            tl.store(k_ptr + at + d, ko1)
            tl.store(k_ptr + at + half + d, ko2)
            tl.store(v_ptr + at + d, v1)
            tl.store(v_ptr + at + half + d, v2)

    @triton.jit
    def _online_softmax_step(q, k, v, ok, m, l, acc):
        """One tile of flash-decoding: fold keys/values k, v [T, D] (rows where `ok`) into the running
        max m, normaliser l and output acc [D] of query q [D] (already scaled)."""
        scores = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))  # [T]
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        return m_new, l, acc

    @triton.jit
    def _store_partial(part, d, acc, m, l):
        """One split's (acc [D], m, l) at `part`, as `_attention_combine_kernel` reads it."""
        D: tl.constexpr = acc.shape[0]
        tl.store(part + d, acc)
        tl.store(part + D, m)
        tl.store(part + D + 1, l)

    @triton.jit
    def _split_share(start, end, split, SPLITS: tl.constexpr, TILE: tl.constexpr):
        """Positions [lo, hi) of split `split` when SPLITS programs share [start, end) in whole tiles."""
        per = tl.cdiv(tl.cdiv(end - start, SPLITS), TILE) * TILE
        lo = start + split * per
        return lo, tl.minimum(lo + per, end)

    @triton.jit
    def _attention_partial_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, pos_ptr, start_ptr, part_ptr,
        H, stride_cb, stride_cs, stride_sb, stride_ss, sm_scale,
        SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, INT8: tl.constexpr, HAS_START: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Online softmax of one (row, head) over its share of positions [start, pos]: (acc [D], m, l)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        length = tl.load(pos_ptr) + 1
        start = 0
        if HAS_START:
            start = tl.load(start_ptr + b)
        lo, hi = _split_share(start, length, split, SPLITS, BLOCK_S)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + bh * D + d).to(tl.float32) * sm_scale
        m = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), axis=0)
        l = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)
        acc = tl.zeros((D,), tl.float32)
        for s0 in tl.range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < hi
            offs = b * stride_cb + s[:, None] * stride_cs + h * D + d[None, :]  # [BS, D]
            k = tl.load(k_ptr + offs, mask=ok[:, None], other=0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=ok[:, None], other=0).to(tl.float32)
            if INT8:
                meta = b * stride_sb + s * stride_ss + h
                k = (k - tl.load(kz_ptr + meta, mask=ok, other=0.0).to(tl.float32)[:, None]) \
                    * tl.load(ks_ptr + meta, mask=ok, other=0.0).to(tl.float32)[:, None]
                v = (v - tl.load(vz_ptr + meta, mask=ok, other=0.0).to(tl.float32)[:, None]) \
                    * tl.load(vs_ptr + meta, mask=ok, other=0.0).to(tl.float32)[:, None]
            m, l, acc = _online_softmax_step(q, k, v, ok, m, l, acc)
        _store_partial(part_ptr + (bh * SPLITS + split) * (D + 2), d, acc, m, l)

    @triton.jit
    def _attention_combine_kernel(part_ptr, out_ptr, SPLITS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
        """Merge the SPLITS partials of one (row, head): out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        bh = tl.program_id(0)
        i = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        base = part_ptr + (bh * SPLITS + i) * (D + 2)
        m = tl.load(base + D)  # [SPLITS]; -inf for an empty split
        l = tl.load(base + D + 1)
        top = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        acc = tl.load(base[:, None] + d[None, :])  # [SPLITS, D]
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + bh * D + d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _swiglu_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        a = tl.load(a_ptr + offs, mask=ok, other=0.0)
        b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        silu = (b / (1.0 + tl.exp(-b))).to(a.dtype)  # F.silu in fp32, rounded like the model's
        tl.store(out_ptr + offs, a * silu, mask=ok)


# ----------------------------------------------------------------------------- launchers


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [B, n] -> (RMSNorm(x + residual) [B, n], x + residual); h is x when no residual."""
    rows, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x
    pdl = pdl_enabled(x.device)
    _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, y, h, n, eps,
                                  BLOCK=triton.next_power_of_2(n), HAS_RES=residual is not None, PDL=pdl, num_warps=8,
                                  launch_pdl=pdl)
    return y, h


def rope_write_kv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None, pos: torch.Tensor,
    cache_k: torch.Tensor, cache_v: torch.Tensor, meta: tuple[torch.Tensor, ...] | None, num_heads: int,
) -> torch.Tensor:
    """qkv [B, 3 * H * D] -> rotated q [B, H, D]; k, v written to cache_k/v [B, S, H, D] at pos.

    cos, sin [S', D] float32 tables; logn [S'] float32 or None; pos int tensor [1];
    meta = (k_scale, k_zero, v_scale, v_zero) [B, S, H] for an int8 cache, else None.
    """
    B = qkv.shape[0]
    D = cache_k.shape[-1]
    q = torch.empty(B, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    int8 = meta is not None
    ks, kz, vs, vz = meta if int8 else (qkv,) * 4
    pdl = pdl_enabled(qkv.device)
    _rope_write_kv_kernel[(B * num_heads,)](
        qkv, cos, sin, logn if logn is not None else cos, pos, q, cache_k, cache_v, ks, kz, vs, vz,
        num_heads, qkv.stride(0), cache_k.stride(0), cache_k.stride(1),
        ks.stride(0) if int8 else 0, ks.stride(1) if int8 else 0,
        D=D, HAS_LOGN=logn is not None, INT8=int8, PDL=pdl, num_warps=1, launch_pdl=pdl,
    )
    return q


def decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: tuple[torch.Tensor, ...] | None,
    pos: torch.Tensor, start: torch.Tensor | None = None, splits: int = 16, block_s: int = 32,
) -> torch.Tensor:
    """q [B, H, D] over cache positions [start_b, pos] -> [B, H * D] in q's dtype."""
    B, H, D = q.shape
    part = torch.empty(B * H, splits, D + 2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)
    int8 = meta is not None
    ks, kz, vs, vz = meta if int8 else (q,) * 4
    pdl = pdl_enabled(q.device)
    _attention_partial_kernel[(B * H, splits)](
        q, cache_k, cache_v, ks, kz, vs, vz, pos, start if start is not None else pos, part,
        H, cache_k.stride(0), cache_k.stride(1), ks.stride(0) if int8 else 0, ks.stride(1) if int8 else 0,
        1.0 / math.sqrt(D), SPLITS=splits, D=D, BLOCK_S=block_s, INT8=int8, HAS_START=start is not None,
        PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    _attention_combine_kernel[(B * H,)](part, out, SPLITS=splits, D=D, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * silu(b) (the model's w1(x) * F.silu(w2(x)))."""
    out = torch.empty_like(a)
    n = a.numel()
    pdl = pdl_enabled(a.device)
    _swiglu_kernel[(triton.cdiv(n, 1024),)](a, b, out, n, BLOCK=1024, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def _dual_gemv(mlp: torch.nn.Module, y: torch.Tensor) -> torch.Tensor | None:
    """w1(y) * silu(w2(y)) in one GEMV launch when y is one row and w1, w2 run triton-gptq in the
    same format (`dual_gemv_problem`); None otherwise."""
    k1, k2 = getattr(mlp.w1, "kernel", None), getattr(mlp.w2, "kernel", None)
    if not (isinstance(k1, TritonGPTQKernel) and isinstance(k2, TritonGPTQKernel)) or y.numel() != y.shape[-1]:
        return None
    w1, w2 = k1.weights(mlp.w1), k2.weights(mlp.w2)
    if dual_gemv_problem(w1, w2) is not None:
        return None
    return gptq_dual_gemv(y.reshape(1, -1), w1, w2).view(*y.shape[:-1], w1.out_features)


def swiglu_mlp(mlp: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The MLP's w1(y) * silu(w2(y)) [B, ffn] for a decode step, rounded as the model does: one launch
    for both GEMVs when they can share one (`_dual_gemv`), else in w2's GEMV epilogue when w2 runs
    triton-gptq on one row, else `swiglu` of the two outputs."""
    fused = _dual_gemv(mlp, y)
    if fused is not None:
        return fused
    a = mlp.w1(y)
    fused = gated_gemv(mlp.w2, y, a)
    return fused if fused is not None else swiglu(a, mlp.w2(y))

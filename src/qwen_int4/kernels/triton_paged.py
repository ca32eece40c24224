"""Attention over the serving engine's paged KV pool (engine/paged_cache.py), each beside its reference.

Pool layout, per layer: keys and values [num_blocks, block_size, H, D]; the token at position p
of a sequence lives in block `block_table[p // block_size]` at offset `p % block_size` (its flat
slot is block * block_size + offset). The plain-PyTorch references are the CPU path and the
kernels' test oracles. Pools are fp16/bf16, or uint8 (the engine's kv_cache_dtype "int8") with
`meta` = (k_scale, k_zero, v_scale, v_zero) [num_blocks, H, block_size] float32: the static
cache's scheme (triton_decode.quantize_kv_reference, x ~ scale * (q - zero) per token and head),
stored head-major so that a block's scales or zeros of one head are contiguous. The kernels take the
four as views of one tensor [num_blocks, H, 4, block_size] (`pool_meta`): one block and head's 16
positions' four values fill 256 contiguous bytes.

* `paged_decode_attention`: one query per sequence over its context positions [0, len): split-KV
  ("flash decoding") partials that read K/V through the block table, merged by triton_decode's
  combine kernel (skipped with one split).
* `rope_write_paged`: RoPE on q and k of fused qkv rows (each row with its own cos/sin row),
  LogN on q, and k, v stored at each row's slot: the decode step's glue in one kernel.
* `varlen_attention`: causal attention of packed prefill chunks over their gathered contexts,
  queries aligned to the end of their context (a chunk continues a cached prefix): FlashAttention's
  varlen kernel on CUDA, SDPA per sequence otherwise.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ..model.rope import apply_rotary
from .triton_decode import dequantize_kv_reference, quantize_kv_reference

try:
    import triton
    import triton.language as tl

    from .pdl import gdc_launch_dependents, gdc_wait, pdl_enabled
    from .triton_decode import (
        _attention_combine_kernel,
        _online_softmax_step,
        _quant_store,
        _rope_head,
        _split_share,
        _store_kv_head,
        _store_partial,
    )
    from .triton_paged_tiles import _paged_int8_softmax, _tile_blocks, _tile_offsets
except ImportError:  # the references below still work
    triton = None

# ----------------------------------------------------------------------------- references

Meta = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # int8 pools: k_scale, k_zero, v_scale, v_zero


def pool_meta(num_blocks: int, block_size: int, num_heads: int, device: torch.device | str = "cpu") -> Meta:
    """Zeroed meta of uint8 pools: (k_scale, k_zero, v_scale, v_zero) [num_blocks, H, block_size] float32,
    views of one tensor [num_blocks, H, 4, block_size] (the layout the kernels take)."""
    return torch.zeros(num_blocks, num_heads, 4, block_size, dtype=torch.float32, device=device).unbind(2)


def _meta_index(t: torch.Tensor, slots: torch.Tensor) -> tuple:
    """Index of the flat `slots` [N] in a meta tensor t [blocks, H, block_size]: t[index] is [N, H]."""
    block_size = t.shape[-1]
    return slots // block_size, slice(None), slots % block_size


def store_slots(pool: torch.Tensor, scale_zero: tuple[torch.Tensor, ...] | None, slots: torch.Tensor,
                x: torch.Tensor) -> None:
    """Write x [N, H, D] at the flat `slots` [N] (long) of pool [blocks, block_size, H, D].

    scale_zero None: x as is. Else (scale, zero) [blocks, H, block_size] float32 of a uint8 pool:
    x quantized per token and head (triton_decode.quantize_kv_reference).
    """
    H, D = x.shape[-2:]
    if scale_zero is None:
        pool.view(-1, H, D).index_copy_(0, slots, x)
        return
    q, scale, zero = quantize_kv_reference(x)  # [N, H, D] uint8, [N, H] float32 twice
    pool.view(-1, H, D).index_copy_(0, slots, q)
    for dst, src in zip(scale_zero, (scale, zero)):
        dst[_meta_index(dst, slots)] = src


def gather_slots(pool: torch.Tensor, scale_zero: tuple[torch.Tensor, ...] | None, slots: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """The entries at flat `slots` [T] (long) of pool [blocks, block_size, H, D] -> [T, H, D] in dtype,
    dequantized with scale_zero (see store_slots) when given."""
    H, D = pool.shape[-2:]
    x = pool.view(-1, H, D)[slots]  # [T, H, D]
    if scale_zero is None:
        return x.to(dtype)
    scale, zero = (t[_meta_index(t, slots)] for t in scale_zero)  # [T, H]
    return dequantize_kv_reference(x, scale, zero, dtype)


def write_paged_reference(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor, meta: Meta | None) -> None:
    """Store k, v [N, H, D] at the flat `slots` [N] of the pools: as they are, or quantized into uint8
    pools with their meta (see paged_decode_attention_reference)."""
    store_slots(k_pool, meta[:2] if meta is not None else None, slots.long(), k)
    store_slots(v_pool, meta[2:] if meta is not None else None, slots.long(), v)


def paged_decode_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: Meta | None, block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """q [B, H, D] over each sequence's first context_lens[b] pooled positions -> [B, H, D] in q's dtype.

    k_pool, v_pool [num_blocks, block_size, H, D]; meta (k_scale, k_zero, v_scale, v_zero)
    [num_blocks, H, block_size] float32 for uint8 pools (pool_meta), else None; block_tables [B, max_blocks]
    int; context_lens [B] int. Keys and values are dequantized to float32, as the kernel does.
    """
    D = q.shape[-1]
    block_size = k_pool.shape[1]
    k_meta, v_meta = (meta[:2], meta[2:]) if meta is not None else (None, None)
    offsets = torch.arange(block_size, device=q.device)
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-n // block_size)].long()
        slots = (blocks[:, None] * block_size + offsets).flatten()[:n]  # [n]
        k = gather_slots(k_pool, k_meta, slots, torch.float32).transpose(0, 1)  # [H, n, D]
        v = gather_slots(v_pool, v_meta, slots, torch.float32).transpose(0, 1)  # [H, n, D]
        o = F.scaled_dot_product_attention(q[b, :, None].float(), k, v, scale=1.0 / math.sqrt(D))  # [H, 1, D]
        out[b] = o[:, 0].to(q.dtype)
    return out


def rope_write_paged_reference(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None, slots: torch.Tensor,
    k_pool: torch.Tensor, v_pool: torch.Tensor, meta: Meta | None, num_heads: int,
) -> torch.Tensor:
    """qkv [N, 3 * H * D] -> rotated (and LogN-scaled) q [N, H, D]; rotated k and v stored at `slots` [N].

    cos, sin [N, D] float32 (each row at its token's position); logn [N] float32 or None;
    meta as paged_decode_attention_reference's (k, v quantized into uint8 pools), else None.
    """
    N = qkv.shape[0]
    q, k, v = qkv.view(N, 3, num_heads, -1).unbind(1)  # each [N, H, D]
    q = apply_rotary(q[None], cos[None, :, None], sin[None, :, None])[0]  # [N, H, D]
    k = apply_rotary(k[None], cos[None, :, None], sin[None, :, None])[0]
    if logn is not None:
        q = q * logn[:, None, None].type_as(q)
    write_paged_reference(k, v, slots, k_pool, v_pool, meta)
    return q


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int]
) -> torch.Tensor:
    """Packed q [N, H, D] of n sequences over their packed contexts k, v [T, H, D] -> [N, H, D].

    Sequence i has queries cu_q[i]:cu_q[i+1] and keys cu_k[i]:cu_k[i+1]; its queries are its last
    positions, so query j sees keys 0 .. (len_k - len_q + j) ("bottom-right" causal).
    """
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        n_q, n_k = qs.stop - qs.start, ks.stop - ks.start
        allowed = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(
            q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1),  # [H, n, D]
            attn_mask=allowed, scale=1.0 / math.sqrt(q.shape[-1]),
        )  # [H, n_q, D]
        out[qs] = o.transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _paged_decode_partial_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr, lens_ptr, part_ptr, out_ptr,
        H, stride_table, stride_block, stride_tok, stride_mblock, stride_mhead, sm_scale,
        SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, INT8: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Online softmax of one (sequence, head) over its share of positions [0, len): (acc [D], m, l).
        PDL: kernels/pdl.py (everything it reads or writes comes after the wait)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        length = tl.load(lens_ptr + b)
        lo, hi = _split_share(0, length, split, SPLITS, TILE)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + bh * D + d).to(tl.float32) * sm_scale
        if INT8:  # uint8 tiles, one scale and zero per (position, head)
            acc, m, l = _paged_int8_softmax(q, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr, b, stride_table,
                                            lo, hi, h, stride_block, stride_tok, stride_mblock, stride_mhead, d,
                                            BLOCK_SIZE, TILE)
        else:
            m = tl.max(tl.full((TILE,), float("-inf"), tl.float32), axis=0)
            l = tl.sum(tl.zeros((TILE,), tl.float32), axis=0)
            acc = tl.zeros((D,), tl.float32)
            for s0 in tl.range(lo, hi, TILE):
                s, ok, block = _tile_blocks(table_ptr, b, stride_table, s0, hi, BLOCK_SIZE, TILE)
                offs = _tile_offsets(s, block, h, stride_block, stride_tok, d, BLOCK_SIZE)
                k = tl.load(k_ptr + offs, mask=ok[:, None], other=0).to(tl.float32)
                v = tl.load(v_ptr + offs, mask=ok[:, None], other=0).to(tl.float32)
                m, l, acc = _online_softmax_step(q, k, v, ok, m, l, acc)
        if SPLITS == 1:  # the whole context: normalise and write the output directly
            tl.store(out_ptr + bh * D + d, (acc / l).to(out_ptr.dtype.element_ty))
        else:
            _store_partial(part_ptr + (bh * SPLITS + split) * (D + 2), d, acc, m, l)

    @triton.jit
    def _rope_write_paged_kernel(
        qkv_ptr, cos_ptr, sin_ptr, logn_ptr, slot_ptr, q_out_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
        H, stride_qkv, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_LOGN: tl.constexpr, INT8: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One (row n, head h): rotate q and k with row n's cos/sin (fp32, as apply_rotary); store k, v at its slot
        (INT8: quantized, with their scales and zeros at [block, h, offset] of pool_meta's views)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        n = tl.program_id(0) // H
        h = tl.program_id(0) % H
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, HALF)
        hidden = H * D
        ko1, ko2, v1, v2 = _rope_head(qkv_ptr + n * stride_qkv + h * D, cos_ptr + n * D, sin_ptr + n * D,
                                      logn_ptr + n, q_out_ptr + (n * H + h) * D, hidden, HALF, HAS_LOGN)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        _store_kv_head(ko1, ko2, v1, v2, k_ptr, v_ptr, slot * hidden + h * D, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
                       _meta_offset(slot, h, H, BLOCK_SIZE), d, INT8)

    @triton.jit
    def _meta_offset(slot, h, H, BLOCK_SIZE: tl.constexpr):
        """Element offset of (slot, head h) in pool_meta's views ([blocks, H, block_size] of [blocks, H, 4, block_size])."""
        return (slot // BLOCK_SIZE) * (H * 4 * BLOCK_SIZE) + h * (4 * BLOCK_SIZE) + slot % BLOCK_SIZE

    @triton.jit
    def _quantize_write_paged_kernel(
        k_ptr, v_ptr, slot_ptr, kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, H, stride_k, stride_v, D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        """One (row n, head h): k, v quantized into the uint8 pools at row n's slot, as the rope-write kernel does."""
        n = tl.program_id(0) // H
        h = tl.program_id(0) % H
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, HALF)
        k = k_ptr + n * stride_k + h * D
        v = v_ptr + n * stride_v + h * D
        slot = tl.load(slot_ptr + n).to(tl.int64)
        dst = slot * H * D + h * D
        meta = _meta_offset(slot, h, H, BLOCK_SIZE)
        _quant_store(tl.load(k + d).to(tl.float32), tl.load(k + HALF + d).to(tl.float32), kq_ptr + dst,
                     ks_ptr + meta, kz_ptr + meta, d)
        _quant_store(tl.load(v + d).to(tl.float32), tl.load(v + HALF + d).to(tl.float32), vq_ptr + dst,
                     vs_ptr + meta, vz_ptr + meta, d)


# ----------------------------------------------------------------------------- launchers


def decode_launch_config(splits: int, int8: bool = False) -> tuple[int, int]:
    """(positions per loop iteration, warps per program) of the decode kernel, for fp16/bf16 or int8 pools.

    Measured on an H100, 32 layers of 32 heads x 128 (benchmarks/serving_gpu.py --tune-attention):
    one split (many sequences) wants small tiles and many resident programs: tile 16 / 2 warps
    ran 256 x 193 positions at 2.8 TB/s and 64 x 2101 at 3.0 TB/s (tile 64 / 4 warps: 2.1-2.2);
    with splits (few sequences) tile 64 / 4 warps was fastest (8 x 2101: 2.5 TB/s, tile 16: 1.3).
    int8, from sm_90 SASS (GPU timings pending): tile 16 / 2 warps and 32 / 4 take 128 registers (8 and
    4 programs per SM), 32 / 2 and 64 / 4 spill (255); with splits (few programs) 32 / 4 keeps
    4 warps per program and every program resident.
    """
    if int8:
        return (16, 2) if splits == 1 else (32, 4)
    return (16, 2) if splits == 1 else (64, 4)


def _meta_pointers(meta: Meta | None, k_pool: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four meta tensors for a kernel launch (checked: pool_meta's layout, the views [blocks, H, block_size]
    of one float32 tensor [blocks, H, 4, block_size], for uint8 pools), or the pool itself four times as
    unused pointers (fp16/bf16 pools)."""
    if meta is None:
        return (k_pool,) * 4
    blocks, block_size, H, _ = k_pool.shape
    want, strides = (blocks, H, block_size), (H * 4 * block_size, 4 * block_size, 1)
    for i, t in enumerate(meta):
        if (t.shape != want or t.dtype != torch.float32 or t.stride() != strides
                or t.data_ptr() != meta[0].data_ptr() + 4 * i * block_size):
            raise ValueError(f"int8 pool meta must be pool_meta's views: float32 {want} (the pool's [blocks, H, "
                             f"block_size]) with strides {strides}, the four interleaved per (block, head); got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if k_pool.dtype != torch.uint8:
        raise ValueError(f"meta was given, so the pools must be uint8, got {k_pool.dtype}")
    return meta


def paged_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: Meta | None, block_tables: torch.Tensor,
    context_lens: torch.Tensor, splits: int = 1, tile: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """q [B, H, D] over each sequence's first context_lens[b] pooled positions -> [B, H, D].

    meta: (k_scale, k_zero, v_scale, v_zero) of uint8 pools (see the reference), else None.
    block_tables [B, max_blocks] int32 and context_lens [B] int32 on q's device; `splits` programs
    share one (sequence, head) (a power of two; more for few long sequences).
    """
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    default_tile, default_warps = decode_launch_config(splits, meta is not None)
    tile, num_warps = tile or default_tile, num_warps or default_warps
    B, H, D = q.shape
    out = torch.empty_like(q)
    part = torch.empty(B * H, splits, D + 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    pdl = pdl_enabled(q.device)
    ks, kz, vs, vz = _meta_pointers(meta, k_pool)
    _paged_decode_partial_kernel[(B * H, splits)](
        q, k_pool, v_pool, ks, kz, vs, vz, block_tables, context_lens, part, out,
        H, block_tables.stride(0), k_pool.stride(0), k_pool.stride(1), ks.stride(0), ks.stride(1), 1.0 / math.sqrt(D),
        SPLITS=splits, D=D, BLOCK_SIZE=k_pool.shape[1], TILE=tile, INT8=meta is not None, PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl,
    )
    if splits > 1:
        _attention_combine_kernel[(B * H,)](part, out, SPLITS=splits, D=D, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def rope_write_paged(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None, slots: torch.Tensor,
    k_pool: torch.Tensor, v_pool: torch.Tensor, meta: Meta | None, num_heads: int,
) -> torch.Tensor:
    """qkv [N, 3 * H * D] -> rotated q [N, H, D]; k, v stored in the pools at `slots` [N] (int32 or int64),
    quantized into uint8 pools with their meta when meta is given (as the reference)."""
    N = qkv.shape[0]
    D = k_pool.shape[-1]
    q = torch.empty(N, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    pdl = pdl_enabled(qkv.device)
    _rope_write_paged_kernel[(N * num_heads,)](
        qkv, cos, sin, logn if logn is not None else cos, slots, q, k_pool, v_pool, *_meta_pointers(meta, k_pool),
        num_heads, qkv.stride(0), D=D, BLOCK_SIZE=k_pool.shape[1], HAS_LOGN=logn is not None, INT8=meta is not None,
        PDL=pdl, num_warps=1, launch_pdl=pdl,
    )
    return q


def quantize_write_paged(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, meta: Meta) -> None:
    """write_paged_reference into uint8 pools in one launch (the eager steps' store: ~12 torch kernels per
    tensor in the reference). k, v [N, H, D] with contiguous heads (rows may be strided); slots [N]."""
    if meta is None:
        raise ValueError("quantize_write_paged stores into uint8 pools: give their meta (k_scale, k_zero, ...)")
    N, H, D = k.shape
    k, v = (x if x.stride(2) == 1 and x.stride(1) == D else x.contiguous() for x in (k, v))
    _quantize_write_paged_kernel[(N * H,)](
        k, v, slots, k_pool, v_pool, *_meta_pointers(meta, k_pool), H, k.stride(0), v.stride(0), D=D,
        BLOCK_SIZE=k_pool.shape[1], num_warps=1,
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int],
    cu_q_dev: torch.Tensor | None = None, cu_k_dev: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed chunks (see the reference) by FlashAttention's varlen kernel (CUDA, fp16/bf16).

    cu_q_dev, cu_k_dev: the same offsets as int32 tensors on q's device (built once per step).
    """
    max_q = max(b - a for a, b in itertools.pairwise(cu_q))
    max_k = max(b - a for a, b in itertools.pairwise(cu_k))
    if cu_q_dev is None:
        cu_q_dev = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
    if cu_k_dev is None:
        cu_k_dev = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q_dev, cu_k_dev, max_q, max_k, 0.0, True, False, scale=1.0 / math.sqrt(q.shape[-1]))[0]
    return out  # [N, H, D]; FlashAttention aligns causal queries to the end of their keys


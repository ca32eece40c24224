"""Tile helpers of the paged decode-attention kernel (kernels/triton_paged.py): walking a sequence's
positions through its block table, and the int8 pool's online softmax (dequantization folded into
per-row terms, one running max / normaliser / accumulator per row slot)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_blocks(table_ptr, b, stride_table, s0, hi, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
    """Positions s = s0 .. s0 + TILE of sequence b (block table row b): (s, ok = s < hi, their blocks
    [TILE] int64; 0 where not ok)."""
    s = s0 + tl.arange(0, TILE)
    ok = s < hi
    return s, ok, tl.load(table_ptr + b * stride_table + s // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)

@triton.jit
def _tile_offsets(s, block, h, stride_block, stride_tok, d, BLOCK_SIZE: tl.constexpr):
    """Element offsets [TILE, D] of head h's keys/values at positions s in their blocks."""
    row = block * stride_block + (s % BLOCK_SIZE) * stride_tok + h * d.shape[0]  # [TILE]
    return row[:, None] + d[None, :]

@triton.jit
def _load_int8_tile(k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, s, ok, block, h, stride_block, stride_tok,
                    stride_mblock, stride_mhead, d, BLOCK_SIZE: tl.constexpr):
    """One tile of an int8 pool as loaded: uint8 keys and values [TILE, D] and their scales and zeros [TILE]
    (head-major meta: a block's positions of one head are contiguous); zeros where not ok."""
    offs = _tile_offsets(s, block, h, stride_block, stride_tok, d, BLOCK_SIZE)
    meta = block * stride_mblock + h * stride_mhead + s % BLOCK_SIZE  # [TILE]
    return (tl.load(k_ptr + offs, mask=ok[:, None], other=0), tl.load(v_ptr + offs, mask=ok[:, None], other=0),
            tl.load(ks_ptr + meta, mask=ok, other=0.0), tl.load(kz_ptr + meta, mask=ok, other=0.0),
            tl.load(vs_ptr + meta, mask=ok, other=0.0), tl.load(vz_ptr + meta, mask=ok, other=0.0))

@triton.jit
def _mul_u8(x, c, c_neg_magic):
    """c * x for uint8 x, exactly rounded (as c * float(x)), without a conversion instruction (I2F is quarter
    rate): x's bits in the low mantissa of 2^23 make the float32 2^23 + x, and one fused multiply-add
    c * (2^23 + x) + c_neg_magic with c_neg_magic = -c * 2^23 (exact) rounds c * x once. In SASS a byte
    permute and/or LOP3 and an FFMA per value (inline PTX prmt was worse: Triton repacks bytes for it)."""
    return tl.fma((x.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True), c, c_neg_magic)

@triton.jit
def _paged_int8_softmax(q, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr, b, stride_table, lo, hi, h,
                        stride_block, stride_tok, stride_mblock, stride_mhead, d, BLOCK_SIZE: tl.constexpr,
                        TILE: tl.constexpr):
    """Online softmax of query q [D] (scaled) over positions [lo, hi) of sequence b in an int8 pool:
    (acc [D], m, l) as triton_decode._online_softmax_step's. Rows are x = scale * (x_q - zero), folded into per-row terms:
    q.k = ks (q.k_q - kz sum(q)) and sum_t p_t v_t = sum_t (p_t vs_t) v_q,t - sum_t p_t vs_t vz_t.
    Each of the TILE row slots keeps its own running max, normaliser and [D] accumulator, merged once
    after the loop: no reduction across threads or warps in the loop but the q.k dot products.
    Software-pipelined: an iteration issues the next tile's loads (uint8 tiles are few registers) and the
    block numbers of the one after, then does this tile's math."""
    D: tl.constexpr = d.shape[0]
    q_sum = tl.sum(q, axis=0)  # the keys' zeros' share of each score
    q_neg_magic = q * -8388608.0  # see _mul_u8
    m = tl.full((TILE,), -1e30, tl.float32)  # finite: a slot with no position yet has alpha 1, p 0 (no nan)
    l = tl.zeros((TILE,), tl.float32)
    zsum = tl.zeros((TILE,), tl.float32)  # sum_t p_t vs_t vz_t per slot
    acc = tl.zeros((TILE, D), tl.float32)
    s, ok, block = _tile_blocks(table_ptr, b, stride_table, lo, hi, BLOCK_SIZE, TILE)
    kq, vq, ks, kz, vs, vz = _load_int8_tile(k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, s, ok, block, h,
                                             stride_block, stride_tok, stride_mblock, stride_mhead, d, BLOCK_SIZE)
    s1, ok1, block1 = _tile_blocks(table_ptr, b, stride_table, lo + TILE, hi, BLOCK_SIZE, TILE)
    for s0 in tl.range(lo, hi, TILE):
        kq1, vq1, ks1, kz1, vs1, vz1 = _load_int8_tile(k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, s1, ok1,
                                                       block1, h, stride_block, stride_tok, stride_mblock,
                                                       stride_mhead, d, BLOCK_SIZE)
        s2, ok2, block2 = _tile_blocks(table_ptr, b, stride_table, s0 + 2 * TILE, hi, BLOCK_SIZE, TILE)
        qk = tl.sum(_mul_u8(kq, q[None, :], q_neg_magic[None, :]), axis=1)  # [TILE]: q.k_q
        scores = tl.where(ok, ks * (qk - kz * q_sum), float("-inf"))
        m_new = tl.maximum(m, scores)  # [TILE]
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        l = l * alpha + p
        w = p * vs
        zsum = zsum * alpha + w * vz
        acc = acc * alpha[:, None] + _mul_u8(vq, w[:, None], (w * -8388608.0)[:, None])
        m = m_new
        ok, kq, vq, ks, kz, vs, vz = ok1, kq1, vq1, ks1, kz1, vs1, vz1
        s1, ok1, block1 = s2, ok2, block2
    top = tl.max(m, axis=0)
    r = tl.exp(m - top)  # [TILE]: each slot's share rescaled to the common max
    acc = tl.sum(acc * r[:, None], axis=0) - tl.sum(zsum * r, axis=0)
    return acc, tl.where(top > -1e30, top, float("-inf")), tl.sum(l * r, axis=0)

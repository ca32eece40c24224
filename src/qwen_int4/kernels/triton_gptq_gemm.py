"""Triton kernels for GPTQ weights and many rows of x: tensor-core GEMMs and a dequantizer.

Layout: kernels/gptq_layout.py. Oracle: `dequantize_reference` there.

* `_gemm_wx_kernel` (batched decode, up to triton_gptq.GEMM_MAX_ROWS rows): out^T = W x^T per
  [BLOCK_N, BLOCK_M] tile. The dequantized weights are the left operand, which Hopper's wgmma
  reads from registers (no shared-memory round trip). With fp16 x on CUDA (PAIRS) each slot pair
  of a unit's words is dequantized in packed fp16 by inline PTX (`_pair_weights`: 2 instructions
  per weight) into a [BLOCK_N, 2 WPU] tile of consecutive input rows, one tl.dot each, x read in
  its own order. Otherwise (bf16 x, the interpreter) one tl.dot per slot in float32
  dequantization, x gathered once into slot order (`slot_order`) so each slot's x tile is one
  contiguous, pipelined load.
* `_gemm_kernel` (x as the left operand): per unit, the unit's words unpacked to a [BLOCK_N, UNIT]
  tile in row order (a reshape and a permute: register shuffles) and one tl.dot. For group sizes
  whose units are too short for a slot's tl.dot (and the sweeps).
* `_dequant_kernel` (prefill): W [N, k] in nn.Linear's layout (packed row order) for a range
  of units, so cuBLAS computes x @ W^T; the launcher bounds the scratch by doing K in blocks.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from qwen_int4.kernels.gptq_layout import GPTQWeights
from qwen_int4.kernels.triton_gptq_gemv import _half2_bits

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of `_gemm_wx_kernel` (wx) or `_gemm_kernel`."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # K slices; their float32 partials are summed in order (deterministic)
    wx: bool = False  # `_gemm_wx_kernel`: weights as the left operand, x gathered in slot order
    pairs: bool = True  # wx with fp16 x on CUDA: packed-fp16 dequantization, one tl.dot per slot pair


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def default_gemm_config(m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """Launch parameters for x [m, K], from benchmarks/gptq_kernels.py --sweep on an H100 (c_attn,
    packed-fp16 pairs): the weights-left kernel with [BLOCK_N, BLOCK_M] tiles of [64, 16] up to 16
    rows (30 us at 16 rows), [64, 64] up to 64 (42 us) and [128, 128] with 8 warps above (42 us at
    128, 61 at 256). K slices (up to one per 1024 rows of K) for about eight programs per
    multiprocessor up to 16 rows, four up to 64; above, only where the tiles fill less than half
    of the multiprocessors."""
    sms = _multiprocessors(device)
    if m <= 16:
        cfg, programs = GemmConfig(16, 64, 4, 3, wx=True), 8 * sms
    elif m <= 64:
        cfg, programs = GemmConfig(64, 64, 4, 3, wx=True), 4 * sms
    else:
        cfg, programs = GemmConfig(128, 128, 8, 3, wx=True), sms
    tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    split = 1 if m > 64 and 2 * tiles >= sms else max(1, min(k // 1024, programs // tiles))
    return GemmConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, split, wx=True)


def gemm_beats_dequant(m: int, n: int, device: torch.device) -> bool:
    """Whether the fused GEMM (rather than dequantize + cuBLAS) should run x [m, K] @ W^T: always up to
    128 rows; up to 256 where its [128, 128] tiles cover every multiprocessor without K slices (H100,
    256 rows: c_attn 60 against 97 us, mlp.w1 61 against 88, but attn.c_proj 40 against 35 and
    mlp.c_proj 107 against 99); above 256 rows (prefill) cuBLAS."""
    if m <= 128:
        return True
    return m <= 256 and -(-n // 128) * -(-m // 128) >= _multiprocessors(device)


def _pair_dequant_asm(bits: int) -> str:
    """PTX: ($0, $1) = fp16 s (q - z) of the two values of a slot pair, slot p and slot H + p of word
    $2 (16 bits apart: gptq_layout.py), with $3 = half2 (1 + zero + 1024), $4 = half2 (s, s), $5 = the
    pair's shift (p bits): one shift and one LOP3 make fp16 1024 + q of both, then the exact
    subtraction and one rounding, as a dequantized fp16 weight (the GEMV's half2 trick)."""
    mask = "0x000F000F" if bits == 4 else "0x00FF00FF"
    return ("{\n.reg .b32 t;\nshr.u32 t, $2, $5;\n"
            f"lop3.b32 t, t, {mask}, 0x64006400, 0xEA;\n"
            "sub.f16x2 t, t, $3;\nmul.f16x2 t, t, $4;\nmov.b32 {$0, $1}, t;\n}")


if triton is not None:
    _PAIR_ASM_INT4 = tl.constexpr(_pair_dequant_asm(4))
    _PAIR_ASM_INT8 = tl.constexpr(_pair_dequant_asm(8))

    @triton.jit
    def _pair_weights(words, zz, ss, p: tl.constexpr, BITS: tl.constexpr):
        """fp16 W [BN, 2 WPU] of slot pair p of `words` [BN, WPU]: column 2w + h is slot h H + p of
        word w, i.e. input row p 2WPU + 2w + h of the unit; zz, ss [BN, 1] int32 half2 (see the asm)."""
        shift = tl.full(words.shape, p * BITS, tl.int32)
        if BITS == 4:
            lo, hi = tl.inline_asm_elementwise(_PAIR_ASM_INT4, "=h,=h,r,r,r,r", [words, zz, ss, shift],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_PAIR_ASM_INT8, "=h,=h,r,r,r,r", [words, zz, ss, shift],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        w = tl.join(lo, hi)  # [BN, WPU, 2]
        return tl.reshape(w, (words.shape[0], 2 * words.shape[1]))

    @triton.jit
    def _unit_words(qweight_ptr, scales_ptr, zeros_ptr, cols, n_ok, u, K_WORDS, GROUPS,
                    WPU: tl.constexpr, UNITS_PER_GROUP: tl.constexpr):
        """Unit u's words [BN, WPU] of rows `cols`, with their scale and 1 + 2^23 + zero [BN, 1]."""
        offs_w = tl.arange(0, WPU)
        words = tl.load(qweight_ptr + cols[:, None] * K_WORDS + u * WPU + offs_w[None, :], mask=n_ok[:, None], other=0)
        g = u // UNITS_PER_GROUP
        s = tl.load(scales_ptr + cols * GROUPS + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        z = tl.load(zeros_ptr + cols * GROUPS + g, mask=n_ok, other=0).to(tl.float32)[:, None] + (1.0 + 8388608.0)
        return words, s, z

    @triton.jit
    def _unit_tile(qweight_ptr, scales_ptr, zeros_ptr, cols, n_ok, u, K_WORDS, GROUPS,
                   BITS: tl.constexpr, UNIT: tl.constexpr, UNITS_PER_GROUP: tl.constexpr):
        """W[cols, unit u's UNIT packed rows] = s (q - z), exact in float32, [BN, UNIT]."""
        P: tl.constexpr = 32 // BITS
        WPU: tl.constexpr = UNIT // P
        words, s, z = _unit_words(qweight_ptr, scales_ptr, zeros_ptr, cols, n_ok, u, K_WORDS, GROUPS, WPU, UNITS_PER_GROUP)
        shifts = tl.arange(0, P) * BITS  # slot j at bits j * BITS
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BN, P, WPU]: packed row j*WPU + w
        # q - z without an int->float conversion (a quarter-rate instruction): the bits of q under
        # the exponent of 2^23 read as the float 2^23 + q exactly
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
        w = (qf - z[:, :, None]) * s[:, :, None]  # [BN, P, WPU], slot j = h * P/2 + p
        w = tl.reshape(w, (cols.shape[0], 2, P // 2, WPU))  # [BN, h, p, w]
        return tl.reshape(tl.permute(w, (0, 2, 3, 1)), (cols.shape[0], UNIT))  # row p * 2 WPU + 2 w + h

    @triton.jit
    def _slot_weights(words, s, z, J: tl.constexpr, BITS: tl.constexpr):
        """Slot J of `words` dequantized as in _unit_tile: s (q - z) in float32 (z carries 1 + 2^23)."""
        q = (words >> (BITS * J)) & ((1 << BITS) - 1)
        return ((q | 0x4B000000).to(tl.float32, bitcast=True) - z) * s

    @triton.jit
    def _gemm_wx_kernel(
        xs_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
        M, N, K_WORDS, UNITS, GROUPS, stride_xm, stride_om, units_per_split,
        BITS: tl.constexpr, UNIT: tl.constexpr, UNITS_PER_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
        PAIRS: tl.constexpr,
    ):
        """out[m, n] for one tile, as out^T [BLOCK_N, BLOCK_M] = W[cols] xs[rows]^T: the dequantized
        weights are the left operand (kept in registers by the tensor-core instruction), and xs is x
        in slot order (`slot_order`: slot j of unit u at columns u UNIT + j WPU ..), so each slot's
        [BLOCK_M, WPU] tile of it is one contiguous load and no register shuffles are needed.
        PAIRS (fp16 x on CUDA): one tl.dot per slot pair instead, its [BN, 2 WPU] weights dequantized
        in packed fp16 (`_pair_weights`); a pair covers 2 WPU consecutive input rows, so xs is x in
        packed row order (no slot gather)."""
        P: tl.constexpr = 32 // BITS
        WPU: tl.constexpr = UNIT // P
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < N
        offs_w = tl.arange(0, WPU)
        offs_2w = tl.arange(0, 2 * WPU)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        u_lo = tl.program_id(2) * units_per_split
        for u in tl.range(u_lo, tl.minimum(u_lo + units_per_split, UNITS)):
            words, s, z = _unit_words(qweight_ptr, scales_ptr, zeros_ptr, cols, n_ok, u, K_WORDS, GROUPS,
                                      WPU, UNITS_PER_GROUP)
            if PAIRS:
                zz = _half2_bits(z - 8388608.0 + 1024.0)  # 1024 + 1 + stored zero
                ss = _half2_bits(s)
                for p in tl.static_range(P // 2):
                    xt = tl.load(xs_ptr + offs_m[None, :] * stride_xm + (u * UNIT + p * 2 * WPU + offs_2w)[:, None],
                                 mask=m_ok[None, :], other=0.0)  # [2 WPU, BM]
                    acc = tl.dot(_pair_weights(words, zz, ss, p, BITS), xt, acc)
            for j in tl.static_range(0 if PAIRS else P):
                xt = tl.load(xs_ptr + offs_m[None, :] * stride_xm + (u * UNIT + j * WPU + offs_w)[:, None],
                             mask=m_ok[None, :], other=0.0)  # [WPU, BM]
                w = _slot_weights(words, s, z, j, BITS)  # [BN, WPU]
                acc = tl.dot(w.to(xt.dtype), xt, acc)
        if HAS_BIAS and not PARTIAL:
            acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + tl.program_id(2) * M * N + offs_m[None, :] * stride_om + cols[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])

    @triton.jit
    def _gemm_kernel(
        x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr,
        M, N, K_WORDS, UNITS, GROUPS, stride_xm, stride_om, units_per_split,
        BITS: tl.constexpr, UNIT: tl.constexpr, UNITS_PER_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
        PARTIAL: tl.constexpr,
    ):
        """out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for one [BLOCK_M, BLOCK_N] tile, over the units
        of K slice program_id(2); PARTIAL: store float32 to out[slice] (the launcher adds the slices)."""
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u_lo = tl.program_id(2) * units_per_split
        for u in tl.range(u_lo, tl.minimum(u_lo + units_per_split, UNITS)):
            k = u * UNIT + tl.arange(0, UNIT)
            if HAS_PERM:
                k = tl.load(perm_ptr + k)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
            w = _unit_tile(qweight_ptr, scales_ptr, zeros_ptr, cols, n_ok, u, K_WORDS, GROUPS,
                           BITS, UNIT, UNITS_PER_GROUP)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)  # [BM, UNIT] x [UNIT, BN]
        if HAS_BIAS and not PARTIAL:
            acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + tl.program_id(2) * M * N + offs_m[:, None] * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dequant_kernel(
        qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K_WORDS, GROUPS, u_lo, stride_on,
        BITS: tl.constexpr, UNIT: tl.constexpr, UNITS_PER_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """out[n, UNIT i + r] = W[n, packed row UNIT (u_lo + i) + r] for program (n block, i)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < N
        i = tl.program_id(1)
        w = _unit_tile(qweight_ptr, scales_ptr, zeros_ptr, cols, n_ok, u_lo + i, K_WORDS, GROUPS, BITS, UNIT, UNITS_PER_GROUP)
        offs_k = i * UNIT + tl.arange(0, UNIT)
        out = out_ptr + cols[:, None] * stride_on + offs_k[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def _stand_in(t: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """Triton needs a tensor for every pointer argument; flags say when it is not read."""
    return t if t is not None else other


@functools.lru_cache(maxsize=64)
def _slot_order(k: int, unit: int, bits: int, device: torch.device) -> torch.Tensor:
    """[k] packed-row index of each column of x in slot order: column u UNIT + j WPU + w holds packed
    row u UNIT + p 2WPU + 2w + h, the row that slot j = h P/2 + p of word w of unit u multiplies."""
    values, wpu = 32 // bits, unit * bits // 32
    j = torch.arange(values).view(values, 1)
    w = torch.arange(wpu).view(1, wpu)
    rows = (j % (values // 2)) * 2 * wpu + 2 * w + j // (values // 2)  # [P, WPU]
    return (torch.arange(0, k, unit).view(-1, 1) + rows.reshape(1, -1)).reshape(-1).to(device)


def slot_order(w: GPTQWeights, device: torch.device) -> torch.Tensor:
    """[K] index of x's column for each column of x in slot order (act-order's permutation included)."""
    order = _slot_order(w.in_features, w.unit, w.bits, device)
    return w.perm.index_select(0, order) if w.perm is not None else order


def _use_pairs(x: torch.Tensor, w: GPTQWeights, cfg: GemmConfig) -> bool:
    """The packed-fp16 pair path: inline PTX (CUDA, not the interpreter), fp16 x, K = 2 WPU >= 16."""
    return (cfg.pairs and x.dtype == torch.float16 and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and w.unit * w.bits // 16 >= 16)


def _launch_wx(x: torch.Tensor, w: GPTQWeights, cfg: GemmConfig, out: torch.Tensor, per_split: int, splits: int) -> None:
    m, n = x.shape[0], w.out_features
    pairs = _use_pairs(x, w, cfg)
    if pairs:  # [M, K] in packed row order
        xs = x.index_select(1, w.perm) if w.perm is not None else x.contiguous()
    else:  # [M, K] in slot order
        xs = x.index_select(1, slot_order(w, x.device))
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), splits)
    _gemm_wx_kernel[grid](
        xs, w.qweight, w.scales, w.zeros, _stand_in(w.bias, w.scales), out,
        m, n, w.qweight.shape[1], w.in_features // w.unit, w.scales.shape[1], xs.stride(0), n, per_split,
        BITS=w.bits, UNIT=w.unit, UNITS_PER_GROUP=w.group_size // w.unit, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_BIAS=w.bias is not None, PARTIAL=splits > 1, PAIRS=pairs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def gptq_gemm(x: torch.Tensor, w: GPTQWeights, config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16) -> x @ W^T + bias [M, N] in x's dtype, on tensor cores."""
    m, k = x.shape
    n = w.out_features
    if k != w.in_features:
        raise ValueError(f"x has {k} features but the GPTQ weight expects {w.in_features}")
    cfg = config or default_gemm_config(m, n, k, x.device)
    units = k // w.unit
    per_split = -(-units // cfg.split_k)
    splits = -(-units // per_split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if splits == 1 else \
        torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    slot_dots = w.unit * w.bits // 32 >= 16  # a slot's tl.dot needs K = words per unit >= 16
    if cfg.wx and slot_dots:
        _launch_wx(x, w, cfg, out, per_split, splits)
    else:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), splits)
        _gemm_kernel[grid](
            x, w.qweight, w.scales, w.zeros, _stand_in(w.perm, w.scales), _stand_in(w.bias, w.scales), out,
            m, n, w.qweight.shape[1], units, w.scales.shape[1], x.stride(0), n, per_split,
            BITS=w.bits, UNIT=w.unit, UNITS_PER_GROUP=w.group_size // w.unit, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, HAS_PERM=w.perm is not None, HAS_BIAS=w.bias is not None, PARTIAL=splits > 1,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if splits == 1:
        return out
    y = out.sum(0)  # [M, N] float32, slices added in a fixed order
    if w.bias is not None:
        y += w.bias.float()
    return y.to(x.dtype)


def gptq_dequantize(w: GPTQWeights, dtype: torch.dtype = torch.float16, units: slice | None = None) -> torch.Tensor:
    """W [N, k] in `dtype` for the units (w.unit input rows each) `units` (default: all), in PACKED
    row order (act-order: column r is input row perm[r]); nn.Linear's layout, so x[:, perm] @ W^T."""
    count = w.in_features // w.unit
    lo, hi, _ = (units or slice(0, count)).indices(count)
    n = w.out_features
    out = torch.empty(n, (hi - lo) * w.unit, dtype=dtype, device=w.qweight.device)
    block_n = 32
    _dequant_kernel[(triton.cdiv(n, block_n), hi - lo)](
        w.qweight, w.scales, w.zeros, out, n, w.qweight.shape[1], w.scales.shape[1], lo, out.stride(0),
        BITS=w.bits, UNIT=w.unit, UNITS_PER_GROUP=w.group_size // w.unit, BLOCK_N=block_n, num_warps=4,
    )
    return out

"""Triton kernels for GPTQ int4 linears (CUDA fast path; CPU-checkable under TRITON_INTERPRET=1).

Reference and oracle: `dequantize_gptq` (quant/gptq.py), W[k, n] = s[g, n] * (q[k, n] - z[g, n]).

Layout (`prepare_gptq`, once at load): the checkpoint's qweight [K/8, N] (8 rows per word)
becomes "N-packed" words [K, N/8]: word c of row k holds columns 8c..8c+7, nibble j is column
8c + j, as in the checkpoint's qzeros [G, N/8]. Scales become [G, 8, N/8] (scales[g, j, c] is
column 8c + j), so one nibble's scales are contiguous. Act-order rows are sorted by group, and
the kernels read x (or write W) through that permutation.

* `_gemv_kernel` (one row, decode). A program owns BLOCK_C words (8 * BLOCK_C columns) of one
  K slice, walks it 8 * BLOCK_K rows (a chunk, inside one group) at a time, and keeps one
  accumulator per nibble j, so every shift is a constant. No int->float conversion: the nibble
  is rotated to bits 16..19 (or 12..15) of a word OR-ed with the exponent of 1.0, which reads
  as the float f = 1 + q/128 (or 1 + q/2048). Per chunk, sum_k x_k s (q_k - z) =
  s UNIT sum_k x_k f_k - s (UNIT + z) sum_k x_k with UNIT = 128 (2048): one FMA per weight,
  the scale and zero once per chunk. The next chunk's loads are issued before this chunk is
  computed (a software pipeline in registers; left alone, ptxas issues a chunk's loads in a few
  dependent waves, and a program waits on DRAM several times per chunk).
* `_gemm_kernel` (2..16 rows, batched decode): one tl.dot per nibble on (1024 + q) - (1024 + z)
  read as fp16 (exact), on tensor cores.
* `_dequant_kernel` (prefill): W [K, N] in the activation dtype; cuBLAS then computes x @ W.

Split-K: the K slices of a column tile store fp32 partials; the last program of the tile (an
atomic counter tells) adds them in slice order, so results are deterministic, and resets the
counter for the next call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qwen_int4.kernels.registry import GPTQKernel
from qwen_int4.quant.gptq import act_order_perm, pack_codes_u8, unpack_codes_u8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: `unavailable_reason` says so
    triton = None

FUSED_MAX_ROWS = 16  # rows of x up to which the fused kernels beat dequantize + cuBLAS
ONE_ROW_KERNEL = "gemv"  # one row of x: "gemv" (CUDA cores) or "gemm" (tensor cores, 15 rows of padding)
# most weights dequantized at once for many rows (prefill): above it, column blocks bound the
# scratch memory. Blocks cost time (2048-token TTFT on H100: 90 ms with 2^24, 72 ms unbounded)
# and did not lower the 2048-token peak (set by the model's attention temporaries), so unbounded.
DEQUANT_SCRATCH = 1 << 40


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why these kernels cannot run on `device`, or None when they can."""
    if triton is None:
        return "the triton package is not installed"
    if device.type != "cuda" and not _interpreting():
        return f"the Triton GPTQ kernels need a CUDA device, got {device.type} (TRITON_INTERPRET=1 runs them on CPU)"
    return None


def check_gptq_shapes(bits: int, group_size: int, in_features: int, out_features: int) -> tuple[bool, str]:
    """(ok, reason): whether these kernels implement a GPTQ linear of this configuration."""
    gs = in_features if group_size == -1 else group_size
    if bits != 4:
        return False, f"the Triton GPTQ kernels implement 4-bit weights only, got bits={bits}"
    if gs % 16 or in_features % gs:
        return False, f"the Triton GPTQ kernels need a group size that is a multiple of 16 and divides in_features, got {gs} for {in_features}"
    if out_features % 8:
        return False, f"out_features must be a multiple of 8, got {out_features}"
    return True, ""


@dataclass
class GPTQWeights:
    """One GPTQ int4 linear in the kernels' layout (see the module docstring).

    qweight int32 [K, N/8]; qzeros int32 [G, N/8] (z - 1, as stored); scales [G, 8, N/8];
    perm int32 [K] or None: packed row r holds input row perm[r].
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    bias: torch.Tensor | None
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1] * 8


def to_npacked(qweight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Checkpoint qweight [K/8, N] -> N-packed words [K, N/8], rows in `perm` order if given."""
    codes = unpack_codes_u8(qweight.t().contiguous(), 4).t()  # [K, N] uint8
    if perm is not None:
        codes = codes.index_select(0, perm)
    return pack_codes_u8(codes, 4)  # [K, N/8]


def from_npacked(words: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `to_npacked`: N-packed words [K, N/8] -> checkpoint qweight [K/8, N], bit for bit."""
    codes = unpack_codes_u8(words, 4)  # [K, N] uint8, packed row order
    if perm is not None:
        codes = codes.index_select(0, torch.argsort(perm))  # back to input row order
    return pack_codes_u8(codes.t().contiguous(), 4).t().contiguous()


def permute_scales(scales: torch.Tensor) -> torch.Tensor:
    """Checkpoint scales [G, N] -> [G, 8, N/8]: entry [g, j, c] is column 8c + j."""
    groups, n = scales.shape
    return scales.view(groups, n // 8, 8).transpose(1, 2).contiguous()


def prepare_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> GPTQWeights:
    """Repack checkpoint tensors (qweight [K/8, N], qzeros [G, N/8], scales [G, N], g_idx [K]) once.

    Raises ValueError when the configuration is not supported or g_idx is not an act-order of
    groups of `group_size` rows.
    """
    k_in, n_out = qweight.shape[0] * 8, qweight.shape[1]
    gs = k_in if group_size == -1 else group_size
    ok, reason = check_gptq_shapes(4, gs, k_in, n_out)
    if not ok:
        raise ValueError(reason)
    perm = act_order_perm(g_idx.to(qweight.device), gs)
    words = to_npacked(qweight, perm)
    perm = perm.to(torch.int32) if perm is not None else None
    return GPTQWeights(words, qzeros.contiguous(), permute_scales(scales), perm, bias, gs)


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _f(words, J: tl.constexpr):
        """Nibble J of uint32 words as the float 1 + q/128 (J even) or 1 + q/2048 (J odd)."""
        POS: tl.constexpr = 16 - 4 * (J % 2)  # the nibble goes to bits POS..POS+3
        ROT: tl.constexpr = (4 * J - POS) % 32  # nibbles (4,3), (6,5), (0,7), (2,1) share a rotation
        if ROT == 0:
            r = words
        else:
            r = (words >> ROT) | (words << (32 - ROT))  # one funnel shift
        return ((r & (0xF << POS)) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x, words):
        """a_j [BK, BC] += x[:, None] * f_j(words) for the 8 nibbles."""
        w = words.to(tl.uint32, bitcast=True)
        xc = x.to(tl.float32)[:, None]
        return (a0 + xc * _f(w, 0), a1 + xc * _f(w, 1), a2 + xc * _f(w, 2), a3 + xc * _f(w, 3),
                a4 + xc * _f(w, 4), a5 + xc * _f(w, 5), a6 + xc * _f(w, 6), a7 + xc * _f(w, 7))

    @triton.jit
    def _fold(total, acc, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W: tl.constexpr, J: tl.constexpr):
        """total [BK, BC] += s UNIT acc - s (UNIT + z) xs: one chunk of column 8c + J, per thread."""
        UNIT: tl.constexpr = 128.0 if J % 2 == 0 else 2048.0
        s = tl.load(s_ptr + J * STRIDE_W + offs_c, mask=c_ok, other=0.0).to(tl.float32)  # [BC]
        z = (((zword >> (4 * J)) & 0xF) + 1).to(tl.float32)
        return total + acc * (s * UNIT)[None, :] - xs[:, None] * (s * (UNIT + z))[None, :]

    @triton.jit
    def _load_chunk(w, SUB: tl.constexpr, mask):
        """The 8 sub-tiles [BK, BC] of one chunk of words, starting at pointers w."""
        return (tl.load(w, mask=mask, other=0), tl.load(w + SUB, mask=mask, other=0),
                tl.load(w + 2 * SUB, mask=mask, other=0), tl.load(w + 3 * SUB, mask=mask, other=0),
                tl.load(w + 4 * SUB, mask=mask, other=0), tl.load(w + 5 * SUB, mask=mask, other=0),
                tl.load(w + 6 * SUB, mask=mask, other=0), tl.load(w + 7 * SUB, mask=mask, other=0))

    @triton.jit
    def _load_x(x_ptr, perm_ptr, k, ok, BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr):
        """x at the 8 sub-tiles' packed rows k + i * BLOCK_K (through perm for act-order), [BK] each."""
        if HAS_PERM:
            p = perm_ptr + k
            return (tl.load(x_ptr + tl.load(p, mask=ok, other=0), mask=ok, other=0.0),
                    tl.load(x_ptr + tl.load(p + BLOCK_K, mask=ok, other=0), mask=ok, other=0.0),
                    tl.load(x_ptr + tl.load(p + 2 * BLOCK_K, mask=ok, other=0), mask=ok, other=0.0),
                    tl.load(x_ptr + tl.load(p + 3 * BLOCK_K, mask=ok, other=0), mask=ok, other=0.0),
                    tl.load(x_ptr + tl.load(p + 4 * BLOCK_K, mask=ok, other=0), mask=ok, other=0.0),
                    tl.load(x_ptr + tl.load(p + 5 * BLOCK_K, mask=ok, other=0), mask=ok, other=0.0),
                    tl.load(x_ptr + tl.load(p + 6 * BLOCK_K, mask=ok, other=0), mask=ok, other=0.0),
                    tl.load(x_ptr + tl.load(p + 7 * BLOCK_K, mask=ok, other=0), mask=ok, other=0.0))
        p = x_ptr + k
        return (tl.load(p, mask=ok, other=0.0), tl.load(p + BLOCK_K, mask=ok, other=0.0),
                tl.load(p + 2 * BLOCK_K, mask=ok, other=0.0), tl.load(p + 3 * BLOCK_K, mask=ok, other=0.0),
                tl.load(p + 4 * BLOCK_K, mask=ok, other=0.0), tl.load(p + 5 * BLOCK_K, mask=ok, other=0.0),
                tl.load(p + 6 * BLOCK_K, mask=ok, other=0.0), tl.load(p + 7 * BLOCK_K, mask=ok, other=0.0))

    @triton.jit
    def _emit(y, offs_m, m_ok, cols, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, ws_row, N,
              HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
        """Store y [BM, BC] (columns `cols`): a partial into the fp32 workspace row, or the output."""
        ok = m_ok[:, None] & c_ok[None, :]
        if PARTIAL:
            tl.store(ws_ptr + ws_row * N + offs_m[:, None] * N + cols[None, :], y, mask=ok)
        else:
            if HAS_BIAS:
                y += tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _reduce(offs_m, m_ok, cols, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, n_splits, M, N,
                HAS_BIAS: tl.constexpr):
        """out[m, cols] = sum over slices s = 0.. of the workspace partials (+ bias), in order."""
        ok = m_ok[:, None] & c_ok[None, :]
        y = tl.zeros((offs_m.shape[0], cols.shape[0]), dtype=tl.float32)
        for s in range(n_splits):
            y += tl.load(ws_ptr + s * M * N + offs_m[:, None] * N + cols[None, :], mask=ok, other=0.0,
                         cache_modifier=".cg")
        _emit(y, offs_m, m_ok, cols, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, 0, N, HAS_BIAS, False)

    @triton.jit
    def _last_slice(cnt_ptr, tile, n_splits):
        """Count this slice of a column tile done; True for the last one (which resets the count)."""
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")  # orders the partial stores before it
        last = done == n_splits - 1
        if last:
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
        return last

    @triton.jit
    def _gemv_kernel(
        x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
        chunks, chunks_per_split, n_splits,
        STRIDE_W: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """out[N] = x[K] @ W[K, N] (+ bias): this program's BLOCK_C words over chunks [lo, hi)."""
        CHUNK: tl.constexpr = 8 * BLOCK_K  # rows per step, inside one group
        SUB: tl.constexpr = BLOCK_K * STRIDE_W  # words between the chunk's 8 sub-tiles
        N: tl.constexpr = 8 * STRIDE_W
        pid_c = tl.program_id(0)
        pid_s = tl.program_id(1)
        lo = pid_s * chunks_per_split
        hi = tl.minimum(lo + chunks_per_split, chunks)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # word columns [BC]
        c_ok = offs_c < STRIDE_W
        rows = tl.arange(0, BLOCK_K)
        w_base = qweight_ptr + rows[:, None] * STRIDE_W + offs_c[None, :]  # [BK, BC]
        wmask = c_ok[None, :]
        t0 = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        t1, t2, t3, t4, t5, t6, t7 = t0, t0, t0, t0, t0, t0, t0
        # software pipeline in registers: chunk i+1 is loaded while chunk i is computed (ptxas
        # would otherwise issue a chunk's loads in a few dependent waves, each a DRAM latency)
        k_end = hi * CHUNK  # masks below are False past the slice: no memory is touched
        k = lo * CHUNK + rows
        w0, w1, w2, w3, w4, w5, w6, w7 = _load_chunk(w_base + lo * CHUNK * STRIDE_W, SUB, wmask & (k < k_end)[:, None])
        x0, x1, x2, x3, x4, x5, x6, x7 = _load_x(x_ptr, perm_ptr, k, k < k_end, BLOCK_K, HAS_PERM)
        for chunk in tl.range(lo, hi):
            k0 = chunk * CHUNK
            k = k0 + CHUNK + rows  # the next chunk's first sub-tile
            n0, n1, n2, n3, n4, n5, n6, n7 = _load_chunk(w_base + (k0 + CHUNK) * STRIDE_W, SUB, wmask & (k < k_end)[:, None])
            y0, y1, y2, y3, y4, y5, y6, y7 = _load_x(x_ptr, perm_ptr, k, k < k_end, BLOCK_K, HAS_PERM)
            a0 = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
            a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x0, w0)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x1, w1)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x2, w2)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x3, w3)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x4, w4)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x5, w5)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x6, w6)
            a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x7, w7)
            xs = (x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32)
                  + x4.to(tl.float32) + x5.to(tl.float32) + x6.to(tl.float32) + x7.to(tl.float32))
            g = k0 // GROUP
            zword = tl.load(qzeros_ptr + g * STRIDE_W + offs_c, mask=c_ok, other=0)
            s_ptr = scales_ptr + g * N  # scales[g] is [8, N/8]
            t0 = _fold(t0, a0, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 0)
            t1 = _fold(t1, a1, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 1)
            t2 = _fold(t2, a2, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 2)
            t3 = _fold(t3, a3, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 3)
            t4 = _fold(t4, a4, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 4)
            t5 = _fold(t5, a5, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 5)
            t6 = _fold(t6, a6, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 6)
            t7 = _fold(t7, a7, xs, s_ptr, zword, offs_c, c_ok, STRIDE_W, 7)
            w0, w1, w2, w3, w4, w5, w6, w7 = n0, n1, n2, n3, n4, n5, n6, n7
            x0, x1, x2, x3, x4, x5, x6, x7 = y0, y1, y2, y3, y4, y5, y6, y7
        m0 = tl.arange(0, 1)
        m_ok = m0 < 1
        cols = offs_c * 8
        split = n_splits > 1
        # one row of output: y_j [1, BC] at columns 8c + j
        _emit(tl.sum(t0, axis=0)[None, :], m0, m_ok, cols, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        _emit(tl.sum(t1, axis=0)[None, :], m0, m_ok, cols + 1, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        _emit(tl.sum(t2, axis=0)[None, :], m0, m_ok, cols + 2, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        _emit(tl.sum(t3, axis=0)[None, :], m0, m_ok, cols + 3, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        _emit(tl.sum(t4, axis=0)[None, :], m0, m_ok, cols + 4, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        _emit(tl.sum(t5, axis=0)[None, :], m0, m_ok, cols + 5, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        _emit(tl.sum(t6, axis=0)[None, :], m0, m_ok, cols + 6, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        _emit(tl.sum(t7, axis=0)[None, :], m0, m_ok, cols + 7, c_ok, out_ptr, 0, bias_ptr, ws_ptr, pid_s, N, HAS_BIAS, split)
        if split:  # noqa: SIM102 - Triton's `and` does not short-circuit: the atomic must not run
            if _last_slice(cnt_ptr, pid_c, n_splits):
                offs_n = pid_c * BLOCK_C * 8 + tl.arange(0, BLOCK_C * 8)
                _reduce(m0, m_ok, offs_n, offs_n < N, out_ptr, 0, bias_ptr, ws_ptr, n_splits, 1, N, HAS_BIAS)

    @triton.jit
    def _dot_nibble(acc, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, J: tl.constexpr):
        """acc [BM, BC] += x [BM, BK] @ (s * (q - z)) for column 8c + J; words int32 [BK, BC]."""
        q16 = (((words >> (4 * J)) & 0xF) | 0x6400).to(tl.int16)  # fp16 bits of 1024 + q
        zero = (((zword >> (4 * J)) & 0xF) + 1025).to(tl.float16)  # 1024 + z
        w = q16.to(tl.float16, bitcast=True) - zero[None, :]  # q - z, exact
        s = tl.load(s_ptr + J * STRIDE_W + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        return acc + tl.dot(x, w.to(x.dtype)) * s[None, :]

    @triton.jit
    def _gemm_kernel(
        x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, STRIDE_W, K, stride_xm, stride_om, group_size, k_per_split, n_splits,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """out[M, N] = x[M, K] @ W[K, N] (+ bias) on tensor cores, this program's K slice.

        One tl.dot per nibble j (columns 8c + j): every shift is a constant and the dequantized
        [BK, BC] tiles need no reshape.
        """
        pid_c = tl.program_id(0)
        pid_k = tl.program_id(1)
        N = 8 * STRIDE_W
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < STRIDE_W
        rows = tl.arange(0, BLOCK_K)
        a0 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K):
            g = k0 // group_size  # a tile never straddles groups: BLOCK_K divides group_size
            k = k0 + rows
            words = tl.load(qweight_ptr + k[:, None] * STRIDE_W + offs_c[None, :], mask=c_ok[None, :], other=0)
            zword = tl.load(qzeros_ptr + g * STRIDE_W + offs_c, mask=c_ok, other=0)
            if HAS_PERM:
                k = tl.load(perm_ptr + k)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)  # [BM, BK]
            s_ptr = scales_ptr + g * N
            a0 = _dot_nibble(a0, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 0)
            a1 = _dot_nibble(a1, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 1)
            a2 = _dot_nibble(a2, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 2)
            a3 = _dot_nibble(a3, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 3)
            a4 = _dot_nibble(a4, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 4)
            a5 = _dot_nibble(a5, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 5)
            a6 = _dot_nibble(a6, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 6)
            a7 = _dot_nibble(a7, x, words, zword, s_ptr, offs_c, c_ok, STRIDE_W, 7)
        split = n_splits > 1
        cols = offs_c * 8
        _emit(a0, offs_m, m_ok, cols, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        _emit(a1, offs_m, m_ok, cols + 1, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        _emit(a2, offs_m, m_ok, cols + 2, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        _emit(a3, offs_m, m_ok, cols + 3, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        _emit(a4, offs_m, m_ok, cols + 4, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        _emit(a5, offs_m, m_ok, cols + 5, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        _emit(a6, offs_m, m_ok, cols + 6, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        _emit(a7, offs_m, m_ok, cols + 7, c_ok, out_ptr, stride_om, bias_ptr, ws_ptr, pid_k * M, N, HAS_BIAS, split)
        if split:
            tile = pid_c + tl.program_id(2) * tl.num_programs(0)
            if _last_slice(cnt_ptr, tile, n_splits):
                offs_n = pid_c * BLOCK_C * 8 + tl.arange(0, BLOCK_C * 8)
                _reduce(offs_m, m_ok, offs_n, offs_n < N, out_ptr, stride_om, bias_ptr, ws_ptr, n_splits, M, N, HAS_BIAS)

    @triton.jit
    def _dequant_kernel(
        qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, out_ptr, STRIDE_W, group_size, c_lo, c_hi,
        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr,
    ):
        """out[k, n - 8 c_lo] = s[g, n] * (q[k, n] - z[g, n]) for word columns [c_lo, c_hi): fp32, rounded once."""
        N = 8 * STRIDE_W
        out_n = 8 * (c_hi - c_lo)  # out's row length
        offs_c = c_lo + tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < c_hi
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        j = tl.arange(0, 8)
        g = (tl.program_id(1) * BLOCK_K) // group_size
        words = tl.load(qweight_ptr + k[:, None] * STRIDE_W + offs_c[None, :], mask=c_ok[None, :], other=0)
        zword = tl.load(qzeros_ptr + g * STRIDE_W + offs_c, mask=c_ok, other=0)
        zero = ((zword[:, None] >> (4 * j)[None, :]) & 0xF) + 1  # [BC, 8]
        scale = tl.load(scales_ptr + g * N + j[None, :] * STRIDE_W + offs_c[:, None], mask=c_ok[:, None], other=0.0)
        q = (words[:, :, None] >> (4 * j)[None, None, :]) & 0xF  # [BK, BC, 8]
        w = ((q - zero[None, :, :]).to(tl.float32) * scale.to(tl.float32)[None, :, :]).to(out_ptr.dtype.element_ty)
        if HAS_PERM:
            k = tl.load(perm_ptr + k)  # each row goes back to its input position
        cols = (offs_c - c_lo)[:, None] * 8 + j[None, :]  # [BC, 8] in out
        tl.store(out_ptr + k[:, None, None] * out_n + cols[None, :, :], w, mask=c_ok[None, :, None])


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of `_gemv_kernel` (one row of x)."""

    block_c: int = 32  # words per program: 8 * block_c output columns
    block_k: int = 16  # rows per sub-tile; a chunk is 8 sub-tiles and must divide the group size
    split_k: int = 1  # K slices (their partials are added by the last one)
    num_warps: int = 4


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of `_gemm_kernel` (2..16 rows of x)."""

    block_c: int = 32  # words per program (8 * block_c columns); tl.dot needs >= 16
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    block_m: int = 16


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _programs_target(device: torch.device) -> int:
    """About three programs per multiprocessor."""
    if device.type == "cuda":
        return 3 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def default_gemv_config(n: int, k: int, group_size: int, device: torch.device) -> GemvConfig:
    """Heuristic launch parameters for x [1, k] @ W [k, n] (benchmarks/gpu_decode.py sweeps them)."""
    block_c = 32
    block_k = next(b for b in (16, 8, 4, 2) if group_size % (8 * b) == 0)
    tiles = _cdiv(n, 8 * block_c)
    split = max(1, min(k // (8 * block_k), _programs_target(device) // tiles))
    return GemvConfig(block_c, block_k, split)


def default_gemm_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> GemmConfig:
    """Heuristic launch parameters for x [m, k] @ W [k, n], 2 <= m <= 16."""
    block_k = next(b for b in (64, 32, 16) if group_size % b == 0)
    tiles = _cdiv(n, 8 * 32)
    split = max(1, min(k // block_k, _programs_target(device) // tiles))
    return GemmConfig(32, block_k, split)


def _split(total: int, parts: int, step: int) -> tuple[int, int]:
    """(size of each part in multiples of `step`, number of non-empty parts) for `total` in `parts`."""
    size = _cdiv(_cdiv(total, parts), step) * step
    return size, _cdiv(total, size)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials (>= floats) and zeroed tile counters (>= tiles), shared by all calls on a device.

    Calls on one stream run one after another, and each leaves its counters at zero. Allocated
    outside CUDA-graph capture by the first (warm-up) call, so captured graphs keep the addresses.
    """
    key = (device.type, device.index)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < tiles:
        floats = max(floats, ws.numel() if ws is not None else 0, 1 << 16)
        tiles = max(tiles, cnt.numel() if cnt is not None else 0, 1024)
        ws = torch.empty(floats, dtype=torch.float32, device=device)
        cnt = torch.zeros(tiles, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def _optional(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """Triton needs a tensor for every pointer argument; flags say when it is not read."""
    return t if t is not None else stand_in


def gptq_gemv(x: torch.Tensor, w: GPTQWeights, config: GemvConfig | None = None) -> torch.Tensor:
    """x [1, K] (fp16/bf16) -> x @ W + bias [1, N] in x's dtype."""
    n, k = w.out_features, w.in_features
    if x.shape != (1, k):
        raise ValueError(f"gptq_gemv takes x of shape [1, {k}], got {list(x.shape)}")
    cfg = config or default_gemv_config(n, k, w.group_size, x.device)
    chunk = 8 * cfg.block_k
    if w.group_size % chunk:
        raise ValueError(f"8 * block_k = {chunk} must divide the group size {w.group_size}")
    chunks = k // chunk
    per_split, splits = _split(chunks, cfg.split_k, 1)
    tiles = _cdiv(n // 8, cfg.block_c)
    ws, cnt = _workspace(x.device, splits * n, tiles)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(tiles, splits)](
        x.contiguous(), w.qweight, w.scales, w.qzeros, _optional(w.perm, w.qweight), _optional(w.bias, w.scales),
        out, ws, cnt, chunks, per_split, splits,
        STRIDE_W=n // 8, GROUP=w.group_size, BLOCK_K=cfg.block_k, BLOCK_C=cfg.block_c,
        HAS_PERM=w.perm is not None, HAS_BIAS=w.bias is not None,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return out


def gptq_gemm(x: torch.Tensor, w: GPTQWeights, config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16), M small -> x @ W + bias [M, N] in x's dtype, on tensor cores."""
    m, k = x.shape
    n = w.out_features
    if k != w.in_features:
        raise ValueError(f"x has {k} features but the GPTQ weight expects {w.in_features}")
    cfg = config or default_gemm_config(m, n, k, w.group_size, x.device)
    if w.group_size % cfg.block_k:
        raise ValueError(f"block_k {cfg.block_k} must divide the group size {w.group_size}")
    x = x.contiguous()
    per_split, splits = _split(k, cfg.split_k, cfg.block_k)
    grid = (_cdiv(n // 8, cfg.block_c), splits, _cdiv(m, cfg.block_m))
    ws, cnt = _workspace(x.device, splits * m * n, grid[0] * grid[2])
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemm_kernel[grid](
        x, w.qweight, w.scales, w.qzeros, _optional(w.perm, w.qweight), _optional(w.bias, w.scales), out, ws, cnt,
        m, n // 8, k, x.stride(0), out.stride(0), w.group_size, per_split, splits,
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k,
        HAS_PERM=w.perm is not None, HAS_BIAS=w.bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def gptq_dequantize(w: GPTQWeights, dtype: torch.dtype = torch.float16, columns: slice | None = None) -> torch.Tensor:
    """W [K, N] (or its `columns`, a slice of multiples of 8) in `dtype`, rows in input order:
    equal to `dequantize_gptq` of the checkpoint tensors."""
    k, n = w.in_features, w.out_features
    lo, hi, _ = (columns or slice(0, n)).indices(n)
    if lo % 8 or hi % 8:
        raise ValueError(f"columns must start and end at multiples of 8, got {lo}:{hi}")
    out = torch.empty(k, hi - lo, dtype=dtype, device=w.qweight.device)
    block_k = 16
    grid = (_cdiv((hi - lo) // 8, 32), k // block_k)
    _dequant_kernel[grid](
        w.qweight, w.scales, w.qzeros, _optional(w.perm, w.qweight), out, n // 8, w.group_size, lo // 8, hi // 8,
        BLOCK_C=32, BLOCK_K=block_k, HAS_PERM=w.perm is not None, num_warps=4,
    )
    return out


def gptq_linear(x: torch.Tensor, w: GPTQWeights) -> torch.Tensor:
    """y = x @ W + bias for x [..., K]: fused kernels for up to FUSED_MAX_ROWS rows, else dequantize + cuBLAS."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    m = x2.shape[0]
    if m == 1 and ONE_ROW_KERNEL == "gemv":
        y = gptq_gemv(x2, w)
    elif m <= FUSED_MAX_ROWS:
        y = gptq_gemm(x2, w)
    elif w.in_features * w.out_features <= DEQUANT_SCRATCH:  # dequantize all of W [K, N], then cuBLAS
        weight = gptq_dequantize(w, x.dtype)  # scratch, freed after the matmul
        y = torch.addmm(w.bias.to(x.dtype), x2, weight) if w.bias is not None else x2 @ weight
    else:  # column blocks of <= DEQUANT_SCRATCH weights: a bounded scratch, slower (strided outputs)
        n = w.out_features
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        step = max(256, DEQUANT_SCRATCH // w.in_features // 256 * 256)
        for lo in range(0, n, step):
            cols = slice(lo, min(lo + step, n))
            weight = gptq_dequantize(w, x.dtype, cols)  # [K, cols] scratch
            if w.bias is not None:
                torch.addmm(w.bias[cols].to(x.dtype), x2, weight, out=y[:, cols])
            else:
                torch.mm(x2, weight, out=y[:, cols])
    return y.reshape(*lead, w.out_features)


class TritonGPTQKernel(GPTQKernel):
    """4-bit GPTQ on CUDA through the Triton kernels above (the registry's interface).

    prepare repacks qweight to the N-packed layout and frees the checkpoint copy (same size);
    `checkpoint_tensors` rebuilds it bit for bit for state_dict(). The permuted scales are a
    second copy of the (small) scales.
    """

    name = "triton-gptq"
    buffer_names = ("triton_qweight", "triton_scales", "triton_perm")

    @classmethod
    def can_implement(cls, bits, group_size, desc_act, in_features, out_features, device, dtype):
        reason = unavailable_reason(torch.device(device))
        if reason is not None:
            return False, reason
        if dtype not in (torch.float16, torch.bfloat16):
            return False, f"computes on float16/bfloat16 activations, the model's dtype is {dtype}"
        return check_gptq_shapes(bits, group_size, in_features, out_features)

    def prepare(self, layer) -> None:
        w = prepare_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, layer.group_size)
        layer.register_buffer("triton_qweight", w.qweight, persistent=False)  # [K, N/8] int32
        layer.register_buffer("triton_scales", w.scales, persistent=False)  # [G, 8, N/8]
        layer.register_buffer("triton_perm", w.perm, persistent=False)  # [K] int32 or None
        layer.qweight = None  # rebuilt by checkpoint_tensors when state_dict() asks

    def weights(self, layer) -> GPTQWeights:
        """The layer's tensors as the launchers take them."""
        gs = layer.in_features if layer.group_size == -1 else layer.group_size
        return GPTQWeights(layer.triton_qweight, layer.qzeros, layer.triton_scales, layer.triton_perm, layer.bias, gs)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return gptq_linear(x, self.weights(layer))

    def checkpoint_tensors(self, layer) -> dict[str, torch.Tensor]:
        if layer.qweight is not None:
            return {}
        perm = layer.triton_perm.long() if layer.triton_perm is not None else None
        return {"qweight": from_npacked(layer.triton_qweight, perm)}

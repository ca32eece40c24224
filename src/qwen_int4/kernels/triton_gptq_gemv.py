"""Triton GEMV for GPTQ int4/int8 weights: one row of x (batch-1 decode), memory-bound.

Layout: kernels/gptq_layout.py (words [N, K / P]; the two values of slot pair p sit 16 bits
apart and multiply two adjacent values of x). Oracle: `dequantize_reference` there.

A program owns BLOCK_N output rows and walks K BLOCK_U units (128 input rows, or a smaller
group) at a time; the weights and x come in 16-byte loads in the same register layout (no
shared-memory round trip), and many programs per SM keep enough bytes in flight to stream at
HBM speed (no split-K, no atomics, deterministic). x is read as 32-bit pairs, so act-order
models permute x once before the launch.

Two ways to multiply a word (8 int4 or 4 int8 values) with its x:
* half2 (fp16 activations on CUDA): per pair, one shift and one LOP3 put both values under the
  exponent of 1024 (fp16 1024 + q, exact), then packed-half instructions: subtract 1024 + z
  (exact), times the scale (rounded once, as a dequantized fp16 weight), and a half2 FMA with
  the x pair; the word's sum goes to float32. ~3 instructions per weight, which is what lets
  int4 stream at memory speed (inline PTX; AutoGPTQ's exllama kernels also sum in half2).
* float32 (bf16 activations, and the CPU interpreter): each value goes to the top of a float's
  mantissa under the exponent of 1.0 (f = 1 + q / 2^bits, exact), f - (1 + z / 2^bits) =
  (q - z) / 2^bits exactly, times x in float32; the scale once per word.

`gptq_dual_gemv` runs Qwen's w1 and w2 in one launch (two weight streams, one x) with the SwiGLU
in the epilogue. With PDL (kernels/pdl.py) a program loads its first step's weights before it
waits for the previous kernel (GemvConfig.prefetch; QWEN_INT4_GEMV_PREFETCH=0 switches it off).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qwen_int4.kernels.gptq_layout import UNIT, GPTQWeights
from qwen_int4.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

PREFETCH_ENV = "QWEN_INT4_GEMV_PREFETCH"


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of `_gemv_kernel`."""

    block_n: int = 8  # output rows per program
    block_u: int = 4  # 128-row units of K per step
    num_warps: int = 4
    num_stages: int = 1
    half2: bool = True  # packed-fp16 arithmetic for fp16 x on CUDA (else float32)
    prefetch: bool | None = None  # first step's weights before gdc_wait (None: when PDL is on, see _prefetch)


def default_gemv_config(n: int, k: int, bits: int, device: torch.device) -> GemvConfig:
    """Launch parameters from benchmarks/gptq_kernels.py --sweep on an H100 and an H200: for 4 bits,
    2 rows per program with 2 warps, 16 units a step, or 8 when that pads K less (mlp.c_proj's 86
    units: 2-3% faster); within 3% of each Qwen-7B shape's best. For 8 bits, ~8 programs per
    multiprocessor of 8 units each."""
    if bits == 4:
        units = k // UNIT
        return GemvConfig(block_n=2, block_u=16 if units % 16 == 0 or units % 16 > 8 else 8, num_warps=2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    block_u = min(8, max(1, k // UNIT))
    block_n = 16
    while block_n > 2 and n // block_n < 8 * sms:
        block_n //= 2
    return GemvConfig(block_n=block_n, block_u=block_u)


def _half2_dot_asm(bits: int) -> str:
    """PTX for one word: $0 (f32) = sum over its values of x * s (q - z), with the word in $1, the
    x pairs of its slot pairs in $2.., then half2 (1024 + z) and half2 (s, s)."""
    pairs = 16 // bits
    mask = "0x000F000F" if bits == 4 else "0x00FF00FF"
    zz, ss = f"${2 + pairs}", f"${3 + pairs}"
    regs = ", ".join(f"q{p}" for p in range(pairs))
    lines = [f".reg .b32 {regs}, t, acc;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]
    for p in range(pairs):  # pair p: values p (low half) and pairs + p (high half), 16 bits apart
        src = "$1" if p == 0 else "t"
        if p:
            lines.append(f"shr.u32 t, $1, {bits * p};")
        lines.append(f"lop3.b32 q{p}, {src}, {mask}, 0x64006400, 0xEA;")  # (w & mask) | fp16 1024: 1024 + q
    lines += [f"sub.f16x2 q{p}, q{p}, {zz};" for p in range(pairs)]  # q - z, exact
    lines += [f"mul.f16x2 q{p}, q{p}, {ss};" for p in range(pairs)]  # s (q - z), rounded as dequantized
    lines.append("mul.f16x2 acc, q0, $2;")
    lines += [f"fma.rn.f16x2 acc, q{p}, ${2 + p}, acc;" for p in range(1, pairs)]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;"]
    return "{\n" + "\n".join(lines) + "\n}"


_ASM_INT4 = _half2_dot_asm(4)
_ASM_INT8 = _half2_dot_asm(8)


if triton is not None:
    _ASM_INT4_C = tl.constexpr(_ASM_INT4)
    _ASM_INT8_C = tl.constexpr(_ASM_INT8)

    @triton.jit
    def _as_unit_float(words, J: tl.constexpr, BITS: tl.constexpr):
        """Slot J of uint32 words as the float 1 + q / 2^BITS (q moved to the mantissa's top bits)."""
        TOP: tl.constexpr = 23 - BITS  # q goes to bits TOP .. 22
        SHIFT: tl.constexpr = TOP - J * BITS
        if SHIFT > 0:
            r = words << SHIFT
        elif SHIFT < 0:
            r = words >> (-SHIFT)
        else:
            r = words
        return ((r & (((1 << BITS) - 1) << TOP)) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _half(pairs, HIGH: tl.constexpr, X_BF16: tl.constexpr):
        """The low or high 16-bit half of int32 x pairs as float32."""
        bits = (pairs >> 16) if HIGH else pairs
        if X_BF16:
            return bits.to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _half2_bits(v):
        """float32 v -> int32 holding fp16(v) in both halves."""
        h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return h | (h << 16)

    @triton.jit
    def _pair_dot_float(words, xp, p: tl.constexpr, c, BITS: tl.constexpr, X_BF16: tl.constexpr):
        """Pair p of each word (slots p and H + p) times its x pair xp, in float32, without the scale."""
        H: tl.constexpr = 16 // BITS  # pairs per word
        lo = (_as_unit_float(words, p, BITS) - c) * _half(xp, False, X_BF16)
        hi = (_as_unit_float(words, H + p, BITS) - c) * _half(xp, True, X_BF16)
        return lo + hi

    @triton.jit
    def _word_dot_float(words, x0, x1, x2, x3, c, s, BITS: tl.constexpr, X_BF16: tl.constexpr):
        """sum over each word's values of x s (q - z) in float32, [BN, BU, WPU] (any x dtype); x0..x3:
        the x pairs of the word's slot pairs (int8 words have two)."""
        part = _pair_dot_float(words, x0, 0, c, BITS, X_BF16) + _pair_dot_float(words, x1, 1, c, BITS, X_BF16)
        if BITS == 4:
            part += _pair_dot_float(words, x2, 2, c, BITS, X_BF16)
            part += _pair_dot_float(words, x3, 3, c, BITS, X_BF16)
        return part * (s * (1 << BITS))

    @triton.jit
    def _word_dot_half2(words, x0, x1, x2, x3, z, s, BITS: tl.constexpr):
        """The same in packed fp16 through inline PTX (fp16 x on CUDA)."""
        zz = _half2_bits(z + 1024.0)
        ss = _half2_bits(s)
        if BITS == 4:
            return tl.inline_asm_elementwise(
                _ASM_INT4_C, "=f,r,r,r,r,r,r,r", [words, x0, x1, x2, x3, zz, ss],
                dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            _ASM_INT8_C, "=f,r,r,r,r,r", [words, x0, x1, zz, ss], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _load_weights(qweight_ptr, scales_ptr, zeros_ptr, rows, r_ok, u, u_ok, K_WORDS, GROUPS,
                      WPU: tl.constexpr, UNITS_PER_GROUP: tl.constexpr):
        """One step's weights of this program's rows, as loaded: words [BN, BU, WPU] and the scales and
        zeros [BN, BU] of units u (0 where not u_ok). Constant data: PDL kernels may load it early."""
        offs_w = tl.arange(0, WPU)
        w_ptr = qweight_ptr + rows[:, None, None] * K_WORDS + (u * WPU)[None, :, None] + offs_w[None, None, :]
        words = tl.load(w_ptr, mask=r_ok[:, None, None] & u_ok[None, :, None], other=0)  # [BN, BU, WPU]
        sz_ptr = rows[:, None] * GROUPS + (u // UNITS_PER_GROUP)[None, :]  # [BN, BU]
        sz_ok = r_ok[:, None] & u_ok[None, :]
        s = tl.load(scales_ptr + sz_ptr, mask=sz_ok, other=0.0)
        z = tl.load(zeros_ptr + sz_ptr, mask=sz_ok, other=0)
        return words, s, z

    @triton.jit
    def _step_dot(words, s, z, x0, x1, x2, x3, BITS: tl.constexpr, HALF2: tl.constexpr, X_BF16: tl.constexpr):
        """One step's products [BN, BU, WPU] (float32) of the loaded weights with the x pairs."""
        s = s.to(tl.float32)[:, :, None]
        z = z.to(tl.float32)[:, :, None] + 1.0  # stored as zero - 1
        if HALF2:
            return _word_dot_half2(words, x0, x1, x2, x3, z, s.to(tl.float16).to(tl.float32), BITS)
        return _word_dot_float(words.to(tl.uint32, bitcast=True), x0, x1, x2, x3, 1.0 + z / (1 << BITS), s,
                               BITS, X_BF16)

    @triton.jit
    def _load_step(qweight_ptr, scales_ptr, zeros_ptr, gate_qweight_ptr, gate_scales_ptr, gate_zeros_ptr, rows, r_ok,
                   u, u_ok, K_WORDS, GROUPS, WPU: tl.constexpr, UNITS_PER_GROUP: tl.constexpr,
                   GATE_GEMV: tl.constexpr):
        """`_load_weights` of W and (GATE_GEMV) of the gate's weights for units u; without a gate
        weight, W's tensors stand in for the gate's (unused)."""
        words, s, z = _load_weights(qweight_ptr, scales_ptr, zeros_ptr, rows, r_ok, u, u_ok, K_WORDS, GROUPS,
                                    WPU, UNITS_PER_GROUP)
        gwords, gs, gz = words, s, z
        if GATE_GEMV:
            gwords, gs, gz = _load_weights(gate_qweight_ptr, gate_scales_ptr, gate_zeros_ptr, rows, r_ok, u, u_ok,
                                           K_WORDS, GROUPS, WPU, UNITS_PER_GROUP)
        return words, s, z, gwords, gs, gz

    @triton.jit
    def _accumulate(acc, gacc, words, s, z, gwords, gs, gz, x_ptr, rows, u, u_ok,
                    BITS: tl.constexpr, UNIT: tl.constexpr, HALF2: tl.constexpr, X_BF16: tl.constexpr,
                    GATE_GEMV: tl.constexpr):
        """acc (and gacc, the gate weights', with GATE_GEMV) += this step's products with x."""
        WPU: tl.constexpr = UNIT // (32 // BITS)  # words per unit
        offs_w = tl.arange(0, WPU)
        # x pair p of word w is int32 element unit * UNIT/2 + p * WPU + w; read in the words' own
        # shape [BN, BU, WPU] (rows re-read it from L1), 4 per thread like the words: the same
        # register layout, so x needs no shared-memory round trip; both weights share the loads
        u_in = tl.where(u_ok, u, 0)  # units past the end read unit 0 (their weights are 0)
        xi = (u_in * (UNIT // 2))[None, :, None] + offs_w[None, None, :] + 0 * rows[:, None, None]
        xp_ptr = x_ptr + tl.max_contiguous(tl.multiple_of(xi, [1, 1, 4]), [1, 1, 4])
        x0 = tl.load(xp_ptr)
        x1 = tl.load(xp_ptr + WPU)
        x2 = x0
        x3 = x1
        if BITS == 4:
            x2 = tl.load(xp_ptr + 2 * WPU)
            x3 = tl.load(xp_ptr + 3 * WPU)
        acc += _step_dot(words, s, z, x0, x1, x2, x3, BITS, HALF2, X_BF16)
        if GATE_GEMV:
            gacc += _step_dot(gwords, gs, gz, x0, x1, x2, x3, BITS, HALF2, X_BF16)
        return acc, gacc

    @triton.jit
    def _finish(acc, bias_ptr, rows, r_ok, HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
        """Row sums of acc [BN, BU, WPU] (+ bias) rounded to the output dtype, as the linear's output."""
        y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
        return y.to(dtype)

    @triton.jit
    def _gemv_kernel(
        x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr,
        gate_ptr, gate_qweight_ptr, gate_scales_ptr, gate_zeros_ptr, gate_bias_ptr, out_ptr,
        N, K_WORDS, UNITS, GROUPS,
        BITS: tl.constexpr, UNIT: tl.constexpr, UNITS_PER_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_U: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, GATE_GEMV: tl.constexpr,
        GATE_HAS_BIAS: tl.constexpr, HALF2: tl.constexpr, X_BF16: tl.constexpr, PDL: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        """out[n] = sum_k x[k] W[n, k] (+ bias[n]) for this program's BLOCK_N rows, or with HAS_GATE
        gate[n] * silu(that) rounded as the model's w1(x) * F.silu(w2(x)): gate read from gate_ptr, or
        with GATE_GEMV computed here too, x . W_gate[n] (+ gate bias) from the gate_* weights (same
        shape and format). x_ptr: x as int32 pairs. PDL: see kernels/pdl.py; PREFETCH: the first
        step's weights are loaded before gdc_wait (the first step peeled off the loop)."""
        if PDL:
            gdc_launch_dependents()
        WPU: tl.constexpr = UNIT // (32 // BITS)  # words per unit
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        r_ok = rows < N
        u = tl.arange(0, BLOCK_U)  # [BU], the first step's units
        u_ok = u < UNITS
        if PREFETCH:  # constants: in flight while the previous kernel finishes
            words0, s0, z0, gwords0, gs0, gz0 = _load_step(
                qweight_ptr, scales_ptr, zeros_ptr, gate_qweight_ptr, gate_scales_ptr, gate_zeros_ptr, rows, r_ok,
                u, u_ok, K_WORDS, GROUPS, WPU, UNITS_PER_GROUP, GATE_GEMV)
        if PDL:
            gdc_wait()  # x (and gate) are the previous kernel's output; every store comes after this
        acc = tl.zeros((BLOCK_N, BLOCK_U, WPU), dtype=tl.float32)
        gacc = tl.zeros((BLOCK_N, BLOCK_U, WPU), dtype=tl.float32)
        if PREFETCH:
            acc, gacc = _accumulate(acc, gacc, words0, s0, z0, gwords0, gs0, gz0, x_ptr, rows, u, u_ok,
                                    BITS, UNIT, HALF2, X_BF16, GATE_GEMV)
        FIRST: tl.constexpr = BLOCK_U if PREFETCH else 0
        for u0 in tl.range(FIRST, UNITS, BLOCK_U):
            uu = u0 + u
            uu_ok = uu < UNITS
            words, s, z, gwords, gs, gz = _load_step(
                qweight_ptr, scales_ptr, zeros_ptr, gate_qweight_ptr, gate_scales_ptr, gate_zeros_ptr, rows, r_ok,
                uu, uu_ok, K_WORDS, GROUPS, WPU, UNITS_PER_GROUP, GATE_GEMV)
            acc, gacc = _accumulate(acc, gacc, words, s, z, gwords, gs, gz, x_ptr, rows, uu, uu_ok,
                                    BITS, UNIT, HALF2, X_BF16, GATE_GEMV)
        y = _finish(acc, bias_ptr, rows, r_ok, HAS_BIAS, out_ptr.dtype.element_ty)
        if HAS_GATE:
            if GATE_GEMV:
                gate = _finish(gacc, gate_bias_ptr, rows, r_ok, GATE_HAS_BIAS, out_ptr.dtype.element_ty)
            else:
                gate = tl.load(gate_ptr + rows, mask=r_ok, other=0.0)
            b = y.to(tl.float32)
            silu = (b / (1.0 + tl.exp(-b))).to(y.dtype)  # F.silu in fp32, rounded like the model's
            # the product of two fp16/bf16 values is exact in fp32: rounded once, as a half multiply
            # (Triton's interpreter multiplies bf16 wrongly)
            y = (gate.to(tl.float32) * silu.to(tl.float32)).to(y.dtype)
        tl.store(out_ptr + rows, y, mask=r_ok)


def _use_half2(x: torch.Tensor, config: GemvConfig) -> bool:
    return config.half2 and x.dtype == torch.float16 and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _prefetch(config: GemvConfig, pdl: bool) -> bool:
    """Whether the first step's weights load before gdc_wait: config.prefetch, or by default when PDL is
    on and QWEN_INT4_GEMV_PREFETCH is not "0" (without PDL there is nothing to overlap)."""
    if config.prefetch is not None:
        return config.prefetch
    return pdl and os.environ.get(PREFETCH_ENV) != "0"


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.shape != (1, k):
        raise ValueError(f"gptq_gemv takes x of shape [1, {k}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gptq_gemv computes on float16/bfloat16 x, got {x.dtype}")


def _launch(x: torch.Tensor, w: GPTQWeights, config: GemvConfig | None, gate: torch.Tensor | None = None,
            gate_w: GPTQWeights | None = None) -> torch.Tensor:
    """out [1, N] = x W^T + bias; with gate: gate * silu(that); with gate_w: (x W_gate^T + bias_gate) * silu(that)."""
    n, k = w.out_features, w.in_features
    cfg = config or default_gemv_config(n, k, w.bits, x.device)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    x = x.index_select(1, w.perm) if w.perm is not None else x.contiguous()  # packed row order
    g = gate_w or w  # the gate weights' pointers (unused without gate_w)
    pdl = pdl_enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x.view(torch.int32), w.qweight, w.scales, w.zeros, w.bias if w.bias is not None else w.scales,
        gate.contiguous() if gate is not None else out, g.qweight, g.scales, g.zeros,
        g.bias if g.bias is not None else g.scales, out,
        n, w.qweight.shape[1], k // w.unit, w.scales.shape[1],
        BITS=w.bits, UNIT=w.unit, UNITS_PER_GROUP=w.group_size // w.unit, BLOCK_N=cfg.block_n, BLOCK_U=cfg.block_u,
        HAS_BIAS=w.bias is not None, HAS_GATE=gate is not None or gate_w is not None, GATE_GEMV=gate_w is not None,
        GATE_HAS_BIAS=g.bias is not None, HALF2=_use_half2(x, cfg), X_BF16=x.dtype == torch.bfloat16,
        PDL=pdl, PREFETCH=_prefetch(cfg, pdl), num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )
    return out


def gptq_gemv(x: torch.Tensor, w: GPTQWeights, config: GemvConfig | None = None,
              gate: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (fp16/bf16) -> x @ W^T + bias [1, N] in x's dtype; with gate [1, N] (same dtype):
    gate * silu(x @ W^T + bias), the SwiGLU of Qwen's MLP fused into the epilogue."""
    n = w.out_features
    _check_x(x, w.in_features)
    if gate is not None and (gate.shape != (1, n) or gate.dtype != x.dtype):
        raise ValueError(f"gate must be [1, {n}] of {x.dtype}, got {list(gate.shape)} of {gate.dtype}")
    return _launch(x, w, config, gate=gate)


def dual_gemv_problem(w1: GPTQWeights, w2: GPTQWeights) -> str | None:
    """Why `gptq_dual_gemv` cannot run w1 and w2 in one launch (None: it can): they must share shape,
    bits, group size, scale dtype and act-order permutation (the same tensor, or none; comparing two
    would sync the host)."""
    for name in ("in_features", "out_features", "bits", "group_size"):
        if getattr(w1, name) != getattr(w2, name):
            return f"w1 and w2 differ in {name}: {getattr(w1, name)} vs {getattr(w2, name)}"
    if w1.scales.dtype != w2.scales.dtype:
        return f"w1 and w2 differ in scale dtype: {w1.scales.dtype} vs {w2.scales.dtype}"
    if w1.perm is not w2.perm and (w1.perm is None or w2.perm is None or w1.perm.data_ptr() != w2.perm.data_ptr()):
        return "w1 and w2 have different act-order permutations (x would need two orders)"
    return None


def gptq_dual_gemv(x: torch.Tensor, w1: GPTQWeights, w2: GPTQWeights, config: GemvConfig | None = None) -> torch.Tensor:
    """x [1, K] -> w1(x) * silu(w2(x)) [1, N] in one launch (Qwen's SwiGLU at batch 1): each
    projection (+ bias) rounded to x's dtype, silu in float32 rounded, the product in x's dtype, as
    the model computes it; bit for bit `gptq_gemv(x, w2, config, gate=gptq_gemv(x, w1, config))`.
    The two weights stream side by side and share the loads of x."""
    problem = dual_gemv_problem(w1, w2)
    if problem:
        raise ValueError(problem)
    _check_x(x, w1.in_features)
    return _launch(x, w2, config, gate_w=w1)

"""Triton GPTQ kernels against the plain-PyTorch reference `dequantize_gptq`.

The same checks run on a GPU (marked gpu, at 7B shapes too) and on the CPU under
TRITON_INTERPRET=1 at small odd shapes; the interpreter must be switched on before triton is
imported, so that run happens in a subprocess (this file run as a script).
"""
import os
import re

import pytest
import torch
from _triton import hopper_ptx, run_under_triton_interpreter

from qwen_int4.quant.gptq import GPTQLinear, dequantize_gptq, quantize_rtn

# (in_features, out_features, group_size, desc_act, bits): odd column counts, act-order, one
# group (-1), groups smaller than the 128-row unit, 8 bits
SMALL_SHAPES = [(256, 72, 128, False, 4), (384, 40, 128, True, 4), (256, 24, -1, False, 4),
                (192, 16, 64, True, 4), (96, 24, 32, False, 4), (256, 40, 128, True, 8), (128, 16, 32, False, 8)]


def _case(k_in, n_out, group_size, desc_act, bits, device, seed):
    """Random asymmetric GPTQ tensors (checkpoint layout), a bias, and the reference W [K, N] fp16."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, k_in, generator=gen)
    t = quantize_rtn(weight, bits, group_size, desc_act=desc_act, sym=False, seed=seed)
    t = {name: v.to(device) for name, v in t.items()}
    bias = torch.randn(n_out, generator=gen).half().to(device)
    ref = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)  # [K, N] fp16
    return t, bias, ref


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def _layout(t, bias, group_size, bits):
    from qwen_int4.kernels.gptq_layout import to_kernel_layout

    return to_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, bits, group_size)


def check_kernels(device: str, shapes, seed: int = 0) -> None:
    """Layout round trip (bit-exact), dequantize (bit-exact), GEMV, GEMM (split-K too) and the
    dispatcher (prefill path in K blocks too) on `shapes`."""
    from qwen_int4.kernels import triton_gptq as tg
    from qwen_int4.kernels.gptq_layout import to_checkpoint
    from qwen_int4.kernels.triton_gptq_gemm import (
        GemmConfig,
        gptq_dequantize,
        gptq_gemm,
    )
    from qwen_int4.kernels.triton_gptq_gemv import GemvConfig, gptq_gemv

    for i, (k_in, n_out, gs, desc_act, bits) in enumerate(shapes):
        t, bias, ref = _case(k_in, n_out, gs, desc_act, bits, device, seed + i)
        w = _layout(t, bias, gs, bits)
        assert (w.perm is not None) == desc_act
        for name, tensor in to_checkpoint(w).items():
            assert torch.equal(tensor, t[name]), f"{name} must round-trip bit for bit"
        packed_order = w.perm.long() if desc_act else torch.arange(k_in, device=device)
        assert torch.equal(gptq_dequantize(w), ref.t()[:, packed_order]), "dequantize must match the reference bit for bit"
        gen = torch.Generator().manual_seed(seed + 100 + i)
        ref64 = ref.double()
        for rows in (1, 5, 20, 70):
            # a non-zero mean exercises the kernels' zero-point terms
            x = (torch.randn(rows, k_in, generator=gen) + 0.5).half().to(device)
            want = x.double() @ ref64 + bias.double()
            if rows == 1:
                for cfg in (None, GemvConfig(block_n=4, block_u=2, num_warps=2), GemvConfig(block_n=16, block_u=1, half2=False)):
                    got = gptq_gemv(x, w, cfg)
                    assert got.dtype == x.dtype and _rel_err(got, want) < 2e-3, (k_in, n_out, cfg, _rel_err(got, want))
                gate = torch.randn(1, n_out, generator=gen).half().to(device)
                fused = gptq_gemv(x, w, gate=gate)  # SwiGLU epilogue: gate * silu(x W^T + b)
                model_way = gate * torch.nn.functional.silu(gptq_gemv(x, w).float()).to(gate.dtype)  # as the MLP rounds
                assert _rel_err(fused, model_way.double()) < 1e-3
            elif rows <= tg.GEMM_MAX_ROWS:
                # wx: packed-fp16 pairs on CUDA (the slot path in the interpreter), and the slot path forced
                for cfg in (None, GemmConfig(block_m=16, block_n=16, split_k=2), GemmConfig(block_m=16, block_n=32, wx=True),
                            GemmConfig(block_m=32, block_n=16, split_k=3, wx=True),
                            GemmConfig(block_m=16, block_n=64, wx=True, pairs=False)):
                    got = gptq_gemm(x, w, cfg)
                    assert _rel_err(got, want) < 2e-3, (k_in, n_out, rows, cfg, _rel_err(got, want))
                if device == "cuda":  # bf16 activations: weights dequantized in float32, rounded to bf16
                    xb = x.bfloat16()
                    got = gptq_gemm(xb, w, GemmConfig(block_m=16, block_n=32, wx=True))
                    assert got.dtype == torch.bfloat16 and _rel_err(got, xb.double() @ ref64 + bias.double()) < 1e-2
            got = tg.gptq_linear(x.view(1, rows, k_in), w)  # dispatch by row count
            assert got.shape == (1, rows, n_out) and _rel_err(got[0], want) < 2e-3, (rows, _rel_err(got[0], want))
            saved, tg.DEQUANT_SCRATCH = tg.DEQUANT_SCRATCH, 1  # prefill path: one unit of K per block
            try:
                if rows > 16:
                    assert _rel_err(tg._dequant_matmul(x, w), want) < 2e-3
            finally:
                tg.DEQUANT_SCRATCH = saved


def check_layer(device: str) -> None:
    """GPTQLinear through the registry: same output as the reference, state_dict unchanged."""
    layer = GPTQLinear(256, 48, 4, 64, desc_act=True, device=device)
    t = quantize_rtn(torch.randn(48, 256), 4, 64, desc_act=True, seed=5)
    layer.load_state_dict({**t, "bias": torch.randn(48).half()})
    x = torch.randn(3, 256).half().to(device)
    ref = layer(x).double()  # reference path (no kernel selected yet)
    assert layer.process_weights_after_loading(kernel="triton-gptq") == "triton-gptq"
    assert layer.qweight is None and layer.scales is None  # the kernel layout replaced them
    assert _rel_err(layer(x), ref) < 2e-3
    state = layer.state_dict()
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(state[name].cpu(), t[name]), name
    want = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    assert torch.equal(layer.dequantized_weight().cpu(), want)  # rebuilt from the kernel layout
    layer.release_kernel()
    assert torch.equal(layer.qweight.cpu(), t["qweight"]) and torch.equal(layer.scales.cpu(), t["scales"])


def test_rejects_what_it_cannot_run():
    from qwen_int4.kernels import triton_gptq as tg
    from qwen_int4.kernels.gptq_layout import check_gptq_shapes

    assert not check_gptq_shapes(3, 128, 4096, 4096)[0]
    ok, reason = check_gptq_shapes(4, 48, 96, 64)
    assert not ok and "group size" in reason
    assert not check_gptq_shapes(4, -1, 96, 64)[0]  # one group of 96 rows: not a unit size
    g_idx = torch.tensor([0, 0, 0, 1] * 32, dtype=torch.int32).repeat(2)  # unequal groups: not an act-order
    t = quantize_rtn(torch.randn(8, 256), 4, 128)
    with pytest.raises(ValueError, match="g_idx"):
        _layout({**t, "g_idx": g_idx}, None, 128, 4)
    ok, reason = tg.TritonGPTQKernel.can_implement(4, 128, False, 256, 256, torch.device("cpu"), torch.float16)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not ok and reason


def test_kernels_in_triton_interpreter():
    """All checks on CPU through TRITON_INTERPRET=1, in a fresh interpreter."""
    run_under_triton_interpreter(__file__, timeout=600)


@pytest.mark.gpu
def test_kernels_on_gpu_small_shapes():
    pytest.importorskip("triton")
    check_kernels("cuda", SMALL_SHAPES)
    check_layer("cuda")


@pytest.mark.gpu
def test_kernels_on_gpu_qwen7b_shapes():
    """c_attn and mlp.c_proj of Qwen-7B, act-order too, and Int8."""
    pytest.importorskip("triton")
    check_kernels("cuda", [(4096, 12288, 128, False, 4), (11008, 4096, 128, True, 4), (4096, 4096, 128, False, 8)], seed=7)


if __name__ == "__main__":  # the interpreter run of test_kernels_in_triton_interpreter
    torch.set_num_threads(1)
    check_kernels("cpu", SMALL_SHAPES)
    check_layer("cpu")
    print("ok")


@pytest.mark.parametrize("bits", [4, 8])
def test_half2_gemv_compiles_for_hopper(bits):
    """The inline-PTX half2 path cannot run in the interpreter; compiling it for sm_90 (no GPU needed:
    Triton's own ptxas) at least checks the PTX here, in CI. Its numerics are checked on the GPU."""
    from qwen_int4.kernels import triton_gptq_gemv as gemv

    signature = {"x_ptr": "*i32", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*u8", "bias_ptr": "*fp16",
                 "gate_ptr": "*fp16", "gate_qweight_ptr": "*i32", "gate_scales_ptr": "*fp16", "gate_zeros_ptr": "*u8",
                 "gate_bias_ptr": "*fp16", "out_ptr": "*fp16", "N": "i32", "K_WORDS": "i32", "UNITS": "i32", "GROUPS": "i32"}
    consts = {"BITS": bits, "UNIT": 128, "UNITS_PER_GROUP": 1, "BLOCK_N": 2, "BLOCK_U": 16, "HAS_BIAS": True,
              "HAS_GATE": True, "GATE_GEMV": False, "GATE_HAS_BIAS": False, "HALF2": True, "X_BF16": False,
              "PDL": False, "PREFETCH": False}
    assert "fma.rn.f16x2" in hopper_ptx(gemv._gemv_kernel, signature, consts, num_warps=2)


@pytest.mark.parametrize("bits", [4, 8])
def test_pair_gemm_compiles_for_hopper(bits):
    """The GEMM's packed-fp16 pair path (inline PTX, not runnable in the interpreter) compiled for
    sm_90 here: the dequantized pairs must feed wgmma from registers (no shared-memory round trip
    of the weights). Its numerics are checked on the GPU (check_kernels)."""
    from qwen_int4.kernels import triton_gptq_gemm as gemm

    signature = {"xs_ptr": "*fp16", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*u8", "bias_ptr": "*fp16",
                 "out_ptr": "*fp16", "M": "i32", "N": "i32", "K_WORDS": "i32", "UNITS": "i32", "GROUPS": "i32",
                 "stride_xm": "i32", "stride_om": "i32", "units_per_split": "i32"}
    consts = {"BITS": bits, "UNIT": 128, "UNITS_PER_GROUP": 1, "BLOCK_M": 64, "BLOCK_N": 64, "HAS_BIAS": True,
              "PARTIAL": False, "PAIRS": True}
    ptx = hopper_ptx(gemm._gemm_wx_kernel, signature, consts, num_warps=4)
    assert "sub.f16x2" in ptx and "mul.f16x2" in ptx
    wgmma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    # operands after the accumulators: A as four registers {%r..}, then B's shared-memory descriptor
    assert wgmma and all(re.search(r"\}, \{%r\d+,%r\d+,%r\d+,%r\d+\}, %rd\d+", line) for line in wgmma)

"""The dual GEMV (w1 and w2 of Qwen's MLP in one launch, SwiGLU in the epilogue) and swiglu_mlp.

Oracles: the two-launch path (`gptq_gemv` of w1, then w2's with the gate epilogue), which the
dual kernel must match bit for bit (same accumulation order), and the plain-PyTorch reference
`dequantize_gptq` rounded as the model rounds. CPU checks run under TRITON_INTERPRET=1 (a
subprocess: this file run as a script); GPU checks (marked gpu) at Qwen-7B's MLP shape.
"""
import pytest
import torch
import torch.nn.functional as F
from _triton import run_under_triton_interpreter

from qwen_int4.quant.gptq import GPTQLinear, dequantize_gptq, quantize_rtn

# (in_features, out_features, group_size, bits, bias, dtype): odd shapes, groups below the
# 128-row unit, one group (-1), int8, no bias, bf16 activations
SMALL = [(256, 72, 128, 4, True, torch.float16), (96, 24, 32, 8, True, torch.float16),
         (384, 40, -1, 4, False, torch.float16), (192, 16, 64, 4, True, torch.bfloat16)]


def _weights(k_in, n_out, group_size, bits, bias, dtype, device, seed):
    """Random asymmetric GPTQ weights in the kernel layout, and the reference W [K, N] and bias."""
    from qwen_int4.kernels.gptq_layout import to_kernel_layout

    gen = torch.Generator().manual_seed(seed)
    t = quantize_rtn(torch.randn(n_out, k_in, generator=gen), bits, group_size, sym=False, seed=seed)
    t = {name: v.to(device) for name, v in t.items()}
    t["scales"] = t["scales"].to(dtype)
    b = (torch.randn(n_out, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    w = to_kernel_layout(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], b, bits, group_size)
    return w, dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float32), b


def _model_swiglu(x, w1_ref, b1, w2_ref, b2):
    """w1(x) * silu(w2(x)) from dequantized weights, each step rounded to x's dtype as the model's."""
    a = x.float() @ w1_ref.float() + (b1.float() if b1 is not None else 0)
    b = x.float() @ w2_ref.float() + (b2.float() if b2 is not None else 0)
    return a.to(x.dtype) * F.silu(b.to(x.dtype).float()).to(x.dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_dual_gemv(device: str, shapes, seed: int = 0) -> None:
    """Bit for bit the two-launch path (with and without the prefetched first step), close to the
    reference, and refused for different formats or act-order permutations."""
    from qwen_int4.kernels.triton_gptq_gemv import (
        GemvConfig,
        dual_gemv_problem,
        gptq_dual_gemv,
        gptq_gemv,
    )

    for i, (k_in, n_out, gs, bits, bias, dtype) in enumerate(shapes):
        w1, ref1, b1 = _weights(k_in, n_out, gs, bits, bias, dtype, device, seed + 2 * i)
        w2, ref2, b2 = _weights(k_in, n_out, gs, bits, bias, dtype, device, seed + 2 * i + 1)
        assert dual_gemv_problem(w1, w2) is None
        gen = torch.Generator().manual_seed(seed + 100 + i)
        x = (torch.randn(1, k_in, generator=gen) + 0.3).to(dtype).to(device)
        for cfg in (None, GemvConfig(block_n=4, block_u=2, num_warps=2, prefetch=True),
                    GemvConfig(block_n=8, block_u=1, prefetch=False)):
            two_launches = gptq_gemv(x, w2, cfg, gate=gptq_gemv(x, w1, cfg))
            got = gptq_dual_gemv(x, w1, w2, cfg)
            assert got.shape == (1, n_out) and got.dtype == dtype
            assert torch.equal(got, two_launches), (k_in, n_out, bits, cfg, _rel(got, two_launches))
        want = _model_swiglu(x, ref1, b1, ref2, b2)
        assert _rel(got, want) < (2e-2 if dtype == torch.bfloat16 else 3e-3), (k_in, n_out, bits, _rel(got, want))
        if dtype == torch.float16:  # the prefetched first step alone (UNITS <= BLOCK_U) and a 1-unit loop
            units = k_in // w1.unit
            whole = GemvConfig(block_n=2, block_u=1 << (units - 1).bit_length(), num_warps=2, prefetch=True)
            assert torch.equal(gptq_dual_gemv(x, w1, w2, whole), gptq_dual_gemv(x, w1, w2, GemvConfig(prefetch=False)))
    w_int8, _, _ = _weights(256, 72, 128, 8, True, torch.float16, device, 50)
    w_int4, _, _ = _weights(256, 72, 128, 4, True, torch.float16, device, 51)
    assert "bits" in dual_gemv_problem(w_int4, w_int8)
    wa, _, _ = _weights(384, 40, 128, 4, True, torch.float16, device, 52)
    wb, _, _ = _weights(384, 40, 64, 4, True, torch.float16, device, 53)
    assert "group_size" in dual_gemv_problem(wa, wb)
    perm = torch.randperm(384).to(torch.int32).to(device)
    assert "permutation" in dual_gemv_problem(wa, type(wa)(**{**wa.__dict__, "perm": perm}))
    with pytest.raises(ValueError, match="group_size"):
        gptq_dual_gemv(torch.zeros(1, 384, dtype=torch.float16, device=device), wa, wb)


class _MLP(torch.nn.Module):
    """w1, w2 as GPTQLinear layers, like QWenMLP's (prepared for triton-gptq)."""

    def __init__(self, k_in, n_out, bits, group_sizes, device, seed, perm_seeds=None):
        """perm_seeds: act-order (desc_act) with these seeds of w1's and w2's column orders."""
        super().__init__()
        for i, (name, gs, s) in enumerate((("w1", group_sizes[0], seed), ("w2", group_sizes[1], seed + 1))):
            act = perm_seeds is not None
            layer = GPTQLinear(k_in, n_out, bits, gs, desc_act=act, device=device)
            t = quantize_rtn(torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(s)), bits, gs, sym=False,
                             desc_act=act, seed=perm_seeds[i] if act else 0)
            layer.load_state_dict({**t, "bias": torch.randn(n_out).half() * 0.1})
            layer.process_weights_after_loading(kernel="triton-gptq")
            setattr(self, name, layer)


def check_swiglu_mlp(device: str) -> None:
    """swiglu_mlp: one dual launch for one row of two same-format layers, else the unfused paths;
    always the model's w1(y) * silu(w2(y)) (bit for bit the triton two-launch path)."""
    from qwen_int4.kernels import triton_decode as td

    calls = []
    dual = td.gptq_dual_gemv
    td.gptq_dual_gemv = lambda *args, **kw: calls.append(1) or dual(*args, **kw)
    try:
        # act-order: w1 and w2 quantized on the same input share the column order (loading shares
        # the tensor, so one launch); different orders need x in two orders (two launches)
        for group_sizes, rows, fused, perms in (((64, 64), 1, True, None), ((64, 64), 3, False, None),
                                                ((64, 128), 1, False, None), ((64, 64), 1, True, (5, 5)),
                                                ((64, 64), 1, False, (5, 6))):
            mlp = _MLP(256, 48, 4, group_sizes, device, seed=7, perm_seeds=perms)
            y = torch.randn(rows, 256, generator=torch.Generator().manual_seed(3)).half().to(device)
            calls.clear()
            got = td.swiglu_mlp(mlp, y)
            assert bool(calls) == fused, (group_sizes, rows, perms)
            a, b = mlp.w1(y), mlp.w2(y)
            assert got.shape == (rows, 48)
            if rows == 1:
                assert torch.equal(got, td.gated_gemv(mlp.w2, y, a))  # the two-launch path
            assert _rel(got, a * F.silu(b.float()).half()) < 2e-3
    finally:
        td.gptq_dual_gemv = dual


@pytest.mark.gpu
def test_dual_gemv_on_gpu():
    pytest.importorskip("triton")
    check_dual_gemv("cuda", SMALL)
    check_swiglu_mlp("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_dual_gemv_on_gpu_qwen7b_mlp(bits, monkeypatch):
    """Qwen-7B's mlp.w1 / w2 (4096 -> 11008, g128), PDL and the prefetch on and off."""
    pytest.importorskip("triton")
    from qwen_int4.kernels.triton_gptq_gemv import GemvConfig, gptq_dual_gemv, gptq_gemv

    w1, ref1, _ = _weights(4096, 11008, 128, bits, False, torch.float16, "cuda", 1)
    w2, ref2, _ = _weights(4096, 11008, 128, bits, False, torch.float16, "cuda", 2)
    x = (torch.randn(1, 4096, generator=torch.Generator().manual_seed(3)) * 0.5).half().cuda()
    want = _model_swiglu(x, ref1, None, ref2, None)
    for pdl in ("1", "0"):
        monkeypatch.setenv("QWEN_INT4_PDL", pdl)
        for cfg in (None, GemvConfig(block_n=2, block_u=16, num_warps=2, prefetch=False)):
            got = gptq_dual_gemv(x, w1, w2, cfg)
            assert torch.equal(got, gptq_gemv(x, w2, cfg, gate=gptq_gemv(x, w1, cfg))), (pdl, cfg)
            assert _rel(got, want) < 3e-3, (pdl, cfg, _rel(got, want))


def test_dual_gemv_in_triton_interpreter():
    """The checks above on CPU through TRITON_INTERPRET=1, in a fresh interpreter."""
    run_under_triton_interpreter(__file__, timeout=600)


if __name__ == "__main__":  # the interpreter run of test_dual_gemv_in_triton_interpreter
    torch.set_num_threads(1)
    check_dual_gemv("cpu", SMALL)
    check_swiglu_mlp("cpu")
    print("ok")

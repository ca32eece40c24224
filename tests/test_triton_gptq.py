"""Triton GPTQ kernels against the plain-PyTorch reference `dequantize_gptq`.

The same checks run on a GPU (marked gpu, at 7B shapes too) and on the CPU under
TRITON_INTERPRET=1 at small odd shapes; the interpreter must be switched on before triton is
imported, so that run happens in a subprocess (this file run as a script).
"""
import os

import pytest
from _triton import run_under_triton_interpreter
import torch

from qwen_int4.quant.gptq import GPTQLinear, dequantize_gptq, quantize_rtn

# (in_features, out_features, group_size, desc_act): odd column counts, act-order, one group
SMALL_SHAPES = [(256, 72, 64, False), (192, 40, 32, True), (96, 24, -1, False)]


def _case(k_in, n_out, group_size, desc_act, device, seed):
    """Random asymmetric GPTQ tensors (checkpoint layout), a bias, and the reference W [K, N] fp16."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, k_in, generator=gen)
    t = quantize_rtn(weight, 4, group_size, desc_act=desc_act, sym=False, seed=seed)
    t = {name: v.to(device) for name, v in t.items()}
    bias = torch.randn(n_out, generator=gen).half().to(device)
    ref = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)  # [K, N] fp16
    return t, bias, ref


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def check_kernels(device: str, shapes, seed: int = 0) -> None:
    """Dequantize (bit-exact), GEMV (split-K too), skinny GEMM and the dispatcher on `shapes`."""
    from qwen_int4.kernels import triton_gptq as tg

    for i, (k_in, n_out, gs, desc_act) in enumerate(shapes):
        t, bias, ref = _case(k_in, n_out, gs, desc_act, device, seed + i)
        w = tg.prepare_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, gs)
        assert (w.perm is not None) == desc_act
        assert torch.equal(tg.gptq_dequantize(w), ref), "dequantize must reproduce the reference bit for bit"
        assert torch.equal(tg.from_npacked(w.qweight, w.perm.long() if desc_act else None), t["qweight"])
        gen = torch.Generator().manual_seed(seed + 100 + i)
        ref64 = ref.double()
        for rows in (1, 5, 20):
            # a non-zero mean exercises the kernels' sum-of-x correction terms
            x = (torch.randn(rows, k_in, generator=gen) + 0.5).half().to(device)
            want = x.double() @ ref64 + bias.double()
            if rows == 1:
                for cfg in (None, tg.GemvConfig(block_c=8, block_k=4, split_k=3)):
                    got = tg.gptq_gemv(x, w, cfg)
                    assert got.dtype == x.dtype and _rel_err(got, want) < 2e-3, (k_in, n_out, cfg, _rel_err(got, want))
            elif rows <= tg.FUSED_MAX_ROWS:
                for cfg in (None, tg.GemmConfig(block_c=16, block_k=16, split_k=2)):
                    got = tg.gptq_gemm(x, w, cfg)
                    assert _rel_err(got, want) < 2e-3, (k_in, n_out, rows, cfg, _rel_err(got, want))
            got = tg.gptq_linear(x.view(1, rows, k_in), w)  # dispatch by row count
            assert got.shape == (1, rows, n_out) and _rel_err(got[0], want) < 2e-3


def check_dequant_blocks(device: str) -> None:
    """Many-row inputs dequantize column blocks (bounded scratch); every block lands in place."""
    from qwen_int4.kernels import triton_gptq as tg

    t, bias, ref = _case(64, 520, 32, True, device, seed=11)
    w = tg.prepare_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, 32)
    assert torch.equal(tg.gptq_dequantize(w, columns=slice(264, 520)), ref[:, 264:])
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(3)).half().to(device)
    saved, tg.DEQUANT_SCRATCH = tg.DEQUANT_SCRATCH, 1  # blocks of 256 columns: 256 + 256 + 8
    try:
        got = tg.gptq_linear(x, w)
    finally:
        tg.DEQUANT_SCRATCH = saved
    assert _rel_err(got, x.double() @ ref.double() + bias.double()) < 2e-3


def check_layer(device: str) -> None:
    """GPTQLinear through the registry: same output as the reference, state_dict unchanged."""
    layer = GPTQLinear(128, 48, 4, 32, desc_act=True, device=device)
    t = quantize_rtn(torch.randn(48, 128), 4, 32, desc_act=True, seed=5)
    layer.load_state_dict({**t, "bias": torch.randn(48).half()})
    x = torch.randn(3, 128).half().to(device)
    ref = layer(x).double()  # reference path (no kernel selected yet)
    assert layer.process_weights_after_loading(kernel="triton-gptq") == "triton-gptq"
    assert layer.qweight is None  # the N-packed copy replaced it
    assert _rel_err(layer(x), ref) < 2e-3
    assert torch.equal(layer.state_dict()["qweight"].cpu(), t["qweight"])


def test_rejects_what_it_cannot_run():
    from qwen_int4.kernels import triton_gptq as tg

    assert not tg.check_gptq_shapes(8, 128, 4096, 4096)[0]
    ok, reason = tg.check_gptq_shapes(4, 24, 96, 64)
    assert not ok and "group size" in reason
    g_idx = torch.tensor([0, 0, 0, 1] * 8, dtype=torch.int32)  # unequal groups: not an act-order
    t = quantize_rtn(torch.randn(8, 32), 4, 16)
    with pytest.raises(ValueError, match="g_idx"):
        tg.prepare_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, None, 16)
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
    check_dequant_blocks("cuda")
    check_layer("cuda")


@pytest.mark.gpu
def test_kernels_on_gpu_qwen7b_shapes():
    """c_attn and mlp.c_proj of Qwen-7B, act-order too."""
    pytest.importorskip("triton")
    check_kernels("cuda", [(4096, 12288, 128, False), (11008, 4096, 128, True)], seed=7)


if __name__ == "__main__":  # the interpreter run of test_kernels_in_triton_interpreter
    torch.set_num_threads(1)
    check_kernels("cpu", SMALL_SHAPES)
    check_dequant_blocks("cpu")
    check_layer("cpu")
    print("ok")

"""The static-cache decode step (engine/cuda_graph.py, kernels/triton_decode.py) against the model.

The reference is QWenLMHeadModel's own forward with the dynamic KVCache. The same checks run
on the CPU under TRITON_INTERPRET=1 (a subprocess: the variable must be set before triton is
imported) and, marked gpu, on CUDA, where the step is also captured and replayed as a graph.
"""
import math

import pytest
from _triton import run_under_triton_interpreter
import torch

from qwen_int4.config import QuantConfig, QwenConfig
from qwen_int4.model.cache import KVCache
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.quant.gptq import (
    GPTQLinear,
    prepare_quantized_layers,
    quantize_rtn,
    replace_linear_with_gptq,
)

TINY = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "kv_channels": 32,
        "intermediate_size": 2 * 96, "seq_length": 16}


def tiny_int4_model(device: str, layers: int = 1) -> QWenLMHeadModel:
    """A tiny random fp16 model whose linears are GPTQ (RTN, g32) run by the triton-gptq kernel."""
    torch.manual_seed(0)
    model = QWenLMHeadModel(QwenConfig(**{**TINY, "num_hidden_layers": layers}))
    model.init_weights(0)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    replace_linear_with_gptq(model, QuantConfig(bits=4, group_size=32))
    for name, module in model.named_modules():
        if isinstance(module, GPTQLinear):
            t = quantize_rtn(dense[name], 4, 32, sym=False)
            module.load_state_dict({**t, "bias": torch.randn(module.out_features).half() * 0.02})
    model = model.half().to(device).eval()
    prepare_quantized_layers(model, kernel="triton-gptq")
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.inference_mode()
def check_decode_matches_model(device: str, kv_dtype: str, steps: int, graph: bool) -> None:
    from qwen_int4.engine.cuda_graph import CUDAGraphDecoder
    from qwen_int4.model.static_cache import StaticKVCache

    model = tiny_int4_model(device)
    ids = torch.tensor([[5, 17, 99, 3, 200]], device=device)
    out = model(ids, past_key_values=KVCache(1), logits_to_keep=1)
    past, tokens, ref = out.past_key_values, [out.logits[:, -1].argmax(-1)], []
    for _ in range(steps):
        o = model(tokens[-1][:, None], past_key_values=past, logits_to_keep=1)
        ref.append(o.logits[:, -1])
        tokens.append(ref[-1].argmax(-1))

    cache = StaticKVCache.for_model(model, 1, 16, kv_dtype)
    decoder = CUDAGraphDecoder(model, cache, splits=4)
    first = decoder.prefill(ids)
    tol = 3e-3 if kv_dtype == "fp16" else 2e-2  # int8: attention over dequantized keys/values
    assert _rel(first, out.logits[:, -1]) < tol  # the prefill is the model's own forward
    for i in range(steps):
        if graph:
            logits = decoder.step(tokens[i])
        else:  # the step without a graph (the interpreter cannot capture)
            decoder.step_fn.token.copy_(tokens[i])
            logits = decoder.step_fn()
            decoder.step_fn.pos.add_(1)
            cache.advance(1)
        assert _rel(logits, ref[i]) < tol, (kv_dtype, i, _rel(logits, ref[i]))
        assert torch.equal(logits.argmax(-1), tokens[i + 1])
    assert cache.seq_len == ids.shape[1] + steps


@torch.inference_mode()
def check_kernels(device: str) -> None:
    """rope_write_kv (int8 path) and decode_attention against their references, with padding."""
    from qwen_int4.kernels import triton_decode as td

    torch.manual_seed(1)
    B, H, D, S, pos = 2, 2, 32, 24, 13
    qkv = torch.randn(B, 3 * H * D, device=device).half()
    angles = torch.rand(S, D // 2, device=device) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys = torch.zeros(B, S, H, D, dtype=torch.uint8, device=device)
    values = torch.zeros_like(keys)
    meta = tuple(torch.zeros(B, S, H, device=device) for _ in range(4))
    p = torch.tensor([pos], dtype=torch.int32, device=device)
    q = td.rope_write_kv(qkv, cos, sin, None, p, keys, values, meta, H)
    q_ref, k_ref, v_ref = qkv.view(B, 3, H, D).unbind(1)
    def rot(x):  # apply_rotary at position pos, half rotation
        x = x.float()
        return (x * cos[pos] + torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1) * sin[pos]).half()

    assert torch.allclose(q.float(), rot(q_ref).float(), atol=2e-3)
    for cache, scale, zero, x in ((keys, meta[0], meta[1], rot(k_ref)), (values, meta[2], meta[3], v_ref)):
        want_q, want_scale, want_zero = td.quantize_kv_reference(x)
        assert (cache[:, pos].int() - want_q.int()).abs().max() <= 1  # float rounding at .5
        torch.testing.assert_close(scale[:, pos], want_scale)
        torch.testing.assert_close(zero[:, pos], want_zero)
    assert not cache[:, pos + 1:].any()  # nothing written past pos
    # attention over fp16 keys/values with a left pad in row 1
    keys16 = torch.randn(B, S, H, D, device=device).half()
    values16 = torch.randn(B, S, H, D, device=device).half()
    start = torch.tensor([0, 3], dtype=torch.int32, device=device)
    out = td.decode_attention(q, keys16, values16, None, p, start, splits=4, block_s=4)
    ref = td.decode_attention_reference(q, keys16, values16, pos + 1, start)
    assert _rel(out, ref) < 2e-3
    # int8 keys/values: the kernel dequantizes like the reference
    quant = [td.quantize_kv_reference(t) for t in (keys16, values16)]
    meta8 = (quant[0][1], quant[0][2], quant[1][1], quant[1][2])
    out8 = td.decode_attention(q, quant[0][0], quant[1][0], meta8, p, start, splits=4, block_s=4)
    deq = [td.dequantize_kv_reference(qq, s, z, torch.float16) for qq, s, z in quant]
    assert _rel(out8, td.decode_attention_reference(q, deq[0], deq[1], pos + 1, start)) < 2e-3
    # add + RMSNorm and SwiGLU
    x, r, w = (torch.randn(3, 96, device=device).half() for _ in range(3))
    y, h = td.add_rms_norm(x, r, w[0], 1e-6)
    y_ref, h_ref = td.add_rms_norm_reference(x, r, w[0], 1e-6)
    assert torch.equal(h, h_ref) and _rel(y, y_ref) < 2e-3
    assert _rel(td.swiglu(x, r), x * torch.nn.functional.silu(r)) < 2e-3
    assert math.isfinite(float(out.float().sum()))


def test_decode_in_triton_interpreter():
    run_under_triton_interpreter(__file__, timeout=900)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["fp16", "int8"])
def test_decode_graph_on_gpu(kv_dtype):
    pytest.importorskip("triton")
    check_decode_matches_model("cuda", kv_dtype, steps=4, graph=True)


@pytest.mark.gpu
def test_decode_kernels_on_gpu():
    pytest.importorskip("triton")
    check_kernels("cuda")


if __name__ == "__main__":  # the interpreter run of test_decode_in_triton_interpreter
    torch.set_num_threads(1)
    check_kernels("cpu")
    check_decode_matches_model("cpu", "fp16", steps=2, graph=False)
    print("ok")

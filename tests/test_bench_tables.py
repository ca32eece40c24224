"""`qwen-int4 bench` pieces that run without a GPU: the tables for every precision and the
transformers peer, the bytes-per-token count per precision, and the peer's shapes."""
from __future__ import annotations

import pytest
import torch

from qwen_int4.cli import bench
from qwen_int4.config import QuantConfig, QwenConfig
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.quant.gptq import replace_linear_with_gptq
from qwen_int4.testing import gpu_model as gm

TINY = QwenConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, kv_channels=128,
                  intermediate_size=2 * 384, seq_length=64)


def _decode(n: int, tok_s: float, timed: int | None = None) -> dict:
    return {"tokens": n, "tokens_timed": timed or n, "tok_s": tok_s, "ms_per_token": 1e3 / tok_s, "mean_step_GB": 5.0,
            "achieved_GBps": 5.0 * tok_s, "roofline_tok_s": 400.0, "vs_roofline": tok_s / 400, "peak_GB": 7.0 + n / 1000}


def test_tables_have_a_row_per_precision_the_peer_and_failures(capsys):
    runs = [
        {"precision": "int4", "kv_dtype": "fp16", "kernel": "triton-gptq, CUDA graph", "encode_peak_GB": 6.5,
         "decode": [_decode(16, 200.0), _decode(32, 190.0)], "ttft_ms": 75.0},
        {"precision": "bf16", "kv_dtype": "bf16", "kernel": "cuBLAS, CUDA graph", "encode_peak_GB": 16.25,
         "decode": [_decode(16, 150.0), _decode(32, 140.0)], "ttft_ms": 60.0},
        {"precision": "int8", "kv_dtype": "fp16", "kernel": "torch-dequant, eager step", "encode_peak_GB": 9.0,
         "decode": [_decode(16, 20.0, timed=8), _decode(32, 19.0, timed=8)]},
        {"precision": bench.PEER, "kv_dtype": "bf16", "kernel": "transformers generate(), static cache, eager",
         "encode_peak_GB": 16.5, "decode": [_decode(16, 40.0), _decode(32, 39.5, timed=16)]},
        {"precision": "int4", "kv_dtype": "int8", "error": "RuntimeError: boom"},
    ]
    bench.print_tables({"info": {"device": "GPU"}, "copy_bandwidth_GBps": 2000.0, "runs": runs}, [16, 32], 64)
    out = capsys.readouterr().out
    assert "| int4 | fp16 | 200.0 | 190.0 | triton-gptq, CUDA graph |" in out
    assert "| bf16 | bf16 | 150.0 | 140.0 | cuBLAS, CUDA graph |" in out
    assert "| int8 | fp16 | 20.0* | 19.0* | torch-dequant, eager step |" in out
    assert "* int8: timed over the first 8 tokens only: a layer runs the torch-dequant" in out
    assert f"| {bench.PEER} | bf16 | 40.0 | 39.5* | transformers generate(), static cache, eager |" in out
    assert f"* {bench.PEER}: timed over the first 16 tokens only: transformers' eager generate() is host-bound" in out
    assert "| int4 | int8 | RuntimeError: boom | RuntimeError: boom |" in out
    assert "| bf16 | bf16 | 16.250 | 7.032 |" in out  # memory: encode peak, then the longest run's peak
    assert f"| {bench.PEER} | bf16 | 32 | 25.316 | 5.000 | 198 | 400 | 10% |" in out  # roofline detail
    assert "| int4 | 75.0 | 1.25x |" in out and "| bf16 | 60.0 | 1.00x |" in out  # time to first token
    assert "not supported" not in out


def test_bench_parser_peer_switch():
    from qwen_int4.cli.main import build_parser

    args = build_parser().parse_args(["bench"])
    assert args.peer is True and args.peer_max_tokens == bench.PEER_MAX_TOKENS
    args = build_parser().parse_args(["bench", "--no-peer", "--peer-max-tokens", "0"])
    assert args.peer is False and args.peer_max_tokens == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_step_bytes_count_bits_per_weight_plus_scales_zeros_and_bias(bits):
    """Independent count: a dense fp16 model's bytes, each block linear's weight replaced by
    bits/8 bytes per weight plus per-group (128) fp16 scale and bits-wide zero, plus an fp16 bias."""
    dense = QWenLMHeadModel(TINY).half()
    expected = gm.step_weight_bytes(dense)
    for name, module in dense.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer.h."):
            n, k = module.weight.shape
            groups = k // 128
            expected += -2 * n * k - (2 * n if module.bias is not None else 0)
            expected += n * k * bits // 8 + groups * n * 2 + groups * n * bits // 8 + 2 * n
    quant = replace_linear_with_gptq(QWenLMHeadModel(TINY).half(), QuantConfig(bits=bits, group_size=128))
    assert gm.step_weight_bytes(quant) == expected


def test_step_bytes_of_a_dense_model_are_two_bytes_a_weight_without_the_embedding_table():
    model = QWenLMHeadModel(TINY).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    wte = model.transformer.wte.weight
    assert gm.step_weight_bytes(model) == 2 * (params - wte.numel() + wte.shape[1])


def test_packed_zero_words():
    assert gm._packed_zero(4) == 0x77777777
    assert gm._packed_zero(8) == 0x7F7F7F7F


def test_peer_has_the_same_parameter_shapes_as_our_model():
    pytest.importorskip("transformers")
    from qwen_int4.testing import hf_peer

    assert hf_peer.transformers_problem() is None
    peer = hf_peer.build_qwen2_peer(TINY, device="cpu")
    ours = QWenLMHeadModel(TINY)
    assert peer.dtype == torch.bfloat16
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
    attn = peer.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None  # Qwen: qkv bias, no c_proj bias
    assert hf_peer.weight_bytes(peer) == gm.step_weight_bytes(ours.to(torch.bfloat16))
    run = hf_peer.PeerGenerate(peer)
    assert run.cache == "static"
    assert run(torch.tensor([[5]]), 6).shape == (1, 7)  # eos is off: exactly 6 new tokens
    assert run(torch.tensor([[5]]), 6, stop_after=3).shape == (1, 4)

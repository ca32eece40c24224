"""generate() on CUDA decodes through the CUDA-graph decoder (static KV cache) and gives the
greedy tokens of the model's own forward (QWEN_INT4_CUDA_GRAPH=0); where the graph path does
not apply it falls back. The CPU tests check that the CPU path never builds a decoder."""
from __future__ import annotations

import pytest
import torch

from qwen_int4.config import GenerationConfig, QwenConfig
from qwen_int4.engine import cuda_graph
from qwen_int4.generate import CUDA_GRAPH_ENV_VAR
from qwen_int4.model.qwen import QWenLMHeadModel

# seq_length 16: prompts + new tokens cross it, so the step's LogN (and NTK for long prompts) count
TINY = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "kv_channels": 32,
        "intermediate_size": 2 * 96, "seq_length": 16, "max_position_embeddings": 64}
GREEDY = {"do_sample": False, "repetition_penalty": 1.0, "eos_token_id": 255, "pad_token_id": 0}


def tiny_dense(device: str, dtype: torch.dtype = torch.float16) -> QWenLMHeadModel:
    """Tiny random model; lm_head scaled so greedy choices are far from ties (fused vs eager rounding)."""
    model = QWenLMHeadModel(QwenConfig(**TINY), GenerationConfig())
    model.init_weights(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model.to(device=device, dtype=dtype).eval()


class StepCounter:
    """Counts CUDAGraphDecoder.step calls (proves the graph path ran)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = cuda_graph.CUDAGraphDecoder.step

        def step(decoder, ids):
            self.calls += 1
            return original(decoder, ids)

        monkeypatch.setattr(cuda_graph.CUDAGraphDecoder, "step", step)


def both_paths(model, monkeypatch, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(graph-path output, eager output, graph steps taken) of model.generate(*args, **kwargs)."""
    counter = StepCounter(monkeypatch)
    monkeypatch.delenv(CUDA_GRAPH_ENV_VAR, raising=False)
    graph = model.generate(*args, **kwargs)
    steps = counter.calls
    monkeypatch.setenv(CUDA_GRAPH_ENV_VAR, "0")
    eager = model.generate(*args, **kwargs)
    assert counter.calls == steps  # the variable turned the graph path off
    monkeypatch.delenv(CUDA_GRAPH_ENV_VAR)
    return graph, eager, steps


def test_cpu_models_never_take_the_graph_path(monkeypatch):
    model = tiny_dense("cpu", torch.float32)
    assert "cpu" in cuda_graph.graph_decode_problem(model)
    counter = StepCounter(monkeypatch)
    monkeypatch.setattr(cuda_graph, "CUDAGraphDecoder", None)  # would fail if the CPU path touched it
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, **GREEDY)
    assert out.shape == (1, 7) and counter.calls == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_greedy_graph_equals_eager(dtype, monkeypatch):
    pytest.importorskip("triton")
    model = tiny_dense("cuda", dtype)
    ids = torch.tensor([[5, 17, 99, 3, 200]], device="cuda")
    new = 30 if dtype == torch.float16 else 14  # bf16 rounds 8x coarser: fewer chances of a near tie
    graph, eager, steps = both_paths(model, monkeypatch, ids, max_new_tokens=new, **GREEDY)
    assert steps == graph.shape[1] - ids.shape[1] - 1  # every token after the prefill's came from the graph
    assert torch.equal(graph, eager), (graph, eager)


@pytest.mark.gpu
def test_int4_triton_model_graph_equals_eager(monkeypatch):
    pytest.importorskip("triton")
    from test_decode_step import tiny_int4_model

    model = tiny_int4_model("cuda", layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # greedy choices far from ties, as tiny_dense
    ids = torch.tensor([[5, 17, 99, 3, 200, 7]], device="cuda")
    graph, eager, steps = both_paths(model, monkeypatch, ids, max_new_tokens=20, **GREEDY)
    assert steps > 0 and torch.equal(graph, eager)


@pytest.mark.gpu
def test_padded_batch_stop_words_and_streaming_through_the_graph(monkeypatch):
    pytest.importorskip("triton")
    model = tiny_dense("cuda")
    ids = torch.tensor([[0, 0, 9, 8, 7], [1, 2, 3, 4, 5]], device="cuda")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device="cuda")
    graph, eager, steps = both_paths(model, monkeypatch, ids, attention_mask=mask, max_new_tokens=12, **GREEDY)
    assert steps > 0 and torch.equal(graph, eager)
    # a stop word taken from the greedy continuation itself: row 0's first match forces eos next
    seq, stop = graph[0].tolist(), graph[0, 7:9].tolist()
    forced = next(p for p in range(5, len(seq)) if p - 2 >= 2 and seq[p - 2:p] == stop)
    g2, e2, _ = both_paths(model, monkeypatch, ids, attention_mask=mask, max_new_tokens=12,
                           stop_words_ids=[stop], **GREEDY)
    assert torch.equal(g2, e2) and g2[0, forced] == GREEDY["eos_token_id"]
    assert torch.equal(g2[0, :forced], graph[0, :forced])

    class Collect:
        def __init__(self):
            self.ids = []

        def put(self, value):
            self.ids.append(value)

        def end(self):
            self.ids.append(None)

    streamer = Collect()
    out = model.generate(ids[1:], max_new_tokens=6, streamer=streamer, **GREEDY)
    assert streamer.ids[-1] is None and torch.equal(torch.cat(streamer.ids[1:-1]), out[0, 5:].cpu())


@pytest.mark.gpu
def test_sampling_reads_the_graph_logits_and_is_seeded(monkeypatch):
    pytest.importorskip("triton")
    model = tiny_dense("cuda")
    with torch.no_grad():
        model.lm_head.weight.div_(30.0)  # a flat distribution: samples differ from greedy
    ids = torch.tensor([[5, 17, 99]], device="cuda")
    sample = {**GREEDY, "do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "max_new_tokens": 24}
    counter = StepCounter(monkeypatch)
    a = model.generate(ids, seed=3, **sample)
    b = model.generate(ids, seed=3, **sample)
    c = model.generate(ids, seed=4, **sample)
    assert counter.calls > 0 and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, model.generate(ids, max_new_tokens=24, **GREEDY))


@pytest.mark.gpu
def test_rows_with_different_ntk_alphas_fall_back_to_the_forward(monkeypatch):
    pytest.importorskip("triton")
    model = tiny_dense("cuda")
    torch.manual_seed(0)
    ids = torch.randint(1, 250, (2, 33), device="cuda")  # > seq_length 16: NTK alpha from the real length
    mask = torch.ones_like(ids)
    mask[0, :16] = 0  # 17 vs 33 real tokens: alphas 3 and 7
    ids[0, :16] = 0
    graph, eager, steps = both_paths(model, monkeypatch, ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    assert steps == 0 and torch.equal(graph, eager)
    one = ids[1:]  # one long row: one alpha (7), decoded through the graph
    graph, eager, steps = both_paths(model, monkeypatch, one, max_new_tokens=10, **GREEDY)
    assert steps > 0 and torch.equal(graph, eager)

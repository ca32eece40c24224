"""Random Qwen-7B-shaped models built straight on the GPU in seconds, and what is measured on
them: copy bandwidth, decode speed vs the memory-bandwidth roofline, time to first token, peak
memory. Used by `qwen-int4 bench` and benchmarks/gpu_decode.py; needs CUDA and Triton.

Bytes a decode step reads (the roofline's numerator): every GPTQ buffer the kernel uses, every
other weight except the embedding table (one row is read), plus the KV cache up to the step's
position (keys and values of every layer; + scale and zero per token and head for int8).
"""
from __future__ import annotations

import functools
import gc
import statistics

import torch

from ..config import QuantConfig, QwenConfig
from ..engine.cuda_graph import CUDAGraphDecoder
from ..model.qwen import QWenLMHeadModel
from ..model.static_cache import StaticKVCache
from ..quant.gptq import (
    GPTQLinear,
    prepare_quantized_layers,
    replace_linear_with_gptq,
)


def device_info() -> dict:
    """Name, SM count and memory of GPU 0, with the torch / Triton / CUDA versions."""
    p = torch.cuda.get_device_properties(0)
    import triton

    return {"device": p.name, "sms": p.multi_processor_count, "memory_GiB": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def time_graph(fn, replays: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of fn() (captured after two warm-up runs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy (read + write), median of 10 after warm-up."""
    src = torch.randn(int(gib * 2**30) // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_graph(functools.partial(dst.copy_, src), replays=10)
    return 2 * src.numel() * 2 / seconds


@torch.no_grad()
def build_int4_model(cfg: QwenConfig, seed: int = 0) -> QWenLMHeadModel:
    """Random Int4 (g128, sym zeros 0x77777777) model in fp16 on the GPU, kernels prepared."""
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    replace_linear_with_gptq(model, QuantConfig(bits=4, group_size=128))
    model = model.half().to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, module.qweight.shape, device="cuda",
                                               dtype=torch.int32, generator=gen))
            module.qzeros.fill_(0x77777777)
            module.scales.uniform_(0.004, 0.01, generator=gen)  # ~ 2 max|w| / 15 for w ~ N(0, 0.02)
            module.g_idx.copy_(torch.arange(module.in_features, device="cuda") // 128)
            module.bias.normal_(0.0, 0.02, generator=gen)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0.0, 0.02, generator=gen)
        elif hasattr(module, "eps"):  # RMSNorm
            module.weight.fill_(1.0)
    prepare_quantized_layers(model, kernel="triton-gptq")
    return model.eval()


@torch.no_grad()
def build_dense_model(cfg: QwenConfig, dtype: torch.dtype = torch.bfloat16) -> QWenLMHeadModel:
    """Random dense model (nn.Linear through cuBLAS) on the GPU: the TTFT baseline."""
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    model = model.to(dtype).to_empty(device="cuda")
    model.init_weights(0)
    return model.eval()


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads (not the embedding table, not replaced checkpoint buffers)."""
    total = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in own:
            if t is None or module is model.transformer.wte or name == "g_idx":
                continue
            if isinstance(module, GPTQLinear) and module.kernel is not None and name in ("scales",):
                continue  # the kernel reads its own permuted copy
            total += t.numel() * t.element_size()
    return total + model.config.hidden_size * 2  # one embedding row


def kv_bytes_per_token(cache: StaticKVCache) -> int:
    return cache.nbytes // (cache.max_len * cache.batch_size)


def time_once(fn) -> float:
    """Seconds of one call of fn() on the GPU (events; synchronizes)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@torch.inference_mode()
def bench_decode(model: QWenLMHeadModel, tokens: int, kv_dtype: str, bandwidth: float) -> dict:
    """Greedy decode of `tokens` tokens after a 1-token prompt, one CUDA graph replay per token.

    Also the peak GPU memory of the run (max_memory_allocated, GB, from the state on entry).
    """
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = StaticKVCache.for_model(model, 1, tokens + 4, kv_dtype)
    decoder = CUDAGraphDecoder(model, cache, greedy=True)
    prompt = torch.tensor([[100]], device="cuda")
    first = decoder.prefill(prompt).argmax(-1)
    decoder.capture()
    seconds = time_once(lambda: decoder.generate_greedy(first, tokens))
    peak = torch.cuda.max_memory_allocated() / 1e9
    weights, per_token = step_weight_bytes(model), kv_bytes_per_token(cache)
    mean_ctx = 1 + (tokens + 1) / 2  # positions read by the steps, on average
    step_bytes = weights + per_token * mean_ctx
    return {
        "kv_dtype": kv_dtype, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
        "ms_per_token": seconds / tokens * 1e3, "weight_GB": weights / 1e9, "mean_step_GB": step_bytes / 1e9,
        "roofline_tok_s": bandwidth / step_bytes, "vs_roofline": tokens / seconds / (bandwidth / step_bytes),
        "achieved_GBps": step_bytes * tokens / seconds / 1e9, "peak_GB": peak,
    }


@torch.inference_mode()
def prefill_seconds(model: QWenLMHeadModel, tokens: int, repeats: int = 3) -> float:
    """Median time to first token: a `tokens`-long prompt into a static cache, last logits only."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    cache = StaticKVCache.for_model(model, 1, tokens + 1)

    def run() -> None:
        cache.reset()
        model(ids, past_key_values=cache, logits_to_keep=1)

    run()
    return statistics.median(time_once(run) for _ in range(repeats))


@torch.inference_mode()
def encode_peak(model: QWenLMHeadModel, tokens: int, kv_dtype: str = "fp16") -> float:
    """Peak GB encoding a `tokens` prompt and generating one token (eager forward, static cache)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = StaticKVCache.for_model(model, 1, tokens + 1, kv_dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    model(logits.argmax(-1)[:, None], past_key_values=cache, logits_to_keep=1)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def peak_memory(model: QWenLMHeadModel, encode: int, generate: int, kv_dtype: str = "fp16") -> dict:
    """Peak GPU memory (max_memory_allocated, GB): encoding `encode` tokens (+1 generated), and
    generating `generate` tokens from a 1-token context (whose tok/s is recorded too)."""
    out = {"kv_dtype": kv_dtype, f"encode_{encode}_GB": encode_peak(model, encode, kv_dtype)}
    if generate:
        run = bench_decode(model, generate, kv_dtype, bandwidth=float("nan"))
        out[f"generate_{generate}_GB"], out[f"generate_{generate}_tok_s"] = run["peak_GB"], run["tok_s"]
    torch.cuda.empty_cache()
    return out

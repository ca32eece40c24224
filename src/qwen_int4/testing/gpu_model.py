"""Random Qwen-7B-shaped models (Int4 / Int8 GPTQ, BF16) built straight on the GPU in seconds,
and what is measured on them: copy bandwidth, decode speed vs the memory-bandwidth roofline,
time to first token, peak memory. Used by `qwen-int4 bench` and benchmarks/gpu_decode.py;
needs CUDA and Triton. transformers' peer model: testing/hf_peer.py.

Bytes a decode step reads (the roofline's numerator): every GPTQ layer in the checkpoint layout
(bits per weight and zero, fp16 scales, bias), every other weight as stored except the embedding
table (one row is read), plus the KV cache up to the step's position (keys and values of every
layer; + scale and zero per token and head for int8).
"""
from __future__ import annotations

import functools
import gc
import math
import statistics

import torch

from ..config import QuantConfig, QwenConfig
from ..engine.cuda_graph import CUDAGraphDecoder, graph_capturable
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


def _packed_zero(bits: int) -> int:
    """An int32 word of stored zero points 2^(bits-1) - 1 (the zero 2^(bits-1) minus one, as GPTQ stores)."""
    word = 0
    for i in range(32 // bits):
        word |= ((1 << (bits - 1)) - 1) << (bits * i)
    return word - (1 << 32) if word >= 1 << 31 else word


# scales ~ 2 max|w| / (2^bits - 1) for w ~ N(0, 0.02)
_SCALE_RANGE = {4: (0.004, 0.01), 8: (0.00025, 0.0006)}


@torch.no_grad()
def build_gptq_model(cfg: QwenConfig, bits: int = 4, seed: int = 0, kernel: str | None = None) -> QWenLMHeadModel:
    """Random GPTQ (g128, symmetric zeros) fp16 model on the GPU, each layer prepared by the
    kernel the registry ranks first for it (or `kernel`): see `gptq_kernels(model)`."""
    if bits not in _SCALE_RANGE:
        raise ValueError(f"bits must be one of {sorted(_SCALE_RANGE)}, got {bits}")
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    replace_linear_with_gptq(model, QuantConfig(bits=bits, group_size=128))
    model = model.half().to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, module.qweight.shape, device="cuda",
                                               dtype=torch.int32, generator=gen))
            module.qzeros.fill_(_packed_zero(bits))
            module.scales.uniform_(*_SCALE_RANGE[bits], generator=gen)
            module.g_idx.copy_(torch.arange(module.in_features, device="cuda") // 128)
            module.bias.normal_(0.0, 0.02, generator=gen)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0.0, 0.02, generator=gen)
        elif hasattr(module, "eps"):  # RMSNorm
            module.weight.fill_(1.0)
    prepare_quantized_layers(model, kernel=kernel)
    return model.eval()


def build_int4_model(cfg: QwenConfig, seed: int = 0) -> QWenLMHeadModel:
    """Random Int4 (g128, sym zeros 0x77777777) model in fp16 on the GPU, triton-gptq kernels."""
    return build_gptq_model(cfg, 4, seed, kernel="triton-gptq")


@torch.no_grad()
def build_dense_model(cfg: QwenConfig, dtype: torch.dtype = torch.bfloat16) -> QWenLMHeadModel:
    """Random dense model (nn.Linear through cuBLAS) on the GPU: the BF16 row and the TTFT baseline."""
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    model = model.to(dtype).to_empty(device="cuda")
    model.init_weights(0)
    return model.eval()


def build_model(precision: str, cfg: QwenConfig) -> QWenLMHeadModel:
    """The random 7B-shaped model of a `qwen-int4 bench` precision: int4, int8 (GPTQ, fp16
    activations, the registry's kernels) or bf16 (plain linears)."""
    if precision == "bf16":
        return build_dense_model(cfg, torch.bfloat16)
    if precision in ("int4", "int8"):
        return build_gptq_model(cfg, int(precision[3:]))
    raise ValueError(f"precision must be int4, int8 or bf16, got {precision!r}")


def linear_kernels(model: torch.nn.Module) -> dict[str, int]:
    """{kernel name: layers} of the block linears: GPTQ kernels by name, nn.Linear as cuBLAS."""
    counts: dict[str, int] = {}
    for block in model.transformer.h:
        for module in block.modules():
            name = None
            if isinstance(module, GPTQLinear):
                name = module.kernel.name if module.kernel is not None else "torch-dequant (unprepared)"
            elif isinstance(module, torch.nn.Linear):
                name = "cuBLAS" if module.weight.is_cuda else "torch"
            if name:
                counts[name] = counts.get(name, 0) + 1
    return counts


def gptq_layer_bytes(layer: GPTQLinear) -> int:
    """Bytes of a GPTQ layer in the checkpoint layout: codes, zeros (bits each), fp16 scales, bias
    (and g_idx with act-order); a repacked copy of the same data has the same size."""
    n, k, bits = layer.out_features, layer.in_features, layer.bits
    groups = math.ceil(k / (k if layer.group_size == -1 else layer.group_size))
    total = k * n * bits // 8 + groups * n * bits // 8 + groups * n * 2  # codes, zeros, fp16 scales
    total += 2 * n if layer.bias is not None else 0  # fp16 bias
    return total + (k * 4 if layer.desc_act else 0)  # int32 g_idx (act-order)


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: GPTQ layers by `gptq_layer_bytes`, every other
    parameter and buffer as stored, the embedding table as the one row it reads."""
    total = 0
    wte = model.transformer.wte
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            total += gptq_layer_bytes(module)
            continue
        if module is wte:
            total += wte.weight.shape[1] * wte.weight.element_size()
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            total += t.numel() * t.element_size()
    return total


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
def bench_decode(model: QWenLMHeadModel, tokens: int, kv_dtype: str, bandwidth: float, eager_tokens: int = 32) -> dict:
    """Greedy decode of `tokens` tokens after a 1-token prompt, one CUDA graph replay per token.

    A model that cannot be captured (a GPTQ layer on the torch-dequant reference kernel) runs
    the same step eagerly, timed over its first `eager_tokens` tokens only (`tokens_timed`);
    its cache is still allocated for `tokens`. Also the peak GPU memory of the run
    (max_memory_allocated, GB, from the state on entry).
    """
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = StaticKVCache.for_model(model, 1, tokens + 4, kv_dtype)
    graph = graph_capturable(model)
    decoder = CUDAGraphDecoder(model, cache, greedy=True, graph=graph)
    prompt = torch.tensor([[100]], device="cuda")
    first = decoder.prefill(prompt).argmax(-1)
    timed = tokens if graph else min(tokens, eager_tokens)
    if graph:
        decoder.capture()
    else:
        decoder.generate_greedy(first, 2)  # warm-up, overwritten below
        decoder.prefill(prompt)
    seconds = time_once(lambda: decoder.generate_greedy(first, timed))
    peak = torch.cuda.max_memory_allocated() / 1e9
    return {"kv_dtype": kv_dtype, "graph": graph, **decode_figures(step_weight_bytes(model), kv_bytes_per_token(cache),
                                                                 tokens, timed, seconds, bandwidth), "peak_GB": peak}


def decode_figures(weight_bytes: int, kv_per_token: int, tokens: int, timed: int, seconds: float, bandwidth: float) -> dict:
    """tok/s, bytes per step (weights + KV at the mean context of the timed steps) and the roofline."""
    mean_ctx = 1 + (timed + 1) / 2  # positions read by the steps, on average
    step_bytes = weight_bytes + kv_per_token * mean_ctx
    tok_s = timed / seconds
    return {
        "tokens": tokens, "tokens_timed": timed, "seconds": seconds, "tok_s": tok_s, "ms_per_token": 1e3 / tok_s,
        "weight_GB": weight_bytes / 1e9, "mean_step_GB": step_bytes / 1e9, "roofline_tok_s": bandwidth / step_bytes,
        "vs_roofline": tok_s / (bandwidth / step_bytes), "achieved_GBps": step_bytes * tok_s / 1e9,
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

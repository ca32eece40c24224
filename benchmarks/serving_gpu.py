"""Serving throughput of the continuous-batching engine on one GPU, random 7B-shaped Int4 model.

    PYTHONPATH=src python benchmarks/serving_gpu.py --out serving_gpu.json

For each (concurrency N, prompt length, output length): N requests of random prompt ids
(distinct, so the prefix cache does not help) are submitted at once through AsyncEngine (the
server's engine API, without HTTP), each generating exactly `output` tokens (ignore_eos).
Reported: output tokens/s over the wall time of the run, time to first token (mean, p50, p99;
from submission to the first output carrying a token) and the mean inter-token latency (per
request (last - first output time) / (tokens - 1), averaged). Also the single-request fast
path (CUDAGraphDecoder over a static cache, testing/gpu_model.bench_decode) at the same
length, for the batch-1 comparison. `--kv-cache-dtype int8` runs the engine over an int8 KV
pool (engine/paged_cache.py). `--tiny` runs a tiny random model instead (CPU smoke run).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import torch

from qwen_int4.config import QwenConfig
from qwen_int4.engine import EngineConfig, LLMEngine, SamplingParams
from qwen_int4.engine.async_engine import AsyncEngine
from qwen_int4.tokenizer import QWenTokenizer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(engine: AsyncEngine, request_id: str, prompt: list[int], output: int) -> dict:
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async for out in engine.generate(request_id, prompt, params):
        new = len(out.outputs[0].delta_token_ids)
        if new:
            last = time.perf_counter()
            first = first or last
            tokens += new
    return {"ttft": first - start, "tokens": tokens, "itl": (last - first) / max(tokens - 1, 1)}


async def run_load(engine: AsyncEngine, n: int, prompt_len: int, output: int, vocab: int, tag: str) -> dict:
    rng = random.Random(n * 7919 + prompt_len)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]
    start = time.perf_counter()
    results = await asyncio.gather(*(one_request(engine, f"{tag}-{i}", p, output) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": n, "prompt_tokens": prompt_len, "output_tokens": output, "wall_s": wall,
        "output_tok_s": tokens / wall, "ttft_mean_ms": 1e3 * statistics.mean(ttft),
        "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_mean_ms": 1e3 * statistics.mean(r["itl"] for r in results),
    }


class StepTimes:
    """Wall time of the engine's steps, of the runner (host work and launches; a graph replay does not
    wait) and of sampling (waits for the device), summed between `take` calls."""

    def __init__(self, engine: LLMEngine) -> None:
        import qwen_int4.engine.engine as engine_module

        self.totals = dict.fromkeys(("step", "execute", "sample"), 0.0)
        self.steps = 0
        engine.step = self._timed("step", engine.step, count=True)
        engine.runner.execute = self._timed("execute", engine.runner.execute)
        engine_module.sample = self._timed("sample", engine_module.sample)

    def _timed(self, name, fn, count=False):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.totals[name] += time.perf_counter() - start
                self.steps += count
        return wrapper

    def take(self) -> dict:
        n = max(self.steps, 1)
        out = {"steps": self.steps, **{f"{k}_ms_per_step": 1e3 * v / n for k, v in self.totals.items()}}
        self.totals = dict.fromkeys(self.totals, 0.0)
        self.steps = 0
        return out


@torch.inference_mode()
def profile_decode(engine: LLMEngine, batches: list[int], context: int) -> list[dict]:
    """Device time of one decode graph replay per batch size at `context` cached tokens per sequence,
    and of the paged attention alone (all layers). Overwrites pool blocks: run it last."""
    from qwen_int4.engine.paged_cache import KVPool
    from qwen_int4.engine.paged_decode import decode_splits
    from qwen_int4.kernels.triton_paged import paged_decode_attention

    runner, cfg = engine.runner, engine.model.config
    graphs, pool, bs = runner.graphs, runner.kv, runner.block_size
    engine.pool.reset_prefix_cache()
    per_seq = -(-(context + 1) // bs)
    rows = []
    for batch in batches:
        if graphs is None or batch > graphs.max_batch or batch * per_seq > pool.pad_block:
            continue
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
        slots = [t[context // bs] * bs + context % bs for t in tables]
        graphs.run([100] * batch, [context] * batch, slots, tables)
        bucket = next(b for b in graphs.buckets if b >= batch)

        def events(fn, repeats=10):
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        replay = events(graphs.graphs[bucket].replay)
        q = torch.randn(batch, cfg.num_attention_heads, cfg.head_dim, device="cuda", dtype=engine.model.dtype)
        tab = torch.tensor(tables, dtype=torch.int32, device="cuda")
        lens = torch.full((batch,), context + 1, dtype=torch.int32, device="cuda")
        splits = decode_splits(batch)
        def all_layers(q=q, tab=tab, lens=lens, splits=splits):
            for i in range(cfg.num_hidden_layers):
                paged_decode_attention(q, *pool.layer(i), tab, lens, splits)

        attention = events(all_layers, repeats=5)
        kv_bytes = batch * (context + 1) * KVPool.bytes_per_block(  # keys, values (and int8 scales, zeros) read
            cfg.num_hidden_layers, 1, cfg.num_attention_heads, cfg.head_dim, engine.model.dtype, pool.kv_cache_dtype)
        rows.append({"batch": batch, "context": context, "graph_replay_ms": replay, "attention_ms": attention,
                     "attention_GBps": kv_bytes / attention / 1e6})
        print(f"decode step B={batch:4d} ctx {context}: graph {replay:7.2f} ms, paged attention {attention:6.2f} ms "
              f"({kv_bytes / attention / 1e6:7.0f} GB/s)", flush=True)
    return rows


TUNE_CONFIGS = [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]


@torch.inference_mode()
def tune_attention(num_layers: int, heads: int, head_dim: int, cases: list[tuple[int, int]], block_size: int = 16,
                   kv_cache_dtype: str = "auto", configs: list[tuple[int, int] | None] | None = None):
    """Time the paged decode kernel's (tile, warps) choices at each (batch, context) (the engine uses
    triton_paged.decode_launch_config, chosen from these figures), over fp16 or int8 pools. GB/s counts
    the bytes the kernel must read (keys, values and, int8, their scales and zeros). configs: (tile,
    warps) pairs, None for decode_launch_config's choice; default TUNE_CONFIGS."""
    from qwen_int4.engine.paged_cache import KVPool
    from qwen_int4.engine.paged_decode import decode_splits
    from qwen_int4.kernels import triton_paged as tp

    configs = configs or TUNE_CONFIGS
    results = []
    per_token = KVPool.bytes_per_block(num_layers, 1, heads, head_dim, torch.float16, kv_cache_dtype)
    for batch, context in cases:
        per_seq = -(-(context + 1) // block_size)
        kv = KVPool(1, batch * per_seq, block_size, heads, head_dim, torch.float16, torch.device("cuda"), kv_cache_dtype)
        for t in (kv.k[0], kv.v[0], *(kv.meta[0] if kv.meta else ())):  # random keys, values, scales, zeros
            t.copy_(torch.randint(0, 256, t.shape, device="cuda") if t.dtype == torch.uint8
                    else torch.randn(t.shape, device="cuda") * (0.01 if kv.meta else 1))
        pool = kv.layer(0)
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.float16)
        tables = torch.arange(batch * per_seq, dtype=torch.int32, device="cuda").view(batch, per_seq)
        lens = torch.full((batch,), context + 1, dtype=torch.int32, device="cuda")
        for config in configs:
            tile, warps = config or tp.decode_launch_config(decode_splits(batch), kv.meta is not None)

            def run(tile=tile, warps=warps, pool=pool, q=q, tables=tables, lens=lens, batch=batch):
                for _ in range(num_layers):
                    tp.paged_decode_attention(q, *pool, tables, lens, decode_splits(batch), tile, warps)

            run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                run()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / 3
            gbps = batch * (context + 1) * per_token / ms / 1e6
            results.append({"batch": batch, "context": context, "kv_cache_dtype": kv_cache_dtype, "tile": tile,
                            "warps": warps, "default": config is None, "ms": ms, "GBps": gbps})
            print(f"paged attention {kv_cache_dtype} B={batch} ctx={context} tile={tile} warps={warps}"
                  f"{' (default)' if config is None else ''}: {ms:.2f} ms ({gbps:.0f} GB/s)", flush=True)
        del pool, kv
    return results


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def build(tiny: bool):
    if tiny:
        cfg = QwenConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                         intermediate_size=192, seq_length=8192)
        from qwen_int4.model.qwen import QWenLMHeadModel

        model = QWenLMHeadModel(cfg)
        model.init_weights(0)
        return model.eval()
    from qwen_int4.testing import gpu_model as gm

    return gm.build_int4_model(QwenConfig())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--long-concurrency", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--long-prompt", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                    help="the engine's KV pool: auto = the model's dtype (fp16), int8 = uint8 + scale/zero")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--profile-context", type=int, default=192, help="decode step profile context (0: skip)")
    ap.add_argument("--tune-attention", action="store_true", help="time the decode kernel's tile/warps first")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (smoke run, CPU)")
    ap.add_argument("--out", default="serving_gpu.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = build(args.tiny)
    cuda = model.device.type == "cuda"
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "args": vars(args), "runs": []}
    single = None
    if cuda and not args.tiny:
        from qwen_int4.testing import gpu_model as gm

        single = gm.bench_decode(model, args.output, "fp16", float("nan"))
        report["single_request_fast_path"] = {"tokens": args.output, "tok_s": single["tok_s"]}
        print(f"single-request fast path (CUDAGraphDecoder), {args.output} tokens: {single['tok_s']:.1f} tok/s")
    if cuda and args.tune_attention:
        cfg = model.config
        report["attention_tuning"] = tune_attention(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim,
                                                    [(256, 192), (64, 2100), (8, 2100)],
                                                    kv_cache_dtype=args.kv_cache_dtype)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization if cuda else None,
                          kv_cache_gb=None if cuda else 0.25, cuda_graphs=not args.no_cuda_graphs,
                          kv_cache_dtype=args.kv_cache_dtype)
    engine = LLMEngine(model, QWenTokenizer(), config)
    report["kv_cache_dtype"] = args.kv_cache_dtype
    report["kv_blocks"] = engine.pool.num_blocks
    report["setup_s"] = time.perf_counter() - t0
    print(f"{report['device']}: engine ready in {report['setup_s']:.1f} s, {engine.pool.num_blocks} KV blocks "
          f"of {config.block_size} (kv_cache_dtype {args.kv_cache_dtype})")
    timer = StepTimes(engine)
    async_engine = AsyncEngine(engine)
    vocab = min(model.config.vocab_size, 151851)

    async def all_runs() -> None:
        for n in (1, 3, 6, 12, 24, 48):  # warm-up: Triton compiles, decode splits of every size
            await run_load(async_engine, n, 24, 4, vocab, f"warm{n}")
        timer.take()
        plan = [(n, args.prompt) for n in args.concurrency] + [(n, args.long_prompt) for n in args.long_concurrency]
        for n, prompt_len in plan:
            r = await run_load(async_engine, n, prompt_len, args.output, vocab, f"run{n}-{prompt_len}")
            if n == 1 and single is not None and prompt_len == args.prompt:
                r["vs_single_request"] = r["output_tok_s"] / single["tok_s"]  # wall time: prefill included
                r["decode_vs_single_request"] = 1e3 / r["itl_mean_ms"] / single["tok_s"]  # per generated token
                print(f"batch 1 vs the single-request fast path: {r['decode_vs_single_request']:.3f}x per token "
                      f"(ITL {r['itl_mean_ms']:.3f} ms vs {1e3 / single['tok_s']:.3f} ms), "
                      f"{r['vs_single_request']:.3f}x over the wall time", flush=True)
            r["engine"] = timer.take()
            report["runs"].append(r)
            write_json(args.out, report)  # after every run: a timed-out benchmark keeps what it measured
            print(f"N={n:4d} {prompt_len:5d}+{args.output} KV {args.kv_cache_dtype}: {r['output_tok_s']:9.1f} out tok/s  "
                  f"TTFT mean {r['ttft_mean_ms']:8.1f} p50 {r['ttft_p50_ms']:8.1f} p99 {r['ttft_p99_ms']:8.1f} ms  "
                  f"ITL {r['itl_mean_ms']:6.2f} ms  ({r['wall_s']:.2f} s)", flush=True)
            print("      engine per step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r["engine"].items()), flush=True)

    try:
        asyncio.run(all_runs())
    finally:
        async_engine.shutdown()
    report["preemptions"] = engine.num_preemptions
    if cuda and args.profile_context:
        report["decode_profile"] = profile_decode(engine, [1, 8, 32, 64, 128, 256], args.profile_context)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

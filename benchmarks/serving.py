"""Load generator for a running OpenAI-compatible server (`qwen-int4 serve`, or any other).

    qwen-int4 serve --model DIR --port 8000 &
    PYTHONPATH=src python benchmarks/serving.py --base-url http://127.0.0.1:8000 \\
        --concurrency 1 8 --num-prompts 32 --input-len 128 --output-len 64

For each concurrency, `num_prompts` streamed /v1/completions requests are kept `concurrency`
at a time in flight. Prompts are random token ids of exactly `input-len` tokens (distinct,
so the prefix cache does not help), and every request generates exactly `output-len` tokens
(ignore_eos, counted from the final usage chunk). Reported per run: output tokens/s and
requests/s over the wall time, time to first token (TTFT: first chunk with text),
time per output token after the first (TPOT: (latency - TTFT) / (tokens - 1)), and
inter-token latency (ITL: gaps between chunks; each chunk normally holds one token).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class Result:
    ttft: float
    latency: float
    output_tokens: int
    gaps: list[float]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"error in stream: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    end = time.perf_counter()
    return Result(ttft=(first or end) - start, latency=end - start, output_tokens=tokens, gaps=gaps)


async def run(base_url: str, model: str, concurrency: int, prompts: list[list[int]], output_len: int) -> dict:
    url = f"{base_url}/v1/completions"
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            results.append(await one_request(client, url, model, prompt, output_len))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        duration = time.perf_counter() - start
    out_tokens = sum(r.output_tokens for r in results)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]
    gaps = [g for r in results for g in r.gaps]
    ttft = [r.ttft for r in results]
    return {
        "concurrency": concurrency, "requests": len(results), "duration_s": duration,
        "output_tok_s": out_tokens / duration, "requests_s": len(results) / duration,
        "ttft_mean_ms": 1000 * statistics.mean(ttft), "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99), "tpot_mean_ms": 1000 * statistics.mean(tpot) if tpot else float("nan"),
        "itl_p50_ms": 1000 * percentile(gaps, 50), "itl_p99_ms": 1000 * percentile(gaps, 99),
        "output_tokens": out_tokens,
    }


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 150000) for _ in range(length)] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model id (default: the server's first model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")
    args = ap.parse_args()

    model = args.model or httpx.get(f"{args.base_url}/v1/models").json()["data"][0]["id"]
    print(f"server {args.base_url}, model {model}: {args.num_prompts} requests per run, "
          f"{args.input_len} prompt tokens, {args.output_len} output tokens")
    header = ("conc", "req", "time s", "out tok/s", "req/s", "TTFT mean", "TTFT p50", "TTFT p99", "TPOT", "ITL p50",
              "ITL p99")
    if not args.json:
        print(" | ".join(header))
    for i, concurrency in enumerate(args.concurrency):
        prompts = make_prompts(args.num_prompts, args.input_len, args.seed + 1000 * i)
        r = asyncio.run(run(args.base_url, model, concurrency, prompts, args.output_len))
        if args.json:
            print(json.dumps(r))
            continue
        print(" | ".join([str(r["concurrency"]), str(r["requests"]), f"{r['duration_s']:.1f}", f"{r['output_tok_s']:.1f}",
                          f"{r['requests_s']:.2f}", f"{r['ttft_mean_ms']:.0f} ms", f"{r['ttft_p50_ms']:.0f} ms",
                          f"{r['ttft_p99_ms']:.0f} ms", f"{r['tpot_mean_ms']:.1f} ms", f"{r['itl_p50_ms']:.1f} ms",
                          f"{r['itl_p99_ms']:.1f} ms"]))


if __name__ == "__main__":
    main()

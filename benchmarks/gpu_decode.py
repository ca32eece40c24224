"""GPU speed of the Int4 fast path at Qwen-7B shapes, against the memory-bandwidth roofline.

    PYTHONPATH=src python benchmarks/gpu_decode.py [--kernels] [--sweep] [--decode] [--prefill]
        [--memory] [--tokens 2048] [--out results.json]

Random weights, built on the GPU in seconds (no checkpoint is read). Sections:
  (always) HBM copy bandwidth: a device-to-device copy of 2 GiB, bytes read + written.
  --kernels  each Qwen-7B linear shape: Triton GEMV (1 row), skinny GEMM (16 rows) and
             prefill (2048 rows, dequantize + cuBLAS) against dense fp16 cuBLAS, timed as CUDA
             graphs over 32 distinct weight copies (as the 32 layers: no L2 reuse);
             --sweep tries many launch configurations.
  --decode   end-to-end greedy decode (static KV cache + CUDA graph) of the full random model:
             tok/s over --tokens generated tokens from a 1-token prompt, vs the roofline.
  --prefill  time to first token of a 2048-token prompt, Int4 vs a dense BF16 model.
  --memory   peak GPU memory: encode 2048 tokens; generate 8192 tokens.
The roofline of a step is (bytes it must read) / (measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from qwen_int4.kernels import triton_gptq as tg
from qwen_int4.testing import gpu_model as gm
from qwen_int4.testing.gpu_model import copy_bandwidth, device_info, time_graph

# Qwen-7B linears (in_features K, out_features N); w1 and w2 share a shape
LINEARS = {"attn.c_attn": (4096, 12288), "attn.c_proj": (4096, 4096), "mlp.w1|w2": (4096, 11008), "mlp.c_proj": (11008, 4096)}
LAYERS = 32
GROUP = 128


def each(fn, x: torch.Tensor | None, weights: list, *args):
    """A callable running fn(x, w, *args) (fn(w) when x is None) for every w: one graph of len(weights) launches."""
    if x is None:
        return lambda: [fn(w) for w in weights]
    return lambda: [fn(x, w, *args) for w in weights]


def random_gptq(k: int, n: int, seed: int) -> tg.GPTQWeights:
    """Random N-packed int4 weights (sym zeros 0x77777777, scales ~1e-3), straight on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    words = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 1e-3 + 5e-4).half()
    zeros = torch.full((k // GROUP, n // 8), 0x77777777, dtype=torch.int32, device="cuda")
    bias = torch.zeros(n, dtype=torch.float16, device="cuda")
    return tg.GPTQWeights(words, zeros, scales, None, bias, GROUP)


def gptq_bytes(k: int, n: int) -> int:
    """Bytes one GPTQ linear reads: int4 weights, fp16 scales, int4 zeros, fp16 bias."""
    groups = k // GROUP
    return k * n // 2 + groups * n * 2 + groups * n // 2 + n * 2


def gemv_configs(sweep: bool) -> list[tg.GemvConfig | None]:
    if not sweep:
        return [None]
    shapes = [(32, 16, 4, (2, 4, 8, 12)), (16, 16, 2, (4, 8)), (64, 8, 4, (4, 8)), (32, 8, 2, (4, 8))]
    return [None] + [tg.GemvConfig(c, k, s, w) for c, k, w, splits in shapes for s in splits]


def gemm_configs(sweep: bool) -> list[tg.GemmConfig | None]:
    if not sweep:
        return [None]
    shapes = [(32, 64, 4, 3, (4, 8, 16)), (32, 32, 4, 4, (8,)), (64, 64, 8, 3, (8,))]
    return [None] + [tg.GemmConfig(c, k, s, w, st) for c, k, w, st, splits in shapes for s in splits]


def best_time(label: str, fn, x: torch.Tensor, copies: list, configs: list, nbytes: int, bandwidth: float):
    """(seconds per call, config) of the fastest configuration of fn(x, w, config) over the copies."""
    best = None
    for cfg in configs:
        try:
            t = time_graph(each(fn, x, copies, cfg)) / len(copies)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or launch
            print(f"  {label} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
            continue
        print(f"  {label} {cfg}: {t * 1e6:.2f} us ({nbytes / t / bandwidth:.0%} of copy BW)", file=sys.stderr)
        if best is None or t < best[0]:
            best = (t, cfg)
    return best


def bench_linears(sweep: bool, bandwidth: float) -> list[dict]:
    """Per linear shape: best Triton time at 1 / 16 / 2048 rows vs dense cuBLAS and the roofline."""
    rows = []
    for name, (k, n) in LINEARS.items():
        copies = [random_gptq(k, n, seed=i) for i in range(LAYERS)]
        nbytes = gptq_bytes(k, n)
        x1 = torch.randn(1, k, dtype=torch.float16, device="cuda")
        x16 = torch.randn(16, k, dtype=torch.float16, device="cuda")
        result = {"linear": name, "K": k, "N": n, "MB": nbytes / 1e6, "roofline_us": nbytes / bandwidth * 1e6}
        for label, fn, x, configs in [("gemv", tg.gptq_gemv, x1, gemv_configs(sweep)),
                                      ("gemm1", tg.gptq_gemm, x1, gemm_configs(sweep)),
                                      ("gemm16", tg.gptq_gemm, x16, gemm_configs(sweep))]:
            t, cfg = best_time(f"{name} {label}", fn, x, copies, configs, nbytes, bandwidth)
            result[f"{label}_us"] = t * 1e6
            result[f"{label}_cfg"] = asdict(cfg) if cfg else "default"
            result[f"{label}_vs_copy_bw"] = nbytes / t / bandwidth
        # dense fp16 cuBLAS, 8 copies ([N, K] each, nn.Linear layout) rotate past L2
        dense = [torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02 for _ in range(8)]
        result["cublas_gemv_us"] = time_graph(each(F.linear, x1, dense)) / 8 * 1e6
        result["cublas_gemv_vs_copy_bw"] = 2 * k * n / (result["cublas_gemv_us"] / 1e6) / bandwidth
        result["cublas_gemm16_us"] = time_graph(each(F.linear, x16, dense)) / 8 * 1e6
        x_pre = torch.randn(2048, k, dtype=torch.float16, device="cuda")
        result["cublas_prefill2048_us"] = time_graph(each(F.linear, x_pre, dense), replays=5) / 8 * 1e6
        dense.clear()
        result["int4_prefill2048_us"] = time_graph(each(tg.gptq_linear, x_pre, copies[:8]), replays=5) / 8 * 1e6
        result["dequant_us"] = time_graph(each(tg.gptq_dequantize, None, copies[:8]), replays=5) / 8 * 1e6
        result["dequant_vs_copy_bw"] = (nbytes + 2 * k * n) / (result["dequant_us"] / 1e6) / bandwidth
        rows.append(result)
        print(json.dumps(result), file=sys.stderr)
        copies.clear()
    return rows


def print_linear_table(rows: list[dict]) -> None:
    print("| linear | K x N | MB | roofline us | Triton GEMV us (% copy BW) | Triton tl.dot 1 row us (%) "
          "| cuBLAS fp16 GEMV us (% copy BW) "
          "| Triton 16 rows us | cuBLAS 16 rows us | int4 / dense 2048 rows us | dequant us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['linear']} | {r['K']}x{r['N']} | {r['MB']:.1f} | {r['roofline_us']:.2f} "
              f"| {r['gemv_us']:.2f} ({r['gemv_vs_copy_bw']:.0%}) | {r['gemm1_us']:.2f} ({r['gemm1_vs_copy_bw']:.0%}) "
              f"| {r['cublas_gemv_us']:.2f} ({r['cublas_gemv_vs_copy_bw']:.0%}) "
              f"| {r['gemm16_us']:.2f} | {r['cublas_gemm16_us']:.2f} "
              f"| {r['int4_prefill2048_us']:.0f} / {r['cublas_prefill2048_us']:.0f} | {r['dequant_us']:.1f} |")
    per_layer = sum(min(r["gemv_us"], r["gemm1_us"]) * (2 if r["linear"] == "mlp.w1|w2" else 1) for r in rows)
    roof = sum(r["roofline_us"] * (2 if r["linear"] == "mlp.w1|w2" else 1) for r in rows)
    print(f"\nGEMVs of one layer: {per_layer:.1f} us (roofline {roof:.1f} us, {roof / per_layer:.0%}); "
          f"x{LAYERS} layers = {per_layer * LAYERS / 1e3:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--prefill", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--tokens", type=int, default=2048, help="generated tokens in --decode")
    parser.add_argument("--generate", type=int, default=8192, help="generated tokens in --memory (0: encode only)")
    parser.add_argument("--kv", default="fp16,int8", help="KV cache dtypes for --decode")
    parser.add_argument("--one-row", default="gemv,gemm", help="kernels for 1-row GEMVs in --decode (triton_gptq.ONE_ROW_KERNEL)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict = {"info": device_info(), "date": time.strftime("%Y-%m-%d %H:%M")}
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"{results['info']}\nHBM copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")
    if args.kernels:
        results["linears"] = bench_linears(args.sweep, bandwidth)
        print_linear_table(results["linears"])
        save(results, args.out)
    if args.decode or args.prefill or args.memory:
        run_model_sections(args, bandwidth, results)
    save(results, args.out)


def save(results: dict, path: str | None) -> None:
    """Write the results so far (a run cut short keeps what it measured)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def run_model_sections(args: argparse.Namespace, bandwidth: float, results: dict) -> None:
    """--decode / --prefill / --memory on random Qwen-7B-shaped models."""
    from qwen_int4.config import QwenConfig

    cfg = QwenConfig()  # Qwen-7B: 32 layers, hidden 4096, vocab 151936, seq_length 8192
    t0 = time.perf_counter()
    model = gm.build_int4_model(cfg)
    torch.cuda.synchronize()
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t is not None]
    results["model_GB"] = sum(t.numel() * t.element_size() for t in tensors) / 1e9
    results["allocated_after_build_GB"] = torch.cuda.memory_allocated() / 1e9
    print(f"random Int4 model built on the GPU in {time.perf_counter() - t0:.1f} s: its tensors "
          f"{results['model_GB']:.3f} GB, {results['allocated_after_build_GB']:.3f} GB allocated")
    if args.memory:
        results["memory"] = [gm.peak_memory(model, 2048, args.generate, kv) for kv in args.kv.split(",")]
        for row in results["memory"]:
            print(f"peak memory: {json.dumps(row)}")
        save(results, args.out)
    if args.decode:
        results["decode"] = []
        for one_row in args.one_row.split(","):
            tg.ONE_ROW_KERNEL = one_row
            for kv in args.kv.split(","):
                r = {"one_row": one_row, **gm.bench_decode(model, args.tokens, kv, bandwidth)}
                results["decode"].append(r)
                save(results, args.out)
                print(f"decode ({one_row}) {r['tokens']} tokens, {kv} KV: {r['tok_s']:.1f} tok/s ({r['ms_per_token']:.3f} ms/token), "
                      f"{r['achieved_GBps']:.0f} GB/s = {r['vs_roofline']:.0%} of the roofline {r['roofline_tok_s']:.0f} tok/s "
                      f"(mean step {r['mean_step_GB']:.3f} GB)")
        tg.ONE_ROW_KERNEL = "gemv"
    if args.prefill:
        int4 = gm.prefill_seconds(model, 2048)
        del model
        torch.cuda.empty_cache()
        dense = gm.build_dense_model(cfg)
        bf16 = gm.prefill_seconds(dense, 2048)
        del dense
        results["prefill"] = {"tokens": 2048, "int4_ms": int4 * 1e3, "dense_bf16_ms": bf16 * 1e3, "ratio": int4 / bf16}
        print(f"TTFT 2048-token prompt: Int4 {int4 * 1e3:.1f} ms, dense BF16 {bf16 * 1e3:.1f} ms ({int4 / bf16:.2f}x)")


if __name__ == "__main__":
    main()

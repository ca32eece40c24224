"""GPU speed of the Int4 fast path at Qwen-7B shapes, against the memory-bandwidth roofline.

    PYTHONPATH=src python benchmarks/gpu_decode.py [--decode] [--prefill] [--memory]
        [--tokens 2048] [--out results.json]

Random weights, built on the GPU in seconds (no checkpoint is read). Sections:
  (always) HBM copy bandwidth: a device-to-device copy of 2 GiB, bytes read + written.
  (the kernels alone, per linear shape: benchmarks/gptq_kernels.py)
  --decode   end-to-end greedy decode (static KV cache + CUDA graph) of the full random model:
             tok/s over --tokens generated tokens from a 1-token prompt, vs the roofline.
  --prefill  time to first token of a 2048-token prompt, Int4 vs a dense BF16 model.
  --memory   peak GPU memory: encode 2048 tokens; generate 8192 tokens.
The roofline of a step is (bytes it must read) / (measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from qwen_int4.testing import gpu_model as gm
from qwen_int4.testing.gpu_model import copy_bandwidth, device_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--prefill", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--tokens", type=int, default=2048, help="generated tokens in --decode")
    parser.add_argument("--generate", type=int, default=8192, help="generated tokens in --memory (0: encode only)")
    parser.add_argument("--kv", default="fp16,int8", help="KV cache dtypes for --decode")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict = {"info": device_info(), "date": time.strftime("%Y-%m-%d %H:%M")}
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"{results['info']}\nHBM copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")
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
        for kv in args.kv.split(","):
            r = gm.bench_decode(model, args.tokens, kv, bandwidth)
            results["decode"].append(r)
            save(results, args.out)
            print(f"decode {r['tokens']} tokens, {kv} KV: {r['tok_s']:.1f} tok/s ({r['ms_per_token']:.3f} ms/token), "
                  f"{r['achieved_GBps']:.0f} GB/s = {r['vs_roofline']:.0%} of the roofline {r['roofline_tok_s']:.0f} tok/s "
                  f"(mean step {r['mean_step_GB']:.3f} GB)")
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

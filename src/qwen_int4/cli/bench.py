"""`qwen-int4 bench`: the model card's speed and memory tables, measured on this GPU.

The model is random, with Qwen-7B-Chat-Int4's shapes, built straight on the GPU in seconds
(testing/gpu_model.py): no checkpoint is read, so the numbers are those of the fast path
(Triton GPTQ kernels, static KV cache, one CUDA graph per decode step), not of any weights.

  speed:  tokens/s generating N tokens (default 2048 and 8192) greedily from a 1-token context;
  memory: peak GPU memory (torch.cuda.max_memory_allocated) encoding a 2048-token prompt
          (+1 generated token), and generating the most tokens of the speed runs.

Each decode run also prints the bytes a step reads on average (weights + KV cache), the
device-to-device copy bandwidth measured first, and the share of the roofline
(copy bandwidth / bytes per token) reached. Only Int4 has a fast path yet; BF16 and Int8 rows
say so instead of printing numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

PRECISIONS = ("int4", "bf16", "int8")
FAST_PATH = ("int4",)  # precisions the GPU fast path implements
KV_DTYPES = ("fp16", "int8")
QUICK_TOKENS = (64, 256)
QUICK_ENCODE = 256


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
        return values
    return parse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure decode speed and peak memory of the GPU fast path (random 7B-shaped model)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", type=_choices(PRECISIONS), default=list(PRECISIONS),
                   help="comma-separated precisions to report (default: int4,bf16,int8; only int4 is measured yet)")
    p.add_argument("--kv", type=_choices(KV_DTYPES), default=["fp16"],
                   help="comma-separated KV cache dtypes: fp16, int8 (default: fp16)")
    p.add_argument("--tokens", type=_int_list, default=None,
                   help="comma-separated generated-token counts for the speed table (default: 2048,8192)")
    p.add_argument("--encode", type=int, default=None, help="prompt length of the encode peak-memory run (default: 2048)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short check: {','.join(map(str, QUICK_TOKENS))} generated tokens, a {QUICK_ENCODE}-token "
                        "encode (unless --tokens/--encode are given)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every measurement to this JSON file")
    p.set_defaults(run=run)
    return p


def _cuda_problem() -> str | None:
    """Why the fast path cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return (f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}); "
                "the fast path's Triton kernels run on CUDA only")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs Triton (pip install triton) for the fast path's kernels"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _cuda_problem()
    if problem:
        print(f"qwen-int4 bench: error: {problem}", file=sys.stderr)
        return 2
    tokens = args.tokens or (list(QUICK_TOKENS) if args.quick else [2048, 8192])
    encode = args.encode or (QUICK_ENCODE if args.quick else 2048)
    results = measure(args.precision, args.kv, tokens, encode)
    print_tables(results, tokens, encode)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def measure(precisions: list[str], kv_dtypes: list[str], tokens: list[int], encode: int) -> dict:
    """Copy bandwidth, then per precision with a fast path and KV dtype: encode peak and decode runs."""
    import torch

    from ..config import QwenConfig
    from ..testing import gpu_model as gm

    results: dict = {"info": gm.device_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "tokens": tokens, "encode": encode, "runs": []}
    bandwidth = gm.copy_bandwidth()
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"{results['info']['device']} ({results['info']['sms']} SMs), torch {results['info']['torch']}, "
          f"Triton {results['info']['triton']}, CUDA {results['info']['cuda']}")
    print(f"copy bandwidth (device to device, read + write): {bandwidth / 1e9:.0f} GB/s", flush=True)
    for precision in precisions:
        if precision not in FAST_PATH:
            continue
        t0 = time.perf_counter()
        model = gm.build_int4_model(QwenConfig())  # Qwen-7B shapes
        torch.cuda.synchronize()
        model_gb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not None) / 1e9
        print(f"{precision}: random model built on the GPU in {time.perf_counter() - t0:.1f} s, "
              f"its tensors {model_gb:.3f} GB", flush=True)
        for kv in kv_dtypes:
            run = {"precision": precision, "kv_dtype": kv, "model_GB": model_gb,
                   "encode_peak_GB": gm.encode_peak(model, encode, kv), "decode": []}
            print(f"  {kv} KV: encode {encode} tokens (+1): peak {run['encode_peak_GB']:.3f} GB", flush=True)
            for n in tokens:
                r = gm.bench_decode(model, n, kv, bandwidth)
                run["decode"].append(r)
                print(f"  {kv} KV: generate {n}: {r['tok_s']:.1f} tok/s ({r['ms_per_token']:.3f} ms/token), "
                      f"{r['mean_step_GB']:.3f} GB/token, {r['achieved_GBps']:.0f} GB/s = {r['vs_roofline']:.0%} "
                      f"of the roofline {r['roofline_tok_s']:.0f} tok/s; peak {r['peak_GB']:.3f} GB", flush=True)
            results["runs"].append(run)
        del model
        torch.cuda.empty_cache()
    return results


def print_tables(results: dict, tokens: list[int], encode: int) -> None:
    """The model card's two tables (a row per precision and KV dtype), then the per-run detail."""
    runs = {(r["precision"], r["kv_dtype"]): r for r in results["runs"]}
    kv_dtypes = list(dict.fromkeys(kv for _, kv in runs)) or ["fp16"]
    longest = max(tokens)
    rows = [(p, kv, runs.get((p, kv))) for p in PRECISIONS for kv in kv_dtypes]
    rows = [(p, kv, r) for p, kv, r in rows if r is not None or kv == kv_dtypes[0]]  # one line per unsupported precision

    print(f"\nSpeed, tokens/s (batch 1, greedy, 1-token context), {results['info']['device']}:")
    print("| precision | KV | " + " | ".join(f"{n} tokens" for n in tokens) + " |")
    print("|---|---|" + "---|" * len(tokens))
    for precision, kv, run in rows:
        values = [f"{d['tok_s']:.1f}" for d in run["decode"]] if run else ["not supported yet"] * len(tokens)
        print(f"| {precision} | {kv} | " + " | ".join(values) + " |")

    print("\nPeak GPU memory, GB (torch.cuda.max_memory_allocated):")
    print(f"| precision | KV | encode {encode} tokens | generate {longest} tokens |")
    print("|---|---|---|---|")
    for precision, kv, run in rows:
        if run is None:
            values = ["not supported yet"] * 2
        else:
            generate = next(d for d in run["decode"] if d["tokens"] == longest)
            values = [f"{run['encode_peak_GB']:.3f}", f"{generate['peak_GB']:.3f}"]
        print(f"| {precision} | {kv} | " + " | ".join(values) + " |")

    print(f"\nRoofline = copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s / bytes a step reads (mean over the run):")
    print("| precision | KV | tokens | ms/token | GB/token | achieved GB/s | roofline tok/s | % of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        for d in run["decode"]:
            print(f"| {run['precision']} | {run['kv_dtype']} | {d['tokens']} | {d['ms_per_token']:.3f} "
                  f"| {d['mean_step_GB']:.3f} | {d['achieved_GBps']:.0f} | {d['roofline_tok_s']:.0f} "
                  f"| {d['vs_roofline']:.0%} |")

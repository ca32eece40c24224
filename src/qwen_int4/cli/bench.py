"""`qwen-int4 bench`: the model card's speed and memory tables, measured on this GPU.

The model is random, with Qwen-7B-Chat-Int4's shapes, built straight on the GPU in seconds
(testing/gpu_model.py): no checkpoint is read, so the numbers are those of the fast path
(Triton GPTQ kernels, static KV cache, one CUDA graph per decode step), not of any weights.

  speed:  tokens/s generating N tokens (default 2048 and 8192) greedily from a 1-token context;
  memory: peak GPU memory (torch.cuda.max_memory_allocated) encoding a 2048-token prompt
          (+1 generated token), and generating the most tokens of the speed runs;
  TTFT:   time to first token for that prompt, and its ratio to the dense BF16 model's.

Each decode run also prints the bytes a step reads on average (weights + KV cache), the
device-to-device copy bandwidth measured first, and the share of the roofline
(copy bandwidth / bytes per token) reached, for Int4 and Int8 (GPTQ g128, fp16 activations,
the kernels the registry picks) and BF16 (plain linears, cuBLAS), each with the layers' kernel.
A precision whose layers cannot be captured in a CUDA graph (the torch-dequant reference kernel)
runs the same step eagerly and is timed over its first 32 tokens only (marked *).

With transformers installed, its Qwen2ForCausalLM of the same shapes runs too, in bf16, as a
peer: greedy generate() with a static cache (eager, no torch.compile), same token counts, its
speed timed over the first --peer-max-tokens of each run (its host-bound steps take ~35 ms).
Each model is freed before the next is built; peaks are per model.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

PRECISIONS = ("int4", "bf16", "int8")
PEER = "transformers Qwen2 BF16"
PEER_MAX_TOKENS = 2048  # ~70 s of the peer's host-bound eager steps; 2048 + 8192 uncapped: ~6 min
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
                   help="comma-separated precisions to measure (default: int4,bf16,int8)")
    p.add_argument("--kv", type=_choices(KV_DTYPES), default=["fp16"],
                   help="comma-separated KV cache dtypes: fp16, int8 (default: fp16)")
    p.add_argument("--tokens", type=_int_list, default=None,
                   help="comma-separated generated-token counts for the speed table (default: 2048,8192)")
    p.add_argument("--encode", type=int, default=None, help="prompt length of the encode peak-memory run (default: 2048)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short check: {','.join(map(str, QUICK_TOKENS))} generated tokens, a {QUICK_ENCODE}-token "
                        "encode (unless --tokens/--encode are given)")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help=f"skip the {PEER} peer (run by default when transformers is installed)")
    p.add_argument("--peer-max-tokens", type=int, default=PEER_MAX_TOKENS, metavar="N",
                   help=f"time the peer's runs over their first N tokens only (default {PEER_MAX_TOKENS}; its "
                        "static cache is still allocated for the whole run, so its peak is the whole run's); 0: no cap")
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
    peer_cap = args.peer_max_tokens or None
    results = measure(args.precision, args.kv, tokens, encode, peer=args.peer, peer_max_tokens=peer_cap)
    print_tables(results, tokens, encode)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def measure(precisions: list[str], kv_dtypes: list[str], tokens: list[int], encode: int, peer: bool = True,
            peer_max_tokens: int | None = PEER_MAX_TOKENS) -> dict:
    """Copy bandwidth, then per precision (and the peer): encode peak and decode runs per KV dtype."""
    from ..testing import gpu_model as gm

    start = time.perf_counter()
    results: dict = {"info": gm.device_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "tokens": tokens, "encode": encode, "runs": []}
    bandwidth = gm.copy_bandwidth()
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"{results['info']['device']} ({results['info']['sms']} SMs), torch {results['info']['torch']}, "
          f"Triton {results['info']['triton']}, CUDA {results['info']['cuda']}")
    print(f"copy bandwidth (device to device, read + write): {bandwidth / 1e9:.0f} GB/s", flush=True)
    for precision in precisions:
        results["runs"] += _guarded(precision, lambda p=precision: _measure_precision(p, kv_dtypes, tokens, encode, bandwidth))
    if peer:
        from ..testing import hf_peer

        problem = hf_peer.transformers_problem()
        if problem:
            print(f"{PEER}: not run: {problem}")
            results["peer_not_run"] = problem
        else:
            results["runs"] += _guarded(PEER, lambda: [_measure_peer(tokens, encode, bandwidth, peer_max_tokens)])
    results["wall_s"] = time.perf_counter() - start
    print(f"all runs: {results['wall_s']:.0f} s", flush=True)
    return results


def _guarded(name: str, fn) -> list[dict]:
    """fn()'s runs, or one run saying why it failed (the other precisions still run)."""
    import torch

    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and go on: one bad precision must not lose the others
        print(f"{name}: failed: {type(exc).__name__}: {exc}", flush=True)
        return [{"precision": name, "kv_dtype": "-", "error": f"{type(exc).__name__}: {exc}"}]
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _measure_precision(precision: str, kv_dtypes: list[str], tokens: list[int], encode: int, bandwidth: float) -> list[dict]:
    import torch

    from ..config import QwenConfig
    from ..engine.cuda_graph import graph_capturable
    from ..testing import gpu_model as gm

    t0 = time.perf_counter()
    model = gm.build_model(precision, QwenConfig())  # Qwen-7B shapes
    torch.cuda.synchronize()
    model_gb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not None) / 1e9
    kernels = gm.linear_kernels(model)
    path = "+".join(kernels) + (", CUDA graph" if graph_capturable(model) else ", eager step")
    print(f"{precision}: random model built on the GPU in {time.perf_counter() - t0:.1f} s, its tensors "
          f"{model_gb:.3f} GB; linears: {kernels}; decode: {path}", flush=True)
    runs = []
    for kv in kv_dtypes:
        label = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model.dtype, str(model.dtype)) if kv == "fp16" else kv
        run = {"precision": precision, "kv_dtype": label, "kernel": path, "kernels": kernels, "model_GB": model_gb,
               "encode_peak_GB": gm.encode_peak(model, encode, kv), "decode": []}
        print(f"  {label} KV: encode {encode} tokens (+1): peak {run['encode_peak_GB']:.3f} GB", flush=True)
        for n in tokens:
            r = gm.bench_decode(model, n, kv, bandwidth)
            run["decode"].append(r)
            _print_decode(label, r)
        runs.append(run)
    ttft = gm.prefill_seconds(model, encode) * 1e3  # after the memory runs: it must not move their peaks
    print(f"  time to first token, {encode}-token prompt: {ttft:.1f} ms", flush=True)
    for run in runs:
        run["ttft_ms"] = ttft
    del model
    return runs


def _measure_peer(tokens: list[int], encode: int, bandwidth: float, max_tokens: int | None) -> dict:
    import torch
    import transformers

    from ..config import QwenConfig
    from ..testing import gpu_model as gm
    from ..testing import hf_peer

    cfg = QwenConfig()
    t0 = time.perf_counter()
    model = hf_peer.build_qwen2_peer(cfg)
    torch.cuda.synchronize()
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    gen = hf_peer.PeerGenerate(model)
    path = f"transformers {transformers.__version__} generate(), {gen.cache} cache, eager"
    print(f"{PEER}: random model built on the GPU in {time.perf_counter() - t0:.1f} s, {model_gb:.3f} GB; {path}"
          + (f" (static cache failed: {gen.static_error})" if gen.cache != "static" else ""), flush=True)
    run = {"precision": PEER, "kv_dtype": "bf16", "kernel": path, "model_GB": model_gb,
           "encode_peak_GB": hf_peer.peer_encode_peak(gen, encode), "decode": []}
    print(f"  bf16 KV: encode {encode} tokens (+1): peak {run['encode_peak_GB']:.3f} GB", flush=True)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.hidden_size * 2  # keys and values, bf16
    weights = hf_peer.weight_bytes(model)
    for n in tokens:
        timed = min(n, max_tokens or n)
        seconds, peak = hf_peer.peer_decode(gen, n, timed)
        r = {"kv_dtype": "bf16", "graph": False, **gm.decode_figures(weights, kv_per_token, n, timed, seconds, bandwidth),
             "peak_GB": peak}
        run["decode"].append(r)
        _print_decode("bf16", r)
    del gen, model
    return run


def _print_ttft(runs: list[dict], encode: int) -> None:
    """Time to first token per precision, and its ratio to our dense BF16 forward (cuBLAS) when run."""
    ttft = {run["precision"]: run["ttft_ms"] for run in runs if "ttft_ms" in run}
    if not ttft:
        return
    dense = ttft.get("bf16")
    print(f"\nTime to first token, {encode}-token prompt (static cache, last-position logits):")
    print("| precision | ms | vs dense BF16 |")
    print("|---|---|---|")
    for precision, ms in ttft.items():
        print(f"| {precision} | {ms:.1f} | " + (f"{ms / dense:.2f}x" if dense else "-") + " |")


def _print_decode(label: str, r: dict) -> None:
    timed = f" (timed over the first {r['tokens_timed']})" if r["tokens_timed"] != r["tokens"] else ""
    print(f"  {label} KV: generate {r['tokens']}{timed}: {r['tok_s']:.1f} tok/s ({r['ms_per_token']:.3f} ms/token), "
          f"{r['mean_step_GB']:.3f} GB/token, {r['achieved_GBps']:.0f} GB/s = {r['vs_roofline']:.0%} "
          f"of the roofline {r['roofline_tok_s']:.0f} tok/s; peak {r['peak_GB']:.3f} GB", flush=True)


def _speed(d: dict) -> str:
    return f"{d['tok_s']:.1f}" + ("*" if _timed(d) != d["tokens"] else "")


def _timed(d: dict) -> int:
    """Tokens a decode run was timed over (all of them unless capped)."""
    return d.get("tokens_timed", d["tokens"])


def print_tables(results: dict, tokens: list[int], encode: int) -> None:
    """The model card's two tables (a row per measured precision and KV dtype, the peer last),
    then the per-run roofline detail."""
    runs = results["runs"]
    longest = max(tokens)
    print(f"\nSpeed, tokens/s (batch 1, greedy, 1-token context), {results['info']['device']}:")
    print("| precision | KV | " + " | ".join(f"{n} tokens" for n in tokens) + " | linears, decode |")
    print("|---|---|" + "---|" * (len(tokens) + 1))
    for run in runs:
        by_n = {d["tokens"]: d for d in run.get("decode", [])}
        values = [_speed(by_n[n]) if n in by_n else run.get("error", "-") for n in tokens]
        print(f"| {run['precision']} | {run['kv_dtype']} | " + " | ".join(values) + f" | {run.get('kernel', '')} |")
    for run in runs:
        timed = sorted({_timed(d) for d in run.get("decode", []) if _timed(d) != d["tokens"]})
        if timed:
            why = ("transformers' eager generate() is host-bound (--peer-max-tokens)" if run["precision"] == PEER
                   else "a layer runs the torch-dequant reference kernel (not capturable), so the step runs eagerly")
            print(f"* {run['precision']}: timed over the first {', '.join(map(str, timed))} tokens only: {why}")

    print("\nPeak GPU memory, GB (torch.cuda.max_memory_allocated):")
    print(f"| precision | KV | encode {encode} tokens | generate {longest} tokens |")
    print("|---|---|---|---|")
    for run in runs:
        if "error" in run:
            values = [run["error"]] * 2
        else:
            generate = next((d for d in run["decode"] if d["tokens"] == longest), None)
            values = [f"{run['encode_peak_GB']:.3f}", f"{generate['peak_GB']:.3f}" if generate else "-"]
        print(f"| {run['precision']} | {run['kv_dtype']} | " + " | ".join(values) + " |")

    _print_ttft(runs, encode)

    print(f"\nRoofline = copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s / bytes a step reads (mean over the run):")
    print("| precision | KV | tokens | ms/token | GB/token | achieved GB/s | roofline tok/s | % of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        for d in run.get("decode", []):
            print(f"| {run['precision']} | {run['kv_dtype']} | {d['tokens']} | {d['ms_per_token']:.3f} "
                  f"| {d['mean_step_GB']:.3f} | {d['achieved_GBps']:.0f} | {d['roofline_tok_s']:.0f} "
                  f"| {d['vs_roofline']:.0%} |")

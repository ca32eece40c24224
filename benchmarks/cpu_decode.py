"""CPU decode speed of a GPTQ checkpoint, per GPTQ kernel: load time, RSS, prefill, decode tok/s.

    PYTHONPATH=src python benchmarks/cpu_decode.py [--model /tmp/q7b-int4] [--kernel all|NAME]
        [--max-new-tokens 16] [--reference-tokens 3] [--threads N]

--kernel all (default) runs one fresh process per CPU kernel (so load time and VmHWM are
each kernel's own) and prints a markdown table; --kernel NAME runs that kernel here, forced
through $QWEN_INT4_GPTQ_KERNEL as a user would. Decode is greedy (do_sample=False) with eos
and stop words disabled, after a warm-up (2-token prompt, 2 tokens); the first yielded token is the prefill
(the prompt's forward + sampling), the rest are decode steps. "GB/s" is the bytes a decode
step must read (GPTQ buffers the kernel uses + the other weights except the embedding table,
of which one row is read) divided by the median step time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_MODEL = "/tmp/q7b-int4"
PROMPT = "Give me a short introduction to large language models."


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in GB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024 / 1e9
    return out


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every buffer/parameter except the embedding table and the
    checkpoint GPTQ buffers a kernel has replaced (those are not touched by its forward)."""
    from qwen_int4.quant.gptq import GPTQLinear

    total = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in own:
            if module is model.transformer.wte or t is None:
                continue
            repacked = isinstance(module, GPTQLinear) and module.kernel is not None and module.kernel.buffer_names
            if repacked and name not in module.kernel.buffer_names and name != "bias":
                continue  # checkpoint layout kept for state_dict, not read by the kernel
            total += t.numel() * t.element_size()
    return total


def run_one(args: argparse.Namespace) -> dict:
    """Load, warm up, generate; return the measurements (this process, one kernel)."""
    from qwen_int4.chat import make_context
    from qwen_int4.loader import load_model
    from qwen_int4.quant.gptq import GPTQLinear
    from qwen_int4.tokenizer import QWenTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = load_model(args.model, progress=False)
    load_s = time.perf_counter() - t0
    mem_loaded = proc_status()
    kernels: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, GPTQLinear):
            name = m.kernel.name if m.kernel is not None else "unprepared"
            kernels[name] = kernels.get(name, 0) + 1
    tok = QWenTokenizer()
    _, ids = make_context(tok, PROMPT)
    input_ids = torch.tensor([ids])
    gen = {"do_sample": False, "eos_token_id": -1, "stop_words_ids": []}
    for _ in model.generate_tokens(input_ids[:, :2], max_new_tokens=2, **gen):  # warm-up (short: the reference is slow)
        pass
    times, out = [], []
    t = time.perf_counter()
    for next_ids in model.generate_tokens(input_ids, max_new_tokens=args.max_new_tokens, **gen):
        now = time.perf_counter()
        times.append(now - t)
        out.append(int(next_ids[0]))
        t = now
    steps = times[1:]
    step_s = statistics.median(steps) if steps else float("nan")
    nbytes = step_bytes(model)
    return {
        "kernels": kernels,
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "rss_gb": mem_loaded["VmRSS"],
        "rss_after_gen_gb": proc_status()["VmRSS"],
        "hwm_gb": proc_status()["VmHWM"],
        "prompt_tokens": len(ids),
        "prefill_s": times[0],
        "decode_steps": len(steps),
        "decode_step_s": step_s,
        "decode_tok_s": len(steps) / sum(steps) if steps else float("nan"),
        "step_gb": nbytes / 1e9,
        "gb_s": nbytes / 1e9 / step_s,
        "tokens": out,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def cpu_kernels() -> list[str]:
    from qwen_int4.kernels.registry import kernels_for

    return [cls.name for cls in kernels_for("cpu")]


def run_all(args: argparse.Namespace) -> None:
    print(f"# {args.model} | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs | "
          f"torch {torch.__version__} | loadavg before: {os.getloadavg()}")
    rows = []
    for name in cpu_kernels():
        n = args.max_new_tokens if name != "torch-dequant" else args.reference_tokens
        cmd = [sys.executable, __file__, "--model", args.model, "--kernel", name, "--max-new-tokens", str(n), "--json"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "QWEN_INT4_GPTQ_KERNEL": name}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode:
            print(f"{name}: failed\n{result.stderr[-2000:]}")
            continue
        rows.append((name, json.loads(result.stdout.strip().splitlines()[-1])))
        print(f"{name}: {rows[-1][1]}", flush=True)
    print(f"\nloadavg after: {os.getloadavg()}\n")
    print("| kernel | threads | load s | RSS GB: loaded / decoding (HWM) | prefill s (tokens) | decode s/token | tok/s "
          "| GB/s | loadavg start, end | tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['threads']} | {r['load_s']:.1f} | {r['rss_gb']:.2f} / {r['rss_after_gen_gb']:.2f} "
              f"({r['hwm_gb']:.2f}) | "
              f"{r['prefill_s']:.2f} ({r['prompt_tokens']}) | {r['decode_step_s']:.3f} | {r['decode_tok_s']:.3f} | "
              f"{r['gb_s']:.2f} | {r['loadavg_1min']} | {r['tokens'][:6]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--kernel", default="all", help="'all' (one process per CPU kernel) or a kernel name")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--reference-tokens", type=int, default=3, help="max_new_tokens for torch-dequant (~20 s/token)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by --kernel all)")
    args = parser.parse_args()
    if args.kernel == "all":
        run_all(args)
        return
    os.environ["QWEN_INT4_GPTQ_KERNEL"] = args.kernel
    result = run_one(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

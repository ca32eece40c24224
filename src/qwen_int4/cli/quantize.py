"""`qwen-int4 quantize SRC_DIR OUT_DIR`: GPTQ a BF16/FP16 Qwen checkpoint into the Int4/Int8 release layout."""
from __future__ import annotations

import argparse
import time

from .make_test_model import parse_size


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="GPTQ-quantize an unquantized Qwen checkpoint to Int4/Int8 (AutoGPTQ layout, as Qwen-7B-Chat-Int4)",
    )
    p.add_argument("src", metavar="SRC_DIR", help="unquantized checkpoint directory (Hugging Face layout) or repo id")
    p.add_argument("out", metavar="OUT_DIR", help="output directory (must not exist, or be empty)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale/zero group (default 128; -1: one group)")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by descending Hessian diagonal")
    p.add_argument("--damp-percent", type=float, default=0.01, help="Hessian dampening, a fraction of its mean diagonal (default 0.01)")
    p.add_argument("--calib", metavar="FILE.jsonl", default=None,
                   help="calibration data: JSON lines of {conversations}, {messages} or {text} (default: a small built-in set)")
    p.add_argument("--samples", type=int, default=None, help="calibration samples to use (default: all in the file)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per calibration sample, longer ones are cut (default 2048)")
    p.add_argument("--device", default="auto", help="where blocks are quantized: cpu, cuda or auto (default: auto)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"),
                   help="maximum shard size, e.g. 2GB (default); a model that fits is one model.safetensors")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (default 0)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..quant.quantizer import GPTQSettings, quantize_checkpoint

    settings = GPTQSettings(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, damp_percent=args.damp_percent)
    start = time.perf_counter()
    out = quantize_checkpoint(
        args.src, args.out, settings,
        calib=args.calib, n_samples=args.samples, max_len=args.max_len, seed=args.seed,
        device=args.device, max_shard_bytes=args.shard_size,
    )
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({size / 1e9:.2f} GB of safetensors, {settings.bits}-bit, group size {settings.group_size}"
          f"{', desc_act' if settings.desc_act else ''}) in {time.perf_counter() - start:.1f} s")
    return 0

"""`qwen-int4 make-test-model OUT`: write a random-weight Qwen checkpoint in the Hugging Face layout."""
from __future__ import annotations

import argparse
import re
import time

from ..testing.checkpoint import QWEN_7B, make_test_checkpoint

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 2GB, 500MB, 1GiB or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-test-model",
        help="write a random-weight Qwen checkpoint (HF layout; unquantized or GPTQ) for tests and benchmarks",
    )
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.add_argument("--7b", dest="qwen_7b", action="store_true",
                   help="full Qwen-7B shapes: 32 layers, hidden 4096, 32 heads, intermediate 22016 (group size 128)")
    p.add_argument("--layers", type=int, default=None, help="number of blocks (default 2, or 32 with --7b)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 64, or 4096 with --7b)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4, or 32 with --7b)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="config intermediate_size, twice the MLP width (default: Qwen's ratio, rounded)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None, help="write a GPTQ checkpoint with this many bits")
    p.add_argument("--group-size", type=int, default=None, help="GPTQ group size (default 32, or 128 with --7b; -1 = one group)")
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order: permuted g_idx")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of an unquantized checkpoint (GPTQ checkpoints are fp16 like the release)")
    p.add_argument("--seq-length", type=int, default=8192, help="config seq_length (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"),
                   help="maximum shard size, e.g. 2GB (default); a model that fits is one model.safetensors")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    shape = dict(QWEN_7B) if args.qwen_7b else dict(layers=2, hidden=64, heads=4, intermediate=None)
    for key in ("layers", "hidden", "heads", "intermediate"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    group_size = args.group_size if args.group_size is not None else (128 if args.qwen_7b else 32)
    start = time.perf_counter()
    out = make_test_checkpoint(
        args.out,
        **shape,
        bits=args.bits,
        group_size=group_size,
        desc_act=args.desc_act,
        dtype=args.dtype,
        seq_length=args.seq_length,
        seed=args.seed,
        max_shard_bytes=args.shard_size,
    )
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({size / 1e9:.2f} GB of safetensors) in {time.perf_counter() - start:.1f} s")
    return 0

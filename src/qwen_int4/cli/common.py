"""Options and loading shared by the subcommands that run a model."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DEMO_SHAPE = dict(layers=2, hidden=64, heads=4, bits=4, group_size=32)


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-c", help="checkpoint directory (Hugging Face layout) or Hugging Face repo id")
    src.add_argument("--demo", action="store_true",
                     help="use a tiny random-weight Int4 checkpoint generated locally (works offline; replies are gibberish)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")


def demo_checkpoint() -> Path:
    """A tiny Int4 checkpoint in the cache directory, written once."""
    from ..testing.checkpoint import make_test_checkpoint

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-int4" / "demo-tiny-int4"
    if not (cache / "config.json").exists():
        make_test_checkpoint(cache, **DEMO_SHAPE)
    return cache


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) for --model/--demo, --device and --dtype."""
    from ..loader import AutoModelForCausalLM
    from ..tokenizer import AutoTokenizer

    path = demo_checkpoint() if args.demo else args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=args.device, torch_dtype=args.dtype).eval()
    return model, tokenizer

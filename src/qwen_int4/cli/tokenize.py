"""`qwen-int4 tokenize TEXT`: token ids of a text, or text of ids (--decode)."""
from __future__ import annotations

import argparse
import json

from ..tokenizer import QWenTokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tokenize", help="encode text to Qwen token ids (or decode ids)")
    p.add_argument("text", help="the text to encode, or with --decode a JSON list of ids")
    p.add_argument("--model", default=None, help="model directory whose qwen.tiktoken to use (default: packaged copy)")
    p.add_argument("--decode", action="store_true", help="decode a JSON list of ids instead")
    p.add_argument("--no-special", action="store_true", help="treat special-token text as plain text")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    tok = QWenTokenizer.from_pretrained(args.model)
    if args.decode:
        ids = json.loads(args.text)
        if not isinstance(ids, list):
            raise ValueError(f"--decode expects a JSON list of ids, got {args.text!r}")
        print(tok.decode(ids))
    else:
        print(tok.encode(args.text, allowed_special=set() if args.no_special else "all"))
    return 0

"""`qwen-int4 generate --model DIR --prompt TEXT`: one reply, for scripts."""
from __future__ import annotations

import argparse
import sys

from .common import add_model_args, load


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate one reply to a prompt and exit")
    add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="the user's message (or, with --raw, the text to continue)")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt (chat mode)")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text instead of a chat turn")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234, as the reference demo)")
    p.add_argument("--ids", action="store_true", help="print the generated token ids instead of text")
    p.set_defaults(run=run)
    return p


def generation_overrides(args: argparse.Namespace) -> dict:
    overrides = {"seed": args.seed}
    if args.greedy:
        overrides["do_sample"] = False
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    return overrides


def run(args: argparse.Namespace) -> int:
    import torch

    from ..chat import decode_tokens, get_stop_words_ids, make_context

    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    model, tokenizer = load(args)
    cfg = model.generation_config
    chat_format = "raw" if args.raw else "chatml"
    raw_text, context = make_context(tokenizer, args.prompt, system=args.system,
                                     max_window_size=cfg.max_window_size, chat_format=chat_format)
    input_ids = torch.tensor([context], device=model.device)
    out = model.generate(input_ids, stop_words_ids=get_stop_words_ids(chat_format, tokenizer),
                         **generation_overrides(args))[0].tolist()
    if args.ids:
        print(out[len(context):])
    else:
        reply = decode_tokens(out, tokenizer, len(raw_text), len(context), chat_format)
        sys.stdout.write(reply + "\n")
    return 0

"""`qwen-int4 chat --model DIR`: interactive chat, the reply streamed as it is generated.

The commands are those of the reference's cli_demo.py. Unlike the reference,
`:conf k=v` changes do take effect on the next reply.
"""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Callable

from .common import add_model_args, load

HELP = """Commands:
    :help / :h              show this help
    :exit / :quit / :q      exit
    :clear / :cl            clear the screen
    :clear-his / :clh       clear the history
    :history / :his         show the history
    :seed                   show the sampling seed
    :seed <N>               set the sampling seed
    :conf                   show the generation config
    :conf <key>=<value> ... set generation options (e.g. :conf top_p=0.5 max_new_tokens=64)
    :reset-conf             restore the checkpoint's generation config"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat interactively with a model")
    add_model_args(p)
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--seed", "-s", type=int, default=1234, help="sampling seed, set before every reply (default 1234)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's generation_config")
    p.set_defaults(run=run)
    return p


class ChatSession:
    """The state of one interactive chat: history, seed and generation config."""

    def __init__(self, model: Any, tokenizer: Any, system: str, seed: int, out: Callable[..., None]) -> None:
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.seed = seed
        self.base_config = model.generation_config
        self.config = self.base_config
        self.history: list[tuple[str, str]] = []
        self.out = out

    def handle_command(self, line: str) -> bool:
        """Run a ':' command; return False when the session should end."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in (":exit", ":quit", ":q"):
            return False
        if name in (":help", ":h"):
            self.out(HELP)
        elif name in (":clear", ":cl"):
            self.out("\033[2J\033[H")
        elif name in (":clear-his", ":clh"):
            self.history = []
            self.out("[history cleared]")
        elif name in (":history", ":his"):
            for i, (q, r) in enumerate(self.history):
                self.out(f"[{i}] User: {q}\n[{i}] Qwen: {r}")
            if not self.history:
                self.out("[history is empty]")
        elif name == ":seed":
            self.set_seed(rest)
        elif name == ":conf":
            self.set_conf(rest)
        elif name == ":reset-conf":
            self.config = self.base_config
            self.out("[generation config reset]")
        else:
            self.out(f"[unknown command {name!r}; :h lists the commands]")
        return True

    def set_seed(self, value: str) -> None:
        if value:
            try:
                self.seed = int(value)
            except ValueError:
                self.out(f"[the seed must be an integer, got {value!r}]")
                return
        self.out(f"[seed: {self.seed}]")

    def set_conf(self, assignments: str) -> None:
        if not assignments:
            for key, value in self.config.to_dict().items():
                self.out(f"  {key} = {value!r}")
            return
        try:
            pairs = dict(_parse_assignment(item) for item in assignments.split())
            new = self.config.update(**pairs)
            new.validate()
        except (TypeError, ValueError, SyntaxError) as exc:
            self.out(f"[bad :conf: {exc}]")
            return
        self.config = new
        self.out("[generation config updated: " + ", ".join(f"{k}={v!r}" for k, v in pairs.items()) + "]")

    def reply(self, query: str) -> str:
        """Stream the reply to `query` through `out`; append the turn to the history."""
        self.out("Qwen: ", end="")
        printed = ""
        for text in self.model.chat_stream(self.tokenizer, query, history=self.history, system=self.system,
                                           generation_config=self.config.update(seed=self.seed)):
            if text.startswith(printed):
                self.out(text[len(printed):], end="")
            else:  # the cumulative text was revised: start the line again
                self.out("\r\033[KQwen: " + text, end="")
            printed = text
        self.out("")
        self.history.append((query, printed))
        return printed


def _parse_assignment(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"expected key=value, got {item!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _print(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    if args.max_new_tokens is not None:
        model.generation_config = model.generation_config.update(max_new_tokens=args.max_new_tokens)
    session = ChatSession(model, tokenizer, args.system, args.seed, _print)
    _print("Welcome to qwen-int4 chat. Type a message; :h for help, :q to quit.")
    while True:
        try:
            line = input("\nUser: ").strip()
        except EOFError:
            _print("")
            return 0
        if not line:
            continue
        if line.startswith(":"):
            if not session.handle_command(line):
                return 0
            continue
        try:
            session.reply(line)
        except KeyboardInterrupt:
            _print("\n[reply interrupted]")
        except ValueError as exc:  # e.g. a prompt longer than the context: say so, keep the session
            _print(f"\n[error: {exc}]")

"""`qwen-int4` command line: one module per subcommand, each with add_parser() and run()."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under qwen_int4.cli; each module defines
#   add_parser(subparsers) -> argparse.ArgumentParser   and   run(args) -> int
SUBCOMMANDS = {
    "chat": "chat",
    "generate": "generate",
    "tokenize": "tokenize",
    "make-test-model": "make_test_model",
    "quantize": "quantize",
    "serve": "serve",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-int4", description="Run Qwen-7B-Chat and Qwen-7B-Chat-Int4.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        module = importlib.import_module(f"qwen_int4.cli.{module_name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"qwen-int4 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

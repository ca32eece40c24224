"""Encode throughput of QWenTokenizer against tiktoken's own speed on ~1 MB of mixed text.

    PYTHONPATH=src python benchmarks/tokenizer_encode.py [--mb 1.0] [--repeat 5]

Prints MB/s and tokens/s for: tiktoken.Encoding.encode on the same (already NFC) text,
QWenTokenizer.encode (NFC normalisation + argument checks on top), and
QWenTokenizer.encode on the text in 64 KiB pieces.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from qwen_int4.tokenizer import QWenTokenizer

ZH = "通义千问是阿里云研发的大规模语言模型，能够回答问题、创作文字，还能表达观点、撰写代码。今天的天气很好，我们一起去公园散步吧！"
EN = "The quick brown fox jumps over the lazy dog. Large language models predict the next token given the previous ones. "
CODE = "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(20)])\n"


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic mix of Chinese, English and code paragraphs with varied numbers."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        piece = rng.choice((ZH, EN, CODE)).replace("20", str(rng.randrange(10**6)))
        parts.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(parts)


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tok = QWenTokenizer()
    text = mixed_text(int(args.mb * 1e6))
    mb = len(text.encode("utf-8")) / 1e6
    n_tokens = len(tok.encode(text))
    chunks = [text[i : i + 65536] for i in range(0, len(text), 65536)]
    cases = {
        "tiktoken.encode (bar)": lambda: tok.tokenizer.encode(text, allowed_special="all"),
        "QWenTokenizer.encode": lambda: tok.encode(text),
        "QWenTokenizer.encode, 64 KiB pieces": lambda: [tok.encode(c) for c in chunks],
    }
    print(f"text: {mb:.2f} MB, {len(text)} chars, {n_tokens} tokens")
    base = None
    for name, fn in cases.items():
        t = best_time(fn, args.repeat)
        base = base or t
        print(f"{name:38s} {t * 1e3:8.1f} ms  {mb / t:6.2f} MB/s  {n_tokens / t / 1e6:5.2f} Mtok/s  {t / base:5.2f}x")


if __name__ == "__main__":
    main()

"""Calibration data for GPTQ: records -> token id lists, and synthetic activations for tests.

A calibration file is JSON Lines (one record per line) or one JSON list of records, each:
  {"conversations": [{"from": "user"|"assistant", "value": ...}, ...]}   finetune.py's format
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  {"text": ...}                                                          plain text
Conversations are rendered in ChatML as run_gptq.py's preprocess does (spec 10): the system
block "You are a helpful assistant." (or the messages' own system turn), then
<|im_start|>role\\ncontent<|im_end|>\\n per turn, a leading non-user turn dropped, the ids cut
at max_len. Contents are encoded as plain text: special-token text in them stays text.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from qwen_int4.chat import DEFAULT_SYSTEM
from qwen_int4.quant.calibration_data import DEFAULT_SAMPLES
from qwen_int4.tokenizer import QWenTokenizer

# Fewer samples than this give a Hessian too noisy to be worth the GPTQ run.
MIN_SAMPLES = 8
_FORMATS = "{'conversations': [{'from', 'value'}]}, {'messages': [{'role', 'content'}]} or {'text': ...}"
_ROLES = ("system", "user", "assistant")


def render_chatml(turns: list[tuple[str, str]], tokenizer: QWenTokenizer, system: str = DEFAULT_SYSTEM) -> list[int]:
    """ChatML token ids of (role, content) turns (user/assistant) after a system block."""

    def block(role: str, content: str) -> list[int]:
        body = tokenizer.encode(role, allowed_special=set()) + nl + tokenizer.encode(content, allowed_special=set())
        return [tokenizer.im_start_id, *body, tokenizer.im_end_id, *nl]

    nl = tokenizer.encode("\n")
    ids = block("system", system)
    for role, content in turns:
        ids += block(role, content)
    return ids


def _turns(items: Any, role_key: str, content_key: str) -> list[tuple[str, str]]:
    if not isinstance(items, list) or not items:
        raise ValueError("the turn list is empty or not a list")
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise ValueError(f"turn {i} must be an object with {role_key!r} and {content_key!r}, got {item!r:.80}")
        role, content = item[role_key], item[content_key]
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"turn {i} has role {role!r} (expected one of {_ROLES}) and content of type {type(content).__name__}")
        turns.append((role, content))
    return turns


def record_to_ids(record: Any, tokenizer: QWenTokenizer) -> list[int]:
    """Token ids of one calibration record (see the module docstring); ValueError if malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object {_FORMATS}, got {type(record).__name__}")
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError("'text' must be a non-empty string")
        return tokenizer.encode(record["text"], allowed_special=set())
    if "conversations" in record:
        turns = _turns(record["conversations"], "from", "value")
    elif "messages" in record:
        turns = _turns(record["messages"], "role", "content")
    else:
        raise ValueError(f"expected {_FORMATS}; found keys {sorted(record)}")
    system = DEFAULT_SYSTEM
    if turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if turns and turns[0][0] != "user":  # run_gptq.py drops a leading non-user turn
        turns = turns[1:]
    if not turns or any(role == "system" for role, _ in turns):
        raise ValueError("a conversation needs user/assistant turns, with at most one system turn, first")
    return render_chatml(turns, tokenizer, system)


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """(where, record) for every record of a JSONL file or a JSON list file; `where` names the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid JSON list (line {exc.lineno}: {exc.msg})") from exc
        return [(f"{path}, item {i}", item) for i, item in enumerate(items)]
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}, line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg}); expected one record per line: {_FORMATS}") from exc
    return records


def load_calibration(
    path: str | Path | None,
    tokenizer: QWenTokenizer,
    n_samples: int | None = None,
    max_len: int = 2048,
    seed: int = 0,
) -> list[list[int]]:
    """Calibration token id lists from `path` (None: the built-in DEFAULT_SAMPLES).

    n_samples: how many to use (default all); a seeded random subset when fewer than the file
    holds. Raises ValueError naming the line of a bad record, or when fewer than
    max(n_samples, MIN_SAMPLES) samples are available.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    if path is None:
        source, records = "the built-in calibration set", [(f"built-in sample {i}", r) for i, r in enumerate(DEFAULT_SAMPLES)]
    else:
        source, records = str(path), read_records(path)
    samples = []
    for where, record in records:
        try:
            samples.append(record_to_ids(record, tokenizer)[:max_len])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    wanted = len(samples) if n_samples is None else n_samples
    if wanted < MIN_SAMPLES:
        raise ValueError(f"{wanted} calibration samples are too few: use at least {MIN_SAMPLES} (128 or more is typical)")
    if len(samples) < wanted:
        raise ValueError(f"{source} holds {len(samples)} samples, fewer than the {wanted} asked for: add samples or ask for fewer")
    if wanted < len(samples):
        keep = sorted(random.Random(seed).sample(range(len(samples)), wanted))
        samples = [samples[i] for i in keep]
    return samples


def correlated_activations(n_tokens: int, features: int, seed: int = 0, sample_seed: int | None = None) -> torch.Tensor:
    """Synthetic layer inputs [n_tokens, features] float32 shaped like an LLM's, for tests and benchmarks.

    Not white noise: X = Z @ M + noise with a mixing M whose spectrum decays (rank 1/k), random
    per-channel scales (log-normal) and a few outlier channels ~20x larger, as the hidden states
    of real LLMs have. `seed` fixes the distribution (M, scales, outliers); `sample_seed`
    (default: seed) the draws, so held-out data comes from the same distribution.
    """
    gen = torch.Generator().manual_seed(seed)
    rank = min(features, 512)
    spectrum = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    mixing = torch.randn(rank, features, generator=gen) * spectrum[:, None]  # [r, K]
    channel = torch.exp(0.5 * torch.randn(features, generator=gen))  # [K]
    outliers = torch.randperm(features, generator=gen)[: max(1, features // 256)]
    channel[outliers] *= 20.0
    draw = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed + 1_000_003)
    z = torch.randn(n_tokens, rank, generator=draw)
    noise = 0.02 * torch.randn(n_tokens, features, generator=draw)
    return (z @ mixing + noise) * channel  # [T, K]

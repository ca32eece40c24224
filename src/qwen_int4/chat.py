"""ChatML prompts as Qwen builds them (qwen_generation_utils.py; spec section 6).

`make_context` encodes piecewise: roles and contents with no special tokens allowed,
so text a user types can never become `<|im_start|>`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .tokenizer import ENDOFTEXT, IMEND, IMSTART, QWenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
History = Sequence[tuple[str, str]]


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def _check_history(history: History | None) -> list[tuple[str, str]]:
    if history is None:
        return []
    turns = []
    for i, turn in enumerate(history):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise TypeError(f"history[{i}] must be a (query, response) pair, got {turn!r}")
        turns.append((_check_text(turn[0], f"history[{i}][0]"), _check_text(turn[1], f"history[{i}][1]")))
    return turns


def _check_chat_format(chat_format: str) -> None:
    if chat_format not in ("chatml", "raw"):
        raise ValueError(f"unknown chat_format {chat_format!r}: expected 'chatml' or 'raw'")


def make_context(
    tokenizer: QWenTokenizer,
    query: str,
    history: History | None = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """Build the prompt `(raw_text, token_ids)` exactly as the reference.

    History turns are kept newest first while system + kept turns stay under
    `max_window_size` tokens; the walk stops at the first turn that does not fit.
    The current query is never counted or cut, so the prompt may exceed the window.
    """
    _check_text(query, "query")
    _check_text(system, "system")
    _check_chat_format(chat_format)
    turns = _check_history(history)
    if chat_format == "raw":
        return query, tokenizer.encode(query)

    nl = tokenizer.encode("\n")

    def block(role: str, content: str) -> tuple[str, list[int]]:
        # <|im_start|>role\ncontent<|im_end|>, role and content encoded as plain text
        ids = tokenizer.encode(role, allowed_special=set()) + nl + tokenizer.encode(content, allowed_special=set())
        return f"{IMSTART}{role}\n{content}{IMEND}", [tokenizer.im_start_id, *ids, tokenizer.im_end_id]

    system_text, system_ids = block("system", system)
    kept_text, kept_ids = "", []
    for turn_query, turn_response in reversed(turns):
        q_text, q_ids = block("user", turn_query)
        r_text, r_ids = block("assistant", turn_response)
        turn_ids = nl + q_ids + nl + r_ids
        if len(system_ids) + len(turn_ids) + len(kept_ids) >= max_window_size:
            break
        kept_ids = turn_ids + kept_ids
        kept_text = f"\n{q_text}\n{r_text}" + kept_text

    q_text, q_ids = block("user", query)
    # The final "assistant" role is encoded with the default settings, as the reference does.
    tail_ids = nl + q_ids + nl + [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
    raw_text = system_text + kept_text + f"\n{q_text}\n{IMSTART}assistant\n"
    return raw_text, system_ids + kept_ids + tail_ids


def get_stop_words_ids(chat_format: str, tokenizer: QWenTokenizer) -> list[list[int]]:
    """Token sequences that end a reply: im_end and im_start for chatml; "Human:" and eod for raw."""
    _check_chat_format(chat_format)
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    return [[tokenizer.im_end_id], [tokenizer.im_start_id]]


def decode_tokens(
    tokens: Any,
    tokenizer: QWenTokenizer,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """Cut the reply out of prompt+generated `tokens` the way the reference does.

    chatml: decode up to the first im_start/im_end at or after `context_length`, drop
    the first `raw_text_len` characters (the prompt), strip. raw: decode, drop the
    prompt, remove `<|endoftext|>`, strip.
    When no im_start/im_end was generated the reference drops the last token (its loop
    variable ends one short): we drop it only when it is <|endoftext|>, so a reply cut by
    max_new_tokens keeps its last token.
    """
    _check_chat_format(chat_format)
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    tokens = list(tokens)
    if chat_format == "chatml":
        stops = (tokenizer.im_start_id, tokenizer.im_end_id)
        end = next((i for i in range(context_length, len(tokens)) if tokens[i] in stops), None)
        if end is not None:
            end_reason = f"Gen {tokenizer.decode([tokens[end]])!r}"
        else:
            end_reason = f"Gen length {len(tokens)}"
            # the reference drops the last token here, which is the <|endoftext|> that ended
            # generation; a real token (the reply hit max_new_tokens) we keep
            has_eod = len(tokens) > context_length and tokens[-1] == tokenizer.eod_id
            end = len(tokens) - 1 if has_eod else len(tokens)
        text = tokenizer.decode(tokens[:end], errors=errors)[raw_text_len:].strip()
    else:
        text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
        end_reason = f"Gen length {len(tokens)}"
        if ENDOFTEXT in text:
            end_reason = f"Gen {ENDOFTEXT!r}"
        text = text.replace(ENDOFTEXT, "").strip()
    if verbose:
        print(f"\nEnd reason: {end_reason}\nGenerate text: {text}")
    return (text, end_reason) if return_end_reason else text

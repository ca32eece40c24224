"""Generation, in layers: a generator of token ids -> `generate` (ids) -> `chat` / `chat_stream` (text).

Stop words follow the reference's StopWordsLogitsProcessor: when the tail of a row
(prompt included) equals a stop sequence, the next token of that row is forced to
`eos_token_id` (<|endoftext|>), and the row then finishes on eos. A ChatML reply
therefore ends ...<|im_end|><|endoftext|>, as the reference's output ids do. The
forced token costs no forward pass when every unfinished row is forced.
Finished rows of a batch are filled with `pad_token_id` until all rows finish.

On CUDA the steps after the prompt run as one captured CUDA graph replay each, over a static
KV cache (engine/cuda_graph.py), when the model allows it (graph_decode_problem; one NTK alpha
for all rows); otherwise, and on the CPU, every step is the model's forward with its KVCache.
Sampling, stop words and streaming are the same code either way. QWEN_INT4_CUDA_GRAPH=0
turns the graph path off.
"""
from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TextIO

import torch

from .chat import DEFAULT_SYSTEM, decode_tokens, get_stop_words_ids, make_context
from .config import GenerationConfig
from .sampling import sample_next_token
from .tokenizer import QWenTokenizer, StreamingDetokenizer


class TokenStreamer(Protocol):
    """What `generate(streamer=...)` calls, as transformers' streamers: `put` gets the
    prompt [B, S] once, then the new ids [B] of every step; `end` follows the last step."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


class TextStreamer:
    """Print (and collect in `.text`) the generated text of a batch of one as it arrives.

    Characters split across tokens are held back until complete (StreamingDetokenizer).
    `stream=None` only collects.
    """

    def __init__(
        self,
        tokenizer: QWenTokenizer,
        skip_prompt: bool = True,
        skip_special_tokens: bool = False,
        stream: TextIO | None = sys.stdout,
    ) -> None:
        self.detokenizer = StreamingDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.skip_prompt = skip_prompt
        self.stream = stream
        self._prompt_seen = False

    @property
    def text(self) -> str:
        return self.detokenizer.text

    def put(self, value: torch.Tensor) -> None:
        if value.shape[0] > 1:  # the prompt is [B, S], a step's ids are [B]
            raise ValueError(f"TextStreamer handles a batch of one, got ids of shape {tuple(value.shape)}")
        is_prompt = not self._prompt_seen
        self._prompt_seen = True
        if is_prompt and self.skip_prompt:
            return
        self._write("".join(self.detokenizer.add(int(i)) for i in value.reshape(-1).tolist()))

    def end(self) -> None:
        self._write(self.detokenizer.flush())
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()

    def _write(self, piece: str) -> None:
        if piece and self.stream is not None:
            self.stream.write(piece)
            self.stream.flush()


CUDA_GRAPH_ENV_VAR = "QWEN_INT4_CUDA_GRAPH"
StepFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (ids [B, S], mask) -> logits [B, V]


def _graph_steps(model: Any, input_ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int) -> StepFn | None:
    """Logits of each step from a CUDAGraphDecoder (prefill first), or None when it does not apply."""
    if input_ids.device.type != "cuda" or os.environ.get(CUDA_GRAPH_ENV_VAR, "1") == "0":
        return None
    from .engine.cuda_graph import CUDAGraphDecoder, graph_decode_problem
    from .model.static_cache import StaticKVCache

    if graph_decode_problem(model) is not None:
        return None
    batch, length = input_ids.shape
    if len(set(model.transformer.ntk_alphas(mask, batch, length))) != 1:
        return None  # rows with different NTK alphas cannot share one graph
    # the last new token is never fed back: prompt + max_new_tokens - 1 positions are written
    decoder = CUDAGraphDecoder(model, StaticKVCache.for_model(model, batch, length + max_new_tokens))

    def step(step_ids: torch.Tensor, step_mask: torch.Tensor | None) -> torch.Tensor:
        if decoder.cache.seq_len == 0:
            return decoder.prefill(step_ids, step_mask)  # [B, V]
        return decoder.step(step_ids[:, 0])  # [B, V], the graph's buffer: read before the next step

    return step


def _eager_steps(model: Any) -> StepFn:
    """Logits of each step from the model's forward over a growing KVCache."""
    past = None

    def step(step_ids: torch.Tensor, step_mask: torch.Tensor | None) -> torch.Tensor:
        nonlocal past
        out = model(step_ids, attention_mask=step_mask, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        return out.logits[:, -1, :]  # [B, V]

    return step


class _StopWords:
    """Per-row check: does the row's token sequence end with one of the stop sequences?"""

    def __init__(self, stop_words_ids: Sequence[Sequence[int]], rows: list[list[int]]) -> None:
        self.stops = [list(s) for s in stop_words_ids]
        self.keep = max((len(s) for s in self.stops), default=0)
        self.tails = [row[-self.keep:] if self.keep else [] for row in rows]

    def matched(self) -> list[bool]:
        return [any(tail[-len(s):] == s for s in self.stops if len(s) <= len(tail)) for tail in self.tails]

    def append(self, ids: list[int]) -> None:
        if self.keep:
            self.tails = [(tail + [i])[-self.keep:] for tail, i in zip(self.tails, ids)]


def _check_stop_words(stop_words_ids: Any) -> list[list[int]]:
    if stop_words_ids is None:
        return []
    ok = isinstance(stop_words_ids, (list, tuple)) and all(
        isinstance(s, (list, tuple)) and s and all(isinstance(i, int) and i >= 0 for i in s) for s in stop_words_ids
    )
    if not ok:
        raise ValueError(f"stop_words_ids must be a list of non-empty lists of token ids, got {stop_words_ids!r}")
    return [list(s) for s in stop_words_ids]


def _check_inputs(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate shapes; return the mask, or None when no row is padded."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        shape = tuple(getattr(input_ids, "shape", ()))
        what = f"{type(input_ids).__name__} {getattr(input_ids, 'dtype', '')} of shape {shape}"
        raise ValueError(f"input_ids must be a LongTensor [batch, seq] (use ids[None] for one prompt), got {what}")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: input_ids has 0 tokens; generation needs at least one prompt token")
    if attention_mask is None:
        return input_ids, None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError("attention_mask must be left-padded (0s before the 1s of each row); pad prompts on the left")
    if not bool(mask[:, -1].all()):
        raise ValueError("a row of attention_mask is all padding: every prompt needs at least one token")
    return input_ids, (None if bool(mask.all()) else mask)


class GenerationMixin:
    """generate / chat / chat_stream for QWenLMHeadModel (`self(...)` is its forward).

    Uses `self.generation_config` (set by the loader from generation_config.json)
    when no config is passed; GenerationConfig() defaults otherwise.
    """

    def _generation_config(
        self, generation_config: GenerationConfig | None, stop_words_ids: Any, overrides: dict[str, Any]
    ) -> GenerationConfig:
        base = generation_config or getattr(self, "generation_config", None) or GenerationConfig()
        cfg = base.update(**overrides)
        if stop_words_ids is not None:
            cfg = cfg.update(stop_words_ids=_check_stop_words(stop_words_ids))
        cfg.validate()
        _check_stop_words(cfg.stop_words_ids)
        return cfg

    def generate_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        **overrides: Any,
    ) -> Iterator[torch.Tensor]:
        """Yield the next ids, LongTensor [B] per step (pad_token_id for finished rows).

        Arguments as `generate`; they are checked here, before the first step.
        """
        cfg = self._generation_config(generation_config, stop_words_ids, overrides)
        input_ids, mask = _check_inputs(input_ids, attention_mask)
        context = self._context_length()
        if input_ids.shape[1] >= context:
            raise ValueError(
                f"the prompt has {input_ids.shape[1]} tokens, but the model's context is {context} "
                "(config.json max_position_embeddings): shorten the prompt or the history"
            )
        # generation stops at the end of the context, as a server's max_model_len does
        cfg = cfg.update(max_new_tokens=min(cfg.max_new_tokens, context - input_ids.shape[1]))
        return self._token_loop(input_ids, mask, cfg)

    def _context_length(self) -> int:
        """Longest sequence (prompt + generated) the model serves: config.max_position_embeddings."""
        config = getattr(self, "config", None)
        return int(getattr(config, "max_position_embeddings", 32768))

    @torch.inference_mode()
    def _token_loop(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None, cfg: GenerationConfig
    ) -> Iterator[torch.Tensor]:
        batch, device = input_ids.shape[0], input_ids.device
        lengths = mask.sum(1).tolist() if mask is not None else [input_ids.shape[1]] * batch
        rows = [row[len(row) - n:] for row, n in zip(input_ids.tolist(), lengths)]  # unpadded prompts
        # The reference drops [eos] from the stop words: eos ends a row anyway.
        stops = _StopWords([s for s in cfg.stop_words_ids if s != [cfg.eos_token_id]], rows)
        penalise = cfg.repetition_penalty != 1.0
        history = input_ids  # [B, T] ids seen so far, for the repetition penalty (masked like `mask`)
        finished = [False] * batch
        generator, step_ids = None, input_ids
        forward = _graph_steps(self, input_ids, mask, cfg.max_new_tokens) or _eager_steps(self)
        for _ in range(cfg.max_new_tokens):
            # Per row: pad once finished, eos right after a stop word, None: the model chooses.
            forced = [cfg.pad_token_id if done else cfg.eos_token_id if stop else None
                      for done, stop in zip(finished, stops.matched())]
            if all(f is not None for f in forced):
                next_ids = torch.tensor(forced, dtype=torch.long, device=device)
            else:
                logits = forward(step_ids, mask).float()  # [B, V]
                if generator is None and cfg.seed is not None:
                    generator = torch.Generator(device=logits.device).manual_seed(cfg.seed)
                next_ids = sample_next_token(
                    logits, cfg, generator, token_ids=history if penalise else None, token_mask=mask
                ).to(device)
                if any(f is not None for f in forced):  # (builds a tensor: a host sync, so only when needed)
                    keep = torch.tensor([f is None for f in forced], device=device)
                    fill = torch.tensor([0 if f is None else f for f in forced], device=device)
                    next_ids = torch.where(keep, next_ids, fill)
            next_list = next_ids.tolist()  # the step's one host sync
            yield next_ids
            finished = [done or t == cfg.eos_token_id for done, t in zip(finished, next_list)]
            if all(finished):
                return
            stops.append(next_list)
            step_ids = next_ids[:, None]  # [B, 1]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # [B, T + 1]
            if penalise:
                history = torch.cat([history, step_ids], dim=1)  # [B, T + 1]

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer: TokenStreamer | None = None,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Continue `input_ids` [B, S] (left-padded with `attention_mask` when B > 1).

        `overrides` are GenerationConfig fields (max_new_tokens, do_sample, temperature,
        top_k, top_p, repetition_penalty, seed, eos_token_id, pad_token_id, ...);
        unknown names raise TypeError. `stop_words_ids` replaces the config's list.
        Returns [B, S + new]: the prompt, then the generated ids (eos included,
        pad_token_id after a row's end).
        """
        steps = self.generate_tokens(input_ids, attention_mask, generation_config, stop_words_ids, **overrides)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new = []
        for ids in steps:
            new.append(ids)
            if streamer is not None:
                streamer.put(ids.cpu())
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)

    # ---- chat ---------------------------------------------------------------------------
    def _chat_prompt(
        self,
        tokenizer: QWenTokenizer,
        query: str,
        history: Sequence[tuple[str, str]] | None,
        system: str,
        stop_words_ids: Sequence[Sequence[int]] | None,
        generation_config: GenerationConfig | None,
        overrides: dict[str, Any],
    ) -> tuple[str, list[int], list[list[int]], GenerationConfig]:
        """(raw_text, context ids, stop words, config) for one chat turn, as the reference's chat."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        cfg = (generation_config or getattr(self, "generation_config", None) or GenerationConfig()).update(**overrides)
        if cfg.chat_format != "chatml":
            raise ValueError(
                f"chat needs chat_format 'chatml', the generation config has {cfg.chat_format!r} "
                "(a base model: use generate on encoded text instead)"
            )
        raw_text, context = make_context(tokenizer, query, history, system, cfg.max_window_size, cfg.chat_format)
        stops = _check_stop_words(stop_words_ids) + get_stop_words_ids(cfg.chat_format, tokenizer)
        return raw_text, context, stops, cfg

    def _device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]

    def chat(
        self,
        tokenizer: QWenTokenizer,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """One ChatML turn: returns (response, history + [(query, response)]).

        `history` is copied, never modified. kwargs are GenerationConfig overrides.
        """
        if kwargs.pop("stream", False):
            raise ValueError("chat(stream=True) is deprecated in the reference and unsupported here: use chat_stream")
        history = copy.deepcopy(list(history)) if history is not None else []
        raw_text, context, stops, cfg = self._chat_prompt(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
        )
        input_ids = torch.tensor([context], dtype=torch.long, device=self._device())
        out = self.generate(input_ids, generation_config=cfg, stop_words_ids=stops)
        response = decode_tokens(
            out[0], tokenizer, raw_text_len=len(raw_text), context_length=len(context),
            chat_format=cfg.chat_format, errors="replace",
        )
        history.append((query, response))
        return response, history

    def chat_stream(
        self,
        tokenizer: QWenTokenizer,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str = DEFAULT_SYSTEM,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        logits_processor: Any = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Yield the reply so far after every generated token, as the reference:
        `tokenizer.decode(generated, skip_special_tokens=True, errors='ignore')` (not stripped).

        The history is neither copied nor appended (the caller does that).
        """
        if logits_processor is not None:
            raise ValueError("custom logits_processor is not supported; use the GenerationConfig sampling fields")
        _raw_text, context, stops, cfg = self._chat_prompt(
            tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
        )
        input_ids = torch.tensor([context], dtype=torch.long, device=self._device())
        steps = self.generate_tokens(input_ids, generation_config=cfg, stop_words_ids=stops)
        return _cumulative_text(steps, tokenizer)


def _cumulative_text(steps: Iterator[torch.Tensor], tokenizer: QWenTokenizer) -> Iterator[str]:
    # An incremental UTF-8 decoder with errors='ignore' holds back an unfinished character,
    # which the full decode would drop: its text so far equals the full decode (linear time).
    detok = StreamingDetokenizer(tokenizer, skip_special_tokens=True, errors="ignore")
    for ids in steps:
        detok.add(int(ids[0]))
        yield detok.text

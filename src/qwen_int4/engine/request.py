"""Request and sequence state of the serving engine.

A `Request` (one API call) owns `n` `Sequence`s (its choices), which share the prompt.
A sequence's KV cache lives in the block pool: `block_table[i]` holds its tokens
i*block_size .. (i+1)*block_size-1, and `num_computed` tokens of it are in the cache.
Scheduling, chunked prefill and decode are one notion: a step runs
`num_tokens - num_computed` (or fewer) of a sequence's tokens, and the sequence samples
a new token when the step reaches its last token.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .text import IncrementalText


@dataclass
class SamplingParams:
    """Per-request decoding options (OpenAI semantics, plus Qwen's repetition_penalty).

    temperature 0 means greedy. top_k <= 0 and top_p == 1 disable those filters.
    presence/frequency penalties (OpenAI) act on the generated tokens; repetition_penalty
    (transformers / Qwen) on the prompt and generated tokens. `stop` strings are cut from
    the text; `stop_token_ids` end a sequence without appearing in its text.
    `logprobs`: None, or how many alternatives to return beside the chosen token (0..20).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Raise ValueError naming the first option out of range."""
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (1 <= self.n <= 16, f"n must be in [1, 16], got {self.n}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives [(id, logprob)], best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Sequence:
    """One choice of a request: its tokens, KV blocks, sampling RNG and text."""

    def __init__(self, seq_id: int, request: Request, index: int, text: IncrementalText) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index  # the choice index in the response
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of the full blocks of token_ids, in order
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_cached_blocks = 0  # leading blocks of block_table registered in the prefix cache
        self.num_reported = 0  # output ids already handed out in a RequestOutput
        self.ntk_alpha: float | None = None  # fixed at the first prefill, kept through preemption
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.text = text
        self.generator: torch.Generator | None = None  # created on first sampling (device of the logits)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def token_ids(self) -> list[int]:
        """Prompt then generated ids: what the cache must hold before the next sample."""
        return self.request.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")


class Request:
    """One API call: prompt ids, sampling params, its n sequences and timing."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_time: float | None = None
        self.seqs: list[Sequence] = []

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class CompletionOutput:
    """What one choice produced since the last output (`delta_*`) and in total (`text`).

    `delta_text` never contains a possible start of a stop string (held back until ruled
    out), so streaming it is safe; `text` is what has been released so far.
    """

    index: int
    text: str
    delta_text: str
    token_ids: list[int]
    delta_token_ids: list[int]
    delta_logprobs: list[TokenLogprob]
    finish_reason: str | None  # None while running; "stop", "length" or "abort"


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_generated_tokens: int = 0
    time_to_first_token: float | None = None

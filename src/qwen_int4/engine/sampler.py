"""Next-token selection for a batch of sequences, each with its own parameters and RNG, in one
batched pass on the logits' device (a loop over rows only for the penalties and seeded draws).

Order, as the reference's generate plus OpenAI's penalties: mask the padded vocabulary,
repetition penalty (prompt + generated ids, Qwen / transformers semantics), presence and
frequency penalties (generated ids, OpenAI semantics), then greedy argmax (temperature 0)
or temperature, top-k, top-p (as sampling.py's filters, with per-row k and p) and a draw:
argmax(probs / E) with E ~ Exp(1) (the exponential race, a draw from probs), E from the
sequence's torch.Generator when its request has a seed, else from the global RNG.

Log-probabilities are those of the *processed* distribution before truncation:
log_softmax of the logits after the penalties and the temperature (temperature 1 for
greedy), before top-k/top-p, so alternatives outside the nucleus still get finite values.
"""
from __future__ import annotations

import torch

from ..sampling import apply_repetition_penalty
from ..tokenizer import VOCAB_SIZE
from .request import Sequence, TokenLogprob


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values) on `device` without waiting for it: a blocking copy to CUDA waits for
    everything queued on the stream, which would stall a chained step (pinned, non-blocking)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] (all of x when rows are all its rows), without a host sync."""
    if len(rows) == x.shape[0]:
        return x
    return x.index_select(0, to_device(rows, torch.long, x.device))


def apply_presence_frequency_penalty(
    logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI: logit[t] -= presence * (count[t] > 0) + frequency * count[t], counts over generated ids."""
    if not output_ids or (presence == 0.0 and frequency == 0.0):
        return logits
    ids = to_device(output_ids, torch.long, logits.device)
    counts = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))  # [V]
    return logits - (presence * (counts > 0).to(logits.dtype) + frequency * counts)


def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
    """The sequence's RNG: seed + choice index (the request has a seed)."""
    if seq.generator is None:
        seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed + seq.index)
    return seq.generator


def apply_top_k_rows(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Per row, keep the top_k[i] largest logits (ties with the k-th kept); k <= 0 keeps the row."""
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    if not any(ks):
        return logits
    values = torch.topk(logits, max(ks), dim=-1).values  # [M, kmax], descending
    index = to_device([max(k, 1) - 1 for k in ks], torch.long, logits.device)[:, None]
    kth = values.gather(1, index)  # [M, 1]
    kth = kth.masked_fill(to_device(ks, torch.long, logits.device)[:, None] == 0, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p_rows(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Per row, nucleus filtering with top_p[i] (1.0 keeps the row), as sampling.apply_top_p."""
    if all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    limit = to_device([1.0 - p if p < 1.0 else -1.0 for p in top_p], torch.float32, logits.device)[:, None]
    remove_sorted = cumulative <= limit
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _penalised(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The logits with each row's repetition / presence / frequency penalties (rows without any untouched)."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        seq, p = seqs[i], seqs[i].params
        x = logits[i:i + 1]  # [1, V]
        if p.repetition_penalty != 1.0:
            history = to_device([seq.token_ids], torch.long, x.device)  # [1, T]
            x = apply_repetition_penalty(x, history, p.repetition_penalty)
        logits[i:i + 1] = apply_presence_frequency_penalty(x, seq.output_ids, p.presence_penalty, p.frequency_penalty)
    return logits


def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One id per row of probs [M, V]: argmax(probs / E), E ~ Exp(1) per row from its RNG."""
    unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
    draws = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_() if unseeded else None
    if len(unseeded) == len(seqs):
        race = draws
    else:
        race = torch.empty_like(probs)
        if unseeded:
            race.index_copy_(0, to_device(unseeded, torch.long, probs.device), draws)
    for i, seq in enumerate(seqs):
        if seq.params.seed is not None:
            race[i].exponential_(generator=_generator(seq, probs.device))
    return (probs / race).argmax(dim=-1)


class Sampled:
    """One step's draws, launched on the logits' device: `tokens` [M] long stays there (a chained
    decode step reads its input ids from it) and `result()` brings everything to the host.

    The device-to-host copies start at once (pinned, non-blocking); result() waits for them
    without holding the GIL, so the server's event loop runs meanwhile.
    """

    def __init__(self, tokens: torch.Tensor, want: list[int], ks: list[int],
                 extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        self.tokens = tokens  # [M] on the logits' device
        self._want, self._ks = want, ks  # rows with logprobs, and their number of alternatives
        parts = (tokens, *extra) if extra is not None else (tokens,)
        self._done = None
        if tokens.is_cuda:
            parts = tuple(t.to("cpu", non_blocking=True) for t in parts)
            self._done = torch.cuda.Event()
            self._done.record()
        self._host = parts

    def result(self) -> list[tuple[int, TokenLogprob | None]]:
        """One (token id, logprob info or None) per row; waits for the device."""
        if self._done is not None:
            self._done.synchronize()
        tokens = self._host[0].tolist()
        if not self._want:
            return [(t, None) for t in tokens]
        chosen, top_values, top_ids = (t.tolist() for t in self._host[1:])
        infos: list[TokenLogprob | None] = [None] * len(tokens)
        for j, (i, k) in enumerate(zip(self._want, self._ks)):
            infos[i] = TokenLogprob(tokens[i], chosen[j], list(zip(top_ids[j][:k], top_values[j][:k])))
        return list(zip(tokens, infos))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
    """One (token id, logprob info or None) per row of logits [M, V] (float32), row i for seqs[i]."""
    return sample_launch(logits, seqs).result() if seqs else []


def sample_launch(logits: torch.Tensor, seqs: list[Sequence]) -> Sampled:
    """Queue the sampling of every row of logits [M, V] (float32, M >= 1) on its device; see Sampled."""
    x = _penalised(logits[:, :VOCAB_SIZE], seqs)  # the padded vocabulary's columns are dropped
    greedy = [s.params.greedy for s in seqs]
    tokens = x.argmax(dim=-1)  # [M]
    if not all(greedy):
        temps = to_device([1.0 if g else s.params.temperature for g, s in zip(greedy, seqs)], torch.float32,
                          x.device)
        x = x / temps[:, None]
        rows = [i for i, g in enumerate(greedy) if not g]
        picked = [seqs[i] for i in rows]
        y = apply_top_p_rows(apply_top_k_rows(_rows(x, rows), [s.params.top_k for s in picked]),
                             [s.params.top_p for s in picked])
        drawn = _draw(y.softmax(dim=-1), picked)
        tokens = drawn if len(rows) == len(seqs) else tokens.index_copy(0, to_device(rows, torch.long, x.device), drawn)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not want:
        return Sampled(tokens, [], [], None)
    logprobs = _rows(x, want).log_softmax(dim=-1)  # [W, V]: after penalties and temperature, before truncation
    ks = [seqs[i].params.logprobs for i in want]
    top_values, top_ids = torch.topk(logprobs, max(max(ks), 1), dim=-1)
    chosen = logprobs.gather(1, _rows(tokens[:, None], want))[:, 0]
    return Sampled(tokens, want, ks, (chosen, top_values, top_ids))

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


def apply_presence_frequency_penalty(
    logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI: logit[t] -= presence * (count[t] > 0) + frequency * count[t], counts over generated ids."""
    if not output_ids or (presence == 0.0 and frequency == 0.0):
        return logits
    ids = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
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
    index = torch.tensor([max(k, 1) - 1 for k in ks], device=logits.device)[:, None]
    kth = values.gather(1, index)  # [M, 1]
    kth = kth.masked_fill(torch.tensor(ks, device=logits.device)[:, None] == 0, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p_rows(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Per row, nucleus filtering with top_p[i] (1.0 keeps the row), as sampling.apply_top_p."""
    if all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    limit = torch.tensor([1.0 - p if p < 1.0 else -1.0 for p in top_p], device=logits.device)[:, None]
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
            history = torch.tensor([seq.token_ids], dtype=torch.long, device=x.device)  # [1, T]
            x = apply_repetition_penalty(x, history, p.repetition_penalty)
        logits[i:i + 1] = apply_presence_frequency_penalty(x, seq.output_ids, p.presence_penalty, p.frequency_penalty)
    return logits


def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One id per row of probs [M, V]: argmax(probs / E), E ~ Exp(1) per row from its RNG."""
    race = torch.empty_like(probs)
    unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
    if unseeded:
        race[unseeded] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_()
    for i, seq in enumerate(seqs):
        if seq.params.seed is not None:
            race[i].exponential_(generator=_generator(seq, probs.device))
    return (probs / race).argmax(dim=-1)


def _host_list(t: torch.Tensor) -> list:
    """t.tolist(), waiting for the device without holding the GIL (the server's event loop runs meanwhile)."""
    if t.is_cuda:
        host = t.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host.tolist()
    return t.tolist()


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
    """One (token id, logprob info or None) per row of logits [M, V] (float32), row i for seqs[i]."""
    if not seqs:
        return []
    x = _penalised(logits[:, :VOCAB_SIZE], seqs)  # the padded vocabulary's columns are dropped
    greedy = [s.params.greedy for s in seqs]
    tokens = x.argmax(dim=-1)  # [M]
    if not all(greedy):
        temps = torch.tensor([1.0 if g else s.params.temperature for g, s in zip(greedy, seqs)], device=x.device)
        x = x / temps[:, None]
        rows = [i for i, g in enumerate(greedy) if not g]
        picked = [seqs[i] for i in rows]
        y = apply_top_p_rows(apply_top_k_rows(x[rows], [s.params.top_k for s in picked]),
                             [s.params.top_p for s in picked])
        tokens[rows] = _draw(y.softmax(dim=-1), picked)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not want:
        return [(t, None) for t in _host_list(tokens)]
    logprobs = x[want].log_softmax(dim=-1)  # [W, V]: after penalties and temperature, before truncation
    top = max(seqs[i].params.logprobs for i in want)
    top_values, top_ids = torch.topk(logprobs, max(top, 1), dim=-1)
    chosen = logprobs.gather(1, tokens[want][:, None])[:, 0]
    tokens, chosen = tokens.tolist(), chosen.tolist()
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    infos: list[TokenLogprob | None] = [None] * len(seqs)
    for j, i in enumerate(want):
        k = seqs[i].params.logprobs
        infos[i] = TokenLogprob(tokens[i], chosen[j], list(zip(top_ids[j][:k], top_values[j][:k])))
    return list(zip(tokens, infos))

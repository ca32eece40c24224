"""Per-sequence next-token selection for the engine, with each request's own parameters and RNG.

Order, as the reference's generate plus OpenAI's penalties: mask the padded vocabulary,
repetition penalty (prompt + generated ids, Qwen / transformers semantics), presence and
frequency penalties (generated ids, OpenAI semantics), then greedy argmax (temperature 0)
or temperature, top-k, top-p and a draw with the sequence's torch.Generator.

Log-probabilities are those of the *processed* distribution before truncation:
log_softmax of the logits after the penalties and the temperature (temperature 1 for
greedy), before top-k/top-p, so alternatives outside the nucleus still get finite values.
"""
from __future__ import annotations

import random

import torch

from ..sampling import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    mask_padded_vocab,
)
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
    """The sequence's RNG: seed + choice index when the request has a seed, else a random seed."""
    if seq.generator is None:
        seed = seq.params.seed + seq.index if seq.params.seed is not None else random.getrandbits(63)
        seq.generator = torch.Generator(device=device).manual_seed(seed)
    return seq.generator


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
    """One (token id, logprob info or None) per row of logits [M, V] (float32), row i for seqs[i]."""
    logits = mask_padded_vocab(logits)
    results = []
    for row, seq in enumerate(seqs):
        p = seq.params
        x = logits[row:row + 1]  # [1, V]
        if p.repetition_penalty != 1.0:
            history = torch.tensor([seq.token_ids], dtype=torch.long, device=x.device)  # [1, T]
            x = apply_repetition_penalty(x, history, p.repetition_penalty)
        x = apply_presence_frequency_penalty(x, seq.output_ids, p.presence_penalty, p.frequency_penalty)
        if not p.greedy:
            x = apply_temperature(x, p.temperature)
        logprobs = x.log_softmax(dim=-1)[0] if p.logprobs is not None else None  # [V]
        if p.greedy:
            token = int(x.argmax(dim=-1))
        else:
            x = apply_top_p(apply_top_k(x, p.top_k), p.top_p)
            token = int(torch.multinomial(x.softmax(dim=-1), 1, generator=_generator(seq, x.device)))
        info = None
        if logprobs is not None:
            top = torch.topk(logprobs, p.logprobs) if p.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            info = TokenLogprob(token, float(logprobs[token]), alternatives)
        results.append((token, info))
    return results

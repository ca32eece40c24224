"""Next-token selection: small pure functions on logits [B, V] (float32).

Each function returns a new tensor and follows the transformers logits processor
of the same purpose, so our sampling matches the reference's `generate`:
repetition penalty, then temperature, top-k, top-p, then a multinomial draw
(or argmax after the penalty when not sampling).
"""
from __future__ import annotations

import torch

from .config import GenerationConfig
from .tokenizer import VOCAB_SIZE


def mask_padded_vocab(logits: torch.Tensor, real_vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """Set the logits of ids >= `real_vocab_size` to -inf.

    Qwen's embedding has 151936 rows but only 151851 token ids; the rest are
    padding that must never be generated (the tokenizer cannot decode them).
    """
    if logits.shape[-1] <= real_vocab_size:
        return logits
    out = logits.clone()
    out[..., real_vocab_size:] = float("-inf")
    return out


def apply_repetition_penalty(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    penalty: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalise every id present in `token_ids` [B, T] (prompt + generated so far).

    As transformers' RepetitionPenaltyLogitsProcessor: a positive logit is divided
    by `penalty`, a negative one multiplied, each id once however often it occurs.
    `token_mask` [B, T] (1 = real token, 0 = left padding) excludes padding.
    """
    if penalty == 1.0:
        return logits
    vocab = logits.shape[-1]
    # Ids to ignore (padding, or beyond the logits) point at an extra column that is dropped.
    ids = token_ids.clamp(max=vocab)
    if token_mask is not None:
        ids = ids.masked_fill(token_mask == 0, vocab)
    padded = torch.nn.functional.pad(logits, (0, 1))  # [B, V+1]
    score = torch.gather(padded, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, ids, score)[:, :vocab]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by `temperature` (> 0)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy decoding")
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits per row (ties with the k-th are kept); 0 disables."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' TopPLogitsWarper; 1.0 disables.

    Sorted ascending, the tokens whose cumulative probability is <= 1 - top_p are
    removed; the most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    *,
    token_ids: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one id per row of `logits` [B, V] -> LongTensor [B].

    Padded-vocab ids are masked, then the repetition penalty (over `token_ids`
    [B, T] where `token_mask` is 1) is applied; greedy (`do_sample=False`) takes
    the argmax of that, otherwise temperature, top-k and top-p filter the logits
    and one id is drawn with `generator` (the global RNG when None).
    """
    logits = mask_padded_vocab(logits.float())
    if config.repetition_penalty != 1.0:
        if token_ids is None:
            raise ValueError("repetition_penalty != 1.0 needs token_ids (the prompt and generated ids)")
        logits = apply_repetition_penalty(logits, token_ids, config.repetition_penalty, token_mask)
    if not config.do_sample:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, config.temperature)
    logits = apply_top_k(logits, config.top_k)
    logits = apply_top_p(logits, config.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

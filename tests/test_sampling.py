"""sampling.py: each function against a hand computation and against transformers' logits processors."""
import math

import pytest
import torch

from qwen_int4.config import GenerationConfig
from qwen_int4.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    mask_padded_vocab,
    sample_next_token,
)
from qwen_int4.tokenizer import VOCAB_SIZE

lp = pytest.importorskip("transformers.generation.logits_process")
INF = float("inf")


def random_logits(batch: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ---- padded vocabulary ----------------------------------------------------------------------
def test_mask_padded_vocab_masks_ids_past_the_real_vocabulary():
    logits = random_logits(2, 151936)
    out = mask_padded_vocab(logits)
    assert VOCAB_SIZE == 151851
    assert torch.isneginf(out[:, 151851:]).all()
    assert torch.equal(out[:, :151851], logits[:, :151851])
    assert not torch.isinf(logits).any(), "the input must not be modified"


def test_mask_padded_vocab_leaves_a_small_vocabulary_alone():
    logits = random_logits(2, 100)
    assert torch.equal(mask_padded_vocab(logits), logits)


# ---- repetition penalty ---------------------------------------------------------------------
def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -1.0, 4.0]])
    ids = torch.tensor([[0, 1, 1], [3, 2, 3]])  # repeated ids are penalised once
    out = apply_repetition_penalty(logits, ids, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, -3.0], [1.0, 1.0, -2.0, 2.0]]))


def test_repetition_penalty_ignores_masked_padding():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    ids = torch.tensor([[3, 3, 0]])
    mask = torch.tensor([[0, 0, 1]])  # two pads (id 3) then the real token 0
    out = apply_repetition_penalty(logits, ids, 2.0, mask)
    assert torch.equal(out, torch.tensor([[1.0, -1.0, 0.5, -3.0]]))


def test_repetition_penalty_matches_transformers():
    logits = random_logits(3, 50)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    ours = apply_repetition_penalty(logits, ids, 1.3)
    theirs = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_masked_repetition_penalty_equals_transformers_on_the_unpadded_rows():
    logits = random_logits(2, 50, seed=2)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    ours = apply_repetition_penalty(logits, ids, 1.7, mask)
    proc = lp.RepetitionPenaltyLogitsProcessor(1.7)
    torch.testing.assert_close(ours[:1], proc(ids[:1], logits[:1].clone()), rtol=0, atol=0)
    torch.testing.assert_close(ours[1:], proc(ids[1:, 4:], logits[1:].clone()), rtol=0, atol=0)


# ---- temperature, top-k, top-p --------------------------------------------------------------
def test_temperature_by_hand_and_against_transformers():
    logits = random_logits()
    torch.testing.assert_close(apply_temperature(logits, 2.0), logits / 2.0)
    torch.testing.assert_close(apply_temperature(logits, 0.7), lp.TemperatureLogitsWarper(0.7)(None, logits.clone()))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 1.0]])
    out = apply_top_k(logits, 2)
    assert torch.equal(out[0], torch.tensor([-INF, 3.0, 2.0, -INF]))
    assert torch.equal(out[1], torch.tensor([5.0, 5.0, 5.0, -INF])), "ties with the k-th value stay"
    assert torch.equal(apply_top_k(logits, 0), logits), "0 disables top-k"


@pytest.mark.parametrize("k", [1, 5, 49, 80])
def test_top_k_matches_transformers(k):
    logits = random_logits()
    assert torch.equal(apply_top_k(logits, k), lp.TopKLogitsWarper(k)(None, logits.clone()))


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: (~torch.isneginf(apply_top_p(logits, p))).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(0.75) == [1, 3]  # 0.5 + 0.3 = 0.8 >= 0.75; {0.5} alone is not enough
    assert kept(0.85) == [1, 2, 3]  # needs 0.95
    assert kept(0.01) == [1], "the most likely token is always kept"
    assert torch.equal(apply_top_p(logits, 1.0), logits), "1.0 disables top-p"
    kept_logits = apply_top_p(logits, 0.75)
    assert torch.equal(kept_logits[0, [1, 3]], logits[0, [1, 3]]), "kept logits are unchanged"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95])
def test_top_p_matches_transformers(p):
    logits = random_logits(4, 60, seed=5)
    assert torch.equal(apply_top_p(logits, p), lp.TopPLogitsWarper(p)(None, logits.clone()))


# ---- composition ----------------------------------------------------------------------------
def test_greedy_is_argmax_after_penalty_and_never_a_padded_id():
    logits = random_logits(2, 151936, seed=7)
    logits[:, 151900] = 1000.0  # a padded id must never win
    cfg = GenerationConfig(do_sample=False, repetition_penalty=1.0)
    expect = logits[:, :VOCAB_SIZE].argmax(-1)
    assert torch.equal(sample_next_token(logits, cfg), expect)

    ids = expect[:, None]  # penalise the current winner heavily: the runner-up must win
    cfg = GenerationConfig(do_sample=False, repetition_penalty=1000.0)
    runner_up = logits[:, :VOCAB_SIZE].topk(2).indices[:, 1]
    assert torch.equal(sample_next_token(logits, cfg, token_ids=ids), runner_up)


def test_top_k_one_sampling_equals_greedy():
    logits = random_logits(5, 300, seed=8)
    cfg = GenerationConfig(do_sample=True, top_k=1, top_p=1.0, temperature=3.0)
    assert torch.equal(sample_next_token(logits, cfg), logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = random_logits(4, 1000, seed=9) * 0.1
    cfg = GenerationConfig(do_sample=True, top_p=1.0)
    draw = lambda seed: sample_next_token(logits, cfg, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_sampled_frequencies_follow_the_warped_distribution():
    # logits [0, 1, 2, 3]; temperature 2 -> [0, .5, 1, 1.5]; top_k 3 drops id 0;
    # softmax of [.5, 1, 1.5] = [.186, .307, .506]; top_p .75 drops id 1 (cumulative .186 <= .25).
    cfg = GenerationConfig(do_sample=True, temperature=2.0, top_k=3, top_p=0.75)
    n = 40000
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(n, 4)
    ids = sample_next_token(logits, cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).double() / n
    p2 = math.exp(1.0) / (math.exp(1.0) + math.exp(1.5))
    expected = torch.tensor([0.0, 0.0, p2, 1 - p2], dtype=torch.double)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_repetition_penalty_needs_token_ids():
    with pytest.raises(ValueError, match="token_ids"):
        sample_next_token(random_logits(), GenerationConfig(repetition_penalty=1.1))

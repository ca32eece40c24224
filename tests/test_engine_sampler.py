"""The engine's batched sampler: per-row top-k / top-p equal sampling.py's filters row by row,
and a batch of mixed requests gives each row what it would get alone."""
import torch

from qwen_int4.engine.request import Request, SamplingParams, Sequence
from qwen_int4.engine.sampler import apply_top_k_rows, apply_top_p_rows, sample
from qwen_int4.sampling import apply_top_k, apply_top_p


def test_row_filters_equal_the_single_row_filters():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    logits[1, :10] = 2.0  # ties at the k-th value are kept
    ks, ps = [0, 5, 1, 299, 40], [1.0, 0.9, 0.5, 0.01, 1.0]
    got_k, got_p = apply_top_k_rows(logits, ks), apply_top_p_rows(logits, ps)
    for i in range(5):
        torch.testing.assert_close(got_k[i:i + 1], apply_top_k(logits[i:i + 1], ks[i]))
        torch.testing.assert_close(got_p[i:i + 1], apply_top_p(logits[i:i + 1], ps[i]))


def _seq(params: SamplingParams, i: int) -> Sequence:
    return Sequence(i, Request(f"r{i}", [1, 2, 3], params), 0, text=None)


def test_a_mixed_batch_gives_each_row_what_it_gets_alone():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=20, seed=3),
              SamplingParams(temperature=1.3, top_p=0.8, seed=4, logprobs=2),
              SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=0)]
    batch = sample(logits, [_seq(p, i) for i, p in enumerate(params)])
    alone = [sample(logits[i:i + 1], [_seq(p, i)])[0] for i, p in enumerate(params)]
    assert [t for t, _ in batch] == [t for t, _ in alone]
    assert batch[0][0] == int(logits[0].argmax()) and batch[0][1] is None
    assert batch[2][1].token_id == batch[2][0] and len(batch[2][1].top) == 2 and batch[3][1].top == []
    assert batch[2][1].logprob == alone[2][1].logprob

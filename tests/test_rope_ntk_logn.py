"""Rotary tables, dynamic NTK alpha and LogN scaling against the spec's formulas (spec section 4).

A tiny model with seq_length 16 makes NTK and LogN active at short lengths. The end-to-end
checks compare with `reference_logits`, an independent float64 forward written from the spec.
"""
import math

import pytest
import torch
from _models import random_tiny_model

from qwen_int4.config import QwenConfig
from qwen_int4.model import KVCache, QWenLMHeadModel
from qwen_int4.model.rope import RotaryEmbedding, logn_scale, ntk_alpha

SEQ = 16
VOCAB = 256
HEADS = 4
HEAD_DIM = 16
BASE = 10000.0


def tiny_model(use_dynamic_ntk: bool = True, use_logn_attn: bool = True, seed: int = 0) -> QWenLMHeadModel:
    cfg = QwenConfig(
        vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2, num_attention_heads=HEADS,
        kv_channels=HEAD_DIM, intermediate_size=192, seq_length=SEQ, rotary_emb_base=BASE,
        use_dynamic_ntk=use_dynamic_ntk, use_logn_attn=use_logn_attn,
    )
    return random_tiny_model(cfg, seed)


def spec_alpha(length: int) -> int:
    """The spec's alpha ranges: <= seq -> 1, (seq, 2seq] -> 3, (2seq, 4seq] -> 7, (4seq, 8seq] -> 15."""
    for alpha, limit in ((1, SEQ), (3, 2 * SEQ), (7, 4 * SEQ), (15, 8 * SEQ)):
        if length <= limit:
            return alpha
    raise AssertionError("length out of the tested range")


def spec_cos_sin(positions: torch.Tensor, alpha: float, dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), dim] in float64 from the spec formulas."""
    base = BASE * alpha ** (dim / (dim - 2))
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [dim/2]
    angles = positions.double()[:, None] * inv[None, :]  # [P, dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # [P, dim]
    return angles.cos(), angles.sin()


def reference_logits(model: QWenLMHeadModel, ids: torch.Tensor, alpha: float, logn: bool) -> torch.Tensor:
    """Full causal forward of `ids` [1, S] in float64, one alpha, LogN by absolute position."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    S, E, eps = ids.shape[1], HEADS * HEAD_DIM, model.config.layer_norm_epsilon

    def rms(x, w):
        return w * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    cos, sin = spec_cos_sin(torch.arange(S), alpha)  # [S, D]
    half = HEAD_DIM // 2

    def rotate(t):  # t [S, H, D]; pairs (i, i + D/2) rotate by the angle of frequency i
        c, s = cos[:, None, :half], sin[:, None, :half]
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat((t1 * c - t2 * s, t2 * c + t1 * s), dim=-1)

    pos = torch.arange(1, S + 1, dtype=torch.float64)
    scale = torch.where(pos > SEQ, pos.log() / math.log(SEQ), torch.ones_like(pos)) if logn and S > SEQ else torch.ones(S)
    x = sd["transformer.wte.weight"][ids[0]]  # [S, E]
    for i in range(model.config.num_hidden_layers):
        p = f"transformer.h.{i}."
        qkv = rms(x, sd[p + "ln_1.weight"]) @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (qkv[:, j * E:(j + 1) * E].reshape(S, HEADS, HEAD_DIM) for j in range(3))
        q, k = rotate(q) * scale[:, None, None].double(), rotate(k)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(S, E)
        x = x + attn @ sd[p + "attn.c_proj.weight"].T
        h = rms(x, sd[p + "ln_2.weight"])
        gate = h @ sd[p + "mlp.w2.weight"].T
        x = x + ((h @ sd[p + "mlp.w1.weight"].T) * gate * torch.sigmoid(gate)) @ sd[p + "mlp.c_proj.weight"].T
    return (rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T)[None]  # [1, S, V]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 31, 32, 33, 50, 64, 65, 100, 128])
def test_ntk_alpha_ranges(length):
    assert ntk_alpha(length, SEQ) == spec_alpha(length)


def test_ntk_alpha_at_qwen7b_lengths():
    assert [ntk_alpha(n, 8192) for n in (6000, 8192, 8193, 16384, 16385, 32768, 32769)] == [1, 1, 3, 3, 7, 7, 15]


@pytest.mark.parametrize("alpha", [1.0, 3.0, 7.0])
def test_rotary_tables_equal_formula(alpha):
    rope = RotaryEmbedding(HEAD_DIM, BASE)
    cos, sin = rope.cos_sin(5, 40, [alpha], torch.device("cpu"))
    assert cos.shape == (1, 35, 1, HEAD_DIM) and cos.dtype == torch.float32
    want_cos, want_sin = spec_cos_sin(torch.arange(5, 40), alpha)
    torch.testing.assert_close(cos[0, :, 0].double(), want_cos, atol=2e-5, rtol=0)
    torch.testing.assert_close(sin[0, :, 0].double(), want_sin, atol=2e-5, rtol=0)
    # a longer request regrows the table; the positions already served do not change
    cos_long, _ = rope.cos_sin(0, 300, [alpha], torch.device("cpu"))
    torch.testing.assert_close(cos_long[:, 5:40], cos, atol=1e-6, rtol=0)


def test_rotary_per_sample_rows():
    rope = RotaryEmbedding(HEAD_DIM, BASE)
    cos, sin = rope.cos_sin(0, 20, [3.0, 1.0, 3.0], torch.device("cpu"))
    assert cos.shape == (3, 20, 1, HEAD_DIM)
    for row, alpha in enumerate((3.0, 1.0, 3.0)):
        torch.testing.assert_close(sin[row, :, 0].double(), spec_cos_sin(torch.arange(20), alpha)[1], atol=2e-5, rtol=0)


def test_logn_scale_formula():
    got = logn_scale(10, 40, SEQ)
    want = [math.log(p + 1) / math.log(SEQ) if p + 1 > SEQ else 1.0 for p in range(10, 40)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-7, rtol=0)
    assert got[:6].eq(1).all() and got[6:].gt(1).all()


def test_rotary_tables_are_not_state():
    config = tiny_model().config
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    assert not any("rotary" in n or "inv_freq" in n or "logn" in n for n in model.state_dict())
    assert list(model.buffers()) == []


@pytest.mark.parametrize("length, logn", [(12, True), (24, False), (24, True), (40, True)])
def test_prefill_matches_reference_forward(length, logn):
    model = tiny_model(use_logn_attn=logn)
    ids = random_ids(1, length, seed=length)
    with torch.no_grad():
        out = model(ids)
    alpha = spec_alpha(length)
    assert out.past_key_values.ntk_alpha == (alpha,)
    assert rel_err(out.logits, reference_logits(model, ids, alpha, logn)) < 1e-4
    if length > SEQ:  # the test can tell the alpha apart
        assert rel_err(out.logits, reference_logits(model, ids, 1.0, logn)) > 1e-2


@pytest.mark.parametrize("prompt_len", [10, 20])
def test_alpha_fixed_at_prefill_during_decode(prompt_len):
    model = tiny_model()
    ids = random_ids(1, 40, seed=prompt_len)  # decode runs past 2 * SEQ, where a fresh alpha would be 7
    alpha = spec_alpha(prompt_len)
    with torch.no_grad():
        out = model(ids[:, :prompt_len])
        logits = [out.logits]
        for t in range(prompt_len, 40):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values)
            assert out.past_key_values.ntk_alpha == (alpha,)
            logits.append(out.logits)
    logits = torch.cat(logits, dim=1)
    assert rel_err(logits, reference_logits(model, ids, alpha, logn=True)) < 1e-4
    assert rel_err(logits[:, SEQ:], reference_logits(model, ids, 7.0, logn=True)[:, SEQ:]) > 1e-2


def test_logn_changes_logits_only_past_seq_length():
    with_logn, without = tiny_model(use_dynamic_ntk=False), tiny_model(use_dynamic_ntk=False, use_logn_attn=False)
    with torch.no_grad():
        short = random_ids(1, SEQ, seed=1)
        torch.testing.assert_close(with_logn(short).logits, without(short).logits, rtol=0, atol=0)
        long = random_ids(1, 30, seed=2)
        a, b = with_logn(long).logits, without(long).logits
    torch.testing.assert_close(a[:, :SEQ], b[:, :SEQ], rtol=0, atol=0)  # scale 1 up to position seq_length
    assert (a[:, SEQ:] - b[:, SEQ:]).abs().amax(-1).gt(1e-3).all()


def test_ntk_disabled_keeps_alpha_one():
    model = tiny_model(use_dynamic_ntk=False, use_logn_attn=False)
    ids = random_ids(1, 40, seed=3)
    with torch.no_grad():
        out = model(ids)
    assert out.past_key_values.ntk_alpha == (1.0,)
    assert rel_err(out.logits, reference_logits(model, ids, 1.0, logn=False)) < 1e-4


def test_per_sample_alpha_with_padding():
    # rows of 20 and 40 real tokens: alphas 3 and 7; each row equals the prompt alone.
    # LogN off: it follows padded positions, as the reference does, so rows would differ from alone.
    model = tiny_model(use_logn_attn=False)
    short, long = random_ids(1, 20, seed=4), random_ids(1, 40, seed=5)
    ids = torch.cat((torch.cat((torch.zeros(1, 20, dtype=torch.long), short), dim=1), long))  # [2, 40]
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    nxt = random_ids(2, 1, seed=6)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, past_key_values=KVCache(2))
        assert batch.past_key_values.ntk_alpha == (3.0, 7.0)
        step = model(nxt, attention_mask=torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1),
                     past_key_values=batch.past_key_values).logits
        for row, prompt in enumerate((short, long)):
            alone = model(torch.cat((prompt, nxt[row:row + 1]), dim=1)).logits
            n = prompt.shape[1]
            assert rel_err(batch.logits[row, -n:], alone[0, :n]) < 1e-5
            assert rel_err(step[row], alone[0, n:]) < 1e-5

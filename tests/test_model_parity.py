"""QWenLMHeadModel against transformers' Qwen2 on the same weights; cache, chunking, padding, bad input.

Sequences stay below seq_length, so dynamic NTK and LogN are inactive (Qwen2 has neither).
"""
import pytest
import torch
from _models import random_tiny_model

from qwen_int4.config import QwenConfig
from qwen_int4.model import KVCache, QWenLMHeadModel, RMSNorm
from qwen_int4.model.qwen import attention_mask_for

transformers = pytest.importorskip("transformers")

VOCAB = 512
HIDDEN = 64
HEADS = 4
LAYERS = 2
MLP_WIDTH = 96


def tiny_config(**overrides) -> QwenConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        kv_channels=HIDDEN // HEADS, intermediate_size=2 * MLP_WIDTH, seq_length=8192,
    )
    values.update(overrides)
    return QwenConfig(**values)


def random_model(seed: int = 0, **overrides) -> QWenLMHeadModel:
    """Reference init plus random biases and norm weights, so misplaced ones show up."""
    return random_tiny_model(tiny_config(**overrides), seed, norm_std=0.2)


def qwen2_from(model: QWenLMHeadModel):
    """transformers Qwen2ForCausalLM holding `model`'s weights (names mapped by hand from spec 2)."""
    cfg = model.config
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=cfg.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_emb_base},
        max_position_embeddings=cfg.seq_length, use_sliding_window=False, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    sd = model.state_dict()
    h = cfg.hidden_size
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = sd[src + "attn.c_attn.weight"], sd[src + "attn.c_attn.bias"]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # c_attn rows: Q, then K, then V
            out[dst + f"self_attn.{proj}.weight"] = w[j * h:(j + 1) * h]
            out[dst + f"self_attn.{proj}.bias"] = b[j * h:(j + 1) * h]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.c_proj.weight"]
        out[dst + "mlp.gate_proj.weight"] = sd[src + "mlp.w2.weight"]
        out[dst + "mlp.up_proj.weight"] = sd[src + "mlp.w1.weight"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.c_proj.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ln_2.weight"]
    hf = transformers.Qwen2ForCausalLM(hf_cfg)
    hf.load_state_dict(out, strict=True)
    return hf.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> QWenLMHeadModel:
    return random_model(seed=0)


@pytest.fixture(scope="module")
def hf_model(model):
    return qwen2_from(model)


def test_meta_build_has_checkpoint_names_and_no_buffers():
    cfg = tiny_config()
    with torch.device("meta"):
        meta = QWenLMHeadModel(cfg)
    names = set(meta.state_dict())
    expected = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        expected |= {p + n for n in ("ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                                     "ln_2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight")}
    assert names == expected
    assert meta.device.type == "meta"
    # fill with assign=True as the loader does, then run
    real = random_model(seed=3)
    meta.load_state_dict(real.state_dict(), assign=True)
    with torch.no_grad():
        torch.testing.assert_close(meta(random_ids(1, 5, 0)).logits, real(random_ids(1, 5, 0)).logits)


def test_logits_match_qwen2(model, hf_model):
    ids = random_ids(2, 13, seed=1)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf_model(input_ids=ids, use_cache=False).logits
    assert ours.shape == (2, 13, VOCAB) and ours.dtype == torch.float32
    assert rel_err(ours, theirs) < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_continuation_matches_qwen2(model, hf_model):
    prompt = random_ids(1, 6, seed=2)
    steps = 10
    with torch.no_grad():
        ours = prompt
        out = model(prompt)
        for _ in range(steps):  # cached decode, one token at a time
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ours = torch.cat((ours, nxt), dim=1)
            out = model(nxt, past_key_values=out.past_key_values)
        theirs = prompt
        for _ in range(steps):  # transformers, full recompute each step
            nxt = hf_model(input_ids=theirs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            theirs = torch.cat((theirs, nxt), dim=1)
    assert ours.tolist() == theirs.tolist()
    assert len(set(ours[0, 6:].tolist())) > 1  # a continuation that is not one repeated token


def test_cached_decode_equals_full_recompute(model):
    ids = random_ids(2, 12, seed=3)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :7])
        step_logits = [out.logits]
        cache = out.past_key_values
        for t in range(7, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache)
            assert out.past_key_values is cache and cache.seq_len == t + 1
            step_logits.append(out.logits)
    assert rel_err(torch.cat(step_logits, dim=1), full) < 1e-5


@pytest.mark.parametrize("chunks", [(5, 7), (4, 3, 5), (1, 6, 5)])
def test_chunked_prefill_equals_single_prefill(model, chunks):
    ids = random_ids(2, sum(chunks), seed=4)
    with torch.no_grad():
        single = model(ids)
        cache = KVCache(LAYERS)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(model(ids[:, start:start + n], past_key_values=cache).logits)
            start += n
        # and one decode step after the chunks
        nxt = random_ids(2, 1, seed=5)
        after_chunks = model(nxt, past_key_values=cache).logits
        after_single = model(nxt, past_key_values=single.past_key_values).logits
    assert rel_err(torch.cat(pieces, dim=1), single.logits) < 1e-5
    assert rel_err(after_chunks, after_single) < 1e-5


def test_left_padded_batch_equals_each_prompt_alone(model):
    short, long = random_ids(1, 5, seed=6), random_ids(1, 11, seed=7)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat((torch.cat((torch.full((1, pad), 7), short), dim=1), long))  # [2, 11], row 0 left-padded
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    new_tokens = random_ids(2, 3, seed=8)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        assert torch.isfinite(batch.logits).all()  # pad rows too: no NaN from empty attention rows
        cache, batch_steps = batch.past_key_values, []
        for t in range(3):  # decode with the mask extended by one real token per step
            mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), dim=1)
            batch_steps.append(model(new_tokens[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
        batch_steps = torch.cat(batch_steps, dim=1)
        for row, prompt in enumerate((short, long)):
            alone = model(torch.cat((prompt, new_tokens[row:row + 1]), dim=1)).logits
            n = prompt.shape[1]
            real = batch.logits[row, -n:]
            assert rel_err(real, alone[0, :n]) < 1e-5
            assert rel_err(batch_steps[row], alone[0, n:]) < 1e-5


def test_padded_chunked_prefill_stays_causal(model):
    ids = random_ids(2, 10, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        single = model(ids, attention_mask=mask).logits
        cache = KVCache(LAYERS)
        first = model(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache).logits
        second = model(ids[:, 4:], attention_mask=mask, past_key_values=cache).logits
    chunked = torch.cat((first, second), dim=1)
    assert rel_err(chunked[0, 3:], single[0, 3:]) < 1e-5
    assert rel_err(chunked[1], single[1]) < 1e-5


def test_kv_cache_index_select(model):
    ids = random_ids(3, 6, seed=10)
    nxt = random_ids(3, 1, seed=11)
    with torch.no_grad():
        cache = model(ids).past_key_values
        cache.index_select(torch.tensor([2, 0]))
        assert cache.batch_size == 2 and cache.seq_len == 6 and len(cache.ntk_alpha) == 2
        selected = model(nxt[[2, 0]], past_key_values=cache).logits
        full = model(torch.cat((ids, nxt), dim=1)[[2, 0]], use_cache=False).logits[:, -1:]
    assert rel_err(selected, full) < 1e-5
    with pytest.raises(ValueError, match="out of range"):
        cache.index_select([5])


def test_logits_to_keep(model):
    ids = random_ids(1, 9, seed=12)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:])


def test_attention_mask_causal_padded_and_never_empty():
    pad_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0: 3 left pads
    allowed, is_causal = attention_mask_for(pad_mask, past=2, q_len=4, device=torch.device("cpu"))
    assert not is_causal and allowed.shape == (2, 1, 4, 6)
    allowed = allowed[:, 0]  # [B, S, T]; queries sit at KV positions 2..5
    q_pos = torch.arange(2, 6)[:, None]
    k_pos = torch.arange(6)[None, :]
    assert not (allowed & (k_pos > q_pos)).any()  # causal, although q_len < kv_len
    assert allowed.any(-1).all()  # no empty row (the pad query at position 2 sees itself)
    assert allowed[0, 0].tolist() == [False, False, True, False, False, False]
    assert not allowed[0, 1:, :3].any()  # real queries never see pads
    assert allowed[1].tolist() == (k_pos <= q_pos).tolist()
    assert attention_mask_for(None, past=0, q_len=5, device=torch.device("cpu")) == (None, True)
    assert attention_mask_for(None, past=7, q_len=1, device=torch.device("cpu")) == (None, False)


def test_rmsnorm_normalises_in_fp32_and_casts_before_weight():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen) * 3)
        x = (torch.randn(3, 5, 64, generator=gen) * 4).to(torch.bfloat16)
        x32 = x.float()
        want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        got = norm(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([1, 2, 3]), "2-D"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "2-D"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(0, 4, dtype=torch.long), "empty"),
        (torch.tensor([[1, VOCAB + 3, 2]]), f"token id {VOCAB + 3}.*vocab_size is {VOCAB}"),
        (torch.tensor([[1, -4, 2]]), "negative token id -4"),
        (torch.tensor([[1.0, 2.0]]), "integer"),
        ([[1, 2]], "2-D"),
    ],
)
def test_bad_input_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model(ids)


def test_bad_mask_and_cache(model):
    ids = random_ids(2, 4, seed=13)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"attention_mask must have shape .*\[2, 4\]"):
            model(ids, attention_mask=torch.ones(2, 3, dtype=torch.long))
        cache = model(ids).past_key_values
        with pytest.raises(ValueError, match=r"\[2, 5\].*got \[2, 1\]"):  # the mask covers the cache too
            model(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError, match="batch size 1 but the KV cache holds 2"):
            model(ids[:1, :1], past_key_values=cache)
        with pytest.raises(ValueError, match="use_cache=False"):
            model(ids[:, :1], past_key_values=cache, use_cache=False)


def test_cache_does_not_keep_the_fused_qkv_alive():
    model = random_model()
    cache = model(torch.randint(0, VOCAB, (1, 7))).past_key_values
    for k, v in cache.layers:
        for t in (k, v):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()

"""LLMEngine on real models: batched ragged sequences, chunked prefill, preemption, prefix reuse,
per-sequence NTK, sampling options and stop handling, each against the model's own generate()."""
import pytest
import torch
from _models import random_prompts

from qwen_int4.config import GenerationConfig, QwenConfig
from qwen_int4.engine import EngineConfig, LLMEngine, SamplingParams
from qwen_int4.engine.sampler import apply_presence_frequency_penalty
from qwen_int4.engine.text import IncrementalText
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.sampling import mask_padded_vocab

LENGTHS = (3, 17, 33, 40, 5, 9)


@pytest.fixture(scope="module")
def model(tiny_int4_model):
    return tiny_int4_model


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=0)


def generate_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), do_sample=False, repetition_penalty=1.0, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [generate_greedy(model, p, 16) for p in prompts]


GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def run(model, tokenizer, prompts, params=GREEDY, **config):
    engine = LLMEngine(model, tokenizer, EngineConfig(**config))
    outs = engine.generate(prompts, params)
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    return engine, outs


def test_packed_forward_with_position_ids_equals_separate_forwards(model):
    # the model-side generalisation the engine relies on: two sequences in one row, block-diagonal mask
    a, b = torch.randint(0, 151000, (1, 5)), torch.randint(0, 151000, (1, 7))
    ids = torch.cat((a, b), dim=1)  # [1, 12]
    positions = torch.cat((torch.arange(5), torch.arange(7)))[None]  # [1, 12]
    seq = torch.tensor([0] * 5 + [1] * 7)
    mask = (seq[:, None] == seq[None, :]) & (positions[0][None, :] <= positions[0][:, None])  # [12, 12]
    with torch.no_grad():
        packed = model(ids, attention_mask=mask[None, None], use_cache=False, position_ids=positions).logits
        alone = torch.cat((model(a).logits, model(b).logits), dim=1)
        picked = model(ids, attention_mask=mask[None, None], use_cache=False, position_ids=positions,
                       logits_to_keep=torch.tensor([4, 11])).logits
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(picked, packed[:, [4, 11]])
    with pytest.raises(ValueError, match="attention_mask must be a bool"):
        model(ids, use_cache=False, position_ids=positions)
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(ids, attention_mask=mask[None, None], use_cache=False, position_ids=positions[:, :5])


def test_batched_ragged_prompts_equal_generate(model, tokenizer, prompts, expected):
    _, outs = run(model, tokenizer, prompts, num_blocks=200, block_size=4)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)


def test_chunked_prefill_and_preemption_equal_an_unconstrained_run(model, tokenizer, prompts, expected):
    # 16 blocks of 4 = 64 slots for six sequences of up to 56 tokens; steps of at most 7 tokens
    engine, outs = run(model, tokenizer, prompts, num_blocks=16, block_size=4, max_num_batched_tokens=7)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert engine.num_preemptions > 0


def test_prefix_cache_reuses_blocks_with_the_same_output(model, tokenizer, prompts, expected):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=200, block_size=4))
    first = engine.generate([prompts[3]], GREEDY)[0]
    computed = []
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        computed.append(sum(out.scheduled.values()))
        return out

    engine.scheduler.schedule = spy
    second = engine.generate([prompts[3]], GREEDY)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == expected[3]
    assert computed[0] < len(prompts[3])  # the prompt's full blocks came from the cache


def test_each_sequence_keeps_its_own_ntk_alpha(tokenizer):
    # seq_length 16: prompts of 10, 20 and 40 tokens get alphas 1, 3 and 7 (and LogN past 16),
    # batched together; each must equal the prompt run alone by generate().
    cfg = QwenConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                     intermediate_size=192, seq_length=16)
    model = QWenLMHeadModel(cfg, GenerationConfig())
    model.init_weights(5)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():  # sharp attention (as tests/test_rope_ntk_logn.py), so positions matter
        for name, p in model.named_parameters():
            if name.endswith("c_attn.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "ln_" not in name:
                p.mul_(5.0)
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (10, 20, 40)]
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=24))
    requests = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0))
                for i, p in enumerate(prompts)]
    assert [r.seqs[0].ntk_alpha for r in requests] == [1.0, 3.0, 7.0]
    while engine.has_unfinished():
        engine.step()
    assert [r.seqs[0].output_ids for r in requests] == [generate_greedy(model, p, 12) for p in prompts]


def test_seeded_sampling_is_reproducible_per_choice(model, tokenizer, prompts):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=7, n=3)
    _, (a,) = run(model, tokenizer, [prompts[1]], params, num_blocks=100)
    _, (b,) = run(model, tokenizer, [prompts[1]], params, num_blocks=100)
    choices = [c.token_ids for c in a.outputs]
    assert choices == [c.token_ids for c in b.outputs]
    assert len({tuple(c) for c in choices}) == 3  # seed + i per choice: different draws
    single = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=8)
    _, (c,) = run(model, tokenizer, [prompts[1]], single, num_blocks=100)
    assert c.outputs[0].token_ids == choices[1]


def test_stop_token_ends_the_sequence(model, tokenizer, prompts, expected):
    stop_at = expected[2][5]
    params = SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_at])
    _, (out,) = run(model, tokenizer, [prompts[2]], params, num_blocks=100)
    first = expected[2].index(stop_at)
    assert out.outputs[0].token_ids == expected[2][: first + 1] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == tokenizer.decode(expected[2][:first])


def test_stop_string_cuts_the_text_exactly(model, tokenizer, prompts, expected):
    full = tokenizer.decode(expected[4])
    stop = full[7:10]
    params = SamplingParams(max_tokens=16, temperature=0.0, stop=[stop])
    _, (out,) = run(model, tokenizer, [prompts[4]], params, num_blocks=100)
    assert out.outputs[0].text == full[: full.index(stop)] and out.outputs[0].finish_reason == "stop"


def test_logprobs_come_from_the_model_distribution(model, tokenizer, prompts, expected):
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=4)
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=100))
    engine.add_request("r", prompts[0], params)
    first = []
    while engine.has_unfinished():
        for out in engine.step():
            first.extend(out.outputs[0].delta_logprobs)
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1].float()
    logprobs = mask_padded_vocab(logits[None])[0].log_softmax(-1)
    lp = first[0]
    assert lp.token_id == expected[0][0] and lp.top[0][0] == lp.token_id and len(lp.top) == 4
    assert lp.logprob == pytest.approx(float(logprobs[lp.token_id]), abs=1e-4)
    assert [t for t, _ in lp.top] == logprobs.topk(4).indices.tolist()
    assert [x.token_id for x in first] == expected[0][:3]


def test_abort_frees_the_blocks(model, tokenizer, prompts):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=100, block_size=4))
    engine.add_request("a", prompts[3], SamplingParams(max_tokens=50, temperature=0.0, n=2))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used > 0
    engine.abort_request("a")
    assert engine.pool.num_used == 0 and not engine.has_unfinished() and engine.step() == []


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "empty"),
    ([1, 151936], GREEDY, r"token ids must be integers in \[0, 151936\)"),
    ([1] * 400, GREEDY, "maximum context length is 400 tokens, but the prompt has 400"),
    ([1] * 390, GREEDY, "lower max_tokens to at most 10"),
    ([1], SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(n=0), "n must be"),
    ([1], SamplingParams(logprobs=21), "logprobs"),
])
def test_bad_requests_are_rejected(model, tokenizer, prompt, params, match):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=100, block_size=4))  # 400 slots: max_model_len 400
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished()


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 10)
    out = apply_presence_frequency_penalty(logits, [5, 5, 7], presence=0.5, frequency=0.25)
    assert out[0, 5] == -(0.5 + 2 * 0.25) and out[0, 7] == -(0.5 + 0.25) and out[0, 0] == 0


def test_incremental_text_holds_back_a_possible_stop_string(tokenizer):
    text = IncrementalText(tokenizer, stop=["world!"])
    pieces = []
    for token in tokenizer.encode("Hello world") + tokenizer.encode("?"):
        assert not text.add(token)
        pieces.append(text.release())
    assert "".join(pieces) == "Hello world?"
    assert pieces[1] == " "  # " world" could start "world!": only the space goes out
    text = IncrementalText(tokenizer, stop=["world!"])
    stopped = [text.add(t) for t in tokenizer.encode("Hello world!! more")]
    assert stopped.index(True) == len(tokenizer.encode("Hello world!")) - 1  # and True after it
    assert text.release() == "Hello " and text.stopped_by == "world!"


def test_incremental_text_keeps_split_characters_together(tokenizer):
    text = IncrementalText(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(bytes([b])) for b in "你好".encode()]
    pieces = []
    for token in ids:
        text.add(token)
        pieces.append(text.release())
    assert pieces == ["", "", "你", "", "", "好"]

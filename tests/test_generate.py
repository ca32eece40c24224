"""generate(): greedy vs a no-cache argmax loop, seeds, limits, stop words, eos, padded batches, streaming."""
import io

import pytest
import torch

from qwen_int4.config import GenerationConfig, QwenConfig
from qwen_int4.generate import TextStreamer
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.tokenizer import EOD_ID, VOCAB_SIZE

PAD = 151646  # <|extra_0|>, the reference's batch pad token
GREEDY = dict(do_sample=False, repetition_penalty=1.0)


def tiny_model(seed: int = 0, logit_scale: float = 20.0) -> QWenLMHeadModel:
    """Random 2-layer model over the real 151936-row vocabulary, float32.

    lm_head is scaled up so greedy choices are far from ties (cache vs recompute noise)."""
    cfg = QwenConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                     intermediate_size=256, seq_length=8192)
    model = QWenLMHeadModel(cfg, GenerationConfig())
    model.init_weights(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return torch.tensor([tokenizer.encode("The quick brown fox jumps")])


def greedy_by_recompute(model, ids: torch.Tensor, steps: int, eos: int = EOD_ID) -> list[int]:
    """Independent oracle: full forward without cache each step, argmax over real ids."""
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1].float()
            logits[:, VOCAB_SIZE:] = float("-inf")
            nxt = int(logits.argmax(-1))
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == eos:
                break
    return new


@pytest.fixture(scope="module")
def greedy12(model, prompt):
    g = greedy_by_recompute(model, prompt, 12)
    assert EOD_ID not in g and len(g) == 12, "the fixture model should not emit eos in 12 steps"
    return g


def new_ids(out: torch.Tensor, prompt: torch.Tensor) -> list[int]:
    assert torch.equal(out[:, : prompt.shape[1]], prompt), "the prompt must be returned unchanged"
    return out[0, prompt.shape[1]:].tolist()


def test_greedy_equals_argmax_loop_without_cache(model, prompt, greedy12):
    out = model.generate(prompt, max_new_tokens=12, stop_words_ids=[], **GREEDY)
    assert new_ids(out, prompt) == greedy12


def test_max_new_tokens_is_respected(model, prompt, greedy12):
    for n in (1, 5):
        out = model.generate(prompt, max_new_tokens=n, **GREEDY)
        assert new_ids(out, prompt) == greedy12[:n]


def test_seeded_sampling_is_reproducible():
    flat = tiny_model(seed=1, logit_scale=1.0)
    prompt = torch.tensor([[100, 200, 300]])
    run = lambda seed: flat.generate(prompt, max_new_tokens=10, do_sample=True, temperature=5.0,  # noqa: E731
                                     top_p=1.0, seed=seed)
    assert torch.equal(run(123), run(123))
    assert not torch.equal(run(123), run(124))


def test_stop_word_forces_eos_like_the_reference(model, prompt, greedy12):
    g = greedy12
    assert g[1:3] != g[0:2], "choose a stop word that first occurs at positions 1..2"
    out = model.generate(prompt, max_new_tokens=12, stop_words_ids=[g[1:3]], **GREEDY)
    assert new_ids(out, prompt) == g[:3] + [EOD_ID]  # ...<stop word><|endoftext|>, as StopWordsLogitsProcessor


def test_stop_word_at_the_token_limit_gets_no_eos(model, prompt, greedy12):
    out = model.generate(prompt, max_new_tokens=3, stop_words_ids=[greedy12[1:3]], **GREEDY)
    assert new_ids(out, prompt) == greedy12[:3]


def test_stop_word_spanning_prompt_and_output(model, prompt, greedy12):
    stop = [int(prompt[0, -1]), greedy12[0]]
    out = model.generate(prompt, max_new_tokens=12, stop_words_ids=[stop], **GREEDY)
    assert new_ids(out, prompt) == [greedy12[0], EOD_ID]


def test_prompt_ending_in_a_stop_word_yields_eos_at_once(model, prompt):
    out = model.generate(prompt, max_new_tokens=12, stop_words_ids=[[int(prompt[0, -1])]], **GREEDY)
    assert new_ids(out, prompt) == [EOD_ID]


def test_stop_words_from_the_generation_config(model, prompt, greedy12):
    cfg = GenerationConfig(stop_words_ids=[greedy12[2:3]], **GREEDY)
    out = model.generate(prompt, generation_config=cfg, max_new_tokens=12)
    assert new_ids(out, prompt) == greedy12[:3] + [EOD_ID]


def test_eos_ends_generation(model, prompt, greedy12):
    i = next(i for i in range(2, 12) if greedy12[i] not in greedy12[:i])
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=greedy12[i], **GREEDY)
    assert new_ids(out, prompt) == greedy12[: i + 1]


def test_padded_vocabulary_is_never_generated(prompt):
    m = tiny_model(seed=2)
    with torch.no_grad():
        m.lm_head.weight[VOCAB_SIZE:] = m.lm_head.weight[VOCAB_SIZE:] * 0 + 5.0  # would win everywhere
    out = m.generate(prompt, max_new_tokens=4, **GREEDY)
    assert max(new_ids(out, prompt)) < VOCAB_SIZE


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_left_padded_batch_equals_each_prompt_alone(model, tokenizer):
    rows = [tokenizer.encode("Hello there"), tokenizer.encode("One two three four five six seven")]
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=8, **GREEDY)[0, len(row):].tolist()
        batched = out[i, ids.shape[1]:].tolist()
        assert batched[: len(alone)] == alone
        assert batched[len(alone):] == [EOD_ID] * (len(batched) - len(alone)), "finished rows are padded"


def test_finished_rows_are_filled_with_pad_token_id(model, tokenizer):
    rows = [tokenizer.encode("Hello there"), tokenizer.encode("One two three four five six seven")]
    alone = [greedy_by_recompute(model, torch.tensor([r]), 8) for r in rows]
    stop = alone[0][1]
    assert stop not in alone[0][:1] and stop not in alone[1], "row 1 must not meet row 0's stop word"
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, stop_words_ids=[[stop]],
                         pad_token_id=PAD, **GREEDY)
    width = ids.shape[1]
    assert out[0, width:].tolist() == alone[0][:2] + [EOD_ID] + [PAD] * 5
    assert out[1, width:].tolist() == alone[1]


def test_repetition_penalty_ignores_left_padding(model, tokenizer):
    short, long = tokenizer.encode("Hello there"), tokenizer.encode("One two three four five six seven")
    cfg = dict(do_sample=False, repetition_penalty=3.0, max_new_tokens=4)
    alone = model.generate(torch.tensor([short]), **cfg)[0, len(short):].tolist()
    pad = alone[0]  # pad with the very token the short row generates first
    assert pad not in short
    ids, mask = left_pad([short, long], pad=pad)
    out = model.generate(ids, attention_mask=mask, **cfg)
    assert out[0, ids.shape[1]:].tolist() == alone


class Recorder:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_receives_the_prompt_then_exactly_the_generated_ids(model, prompt, greedy12):
    rec = Recorder()
    out = model.generate(prompt, max_new_tokens=6, streamer=rec, **GREEDY)
    assert torch.equal(rec.puts[0], prompt)
    assert [p.shape for p in rec.puts[1:]] == [torch.Size([1])] * 6
    assert torch.cat(rec.puts[1:]).tolist() == new_ids(out, prompt) == greedy12[:6]
    assert rec.ended == 1


def test_text_streamer_writes_the_generated_text(model, prompt, tokenizer):
    sink = io.StringIO()
    streamer = TextStreamer(tokenizer, skip_prompt=True, stream=sink)
    out = model.generate(prompt, max_new_tokens=6, streamer=streamer, **GREEDY)
    text = tokenizer.decode(new_ids(out, prompt))
    assert streamer.text == text
    assert sink.getvalue() == text + "\n"


def test_generate_tokens_yields_one_batch_of_ids_per_step(model, prompt, greedy12):
    steps = list(model.generate_tokens(prompt, max_new_tokens=5, **GREEDY))
    assert [s.tolist() for s in steps] == [[t] for t in greedy12[:5]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_new_tokens=4, top_q=0.5), TypeError, "top_q"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(stop_words_ids=[[]]), ValueError, "stop_words_ids"),
        (dict(stop_words_ids=[5]), ValueError, "stop_words_ids"),
    ],
)
def test_bad_options_raise_before_generating(model, prompt, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(prompt, **kwargs)
    with pytest.raises(error, match=match):
        model.generate_tokens(prompt, **kwargs)  # eager: no need to iterate


def test_bad_inputs_raise(model, prompt):
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model.generate(prompt[0])
    right_padded = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.tensor([[5, 6, PAD]]), attention_mask=right_padded)
    with pytest.raises(ValueError, match="all padding"):
        model.generate(torch.tensor([[PAD, PAD], [5, 6]]), attention_mask=torch.tensor([[0, 0], [1, 1]]))


def test_loaded_gptq_checkpoint_generates_like_the_recompute_loop(tmp_path, tokenizer):
    from qwen_int4.loader import load_model
    from qwen_int4.testing.checkpoint import make_test_checkpoint

    ckpt = make_test_checkpoint(tmp_path / "int4", bits=4, seed=5)
    model = load_model(ckpt, torch_dtype="float32", progress=False)
    assert model.generation_config.repetition_penalty == 1.1, "the checkpoint's generation_config is used"
    prompt = torch.tensor([tokenizer.encode("Once upon a time")])
    out = model.generate(prompt, max_new_tokens=6, stop_words_ids=[], **GREEDY)
    assert new_ids(out, prompt) == greedy_by_recompute(model, prompt, 6)
    # the checkpoint's defaults (sampling, top_p 0.8, penalty 1.1) with a seed: reproducible
    sampled = [model.generate(prompt, max_new_tokens=6, seed=7) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])


def test_prompt_longer_than_context_is_rejected_and_generation_stops_at_context():
    cfg = QwenConfig(vocab_size=151936, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     kv_channels=16, intermediate_size=64, seq_length=8, max_position_embeddings=12)
    small = QWenLMHeadModel(cfg)
    small.init_weights(0)
    with pytest.raises(ValueError, match="prompt has 12 tokens, but the model's context is 12"):
        small.generate(torch.arange(12)[None], do_sample=False)
    out = small.generate(torch.arange(10)[None], do_sample=False, max_new_tokens=50, eos_token_id=151900)  # a padded id: never sampled
    assert out.shape[1] == 12

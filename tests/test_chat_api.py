"""model.chat / model.chat_stream: prompt ids, stop words, history, streaming text, errors.

A "bigram" model (attention and MLP outputs zeroed, so the logits depend on the current
token only) is wired to answer any ChatML prompt with "Hello world!<|im_end|>", which
makes exact expectations possible with a real QWenLMHeadModel.
"""
import pytest
import torch

from qwen_int4.chat import decode_tokens, get_stop_words_ids, make_context
from qwen_int4.config import GenerationConfig, QwenConfig
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.tokenizer import EOD_ID, IM_END_ID

REPLY = "Hello world!"


def random_model(seed: int = 0) -> QWenLMHeadModel:
    cfg = QwenConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                     intermediate_size=256, seq_length=8192)
    model = QWenLMHeadModel(cfg, GenerationConfig())
    model.init_weights(seed)
    return model.eval()


@pytest.fixture(scope="module")
def bigram(tokenizer):
    """After the prompt's final "\\n" (198) it emits Hello, " world", "!", <|im_end|>."""
    model = random_model(seed=3)
    script = [198, *tokenizer.encode(REPLY), IM_END_ID]
    assert len(script) == 5
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        for i, (tok, nxt) in enumerate(zip(script, script[1:])):
            model.transformer.wte.weight[tok] = torch.nn.functional.one_hot(torch.tensor(i), 64).float()
            model.lm_head.weight[nxt] = 0.0
            model.lm_head.weight[nxt, i] = 100.0  # ln_f(one-hot) = 8 * one-hot: logit 800
    return model


@pytest.fixture(scope="module")
def model():
    return random_model()


class PromptSpy:
    """Records the input_ids of the first forward of every generate call (the prefill)."""

    def __init__(self, model):
        self.prompts = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        if kwargs.get("past_key_values") is None:
            self.prompts.append(ids[0].tolist())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_chat_answers_and_appends_history(bigram, tokenizer):
    history = [("Hi", "Hello.")]
    with PromptSpy(bigram) as spy:
        response, new_history = bigram.chat(tokenizer, "How are you?", history=history)
    assert response == REPLY
    assert new_history == [("Hi", "Hello."), ("How are you?", REPLY)]
    assert history == [("Hi", "Hello.")], "the caller's history must not be modified"
    _, expected = make_context(tokenizer, "How are you?", history, "You are a helpful assistant.", 6144, "chatml")
    assert spy.prompts == [expected]


def test_system_prompt_changes_the_context(bigram, tokenizer):
    with PromptSpy(bigram) as spy:
        bigram.chat(tokenizer, "Hi")
        bigram.chat(tokenizer, "Hi", system="You are a pirate.")
    assert spy.prompts[0] == make_context(tokenizer, "Hi", None, "You are a helpful assistant.")[1]
    assert spy.prompts[1] == make_context(tokenizer, "Hi", None, "You are a pirate.")[1]
    assert spy.prompts[0] != spy.prompts[1]


def test_max_window_size_truncates_history(bigram, tokenizer):
    history = [("first question " * 20, "first answer " * 20), ("Hi", "Hello.")]
    with PromptSpy(bigram) as spy:
        bigram.chat(tokenizer, "Next", history=history, max_window_size=60)
    expected = make_context(tokenizer, "Next", history, "You are a helpful assistant.", 60)[1]
    assert spy.prompts == [expected]
    assert len(expected) < len(make_context(tokenizer, "Next", history, "You are a helpful assistant.")[1])


def test_output_ids_end_with_im_end_then_endoftext(bigram, tokenizer):
    _, context = make_context(tokenizer, "Hi", system="You are a helpful assistant.")
    out = bigram.generate(torch.tensor([context]), stop_words_ids=get_stop_words_ids("chatml", tokenizer))
    assert out[0, len(context):].tolist() == [*tokenizer.encode(REPLY), IM_END_ID, EOD_ID]


def test_chat_stream_yields_the_cumulative_reply(bigram, tokenizer):
    chunks = list(bigram.chat_stream(tokenizer, "Hi"))
    # one string per generated token: Hello, " world", "!", <|im_end|>, <|endoftext|> (specials skipped)
    assert chunks == ["Hello", "Hello world", REPLY, REPLY, REPLY]
    response, _ = bigram.chat(tokenizer, "Hi", do_sample=False)
    assert chunks[-1] == response


def test_chat_stream_does_not_touch_history(bigram, tokenizer):
    history = [("Hi", "Hello.")]
    with PromptSpy(bigram) as spy:
        list(bigram.chat_stream(tokenizer, "Again", history=history))
    assert history == [("Hi", "Hello.")]
    assert spy.prompts == [make_context(tokenizer, "Again", history, "You are a helpful assistant.")[1]]


def test_user_stop_words_are_added_to_chatml_ones(bigram, tokenizer):
    world = tokenizer.encode(" world")
    stops = [world]
    chunks = list(bigram.chat_stream(tokenizer, "Hi", stop_words_ids=stops))
    assert chunks == ["Hello", "Hello world", "Hello world"]  # " world", then the forced <|endoftext|>
    assert stops == [world], "the caller's list must not be modified"


def test_chat_with_a_user_stop_word_drops_the_forced_endoftext(bigram, tokenizer):
    response, _ = bigram.chat(tokenizer, "Hi", stop_words_ids=[tokenizer.encode(" world")])
    assert response == "Hello world"


def test_chat_on_a_random_model_matches_generate(model, tokenizer):
    response, history = model.chat(tokenizer, "Tell me a story", max_new_tokens=12, do_sample=False)
    raw, context = make_context(tokenizer, "Tell me a story", system="You are a helpful assistant.")
    out = model.generate(torch.tensor([context]), max_new_tokens=12, do_sample=False,
                         stop_words_ids=get_stop_words_ids("chatml", tokenizer))
    assert isinstance(response, str)
    assert response == decode_tokens(out[0], tokenizer, len(raw), len(context), "chatml")
    assert history == [("Tell me a story", response)]

    generated = out[0, len(context):].tolist()
    expected = [tokenizer.decode(generated[: i + 1], skip_special_tokens=True, errors="ignore")
                for i in range(len(generated))]
    assert list(model.chat_stream(tokenizer, "Tell me a story", max_new_tokens=12, do_sample=False)) == expected


def test_chat_stream_text_equals_full_decode_with_split_characters(bigram, tokenizer):
    # "你好" split into byte-level tokens exercises held-back partial UTF-8 characters.
    from qwen_int4.generate import _cumulative_text

    ids = [tokenizer.convert_tokens_to_ids(bytes([b])) for b in "你好a".encode()] + [IM_END_ID]
    steps = (torch.tensor([i]) for i in ids)
    expected = [tokenizer.decode(ids[: i + 1], skip_special_tokens=True, errors="ignore") for i in range(len(ids))]
    assert list(_cumulative_text(steps, tokenizer)) == expected


def test_bad_chat_arguments(bigram, tokenizer):
    with pytest.raises(TypeError, match="int"):
        bigram.chat(tokenizer, 42)
    with pytest.raises(TypeError, match="list"):
        bigram.chat_stream(tokenizer, ["Hi"])
    with pytest.raises(ValueError, match="chatml"):
        bigram.chat(tokenizer, "Hi", generation_config=GenerationConfig(chat_format="raw"))
    with pytest.raises(ValueError, match="chatml"):
        bigram.chat_stream(tokenizer, "Hi", chat_format="raw")
    with pytest.raises(TypeError, match="top_q"):
        bigram.chat(tokenizer, "Hi", top_q=0.1)
    with pytest.raises(ValueError, match="chat_stream"):
        bigram.chat(tokenizer, "Hi", stream=True)

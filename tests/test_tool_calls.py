"""Function calling: the ReAct prompt and parser, and tool calls round-tripping through the openai client.

The end-to-end tests serve scripted "bigram" models (qwen_int4.testing.scripted) that
answer a chat prompt (ending in "\\n") with a ReAct call, and a prompt that continues
after a tool result (ending in "Thought:") with a plain reply.
"""
import json

import pytest

from qwen_int4.chat import make_context
from qwen_int4.engine import EngineConfig
from qwen_int4.server import create_app
from qwen_int4.server.chat_prompt import PromptError, build_chat_prompt
from qwen_int4.server.protocol import ChatMessage
from qwen_int4.server.tool_calls import ReActStream, parse_response, react_instruction
from qwen_int4.testing.scripted import bigram_model, distinct_token_ids
from qwen_int4.testing.server import running_server
from qwen_int4.tokenizer import IM_END_ID

openai = pytest.importorskip("openai")

WEATHER = {"name": "get_weather", "description": "Current weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL_TEXT = 'I will look it up.\nAction:\nget_weather\n\nAction Input:{"city": "Paris"}\nObservation:\n\n'
AFTER_RESULT = " It is sunny in Paris."
FINAL_TEXT = "I know this one.\nFinal Answer: Paris is in France."
NL, COLON = 198, 25  # the last token of a chat prompt, and of a prompt ending in "Thought:"


def msgs(*pairs):
    return [ChatMessage(**m) for m in pairs]


# ---- prompt and parser ----------------------------------------------------------------------------
def test_react_instruction_text():
    text = react_instruction([WEATHER])
    params = json.dumps(WEATHER["parameters"], ensure_ascii=False)
    assert text.startswith("Answer the following questions as best you can. You have access to the following APIs:\n\n"
                           "get_weather: Call this tool to interact with the get_weather API. What is the get_weather "
                           f"API useful for? Current weather of a city. Parameters: {params}\n\nUse the following format:")
    assert "Action: the action to take, should be one of [get_weather]\n" in text
    assert text.endswith("Final Answer: the final answer to the original input question\n\nBegin!")
    qwen_style = react_instruction([{"name": "a", "name_for_model": "m", "name_for_human": "H",
                                     "description_for_model": "d", "parameters": {}}, {"name": "b"}])
    assert "m: Call this tool to interact with the H API. What is the H API useful for? d Parameters: {}" in qwen_style
    assert "should be one of [m, b]" in qwen_style


def test_first_turn_puts_the_instruction_before_the_question(tokenizer):
    prompt = build_chat_prompt(tokenizer, msgs({"role": "user", "content": "Weather in Paris?"}), [WEATHER])
    query = f"{react_instruction([WEATHER])}\n\nQuestion: Weather in Paris?"
    assert prompt.query == query and prompt.history == []
    assert prompt.ids == make_context(tokenizer, query, [], "You are a helpful assistant.")[1]


def test_tool_result_continues_the_assistant_turn(tokenizer):
    conversation = msgs(
        {"role": "system", "content": "\nBe brief.  "},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "I will look it up.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    )
    prompt = build_chat_prompt(tokenizer, conversation, [WEATHER])
    assert prompt.system == "Be brief." and prompt.query is None
    user = f"{react_instruction([WEATHER])}\n\nQuestion: Weather in Paris?"
    assistant = ('Thought: I will look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
                 "Observation: sunny\nThought:")
    assert prompt.history == [(user, assistant)]
    expected = (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n{assistant}")  # no <|im_end|>: the model continues the turn
    assert tokenizer.decode(prompt.ids) == expected
    assert prompt.ids[-1] == COLON


def test_legacy_function_messages_and_answers_in_history(tokenizer):
    conversation = msgs(
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "rain"},
        {"role": "assistant", "content": "It rains."},
        {"role": "user", "content": "Thanks"},
    )
    prompt = build_chat_prompt(tokenizer, conversation, [WEATHER])
    assert prompt.history[0] == ("Hi", "Thought: I now know the final answer.\nFinal Answer: Hello!")
    assert prompt.history[1][1] == ("Thought: \nAction: get_weather\nAction Input: {}\nObservation: rain\n"
                                    "Thought: I now know the final answer.\nFinal Answer: It rains.")
    assert prompt.history[1][0].endswith("\n\nQuestion: Weather?")  # the reference's code: the last history turn
    assert prompt.query == "Thanks"


@pytest.mark.parametrize("conversation, match", [
    ([{"role": "assistant", "content": "Hi"}], "at least one user message"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "user message before an assistant"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], "assistant message before a tool"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "role 'system'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
])
def test_conversations_the_reference_rejects(tokenizer, conversation, match):
    with pytest.raises(PromptError, match=match):
        build_chat_prompt(tokenizer, msgs(*conversation), [WEATHER])


@pytest.mark.parametrize("text, content, name, arguments", [
    ("Thought: need data\nAction: get_weather\nAction Input: {\"city\": \"Rome\"}\nObservation:", "need data",
     "get_weather", '{"city": "Rome"}'),
    ("Thought: x\nAction: f\nAction Input: {}", "x", "f", "{}"),  # Observation cut off by the stop word
    ("Thought: I now know the final answer\nFinal Answer: 42", "42", None, None),
    ("Thought: a\nFinal Answer: 1\nFinal Answer: 2", "2", None, None),
    ("Just text, no format.", "Just text, no format.", None, None),
])
def test_parse_response(text, content, name, arguments):
    assert parse_response(text) == parse_response(text)  # pure
    parsed = parse_response(text)
    assert (parsed.content, parsed.name, parsed.arguments) == (content, name, arguments)


@pytest.mark.parametrize("text", [
    "Thought: need data\nAction: get_weather\nAction Input: {\"city\": \"Rome\"}\nObservation:",
    "Thought: I now know the final answer\nFinal Answer: it is 42 and more",
    "Just text, no format.\nAction without the input",
])
def test_react_stream_decides_like_parse_response(text):
    stream, emitted = ReActStream(), []
    for ch in text:
        emitted.append(stream.feed(ch))
    end = stream.finish()
    expected = parse_response(text)
    assert "".join(emitted) + end.content == expected.content
    assert (end.name, end.arguments) == (expected.name, expected.arguments)
    if "Final Answer: " in text:  # the answer streams as it comes, not at the end
        assert sum(1 for e in emitted if e) > 5


# ---- end to end through the openai client ---------------------------------------------------------
@pytest.fixture(scope="module")
def call_server(tokenizer):
    avoid = {NL, COLON, IM_END_ID}
    call = distinct_token_ids(tokenizer, CALL_TEXT, avoid)
    after = distinct_token_ids(tokenizer, AFTER_RESULT, avoid | set(call))
    model = bigram_model([[NL, *call], [COLON, *after, IM_END_ID]])
    app = create_app(lambda: (model, tokenizer), ["qwen-tools"], EngineConfig(num_blocks=256))
    with running_server(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]
TOOLS = [{"type": "function", "function": WEATHER}]


def streamed(client, **kwargs):
    """(content, tool_calls as dicts, function_call, finish_reason) assembled from a stream."""
    content, calls, function_call, finish = "", {}, None, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        if delta.function_call is not None:
            function_call = (delta.function_call.name, delta.function_call.arguments)
        finish = choice.finish_reason or finish
    return content, list(calls.values()), function_call, finish


def test_tool_call_round_trip(call_server):
    r = call_server.chat.completions.create(model="qwen-tools", messages=QUESTION, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "I will look it up."
    messages = QUESTION + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r2 = call_server.chat.completions.create(model="qwen-tools", messages=messages, tools=TOOLS, temperature=0)
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.tool_calls is None
    assert r2.choices[0].message.content == AFTER_RESULT


def test_streamed_tool_call_equals_the_whole_response(call_server):
    content, calls, _, finish = streamed(call_server, model="qwen-tools", messages=QUESTION, tools=TOOLS,
                                         temperature=0)
    assert finish == "tool_calls" and content == "I will look it up."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")


def test_legacy_functions_shape(call_server):
    kwargs = dict(model="qwen-tools", messages=QUESTION, functions=[WEATHER], temperature=0)
    r = call_server.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "function_call"
    assert r.choices[0].message.function_call.name == "get_weather"
    assert r.choices[0].message.function_call.arguments == '{"city": "Paris"}'
    content, _, function_call, finish = streamed(call_server, **kwargs)
    assert function_call == ("get_weather", '{"city": "Paris"}') and finish == "function_call"
    assert content == r.choices[0].message.content


def test_tool_choice_none_is_a_plain_chat(call_server):
    r = call_server.chat.completions.create(model="qwen-tools", messages=QUESTION, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=30)
    # no ReAct parsing, and no "Observation:" stop: the raw text runs on to max_tokens
    choice = r.choices[0]
    assert choice.message.tool_calls is None and choice.message.content.startswith(CALL_TEXT)
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 30


def test_unknown_named_tool_is_a_bad_request(call_server):
    with pytest.raises(openai.BadRequestError, match="not among the given ones"):
        call_server.chat.completions.create(model="qwen-tools", messages=QUESTION, tools=TOOLS,
                                            tool_choice={"type": "function", "function": {"name": "nope"}})


def test_final_answer_streams_like_the_whole_response(tokenizer):
    model = bigram_model([[NL, *distinct_token_ids(tokenizer, FINAL_TEXT, {NL, IM_END_ID}), IM_END_ID]])
    app = create_app(lambda: (model, tokenizer), ["qwen-answer"], EngineConfig(num_blocks=256))
    with running_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        kwargs = dict(model="qwen-answer", messages=QUESTION, tools=TOOLS, temperature=0)
        whole = client.chat.completions.create(**kwargs).choices[0]
        content, calls, _, finish = streamed(client, **kwargs)
    assert whole.message.content == content == "Paris is in France."
    assert whole.finish_reason == finish == "stop" and calls == []

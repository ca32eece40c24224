"""The OpenAI-compatible server through the real `openai` client, on the tiny Int4 checkpoint.

Greedy outputs are checked against the model's own generate() on make_context ids; the
server runs in a thread of this process (one CLI test starts `qwen-int4 serve` as a subprocess).
"""
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from qwen_int4.chat import DEFAULT_SYSTEM, make_context
from qwen_int4.engine import EngineConfig, LLMEngine, SamplingParams
from qwen_int4.server import create_app
from qwen_int4.server.metrics import parse_metrics
from qwen_int4.testing.server import free_port, running_server
from qwen_int4.tokenizer import IM_END_ID, IM_START_ID

openai = pytest.importorskip("openai")

NAME = "tiny-int4"
M = 'model_name="tiny-int4"'


@pytest.fixture(scope="module")
def model(tiny_int4_dir):
    from qwen_int4.loader import load_model

    return load_model(tiny_int4_dir, torch_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    # 0.04 GiB of 16 KiB blocks: more than 32768 tokens, so the context is config.max_position_embeddings
    app = create_app(lambda: (model, tokenizer), [NAME], EngineConfig(kv_cache_gb=0.04))
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def chat_ids(tokenizer, text):
    return make_context(tokenizer, text, [], DEFAULT_SYSTEM)[1]


def greedy_chat(model, tokenizer, text, n):
    """The model's own greedy reply ids and text (its generation_config's repetition_penalty, as the server)."""
    ids = chat_ids(tokenizer, text)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                         stop_words_ids=[[IM_END_ID], [IM_START_ID]])[0, len(ids):].tolist()
    return out, tokenizer.decode(out, skip_special_tokens=True)


def ask(client, text, **kwargs):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], **kwargs)


def stream_text(stream):
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def metrics(server):
    return parse_metrics(httpx.get(f"{server}/metrics").text)


def test_health_models_and_tokenizer_endpoints(server, tokenizer):
    assert httpx.get(f"{server}/health").status_code == 200
    models = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME] and models["data"][0]["max_model_len"] == 32768
    r = httpx.post(f"{server}/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == 2
    r = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert r["tokens"] == chat_ids(tokenizer, "Hi")
    assert httpx.post(f"{server}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == tokenizer.decode(r["tokens"])


def test_chat_stream_equals_whole_equals_generate(client, model, tokenizer):
    expected_ids, expected_text = greedy_chat(model, tokenizer, "Tell me a story", 12)
    whole = ask(client, "Tell me a story", max_tokens=12, temperature=0)
    text, chunks = stream_text(ask(client, "Tell me a story", max_tokens=12, temperature=0, stream=True,
                                   stream_options={"include_usage": True}))
    assert whole.choices[0].message.content == text == expected_text
    assert whole.choices[0].finish_reason == "length"
    prompt_tokens = len(chat_ids(tokenizer, "Tell me a story"))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        prompt_tokens, len(expected_ids), prompt_tokens + len(expected_ids))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: the last chunk
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completions_stream_equals_whole_equals_generate(client, model, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10)[0, len(ids):].tolist()
    whole = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0)
    stream = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert whole.choices[0].text == text == tokenizer.decode(out, skip_special_tokens=True)
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == len(out)


def test_identical_concurrent_requests_give_identical_outputs(client, model, tokenizer):
    expected_ids, expected_text = greedy_chat(model, tokenizer, "Write a haiku", 16)
    results = [None] * 6

    def worker(i):
        r = ask(client, "Write a haiku", max_tokens=16, temperature=0)
        results[i] = (r.choices[0].message.content, r.usage.completion_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [(expected_text, len(expected_ids))] * 6


def test_cancelled_stream_frees_its_sequence_and_blocks(client, server):
    before = metrics(server)
    stream = ask(client, "A very long story please", max_tokens=20000, temperature=0, stream=True)
    it = iter(stream)
    for _ in range(4):
        next(it)
    during = metrics(server)
    assert during[f"qwen_int4_kv_cache_blocks_used{{{M}}}"] > 0
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = metrics(server)
        if now[f"qwen_int4_kv_cache_blocks_used{{{M}}}"] == 0 and now[f"qwen_int4_num_requests_running{{{M}}}"] == 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the cancelled request still holds blocks: {now}")
    generated = now[f"qwen_int4_generation_tokens_total{{{M}}}"] - before[f"qwen_int4_generation_tokens_total{{{M}}}"]
    assert generated < 20000


def test_client_gone_before_a_whole_response_frees_the_request(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", timeout=1.0, json={
            "model": NAME, "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 20000})
    deadline = time.monotonic() + 10
    while metrics(server)[f"qwen_int4_kv_cache_blocks_used{{{M}}}"] > 0:
        assert time.monotonic() < deadline, "the abandoned request still holds blocks"
        time.sleep(0.05)


def test_n_choices_and_prompt_batches(client, tokenizer):
    _, chunks = stream_text(ask(client, "Hi", max_tokens=4, temperature=0.8, seed=3, n=2, stream=True))
    assert sorted({c.choices[0].index for c in chunks if c.choices}) == [0, 1]
    whole = ask(client, "Hi", max_tokens=4, temperature=0.8, seed=3, n=2)
    for i in range(2):  # per choice, the stream's deltas add up to the whole response's text
        streamed_i = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert streamed_i == whole.choices[i].message.content
    batch = client.completions.create(model=NAME, prompt=["One", "Two three"], max_tokens=3, temperature=0, n=2,
                                      logprobs=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text != batch.choices[2].text == batch.choices[3].text
    assert batch.usage.prompt_tokens == len(tokenizer.encode("One")) + len(tokenizer.encode("Two three"))
    lp = batch.choices[0].logprobs
    assert len(lp.tokens) == 3 and "".join(lp.tokens) == batch.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_stop_strings_cut_exactly(client, model, tokenizer):
    _, full = greedy_chat(model, tokenizer, "Name three colors", 16)
    assert len(full) > 12
    stop = full[6:9]
    cut = full[: full.index(stop)]
    whole = ask(client, "Name three colors", max_tokens=16, temperature=0, stop=stop)
    text, chunks = stream_text(ask(client, "Name three colors", max_tokens=16, temperature=0, stop=[stop, "zzz"],
                                   stream=True))
    assert whole.choices[0].message.content == text == cut
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_n_and_seed(client, model, tokenizer):
    expected_ids, _ = greedy_chat(model, tokenizer, "Hi", 5)
    r = ask(client, "Hi", max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [tokenizer.encode(c.token, allowed_special="all") for c in content] == [[i] for i in expected_ids]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    sampled = [ask(client, "Hi", max_tokens=6, temperature=1.0, top_p=0.95, n=3, seed=11) for _ in range(2)]
    choices = [[c.message.content for c in s.choices] for s in sampled]
    assert choices[0] == choices[1] and len(set(choices[0])) == 3
    assert sampled[0].usage.completion_tokens == sum(len(tokenizer.encode(c)) > 0 for c in choices[0]) * 6


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model="gpt-4"), 404, "model"),
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(max_tokens=40000), 400, "max_tokens"),
    (dict(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (dict(top_logprobs=2), 400, "top_logprobs"),
    (dict(n=0), 400, "n"),
    (dict(temperature=3.0), 400, "temperature"),
    (dict(messages=[{"role": "user", "content": "hello " * 33000}]), 400, "messages"),
    (dict(messages=[{"role": "assistant", "content": "Hi"}]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400, "messages"),
    (dict(messages=[{"role": "robot", "content": "a"}]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]), 400, "messages.1.role"),
])
def test_bad_chat_requests_get_openai_errors(client, kwargs, status, param):
    request = dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    request.update(kwargs)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    err = info.value
    assert err.status_code == status
    assert isinstance(err, openai.NotFoundError if status == 404 else openai.BadRequestError)
    assert err.body["type"] == "invalid_request_error" and err.body["param"] == param and err.body["message"]
    assert ask(client, "Still there?", max_tokens=2).choices[0].finish_reason == "length"  # keeps serving


def test_malformed_json_and_bad_completion_requests(server, client):
    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": "tiny-int4", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "malformed JSON" in error["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    for kwargs, param in ((dict(prompt="hi", logprobs=21), "logprobs"), (dict(prompt=""), "prompt"),
                          (dict(prompt="hi", echo=True), "echo")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=NAME, max_tokens=2, **kwargs)
        assert info.value.body["param"] == param
    counts = metrics(server)
    assert counts[f'qwen_int4_requests_total{{{M},endpoint="/v1/chat/completions",status="400"}}'] >= 2
    assert counts[f'qwen_int4_requests_total{{{M},endpoint="/v1/completions",status="400"}}'] >= 3


def test_burst_larger_than_the_kv_cache_queues_and_completes(model, tokenizer):
    # 24 blocks of 16 tokens; 10 requests of 24 + 40 tokens need 40 blocks at once
    questions = [f"Question number {i}?" for i in range(10)]
    prompts = [chat_ids(tokenizer, q) for q in questions]
    params = SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=model.generation_config.repetition_penalty,
                            stop_token_ids=[IM_END_ID, IM_START_ID])
    unconstrained = LLMEngine(model, tokenizer, EngineConfig(num_blocks=1000)).generate(prompts, params)
    expected = [o.outputs[0].text for o in unconstrained]  # the engine equals generate(): test_engine.py
    app = create_app(lambda: (model, tokenizer), [NAME], EngineConfig(kv_cache_gb=24 * 16384 / 2**30))
    results = [None] * len(questions)
    with running_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)

        def worker(i):
            r = ask(client, questions[i], max_tokens=40, temperature=0)
            results[i] = r.choices[0].message.content

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = metrics(base)
    assert results == expected
    assert stats[f"qwen_int4_kv_cache_blocks_total{{{M}}}"] == 24
    assert stats[f"qwen_int4_kv_cache_blocks_used{{{M}}}"] == 0
    assert stats[f"qwen_int4_num_preemptions_total{{{M}}}"] > 0  # it did run out of blocks
    assert stats[f'qwen_int4_requests_total{{{M},endpoint="/v1/chat/completions",status="200"}}'] == 10


def test_health_is_503_while_the_model_loads(model, tokenizer):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return model, tokenizer

    app = create_app(slow_load, [NAME], EngineConfig(num_blocks=64))
    with running_server(app, wait_for_model=False) as base:
        assert httpx.get(f"{base}/health").status_code == 503
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        loaded.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_serve_cli(tiny_int4_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen_int4.cli.main", "serve", "--model", str(tiny_int4_dir),
                             "--port", str(port), "--kv-cache-gb", "0.01", "--dtype", "float32",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "qwen-int4 serve did not become healthy"
            time.sleep(0.1)
        name = tiny_int4_dir.name  # the default served model name: the directory's
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == name
        r = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_sse_framing(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[0][len("data: "):])["object"] == "chat.completion.chunk"

"""Chained decode steps (EngineConfig.async_decode): the next decode step is launched on the
device-side draws of the step in flight, before the host has them. On the CPU nothing runs
ahead, but the bookkeeping is the same, so every run here must give exactly what the plain
pipelined engine gives: tokens, texts, finish reasons, logprobs, seeds, stop tokens and
strings, max_tokens and context limits, aborts, preemption and freed blocks."""
import asyncio

import pytest
from _models import random_prompts

from qwen_int4.engine import EngineConfig, LLMEngine, SamplingParams
from qwen_int4.engine.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def model(tiny_int4_model):
    return tiny_int4_model


@pytest.fixture(scope="module")
def prompts():
    return random_prompts((3, 17, 33, 40, 5, 9), seed=3)


def make_engine(model, tokenizer, chained: bool, **config) -> tuple[LLMEngine, list[int]]:
    """An engine and a list that gets the size of every chained step it launches."""
    engine = LLMEngine(model, tokenizer, EngineConfig(async_decode=chained, **config))
    execute, launched = engine.runner.execute, []

    def spy(scheduled, pending=None):
        if pending is not None:
            launched.append(len(scheduled))
        return execute(scheduled, pending)

    engine.runner.execute = spy
    return engine, launched


def summary(outputs) -> list:
    return [(o.request_id, c.index, c.token_ids, c.text, c.finish_reason,
             [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in c.delta_logprobs])
            for o in outputs for c in o.outputs]


def run_both(model, tokenizer, prompts, params, **config) -> list[int]:
    """Run the prompts with and without chaining; the outputs must be equal. The chained steps' sizes."""
    results, launched = {}, []
    for chained in (False, True):
        engine, launched = make_engine(model, tokenizer, chained, **config)
        results[chained] = summary(engine.generate(prompts, params))
        assert engine.pool.num_used == 0 and not engine.has_unfinished()
    assert results[True] == results[False]
    return launched


def test_chained_steps_equal_plain_steps_for_every_option(model, tokenizer, prompts):
    stop_text = tokenizer.decode(LLMEngine(model, tokenizer, EngineConfig(num_blocks=200, block_size=4)).generate(
        [prompts[4]], SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0].token_ids)[5:8]
    params = [
        SamplingParams(max_tokens=16, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=11, n=2),
        SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=list(range(0, 151000, 7))),  # ends early
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=3, repetition_penalty=1.3),
        SamplingParams(max_tokens=12, temperature=0.0, stop=[stop_text]),
        SamplingParams(max_tokens=14, temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5, seed=5),
    ]
    launched = run_both(model, tokenizer, prompts, params, num_blocks=200, block_size=4)
    assert launched and max(launched) == 7  # the whole batch ran chained, then fewer as requests ended


def test_chained_steps_with_chunked_prefill_and_preemption(model, tokenizer, prompts):
    # 16 blocks of 4 for six sequences of up to 56 tokens: chaining must step aside for the scheduler
    run_both(model, tokenizer, prompts, SamplingParams(max_tokens=16, temperature=0.0),
             num_blocks=16, block_size=4, max_num_batched_tokens=7)


def test_chained_steps_stop_at_the_context_limit(model, tokenizer, prompts):
    # 10 blocks of 4: max_model_len 40; the 33-token prompt may run 7 tokens, the request asks for 7
    launched = run_both(model, tokenizer, [prompts[2]], SamplingParams(max_tokens=7, temperature=0.0),
                        num_blocks=10, block_size=4)
    assert launched  # and it ended by length, as the plain run did


def test_single_request_runs_chained_and_ends_on_max_tokens(model, tokenizer, prompts):
    engine, launched = make_engine(model, tokenizer, True, num_blocks=100, block_size=4)
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=0.0))[0]
    # the prefill samples token 1; the steps of tokens 2..10 are each launched chained while the
    # token before is collected; token 10 ends by length, known in advance: nothing runs past it
    assert launched == [1] * 9 and len(out.outputs[0].token_ids) == 10
    assert engine._inflight is None and out.outputs[0].finish_reason == "length"


def test_abort_drops_the_chained_row_and_frees_the_blocks(model, tokenizer, prompts):
    ends = {}
    for chained in (False, True):
        engine, launched = make_engine(model, tokenizer, chained, num_blocks=100, block_size=4)
        engine.add_request("a", prompts[3], SamplingParams(max_tokens=30, temperature=0.0))
        engine.add_request("b", prompts[1], SamplingParams(max_tokens=30, temperature=0.0))
        for _ in range(5):
            engine.step()
        engine.abort_request("a")
        final = None
        while engine.has_unfinished():
            final = next((o for o in engine.step() if o.finished), final)
        assert engine.pool.num_used == 0 and final.request_id == "b"
        ends[chained] = final.outputs[0].token_ids
        assert bool(launched) == chained
    assert ends[True] == ends[False]


def test_async_engine_streams_the_same_tokens_when_chained(model, tokenizer, prompts):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in LLMEngine(
        model, tokenizer, EngineConfig(num_blocks=100, async_decode=False)).generate(prompts[:3], params)]
    engine, launched = make_engine(model, tokenizer, True, num_blocks=100)
    server = AsyncEngine(engine)

    async def one(i: int) -> list[int]:
        tokens = []
        async for out in server.generate(f"r{i}", prompts[i], params):
            tokens += out.outputs[0].delta_token_ids
        return tokens

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i) for i in range(3))))

    try:
        assert asyncio.run(main()) == expected
    finally:
        server.shutdown()
    assert launched


def test_blocks_filled_by_chained_steps_are_hashed_by_their_tokens(model, tokenizer, prompts):
    # a chained step is committed after its tokens are appended: the prefix cache must then serve a
    # prompt that extends the first reply, through blocks filled by generated tokens
    engine, launched = make_engine(model, tokenizer, True, num_blocks=100, block_size=4)
    first = engine.generate([prompts[1]], SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0].token_ids
    assert launched
    scheduled = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (out := schedule()) and scheduled.append(out.num_tokens) or out
    prompt = prompts[1] + first[:10]  # 27 tokens: 6 full blocks, the last two holding generated tokens
    second = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0].token_ids
    assert scheduled[0] == 3 and second == first[10:]

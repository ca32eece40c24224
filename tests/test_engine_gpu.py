"""The engine's GPU path (paged attention kernels, FlashAttention varlen prefill, CUDA-graph decode
buckets) against the model's own forward with the dynamic KVCache, teacher-forced on the
engine's tokens: every sampled row's logits must agree at fp16 level.

Covers ragged prompts, chunked prefill continuing a cached prefix, prefix-cache hits, padded
graph buckets, and (eager path) sequences with NTK alpha > 1 and LogN beside alpha-1 ones.
The fused decode step (engine/paged_decode.py) is also checked against the runner's model
forward on the CPU under TRITON_INTERPRET=1 (a fresh process).
"""
import pytest
import torch
from _triton import run_under_triton_interpreter
from test_decode_step import tiny_int4_model

from qwen_int4.engine import EngineConfig, LLMEngine, SamplingParams
from qwen_int4.engine.request import Request, Sequence
from qwen_int4.model.cache import KVCache


@torch.inference_mode()
def check_paged_decode_step(device: str, kv_cache_dtype: str = "auto") -> None:
    """PagedDecodeStep (fused kernels, a padded batch) == the runner's model forward for one token each,
    over a model-dtype or an int8 pool (its kernels then quantize keys and dequantize the context)."""
    from qwen_int4.engine.paged_decode import PagedDecodeStep
    from qwen_int4.engine.runner import ModelRunner

    model = tiny_int4_model(device, layers=2)  # fp16, seq_length 16: positions past 16 get LogN
    runner = ModelRunner(model, num_blocks=24, block_size=4, max_num_seqs=4, cuda_graphs=False,
                         kv_cache_dtype=kv_cache_dtype)
    g = torch.Generator().manual_seed(5)
    seqs, free = [], torch.randperm(24, generator=g).tolist()
    for i, n in enumerate((5, 9, 18)):
        seq = Sequence(i, Request(f"r{i}", torch.randint(0, 256, (n,), generator=g).tolist(), SamplingParams()), 0,
                       text=None)
        seq.block_table, free = free[:6], free[6:]  # room for n + 1 positions, scattered blocks
        runner.execute({seq: n})  # prefill through the model's forward
        seq.num_computed = n
        seq.output_ids.append(int(torch.randint(0, 256, (1,), generator=g)))
        seqs.append(seq)
    eager, _ = runner.execute({seq: 1 for seq in seqs})  # [3, V]
    step = PagedDecodeStep(model, runner.kv, max_batch=4, max_len=32)
    bs = runner.block_size
    positions = [seq.num_computed for seq in seqs]
    slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions)]
    for keys, values, meta in (runner.kv.layer(i) for i in range(2)):  # forget the eager step's writes
        for t in (keys, values):
            t.view(-1, *t.shape[2:])[slots] = 0
        for t in meta or ():  # int8 scales and zeros [blocks, H, block_size]
            t[[s // bs for s in slots], :, [s % bs for s in slots]] = 0
    step.write_inputs(4, [seq.output_ids[-1] for seq in seqs], positions, slots, [seq.block_table for seq in seqs])
    fused = step(4)[:3].float()  # row 3 is padding
    for keys, _, _ in (runner.kv.layer(i) for i in range(2)):  # the fused step wrote its keys
        assert keys.view(-1, *keys.shape[2:])[slots].any()
    rel = float((fused - eager).norm() / eager.norm())
    print(f"fused decode step ({kv_cache_dtype} pool) vs the model forward: rel err {rel:.2e}")
    assert rel < 1e-2, rel


def test_paged_decode_step_in_triton_interpreter():
    run_under_triton_interpreter(__file__, timeout=900)


@pytest.mark.gpu
def test_paged_decode_step_on_gpu():
    check_paged_decode_step("cuda")


def reference_logits(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V] float32: the prompt's prefill, then the outputs fed back one by one."""
    cache, dev = KVCache(model.config.num_hidden_layers), model.device
    with torch.inference_mode():
        rows = [model(torch.tensor([prompt], device=dev), past_key_values=cache).logits[0, -1]]
        for token in output[:-1]:
            rows.append(model(torch.tensor([[token]], device=dev), past_key_values=cache).logits[0, -1])
    return torch.stack(rows).float()


def run_recorded(model, tokenizer, prompts, graphs: bool, **config):
    engine = LLMEngine(model, tokenizer, EngineConfig(cuda_graphs=graphs, **config))
    recorded: dict[str, list[torch.Tensor]] = {}  # request id -> its sampled rows
    graph_steps = []
    execute = engine.runner.execute

    def spy(scheduled, pending=None):
        logits, seqs = execute(scheduled, pending)
        for row, seq in zip(logits, seqs):
            recorded.setdefault(seq.request.request_id, []).append(row.clone())
        return logits, seqs

    engine.runner.execute = spy
    if engine.runner.graphs is not None:
        run = engine.runner.graphs.run
        engine.runner.graphs.run = lambda *a: graph_steps.append(len(a[0])) or run(*a)
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))
    assert engine.pool.num_used == 0
    return engine, outs, recorded, graph_steps


def check_against_reference(model, prompts, outs, recorded) -> None:
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        got = torch.stack(recorded[out.request_id][: len(tokens)])  # [10, V] (a chained step past a stop: dropped)
        ref = reference_logits(model, prompt, tokens)
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 2e-2, (len(prompt), rel)
        assert torch.equal(got.argmax(-1).cpu(), torch.tensor(tokens))


@pytest.fixture(scope="module")
def model():
    return tiny_int4_model("cuda", layers=2)  # fp16, seq_length 16


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.gpu
@pytest.mark.parametrize("chained", [False, True])
def test_graph_decode_and_flash_prefill_equal_the_model(model, tokenizer, chained):
    prompts = _prompts((3, 11, 16, 7, 1, 9))
    prompts.append(list(prompts[2]))  # a prefix-cache hit: its first chunk continues cached blocks
    engine, outs, recorded, graph_steps = run_recorded(model, tokenizer, prompts, True, num_blocks=64, block_size=4,
                                                       max_num_batched_tokens=13, max_num_seqs=8,
                                                       async_decode=chained)
    assert graph_steps and any(n not in engine.runner.graphs.buckets for n in graph_steps)  # padded buckets ran
    check_against_reference(model, prompts, outs, recorded)


@pytest.mark.gpu
def test_eager_gpu_path_with_ntk_and_logn_equals_the_model(model, tokenizer):
    prompts = _prompts((3, 17, 40, 5, 33), seed=1)  # seq_length 16: alphas 1, 3, 7; LogN past 16
    _, outs, recorded, _ = run_recorded(model, tokenizer, prompts, False, num_blocks=64, block_size=4,
                                        max_num_batched_tokens=24)  # chained steps through the model's forward
    check_against_reference(model, prompts, outs, recorded)


@pytest.mark.gpu
def test_chained_steps_never_wait_for_the_device(model, tokenizer):
    # the chained launch (sample on the device, stage and replay the next step) must not sync: under
    # sync debug mode "error" any blocking copy, .item() or stream sync there raises
    params = [SamplingParams(max_tokens=12, temperature=0.0),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=20, seed=3, n=2),
              SamplingParams(max_tokens=12, temperature=0.7, logprobs=2, repetition_penalty=1.2,
                             presence_penalty=0.3, frequency_penalty=0.2, seed=5)]  # seeded: runs comparable
    prompts = _prompts((5, 9, 3), seed=2)
    results = {}
    for chained in (False, True):
        engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8,
                                                          async_decode=chained))
        collect, strict_steps = engine._collect, []

        def strict(ahead=None, collect=collect, strict_steps=strict_steps):
            if ahead is None:
                return collect(ahead)
            strict_steps.append(len(ahead.scheduled))
            torch.cuda.set_sync_debug_mode("error")
            try:
                return collect(ahead)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        engine._collect = strict
        outs = engine.generate(prompts, params)
        assert engine.pool.num_used == 0 and bool(strict_steps) == chained
        results[chained] = [(c.token_ids, c.finish_reason) for o in outs for c in o.outputs]
    assert results[True] == results[False]


if __name__ == "__main__":  # the interpreter run of test_paged_decode_step_in_triton_interpreter
    torch.set_num_threads(1)
    check_paged_decode_step("cpu")
    print("ok")

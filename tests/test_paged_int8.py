"""The serving engine's int8 KV pool (EngineConfig.kv_cache_dtype="int8", `serve --kv-cache-dtype`).

Pool sizing; the engine on the tiny Int4 model against the model-dtype pool (decode logits close,
first prefill chunks exact, greedy tokens, prefix caching and preemption); the CLI flag; the fused
decode step (engine/paged_decode.py) over int8 pools against the runner's model forward, on the CPU
under TRITON_INTERPRET=1 (a fresh process) and, marked gpu, on CUDA with the engine's graphs.
"""
import pytest
import torch
from _models import random_prompts
from _triton import run_under_triton_interpreter
from test_decode_step import tiny_int4_model as fp16_gptq_model
from test_engine_gpu import check_paged_decode_step

from qwen_int4.cli.main import build_parser
from qwen_int4.engine import EngineConfig, LLMEngine, SamplingParams
from qwen_int4.engine.paged_cache import KVPool
from qwen_int4.engine.request import Request, Sequence
from qwen_int4.engine.runner import ModelRunner, num_kv_blocks

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_int4_model):  # the conftest's: the tiny Int4 checkpoint, float32 on the CPU
    return tiny_int4_model


@pytest.fixture(scope="module")
def prompts():
    return random_prompts((3, 17, 33, 40, 5, 9), seed=0)


@pytest.fixture(scope="module")
def expected(model, tokenizer, prompts):
    """Greedy tokens of the model-dtype pool."""
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=200, block_size=4))
    return [o.outputs[0].token_ids for o in engine.generate(prompts, GREEDY)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- sizing and options -------------------------------------------------------------------


def test_int8_block_holds_keys_values_scales_and_zeros():
    # Qwen-7B (32 layers, 32 heads x 128, fp16): 128 + 8 bytes per token, head and K or V instead of 256
    fp16 = KVPool.bytes_per_block(32, 16, 32, 128, torch.float16)
    int8 = KVPool.bytes_per_block(32, 16, 32, 128, torch.float16, "int8")
    assert fp16 == 2 * 32 * 16 * 32 * 128 * 2 and int8 == 2 * 32 * 16 * 32 * (128 + 8)
    assert 1.85 < fp16 / int8 < 1.9
    pool = KVPool(2, 5, 4, 3, 16, torch.float16, torch.device("cpu"), "int8")  # 5 blocks + the spare one
    tensors = [*pool.k, *pool.v, *(t for meta in pool.meta for t in meta)]
    assert sum(t.nbytes for t in tensors) == 6 * KVPool.bytes_per_block(2, 4, 3, 16, torch.float16, "int8")
    assert {t.dtype for t in [*pool.k, *pool.v]} == {torch.uint8}
    assert all(t.shape == (6, 3, 4) and t.dtype == torch.float32 for t in pool.layer(1)[2])  # [blocks, H, BS]


def test_kv_cache_gb_holds_more_int8_blocks(model, tokenizer):
    cfg, gb = model.config, 0.01
    auto = num_kv_blocks(model, 16, kv_cache_gb=gb)
    int8 = num_kv_blocks(model, 16, kv_cache_gb=gb, kv_cache_dtype="int8")
    per_token_head = {"auto": cfg.head_dim * 4, "int8": cfg.head_dim + 8}  # float32 model: 4 bytes a value
    for blocks, dtype in ((auto, "auto"), (int8, "int8")):
        assert blocks == int(gb * 2**30) // (2 * cfg.num_hidden_layers * 16 * cfg.num_attention_heads
                                             * per_token_head[dtype])
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_gb=gb, kv_cache_dtype="int8"))
    assert engine.pool.num_blocks == int8 > 2 * auto and engine.runner.kv.k[0].dtype == torch.uint8


@pytest.mark.parametrize("bad", ["fp8", "float16", "INT8", ""])
def test_bad_kv_cache_dtype_is_rejected(model, tokenizer, bad):
    with pytest.raises(ValueError, match=f"kv_cache_dtype must be one of auto, int8 .*got '{bad}'"):
        LLMEngine(model, tokenizer, EngineConfig(num_blocks=8, kv_cache_dtype=bad))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
        num_kv_blocks(model, 16, kv_cache_gb=0.01, kv_cache_dtype=bad)


def test_serve_flag_reaches_the_engine_config(monkeypatch, capsys, tiny_int4_dir):
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from qwen_int4 import server

    seen = {}
    monkeypatch.setattr(server, "create_app", lambda load, names, config: seen.setdefault("config", config))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    parser = build_parser()
    for argv, want in (([], "auto"), (["--kv-cache-dtype", "int8"], "int8")):
        args = parser.parse_args(["serve", "--model", str(tiny_int4_dir), *argv])
        assert args.run(args) == 0 and seen.pop("config").kv_cache_dtype == want
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", str(tiny_int4_dir), "--kv-cache-dtype", "fp8"])
    err = capsys.readouterr().err
    assert "--kv-cache-dtype: invalid choice: 'fp8'" in err and "'auto', 'int8'" in err


# ---- the engine with an int8 pool ---------------------------------------------------------


def prefill_then_decode(model, kv_cache_dtype: str, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Through the runner's model forward: logits [1, V] of prompts[0] prefilled in one chunk, [B - 1, V]
    of the other prompts' second chunks (their last 5 tokens, continuing the cached rest), and [B, V]
    of one decode step of all."""
    runner = ModelRunner(model, num_blocks=60, block_size=4, cuda_graphs=False, kv_cache_dtype=kv_cache_dtype)
    seqs = []
    for i, prompt in enumerate(prompts):
        seq = Sequence(i, Request(f"r{i}", prompt, SamplingParams()), 0, text=None)
        seq.block_table = list(range(60 - 12 * (i + 1), 60 - 12 * i))[::-1]  # scattered, descending blocks
        seqs.append(seq)
    for seq in seqs[1:]:
        runner.execute({seq: len(seq.prompt_ids) - 5})  # a first chunk that does not sample
        seq.num_computed = len(seq.prompt_ids) - 5
    last = [runner.execute({seq: len(seq.prompt_ids) - seq.num_computed})[0] for seq in seqs]  # [1, V] each
    for seq, logits in zip(seqs, last):
        seq.num_computed = len(seq.prompt_ids)
        seq.output_ids.append(int(logits.argmax()))
    decode, _ = runner.execute({seq: 1 for seq in seqs})
    return last[0], torch.cat(last[1:]), decode


def test_int8_logits_are_close_to_the_model_dtype_pool(model, prompts):
    (whole16, second16, decode16), (whole8, second8, decode8) = (
        prefill_then_decode(model, dtype, prompts[1:4]) for dtype in ("auto", "int8"))
    assert torch.equal(whole8, whole16)  # a first chunk attends over its own unquantized keys
    rel_prefix, rel_decode = _rel(second8, second16), _rel(decode8, decode16)
    print(f"int8 KV pool vs the model-dtype pool: logits rel err {rel_prefix:.2e} (chunk over a cached prefix), "
          f"{rel_decode:.2e} (decode step)")
    assert 0 < rel_prefix < 5e-3 and 0 < rel_decode < 5e-3  # > 0: the reads went through the int8 pool
    assert torch.equal(decode8.argmax(-1), decode16.argmax(-1))


def test_int8_greedy_generation_matches_the_model_dtype_pool(model, tokenizer, prompts, expected):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=200, block_size=4, kv_cache_dtype="int8"))
    outs = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected  # this model's logit gaps exceed the int8 error
    assert engine.pool.num_used == 0 and engine.runner.kv.meta[0][0].any()


def test_int8_chunked_prefill_and_preemption(model, tokenizer, prompts, expected):
    # 16 blocks of 4 = 64 slots for six sequences of up to 56 tokens; steps of at most 7 tokens
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=16, block_size=4, max_num_batched_tokens=7,
                                                      kv_cache_dtype="int8"))
    outs = engine.generate(prompts, GREEDY)
    assert engine.num_preemptions > 0 and engine.pool.num_used == 0
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_int8_prefix_cache_hit_gives_the_same_tokens(model, tokenizer, prompts):
    shared = prompts[3][:24] + prompts[1]  # 6 full blocks of 4 in common with prompts[3]
    without = LLMEngine(model, tokenizer, EngineConfig(num_blocks=200, block_size=4, kv_cache_dtype="int8",
                                                       enable_prefix_caching=False)).generate([shared], GREEDY)
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=200, block_size=4, kv_cache_dtype="int8"))
    engine.generate([prompts[3]], GREEDY)
    scheduled = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: scheduled.append(schedule()) or scheduled[-1]
    (hit,) = engine.generate([shared], GREEDY)
    assert sum(scheduled[0].scheduled.values()) == len(shared) - 24  # the shared blocks came from the cache
    assert hit.outputs[0].token_ids == without[0].outputs[0].token_ids


# ---- the fused decode step (CUDA graphs' step) over int8 pools ------------------------------


def test_fused_int8_decode_step_in_triton_interpreter():
    run_under_triton_interpreter(__file__, timeout=900)


@pytest.mark.gpu
def test_fused_int8_decode_step_on_gpu():
    check_paged_decode_step("cuda", "int8")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_int8_engine_on_gpu_close_to_the_fp16_pool(tokenizer, graphs):
    """Graph decode (or the eager paged kernel) and FlashAttention prefill over dequantized prefixes,
    int8 pool, against the fp16 pool's engine: greedy tokens and every sampled row's logits."""
    model = fp16_gptq_model("cuda", layers=2)  # fp16
    prompts = random_prompts((3, 11, 16, 7, 1, 9), seed=0, vocab=256)
    prompts.append(list(prompts[2]))  # a prefix-cache hit: its first chunk continues cached blocks
    rows = {}
    for dtype in ("auto", "int8"):
        engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=13,
                                                          max_num_seqs=8, cuda_graphs=graphs, kv_cache_dtype=dtype))
        assert (engine.runner.graphs is not None) == graphs
        recorded: dict[str, list[torch.Tensor]] = {}
        execute = engine.runner.execute

        def spy(scheduled, pending=None, execute=execute, recorded=recorded):
            logits, seqs = execute(scheduled, pending)
            for row, seq in zip(logits, seqs):
                recorded.setdefault(seq.request.request_id, []).append(row.clone())
            return logits, seqs

        engine.runner.execute = spy
        outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))
        assert engine.pool.num_used == 0
        rows[dtype] = [(o.outputs[0].token_ids, torch.stack(recorded[o.request_id][:10])) for o in outs]
    same = 0
    for (tokens16, logits16), (tokens8, logits8) in zip(rows["auto"], rows["int8"]):
        # rows up to the first differing token have the same history (this tiny model's closest top-2
        # logits are ~3x the int8 error apart on the CPU: a near tie may flip on the GPU)
        k = next((i for i, (a, b) in enumerate(zip(tokens16, tokens8)) if a != b), len(tokens16) - 1)
        rel = _rel(logits8[: k + 1], logits16[: k + 1])
        print(f"int8 vs fp16 pool on the GPU (graphs={graphs}): logits rel err {rel:.2e} over {k + 1} rows, "
              f"tokens {'equal' if tokens8 == tokens16 else 'differ'}")
        assert 0 < rel < 2e-2
        same += tokens8 == tokens16
    assert same >= len(prompts) - 1


if __name__ == "__main__":  # the interpreter run of test_fused_int8_decode_step_in_triton_interpreter
    torch.set_num_threads(1)
    check_paged_decode_step("cpu", "int8")
    print("ok")

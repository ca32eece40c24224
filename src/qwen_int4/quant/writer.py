"""Write a GPTQ checkpoint in the official Qwen-7B-Chat-Int4 layout (spec sections 1d, 3 and 10).

The output directory holds: config.json (the source's, with fp16 true, torch_dtype float16
and quantization_config), quantize_config.json, the safetensors weights (one
model.safetensors, or ~max_shard_bytes shards plus model.safetensors.index.json) and, copied
from the source, generation_config.json, the tokenizer files and any *.py/*.cu/*.cpp.
Tensor names, shapes and dtypes are those of a QWenLMHeadModel after
replace_linear_with_gptq, checked before anything is written. The directory is written
beside OUT_DIR under a temporary name and renamed at the end, so an interrupted run never
leaves an OUT_DIR that looks complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen_int4.checkpoint_io import (
    TensorUnit,
    gptq_quantize_config,
    staging_dir,
    write_json,
    write_weights,
)
from qwen_int4.config import QuantConfig, QwenConfig
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.quant.gptq import replace_linear_with_gptq

# Copied as they are from the source (run_gptq.py's README step, spec 10).
COPIED_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "*.tiktoken", "*.py", "*.cu", "*.cpp")


def quantize_config_json(quant: QuantConfig) -> dict[str, Any]:
    """quantize_config.json as AutoGPTQ writes it (spec 3), for `quant`."""
    return gptq_quantize_config(quant.bits, quant.group_size, quant.desc_act, quant.damp_percent)


def quantized_config_json(source: dict[str, Any], quant: QuantConfig) -> dict[str, Any]:
    """The source's config.json as the Int4 release has it: fp16, torch_dtype float16, quantization_config."""
    cfg = {k: v for k, v in source.items() if k != "quantization_config"}
    cfg.update(bf16=False, fp16=True, fp32=False, torch_dtype="float16")
    cfg["quantization_config"] = {**quantize_config_json(quant), "quant_method": "gptq"}
    return cfg


def expected_tensors(config: QwenConfig, quant: QuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the quantized checkpoint, name -> (shape, dtype), in state-dict order.

    Raises ValueError naming the first layer the settings cannot quantize (e.g. a group size
    that does not divide its in_features). Floats are fp16, GPTQ integers int32.
    """
    with torch.device("meta"):
        model: nn.Module = QWenLMHeadModel(config)
    replace_linear_with_gptq(model, quant)
    return {
        name: (tuple(t.shape), torch.float16 if t.is_floating_point() else t.dtype)
        for name, t in model.state_dict().items()
    }


def to_fp16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor as fp16 (the Int4 release's dtype); ValueError if it does not fit."""
    half = tensor.detach().to(device="cpu", dtype=torch.float16)
    if not torch.isfinite(half).all() and torch.isfinite(tensor).all():
        raise ValueError(f"{name} has values beyond fp16's range (|x| > 65504): it cannot be stored in an fp16 checkpoint")
    return half


def write_gptq_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    quant: QuantConfig,
    max_shard_bytes: int | None = 2_000_000_000,
) -> Path:
    """Write `tensors` (every tensor of the quantized model, CPU) and the json/tokenizer files to out_dir.

    `src_dir` is the unquantized source checkpoint whose config.json, generation and tokenizer
    files are carried over. Float tensors are cast to fp16. Returns out_dir.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    source_cfg = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    expected = expected_tensors(QwenConfig.from_dict(source_cfg), quant)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"quantized tensors do not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    units = []
    for name, (shape, dtype) in expected.items():
        t = to_fp16(name, tensors[name]) if dtype == torch.float16 else tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name}: expected {list(shape)} {dtype}, got {list(t.shape)} {t.dtype}")
        units.append(TensorUnit({name: (shape, dtype)}, lambda gen, name=name, t=t: {name: t}))

    with staging_dir(out_dir) as tmp:
        write_json(tmp / "config.json", quantized_config_json(source_cfg, quant))
        write_json(tmp / "quantize_config.json", quantize_config_json(quant))
        for pattern in COPIED_FILES:
            for f in sorted(src_dir.glob(pattern)):
                shutil.copyfile(f, tmp / f.name)
        write_weights(tmp, units, seed=0, max_shard_bytes=max_shard_bytes)
    return out_dir

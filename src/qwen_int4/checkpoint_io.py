"""Writing checkpoints in the Hugging Face layout: shards, index, json files, atomic output.

Shared by the random-weight test checkpoints (testing/checkpoint.py) and the GPTQ
quantizer's output (quant/writer.py). Tensors are produced one shard at a time from
`TensorUnit`s, so writing a 7B model needs about one shard of RAM. Output is written to a
temporary directory beside the target and renamed at the end (`staging_dir`), so an
interrupted run never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@dataclass
class TensorUnit:
    """Tensors produced together (a GPTQ linear's five tensors come from one quantization)."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), in write order
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.shapes.values())


def gptq_quantize_config(bits: int, group_size: int, desc_act: bool, damp_percent: float = 0.01) -> dict[str, Any]:
    """quantize_config.json as AutoGPTQ / run_gptq.py write it (spec section 3)."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def shard_plan(units: list[TensorUnit], max_shard_bytes: int | None) -> list[list[int]]:
    """Greedy split of unit indices into shards of at most max_shard_bytes (a bigger unit goes alone)."""
    if max_shard_bytes is None:
        return [list(range(len(units)))]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards, current, size = [], [], 0
    for i, unit in enumerate(units):
        if current and size + unit.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += unit.nbytes
    shards.append(current)
    return shards


def write_weights(out: Path, units: list[TensorUnit], seed: int, max_shard_bytes: int | None) -> None:
    """model.safetensors, or model-0000X-of-0000N.safetensors shards plus model.safetensors.index.json."""
    shards = shard_plan(units, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for s, indices in enumerate(shards):
        file_name = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for i in indices:
            # one generator per unit, seeded from (seed, unit index): identical tensors however sharded
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{i}".encode()))
            made = units[i].make(gen)
            for name, (shape, dtype) in units[i].shapes.items():
                if tuple(made[name].shape) != shape or made[name].dtype != dtype:
                    raise ValueError(f"{name}: made {list(made[name].shape)} {made[name].dtype}, planned {list(shape)} {dtype}")
            tensors.update(made)
            weight_map.update(dict.fromkeys(made, file_name))
        save_file(tensors, out / file_name, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(u.nbytes for u in units)}, "weight_map": weight_map}
        write_json(out / "model.safetensors.index.json", index)


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; remove it or pick another path")


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir`, renamed to it on success, removed on any failure."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # mkdtemp and safetensors create owner-only files
            f.chmod(0o644)
        tmp.chmod(0o755)
        check_output_dir(out_dir)  # nothing appeared there meanwhile
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards), loaded into memory."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out

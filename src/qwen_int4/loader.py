"""Checkpoint directory (or Hugging Face repo id) -> QWenLMHeadModel, without a second copy in RAM.

The model is built on the meta device, GPTQ layers are swapped in by module surgery when the
checkpoint is quantized, every tensor of the safetensors files is checked against the model
(names, shapes, kinds) before anything is read, and then the tensors are read one at a
time (memory-mapped), cast, moved and assigned with load_state_dict(assign=True).
"""
from __future__ import annotations

import json
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from qwen_int4.config import GenerationConfig, QuantConfig, QwenConfig
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.quant.gptq import GPTQLinear, prepare_quantized_layers, replace_linear_with_gptq

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_WHAT_TO_PASS = (
    "pass a local directory holding config.json and *.safetensors "
    "(e.g. one written by `qwen-int4 make-test-model DIR`), or a Hugging Face repo id with network access"
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_model_dir(path_or_repo: str | Path) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded with snapshot_download."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file, not a checkpoint directory: {_WHAT_TO_PASS}")
    text = str(path_or_repo)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        raise FileNotFoundError(f"no such directory: {text!r}; {_WHAT_TO_PASS}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=text, allow_patterns=["*.json", "*.safetensors", "*.tiktoken"])
    except Exception as exc:  # offline, unknown repo, no permission ...
        raise FileNotFoundError(
            f"{text!r} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {_WHAT_TO_PASS}"
        ) from exc
    return Path(local)


# ---------------------------------------------------------------- device and dtype


def resolve_device(device_map: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'auto' (cuda when available) or a torch.device."""
    if isinstance(device_map, str) and device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map must be 'cpu', 'cuda', 'auto' or a torch.device, got {device_map!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def resolve_dtype(
    torch_dtype: str | torch.dtype, config: QwenConfig, device: torch.device, checkpoint_dtype: torch.dtype | None
) -> torch.dtype:
    """The model dtype. Explicit values are honoured; 'auto' follows the reference, except on CPU.

    'auto': the config's bf16/fp16/fp32 flag when one is set (the Int4 release sets fp16).
    With no flag (the BF16 release): on CUDA bf16 if supported, else fp16 on compute
    capability >= 7, else fp32, as the reference; on CPU the checkpoint's own float dtype
    (bf16 for the BF16 release), where the reference would pick fp32: 7B in fp32 is 31 GB.
    fp16 on CPU is kept too: on this AVX2 (F16C, no AVX512-BF16) CPU fp16 GEMM measured as
    fast as or faster than bf16, and fp32 would double wte/lm_head (+2.5 GB for 7B).
    """
    if isinstance(torch_dtype, torch.dtype):
        if torch_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"torch_dtype must be bfloat16, float16 or float32, got {torch_dtype}")
        return torch_dtype
    if torch_dtype != "auto":
        if torch_dtype not in _DTYPE_NAMES:
            raise ValueError(f"torch_dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {torch_dtype!r}")
        return _DTYPE_NAMES[torch_dtype]
    flags = [dt for flag, dt in ((config.bf16, torch.bfloat16), (config.fp16, torch.float16), (config.fp32, torch.float32)) if flag]
    if len(flags) > 1:
        raise ValueError("config.json sets more than one of bf16, fp16, fp32 to true; set at most one")
    if flags:
        return flags[0]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if torch.cuda.get_device_capability(device)[0] >= 7 else torch.float32
    if checkpoint_dtype in (torch.bfloat16, torch.float16, torch.float32):
        return checkpoint_dtype
    return torch.bfloat16


# ---------------------------------------------------------------- checkpoint files


@dataclass
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files: the index's shards, model.safetensors, or one other *.safetensors
    (the original Int4 release's gptq_model-4bit-128g.safetensors)."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {exc}") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index.name} lists shard(s) that are not in {model_dir}: {missing}")
        return files
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE]
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise ValueError(
            f"{model_dir} holds several .safetensors files {[f.name for f in found]} but no {INDEX_FILE} to say which to use"
        )
    hint = " (it has PyTorch .bin weights; convert them to safetensors)" if list(model_dir.glob("*.bin")) else ""
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}; {_WHAT_TO_PASS}")


def _open(file: Path, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
    except Exception as exc:
        raise ValueError(
            f"{file} is not a readable safetensors file ({exc}); it may be truncated or corrupt: download it again"
        ) from exc


def read_headers(files: list[Path], stack: ExitStack) -> tuple[dict[str, StoredTensor], dict[Path, Any]]:
    """Name -> StoredTensor from the files' headers (no tensor data is read), and the open handles."""
    stored: dict[str, StoredTensor] = {}
    handles = {}
    for file in files:
        handle = handles[file] = _open(file, stack)
        for name in handle.keys():
            if name in stored:
                raise ValueError(f"tensor {name} is stored twice: in {stored[name].file.name} and {file.name}")
            meta = handle.get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(meta.get_dtype())
            if dtype is None:
                raise ValueError(f"{file.name}: tensor {name} has unsupported dtype {meta.get_dtype()}")
            stored[name] = StoredTensor(file, tuple(meta.get_shape()), dtype)
    return stored, handles


def check_tensors(expected: dict[str, torch.Tensor], stored: dict[str, StoredTensor], model_dir: Path) -> None:
    """Raise ValueError listing every missing, unexpected, misshaped or wrong-kind tensor."""
    problems = []
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_short(unexpected)}")
    for name in sorted(set(expected) & set(stored)):
        want, got = expected[name], stored[name]
        if tuple(want.shape) != got.shape:
            problems.append(f"{name}: expected shape {list(want.shape)}, found {list(got.shape)} in {got.file.name}")
        elif want.dtype.is_floating_point != got.dtype.is_floating_point:
            problems.append(f"{name}: expected a {want.dtype} tensor, found {got.dtype} in {got.file.name}")
    if not problems:
        return
    if any(n.endswith(".qweight") for n in unexpected) and not any(n.endswith(".qweight") for n in expected):
        problems.append("the files hold GPTQ tensors but there is no quantize_config.json or config.json quantization_config")
    raise ValueError(f"checkpoint {model_dir} does not match the model its config describes:\n  " + "\n  ".join(problems))


def _short(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------- loading


def load_model(
    path_or_repo: str | Path,
    *,
    device_map: str | torch.device = "cpu",
    torch_dtype: str | torch.dtype = "auto",
    progress: bool = True,
) -> QWenLMHeadModel:
    """Load a Qwen-7B(-Chat)(-Int4) checkpoint (Hugging Face layout) into a QWenLMHeadModel in eval mode.

    path_or_repo: a directory with config.json, *.safetensors (single, sharded with
    model.safetensors.index.json, or the old gptq_model-4bit-128g.safetensors) and optionally
    generation_config.json / quantize_config.json; or a Hugging Face repo id.
    device_map: 'cpu', 'cuda', 'auto' or a torch.device. torch_dtype: 'auto' (see
    `resolve_dtype`), 'bfloat16', 'float16', 'float32' or a torch.dtype. GPTQ integer
    buffers keep their dtype and GPTQ scales/bias stay fp16; every other float tensor is cast.
    Raises before returning anything if the files do not match the config.
    """
    model_dir = resolve_model_dir(path_or_repo)
    config = QwenConfig.from_pretrained(model_dir)
    quant = QuantConfig.from_pretrained(model_dir)
    generation_config = GenerationConfig.from_pretrained(model_dir)
    device = resolve_device(device_map)
    with ExitStack() as stack:
        stored, handles = read_headers(weight_files(model_dir), stack)
        float_dtype = stored["lm_head.weight"].dtype if "lm_head.weight" in stored else None
        dtype = resolve_dtype(torch_dtype, config, device, float_dtype)
        with torch.device("meta"):
            model = QWenLMHeadModel(config, generation_config)
        if quant is not None:
            replace_linear_with_gptq(model, quant)
        expected = model.state_dict()
        check_tensors(expected, stored, model_dir)
        gptq_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, GPTQLinear))

        state = {}
        for name in tqdm(list(expected), desc=f"loading {model_dir.name}", unit="tensor", disable=not progress):
            info = stored[name]
            target = expected[name].dtype if name.startswith(gptq_prefixes) or not info.dtype.is_floating_point else dtype
            try:
                tensor = handles[info.file].get_tensor(name)
            except Exception as exc:
                raise ValueError(f"cannot read {name} from {info.file}: {exc}; the file may be corrupt") from exc
            state[name] = tensor.to(device=device, dtype=target)
            del tensor
    model.load_state_dict(state, strict=True, assign=True)
    del state
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading (not in the checkpoint): {leftover}")
    prepare_quantized_layers(model)  # one kernel per GPTQ layer, repacked once ($QWEN_INT4_GPTQ_KERNEL forces one)
    model.requires_grad_(False)
    return model.eval()


class AutoModelForCausalLM:
    """transformers-style entry point: AutoModelForCausalLM.from_pretrained(path, device_map=..., torch_dtype=...)."""

    _IGNORED = {"trust_remote_code", "low_cpu_mem_usage", "use_flash_attn", "revision", "resume_download", "use_safetensors"}

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        device_map: str | torch.device = "cpu",
        torch_dtype: str | torch.dtype = "auto",
        trust_remote_code: bool = True,
        **kwargs: Any,
    ) -> QWenLMHeadModel:
        """As `load_model`. The reference's precision switches bf16=True / fp16=True / fp32=True are
        honoured (torch_dtype wins if both are given); trust_remote_code is ignored."""
        progress = kwargs.pop("progress", True)
        precision = [name for name in ("bf16", "fp16", "fp32") if kwargs.pop(name, False)]
        if len(precision) > 1:
            raise ValueError(f"give at most one of bf16/fp16/fp32, got {precision}")
        if precision and torch_dtype == "auto":
            torch_dtype = _DTYPE_NAMES[precision[0]]
        unknown = sorted(set(kwargs) - cls._IGNORED)
        if unknown:
            warnings.warn(f"AutoModelForCausalLM.from_pretrained ignores {unknown}", stacklevel=2)
        return load_model(path_or_repo, device_map=device_map, torch_dtype=torch_dtype, progress=progress)

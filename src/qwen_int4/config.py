"""Configuration dataclasses read from a checkpoint's json files.

`GenerationConfig` mirrors generation_config.json of Qwen-7B-Chat (spec section 7).
`QwenConfig` and `QuantConfig` mirror config.json and quantize_config.json.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Keep the keys of `data` that are fields of dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class GenerationConfig:
    """Decoding defaults; the values are Qwen-7B-Chat's generation_config.json.

    top_k == 0 disables top-k; top_p == 1.0 disables nucleus sampling;
    repetition_penalty == 1.0 disables the penalty (applied as transformers does).
    stop_words_ids: token sequences that end generation when the output ends with one.
    """

    chat_format: str = "chatml"
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    max_window_size: int = 6144
    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.8
    repetition_penalty: float = 1.0
    stop_words_ids: list[list[int]] = field(default_factory=list)
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        known = _known_fields(cls, data)
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "GenerationConfig":
        """Read `generation_config.json` from `model_dir`; the defaults when there is none."""
        path = Path(model_dir) / "generation_config.json"
        if not path.exists():
            return cls()
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def update(self, **overrides: Any) -> "GenerationConfig":
        """Return a copy with `overrides` applied; unknown names raise TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(names - {'extra'})}")
        return dataclasses.replace(self, **overrides)

    def validate(self) -> None:
        """Raise ValueError for values that cannot be sampled with."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        return data


# config.json keys of the 2023-08-04 Qwen-7B-Chat release, mapped to the current names (spec 1c).
_LEGACY_KEYS = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
}


@dataclass
class QwenConfig:
    """The architecture hyper-parameters of config.json (spec section 1).

    intermediate_size is the checkpoint's value (22016); the MLP width is half of it.
    """

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    seq_length: int = 8192
    max_position_embeddings: int = 32768
    layer_norm_epsilon: float = 1e-6
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    torch_dtype: str | None = None
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QwenConfig":
        """Build from config.json's dict; the 2023-08 legacy keys are mapped to current ones."""
        data = dict(data)
        for old, new in _LEGACY_KEYS.items():
            if old in data:
                if new in data and data[new] != data[old]:
                    raise ValueError(f"config.json has both legacy '{old}'={data[old]} and '{new}'={data[new]}")
                data[new] = data.pop(old)
        if "seq_length" not in data:
            raise ValueError("config.json has no 'seq_length' (QWenConfig has no default for it; Qwen-7B uses 8192)")
        known = _known_fields(cls, data)
        extra = {k: v for k, v in data.items() if k not in known}
        cfg = cls(**known, extra=extra)
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "QwenConfig":
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: a Qwen checkpoint directory holds config.json")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.kv_channels != self.head_dim:
            raise ValueError(f"kv_channels {self.kv_channels} != hidden_size/num_attention_heads {self.head_dim}")
        if self.intermediate_size % 2:
            raise ValueError(f"intermediate_size {self.intermediate_size} must be even (the MLP width is half of it)")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim {self.rotary_dim} must be even")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        return data


@dataclass
class QuantConfig:
    """GPTQ parameters: quantize_config.json, or config.json's quantization_config (spec section 3)."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    model_name_or_path: str | None = None
    model_file_base_name: str = "model"
    quant_method: str = "gptq"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        cfg = cls(**_known_fields(cls, data))
        if cfg.quant_method != "gptq":
            raise ValueError(f"unsupported quant_method {cfg.quant_method!r}: only 'gptq' checkpoints are supported")
        if cfg.bits not in (4, 8):
            raise ValueError(f"unsupported GPTQ bits={cfg.bits}: qwen-int4 supports 4 and 8")
        if cfg.group_size != -1 and cfg.group_size <= 0:
            raise ValueError(f"unsupported group_size={cfg.group_size}: use a positive size or -1 (one group per column)")
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "QuantConfig | None":
        """The checkpoint's GPTQ config, or None for an unquantized checkpoint."""
        model_dir = Path(model_dir)
        qpath = model_dir / "quantize_config.json"
        if qpath.exists():
            return cls.from_dict(json.loads(qpath.read_text(encoding="utf-8")))
        cpath = model_dir / "config.json"
        if cpath.exists():
            qc = json.loads(cpath.read_text(encoding="utf-8")).get("quantization_config")
            if qc:
                return cls.from_dict(qc)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

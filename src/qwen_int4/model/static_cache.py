"""A preallocated KV cache: the same `update(layer_idx, k, v)` interface as KVCache, fixed addresses.

Keys and values of all layers live in one tensor each, [L, B, S_max, H, D], allocated once, so
a CUDA graph of the decode step (engine/cuda_graph.py) can write and read them at a position
held in a device tensor. With kv_dtype="int8" each token and head is stored as uint8 with a
float32 scale and zero (x ~ scale * (q - zero)): half the bytes a decode step reads per
context token (0.27 MB instead of 0.52 MB for Qwen-7B).
"""
from __future__ import annotations

import torch

from ..kernels.triton_decode import dequantize_kv_reference, quantize_kv_reference

KV_DTYPES = ("fp16", "int8")


class StaticKVCache:
    """Per layer keys/values [B, S_max, H, D] at fixed addresses, filled from position 0.

    `update` (the model's eager forward, e.g. the prefill) writes the new tokens after the
    cached ones and returns every cached key/value of the layer. `seq_len` counts positions
    written by all layers; the decode step advances it with `advance`.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_dtype: str = "fp16",
    ) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        shape = (num_layers, batch_size, max_len, num_heads, head_dim)
        self.dtype, self.kv_dtype, self.max_len, self.num_layers = dtype, kv_dtype, max_len, num_layers
        store = torch.uint8 if kv_dtype == "int8" else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.meta: tuple[torch.Tensor, ...] | None = None  # (k_scale, k_zero, v_scale, v_zero) [L, B, S, H]
        if kv_dtype == "int8":
            self.meta = tuple(torch.zeros(shape[:-1], dtype=torch.float32, device=device) for _ in range(4))
        self._len = 0
        self.ntk_alpha: tuple[float, ...] | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int, kv_dtype: str = "fp16") -> StaticKVCache:
        """A cache shaped for `model`'s config, dtype and device."""
        cfg = model.config
        return cls(cfg.num_hidden_layers, batch_size, max_len, cfg.num_attention_heads, cfg.head_dim,
                   model.dtype, model.device, kv_dtype)

    @property
    def seq_len(self) -> int:
        """Positions cached so far (read it before a forward, as the model does)."""
        return self._len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys, values and (int8) their scales and zeros."""
        tensors = [self.k, self.v, *(self.meta or ())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(keys, values [B, S_max, H, D], int8 meta or None) of layer idx: views, for the kernels."""
        meta = tuple(m[idx] for m in self.meta) if self.meta is not None else None
        return self.k[idx], self.v[idx], meta

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, S_new, H, D] after the cached positions; return keys, values [B, S, H, D]."""
        start, new = self._len, k.shape[1]
        end = start + new
        if end > self.max_len:
            raise ValueError(f"StaticKVCache holds {self.max_len} positions; {start} cached + {new} new do not fit")
        keys, values, meta = self.layer(layer_idx)
        if meta is None:
            keys[:, start:end] = k
            values[:, start:end] = v
            out = keys[:, :end], values[:, :end]
        else:
            for cache, scale, zero, x in ((keys, meta[0], meta[1], k), (values, meta[2], meta[3], v)):
                q, s, z = quantize_kv_reference(x)
                cache[:, start:end], scale[:, start:end], zero[:, start:end] = q, s, z
            out = tuple(
                dequantize_kv_reference(cache[:, :end], scale[:, :end], zero[:, :end], self.dtype)
                for cache, scale, zero in ((keys, meta[0], meta[1]), (values, meta[2], meta[3]))
            )
        if layer_idx == self.num_layers - 1:
            self._len = end
        return out

    def advance(self, n: int = 1) -> None:
        """Count n positions written by the decode step (which writes through `layer`)."""
        if self._len + n > self.max_len:
            raise ValueError(f"StaticKVCache holds {self.max_len} positions, cannot advance past {self._len + n}")
        self._len += n

    def reset(self) -> None:
        """Forget every position (the memory stays allocated)."""
        self._len = 0
        self.ntk_alpha = None

    def index_select(self, rows) -> None:
        raise NotImplementedError("StaticKVCache keeps its rows in place; finished rows keep decoding (pad)")

"""The per-request KV cache: keys and values of every layer, plus the NTK alpha fixed at prefill."""
from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Dynamic KV cache: per layer (k, v), each [B, S, H, D], grown by concatenation on dim 1.

    The attention calls `update(layer_idx, k, v)` and attends over what it returns, so another
    cache (a static preallocated one) can stand in with the same interface.
    `ntk_alpha` holds one dynamic-NTK alpha per batch row, set by the model at prefill and kept
    for every later step (the reference does not recompute it while decoding).
    """

    def __init__(self, num_layers: int) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.ntk_alpha: tuple[float, ...] | None = None

    @property
    def seq_len(self) -> int:
        """Number of cached positions (read it before a forward: layers are updated one by one)."""
        first = self.layers[0]
        return 0 if first is None else first[0].shape[1]

    @property
    def batch_size(self) -> int | None:
        """Number of cached rows, or None while the cache is empty."""
        first = self.layers[0]
        return None if first is None else first[0].shape[0]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, S_new, H, D] to layer `layer_idx`; return all keys and values [B, S, H, D]."""
        past = self.layers[layer_idx]
        if past is not None:
            k = torch.cat((past[0], k), dim=1)  # [B, S_past + S_new, H, D]
            v = torch.cat((past[1], v), dim=1)  # [B, S_past + S_new, H, D]
        else:  # k, v may be views of the layer's fused qkv: keep only their own memory alive
            k, v = k.contiguous(), v.contiguous()
        self.layers[layer_idx] = (k, v)
        return k, v

    def index_select(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep only batch rows `rows` (in that order), in place: keys, values and alphas."""
        if self.batch_size is None:
            raise ValueError("index_select on an empty KVCache: nothing to select")
        device = self.layers[0][0].device
        index = torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise ValueError(f"row index out of range for a KVCache of batch size {self.batch_size}: {index.tolist()}")
        for i, layer in enumerate(self.layers):
            if layer is not None:
                self.layers[i] = (layer[0].index_select(0, index), layer[1].index_select(0, index))
        if self.ntk_alpha is not None:
            self.ntk_alpha = tuple(self.ntk_alpha[j] for j in index.tolist())

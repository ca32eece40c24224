"""Paged KV cache: the K/V tensors of the block pool, and the per-step view the model writes to.

Layout (the "varlen" / packed layout): a step's tokens of all scheduled sequences are
flattened into one batch row [1, N]. `PagedKVCache.update` — the model's cache interface —
writes the step's new keys and values into their slots (block * block_size + offset) and
returns the keys and values of every scheduled sequence's whole context, concatenated
[1, T, H, D]; the runner's block-diagonal causal mask [1, 1, N, T] keeps each sequence to
its own keys. This gather is the plain-PyTorch path (CPU, and the oracle for a paged
attention kernel); its cost is N x T attention scores where a kernel would do sum(n_i x t_i).
"""
from __future__ import annotations

import torch


class KVPool:
    """Per layer K and V pools [num_blocks, block_size, H, D] in the model's dtype."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, block_size, num_heads, head_dim)
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_heads * head_dim * dtype.itemsize


class PagedKVCache:
    """One step's cache for QWenLMHeadModel: `update(layer_idx, k, v)` and the tokens' NTK alphas.

    slot_mapping [N]: the flat slot where each new token's K/V go.
    context_slots [T]: the flat slots of all keys the step attends to, sequence after sequence.
    ntk_alpha [1, N]: each token's NTK alpha (its sequence's, fixed at its first prefill).
    """

    def __init__(self, pool: KVPool, slot_mapping: torch.Tensor, context_slots: torch.Tensor,
                 ntk_alpha: torch.Tensor) -> None:
        self.pool = pool
        self.slot_mapping = slot_mapping
        self.context_slots = context_slots
        self.ntk_alpha = ntk_alpha

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [1, N, H, D] at slot_mapping; return the context's keys and values [1, T, H, D]."""
        _, _, H, D = k.shape
        k_slots = self.pool.k[layer_idx].view(-1, H, D)  # [num_blocks * block_size, H, D]
        v_slots = self.pool.v[layer_idx].view(-1, H, D)  # [num_blocks * block_size, H, D]
        k_slots.index_copy_(0, self.slot_mapping, k[0])
        v_slots.index_copy_(0, self.slot_mapping, v[0])
        return k_slots[self.context_slots][None], v_slots[self.context_slots][None]  # [1, T, H, D]

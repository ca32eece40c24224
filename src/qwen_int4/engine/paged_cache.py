"""Paged KV cache: the K/V tensors of the block pool, and the per-step cache the model attends through.

Layout (the "varlen" / packed layout): a step's tokens of all scheduled sequences are
flattened into one batch row [1, N], one-token steps (decodes) first. `PagedKVCache` is the
model's cache with its own attention (model/qwen.py calls `attention(layer_idx, q, k, v)`):
it writes the step's new keys and values into their pool slots (block * block_size + offset,
one index_copy_ each) and attends
* for the decodes, one query per sequence over its blocks (kernels/triton_paged.py's paged
  decode kernel on CUDA; its reference elsewhere);
* for the prefill chunks, causal attention over each chunk's context (FlashAttention varlen on
  CUDA; SDPA per sequence elsewhere). A chunk that continues a cached prefix attends over its
  whole context, gathered from the pool; first chunks attend over their own new keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.triton_paged import (
    paged_decode_attention,
    paged_decode_attention_reference,
    varlen_attention,
    varlen_attention_reference,
)


class KVPool:
    """Per layer K and V pools [num_blocks + 1, block_size, H, D] in the model's dtype.

    The extra last block (`pad_block`) belongs to no sequence: padded rows of a CUDA-graph
    decode step write and read there.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks + 1, block_size, num_heads, head_dim)
        self.block_size = block_size
        self.pad_block = num_blocks
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_heads * head_dim * dtype.itemsize


@dataclass
class StepLayout:
    """Where one step's N packed tokens go and what they attend to (tensors on the model's device).

    slot_mapping [N] long: each new token's flat pool slot.
    The first `num_decode` tokens are one-token steps: block_tables [num_decode, max_blocks] int32
    and context_lens [num_decode] int32 (the token's position + 1).
    The rest are prefill chunks: query offsets cu_q and key offsets cu_k (host lists, and int32
    device copies), and context_slots [cu_k[-1]] long, the pool slots of every chunk's whole
    context, or None when no chunk continues a cached prefix (each attends over its own keys).
    """

    slot_mapping: torch.Tensor
    num_decode: int
    block_tables: torch.Tensor | None
    context_lens: torch.Tensor | None
    cu_q: list[int]
    cu_k: list[int]
    cu_q_dev: torch.Tensor | None
    cu_k_dev: torch.Tensor | None
    context_slots: torch.Tensor | None
    decode_splits: int = 1


class PagedKVCache:
    """One step's cache for QWenLMHeadModel: `attention(layer_idx, q, k, v)` and the tokens' NTK alphas.

    ntk_alpha [1, N]: each token's NTK alpha (its sequence's, fixed at its first prefill).
    """

    def __init__(self, pool: KVPool, layout: StepLayout, ntk_alpha: torch.Tensor) -> None:
        self.pool = pool
        self.layout = layout
        self.ntk_alpha = ntk_alpha

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v [1, N, H, D] at their slots; attention of q [1, N, H, D] -> [1, N, H, D]."""
        lay = self.layout
        _, N, H, D = q.shape
        k_pool, v_pool = self.pool.k[layer_idx], self.pool.v[layer_idx]  # [blocks, block_size, H, D]
        k_slots, v_slots = k_pool.view(-1, H, D), v_pool.view(-1, H, D)  # [blocks * block_size, H, D]
        k_slots.index_copy_(0, lay.slot_mapping, k[0])
        v_slots.index_copy_(0, lay.slot_mapping, v[0])
        fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        parts = []
        nd = lay.num_decode
        if nd:
            q_dec = q[0, :nd]  # [nd, H, D]
            if fast:
                parts.append(paged_decode_attention(q_dec, k_pool, v_pool, lay.block_tables, lay.context_lens,
                                                    lay.decode_splits))
            else:
                parts.append(paged_decode_attention_reference(q_dec, k_pool, v_pool, lay.block_tables,
                                                              lay.context_lens))
        if nd < N:
            q_pre = q[0, nd:]  # [N - nd, H, D]
            if lay.context_slots is None:  # first chunks: their context is their own keys
                keys, values = k[0, nd:], v[0, nd:]  # [N - nd, H, D]
            else:
                keys, values = k_slots[lay.context_slots], v_slots[lay.context_slots]  # [T, H, D]
            if fast:
                parts.append(varlen_attention(q_pre, keys.contiguous(), values.contiguous(), lay.cu_q, lay.cu_k,
                                              lay.cu_q_dev, lay.cu_k_dev))
            else:
                parts.append(varlen_attention_reference(q_pre, keys, values, lay.cu_q, lay.cu_k))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[None]  # [1, N, H, D]

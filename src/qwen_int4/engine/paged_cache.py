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

kv_cache_dtype (as vLLM's --kv-cache-dtype): "auto" stores keys and values in the model's dtype;
"int8" stores each (token, head) as uint8 with a float32 scale and zero, the static cache's
scheme (model/static_cache.py): 136 instead of 256 bytes per token, head and K or V at head dim
128, so a memory budget holds ~1.9x the blocks and a decode step reads ~half the bytes. New keys
are quantized as they are stored; a first prefill chunk attends over its own unquantized keys
(as vLLM does), every later read dequantizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.triton_paged import (
    Meta,
    gather_slots,
    paged_decode_attention,
    paged_decode_attention_reference,
    pool_meta,
    quantize_write_paged,
    varlen_attention,
    varlen_attention_reference,
    write_paged_reference,
)

KV_CACHE_DTYPES = ("auto", "int8")


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """Raise ValueError unless kv_cache_dtype is one of KV_CACHE_DTYPES."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (auto: the model's dtype; "
                         f"int8: uint8 with a scale and zero per token and head), got {kv_cache_dtype!r}")


class KVPool:
    """Per layer K and V pools [num_blocks + 1, block_size, H, D]: in the model's dtype ("auto"), or
    uint8 ("int8") with per layer meta (k_scale, k_zero, v_scale, v_zero) [num_blocks + 1, H, block_size]
    float32 (kernels/triton_paged.pool_meta: head-major views of one tensor, as the decode kernel reads it).

    The extra last block (`pad_block`) belongs to no sequence: padded rows of a CUDA-graph
    decode step write and read there.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, kv_cache_dtype: str = "auto") -> None:
        check_kv_cache_dtype(kv_cache_dtype)
        shape = (num_blocks + 1, block_size, num_heads, head_dim)
        int8 = kv_cache_dtype == "int8"
        self.block_size = block_size
        self.pad_block = num_blocks
        self.kv_cache_dtype = kv_cache_dtype
        store = torch.uint8 if int8 else dtype
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.meta: list[Meta] | None = None
        if int8:
            self.meta = [pool_meta(num_blocks + 1, block_size, num_heads, device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                        kv_cache_dtype: str = "auto") -> int:
        """Bytes of one block over all layers: keys and values, and (int8) their scales and zeros."""
        check_kv_cache_dtype(kv_cache_dtype)
        per_head = head_dim + 2 * 4 if kv_cache_dtype == "int8" else head_dim * dtype.itemsize  # K or V, one token
        return 2 * num_layers * block_size * num_heads * per_head

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, Meta | None]:
        """(keys, values [num_blocks + 1, block_size, H, D], int8 meta or None) of layer idx, for the kernels."""
        return self.k[idx], self.v[idx], self.meta[idx] if self.meta is not None else None

    def store(self, idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [N, H, D] of layer idx at the flat `slots` [N] (long), quantized for int8 (one Triton
        kernel on CUDA, the reference elsewhere)."""
        keys, values, meta = self.layer(idx)
        if meta is not None and k.is_cuda:
            quantize_write_paged(k, v, slots, keys, values, meta)
        else:
            write_paged_reference(k, v, slots, keys, values, meta)

    def gather(self, idx: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [T, H, D] of layer idx at the flat `slots` [T] (long), in dtype (dequantized for int8)."""
        keys, values, meta = self.layer(idx)
        return (gather_slots(keys, meta[:2] if meta else None, slots, dtype),
                gather_slots(values, meta[2:] if meta else None, slots, dtype))


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
        N = q.shape[1]
        self.pool.store(layer_idx, lay.slot_mapping, k[0], v[0])
        k_pool, v_pool, meta = self.pool.layer(layer_idx)  # [blocks, block_size, H, D], int8 meta or None
        fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        parts = []
        nd = lay.num_decode
        if nd:
            q_dec = q[0, :nd]  # [nd, H, D]
            if fast:
                parts.append(paged_decode_attention(q_dec, k_pool, v_pool, meta, lay.block_tables,
                                                    lay.context_lens, lay.decode_splits))
            else:
                parts.append(paged_decode_attention_reference(q_dec, k_pool, v_pool, meta, lay.block_tables,
                                                              lay.context_lens))
        if nd < N:
            q_pre = q[0, nd:]  # [N - nd, H, D]
            if lay.context_slots is None:  # first chunks: their context is their own keys
                keys, values = k[0, nd:], v[0, nd:]  # [N - nd, H, D]
            else:
                keys, values = self.pool.gather(layer_idx, lay.context_slots, q.dtype)  # [T, H, D]
            if fast:
                parts.append(varlen_attention(q_pre, keys.contiguous(), values.contiguous(), lay.cu_q, lay.cu_k,
                                              lay.cu_q_dev, lay.cu_k_dev))
            else:
                parts.append(varlen_attention_reference(q_pre, keys, values, lay.cu_q, lay.cu_k))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[None]  # [1, N, H, D]

"""Model runner: one scheduled step -> one forward of QWenLMHeadModel over the paged KV cache.

The step's tokens are packed into one row [1, N] with their absolute positions; the mask
lets a token see the keys of its own sequence at positions <= its own. Logits are computed
only for the last token of each sequence whose step reaches its end (it samples next).
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .paged_cache import KVPool, PagedKVCache
from .request import Sequence

DEFAULT_CPU_KV_CACHE_GB = 1.0
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Not cuDNN: it builds an execution plan per attention shape, and the packed layout's shape
# changes every step (measured on an H200, tiny model: 38 ms/step with it, 6.5 ms without).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def num_kv_blocks(model: torch.nn.Module, block_size: int, kv_cache_gb: float | None = None,
                  gpu_memory_utilization: float | None = None, max_num_batched_tokens: int = 2048) -> int:
    """How many KV blocks to allocate.

    --kv-cache-gb wins when given. Otherwise on CUDA: the fraction `gpu_memory_utilization`
    of the card's memory, minus what is in use (weights, other processes) and the peak of a
    profiled forward of max_num_batched_tokens tokens; on CPU, DEFAULT_CPU_KV_CACHE_GB.
    """
    cfg = model.config
    per_block = KVPool.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_attention_heads,
                                       cfg.head_dim, model.dtype)
    if kv_cache_gb is None and model.device.type == "cuda":
        util = gpu_memory_utilization if gpu_memory_utilization is not None else DEFAULT_GPU_MEMORY_UTILIZATION
        if not 0.0 < util <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {util}")
        activations = _profile_forward_peak(model, max_num_batched_tokens)
        free, total = torch.cuda.mem_get_info(model.device)
        budget = util * total - (total - free) - activations
        blocks = int(budget // per_block)
        if blocks < 1:
            raise ValueError(
                f"no GPU memory left for the KV cache: {util:.2f} x {total / 2**30:.1f} GiB minus "
                f"{(total - free) / 2**30:.1f} GiB in use and {activations / 2**30:.2f} GiB of activations; "
                "raise --gpu-memory-utilization or lower --max-num-batched-tokens"
            )
        return blocks
    gb = kv_cache_gb if kv_cache_gb is not None else DEFAULT_CPU_KV_CACHE_GB
    if gb <= 0:
        raise ValueError(f"--kv-cache-gb must be > 0, got {gb}")
    blocks = int(gb * 2**30 // per_block)
    if blocks < 1:
        raise ValueError(f"--kv-cache-gb {gb} is smaller than one KV block ({per_block} bytes for "
                         f"block size {block_size}); raise it")
    return blocks


@torch.inference_mode()
def _profile_forward_peak(model: torch.nn.Module, num_tokens: int) -> int:
    """Peak extra CUDA memory (bytes) of a forward over num_tokens packed tokens."""
    torch.cuda.synchronize(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    before = torch.cuda.memory_allocated(model.device)
    ids = torch.zeros(1, num_tokens, dtype=torch.long, device=model.device)
    positions = torch.arange(num_tokens, device=model.device)[None]
    mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=model.device).tril()[None, None]
    model(ids, attention_mask=mask, use_cache=False, position_ids=positions, logits_to_keep=1)
    torch.cuda.synchronize(model.device)
    peak = torch.cuda.max_memory_allocated(model.device) - before
    torch.cuda.empty_cache()
    return peak


class ModelRunner:
    """Owns the KV pool and runs the model on the scheduled tokens."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int) -> None:
        cfg = model.config
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv = KVPool(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_attention_heads, cfg.head_dim,
                         model.dtype, model.device)

    @torch.inference_mode()
    def execute(self, scheduled: dict[Sequence, int]) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the step; return float32 logits [M, vocab] for the M sequences that sample, and them."""
        bs, dev = self.block_size, self.device
        ids, positions, slots, context, q_seq, k_seq, k_pos, alphas = [], [], [], [], [], [], [], []
        keep, sampling = [], []
        n_tokens = 0
        for i, (seq, n) in enumerate(scheduled.items()):
            start, end = seq.num_computed, seq.num_computed + n
            pos = torch.arange(start, end)
            table = torch.tensor(seq.block_table[: -(-end // bs)], dtype=torch.long)  # blocks covering 0..end-1
            ids.append(torch.tensor(seq.token_ids[start:end], dtype=torch.long))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            context.append((table[:, None] * bs + torch.arange(bs)).reshape(-1)[:end])  # slots of 0..end-1
            q_seq.append(torch.full((n,), i))
            k_seq.append(torch.full((end,), i))
            k_pos.append(torch.arange(end))
            alphas.append(torch.full((n,), float(seq.ntk_alpha or 1.0)))
            n_tokens += n
            if end == seq.num_tokens:  # the step reaches the sequence's last token: it samples
                keep.append(n_tokens - 1)
                sampling.append(seq)
        positions_t = torch.cat(positions)
        # block-diagonal causal mask: a token sees its own sequence's keys at positions <= its own
        mask = (torch.cat(q_seq)[:, None] == torch.cat(k_seq)[None, :]) & (
            torch.cat(k_pos)[None, :] <= positions_t[:, None])  # [N, T]
        cache = PagedKVCache(self.kv, torch.cat(slots).to(dev), torch.cat(context).to(dev),
                             torch.cat(alphas)[None].to(dev))
        with sdpa_kernel(SDPA_BACKENDS):
            out = self.model(
                torch.cat(ids)[None].to(dev),  # [1, N]
                attention_mask=mask[None, None].to(dev),  # [1, 1, N, T]
                past_key_values=cache,
                position_ids=positions_t[None].to(dev),  # [1, N]
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
            )
        return out.logits[0].float(), sampling  # [M, vocab]

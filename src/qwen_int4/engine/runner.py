"""Model runner: one scheduled step -> logits of the sequences that sample next.

Two paths. A decode-only step on CUDA (one token per sequence, NTK alpha 1) replays the CUDA
graph of its batch bucket (engine/paged_decode.py). Any other step is one forward of
QWenLMHeadModel: the step's tokens packed into one row [1, N] with their absolute positions,
one-token steps first, and a PagedKVCache that stores the new keys/values in the pool and
attends per sequence (engine/paged_cache.py). Logits are computed only for the last token of
each sequence whose step reaches its end (it samples next).
"""
from __future__ import annotations

import numpy as np
import torch

from .cuda_graph import graph_decode_problem
from .paged_cache import KVPool, PagedKVCache, StepLayout
from .paged_decode import DecodeGraphs, decode_splits
from .request import Sequence
from .sampler import to_device

DEFAULT_CPU_KV_CACHE_GB = 1.0
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def num_kv_blocks(model: torch.nn.Module, block_size: int, kv_cache_gb: float | None = None,
                  gpu_memory_utilization: float | None = None, max_num_batched_tokens: int = 2048,
                  kv_cache_dtype: str = "auto") -> int:
    """How many KV blocks to allocate (of KVPool.bytes_per_block each: int8 blocks are ~half as big).

    --kv-cache-gb wins when given. Otherwise on CUDA: the fraction `gpu_memory_utilization`
    of the card's memory, minus what is in use (weights, other processes) and the peak of a
    profiled forward of max_num_batched_tokens tokens; on CPU, DEFAULT_CPU_KV_CACHE_GB.
    """
    cfg = model.config
    per_block = KVPool.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_attention_heads,
                                       cfg.head_dim, model.dtype, kv_cache_dtype)
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


def _token_at(seq: Sequence, position: int) -> int:
    prompt = seq.prompt_ids
    return prompt[position] if position < len(prompt) else seq.output_ids[position - len(prompt)]


def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat pool slots of positions start..end-1 of a sequence with this block table."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class ModelRunner:
    """Owns the KV pool (and on CUDA the decode graphs) and runs the model on the scheduled tokens."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, max_num_seqs: int = 128,
                 max_model_len: int | None = None, cuda_graphs: bool = True, kv_cache_dtype: str = "auto") -> None:
        cfg = model.config
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv = KVPool(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_attention_heads, cfg.head_dim,
                         model.dtype, model.device, kv_cache_dtype)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and graph_decode_problem(model) is None:  # CUDA, Triton, fp16/bf16, capturable kernels
            max_len = max_model_len or cfg.max_position_embeddings
            self.graphs = DecodeGraphs(model, self.kv, max_num_seqs, max_len)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, scheduled: dict[Sequence, int],
                pending: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the step; return float32 logits [M, vocab] for the M sequences that sample, and them.

        pending: a chained decode step, launched before the host has the tokens it runs. Every
        scheduled sequence runs one token, its newest, sampled by the step before and not yet
        appended: pending [n] (on the device, in scheduled order) holds them. All of them sample.
        """
        items = list(scheduled.items())
        if pending is None:
            items.sort(key=lambda item: item[1] > 1)  # one-token steps first (stable)
        g = self.graphs
        if (g is not None and items[-1][1] == 1 and len(items) <= g.max_batch
                and all((seq.ntk_alpha or 1.0) == 1.0 for seq, _ in items)):
            return self._decode_graph(items, pending)
        return self._forward(items, pending)

    def _decode_graph(self, items: list[tuple[Sequence, int]],
                      pending: torch.Tensor | None) -> tuple[torch.Tensor, list[Sequence]]:
        bs = self.block_size
        seqs = [seq for seq, _ in items]
        positions = [seq.num_computed for seq in seqs]
        tokens = pending if pending is not None else [_token_at(seq, p) for seq, p in zip(seqs, positions)]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions)]
        logits = self.graphs.run(tokens, positions, slots, [seq.block_table for seq in seqs])  # [n, V]
        if pending is not None:
            return logits.float(), seqs
        keep = [i for i, (seq, p) in enumerate(zip(seqs, positions)) if p + 1 == seq.num_tokens]
        if len(keep) < len(seqs):
            logits = logits.index_select(0, to_device(keep, torch.long, self.device))  # no sync: t+1 is queued
        return logits.float(), [seqs[i] for i in keep]

    def _forward(self, items: list[tuple[Sequence, int]],
                 pending: torch.Tensor | None) -> tuple[torch.Tensor, list[Sequence]]:
        bs, dev = self.block_size, self.device
        ahead = pending is not None  # each sequence's newest token is not appended yet
        ids, positions, slots, alphas, keep, sampling = [], [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        cu_q, cu_k = [0], [0]
        for seq, n in items:
            start, end = seq.num_computed, seq.num_computed + n
            if not ahead:
                ids += (seq.prompt_ids + seq.output_ids)[start:end] if n > 1 else [_token_at(seq, start)]
            positions += range(start, end)
            slots += _slots(seq.block_table, start, end, bs)
            alphas += [float(seq.ntk_alpha or 1.0)] * n
            if n == 1:
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            else:
                prefills.append((seq, end))
                cu_q.append(cu_q[-1] + n)
                cu_k.append(cu_k[-1] + end)
            if end == seq.num_tokens + ahead:  # the step reaches the sequence's last token: it samples
                keep.append(len(positions) - 1)
                sampling.append(seq)
        nd = len(decode_lens)
        tables = None
        if nd:
            tables = np.zeros((nd, max(len(t) for t in decode_tables)), dtype=np.int32)
            for row, table in enumerate(decode_tables):
                tables[row, : len(table)] = table
            tables = torch.from_numpy(tables).to(dev)
        context_slots = None
        if any(seq.num_computed for seq, _ in prefills):  # a chunk continues a cached prefix
            context_slots = torch.tensor([s for seq, end in prefills for s in _slots(seq.block_table, 0, end, bs)],
                                         dtype=torch.long, device=dev)
        else:
            cu_k = cu_q
        layout = StepLayout(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=nd,
            block_tables=tables,
            context_lens=torch.tensor(decode_lens, dtype=torch.int32, device=dev) if nd else None,
            cu_q=cu_q, cu_k=cu_k,
            cu_q_dev=torch.tensor(cu_q, dtype=torch.int32, device=dev) if prefills else None,
            cu_k_dev=torch.tensor(cu_k, dtype=torch.int32, device=dev) if prefills else None,
            context_slots=context_slots,
            decode_splits=decode_splits(nd) if nd else 1,
        )
        cache = PagedKVCache(self.kv, layout, torch.tensor([alphas], dtype=torch.float32, device=dev))
        input_ids = pending.view(1, -1).long() if ahead else torch.tensor([ids], dtype=torch.long, device=dev)
        out = self.model(
            input_ids,  # [1, N]
            past_key_values=cache,
            position_ids=torch.tensor([positions], dtype=torch.long, device=dev),  # [1, N]
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
        )
        return out.logits[0].float(), sampling  # [M, vocab]

"""Decode-only engine steps on CUDA: one token per sequence through fused kernels, one CUDA graph
per batch-size bucket.

`PagedDecodeStep` is model/qwen.py's forward for one new token per sequence over the paged KV
pool, the same modules and weights (GPTQ linears run their kernels), the glue fused: RMSNorm
with the residual add, RoPE + KV write, SwiGLU (kernels/triton_decode.py), paged decode
attention (kernels/triton_paged.py; model-dtype or int8 pools). It mirrors engine/cuda_graph.py's
DecodeStep, whose cache is static; here every row has its own position, slot and block table,
read from one int32 buffer on the device, so a captured graph serves every step.

`DecodeGraphs` captures the step at bucketed batch sizes (1, 2, 4, ... up to max_num_seqs); a
step of n sequences replays the smallest bucket >= n, the padding rows writing and reading the
pool's spare block. Scope: NTK alpha 1 (every prompt up to seq_length); the engine runs other
steps through the model's forward.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels.triton_decode import add_rms_norm, swiglu_mlp
from ..kernels.triton_paged import paged_decode_attention, rope_write_paged
from ..model.rope import logn_scale
from .paged_cache import KVPool

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN, POSITION, SLOT, CONTEXT_LEN = range(4)  # rows of the scalar part of the input buffer


def decode_splits(batch: int) -> int:
    """Split-KV programs per (sequence, head), a power of two: enough programs for the card with few sequences."""
    return 1 << (max(1, 16 // batch).bit_length() - 1)


class PagedDecodeStep:
    """logits [B, V] for the B sequences described in `inputs` (see `write_inputs`)."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, max_batch: int, max_len: int) -> None:
        cfg = model.config
        if cfg.rotary_dim != cfg.head_dim:
            raise ValueError(f"the decode step rotates the whole head (rotary_pct 1.0); rotary_dim is {cfg.rotary_dim}")
        self.model, self.pool, self.max_batch = model, pool, max_batch
        self.max_blocks = -(-max_len // pool.block_size)
        device = model.device
        # [4, max_batch] scalars (token, position, slot, context length) then [max_batch, max_blocks] block tables
        self.inputs = torch.zeros(max_batch * (4 + self.max_blocks), dtype=torch.int32, device=device)
        # two pinned staging buffers, used in turn: the next step's inputs are written while the copy
        # of the step before may still wait in the stream (a chained launch); each has an event
        # recorded after its copy, waited for before it is written again
        pinned = device.type == "cuda"
        self.hosts = [torch.zeros(self.inputs.shape, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self.copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.turn = 0
        self.padding = np.array([[0], [0], [pool.pad_block * pool.block_size], [1]], dtype=np.int32)  # [4, 1]
        self.cos, self.sin = model.transformer.rotary.table(1.0, max_len, device)  # [>= max_len, D]
        self.logn = None
        if cfg.use_logn_attn and max_len > cfg.seq_length:
            self.logn = logn_scale(0, max_len, cfg.seq_length, device)  # [max_len]

    def _views(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        scalars = t[: 4 * self.max_batch].view(4, self.max_batch)[:, :batch]  # [4, B]
        tables = t[4 * self.max_batch:].view(self.max_batch, self.max_blocks)[:batch]  # [B, max_blocks]
        return scalars, tables

    def write_inputs(self, batch: int, tokens: list[int] | torch.Tensor, positions: list[int], slots: list[int],
                     block_tables: list[list[int]]) -> None:
        """Stage n <= batch sequences' inputs (rows n..batch-1 are padding) and copy them to the device.

        tokens: host ids, or a tensor [n] on the device (the tokens sampled by the step before,
        not known to the host yet), copied in after the staged inputs, in stream order.
        """
        n = len(positions)
        host, done = self.hosts[self.turn], self.copied[self.turn]
        if done is not None:
            done.synchronize()  # this buffer's previous copy has run (at once, but for a chained launch)
        scalars, tables = (v.numpy() for v in self._views(host, batch))
        scalars[TOKEN, :n] = 0 if isinstance(tokens, torch.Tensor) else tokens
        scalars[POSITION, :n], scalars[SLOT, :n] = positions, slots
        scalars[CONTEXT_LEN, :n] = scalars[POSITION, :n] + 1
        scalars[:, n:] = self.padding
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        tables[n:, 0] = self.pool.pad_block
        used = 4 * self.max_batch + batch * self.max_blocks  # the scalars and this bucket's table rows
        self.inputs[:used].copy_(host[:used], non_blocking=True)
        if done is not None:
            done.record()
        self.turn ^= 1
        if isinstance(tokens, torch.Tensor):
            self._views(self.inputs, batch)[0][TOKEN, :n].copy_(tokens)

    def __call__(self, batch: int) -> torch.Tensor:
        model, pool = self.model, self.pool
        t = model.transformer
        eps, heads = model.config.layer_norm_epsilon, model.config.num_attention_heads
        scalars, tables = self._views(self.inputs, batch)
        positions = scalars[POSITION]
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)  # [B, D]
        logn = self.logn.index_select(0, positions) if self.logn is not None else None  # [B]
        slots, lens = scalars[SLOT].contiguous(), scalars[CONTEXT_LEN].contiguous()
        x = t.wte(scalars[TOKEN])  # [B, hidden]
        y, x = add_rms_norm(x, None, t.h[0].ln_1.weight, eps)
        for i, block in enumerate(t.h):
            qkv = block.attn.c_attn(y)  # [B, 3 * hidden]
            keys, values, meta = pool.layer(i)  # meta: scales and zeros of an int8 pool, else None
            q = rope_write_paged(qkv, cos, sin, logn, slots, keys, values, meta, heads)  # [B, H, D]
            o = paged_decode_attention(q, keys, values, meta, tables, lens, decode_splits(batch))  # [B, H, D]
            y, x = add_rms_norm(block.attn.c_proj(o.view(batch, -1)), x, block.ln_2.weight, eps)  # x += attn
            m = block.mlp.c_proj(swiglu_mlp(block.mlp, y))
            norm = t.h[i + 1].ln_1.weight if i + 1 < len(t.h) else t.ln_f.weight
            y, x = add_rms_norm(m, x, norm, eps)  # x += mlp; y = next ln_1 (or ln_f)
        return model.lm_head(y)  # [B, V]


class DecodeGraphs:
    """The decode step captured once per bucket; `run` replays the smallest bucket that fits."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, max_num_seqs: int, max_len: int) -> None:
        self.buckets = sorted({b for b in BUCKETS if b < max_num_seqs} | {max_num_seqs})
        self.step = PagedDecodeStep(model, pool, self.buckets[-1], max_len)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool (after a warm-up run each)."""
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.buckets):
            self.step.write_inputs(batch, [], [], [], [])  # all padding: writes go to the spare block
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.step(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self.step(batch)
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def run(self, tokens: list[int] | torch.Tensor, positions: list[int], slots: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """logits [n, V] (a view of the bucket's output buffer) for n one-token sequences; tokens as
        PagedDecodeStep.write_inputs takes them."""
        n = len(positions)
        batch = next(b for b in self.buckets if b >= n)
        if not self.graphs:
            self.capture()
        self.step.write_inputs(batch, tokens, positions, slots, block_tables)
        self.graphs[batch].replay()
        return self.logits[batch][:n]

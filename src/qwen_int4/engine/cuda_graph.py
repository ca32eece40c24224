"""Batch decode with a static KV cache, one CUDA graph per step.

`DecodeStep` is model/qwen.py's forward for one new token per row, over a StaticKVCache, with
the position in a device tensor: same modules and weights (GPTQ linears run their kernel),
the glue fused into Triton kernels (kernels/triton_decode.py), nothing that syncs or depends on
a Python int that changes per step. `CUDAGraphDecoder` prefills with the model's own forward,
captures one step and replays it: per token one graph launch, no host sync.

Scope: every row shares one NTK alpha (prompts up to seq_length, 8192 for Qwen-7B, or equal
lengths); rotary over the full head dim. A model change that would make this file smaller is
described in the helper's report (attention over a preallocated cache at a position tensor).
`graph_decode_problem` says why a model cannot take this path (generate() then falls back to
the model's forward). A GPTQ layer on the reference kernel (torch-dequant) syncs the host
(it checks g_idx), so it runs the same step eagerly (`graph=False`), never captured.
"""
from __future__ import annotations

import torch

from ..kernels.registry import REFERENCE_KERNEL
from ..kernels.triton_decode import (
    add_rms_norm,
    decode_attention,
    rope_write_kv,
    swiglu_mlp,
)
from ..model.rope import logn_scale
from ..model.static_cache import StaticKVCache
from ..quant.gptq import GPTQLinear


def _triton_missing() -> bool:
    from ..kernels import triton_decode

    return triton_decode.triton is None


def graph_decode_problem(model: torch.nn.Module, capture: bool = True) -> str | None:
    """Why `model` cannot decode through DecodeStep (captured as a CUDA graph when capture), or None."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(getattr(model, "transformer", None), "h"):
        return f"{type(model).__name__} is not a QWenLMHeadModel"
    if model.device.type != "cuda":
        return f"the model is on {model.device}, the decode step's kernels need CUDA"
    if _triton_missing():
        return "Triton is not installed (the decode step's kernels are Triton kernels)"
    if model.dtype not in (torch.float16, torch.bfloat16):
        return f"the decode step runs float16/bfloat16 models, this one is {model.dtype}"
    if cfg.rotary_dim != cfg.head_dim:
        return f"the decode step rotates the whole head (rotary_pct 1.0); rotary_dim is {cfg.rotary_dim}"
    if capture:
        for name, module in model.named_modules():
            if isinstance(module, GPTQLinear) and (module.kernel is None or module.kernel.name == REFERENCE_KERNEL):
                return f"{name} runs the {REFERENCE_KERNEL} reference kernel, which syncs the host (not capturable)"
    return None


def graph_capturable(model: torch.nn.Module) -> bool:
    """Whether every layer of `model` can run inside a captured CUDA graph (no reference GPTQ kernel)."""
    return graph_decode_problem(model, capture=True) is None


class DecodeStep:
    """logits [B, V] for `token` [B] at position `pos` (int32 [1]); writes the cache at pos."""

    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, splits: int = 16) -> None:
        cfg = model.config
        if cfg.rotary_dim != cfg.head_dim:
            raise ValueError(f"the decode step rotates the whole head (rotary_pct 1.0); rotary_dim is {cfg.rotary_dim}")
        if cache.batch_size is None or cache.max_len < 2:
            raise ValueError("the decode step needs an allocated StaticKVCache")
        self.model, self.cache, self.splits = model, cache, splits
        device = model.device
        self.token = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.int32, device=device)  # where this step's k, v go
        self.start = torch.zeros(cache.batch_size, dtype=torch.int32, device=device)  # first real position per row
        self.cos = torch.empty(cache.max_len, cfg.head_dim, dtype=torch.float32, device=device)
        self.sin = torch.empty_like(self.cos)
        self.logn = None
        if cfg.use_logn_attn and cache.max_len > cfg.seq_length:
            self.logn = logn_scale(0, cache.max_len, cfg.seq_length, device)  # [S_max]
        self.set_alpha(1.0)

    def set_alpha(self, alpha: float) -> None:
        """Fill the rotary tables (fixed addresses) for the NTK alpha chosen at prefill."""
        cos, sin = self.model.transformer.rotary.table(alpha, self.cache.max_len, self.cos.device)
        self.cos.copy_(cos[: self.cache.max_len])
        self.sin.copy_(sin[: self.cache.max_len])

    def __call__(self) -> torch.Tensor:
        t = self.model.transformer
        eps = self.model.config.layer_norm_epsilon
        heads = self.model.config.num_attention_heads
        x = t.wte(self.token)  # [B, hidden]
        y, x = add_rms_norm(x, None, t.h[0].ln_1.weight, eps)
        for i, block in enumerate(t.h):
            keys, values, meta = self.cache.layer(i)  # [B, S_max, H, D]
            qkv = block.attn.c_attn(y)  # [B, 3 * hidden]
            q = rope_write_kv(qkv, self.cos, self.sin, self.logn, self.pos, keys, values, meta, heads)  # [B, H, D]
            o = decode_attention(q, keys, values, meta, self.pos, self.start, self.splits)  # [B, hidden]
            y, x = add_rms_norm(block.attn.c_proj(o), x, block.ln_2.weight, eps)  # x += attn; y = ln_2(x)
            m = block.mlp.c_proj(swiglu_mlp(block.mlp, y))
            norm = t.h[i + 1].ln_1.weight if i + 1 < len(t.h) else t.ln_f.weight
            y, x = add_rms_norm(m, x, norm, eps)  # x += mlp; y = next ln_1 (or ln_f)
        return self.model.lm_head(y)  # [B, V]


class CUDAGraphDecoder:
    """Prefill with the model's forward, then decode one captured CUDA graph replay per token.

    greedy=True puts argmax in the graph: the next token feeds the next step on the device and
    `generate_greedy` never syncs. Otherwise `step(ids)` returns the logits for sampling.
    graph=False runs the same step eagerly (models whose kernels cannot be captured).
    """

    def __init__(
        self, model: torch.nn.Module, cache: StaticKVCache, splits: int = 16, greedy: bool = False, graph: bool = True
    ) -> None:
        self.model, self.cache, self.greedy, self.use_graph = model, cache, greedy, graph
        self.step_fn = DecodeStep(model, cache, splits)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt [B, S] (left-padded with attention_mask) into the cache; last logits [B, V]."""
        self.cache.reset()
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=self.cache, logits_to_keep=1)
        alphas = set(self.cache.ntk_alpha or (1.0,))
        if len(alphas) != 1:
            raise NotImplementedError(f"rows with different NTK alphas {sorted(alphas)} cannot share a decode graph")
        step = self.step_fn
        step.set_alpha(alphas.pop())
        step.pos.fill_(self.cache.seq_len)
        pads = (attention_mask == 0).sum(1) if attention_mask is not None else torch.zeros_like(step.start)
        step.start.copy_(pads.to(torch.int32))
        return out.logits[:, -1]

    def _body(self) -> None:
        logits = self.step_fn()
        if self.greedy:
            self.step_fn.token.copy_(logits.argmax(-1))
        self.step_fn.pos.add_(1)
        self.logits = logits

    def _replay(self) -> None:
        """One step: the graph's replay, or (graph=False) the step itself."""
        if not self.use_graph:
            with torch.inference_mode():
                self._body()
            return
        if self.graph is None:
            self.capture()
        self.graph.replay()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one step (after two warm-up steps whose cache writes the next steps overwrite)."""
        if not self.use_graph:
            raise ValueError("this CUDAGraphDecoder was made with graph=False: its step runs eagerly")
        step = self.step_fn
        pos, token = step.pos.clone(), step.token.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        step.pos.copy_(pos)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        step.pos.copy_(pos)  # capturing ran nothing; restore what the warm-up advanced
        step.token.copy_(token)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed token_ids [B] at the next position; logits [B, V] (a buffer the next step reuses)."""
        if self.cache.seq_len >= self.cache.max_len:
            raise ValueError(f"the StaticKVCache is full ({self.cache.max_len} positions)")
        self.step_fn.token.copy_(token_ids)
        self._replay()
        self.cache.advance(1)
        return self.logits

    def generate_greedy(self, first_token: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy ids [B, steps] after first_token [B]; needs greedy=True; no host sync inside."""
        if not self.greedy:
            raise ValueError("generate_greedy needs CUDAGraphDecoder(greedy=True)")
        if self.cache.seq_len + steps > self.cache.max_len:
            raise ValueError(f"{steps} steps after {self.cache.seq_len} cached positions exceed {self.cache.max_len}")
        out = torch.empty(first_token.shape[0], steps, dtype=torch.long, device=first_token.device)
        self.step_fn.token.copy_(first_token)
        for i in range(steps):
            self._replay()  # writes the next token into step_fn.token
            out[:, i].copy_(self.step_fn.token)
        self.cache.advance(steps)
        return out

"""Qwen (v1) decoder: QWenLMHeadModel with the Hugging Face checkpoint's parameter names.

Pre-norm blocks of fused-QKV attention (half-rotation RoPE, dynamic NTK, LogN) and a SwiGLU
MLP, then ln_f and an untied lm_head (spec sections 2 and 4). No quantization or parallelism
here: those are applied to a finished model by module surgery.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GenerationConfig, QwenConfig
from ..generate import GenerationMixin
from .cache import KVCache
from .rope import RotaryEmbedding, apply_rotary, logn_scale, ntk_alpha

# A cache is anything with update(layer_idx, k, v) -> (keys, values) and an `ntk_alpha`
# attribute (KVCache, StaticKVCache), or with attention(layer_idx, q, k, v) -> out [B, S, H, D]
# instead of update: a cache that stores k, v and attends in its own layout (the serving
# engine's paged cache, engine/paged_cache.py), given rotated q and k.


@dataclass
class CausalLMOutput:
    """logits [B, S, vocab_size] in the model's dtype; the updated cache when use_cache."""

    logits: torch.Tensor
    past_key_values: KVCache | None = None


@dataclass
class AttentionInputs:
    """What every layer's attention needs for one forward, computed once per forward."""

    cos: torch.Tensor  # [B or 1, S, 1, rot_dim] float32
    sin: torch.Tensor  # [B or 1, S, 1, rot_dim] float32
    logn: torch.Tensor | None  # [B or 1, S, 1, 1] float32, or None when LogN is inactive
    mask: torch.Tensor | None  # bool, broadcastable to [B, H, S, T]; True = may attend
    is_causal: bool  # SDPA's own causal mask (only when S == T and there is no padding)


class RMSNorm(nn.Module):
    """weight * (x * rsqrt(mean(x^2) + eps)), normalised in float32 and cast back before the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class QWenAttention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None) -> torch.Tensor:
        B, S, _ = x.shape
        qkv = self.c_attn(x)  # [B, S, 3 * hidden]
        q, k, v = qkv.split(self.hidden_size, dim=-1)  # each [B, S, hidden]: Q, K, V in that order
        q = q.view(B, S, self.num_heads, self.head_dim)  # [B, S, H, D]
        k = k.view(B, S, self.num_heads, self.head_dim)  # [B, S, H, D]
        v = v.view(B, S, self.num_heads, self.head_dim)  # [B, S, H, D]

        q = apply_rotary(q, inputs.cos, inputs.sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)
        if inputs.logn is not None:  # after RoPE, queries only
            q = q * inputs.logn.type_as(q)
        if hasattr(cache, "attention"):  # a cache with its own layout (the engine's paged pool) attends itself
            out = cache.attention(self.layer_idx, q, k, v)  # [B, S, H, D]
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # [B, T, H, D], T = past + S
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),  # [B, H, S, D]
                k.transpose(1, 2),  # [B, H, T, D]
                v.transpose(1, 2),  # [B, H, T, D]
                attn_mask=inputs.mask,
                is_causal=inputs.is_causal,
                scale=1.0 / math.sqrt(self.head_dim),
            ).transpose(1, 2)  # [B, S, H, D]
        return self.c_proj(out.reshape(B, S, self.hidden_size))  # [B, S, hidden]


class QWenMLP(nn.Module):
    """SwiGLU: c_proj(w1(x) * silu(w2(x))); SiLU goes on w2 (the gate)."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        bias = not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, config.mlp_width, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, config.mlp_width, bias=bias)
        self.c_proj = nn.Linear(config.mlp_width, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), inputs, cache)
        return h + self.mlp(self.ln_2(h))


def attention_mask_for(
    attention_mask: torch.Tensor | None, past: int, q_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """SDPA (attn_mask, is_causal) for queries at KV positions past .. past+q_len-1.

    Causal in every case, chunked prefill against a cache included. With padding
    (attention_mask [B, past+q_len], 0 = pad) a query also always sees itself, so a pad
    query's row is never empty (no NaN); real queries never see pads.
    """
    if attention_mask is None:
        if q_len == 1:
            return None, False  # one new token sees the whole cache
        if past == 0:
            return None, True
    kv_len = past + q_len
    q_pos = torch.arange(past, kv_len, device=device)[:, None]  # [S, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, T]
    allowed = k_pos <= q_pos  # [S, T]
    if attention_mask is not None:
        real = attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # [B, 1, T]
        allowed = (allowed & real) | (k_pos == q_pos)  # [B, S, T]
        allowed = allowed[:, None]  # [B, 1, S, T]
    return allowed, False


def rotary_at(
    rotary: RotaryEmbedding, position_ids: torch.Tensor, alphas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, 1, rot_dim] float32 for explicit positions [B, S], each token with its own
    NTK alpha (alphas [B, S] float32): rows of the per-alpha tables, gathered per token."""
    end = int(position_ids.max()) + 1
    cos = sin = None
    for alpha in torch.unique(alphas).tolist():  # usually just 1.0
        table_cos, table_sin = rotary.table(alpha, end, position_ids.device)  # [n, rot_dim]
        c, s = table_cos[position_ids], table_sin[position_ids]  # [B, S, rot_dim]
        if cos is None:
            cos, sin = c, s
        else:
            pick = (alphas == alpha)[..., None]  # [B, S, 1]
            cos, sin = torch.where(pick, c, cos), torch.where(pick, s, sin)
    return cos[:, :, None], sin[:, :, None]  # [B, S, 1, rot_dim]


class QWenModel(nn.Module):
    """Embedding, blocks and ln_f: `transformer` in the checkpoint."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_emb_base)  # tables, not state

    def ntk_alphas(self, attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> tuple[float, ...]:
        """One NTK alpha per sample at prefill: from its unpadded length when a mask is given."""
        cfg = self.config
        if not cfg.use_dynamic_ntk or kv_len <= cfg.seq_length:
            return (1.0,) * batch  # no sample can be longer than kv_len
        if attention_mask is None:
            return (ntk_alpha(kv_len, cfg.seq_length),) * batch
        lengths = attention_mask.sum(dim=-1).tolist()  # real tokens per sample
        return tuple(ntk_alpha(int(n), cfg.seq_length) for n in lengths)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, S, hidden]; `cache` (if any) is updated in place."""
        if position_ids is None:
            inputs = self.contiguous_inputs(input_ids.shape, attention_mask, cache, input_ids.device)
        else:
            inputs = self.explicit_inputs(position_ids, attention_mask, cache)
        x = self.wte(input_ids)  # [B, S, hidden]
        for block in self.h:
            x = block(x, inputs, cache)
        return self.ln_f(x)

    def contiguous_inputs(
        self, shape: torch.Size, attention_mask: torch.Tensor | None, cache: KVCache | None, device: torch.device
    ) -> AttentionInputs:
        """The reference's layout: every row continues at KV index `past` (left padding counts)."""
        B, S = shape
        past = cache.seq_len if cache is not None else 0
        kv_len = past + S
        if past == 0:  # prefill: alpha is fixed here for every later step (reference behaviour)
            alphas = self.ntk_alphas(attention_mask, B, kv_len)
            if cache is not None:
                cache.ntk_alpha = alphas
        else:
            alphas = cache.ntk_alpha or (1.0,) * B
        cos, sin = self.rotary.cos_sin(past, kv_len, alphas, device)  # [B or 1, S, 1, rot_dim]
        logn = None
        if self.config.use_logn_attn and kv_len > self.config.seq_length:
            logn = logn_scale(past, kv_len, self.config.seq_length, device)[None, :, None, None]  # [1, S, 1, 1]
        mask, is_causal = attention_mask_for(attention_mask, past, S, device)
        return AttentionInputs(cos=cos, sin=sin, logn=logn, mask=mask, is_causal=is_causal)

    def explicit_inputs(
        self, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache | None
    ) -> AttentionInputs:
        """Ragged layouts (the serving engine's): each token at its own absolute position.

        The caller owns the layout, so it passes the 4-D mask for the keys the cache returns,
        and the NTK alphas it fixed per sequence as `cache.ntk_alpha` ([B, S] per token, or one
        per row); none means alpha 1. LogN scales each query by its own position.
        """
        B, S = position_ids.shape
        alphas = getattr(cache, "ntk_alpha", None)
        if alphas is None:
            alphas = torch.ones(B, S)
        alphas = torch.as_tensor(alphas, dtype=torch.float32, device=position_ids.device)
        alphas = alphas.reshape(B, -1).expand(B, S)  # [B, S]: per-row values broadcast over tokens
        cos, sin = rotary_at(self.rotary, position_ids, alphas)  # [B, S, 1, rot_dim]
        logn = None
        end = int(position_ids.max()) + 1
        if self.config.use_logn_attn and end > self.config.seq_length:
            scales = logn_scale(0, end, self.config.seq_length, position_ids.device)  # [end]
            logn = scales[position_ids][:, :, None, None]  # [B, S, 1, 1]
        return AttentionInputs(cos=cos, sin=sin, logn=logn, mask=attention_mask, is_causal=False)


class QWenLMHeadModel(GenerationMixin, nn.Module):
    """Qwen-7B(-Chat) causal LM. Build under torch.device("meta") and load with assign=True."""

    def __init__(self, config: QwenConfig, generation_config: GenerationConfig | None = None) -> None:
        super().__init__()
        if config.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not a Qwen v1 configuration: lm_head is untied")
        self.config = config
        self.generation_config = generation_config if generation_config is not None else GenerationConfig()
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = True,
        *,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits for input_ids [B, S] following the cached positions of past_key_values.

        attention_mask: [B, past + S], 1 for real tokens and 0 for left padding; it must be
        given on every step of a padded batch. past_key_values is updated in place and
        returned. logits_to_keep: compute logits for only the last n positions, or (a 1-D
        LongTensor) for those indices along S.
        position_ids [B, S]: absolute rotary positions for ragged layouts (e.g. several
        sequences packed in one row); attention_mask must then be a bool [B or 1, 1, S, T]
        mask (True = may attend) over the T keys that the cache returns for this step, or None
        with a cache that attends itself (see the note on caches at the top of this file).
        """
        self._check_inputs(input_ids, attention_mask, past_key_values, use_cache, position_ids)
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache(self.config.num_hidden_layers)
        hidden = self.transformer(input_ids, attention_mask, cache, position_ids)  # [B, S, hidden]
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]  # [B, n, hidden]
        elif logits_to_keep is not None:
            hidden = hidden[:, -logits_to_keep:]  # [B, n, hidden]
        return CausalLMOutput(logits=self.lm_head(hidden), past_key_values=cache)

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        use_cache: bool,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Raise ValueError naming what is wrong with the forward's arguments."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 2-D tensor [batch, seq], got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
        self._check_token_ids(input_ids)
        if cache is not None and not use_cache:
            raise ValueError("past_key_values was given with use_cache=False; pass use_cache=True to extend a cache")
        if position_ids is not None:
            self._check_explicit_layout(input_ids, attention_mask, position_ids, cache)
            return
        past = cache.seq_len if cache is not None else 0
        if past and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]} but the KV cache holds {cache.batch_size} rows")
        if attention_mask is not None:
            expected = (input_ids.shape[0], past + input_ids.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask must have shape [batch, past + seq] = {list(expected)} "
                    f"(it covers the cached tokens too), got {list(attention_mask.shape)}"
                )

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Ids in [0, vocab_size): an error naming the bad id on CPU; on an accelerator a device-side
        assert, so that the check does not wait for the device on every forward."""
        vocab = self.config.vocab_size
        if input_ids.device.type != "cpu":
            torch._assert_async(((input_ids >= 0) & (input_ids < vocab)).all(), f"input_ids must be in [0, {vocab})")
            return
        lo, hi = (int(t) for t in torch.aminmax(input_ids))  # one pass
        if lo < 0:
            raise ValueError(f"input_ids contains the negative token id {lo}; ids must be in [0, {vocab})")
        if hi >= vocab:
            raise ValueError(f"input_ids contains token id {hi}, but vocab_size is {vocab}")

    @staticmethod
    def _check_explicit_layout(
        input_ids: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor, cache: KVCache | None
    ) -> None:
        B, S = input_ids.shape
        if tuple(position_ids.shape) != (B, S) or position_ids.dtype.is_floating_point:
            raise ValueError(f"position_ids must be an integer tensor of input_ids' shape {[B, S]}, "
                             f"got {position_ids.dtype} {list(position_ids.shape)}")
        if hasattr(cache, "attention"):
            return  # that cache knows which keys each token sees: no mask
        if mask is None or mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[2] != S or mask.shape[0] not in (1, B):
            got = "None" if mask is None else f"{mask.dtype} {list(mask.shape)}"
            raise ValueError(f"with position_ids, attention_mask must be a bool [B or 1, 1, S={S}, keys] mask "
                             f"(True = may attend) for the keys the cache returns, got {got}")

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random init as the reference trains from: normal(0, initializer_range), every c_proj
        with std / sqrt(2 * layers), biases 0, RMSNorm weights 1. Deterministic for `seed`."""
        if self.device.type == "meta":
            raise ValueError("init_weights on a meta-device model: materialize it first (e.g. model.to_empty(device='cpu'))")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = math.sqrt(2 * self.config.num_hidden_layers) if name.endswith("c_proj") else 1.0
                module.weight.normal_(0.0, std / scale, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=gen)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

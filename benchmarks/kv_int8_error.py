"""Logit error of the int8 KV cache, ours (per token and head, rounded) against the reference's
scheme (Qwen's quantize_cache_v: one min/max per batch and head over each written chunk, truncated).

    PYTHONPATH=src:tests python benchmarks/kv_int8_error.py

CPU, a small random model with sharpened weights (tests/_models.py: attention is peaked, so cache
errors show up), bf16; a 100-token prefill then 100 single-token decode steps over a StaticKVCache.
Errors are against the same model run without a cache (exact keys and values).
"""
from __future__ import annotations

import torch
from _models import random_tiny_model

from qwen_int4.config import QwenConfig
from qwen_int4.model import static_cache
from qwen_int4.model.static_cache import StaticKVCache


def reference_scheme(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_cache_v as the reference does it, in our cache's layout: x [B, S, H, D] ->
    (q uint8 [B, S, H, D], scale [B, S, H], zero [B, S, H]), one range per (batch, head) of the chunk."""
    x32 = x.float()
    lo, hi = x32.amin(dim=(1, 3), keepdim=True), x32.amax(dim=(1, 3), keepdim=True)
    scale = ((hi - lo) / 255).clamp_min(1e-8)
    zero = -lo / scale
    q = torch.clamp(x32 / scale + zero, 0, 255).to(torch.uint8)  # truncation: no round()
    shape = x.shape[:3]
    return q, scale[..., 0].expand(shape).contiguous(), zero[..., 0].expand(shape).contiguous()


@torch.inference_mode()
def logits_error(model, ids: torch.Tensor, kv: str, prefill: int) -> tuple[float, float]:
    """(relative error, top-1 agreement) of cached decoding against the cache-free forward."""
    ref = model(ids).logits.double()
    cache = StaticKVCache.for_model(model, 1, ids.shape[1], kv)
    out = [model(ids[:, :prefill], past_key_values=cache).logits]
    out += [model(ids[:, i:i + 1], past_key_values=cache).logits for i in range(prefill, ids.shape[1])]
    got = torch.cat(out, 1).double()
    return float((got - ref).norm() / ref.norm()), float((got.argmax(-1) == ref.argmax(-1)).float().mean())


def main() -> None:
    torch.manual_seed(0)
    cfg = QwenConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=4, kv_channels=128,
                     intermediate_size=2 * 1376, seq_length=2048)
    model = random_tiny_model(cfg, seed=3).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, 200))
    for label, kv in (("bf16 cache", "fp16"), ("int8, per token and head (ours)", "int8")):
        err, agree = logits_error(model, ids, kv, 100)
        print(f"{label}: logits relative error {err:.2e}, top-1 agreement {agree:.3f}")
    ours = static_cache.quantize_kv_reference
    static_cache.quantize_kv_reference = reference_scheme
    try:
        err, agree = logits_error(model, ids, "int8", 100)
    finally:
        static_cache.quantize_kv_reference = ours
    print(f"int8, per chunk and head, truncated (the reference's scheme): logits relative error {err:.2e}, "
          f"top-1 agreement {agree:.3f}")


if __name__ == "__main__":
    main()

"""transformers' Qwen2ForCausalLM with Qwen-7B's shapes: the peer that `qwen-int4 bench` runs
beside our fast path, in the same process, when transformers is installed.

Qwen2 is Qwen (v1) renamed: fused qkv with bias -> q/k/v_proj with bias, c_proj -> o_proj
without bias, w2/w1 -> gate/up_proj, the same RMSNorm and half-rotation RoPE (no dynamic NTK
or LogN, inactive below seq_length anyway). Random weights, built on the GPU in bf16; decode is
timed through `generate()` (greedy, a static cache where this transformers version has one,
torch.compile off: its eager speed, what a user gets by default). Its eager step is bound by
the host (~35 ms a token on an H200 host), so `qwen-int4 bench` times the peer over at most
`--peer-max-tokens` tokens of each run (a static cache attends over its whole length every
step, so the speed does not depend on how far the run has got).
"""
from __future__ import annotations

import gc
import time

import torch

from ..config import QwenConfig


def transformers_problem() -> str | None:
    """Why the peer cannot run here (transformers missing or without Qwen2), or None."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed"
    if not hasattr(transformers, "Qwen2ForCausalLM"):
        return f"transformers {transformers.__version__} has no Qwen2ForCausalLM"
    return None


def qwen2_config(cfg: QwenConfig):
    """transformers.Qwen2Config with `cfg`'s shapes (MHA: as many KV heads as heads), no eos."""
    import transformers

    return transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=cfg.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_emb_base},
        rope_theta=cfg.rotary_emb_base,  # older versions' name
        max_position_embeddings=cfg.max_position_embeddings, use_sliding_window=False,
        tie_word_embeddings=False, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None, pad_token_id=0,  # random weights: never stop early
    )


@torch.no_grad()
def build_qwen2_peer(cfg: QwenConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """Random Qwen2ForCausalLM of `cfg`'s shapes, created on `device` in `dtype` (init there: seconds)."""
    import transformers

    hf_cfg = qwen2_config(cfg)
    with torch.device(device):
        try:
            model = transformers.Qwen2ForCausalLM._from_config(hf_cfg, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = transformers.Qwen2ForCausalLM._from_config(hf_cfg, torch_dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the peer's weights (one embedding row, not the table)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def _stop_after(length: int):
    """A StoppingCriteria ending generation once the rows are `length` tokens long."""
    import transformers

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            done = input_ids.shape[-1] >= length
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return transformers.StoppingCriteriaList([StopAfter()])


class PeerGenerate:
    """Greedy `generate()` of the peer with the same call every time; `cache` says which KV
    cache ran: "static" (cache_implementation="static") or "dynamic" when static failed."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache = "static"
        try:
            self(torch.tensor([[100]], device=model.device), 4)
        except Exception as exc:  # noqa: BLE001 - any failure of the static cache: fall back, say so
            self.cache, self.static_error = "dynamic", f"{type(exc).__name__}: {exc}"
            self(torch.tensor([[100]], device=model.device), 4)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, new_tokens: int, stop_after: int | None = None) -> torch.Tensor:
        """ids [1, S] + `new_tokens` greedy tokens; with stop_after, generation stops after that
        many (the static cache is still sized, and allocated, for new_tokens)."""
        extra = {"cache_implementation": "static"} if self.cache == "static" else {}
        made = new_tokens if stop_after is None else min(stop_after, new_tokens)
        if made < new_tokens:
            extra["stopping_criteria"] = _stop_after(ids.shape[1] + made)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, disable_compile=True, **extra)
        if out.shape[1] != ids.shape[1] + made:
            raise RuntimeError(f"the peer generated {out.shape[1] - ids.shape[1]} tokens, {made} were asked")
        return out


def _reset_peak() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peer_decode(run: PeerGenerate, tokens: int, timed: int | None = None) -> tuple[float, float]:
    """(seconds, peak GB) generating `tokens` tokens greedily from a 1-token prompt; with `timed`,
    only the first `timed` are generated (the cache is allocated for `tokens`: the same peak)."""
    _reset_peak()
    ids = torch.tensor([[100]], device=run.model.device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run(ids, tokens, stop_after=timed)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 1e9


def peer_encode_peak(run: PeerGenerate, tokens: int) -> float:
    """Peak GB of generate() over a `tokens` prompt with one new token."""
    _reset_peak()
    ids = torch.randint(0, run.model.config.vocab_size, (1, tokens), device=run.model.device)
    run(ids, 1)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9

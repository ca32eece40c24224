"""The Qwen (v1) model: module tree with the checkpoint's names, KV cache and rotary helpers."""
from .cache import KVCache
from .qwen import CausalLMOutput, QWenLMHeadModel, RMSNorm

__all__ = ["CausalLMOutput", "KVCache", "QWenLMHeadModel", "RMSNorm"]

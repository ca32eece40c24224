"""Serving engine: continuous batching over a paged KV cache (see engine.LLMEngine)."""
from .engine import EngineConfig, LLMEngine
from .request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]

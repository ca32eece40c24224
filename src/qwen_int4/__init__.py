"""qwen-int4: an inference engine for Qwen-7B-Chat and Qwen-7B-Chat-Int4."""
from .chat import decode_tokens, get_stop_words_ids, make_context
from .config import GenerationConfig, QuantConfig, QwenConfig
from .loader import AutoModelForCausalLM, load_model
from .tokenizer import AutoTokenizer, QWenTokenizer, StreamingDetokenizer

__all__ = [
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "GenerationConfig",
    "QWenTokenizer",
    "QuantConfig",
    "QwenConfig",
    "StreamingDetokenizer",
    "decode_tokens",
    "get_stop_words_ids",
    "load_model",
    "make_context",
]

"""Helpers for tests and benchmarks: random-weight checkpoints in the Hugging Face layout."""
from qwen_int4.testing.checkpoint import (
    QWEN_7B,
    make_test_checkpoint,
    read_checkpoint_tensors,
)

__all__ = ["QWEN_7B", "make_test_checkpoint", "read_checkpoint_tensors"]

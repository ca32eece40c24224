"""Moved to the package: src/qwen_int4/testing/gpu_model.py (also used by `qwen-int4 bench`).

Kept so that older notes' `import gpu_e2e` keeps working; new code imports qwen_int4.testing.gpu_model.
"""
from qwen_int4.testing.gpu_model import (  # noqa: F401
    bench_decode,
    build_dense_model,
    build_gptq_model,
    build_int4_model,
    build_model,
    encode_peak,
    kv_bytes_per_token,
    peak_memory,
    prefill_seconds,
    step_weight_bytes,
    time_once,
)

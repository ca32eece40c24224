"""Run a test file's own checks on the CPU through Triton's interpreter, in a fresh process
(TRITON_INTERPRET must be set before triton is imported)."""
import os
import subprocess
import sys

import pytest


def run_under_triton_interpreter(path: str, timeout: int) -> None:
    """Execute `python path` with TRITON_INTERPRET=1; fail with its output if it exits non-zero."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def hopper_ptx(fn, signature: dict, consts: dict, num_warps: int, **options) -> str:
    """sm_90 PTX of Triton kernel `fn`, compiled here without a GPU (Triton's own ptxas): integer and
    pointer arguments 16-divisible, as launches specialize them. Skips where ptxas is missing."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(signature))}
    src = triton.compiler.ASTSource(fn=fn, signature={**signature, **dict.fromkeys(consts, "constexpr")},
                                    constexprs=consts, attrs=attrs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **options}).asm["ptx"]
    except RuntimeError as exc:  # a Triton build without the NVIDIA backend's tools
        if "ptxas" in str(exc) and "not found" in str(exc):
            pytest.skip(str(exc))
        raise

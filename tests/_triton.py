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

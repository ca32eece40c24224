"""Programmatic Dependent Launch (PDL, Hopper sm_90+) for the decode steps' Triton kernels.

A kernel launched with `launch_pdl=True` may start while the previous kernel on the stream
still runs (as soon as every program of that one has called `gdc_launch_dependents`, or
exited); `gdc_wait()` then blocks until the previous grid has completed and its writes are
visible. Inside a CUDA graph the same holds for the captured edges. It hides the drain/fill
bubble between the ~190 small launches of a decode step and lets a GEMV stream its first
weights while the kernel before it finishes.

The rule every PDL kernel here follows (flag `PDL: tl.constexpr`):
* `gdc_launch_dependents()` first (the next kernel's programs get scheduled as this one's last
  wave drains);
* before `gdc_wait()`, only reads of constant data (weights, scales, zeros, norm weights);
* every read of data an earlier kernel wrote (activations, KV cache, positions) and every
  global write after it: a write could clobber a buffer the previous kernel still reads.
Each kernel of the chain waits, so the wait is transitive: once it returns, every earlier
kernel has finished.

`pdl_enabled(device)` says whether the launchers pass PDL: CUDA (not ROCm) with compute
capability >= 9, a Triton that has `launch_pdl` and the gdc intrinsics, not under
TRITON_INTERPRET=1, and the environment variable QWEN_INT4_PDL not "0" (read at every launch,
so one process can A/B it; captured graphs keep what they were captured with).
"""
from __future__ import annotations

import functools
import os

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without the gdc intrinsics: pdl_enabled is False
    gdc_launch_dependents = gdc_wait = None

ENV = "QWEN_INT4_PDL"


@functools.cache
def triton_supports_pdl() -> bool:
    """Whether the installed Triton has the gdc intrinsics and the `launch_pdl` launch option."""
    if gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    """Whether CUDA device `index` is an NVIDIA GPU of compute capability 9 or newer (cached)."""
    if torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use Programmatic Dependent Launch (module docstring)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get(ENV) == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton_supports_pdl() and _device_supports_pdl(index)

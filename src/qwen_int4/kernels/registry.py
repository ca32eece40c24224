"""Which kernel runs a GPTQ linear: a ranked list per device type, first capable one wins.

Three independent axes, as in vLLM: the checkpoint's quant config (QuantConfig), the layer's
buffers in the checkpoint layout (GPTQLinear: qweight, qzeros, scales, g_idx, bias), and the
kernel, chosen here once per layer after loading and given one chance to repack.

The kernel interface (subclass `GPTQKernel`):

    name: str                        unique; what QWEN_INT4_GPTQ_KERNEL / kernel= force
    can_implement(bits, group_size, desc_act, in_features, out_features, device, dtype)
        -> (ok, reason)              classmethod; reason says why not (or "" when ok);
                                     dtype is the model's activation dtype
    prepare(layer)                   once, after loading: repack the checkpoint buffers into
                                     non-persistent buffers named in `buffer_names`; may set a
                                     checkpoint buffer to None to save memory, but then
    checkpoint_tensors(layer)        must rebuild it ({name: tensor}), for state_dict()
    forward(layer, x) -> y           x [..., in_features] -> [..., out_features], x.dtype
    release(layer)                   undo prepare (the base class does it from the above)

Adding a kernel is one line: put "module:Class" into its device's list in RANKED_KERNELS, in
rank order. Modules are imported on first use, so a CPU-only install never imports Triton,
and a kernel whose module fails to import is skipped with that failure as its reason.
`torch-dequant` (the plain-PyTorch reference, dequantize then F.linear) is last in every
list and implements everything: it is both the fallback and the oracle of the others.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from qwen_int4.quant.gptq import GPTQLinear

KERNEL_ENV_VAR = "QWEN_INT4_GPTQ_KERNEL"
REFERENCE_KERNEL = "torch-dequant"

# Device type -> kernels in rank order ("module:Class"). The reference stays last.
RANKED_KERNELS: dict[str, list[str]] = {
    "cpu": [
        "qwen_int4.kernels.cpu_int4:TinygemmCPUKernel",
        "qwen_int4.kernels.registry:TorchDequantKernel",
    ],
    "cuda": [
        "qwen_int4.kernels.triton_gptq:TritonGPTQKernel",
        "qwen_int4.kernels.registry:TorchDequantKernel",
    ],
}
_FALLBACK = ["qwen_int4.kernels.registry:TorchDequantKernel"]  # any other device type


class GPTQKernel:
    """Base class of GPTQ linear kernels; see the module docstring for the contract."""

    name: ClassVar[str]
    buffer_names: ClassVar[tuple[str, ...]] = ()  # the non-persistent buffers `prepare` adds

    @classmethod
    def can_implement(
        cls,
        bits: int,
        group_size: int,
        desc_act: bool,
        in_features: int,
        out_features: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[bool, str]:
        raise NotImplementedError

    def prepare(self, layer: GPTQLinear) -> None:
        """Repack `layer`'s checkpoint buffers once (default: nothing to do)."""

    def forward(self, layer: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def checkpoint_tensors(self, layer: GPTQLinear) -> dict[str, torch.Tensor]:
        """Checkpoint buffers that `prepare` freed, rebuilt exactly (default: none were freed)."""
        return {}

    def release(self, layer: GPTQLinear) -> None:
        """Restore the checkpoint buffers and drop this kernel's own."""
        restored = self.checkpoint_tensors(layer)
        for name in self.buffer_names:
            if name in layer._buffers:
                delattr(layer, name)
        for name, tensor in restored.items():
            setattr(layer, name, tensor)


class TorchDequantKernel(GPTQKernel):
    """Reference: dequantize the whole weight (`dequantize_gptq`) every call, then F.linear.

    Works for every bits / group size / act-order / device / dtype; keeps nothing but the
    checkpoint buffers. ~0.12 s per 4096x11008 layer on the 2-core CPU: the oracle, not the
    fast path.
    """

    name = REFERENCE_KERNEL

    @classmethod
    def can_implement(cls, bits, group_size, desc_act, in_features, out_features, device, dtype):
        return True, ""

    def forward(self, layer: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
        w = layer.dequantized_weight(x.dtype)  # [K, N], a view of [N, K] memory
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, w.t(), bias)  # [..., N]


class NoKernelError(ValueError):
    """No kernel (or not the forced one) can run a layer; the message gives every reason."""


def _load(path: str) -> type[GPTQKernel]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _candidates(paths: list[str]) -> list[tuple[type[GPTQKernel] | None, str]]:
    """(class, "") or (None, why it cannot be imported) for each "module:Class" path."""
    out = []
    for path in paths:
        try:
            out.append((_load(path), ""))
        except Exception as exc:  # noqa: BLE001 - a missing optional dependency (triton) must not break CPU use
            out.append((None, f"cannot import {path}: {type(exc).__name__}: {exc}"))
    return out


def kernels_for(device_type: str) -> list[type[GPTQKernel]]:
    """The importable kernels of a device type's ranked list, in rank order."""
    return [cls for cls, _ in _candidates(RANKED_KERNELS.get(device_type, _FALLBACK)) if cls is not None]


def kernel_names() -> list[str]:
    """Names of every importable registered kernel, all devices, in first-seen rank order."""
    return list(dict.fromkeys(cls.name for device_type in RANKED_KERNELS for cls in kernels_for(device_type)))


def _kernel_by_name(name: str) -> type[GPTQKernel]:
    errors = []
    for paths in [*RANKED_KERNELS.values(), _FALLBACK]:
        for path in paths:  # import lazily: forcing a CPU kernel should not import Triton
            [(cls, error)] = _candidates([path])
            if cls is not None and cls.name == name:
                return cls
            errors += [error] if error else []
    failed = "".join(f"; {error}" for error in dict.fromkeys(errors))
    raise NoKernelError(f"unknown GPTQ kernel {name!r}; registered kernels: {kernel_names()}{failed}")


def select_kernel(
    bits: int,
    group_size: int,
    desc_act: bool,
    in_features: int,
    out_features: int,
    device: torch.device | str,
    dtype: torch.dtype,
    force: str | None = None,
) -> type[GPTQKernel]:
    """The first kernel of `device`'s ranked list that can implement the layer.

    force: a kernel name to use instead of ranking (default: $QWEN_INT4_GPTQ_KERNEL if set);
    it must be able to implement the layer. Raises NoKernelError naming every kernel's reason.
    """
    device = torch.device(device)
    args = (bits, group_size, desc_act, in_features, out_features, device, dtype)
    layer = (
        f"{in_features}->{out_features}, bits={bits}, group_size={group_size}, desc_act={desc_act}, "
        f"device={device}, dtype={dtype}"
    )
    source = "kernel="
    if force is None and os.environ.get(KERNEL_ENV_VAR):
        force, source = os.environ[KERNEL_ENV_VAR], f"${KERNEL_ENV_VAR}="
    if force:
        cls = _kernel_by_name(force)
        ok, reason = cls.can_implement(*args)
        if not ok:
            raise NoKernelError(f"GPTQ kernel {force!r} ({source}{force}) cannot run layer {layer}: {reason}")
        return cls
    reasons = []
    for cls, error in _candidates(RANKED_KERNELS.get(device.type, _FALLBACK)):
        if cls is None:
            reasons.append(error)
            continue
        ok, reason = cls.can_implement(*args)
        if ok:
            return cls
        reasons.append(f"{cls.name}: {reason}")
    raise NoKernelError(f"no GPTQ kernel can run layer {layer}:\n  " + "\n  ".join(reasons))

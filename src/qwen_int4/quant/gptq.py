"""GPTQ linear layers in the AutoGPTQ checkpoint layout (spec section 3).

Layout of one quantized linear with in_features K, out_features N, group size g,
G = K / g groups and pf = 32 / bits values per int32:

    qweight  int32 [K / pf, N]   codes packed along the *input* dim, low bits first
    qzeros   int32 [G, N / pf]   (zero - 1) packed along the *output* dim, low bits first
    scales   fp16  [G, N]
    g_idx    int32 [K]           group of input row k (k // g, or a permuted order with desc_act)
    bias     fp16  [N]           AutoGPTQ always stores one (all zeros for unbiased layers)

    W[k, n] = scales[g_idx[k], n] * (q[k, n] - (z'[g_idx[k], n] + 1))

`dequantize_gptq` is the plain-PyTorch reference of that formula: the "torch-dequant"
kernel and the oracle of the others. `pack_gptq` (writer side) and `unpack_int32` (under
`unpack_gptq` and `dequantize_gptq`) are the bit-packing code, `pack_codes_u8` /
`unpack_codes_u8` their byte-wise (little-endian) twins along the last dim for repacking.

Which kernel runs a layer is decided once, after loading: `prepare_quantized_layers(model)`
calls `GPTQLinear.process_weights_after_loading()`, which picks the first capable kernel of
the device's ranked list (qwen_int4.kernels.registry; force one with $QWEN_INT4_GPTQ_KERNEL
or kernel=) and lets it repack. state_dict() keeps giving the checkpoint layout.
"""
from __future__ import annotations

import ctypes
import math
import sys
from typing import Any

import torch
from torch import nn

from qwen_int4.config import QuantConfig
from qwen_int4.kernels.registry import GPTQKernel, TorchDequantKernel, select_kernel

SUPPORTED_BITS = (4, 8)

# The five linears of every block that AutoGPTQ quantizes (QwenGPTQForCausalLM.inside_layer_modules).
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def _pack_factor(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported GPTQ bits={bits}: supported are {SUPPORTED_BITS}")
    return 32 // bits


def _pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack non-negative ints < 2**bits along `dim` of a 2-D tensor, 32/bits per int32, low bits first."""
    pf = _pack_factor(bits)
    v = values.to(torch.int64)
    if dim == 1:
        v = v.t()
    rows, cols = v.shape
    if rows % pf:
        raise ValueError(f"cannot pack {rows} values into int32 words of {pf} (bits={bits}): not divisible")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device).view(1, pf, 1)
    words = (v.view(rows // pf, pf, cols) << shifts).sum(dim=1)  # [rows/pf, cols], values in [0, 2**32)
    words = words - ((words >> 31) << 32)  # reinterpret uint32 as int32
    words = words.to(torch.int32)
    return words.t().contiguous() if dim == 1 else words


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of packing: int32 words -> int32 values in [0, 2**bits), unpacked along `dim` (0 or 1)."""
    pf = _pack_factor(bits)
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if dim == 0:
        vals = (packed.unsqueeze(1) >> shifts.view(1, pf, 1)) & mask  # [R, pf, C]
        return vals.reshape(packed.shape[0] * pf, packed.shape[1])
    vals = (packed.unsqueeze(2) >> shifts.view(1, 1, pf)) & mask  # [R, C, pf]
    return vals.reshape(packed.shape[0], packed.shape[1] * pf)


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("byte-wise GPTQ (un)packing reads int32 words as bytes and needs a little-endian CPU")


def unpack_codes_u8(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [R, C] -> uint8 codes [R, C * 32/bits], unpacked along the last dim (as
    `unpack_int32(words, bits, dim=1)`, ~8x faster: byte-wise on little-endian words)."""
    _pack_factor(bits)
    _check_little_endian()
    rows, cols = words.shape
    octets = words.contiguous().view(torch.uint8).view(rows, cols * 4)  # byte j of a word = codes 2j, 2j+1 (4-bit)
    if bits == 8:
        return octets.clone()
    return torch.stack([octets & 15, octets >> 4], dim=-1).view(rows, cols * 8)


def pack_codes_u8(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `unpack_codes_u8`: uint8 codes [R, K] -> int32 words [R, K * bits/32]."""
    _pack_factor(bits)
    _check_little_endian()
    rows = codes.shape[0]
    octets = codes.contiguous() if bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)  # [R, K*bits/8]
    return octets.contiguous().view(torch.int32).view(rows, -1)


def pack_gptq(w_int: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack codes and zero points into AutoGPTQ's (qweight, qzeros).

    w_int: ints [K, N] in [0, 2**bits). zeros: the quantizer's zero points [G, N] in
    [1, 2**bits]; like AutoGPTQ's pack(), zeros - 1 is what gets stored.
    Returns qweight int32 [K*bits/32, N] and qzeros int32 [G, N*bits/32].
    """
    _pack_factor(bits)  # validates bits
    maxq = (1 << bits) - 1
    if w_int.dim() != 2 or zeros.dim() != 2 or w_int.shape[1] != zeros.shape[1]:
        raise ValueError(f"pack_gptq wants w_int [K, N] and zeros [G, N], got {tuple(w_int.shape)} and {tuple(zeros.shape)}")
    if w_int.numel() and (int(w_int.min()) < 0 or int(w_int.max()) > maxq):
        raise ValueError(f"codes must lie in [0, {maxq}] for bits={bits}, found [{int(w_int.min())}, {int(w_int.max())}]")
    if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > maxq + 1):
        raise ValueError(
            f"zero points must lie in [1, {maxq + 1}] for bits={bits} (GPTQ stores zero - 1), "
            f"found [{int(zeros.min())}, {int(zeros.max())}]"
        )
    return _pack_int32(w_int, bits, dim=0), _pack_int32(zeros.to(torch.int64) - 1, bits, dim=1)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_gptq`: (codes int32 [K, N], zero points int32 [G, N], already + 1)."""
    return unpack_int32(qweight, bits, dim=0), unpack_int32(qzeros, bits, dim=1) + 1


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """W [K, N] = scales[g_idx] * (q - zeros[g_idx]), in `dtype` (default: scales' dtype).

    The product is exact in float32 (a small int times an fp16 scale) and rounded once to
    `dtype`. The result is a [K, N] view of [N, K]-contiguous memory (nn.Linear's layout):
    only the small packed words are transposed, and x @ W then runs as a plain GEMM (CPU
    fp16/bf16 GEMM is ~100x slower on a [K, N]-contiguous weight). Output rows are made
    `block_rows` at a time (default: 128 on CPU, where cache-sized temporaries make it 2x
    faster, all at once elsewhere).
    """
    words = qweight.t().contiguous()  # [N, K/pf]
    zeros = (unpack_int32(qzeros, bits, dim=1) + 1).t().contiguous()  # [N, G]
    scale = scales.t().to(torch.float32).contiguous()  # [N, G]
    n_out, k_in, groups = words.shape[0], words.shape[1] * (32 // bits), zeros.shape[1]
    g = g_idx.to(device=words.device, dtype=torch.int64)
    # contiguous groups (no act-order): broadcast each group's zero/scale over its g rows;
    # otherwise gather them per input row through g_idx
    in_order = k_in % groups == 0 and torch.equal(g, torch.arange(k_in, device=g.device) // (k_in // groups))
    out = torch.empty(n_out, k_in, dtype=dtype or scales.dtype, device=words.device)
    if block_rows is None:
        block_rows = 128 if words.device.type == "cpu" else n_out
    for r in range(0, n_out, block_rows):
        rows = slice(r, r + block_rows)
        q = unpack_int32(words[rows], bits, dim=1)  # [n, K] codes
        if in_order:
            q3 = q.view(q.shape[0], groups, k_in // groups)  # [n, G, g]
            z, sc = zeros[rows].unsqueeze(2), scale[rows].unsqueeze(2)  # [n, G, 1]
        else:
            q3 = q.view(q.shape[0], 1, k_in)  # [n, 1, K]
            z, sc = zeros[rows][:, g].unsqueeze(1), scale[rows][:, g].unsqueeze(1)  # [n, 1, K]
        q3.sub_(z)
        w = q3.to(torch.float32)
        out[rows] = w.mul_(sc).view(q.shape)
    return out.t()  # [K, N]


def act_order_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Input-row order that makes every group contiguous (None: already k // group_size)."""
    k_in = g_idx.numel()
    g = g_idx.to(torch.int64)
    in_order = torch.arange(k_in, device=g.device) // group_size
    if torch.equal(g, in_order):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], in_order):
        counts = torch.bincount(g).tolist()
        raise ValueError(
            f"g_idx must give every group exactly {group_size} input rows (AutoGPTQ act-order does); "
            f"found group sizes {sorted(set(counts))}: the checkpoint's g_idx is not a GPTQ act-order"
        )
    return perm


def group_params(w: torch.Tensor, bits: int, sym: bool, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the groups of `w` reduced over `dim`, as GPTQ's quantizer computes them.

    sym: scale = 2*max|w|/maxq and zero = (maxq+1)/2; asym: the group's [min(w,0), max(w,0)]
    range, zero clamped to >= 1 (the "zeros minus one" format cannot store 0). The scale comes
    back already rounded to fp16 (what the checkpoint stores), floored at fp16's smallest
    subnormal so that it never rounds to 0; both float32.
    """
    maxq = (1 << bits) - 1
    if sym:
        scale = 2 * w.abs().amax(dim=dim) / maxq
        scale[scale == 0] = 2 / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo = w.amin(dim=dim).clamp(max=0)
        hi = w.amax(dim=dim).clamp(min=0)
        flat = (lo == 0) & (hi == 0)
        lo[flat], hi[flat] = -1.0, 1.0
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale).clamp(1, maxq)
    return scale.half().float().clamp_min(2.0**-24), zero


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    sym: bool = True,
    perm: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of a float `weight` [N, K] (nn.Linear layout) to GPTQ tensors.

    Scales and zeros follow the GPTQ Quantizer: sym uses scale = 2*max|w|/maxq and
    zero = (maxq+1)/2 (stored 7 / 127); asym uses the group's [min(w,0), max(w,0)] range
    (zero clamped to >= 1, since the "zeros minus one" format cannot store 0).
    desc_act: columns are grouped in the order `perm` (default: a random permutation from
    `seed`, standing in for the Hessian order), and g_idx[k] = position of k in perm // group_size,
    as AutoGPTQ's act-order does. Returns dict(qweight, qzeros, scales fp16, g_idx int32).
    """
    _pack_factor(bits)  # validates bits
    maxq = (1 << bits) - 1
    n_out, k_in = weight.shape
    gs = k_in if group_size == -1 else group_size
    if gs <= 0 or k_in % gs:
        raise ValueError(f"group_size {group_size} does not divide in_features {k_in}")
    if desc_act:
        if perm is None:
            perm = torch.randperm(k_in, generator=torch.Generator().manual_seed(seed))
        if sorted(perm.tolist()) != list(range(k_in)):
            raise ValueError(f"perm must be a permutation of range({k_in})")
    else:
        perm = torch.arange(k_in)
    groups = weight.detach().float().t()[perm].reshape(k_in // gs, gs, n_out)  # [G, g, N] in perm order
    scale, zero = group_params(groups, bits, sym, dim=1)  # each [G, N]; scale fp16-exact
    scales = scale.half()
    q_perm = torch.round(groups / scales.float().unsqueeze(1)) + zero.unsqueeze(1)  # [G, g, N]
    q_perm = q_perm.clamp(0, maxq).to(torch.int32).reshape(k_in, n_out)
    q = torch.empty_like(q_perm)
    q[perm] = q_perm  # back to the original row order
    g_idx = torch.empty(k_in, dtype=torch.int32)
    g_idx[perm] = torch.arange(k_in, dtype=torch.int32) // gs
    qweight, qzeros = pack_gptq(q, zero.to(torch.int32), bits)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


class GPTQLinear(nn.Module):
    """nn.Linear semantics over GPTQ-packed weights (checkpoint layout), run by a kernel.

    Until `process_weights_after_loading()` the reference path runs (dequantize per call);
    after it, the selected kernel's repacked buffers do. Either way no float copy of the
    weight is kept, and state_dict() returns the checkpoint tensors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        desc_act: bool = False,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        pf = _pack_factor(bits)
        gs = in_features if group_size == -1 else group_size
        if gs <= 0:
            raise ValueError(f"group_size must be positive or -1, got {group_size}")
        if in_features % gs:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        if in_features % pf or out_features % pf:
            raise ValueError(
                f"in_features {in_features} and out_features {out_features} must be multiples of {pf} for {bits}-bit packing"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.desc_act = bits, group_size, desc_act
        self.kernel: GPTQKernel | None = None
        self._kernel_device: str | None = None
        groups = math.ceil(in_features / gs)
        ints = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features // pf, out_features, **ints))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // pf, **ints))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, **ints) // gs)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def process_weights_after_loading(self, kernel: str | None = None, dtype: torch.dtype | None = None) -> str:
        """Select the kernel for this layer's device and `dtype` (the activations'; default: the
        scales' dtype, fp16 as stored) and let it repack once. kernel: force one by name
        (default: $QWEN_INT4_GPTQ_KERNEL, else the ranked choice). Calling it again (after
        .to(device), or to switch kernels) first restores the checkpoint layout. Returns the name.
        """
        self.release_kernel()
        device = self.scales.device
        cls = select_kernel(
            self.bits, self.group_size, self.desc_act, self.in_features, self.out_features,
            device, dtype or self.scales.dtype, force=kernel,
        )
        chosen = cls()
        chosen.prepare(self)
        self.kernel, self._kernel_device = chosen, device.type
        return chosen.name

    def release_kernel(self) -> None:
        """Back to the checkpoint layout and the reference path (no-op when unprepared)."""
        if self.kernel is not None:
            kernel, self.kernel, self._kernel_device = self.kernel, None, None
            kernel.release(self)

    def checkpoint_tensor(self, name: str) -> torch.Tensor:
        """A checkpoint buffer, rebuilt by the kernel if it freed it (qweight for tinygemm-cpu; qweight,
        qzeros and scales for triton-gptq)."""
        tensor = getattr(self, name)
        if tensor is None and self.kernel is not None:
            tensor = self.kernel.checkpoint_tensors(self)[name]
        return tensor

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as [K, N] float (a temporary; not stored)."""
        qweight, qzeros, scales = (self.checkpoint_tensor(n) for n in ("qweight", "qzeros", "scales"))
        return dequantize_gptq(qweight, qzeros, scales, self.g_idx, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            return _REFERENCE.forward(self, x)
        if x.device.type != self._kernel_device:
            raise RuntimeError(
                f"GPTQLinear was prepared for {self._kernel_device} by kernel {self.kernel.name!r} but got input "
                f"on {x.device}; call prepare_quantized_layers(model) again after moving the model"
            )
        return self.kernel.forward(self, x)  # [..., N]

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None:  # checkpoint buffers the kernel freed, rebuilt exactly
            for name, tensor in self.kernel.checkpoint_tensors(self).items():
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # new checkpoint tensors make any repacked copy stale: back to the checkpoint layout first
        self.release_kernel()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, desc_act={self.desc_act}, bias={self.bias is not None}, "
            f"kernel={self.kernel.name if self.kernel else None}"
        )


_REFERENCE = TorchDequantKernel()


def prepare_quantized_layers(
    model: nn.Module, kernel: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, int]:
    """Run `process_weights_after_loading` on every GPTQLinear of `model` (the loader's last step).

    dtype: the activations' dtype (default: the model's first float parameter's, e.g. fp16
    for the Int4 release on CPU). kernel: force one by name (default: $QWEN_INT4_GPTQ_KERNEL).
    Returns {kernel name: number of layers}.
    """
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, GPTQLinear):
            try:
                chosen = module.process_weights_after_loading(kernel=kernel, dtype=dtype)
            except ValueError as exc:
                raise type(exc)(f"{name}: {exc}") from exc
            counts[chosen] = counts.get(chosen, 0) + 1
            _trim_malloc_heap()
    return counts


def _trim_malloc_heap() -> None:
    """Repacking frees large temporaries between the kept buffers; glibc keeps such holes in
    its heap (2 GB for 7B with tinygemm-cpu) until malloc_trim hands them back to the OS.
    Trimmed after every layer, so they never pile up (the peak RSS of loading stays low)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def replace_linear_with_gptq(model: nn.Module, quant_config: QuantConfig) -> nn.Module:
    """Swap c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj of every block for GPTQLinear, in place.

    The new layers are created on the device of the layers they replace (meta stays meta),
    always with a bias, as AutoGPTQ stores one for every quantized layer.
    """
    for i, block in enumerate(model.transformer.h):
        for path in QUANTIZED_LINEARS:
            parent_path, attr = path.rsplit(".", 1)
            parent = block.get_submodule(parent_path)
            old = getattr(parent, attr)
            name = f"transformer.h.{i}.{path}"
            if not isinstance(old, nn.Linear):
                raise TypeError(f"{name} is {type(old).__name__}, expected nn.Linear")
            try:
                new = GPTQLinear(
                    old.in_features,
                    old.out_features,
                    quant_config.bits,
                    quant_config.group_size,
                    quant_config.desc_act,
                    bias=True,
                    device=old.weight.device,
                )
            except ValueError as exc:
                raise ValueError(f"cannot quantize {name} ({old.in_features} -> {old.out_features}): {exc}") from exc
            setattr(parent, attr, new)
    return model

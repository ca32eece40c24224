"""The Triton GPTQ kernels' weight layout, made once at load time from the checkpoint's.

Checkpoint (AutoGPTQ): qweight int32 [K / P, N] (P = 32 / bits values per word, packed along
K), qzeros int32 [G, N / P] (zero - 1), scales fp16 [G, N], g_idx [K].

Kernel layout (`GPTQWeights`), one row per output feature like nn.Linear's weight:

* qweight int32 [N, K / P]. The K axis is cut into units of U = 128 input rows (or the group
  size when it is 32 or 64; a group holds one or more units); a unit has W = U / P words.
  The P value slots of a word form H = P / 2 pairs: slot j = h H + p (half h = 0, 1; pair p).
  Word w of a unit holds, in slot j (bits j*bits ..), input row
      unit_start + p * 2W + 2w + h.
  So the two values of pair p (slots p and H + p, 16 bits apart) multiply two adjacent values
  of x, which one 32-bit load reads as a half2; and pair p of consecutive words covers a
  contiguous run of x. Unpacking a pair is one shift and one LOP3 for both halves.
* scales [N, G] (fp16, as stored) and zeros uint8 [N, G] (zero - 1, as stored): one row per
  output feature, so a GEMV program reads its rows' scales contiguously.
* perm int32 [K] or None (act-order, desc_act=True): packed row r holds input row perm[r];
  rows are sorted by group, so every group is contiguous.

The checkpoint tensors are not kept: `to_checkpoint` rebuilds them bit for bit (state_dict()).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_int4.quant.gptq import act_order_perm, pack_codes_u8, unpack_codes_u8

UNIT = 128  # input rows per interleave unit, unless the group is smaller
SUPPORTED_BITS = (4, 8)


def unit_rows(group_size: int) -> int:
    """Input rows per interleave unit for this group size (a power of two that divides it)."""
    return UNIT if group_size % UNIT == 0 else group_size


def check_gptq_shapes(bits: int, group_size: int, in_features: int, out_features: int) -> tuple[bool, str]:
    """(ok, reason): whether the Triton kernels implement a GPTQ linear of this configuration."""
    gs = in_features if group_size == -1 else group_size
    if bits not in SUPPORTED_BITS:
        return False, f"the Triton GPTQ kernels implement {SUPPORTED_BITS} bits, got bits={bits}"
    if unit_rows(gs) not in (32, 64, UNIT) or in_features % gs:
        return False, (f"the Triton GPTQ kernels need a group size of 32, 64 or a multiple of {UNIT} that divides "
                       f"in_features, got {gs} for {in_features}")
    if out_features % 8:
        return False, f"out_features must be a multiple of 8, got {out_features}"
    return True, ""


@dataclass
class GPTQWeights:
    """One GPTQ linear in the kernels' layout (module docstring)."""

    qweight: torch.Tensor  # int32 [N, K / P]
    scales: torch.Tensor  # [N, G]
    zeros: torch.Tensor  # uint8 [N, G], zero - 1
    perm: torch.Tensor | None  # int32 [K]
    bias: torch.Tensor | None  # [N]
    group_size: int
    bits: int

    @property
    def values_per_word(self) -> int:
        return 32 // self.bits

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * self.values_per_word

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def unit(self) -> int:
        return unit_rows(self.group_size)


def _interleave(codes: torch.Tensor, bits: int, unit: int) -> torch.Tensor:
    """codes [N, K] (packed row order) -> words [N, K / P] in the unit interleave."""
    n, k = codes.shape
    p = 32 // bits
    by_row = codes.view(n, k // unit, p // 2, unit // p, 2)  # [N, units, pair p, word w, half h]
    return pack_codes_u8(by_row.permute(0, 1, 3, 4, 2).reshape(n, k), bits)  # word w: slots (h, p)


def _deinterleave(words: torch.Tensor, bits: int, unit: int) -> torch.Tensor:
    """Inverse of `_interleave`: words [N, K / P] -> codes [N, K] (packed row order)."""
    n = words.shape[0]
    codes = unpack_codes_u8(words, bits)  # [N, K]
    k = codes.shape[1]
    p = 32 // bits
    by_slot = codes.view(n, k // unit, unit // p, 2, p // 2)  # [N, units, word w, half h, pair p]
    return by_slot.permute(0, 1, 4, 2, 3).reshape(n, k)


def to_kernel_layout(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> GPTQWeights:
    """Checkpoint tensors -> `GPTQWeights`. Raises ValueError when the configuration is not
    supported or g_idx is not an act-order of groups of `group_size` rows."""
    k_in, n_out = qweight.shape[0] * (32 // bits), qweight.shape[1]
    gs = k_in if group_size == -1 else group_size
    ok, reason = check_gptq_shapes(bits, gs, k_in, n_out)
    if not ok:
        raise ValueError(reason)
    perm = act_order_perm(g_idx.to(qweight.device), gs)
    codes = unpack_codes_u8(qweight.t().contiguous(), bits)  # [N, K] uint8, input row order
    if perm is not None:
        codes = codes.index_select(1, perm)
    words = _interleave(codes, bits, unit_rows(gs))
    del codes
    zeros = unpack_codes_u8(qzeros, bits).t().contiguous()  # [N, G] uint8, zero - 1
    perm = perm.to(torch.int32) if perm is not None else None
    return GPTQWeights(words, scales.t().contiguous(), zeros, perm, bias, gs, bits)


def to_checkpoint(w: GPTQWeights) -> dict[str, torch.Tensor]:
    """Inverse of `to_kernel_layout`: {qweight, qzeros, scales}, bit for bit."""
    codes = _deinterleave(w.qweight, w.bits, w.unit)  # [N, K], packed row order
    if w.perm is not None:
        codes = codes.index_select(1, torch.argsort(w.perm.long()))  # back to input row order
    qweight = pack_codes_u8(codes, w.bits).t().contiguous()  # [K / P, N]
    qzeros = pack_codes_u8(w.zeros.t().contiguous(), w.bits)  # [G, N / P]
    return {"qweight": qweight, "qzeros": qzeros, "scales": w.scales.t().contiguous()}


def dequantize_reference(w: GPTQWeights, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W [N, K] (nn.Linear layout, input row order) = s (q - z), exact in float32, rounded once:
    the oracle of the kernels, computed from the kernel layout itself."""
    codes = _deinterleave(w.qweight, w.bits, w.unit).float()  # [N, K], packed row order
    n, k = codes.shape
    groups = k // w.group_size
    z = w.zeros.float() + 1  # [N, G]
    s = w.scales.float()
    out = ((codes.view(n, groups, -1) - z[:, :, None]) * s[:, :, None]).view(n, k)
    if w.perm is not None:
        out = torch.empty_like(out).index_copy_(1, w.perm.long(), out)  # packed row r -> input row perm[r]
    return out.to(dtype)

"""Rotary position embedding, dynamic NTK alpha and LogN query scaling (spec section 4).

Everything here is computed in float32 on the device of the tensors it serves, lazily,
so a model built on the meta device holds no tables. The rotary position of a token is
its index in the (left-padded) KV sequence, as in the reference; position_ids do not exist.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha for a context of `length` tokens: 1, 3, 7, 15, ... as length doubles.

    context_value = log2(length / seq_length) + 1; alpha = max(2^ceil(context_value) - 1, 1).
    """
    context_value = math.log(max(length, 1) / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def inv_freq(dim: int, base: float, alpha: float) -> torch.Tensor:
    """Inverse frequencies [dim/2] (float32) with the NTK-scaled base base * alpha^(dim/(dim-2))."""
    scaled_base = base * alpha ** (dim / (dim - 2))
    return 1.0 / (scaled_base ** (torch.arange(0, dim, 2).float() / dim))


def logn_scale(start: int, end: int, seq_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """LogN query scales [end - start] (float32) for 0-based key positions start..end-1.

    Position p gets log(p+1)/log(seq_length) when p+1 > seq_length, else 1.
    """
    i = torch.arange(start + 1, end + 1, dtype=torch.float64, device=device)  # 1-based positions
    scale = torch.where(i > seq_length, i.log() / math.log(seq_length), torch.ones_like(i))
    return scale.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (GPT-NeoX / non-interleaved convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, S, H, D] in float32; the rest pass through.

    cos, sin: [B or 1, S, 1, rot_dim] float32. Returns a new contiguous tensor of x's dtype,
    equal bit for bit to x_rot * cos + rotate_half(x_rot) * sin computed in float32: per half,
    out1 = x1 c1 - x2 s1 and out2 = x2 c2 + x1 s2 (same products, same sums), written half by
    half into the output so that at most four half-size float32 temporaries are alive at once
    (a prefill's peak GPU memory is set here).
    """
    rot_dim = cos.shape[-1]
    half = rot_dim // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [B, S, H, D]
    x1, x2 = x[..., :half].float(), x[..., half:rot_dim].float()  # [B, S, H, rot_dim/2]; views if x is fp32
    c1, c2 = cos[..., :half], cos[..., half:]
    s1, s2 = sin[..., :half], sin[..., half:]
    out[..., :half] = (x1 * c1).sub_(x2 * s1)  # x1 c1 + (-x2) s1; in place on fresh products only
    out[..., half:rot_dim] = (x2 * c2).add_(x1 * s2)  # x2 c2 + x1 s2
    out[..., rot_dim:] = x[..., rot_dim:]
    return out


class RotaryEmbedding:
    """cos/sin tables per (device, alpha), grown on demand; not module state, never saved.

    A table for `alpha` covers positions 0..n-1 with n = max(2 * needed, 16), as the reference.
    """

    def __init__(self, dim: int, base: float) -> None:
        self.dim = dim
        self.base = base
        self._tables: dict[tuple[torch.device, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, alpha: float, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, dim] float32 on `device` for positions 0..n-1, n >= length."""
        key = (torch.device(device), float(alpha))
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            n = max(2 * length, 16)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq(self.dim, self.base, alpha))  # [n, dim/2]
            emb = torch.cat((freqs, freqs), dim=-1).to(device)  # [n, dim]
            cached = (emb.cos(), emb.sin())
            self._tables[key] = cached
        return cached

    def cos_sin(
        self, start: int, end: int, alphas: Sequence[float], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for KV positions start..end-1, each [1 or len(alphas), end-start, 1, dim] float32.

        One row when all samples share an alpha (the usual case), else one row per sample.
        """
        distinct = sorted(set(alphas))
        per_alpha = {}
        for alpha in distinct:
            cos, sin = self.table(alpha, end, device)
            per_alpha[alpha] = (cos[start:end], sin[start:end])  # [S, dim]
        rows = [per_alpha[distinct[0]]] if len(distinct) == 1 else [per_alpha[a] for a in alphas]
        cos = torch.stack([c for c, _ in rows])[:, :, None, :]  # [B or 1, S, 1, dim]
        sin = torch.stack([s for _, s in rows])[:, :, None, :]  # [B or 1, S, 1, dim]
        return cos, sin

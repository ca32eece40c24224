"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantize a float Qwen model block by block.

For one linear y = x W^T (W [N, K]) GPTQ minimises ||X W^T - X Ŵ^T||^2 over calibration
inputs X. With H = 2 X^T X / T it quantizes the K input columns one at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the upper Cholesky
factor U of H^-1 (the OBS update, in the Cholesky form that is stable at 7B scale):

    err = (w_c - ŵ_c) / U[c, c]          W[:, c:] -= err ⊗ U[c, c:]

Updates inside a block of `block_size` columns are applied at once; those to later blocks
lazily, as one GEMM per block. A group's scale and zero are fixed when its first column is
reached, from the weights as updated so far. Act-order (desc_act) visits columns by
descending diag(H). Scales, zeros, codes and g_idx follow `quantize_rtn` (AutoGPTQ's
convention), so with H = identity GPTQ returns exactly round-to-nearest.

The model driver runs the calibration samples through one block at a time on `device`,
quantizes its linears in AutoGPTQ's true-sequential order (each group calibrated on the
outputs of the already-quantized layers before it) and feeds the quantized block's outputs to
the next block. Only the current block and its activations are on the device.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qwen_int4.checkpoint_io import check_output_dir
from qwen_int4.config import QuantConfig, QwenConfig
from qwen_int4.loader import load_model, resolve_device, resolve_model_dir
from qwen_int4.model.qwen import AttentionInputs, QWenLMHeadModel
from qwen_int4.quant.calibration import load_calibration
from qwen_int4.quant.gptq import (
    QUANTIZED_LINEARS,
    dequantize_gptq,
    group_params,
    pack_gptq,
    quantize_rtn,
)
from qwen_int4.quant.writer import expected_tensors, write_gptq_checkpoint
from qwen_int4.tokenizer import QWenTokenizer

# AutoGPTQ QwenGPTQForCausalLM.inside_layer_modules: quantized in this order (true_sequential);
# layers of one group share their input and are calibrated together.
SEQUENTIAL_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))


@dataclass(frozen=True)
class GPTQSettings:
    """What to quantize to and how. method='rtn' is the round-to-nearest baseline (no calibration)."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    damp_percent: float = 0.01
    sym: bool = True
    block_size: int = 128
    method: str = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (one group per column), got {self.group_size}")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in [0, 1), got {self.damp_percent} (the release uses 0.01)")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"method must be 'gptq' or 'rtn', got {self.method!r}")
        if self.method == "rtn" and self.desc_act:
            raise ValueError("desc_act needs a Hessian to order the columns: use it with method='gptq'")


# ---------------------------------------------------------------- one weight matrix


def inverse_hessian_cholesky(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = H^-1); H is modified."""
    hessian.diagonal().add_(damp_percent * hessian.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the Hessian is not positive definite with damp_percent={damp_percent}: "
            "raise damp_percent (e.g. 0.1) or give more calibration samples"
        )
    return upper


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    sym: bool = True,
    block_size: int = 128,
) -> dict[str, torch.Tensor]:
    """GPTQ of one weight [N, K] (nn.Linear layout) against the Hessian H [K, K] = 2 X^T X / T.

    Returns the AutoGPTQ tensors qweight, qzeros, scales (fp16), g_idx (int32) on the
    weight's device, plus `weight`: the quantized weight [N, K] float32, exactly what
    `dequantize_gptq` gives for those tensors, and `loss`: the GPTQ objective
    sum((w - ŵ)^2 / U[c, c]^2) / 2 (proportional to the output error on the calibration set).
    Columns whose diag(H) is 0 (never active) get weight 0.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    maxq = (1 << bits) - 1
    W = weight.detach().to(torch.float32).clone()  # [N, K]
    n_out, k_in = W.shape
    gs = k_in if group_size == -1 else group_size
    if gs <= 0 or k_in % gs:
        raise ValueError(f"group_size {group_size} does not divide in_features {k_in}")
    if tuple(hessian.shape) != (k_in, k_in):
        raise ValueError(f"the Hessian must be [{k_in}, {k_in}] for a weight [{n_out}, {k_in}], got {list(hessian.shape)}")
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if desc_act:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(k_in, device=W.device)
    U = inverse_hessian_cholesky(H, damp_percent)  # [K, K] upper
    del H

    codes = torch.empty(n_out, k_in, dtype=torch.float32, device=W.device)  # in visiting order
    scales = torch.empty(k_in // gs, n_out, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    for i1 in range(0, k_in, block_size):
        i2 = min(i1 + block_size, k_in)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]  # views: W1 is updated in place
        err1 = torch.zeros(n_out, i2 - i1, dtype=torch.float32, device=W.device)
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # entering a group: its columns as updated so far (pending block updates applied)
                ahead = W[:, i2:col + gs] - err1[:, :i] @ U[i1:col, i2:col + gs]
                scale, zero = group_params(torch.cat([W1[:, i:col + gs - i1], ahead], dim=1), bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            w = W1[:, i].clone()
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, col] = q
            err = (w - scale * (q - zero)) / U1[i, i]
            loss += err.square().sum() / 2
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            err1[:, i] = err
        W[:, i2:].addmm_(err1, U[i1:i2, i2:], alpha=-1.0)  # lazy update of the later blocks

    q_int = torch.empty(n_out, k_in, dtype=torch.int32, device=W.device)
    q_int[:, perm] = codes.to(torch.int32)  # back to the input order
    g_idx = torch.empty(k_in, dtype=torch.int32, device=W.device)
    g_idx[perm] = torch.arange(k_in, dtype=torch.int32, device=W.device) // gs
    qweight, qzeros = pack_gptq(q_int.t(), zeros.to(torch.int32), bits)
    g = g_idx.long()
    dequant = (q_int - zeros.to(torch.int32)[g].t()).to(torch.float32) * scales[g].t()  # [N, K]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half(), "g_idx": g_idx, "weight": dequant, "loss": loss}


def rtn_quantize_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> dict[str, torch.Tensor]:
    """Round-to-nearest baseline with the same outputs as `gptq_quantize_weight` (loss omitted)."""
    t = quantize_rtn(weight.detach().float().cpu(), bits, group_size, sym=sym)
    t = {k: v.to(weight.device) for k, v in t.items()}
    t["weight"] = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float32).t()
    return t


# ---------------------------------------------------------------- the model, block by block


class _StopForward(Exception):
    """Raised by a hook once everything needed from a forward has been seen."""


def hessians_for(
    block: nn.Module, names: Sequence[str], states: Sequence[tuple[torch.Tensor, AttentionInputs]]
) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / T of the inputs of `names` (sub-layers of `block`) over all calibration states.

    Each sample's forward stops as soon as every named layer has received its input.
    """
    layers = {name: block.get_submodule(name) for name in names}
    sums = {name: None for name in names}
    tokens = dict.fromkeys(names, 0)
    seen: set[str] = set()

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, K]
            if sums[name] is None:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            sums[name].addmm_(x.t(), x)
            tokens[name] += x.shape[0]
            seen.add(name)
            if len(seen) == len(layers):
                raise _StopForward

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for x, inputs in states:
            seen.clear()
            try:
                block(x, inputs, None)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name].mul_(2.0 / tokens[name]) for name in names}


def block_inputs(
    model: QWenLMHeadModel, samples: Sequence[Sequence[int]], device: torch.device
) -> list[tuple[torch.Tensor, AttentionInputs]]:
    """Each sample's input to block 0 ([1, S, hidden] float32) and attention inputs, on `device`.

    The model's own forward computes them (embedding, RoPE tables, causal mask); a hook on
    block 0 catches its arguments and stops the forward there.
    """
    caught: list = []

    def catch(module: nn.Module, args: tuple) -> None:
        caught.append(args)
        raise _StopForward

    handle = model.transformer.h[0].register_forward_pre_hook(catch)
    states = []
    try:
        for ids in samples:
            caught.clear()
            try:
                model.transformer(torch.tensor([list(ids)], device=model.device), None, None)
            except _StopForward:
                pass
            x, inputs, _ = caught[0]
            moved = {f.name: _to(getattr(inputs, f.name), device) for f in dataclasses.fields(inputs)}
            states.append((x.to(device=device, dtype=torch.float32), AttentionInputs(**moved)))
    finally:
        handle.remove()
    return states


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def quantize_layer(layer: nn.Linear, hessian: torch.Tensor | None, settings: GPTQSettings) -> dict[str, torch.Tensor]:
    """GPTQ (or RTN) of one nn.Linear; its weight is replaced by the quantized values."""
    if settings.method == "rtn":
        result = rtn_quantize_weight(layer.weight, settings.bits, settings.group_size, settings.sym)
    else:
        result = gptq_quantize_weight(
            layer.weight, hessian, settings.bits, settings.group_size, settings.desc_act,
            settings.damp_percent, settings.sym, settings.block_size,
        )
    layer.weight.data.copy_(result["weight"])
    return result


@torch.no_grad()
def quantize_block(
    block: nn.Module, states: Sequence[tuple[torch.Tensor, AttentionInputs]], settings: GPTQSettings, prefix: str
) -> tuple[dict[str, torch.Tensor], float]:
    """Quantize the five linears of one block (on its device) in SEQUENTIAL_GROUPS order.

    Returns {f"{prefix}.{layer}.{qweight|qzeros|scales|g_idx|bias}": CPU tensor} and the summed
    GPTQ loss. Biases are fp16, zeros for the unbiased layers (AutoGPTQ stores one for each).
    """
    out: dict[str, torch.Tensor] = {}
    total_loss = 0.0
    for names in SEQUENTIAL_GROUPS:
        hessians = hessians_for(block, names, states) if settings.method == "gptq" else dict.fromkeys(names)
        for name in names:
            layer = block.get_submodule(name)
            try:
                result = quantize_layer(layer, hessians.pop(name), settings)
            except ValueError as exc:
                raise ValueError(f"cannot quantize {prefix}.{name} {list(layer.weight.shape)}: {exc}") from exc
            total_loss += float(result.get("loss", 0.0))
            bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                out[f"{prefix}.{name}.{key}"] = result[key].cpu()
            out[f"{prefix}.{name}.bias"] = bias.detach().to(device="cpu", dtype=torch.float16)
    return out, total_loss


@torch.no_grad()
def quantize_model(
    model: QWenLMHeadModel,
    samples: Sequence[Sequence[int]],
    settings: GPTQSettings,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """GPTQ tensors of every block's linears, by checkpoint name, on the CPU.

    `samples`: calibration token id lists (unused with method='rtn'). Each block is moved to
    `device` in float32, quantized, run on the samples to make the next block's inputs, and
    then released (moved to the meta device): `model` is consumed and cannot run afterwards.
    """
    device = torch.device(device)
    if settings.method == "gptq" and not samples:
        raise ValueError("GPTQ needs calibration samples (token id lists); none were given")
    states = block_inputs(model, samples, device) if settings.method == "gptq" else []
    out: dict[str, torch.Tensor] = {}
    blocks = model.transformer.h
    bar = tqdm(range(len(blocks)), desc=f"{settings.method} {settings.bits}-bit", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i].to(device=device, dtype=torch.float32)
        tensors, loss = quantize_block(block, states, settings, f"transformer.h.{i}")
        out.update(tensors)
        if states and i + 1 < len(blocks):
            states = [(block(x, inputs, None), inputs) for x, inputs in states]  # quantized block's outputs
        blocks[i].to("meta")
        if settings.method == "gptq":
            bar.set_postfix(loss=f"{loss:.3g}")
    return out


# ---------------------------------------------------------------- a checkpoint directory


def warn_if_too_few_tokens(tokens: int, config: QwenConfig) -> None:
    """Warn when the calibration tokens cannot determine the widest layer's Hessian well."""
    widest = max(config.hidden_size, config.mlp_width)
    if tokens < 4 * widest:
        warnings.warn(
            f"the calibration data has {tokens} tokens, fewer than 4x the widest layer input ({widest}): the "
            "Hessians are poorly determined and GPTQ may overfit them; pass --calib with more data "
            "(AutoGPTQ runs typically use 128 samples of 2048 tokens)",
            stacklevel=2,
        )


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    settings: GPTQSettings = GPTQSettings(),
    *,
    calib: str | Path | None = None,
    n_samples: int | None = None,
    max_len: int = 2048,
    seed: int = 0,
    device: str | torch.device = "auto",
    max_shard_bytes: int | None = 2_000_000_000,
    progress: bool = True,
) -> Path:
    """Quantize an unquantized Qwen checkpoint directory `src` into a GPTQ checkpoint `out`.

    calib: a calibration file (see calibration.py; None: the built-in set), of which
    n_samples (default all) samples cut at max_len tokens are used. The source is loaded on
    the CPU; one block at a time runs on `device` ('auto': CUDA when available). Everything
    that can be wrong with the inputs (an already quantized source, a group size that does
    not divide a layer, bad calibration data, a non-empty `out`) raises before the model is
    loaded. Returns `out`.
    """
    src_dir, out_dir = resolve_model_dir(src), Path(out)
    check_output_dir(out_dir)
    if QuantConfig.from_pretrained(src_dir) is not None:
        raise ValueError(
            f"{src_dir} is already quantized (it has quantize_config.json or a quantization_config in config.json): "
            "quantize the BF16/FP16 checkpoint instead"
        )
    quant = QuantConfig.from_dict(dict(
        bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act,
        sym=settings.sym, damp_percent=settings.damp_percent,
    ))
    config = QwenConfig.from_pretrained(src_dir)
    expected_tensors(config, quant)  # names the layer a group size cannot divide
    samples = []
    if settings.method == "gptq":
        samples = load_calibration(calib, QWenTokenizer.from_pretrained(src_dir), n_samples, max_len, seed)
        warn_if_too_few_tokens(sum(map(len, samples)), config)
    device = resolve_device(device)

    model = load_model(src_dir, device_map="cpu", progress=progress)
    # everything but the quantized linears is stored as it is (fp16): embeddings, norms, lm_head
    kept = {n: t for n, t in model.state_dict().items() if not any(f".{p}." in n for p in QUANTIZED_LINEARS)}
    tensors = quantize_model(model, samples, settings, device, progress)
    del model
    return write_gptq_checkpoint(src_dir, out_dir, {**kept, **tensors}, quant, max_shard_bytes)

"""GPTQ packing and GPTQLinear against an unpacking written here from the format facts (spec 3)."""
import pytest
import torch
from torch import nn

from qwen_int4.config import QuantConfig
from qwen_int4.quant.gptq import (
    GPTQLinear,
    dequantize_gptq,
    pack_gptq,
    quantize_rtn,
    replace_linear_with_gptq,
    unpack_gptq,
)


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


def reference_dequant(qweight, qzeros, scales, g_idx, bits) -> torch.Tensor:
    """W[k, n] = scales[g, n] * (q[k, n] - (z'[g, n] + 1)), g = g_idx[k]; explicit loops, float64."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    words_k, n_out = qweight.shape
    k_in = words_k * per_word
    w = torch.empty(k_in, n_out, dtype=torch.float64)
    for k in range(k_in):
        g = int(g_idx[k])
        for n in range(n_out):
            q = (_u32(int(qweight[k // per_word, n])) >> (bits * (k % per_word))) & mask
            z = (_u32(int(qzeros[g, n // per_word])) >> (bits * (n % per_word))) & mask
            w[k, n] = float(scales[g, n]) * (q - (z + 1))
    return w


def random_gptq(k_in, n_out, bits, group_size, desc_act, seed):
    """Random packed tensors from random codes, zeros and scales, packed here by explicit loops."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    per_word = 32 // bits
    groups = k_in // group_size
    codes = torch.randint(0, maxq + 1, (k_in, n_out), generator=gen)
    zeros = torch.randint(1, maxq + 2, (groups, n_out), generator=gen)  # quantizer zeros; z - 1 is stored
    scales = (torch.rand(groups, n_out, generator=gen) * 0.01 + 0.001).half()
    if desc_act:
        perm = torch.randperm(k_in, generator=gen)
        g_idx = torch.empty(k_in, dtype=torch.int32)
        for pos, k in enumerate(perm.tolist()):
            g_idx[k] = pos // group_size
    else:
        g_idx = torch.tensor([k // group_size for k in range(k_in)], dtype=torch.int32)
    qweight = torch.zeros(k_in // per_word, n_out, dtype=torch.int64)
    for k in range(k_in):
        for n in range(n_out):
            qweight[k // per_word, n] |= int(codes[k, n]) << (bits * (k % per_word))
    qzeros = torch.zeros(groups, n_out // per_word, dtype=torch.int64)
    for g in range(groups):
        for n in range(n_out):
            qzeros[g, n // per_word] |= (int(zeros[g, n]) - 1) << (bits * (n % per_word))
    to_i32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    expected = torch.empty(k_in, n_out, dtype=torch.float64)
    for k in range(k_in):
        g = int(g_idx[k])
        expected[k] = scales[g].double() * (codes[k] - zeros[g]).double()
    return dict(qweight=to_i32(qweight), qzeros=to_i32(qzeros), scales=scales, g_idx=g_idx), codes, zeros, expected


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_dequantize_matches_loop_unpacking(bits, desc_act):
    tensors, codes, zeros, expected = random_gptq(64, 24, bits, 16, desc_act, seed=bits + 10 * desc_act)
    got = dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits, torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    looped = reference_dequant(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    torch.testing.assert_close(looped, expected, rtol=0, atol=0)
    # pack_gptq reproduces the loop-packed words bit for bit
    qweight, qzeros = pack_gptq(codes, zeros, bits)
    assert torch.equal(qweight, tensors["qweight"]) and torch.equal(qzeros, tensors["qzeros"])
    q2, z2 = unpack_gptq(qweight, qzeros, bits)
    assert torch.equal(q2, codes.to(torch.int32)) and torch.equal(z2, zeros.to(torch.int32))


@pytest.mark.parametrize("desc_act", [False, True])
def test_dequantize_row_blocks_at_odd_shapes(desc_act):
    """Output rows are built in blocks; every block size gives the same exact weight."""
    tensors, _, _, expected = random_gptq(96, 328, 4, 32, desc_act, seed=21)
    args = (tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], 4, torch.float64)
    for block_rows in (None, 1, 7, 128, 1000):
        torch.testing.assert_close(dequantize_gptq(*args, block_rows=block_rows), expected, rtol=0, atol=0)
    w16 = dequantize_gptq(*args[:-1])
    assert w16.dtype == torch.float16 and w16.shape == (96, 328)
    torch.testing.assert_close(w16.double(), expected, rtol=1e-3, atol=1e-6)


def test_sym_zeros_are_0x77777777_and_0x7f7f7f7f():
    w = torch.randn(32, 64) * 0.02
    q4 = quantize_rtn(w, 4, 32)
    assert q4["qzeros"].unique().tolist() == [2004318071]  # 0x77777777: stored nibble 7 = zero 8 minus one
    q8 = quantize_rtn(w, 8, 32)
    assert q8["qzeros"].unique().tolist() == [0x7F7F7F7F]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_rtn_layout_and_error(bits, desc_act, sym):
    n_out, k_in, gs = 40, 96, 32
    w = torch.randn(n_out, k_in) * 0.02
    t = quantize_rtn(w, bits, gs, desc_act=desc_act, sym=sym, seed=3)
    assert t["qweight"].shape == (k_in * bits // 32, n_out) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (k_in // gs, n_out * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (k_in // gs, n_out) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (k_in,) and t["g_idx"].dtype == torch.int32
    assert torch.bincount(t["g_idx"].long()).tolist() == [gs] * (k_in // gs)
    if desc_act:
        assert not torch.equal(t["g_idx"], torch.arange(k_in, dtype=torch.int32) // gs)
    else:
        assert torch.equal(t["g_idx"], torch.arange(k_in, dtype=torch.int32) // gs)
    deq = reference_dequant(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits).t()  # [N, K]
    # round-to-nearest error is at most one step (half a step plus the top-code clip of sym)
    step = t["scales"].double()[t["g_idx"].long()].t()  # [N, K]
    assert ((deq - w.double()).abs() <= step * 1.0001).all()
    assert (deq - w.double()).abs().mean() < 0.3 * step.mean()


def test_desc_act_uses_given_perm():
    perm = torch.arange(63, -1, -1)
    t = quantize_rtn(torch.randn(8, 64), 4, 16, desc_act=True, perm=perm)
    assert t["g_idx"].tolist() == [(63 - k) // 16 for k in range(64)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_linear_forward(bits, desc_act):
    k_in, n_out = 64, 48
    layer = GPTQLinear(k_in, n_out, bits, 16, desc_act=desc_act)
    tensors, _, _, expected = random_gptq(k_in, n_out, bits, 16, desc_act, seed=7)
    bias = torch.randn(n_out).half()
    layer.load_state_dict({**tensors, "bias": bias})
    x = torch.randn(2, 3, k_in)
    want = x.double() @ expected + bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    assert layer(x).dtype == torch.float32 and layer(x.half()).dtype == torch.float16
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x.bfloat16()).double(), want, rtol=0.05, atol=0.05)


def test_gptq_linear_group_size_minus_one_and_no_bias():
    layer = GPTQLinear(64, 16, 4, -1, bias=False)
    assert layer.scales.shape == (1, 16) and layer.bias is None
    assert "bias" not in layer.state_dict()


def test_packed_weights_stay_packed():
    layer = GPTQLinear(128, 64, 4, 32)
    layer(torch.randn(1, 128))
    assert {name for name, _ in layer.named_buffers()} == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert not list(layer.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=3, group_size=32), "bits=3"),
        (dict(bits=2, group_size=32), "bits=2"),
        (dict(bits=4, group_size=48), "does not divide in_features 128"),
        (dict(bits=4, group_size=0), "group_size"),
    ],
)
def test_gptq_linear_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTQLinear(128, 64, **kwargs)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_gptq(torch.full((8, 8), 16), torch.full((1, 8), 8), 4)
    with pytest.raises(ValueError, match="zero points"):
        pack_gptq(torch.zeros(8, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="divide"):
        quantize_rtn(torch.randn(8, 40), 4, 32)


class _Block(nn.Module):
    def __init__(self, hidden, width):
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(hidden, 3 * hidden)
        self.attn.c_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Module()
        self.mlp.w1 = nn.Linear(hidden, width, bias=False)
        self.mlp.w2 = nn.Linear(hidden, width, bias=False)
        self.mlp.c_proj = nn.Linear(width, hidden, bias=False)


def _toy(hidden=64, width=96, layers=2):
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.h = nn.ModuleList(_Block(hidden, width) for _ in range(layers))
    model.lm_head = nn.Linear(hidden, 100, bias=False)
    return model


def test_replace_linear_with_gptq_on_meta():
    with torch.device("meta"):
        model = _toy()
    replace_linear_with_gptq(model, QuantConfig(bits=4, group_size=32))
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names["transformer.h.1.attn.c_attn.qweight"] == (8, 192)
    assert names["transformer.h.1.mlp.c_proj.qzeros"] == (3, 8)
    assert names["transformer.h.0.mlp.w2.bias"] == (96,)
    assert names["lm_head.weight"] == (100, 64)
    assert all(v.is_meta for v in model.state_dict().values())
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 10


def test_replace_linear_names_the_layer():
    with torch.device("meta"):
        model = _toy(hidden=64, width=80)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_proj .*group_size 64 does not divide in_features 80"):
        replace_linear_with_gptq(model, QuantConfig(bits=4, group_size=64))

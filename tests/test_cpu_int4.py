"""tinygemm-cpu: the op's conventions, the packing layout, and the kernel against the reference."""
import mmap
import zlib

import pytest
import torch

from qwen_int4.kernels.cpu_int4 import (
    PackingLayout,
    TinygemmCPUKernel,
    drop_file_pages,
    pack_int4,
    packing_layout,
    unpack_int4,
)
from qwen_int4.loader import load_model
from qwen_int4.quant.gptq import (
    GPTQLinear,
    dequantize_gptq,
    pack_codes_u8,
    unpack_codes_u8,
    unpack_int32,
)
from qwen_int4.testing import read_checkpoint_tensors

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch without the CPU int4 op"
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_layer(k_in, n_out, bits, group_size, desc_act, seed):
    """A GPTQLinear with random codes, zero points (asymmetric), scales, act-order and bias."""
    g = gen(seed)
    gs = k_in if group_size == -1 else group_size
    groups = k_in // gs
    layer = GPTQLinear(k_in, n_out, bits, group_size, desc_act)
    words = torch.randint(-(2**31), 2**31, layer.qweight.shape, generator=g, dtype=torch.int32)
    zeros = torch.randint(-(2**31), 2**31, layer.qzeros.shape, generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n_out, generator=g) * 0.02 + 0.002).half()
    g_idx = torch.arange(k_in, dtype=torch.int32) // gs
    if desc_act:
        perm = torch.randperm(k_in, generator=g)
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(k_in, dtype=torch.int32) // gs
    bias = (torch.randn(n_out, generator=g) * 0.1).half()
    layer.load_state_dict({"qweight": words, "qzeros": zeros, "scales": scales, "g_idx": g_idx, "bias": bias})
    return layer


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_op_convention_w_is_q_minus_8_times_scale_plus_zero():
    """The fact every conversion here rests on: W = (q - 8) * scale + zero, per (group, column)."""
    g = gen(11)
    n_out, k_in, group = 48, 96, 32
    q = torch.randint(0, 16, (n_out, k_in), generator=g, dtype=torch.int32)
    scale = torch.rand(k_in // group, n_out, generator=g) + 0.5
    zero = torch.randn(k_in // group, n_out, generator=g)
    sz = torch.stack([scale, zero], dim=-1).bfloat16()
    x = torch.randn(5, k_in, generator=g).bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    rows = torch.arange(k_in) // group
    w = (q.double() - 8) * sz[..., 0].double().t()[:, rows] + sz[..., 1].double().t()[:, rows]  # [N, K]
    want = x.double() @ w.t()
    assert rel_err(y, want) < 4e-3  # the output is rounded to bf16
    w_gptq_like = q.double() * sz[..., 0].double().t()[:, rows]  # without the -8 it is far off
    assert rel_err(y, x.double() @ w_gptq_like.t()) > 0.1


@pytest.mark.parametrize("n_out", [16, 48, 80, 208, 240])
def test_packing_layout_matches_the_op_and_round_trips(n_out):
    layout = packing_layout()
    assert layout is not None, "no candidate layout reproduces _convert_weight_to_int4pack_for_cpu"
    codes = torch.randint(0, 16, (n_out, 70), generator=gen(n_out), dtype=torch.int32)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(pack_int4(codes.to(torch.uint8), layout), want)
    for other in (PackingLayout(32, True), PackingLayout(64, True), PackingLayout(32, False)):
        u8 = codes.to(torch.uint8)
        assert torch.equal(unpack_int4(pack_int4(u8, other), other), u8)


@pytest.mark.parametrize("bits", [4, 8])
def test_byte_wise_unpack_matches_unpack_int32(bits):
    words = torch.randint(-(2**31), 2**31, (7, 12), generator=gen(bits), dtype=torch.int32)
    codes = unpack_codes_u8(words, bits)
    assert codes.dtype == torch.uint8 and torch.equal(codes.to(torch.int32), unpack_int32(words, bits, dim=1))
    assert torch.equal(pack_codes_u8(codes, bits), words)


CASES = [  # (K, N, bits, group_size, desc_act): odd-but-legal shapes, every group size the op has
    (384, 208, 4, 32, False),
    (384, 208, 4, 64, True),
    (384, 208, 4, 128, False),
    (384, 48, 4, 128, True),
    (512, 80, 4, 256, False),
    (96, 16, 4, -1, False),  # per-channel: groups of 96 become 3 tinygemm groups of 32
    (4096 // 8, 112, 4, 512, False),  # group 512 > 256: repeated as 2 x 256
    (384, 208, 8, 32, False),
    (384, 208, 8, 64, True),
    (256, 48, 8, 128, True),
    (192, 32, 8, -1, True),
]


@pytest.mark.parametrize("k_in, n_out, bits, group_size, desc_act", CASES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference(k_in, n_out, bits, group_size, desc_act, rows, dtype):
    seed = zlib.crc32(repr((k_in, n_out, bits, group_size, desc_act, rows, dtype)).encode())  # one per case
    layer = random_layer(k_in, n_out, bits, group_size, desc_act, seed)
    x = torch.randn(rows, k_in, generator=gen(seed + 1)).to(dtype)
    w = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, torch.float64)  # [K, N]
    exact = x.double() @ w + layer.bias.double()
    reference = layer(x)  # unprepared: the torch-dequant path in `dtype`
    assert layer.process_weights_after_loading(dtype=dtype) == "tinygemm-cpu"
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, n_out)
    # bf16 activations, scales, zeros and output, fp32 accumulation: a few 2^-9 (measured <= 5.4e-3;
    # a wrong zero convention gives ~0.27)
    assert rel_err(got, exact) < 1e-2
    assert rel_err(got, reference) < 1e-2
    assert rel_err(layer(x.view(rows, 1, k_in)).view(rows, n_out), exact) < 1e-2  # leading dims kept


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_qweight_is_freed_and_rebuilt_exactly(bits, desc_act):
    layer = random_layer(256, 48, bits, 64, desc_act, seed=5 + bits + desc_act)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.process_weights_after_loading(dtype=torch.bfloat16)
    assert layer.qweight is None  # one copy of the codes in memory: the repacked one
    assert layer.tinygemm_weight.nbytes == before["qweight"].nbytes
    assert set(layer.state_dict()) == set(before)  # the repacked buffers are not checkpoint tensors
    assert all(torch.equal(layer.state_dict()[k], before[k]) for k in before)
    torch.testing.assert_close(layer.dequantized_weight(torch.float64),
                               dequantize_gptq(before["qweight"], before["qzeros"], before["scales"],
                                               before["g_idx"], bits, torch.float64))


@pytest.mark.parametrize(
    "k_in, n_out, group_size, dtype, reason",
    [
        (384, 200, 32, torch.float16, "out_features must be a multiple of 16"),
        (384, 208, 16, torch.float16, "group size 16 is not a multiple of 32"),
        (96, 208, 48, torch.float16, "group size 48 is not a multiple of 32"),
        (176, 208, -1, torch.float16, "group size 176 is not a multiple of 32"),
        (384, 208, 32, torch.float32, "computes in bfloat16"),
    ],
)
def test_can_implement_names_what_it_cannot_do(k_in, n_out, group_size, dtype, reason):
    ok, why = TinygemmCPUKernel.can_implement(4, group_size, False, k_in, n_out, torch.device("cpu"), dtype)
    assert not ok and reason in why
    ok, why = TinygemmCPUKernel.can_implement(4, 128, False, 4096, 4096, torch.device("meta"), torch.float16)
    assert not ok and "CPU only" in why
    ok, why = TinygemmCPUKernel.can_implement(2, 128, False, 4096, 4096, torch.device("cpu"), torch.float16)
    assert not ok and "bits=2" in why


def test_act_order_g_idx_must_be_a_permutation_of_groups():
    layer = random_layer(128, 16, 4, 32, True, seed=9)
    layer.g_idx[:40] = 0  # group 0 now has more than 32 rows
    with pytest.raises(ValueError, match="exactly 32 input rows"):
        layer.process_weights_after_loading(dtype=torch.float16)


def test_drop_file_pages_only_touches_file_mappings(tmp_path):
    path = tmp_path / "blob.bin"
    data = torch.randint(0, 255, (64 * mmap.PAGESIZE,), generator=gen(1), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.uint8)  # mmap'd, as safetensors
    assert torch.equal(mapped, data)  # makes the pages resident
    dropped = drop_file_pages(mapped)
    assert dropped >= 62 * mmap.PAGESIZE
    assert torch.equal(mapped, data)  # re-read from the file on access
    assert drop_file_pages(data.clone()) == 0  # anonymous memory is never dropped


def greedy(model, ids, steps):
    out = model.generate(ids, do_sample=False, max_new_tokens=steps, eos_token_id=-1, stop_words_ids=[],
                         repetition_penalty=1.0)
    return out[:, ids.shape[1]:]


def test_tiny_checkpoint_end_to_end(tiny_int4_dir, monkeypatch):
    """Same greedy tokens and close logits with tinygemm-cpu and with torch-dequant; the
    state_dict of the prepared model is still the checkpoint."""
    ids = torch.randint(0, 151851, (2, 9), generator=gen(4))
    monkeypatch.setenv("QWEN_INT4_GPTQ_KERNEL", "torch-dequant")
    reference = load_model(tiny_int4_dir, progress=False)
    monkeypatch.delenv("QWEN_INT4_GPTQ_KERNEL")
    fast = load_model(tiny_int4_dir, progress=False)
    kernels = {m.kernel.name for m in fast.modules() if isinstance(m, GPTQLinear)}
    assert kernels == {"tinygemm-cpu"} and fast.dtype == torch.float16
    with torch.no_grad():
        want, got = reference(ids).logits.float(), fast(ids).logits.float()
    assert want.std() > 0 and rel_err(got, want) < 1e-2
    torch.testing.assert_close(greedy(fast, ids, 8), greedy(reference, ids, 8))
    stored = read_checkpoint_tensors(tiny_int4_dir)
    state = fast.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k].to(state[k].dtype)) for k in stored)

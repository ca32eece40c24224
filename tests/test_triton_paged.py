"""Paged attention kernels (kernels/triton_paged.py) against their references, and the references
against an independent formula (dense attention over each sequence's contiguous keys).

Shapes are small and odd (blocks of 4, contexts that end mid-block, a one-token context, block
tables in shuffled order). The kernel checks run on the CPU under TRITON_INTERPRET=1 (a fresh
process) and, marked gpu, on CUDA.
"""
import math

import pytest
import torch
from _triton import run_under_triton_interpreter

from qwen_int4.kernels.triton_decode import (
    dequantize_kv_reference,
    quantize_kv_reference,
)
from qwen_int4.kernels.triton_paged import (
    gather_slots,
    paged_decode_attention_reference,
    pool_meta,
    rope_write_paged_reference,
    varlen_attention_reference,
    write_paged_reference,
)
from qwen_int4.model.rope import RotaryEmbedding, apply_rotary

H, D, BS = 3, 16, 4


def paged_pool(lengths: list[int], dtype: torch.dtype, device: str, seed: int = 0):
    """(k_pool, v_pool [blocks, BS, H, D], block_tables [B, max_blocks] int32, the contiguous keys and
    values of each sequence): sequences scattered over shuffled blocks, the spare blocks random too."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lengths]
    num_blocks = sum(need) + 3
    k_pool = torch.randn(num_blocks, BS, H, D, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, BS, H, D, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lengths), max(need) + 2, dtype=torch.int32)
    contiguous = []
    for b, (n, m) in enumerate(zip(lengths, need)):
        blocks, order = order[:m], order[m:]
        tables[b, :m] = torch.tensor(blocks)
        contiguous.append((k_pool[blocks].reshape(-1, H, D)[:n], v_pool[blocks].reshape(-1, H, D)[:n]))
    return k_pool.to(device), v_pool.to(device), tables.to(device), contiguous


def quantize_pools(k_pool: torch.Tensor, v_pool: torch.Tensor):
    """uint8 pools [blocks, BS, H, D] and their meta (pool_meta's layout) of float pools: every slot quantized."""
    blocks, device = k_pool.shape[0], k_pool.device
    kq, vq = (torch.zeros(p.shape, dtype=torch.uint8, device=device) for p in (k_pool, v_pool))
    meta = pool_meta(blocks, BS, H, device)
    slots = torch.arange(blocks * BS, device=device)
    write_paged_reference(k_pool.view(-1, H, D), v_pool.view(-1, H, D), slots, kq, vq, meta)
    return kq, vq, meta


def meta_at(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[N, H]: a meta tensor [blocks, H, BS]'s values at the flat slots [N]."""
    return t[slots // BS, :, slots % BS]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_end: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64 for q [S, H, D], k, v [T, H, D]; queries at the last S positions."""
    S, T = q.shape[0], k.shape[0]
    scores = torch.einsum("shd,thd->hst", q.double(), k.double()) / math.sqrt(D)
    if causal_end:
        allowed = torch.arange(T)[None, :] <= torch.arange(T - S, T)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hst,thd->shd", scores.softmax(-1), v.double())


def test_paged_decode_reference_equals_dense_attention():
    lengths = [1, 7, 12, 5]
    k_pool, v_pool, tables, contiguous = paged_pool(lengths, torch.float32, "cpu")
    q = torch.randn(len(lengths), H, D)
    out = paged_decode_attention_reference(q, k_pool, v_pool, None, tables, torch.tensor(lengths, dtype=torch.int32))
    for b, (k, v) in enumerate(contiguous):
        torch.testing.assert_close(out[b].double(), dense_attention(q[b:b + 1], k, v, False)[0], rtol=1e-5, atol=1e-5)


def test_varlen_reference_is_causal_from_the_end_of_each_context():
    # chunks of 3, 1 and 5 queries continuing cached prefixes of 4, 6 and 0 keys
    n_q, n_k = [3, 1, 5], [7, 7, 5]
    q, k, v = torch.randn(sum(n_q), H, D), torch.randn(sum(n_k), H, D), torch.randn(sum(n_k), H, D)
    cu_q = [0, *torch.tensor(n_q).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(n_k).cumsum(0).tolist()]
    out = varlen_attention_reference(q, k, v, cu_q, cu_k)
    for i in range(3):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        torch.testing.assert_close(out[qs].double(), dense_attention(q[qs], k[ks], v[ks], True), rtol=1e-5, atol=1e-5)


def test_rope_write_reference_rotates_scales_and_stores():
    N, num_blocks = 5, 4
    qkv = torch.randn(N, 3 * H * D)
    positions = torch.tensor([0, 9, 3, 14, 2])
    cos, sin = RotaryEmbedding(D, 10000.0).table(1.0, 16, "cpu")
    logn = torch.rand(N) + 0.5
    slots = torch.tensor([3, 0, 9, 15, 6])
    k_pool, v_pool = torch.zeros(num_blocks, BS, H, D), torch.zeros(num_blocks, BS, H, D)
    q = rope_write_paged_reference(qkv, cos[positions], sin[positions], logn, slots, k_pool, v_pool, None, H)
    q0, k0, v0 = qkv.view(N, 3, H, D).unbind(1)
    c, s = cos[positions][None, :, None], sin[positions][None, :, None]  # [1, N, 1, D]
    torch.testing.assert_close(q, apply_rotary(q0[None], c, s)[0] * logn[:, None, None])
    torch.testing.assert_close(k_pool.view(-1, H, D)[slots], apply_rotary(k0[None], c, s)[0])
    torch.testing.assert_close(v_pool.view(-1, H, D)[slots], v0)
    untouched = torch.ones(num_blocks * BS, dtype=torch.bool)
    untouched[slots] = False
    assert k_pool.view(-1, H, D)[untouched].abs().sum() == 0


def test_int8_references_equal_attention_over_dequantized_keys():
    lengths = [1, 7, 12, 5]
    k_pool, v_pool, tables, contiguous = paged_pool(lengths, torch.float32, "cpu", seed=4)
    kq, vq, meta = quantize_pools(k_pool, v_pool)
    (_, ks, kz), (_, vs, vz) = quantize_kv_reference(k_pool), quantize_kv_reference(v_pool)  # [blocks, BS, H]
    for got, want in zip(meta, (ks, kz, vs, vz)):  # head-major: [blocks, H, BS]
        assert torch.equal(got, want.transpose(1, 2))
    q = torch.randn(len(lengths), H, D)
    out = paged_decode_attention_reference(q, kq, vq, meta, tables, torch.tensor(lengths))
    for b, (k, v) in enumerate(contiguous):
        k8, v8 = (dequantize_kv_reference(*quantize_kv_reference(x), torch.float64) for x in (k, v))
        torch.testing.assert_close(out[b].double(), dense_attention(q[b:b + 1], k8, v8, False)[0], rtol=1e-5,
                                   atol=1e-5)
        exact = dense_attention(q[b:b + 1], k, v, False)[0]
        rel = float((out[b].double() - exact).norm() / exact.norm())
        print(f"int8 paged attention, context {lengths[b]}: rel err {rel:.2e} vs fp32 keys/values")
        assert 0 < rel < 1e-2


def test_int8_rope_write_reference_stores_the_quantized_keys():
    N, num_blocks = 5, 4
    qkv = torch.randn(N, 3 * H * D)
    positions = torch.tensor([0, 9, 3, 14, 2])
    cos, sin = RotaryEmbedding(D, 10000.0).table(1.0, 16, "cpu")
    slots = torch.tensor([3, 0, 9, 15, 6])
    pools = [torch.zeros(num_blocks, BS, H, D, dtype=torch.uint8) for _ in range(2)]
    meta = pool_meta(num_blocks, BS, H)
    rope_write_paged_reference(qkv, cos[positions], sin[positions], None, slots, *pools, meta, H)
    _, k0, v0 = qkv.view(N, 3, H, D).unbind(1)
    k_rot = apply_rotary(k0[None], cos[positions][None, :, None], sin[positions][None, :, None])[0]
    for pool, scale_zero, x in ((pools[0], meta[:2], k_rot), (pools[1], meta[2:], v0)):
        back = gather_slots(pool, scale_zero, slots, torch.float32)  # [N, H, D]
        step = meta_at(scale_zero[0], slots)  # [N, H]: one quantization step per token and head
        assert ((back - x).abs() <= step[..., None] / 2 + 1e-6).all()  # rounded to the nearest level
        assert float((back - x).norm() / x.norm()) < 1e-2


def check_kernels(device: str) -> None:
    """Each kernel against its reference at small odd shapes (fp16 pools, fp32 math)."""
    from qwen_int4.kernels.triton_paged import (
        paged_decode_attention,
        quantize_write_paged,
        rope_write_paged,
    )

    torch.manual_seed(1)
    lengths = [1, 13, 4, 30, 9]
    k_pool, v_pool, tables, _ = paged_pool(lengths, torch.float16, device, seed=2)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = torch.randn(len(lengths), H, D, device=device).half()
    ref = paged_decode_attention_reference(q.cpu().float(), k_pool.cpu().float(), v_pool.cpu().float(), None,
                                           tables.cpu(), lens.cpu())
    for splits, tile in ((1, 8), (4, 8), (2, 16), (1, None), (4, None)):  # None: the launch default
        out = paged_decode_attention(q, k_pool, v_pool, None, tables, lens, splits=splits, tile=tile)
        torch.testing.assert_close(out.cpu().float(), ref, rtol=2e-3, atol=2e-3)
    # uint8 pools: the kernel dequantizes (to fp32) as the reference does
    kq, vq, meta = quantize_pools(k_pool, v_pool)  # meta [blocks, H, BS] float32 each
    ref8 = paged_decode_attention_reference(q.cpu().float(), kq.cpu(), vq.cpu(), tuple(m.cpu() for m in meta),
                                            tables.cpu(), lens.cpu())
    assert (ref8 - ref).abs().max() > 1e-4  # quantization changed the output: the int8 path is exercised
    for splits, tile in ((1, 8), (4, 8), (1, 4), (2, 16), (1, None), (4, None)):
        out = paged_decode_attention(q, kq, vq, meta, tables, lens, splits=splits, tile=tile)
        torch.testing.assert_close(out.cpu().float(), ref8, rtol=2e-3, atol=2e-3)
    separate = tuple(t.contiguous() for t in meta)  # the right shape, but not pool_meta's interleaved views
    with pytest.raises(ValueError, match="int8 pool meta must be pool_meta's views"):
        paged_decode_attention(q, kq, vq, separate, tables, lens)

    N = 6
    qkv = torch.randn(N, 3 * H * D, device=device).half()
    positions = torch.tensor([0, 9, 3, 14, 2, 7])
    cos, sin = RotaryEmbedding(D, 10000.0).table(1.0, 16, "cpu")
    cos, sin = cos[positions].to(device), sin[positions].to(device)
    logn = (torch.rand(N) + 0.5).to(device)
    slots = torch.tensor([3, 0, 9, 15, 6, 22], device=device)
    pools = [torch.zeros(6, BS, H, D, device=device).half() for _ in range(4)]
    q_ref = rope_write_paged_reference(qkv, cos, sin, logn, slots, pools[0], pools[1], None, H)
    q_out = rope_write_paged(qkv, cos, sin, logn, slots.to(torch.int32), pools[2], pools[3], None, H)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=1e-3)  # same fp32 math, same fp16 roundings
    torch.testing.assert_close(pools[2], pools[0], rtol=0, atol=1e-3)
    assert torch.equal(pools[3], pools[1])
    # into uint8 pools: k, v quantized with their scales and zeros, as the reference quantizer
    pools8 = [torch.zeros(6, BS, H, D, dtype=torch.uint8, device=device) for _ in range(4)]
    metas = [pool_meta(6, BS, H, device) for _ in range(2)]
    q_ref = rope_write_paged_reference(qkv, cos, sin, logn, slots, pools8[0], pools8[1], metas[0], H)
    q_out = rope_write_paged(qkv, cos, sin, logn, slots.to(torch.int32), pools8[2], pools8[3], metas[1], H)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=1e-3)
    for ref_pool, out_pool in ((pools8[0], pools8[2]), (pools8[1], pools8[3])):
        assert (out_pool.int() - ref_pool.int()).abs().max() <= 1  # float rounding at .5
    for ref_meta, out_meta in zip(metas[0], metas[1]):
        torch.testing.assert_close(out_meta, ref_meta, rtol=1e-3, atol=1e-4)  # k: fp16 rotation roundings
    written = torch.zeros(6 * BS, dtype=torch.bool, device=device)
    written[slots] = True
    assert meta_at(metas[1][0], slots).min() > 0 and not pools8[2].view(-1, H, D)[~written].any()
    assert not meta_at(metas[1][0], (~written).nonzero()[:, 0]).any()  # no other slot's scale was written
    # the eager steps' store into uint8 pools: k rows contiguous, v rows strided (a view of fused qkv rows)
    k = torch.randn(N, H, D, device=device).half()
    v = qkv.view(N, 3, H, D)[:, 2]
    pools8 = [torch.zeros(6, BS, H, D, dtype=torch.uint8, device=device) for _ in range(4)]
    metas = [pool_meta(6, BS, H, device) for _ in range(2)]
    write_paged_reference(k, v, slots, pools8[0], pools8[1], metas[0])
    quantize_write_paged(k, v, slots.to(torch.int32), pools8[2], pools8[3], metas[1])
    for ref_pool, out_pool in ((pools8[0], pools8[2]), (pools8[1], pools8[3])):
        assert (out_pool.int() - ref_pool.int()).abs().max() <= 1  # float rounding at .5
    for ref_meta, out_meta in zip(metas[0], metas[1]):
        torch.testing.assert_close(out_meta, ref_meta)
    assert not pools8[3].view(-1, H, D)[~written].any() and meta_at(metas[1][2], slots).min() > 0


def test_kernels_in_triton_interpreter():
    run_under_triton_interpreter(__file__, timeout=600)


@pytest.mark.gpu
def test_kernels_on_gpu():
    check_kernels("cuda")


@pytest.mark.gpu
def test_flash_varlen_equals_the_reference_on_gpu():
    from qwen_int4.kernels.triton_paged import varlen_attention

    torch.manual_seed(3)
    n_q, n_k = [3, 1, 64, 17], [7, 40, 64, 100]
    q = torch.randn(sum(n_q), 32, 128, device="cuda").half()
    k, v = (torch.randn(sum(n_k), 32, 128, device="cuda").half() for _ in range(2))
    cu_q = [0, *torch.tensor(n_q).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(n_k).cumsum(0).tolist()]
    ref = varlen_attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k)
    torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k).float(), ref, rtol=2e-3, atol=2e-3)


if __name__ == "__main__":  # the interpreter run of test_kernels_in_triton_interpreter
    torch.set_num_threads(1)
    check_kernels("cpu")
    print("ok")

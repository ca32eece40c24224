"""GPU speed of the Triton GPTQ kernels at Qwen-7B's linear shapes, against the copy bandwidth.

    PYTHONPATH=src python benchmarks/gptq_kernels.py [--sweep] [--bits 4,8] [--rows 1,16,64,256]
        [--out results.json]

Random weights in the kernels' layout, built on the GPU (no checkpoint). Every kernel is first
checked against `dequantize_reference` on the GPU, then timed as a CUDA graph of calls over 32
distinct weight copies (as the 32 layers: no L2 reuse). Reported per shape: the 1-row GEMV
(% of the copy bandwidth, the roofline), the tensor-core GEMM at each --rows count, dequantize
+ cuBLAS and dense fp16 cuBLAS at the same rows. --sweep tries many launch configurations
(first on c_attn, then the best few on every shape) and prints the fastest.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from qwen_int4.kernels.gptq_layout import GPTQWeights, dequantize_reference
from qwen_int4.kernels.triton_gptq import gptq_linear
from qwen_int4.kernels.triton_gptq_gemm import GemmConfig, gptq_dequantize, gptq_gemm
from qwen_int4.kernels.triton_gptq_gemv import GemvConfig, gptq_gemv
from qwen_int4.testing.gpu_model import copy_bandwidth, device_info, time_graph

LINEARS = {"attn.c_attn": (4096, 12288), "attn.c_proj": (4096, 4096), "mlp.w1|w2": (4096, 11008), "mlp.c_proj": (11008, 4096)}
GROUP = 128
COPIES = 32


def random_weights(k: int, n: int, bits: int, seed: int, perm: bool = False) -> GPTQWeights:
    """Random weights in the kernel layout (scales ~1e-3, zeros random), straight on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    words = torch.randint(-(2**31), 2**31 - 1, (n, k * bits // 32), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(n, k // GROUP, device="cuda", generator=gen) * 1e-3 + 5e-4).half()
    zeros = torch.randint(0, 2**bits, (n, k // GROUP), dtype=torch.uint8, device="cuda", generator=gen)
    bias = torch.randn(n, dtype=torch.float16, device="cuda", generator=gen) * 0.01
    order = torch.randperm(k, device="cuda", generator=gen).to(torch.int32) if perm else None
    return GPTQWeights(words, scales, zeros, order, bias, GROUP, bits)


def weight_bytes(w: GPTQWeights) -> int:
    return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros, w.bias) if t is not None)


def check(bits: int) -> list[str]:
    """Relative errors of every kernel against the reference on a few shapes (must be ~1e-3)."""
    lines = []
    for (k, n), perm in itertools.product([(4096, 4096), (11008, 4096), (384, 520)], [False, True]):
        w = random_weights(k, n, bits, seed=7, perm=perm)
        ref = dequantize_reference(w, torch.float32)  # [N, K]
        for m in (1, 3, 16, 100, 300):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            want = x.float() @ ref.t() + w.bias.float()
            for name, fn in (("gemv", gptq_gemv), ("gemm", gptq_gemm), ("linear", gptq_linear)):
                if name == "gemv" and m != 1:
                    continue
                got = fn(x, w).float()
                err = ((got - want).norm() / want.norm()).item()
                status = "ok" if err < 3e-3 else "FAIL"
                lines.append(f"check bits={bits} K={k} N={n} perm={perm} M={m} {name}: rel err {err:.2e} {status}")
    return lines


def timed(fn, x, copies, nbytes: int, bandwidth: float) -> tuple[float, float]:
    t = time_graph(lambda: [fn(x, w) for w in copies]) / len(copies)
    return t * 1e6, nbytes / t / bandwidth


def gemv_candidates() -> list[GemvConfig]:
    out = []
    for bn, bu, warps in itertools.product((2, 4, 8, 16, 32), (2, 4, 8, 16, 32), (2, 4, 8)):
        per_thread = bn * bu * 16 // (32 * warps)  # int4 words per thread per step
        if per_thread in (4, 8, 16):
            out.append(GemvConfig(bn, bu, warps, 1))
    return out


def sweep_gemv(bits: int, bandwidth: float) -> list[GemvConfig]:
    k, n = LINEARS["attn.c_attn"]
    copies = [random_weights(k, n, bits, seed=i) for i in range(COPIES)]
    x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    scored = []
    for cfg in gemv_candidates():
        try:
            us, frac = timed(lambda a, w, c=cfg: gptq_gemv(a, w, c), x, copies, weight_bytes(copies[0]), bandwidth)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile
            print(f"  gemv {cfg}: {type(exc).__name__} {str(exc)[:100]}", file=sys.stderr)
            continue
        print(f"  sweep gemv bits={bits} c_attn {cfg}: {us:.2f} us ({frac:.0%})", file=sys.stderr)
        scored.append((us, cfg))
    scored.sort(key=lambda s: s[0])
    best = [c for _, c in scored[:5]]
    return best + [GemvConfig(c.block_n, c.block_u, c.num_warps, s) for c in best[:2] for s in (2, 3)] + [
        GemvConfig(c.block_n, c.block_u, c.num_warps, 1, half2=False) for c in best[:2]]


def gemm_candidates(m: int) -> list[GemmConfig | None]:
    """Launch configurations for m rows: the x-left kernel's (one dot per unit) and the
    weights-left kernel's (`wx`: [BLOCK_N, BLOCK_M] tiles)."""
    xw = [GemmConfig(bm, 128, 4, 3, split) for bm, split in itertools.product((16, 32, 64), (2, 4)) if bm <= max(16, m)]
    bms = [b for b in (16, 32, 64, 128, 256) if b <= max(16, triton_next_pow2(m)) and b >= min(m, 256) // 4]
    splits = (2, 4) if m <= 64 else (1, 2) if m <= 512 else (1,)
    wx = [GemmConfig(bm, bn, 8 if big else 4, stages, split, wx=True)
          for bm, bn, stages, split in itertools.product(bms, (64, 128, 256), (2, 3, 4), splits)
          for big in [bm * bn >= 128 * 128] if bm * bn <= 256 * 128 and (stages < 4 if big else stages > 2)]
    return [None] + xw + wx


def triton_next_pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def sweep_gemm(m: int, bits: int, bandwidth: float, keep: int = 5, linear: str = "attn.c_attn") -> list[GemmConfig | None]:
    """Every candidate on `linear` at m rows; the fastest `keep` (and the default, None)."""
    k, n = LINEARS[linear]
    copies = [random_weights(k, n, bits, seed=i) for i in range(8)]
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    scored = []
    for cfg in gemm_candidates(m):
        try:
            us, _ = timed(lambda a, w, c=cfg: gptq_gemm(a, w, c), x, copies, 1, bandwidth)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or fit
            print(f"  gemm m={m} {cfg}: {type(exc).__name__} {str(exc)[:100]}", file=sys.stderr)
            continue
        print(f"  sweep gemm bits={bits} {linear} m={m} {cfg}: {us:.2f} us", file=sys.stderr)
        scored.append((us, cfg))
    scored.sort(key=lambda s: s[0])
    print(f"sweep gemm {linear} m={m} best: " + "; ".join(f"{us:.1f} us {c}" for us, c in scored[:keep]))
    return [c for _, c in scored[:keep] if c is not None] + [None]


def bench_shape(name: str, k: int, n: int, bits: int, rows: list[int], gemv_cfgs: list,
                gemm_cfgs: dict[int, list], bandwidth: float) -> dict:
    copies = [random_weights(k, n, bits, seed=i) for i in range(COPIES)]
    nbytes = weight_bytes(copies[0])
    result = {"linear": name, "K": k, "N": n, "bits": bits, "MB": nbytes / 1e6, "roofline_us": nbytes / bandwidth * 1e6}
    x1 = torch.randn(1, k, dtype=torch.float16, device="cuda")
    best = None
    for cfg in gemv_cfgs:
        try:
            us, frac = timed(lambda a, w, c=cfg: gptq_gemv(a, w, c), x1, copies, nbytes, bandwidth)
        except Exception as exc:  # noqa: BLE001
            print(f"  gemv {cfg}: {type(exc).__name__} {str(exc)[:100]}", file=sys.stderr)
            continue
        print(f"  {name} bits={bits} gemv {cfg}: {us:.2f} us ({frac:.0%})", file=sys.stderr)
        if best is None or us < best[0]:
            best = (us, frac, cfg)
    result["gemv_us"], result["gemv_vs_copy_bw"], result["gemv_cfg"] = best[0], best[1], str(best[2])
    dense = [torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02 for _ in range(8)]
    for m in rows:
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        cfgs = gemm_cfgs.get(m, [None])
        gbest = None
        for cfg in cfgs:
            try:
                us, _ = timed(lambda a, w, c=cfg: gptq_gemm(a, w, c), x, copies[:16], nbytes, bandwidth)
            except Exception as exc:  # noqa: BLE001
                print(f"  gemm m={m} {cfg}: {type(exc).__name__} {str(exc)[:100]}", file=sys.stderr)
                continue
            print(f"  {name} bits={bits} gemm m={m} {cfg}: {us:.2f} us", file=sys.stderr)
            if gbest is None or us < gbest[0]:
                gbest = (us, cfg)
        result[f"gemm{m}_us"], result[f"gemm{m}_cfg"] = gbest[0], str(gbest[1])
        result[f"dequant_cublas{m}_us"] = time_graph(
            lambda a=x: [F.linear(a, gptq_dequantize(w, a.dtype), w.bias) for w in copies[:8]], replays=10) / 8 * 1e6
        result[f"linear{m}_us"] = time_graph(lambda a=x: [gptq_linear(a, w) for w in copies[:8]], replays=10) / 8 * 1e6
        result[f"dense{m}_us"] = time_graph(lambda a=x: [F.linear(a, d) for d in dense], replays=10) / 8 * 1e6
    result["cublas_gemv_us"] = time_graph(lambda: [F.linear(x1, d) for d in dense]) / 8 * 1e6
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-gemv-sweep", action="store_true", help="with --sweep: the GEMM's configurations only")
    parser.add_argument("--sweep-linear", default="attn.c_attn", choices=list(LINEARS),
                        help="the linear the GEMM sweep ranks its configurations on")
    parser.add_argument("--only", default="", help="comma-separated linears to benchmark (default: all)")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--rows", default="16,64,256")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    report = {"device": device_info(), "copy_bandwidth_GBs": bandwidth / 1e9, "checks": [], "linears": []}
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {report['device']}")
    rows = [int(r) for r in args.rows.split(",") if r]
    for bits in [int(b) for b in args.bits.split(",")]:
        report["checks"] += check(bits)
        fails = [c for c in report["checks"] if c.endswith("FAIL")]
        print("\n".join(fails) or f"bits={bits}: all kernel checks ok")
        gemv_cfgs = sweep_gemv(bits, bandwidth) if args.sweep and not args.no_gemv_sweep else [GemvConfig(), None]
        gemv_cfgs = [c for c in gemv_cfgs if c is not None] + [None]
        gemm_cfgs = {m: sweep_gemm(m, bits, bandwidth, linear=args.sweep_linear) for m in rows} \
            if args.sweep and bits == 4 else {}
        for name, (k, n) in LINEARS.items():
            if args.only and name not in args.only.split(","):
                continue
            r = bench_shape(name, k, n, bits, rows, gemv_cfgs, gemm_cfgs, bandwidth)
            report["linears"].append(r)
            gem = " ".join(f"M={m}: {r[f'gemm{m}_us']:.1f} (deq {r[f'dequant_cublas{m}_us']:.1f}, "
                           f"linear {r[f'linear{m}_us']:.1f}, dense {r[f'dense{m}_us']:.1f})" for m in rows)
            print(f"{name} int{bits} {k}x{n} {r['MB']:.1f} MB roof {r['roofline_us']:.2f} us | gemv {r['gemv_us']:.2f} us "
                  f"({r['gemv_vs_copy_bw']:.0%}) {r['gemv_cfg']} | cuBLAS fp16 gemv {r['cublas_gemv_us']:.2f} | {gem}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

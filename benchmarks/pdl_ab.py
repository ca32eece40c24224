"""A/B of PDL, the GEMV's first-step prefetch and the dual w1/w2 GEMV on the decode step (random
Qwen-7B Int4, static fp16 KV cache, one CUDA graph per token). Copy to benchmarks/ (or run from
anywhere with PYTHONPATH=src):  python3 pdl_ab.py [tokens]

Switches: QWEN_INT4_PDL=0|1 (kernels/pdl.py, read at each launch, so at capture),
QWEN_INT4_GEMV_PREFETCH=0|1 (GEMV first-step weights before gdc_wait; only with PDL),
dual GEMV: triton_decode._dual_gemv (replaced by `lambda mlp, y: None` to switch it off).
"""
import os
import sys

import torch

from qwen_int4.config import QwenConfig
from qwen_int4.kernels import triton_decode as td
from qwen_int4.kernels.triton_gptq_gemv import gptq_dual_gemv, gptq_gemv
from qwen_int4.testing import gpu_model as gm

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
print(gm.device_info())
bandwidth = gm.copy_bandwidth()
model = gm.build_int4_model(QwenConfig())
dual = td._dual_gemv
RUNS = [  # name, PDL, prefetch, dual
    ("baseline: no PDL, two GEMV launches", "0", "1", False),
    ("dual GEMV", "0", "1", True),
    ("PDL, no prefetch, dual", "1", "0", True),
    ("PDL + prefetch + dual", "1", "1", True),
    ("PDL + prefetch, two GEMV launches", "1", "1", False),
    ("baseline again", "0", "1", False),
]
for name, pdl, prefetch, use_dual in RUNS:
    os.environ["QWEN_INT4_PDL"], os.environ["QWEN_INT4_GEMV_PREFETCH"] = pdl, prefetch
    td._dual_gemv = dual if use_dual else (lambda mlp, y: None)
    r = gm.bench_decode(model, tokens, "fp16", bandwidth)
    print(f"{name:40s} {r['ms_per_token']:.3f} ms/token  {r['tok_s']:.1f} tok/s  {r['vs_roofline']:.1%} of roofline",
          flush=True)
td._dual_gemv = dual

# the MLP's w1/w2 of all 32 layers in one graph: dual launch vs two launches, PDL off and on
y = torch.randn(1, 4096, device="cuda").half()
ws = [(m.w1.kernel.weights(m.w1), m.w2.kernel.weights(m.w2)) for m in (b.mlp for b in model.transformer.h)]
for pdl in ("0", "1"):
    os.environ["QWEN_INT4_PDL"] = pdl
    t_two = gm.time_graph(lambda: [gptq_gemv(y, w2, gate=gptq_gemv(y, w1)) for w1, w2 in ws], replays=50)
    t_dual = gm.time_graph(lambda: [gptq_dual_gemv(y, w1, w2) for w1, w2 in ws], replays=50)
    print(f"PDL={pdl}: 32 x (w1, w2): two launches {t_two * 1e6 / 32:.1f} us/layer, dual {t_dual * 1e6 / 32:.1f} us/layer")

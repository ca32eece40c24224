"""Programmatic Dependent Launch (kernels/pdl.py): when it is on, what the kernels compile to, and
(marked gpu) that a captured decode step gives the same logits with it as without.

The compile checks build the sm_90 PTX with Triton's own ptxas (no GPU needed): the gdc
instructions appear only with PDL, `launch_dependents` before `wait`, and the GEMV's first-step
weight loads before the wait when it prefetches.
"""
import os

import pytest
import torch

from _triton import hopper_ptx

from qwen_int4.kernels import pdl


@pytest.fixture
def fake_hopper(monkeypatch):
    """torch reports CUDA device capability (9, 0) (no GPU needed); the cache is cleared around it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(pdl.ENV, raising=False)
    pdl._device_supports_pdl.cache_clear()
    yield monkeypatch
    pdl._device_supports_pdl.cache_clear()


def test_pdl_on_hopper_cuda_only(fake_hopper):
    pytest.importorskip("triton")
    assert pdl.triton_supports_pdl(), "the installed Triton should have launch_pdl and gdc_wait (3.6+)"
    assert pdl.pdl_enabled(torch.device("cuda", 0))
    assert not pdl.pdl_enabled(torch.device("cpu"))
    fake_hopper.setattr(torch.version, "hip", "6.2")  # ROCm: no PDL
    pdl._device_supports_pdl.cache_clear()
    assert not pdl.pdl_enabled(torch.device("cuda", 0))


def test_pdl_switches(fake_hopper):
    pytest.importorskip("triton")
    cuda = torch.device("cuda", 0)
    fake_hopper.setenv(pdl.ENV, "0")
    assert not pdl.pdl_enabled(cuda)
    fake_hopper.setenv(pdl.ENV, "1")
    assert pdl.pdl_enabled(cuda)
    fake_hopper.setenv("TRITON_INTERPRET", "1")  # the interpreter runs everything as before
    assert not pdl.pdl_enabled(cuda)


def test_pdl_needs_compute_capability_9(fake_hopper):
    fake_hopper.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert not pdl.pdl_enabled(torch.device("cuda", 0))


def test_gemv_prefetch_follows_pdl(monkeypatch):
    from qwen_int4.kernels.triton_gptq_gemv import PREFETCH_ENV, GemvConfig, _prefetch

    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert _prefetch(GemvConfig(), pdl=True) and not _prefetch(GemvConfig(), pdl=False)
    assert _prefetch(GemvConfig(prefetch=True), pdl=False) and not _prefetch(GemvConfig(prefetch=False), pdl=True)
    monkeypatch.setenv(PREFETCH_ENV, "0")
    assert not _prefetch(GemvConfig(), pdl=True)


def _ptx(fn, signature: dict, consts: dict, num_warps: int) -> str:
    return hopper_ptx(fn, signature, consts, num_warps, launch_pdl=consts["PDL"])


def _body(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if line.strip() and not line.strip().startswith(("//", "."))]


@pytest.mark.parametrize("pdl_on", [True, False])
def test_dual_gemv_ptx_prefetches_weights_before_the_wait(pdl_on):
    from qwen_int4.kernels import triton_gptq_gemv as gemv

    names = ["x_ptr", "qweight_ptr", "scales_ptr", "zeros_ptr", "bias_ptr", "gate_ptr", "gate_qweight_ptr",
             "gate_scales_ptr", "gate_zeros_ptr", "gate_bias_ptr", "out_ptr", "N", "K_WORDS", "UNITS", "GROUPS"]
    types = ["*i32", "*i32", "*fp16", "*u8", "*fp16", "*fp16", "*i32", "*fp16", "*u8", "*fp16", "*fp16"] + ["i32"] * 4
    consts = {"BITS": 4, "UNIT": 128, "UNITS_PER_GROUP": 1, "BLOCK_N": 2, "BLOCK_U": 16, "HAS_BIAS": False,
              "HAS_GATE": True, "GATE_GEMV": True, "GATE_HAS_BIAS": False, "HALF2": True, "X_BF16": False,
              "PDL": pdl_on, "PREFETCH": pdl_on}
    body = _body(_ptx(gemv._gemv_kernel, dict(zip(names, types)), consts, num_warps=2))
    if not pdl_on:
        assert not any("griddepcontrol" in line for line in body)
        return
    launch = next(i for i, line in enumerate(body) if "griddepcontrol.launch_dependents" in line)
    wait = next(i for i, line in enumerate(body) if "griddepcontrol.wait" in line)
    early = [line for line in body[:wait] if "ld.global" in line]
    assert launch < wait
    # both weights' first step: words (16-byte), scales (fp16) and zeros (uint8); x (and every store) after
    assert sum("ld.global.v4.b32" in line for line in early) == 4, early
    assert sum("ld.global.b16" in line for line in early) == 4 and sum("ld.global.b8" in line for line in early) == 4
    assert not any("st.global" in line for line in body[:wait])


def test_add_rms_norm_ptx_reads_only_the_norm_weight_before_the_wait():
    from qwen_int4.kernels import triton_decode as td

    signature = {"x_ptr": "*fp16", "res_ptr": "*fp16", "w_ptr": "*fp16", "y_ptr": "*fp16", "h_ptr": "*fp16", "n": "i32",
                 "eps": "fp32"}
    body = _body(_ptx(td._add_rms_norm_kernel, signature, {"BLOCK": 4096, "HAS_RES": True, "PDL": True}, num_warps=8))
    wait = next(i for i, line in enumerate(body) if "griddepcontrol.wait" in line)
    loads = [i for i, line in enumerate(body) if "ld.global" in line]
    early = [i for i in loads if i < wait]
    assert early and len(early) == len(loads) // 3  # w before; x and the residual (twice w's loads) after
    assert body.index(next(line for line in body if "griddepcontrol.launch_dependents" in line)) < wait
    assert not any("st.global" in line for line in body[:wait])


@torch.inference_mode()
def _decode_logits(model, steps: int, graph: bool) -> list[torch.Tensor]:
    """Logits of `steps` greedy decode steps (CUDAGraphDecoder) after a 3-token prompt."""
    from qwen_int4.engine.cuda_graph import CUDAGraphDecoder
    from qwen_int4.model.static_cache import StaticKVCache

    cache = StaticKVCache.for_model(model, 1, 64, "fp16")
    decoder = CUDAGraphDecoder(model, cache, splits=16, graph=graph)
    token = decoder.prefill(torch.tensor([[100, 2000, 30]], device="cuda")).argmax(-1)
    out = []
    for _ in range(steps):
        logits = decoder.step(token).clone()
        out.append(logits)
        token = logits.argmax(-1)
    return out


@pytest.mark.gpu
def test_decode_step_same_logits_with_and_without_pdl(monkeypatch):
    """Two 7B-wide layers (random Int4), the captured decode step: PDL on (prefetch on and off) must
    give the logits of PDL off bit for bit (same kernels, same order of arithmetic)."""
    pytest.importorskip("triton")
    from qwen_int4.config import QwenConfig
    from qwen_int4.kernels.triton_gptq_gemv import PREFETCH_ENV
    from qwen_int4.testing.gpu_model import build_int4_model

    if not pdl.pdl_enabled(torch.device("cuda")):
        pytest.skip(f"PDL is off here (compute capability {torch.cuda.get_device_capability()}, {pdl.ENV}="
                    f"{os.environ.get(pdl.ENV)!r})")
    model = build_int4_model(QwenConfig(num_hidden_layers=2))
    runs = {}
    for name, env in (("off", {pdl.ENV: "0"}), ("on", {pdl.ENV: "1"}), ("on, no prefetch", {pdl.ENV: "1", PREFETCH_ENV: "0"})):
        for key in (pdl.ENV, PREFETCH_ENV):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        runs[name] = _decode_logits(model, 6, graph=True)
        if name == "on":
            runs["on, eager"] = _decode_logits(model, 3, graph=False)
    for name, logits in runs.items():
        for i, (got, want) in enumerate(zip(logits, runs["off"])):
            assert torch.equal(got, want), (name, i, float((got.float() - want.float()).abs().max()))

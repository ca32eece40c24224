"""GPTQ kernel registry: ranked selection, every reason in the error, forcing by name or env var,
and GPTQLinear's prepare / release / state_dict life cycle."""
import pytest
import torch
from torch import nn

from qwen_int4.kernels import registry
from qwen_int4.kernels.registry import (
    KERNEL_ENV_VAR,
    GPTQKernel,
    NoKernelError,
    kernel_names,
    select_kernel,
)
from qwen_int4.quant.gptq import GPTQLinear, prepare_quantized_layers, quantize_rtn

CPU = torch.device("cpu")
needs_tinygemm = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch without the CPU int4 op"
)


class RecordingKernel(GPTQKernel):
    """A test kernel: the reference forward, accepts only out_features == 48, tracks prepare."""

    name = "recording"
    buffer_names = ("recording_marker",)

    @classmethod
    def can_implement(cls, bits, group_size, desc_act, in_features, out_features, device, dtype):
        return (out_features == 48, "" if out_features == 48 else f"wants out_features 48, got {out_features}")

    def prepare(self, layer):
        layer.register_buffer("recording_marker", torch.ones(1), persistent=False)

    def forward(self, layer, x):
        return registry.TorchDequantKernel().forward(layer, x) + 0


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    return monkeypatch


def args(**over):
    base = {"bits": 4, "group_size": 128, "desc_act": False, "in_features": 4096, "out_features": 11008,
            "device": CPU, "dtype": torch.float16}
    return {**base, **over}


def make_layer(k_in=128, n_out=48, bits=4, group_size=32, desc_act=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = GPTQLinear(k_in, n_out, bits, group_size, desc_act)
    w = torch.randn(n_out, k_in, generator=gen) * 0.05
    tensors = quantize_rtn(w, bits, group_size, desc_act=desc_act, sym=False, seed=seed)
    layer.load_state_dict({**tensors, "bias": (torch.randn(n_out, generator=gen) * 0.1).half()})
    return layer


@needs_tinygemm
def test_ranked_choice_on_cpu(env):
    assert select_kernel(**args()).name == "tinygemm-cpu"
    assert select_kernel(**args(bits=8, desc_act=True)).name == "tinygemm-cpu"
    # what tinygemm cannot do falls through to the reference
    assert select_kernel(**args(dtype=torch.float32)).name == "torch-dequant"
    assert select_kernel(**args(group_size=16)).name == "torch-dequant"
    assert select_kernel(**args(out_features=200)).name == "torch-dequant"
    assert select_kernel(**args(device=torch.device("meta"))).name == "torch-dequant"


def test_reference_is_last_everywhere_and_takes_anything():
    for device_type, paths in registry.RANKED_KERNELS.items():
        assert paths[-1].endswith(":TorchDequantKernel"), device_type
    assert {"torch-dequant", "tinygemm-cpu"} <= set(kernel_names())
    odd = args(bits=8, group_size=-1, desc_act=True, in_features=40, out_features=8, dtype=torch.float32)
    assert select_kernel(**odd, force="torch-dequant").name == "torch-dequant"


def test_error_lists_every_reason(env):
    env.setitem(registry.RANKED_KERNELS, "cpu", [
        f"{__name__}:RecordingKernel",
        "qwen_int4.kernels.cpu_int4:TinygemmCPUKernel",
        "no_such_module_xyz:Kernel",
    ])
    with pytest.raises(NoKernelError) as info:
        select_kernel(**args(dtype=torch.float32, out_features=200))
    message = str(info.value)
    assert "4096->200" in message and "float32" in message
    assert "recording: wants out_features 48, got 200" in message
    assert "tinygemm-cpu: " in message  # its own reason (dtype or N)
    assert "cannot import no_such_module_xyz:Kernel" in message


def test_one_line_registration_and_ranking(env):
    env.setitem(registry.RANKED_KERNELS, "cpu", [f"{__name__}:RecordingKernel", *registry.RANKED_KERNELS["cpu"]])
    assert select_kernel(**args(out_features=48)) is RecordingKernel
    assert select_kernel(**args(out_features=64)) is not RecordingKernel
    layer = make_layer(n_out=48)
    assert layer.process_weights_after_loading() == "recording"
    assert "recording_marker" in dict(layer.named_buffers()) and "recording_marker" not in layer.state_dict()
    layer.release_kernel()
    assert "recording_marker" not in dict(layer.named_buffers()) and layer.kernel is None


def test_force_by_argument_and_env(env):
    assert select_kernel(**args(), force="torch-dequant").name == "torch-dequant"
    env.setenv(KERNEL_ENV_VAR, "torch-dequant")
    assert select_kernel(**args()).name == "torch-dequant"
    layer = make_layer()
    assert layer.process_weights_after_loading() == "torch-dequant"


@needs_tinygemm
def test_argument_beats_env_and_forced_kernel_must_fit(env):
    env.setenv(KERNEL_ENV_VAR, "torch-dequant")
    assert select_kernel(**args(), force="tinygemm-cpu").name == "tinygemm-cpu"
    env.setenv(KERNEL_ENV_VAR, "tinygemm-cpu")
    with pytest.raises(NoKernelError, match=rf"'tinygemm-cpu' \(\${KERNEL_ENV_VAR}=tinygemm-cpu\).*multiple of 16"):
        select_kernel(**args(out_features=200))


def test_unknown_kernel_name_lists_the_known(env):
    with pytest.raises(NoKernelError, match=r"unknown GPTQ kernel 'nope'.*torch-dequant"):
        select_kernel(**args(), force="nope")


@pytest.mark.parametrize("kernel", ["torch-dequant", pytest.param("tinygemm-cpu", marks=needs_tinygemm)])
def test_state_dict_is_the_checkpoint_layout_after_prepare(env, kernel):
    layer = make_layer(bits=4, desc_act=True, seed=3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.process_weights_after_loading(kernel=kernel)
    after = layer.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    layer.release_kernel()
    assert layer.qweight is not None and torch.equal(layer.qweight, before["qweight"])


@needs_tinygemm
def test_load_state_dict_into_prepared_layer_drops_the_stale_repack(env):
    layer = make_layer(seed=1)
    other = make_layer(seed=2)
    layer.process_weights_after_loading(kernel="tinygemm-cpu")
    layer.load_state_dict(other.state_dict())
    assert layer.kernel is None  # back to the reference path on the new tensors
    x = torch.randn(2, 128, dtype=torch.float16)
    torch.testing.assert_close(layer(x), other(x))
    layer.process_weights_after_loading(kernel="tinygemm-cpu")
    torch.testing.assert_close(layer(x), other(x), rtol=0.02, atol=0.02)


@needs_tinygemm
def test_switching_kernels_and_wrong_device(env):
    layer = make_layer(seed=4)
    x = torch.randn(3, 128, dtype=torch.float16)
    want = layer(x)
    for name in ("tinygemm-cpu", "torch-dequant", "tinygemm-cpu"):
        assert layer.process_weights_after_loading(kernel=name) == name
        torch.testing.assert_close(layer(x), want, rtol=0.02, atol=0.02)
    assert "kernel=tinygemm-cpu" in repr(layer)
    layer.to("meta")
    with pytest.raises(RuntimeError, match="prepared for cpu .* input on meta.*prepare_quantized_layers"):
        layer(x.to("meta"))


def test_prepare_quantized_layers_counts_and_names_the_layer(env):
    model = nn.Module()
    model.embed = nn.Linear(4, 4).half()
    model.a = make_layer(n_out=48)
    model.b = make_layer(n_out=64)
    assert prepare_quantized_layers(model, kernel="torch-dequant") == {"torch-dequant": 2}
    env.setitem(registry.RANKED_KERNELS, "cpu", [f"{__name__}:RecordingKernel"])
    with pytest.raises(NoKernelError, match=r"^b: no GPTQ kernel can run layer 128->64"):
        prepare_quantized_layers(model)

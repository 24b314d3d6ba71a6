"""controlnet.models.kernels: the same outputs and gradients as PyTorch's own layers, taken where they apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from controlnet.models import kernels

pytestmark = pytest.mark.skipif(
    not kernels._onednn_matmul_available(), reason="this PyTorch build has no oneDNN matmul"
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest value


@pytest.fixture
def any_size(monkeypatch):
    """The kernels on small layers too (by default they take only layers large enough to gain)."""
    monkeypatch.setattr(kernels, "MIN_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(kernels, "MIN_CONV_CHANNEL_PRODUCT", 0)


def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    scale = reference.abs().max().clamp_min(1e-12)
    return bool((ours.float() - reference.float()).abs().max() / scale <= TOLERANCE[reference.dtype])


def outputs_and_gradients(module: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """The output and the gradients of x and of every parameter that requires one, for a fixed
    random output gradient."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]
    return [out, *torch.autograd.grad(out, inputs, grad)]


def backward_name(module: torch.nn.Module, x: torch.Tensor) -> str:
    return type(module(x.requires_grad_(True)).grad_fn).__name__


@pytest.mark.parametrize("shape", [(6, 40), (2, 5, 40)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_matches_pytorch_in_float32(any_size, shape, bias, frozen):
    torch.manual_seed(0)
    layer = kernels.Linear(40, 24, bias=bias).requires_grad_(not frozen)
    x = torch.randn(shape)
    ours = outputs_and_gradients(layer, x)
    with kernels.disabled():
        reference = outputs_and_gradients(layer, x)
    assert len(ours) == len(reference) == 2 + (0 if frozen else 1 + bias)
    assert all(close(a, b) for a, b in zip(ours, reference, strict=True))
    assert backward_name(layer, x) == "_OneDNNLinearBackward"


def test_linear_leaves_other_cases_to_pytorch(any_size):
    """bfloat16 (already oneDNN), autocast, and inside disabled(): PyTorch's own F.linear."""
    layer = kernels.Linear(8, 4)
    x = torch.randn(3, 8)
    assert backward_name(layer.to(torch.bfloat16), x.to(torch.bfloat16)) == "AddmmBackward0"
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backward_name(layer, x) == "AddmmBackward0"
    with kernels.disabled():
        assert backward_name(layer, x) == "AddmmBackward0"
    assert backward_name(layer, x) == "_OneDNNLinearBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("size", "stride", "channels_in"),
    [((4, 4), 1, 16), ((8, 8), 2, 16), ((3, 5), 1, 7), ((7, 5), 2, 7), ((1, 1), 1, 4)],
)
def test_small_map_convolution_matches_pytorch(any_size, dtype, size, stride, channels_in):
    torch.manual_seed(0)
    conv = kernels.Conv2d(channels_in, 12, 3, stride=stride, padding=1).to(dtype)
    x = torch.randn(2, channels_in, *size, dtype=dtype)
    ours = outputs_and_gradients(conv, x)
    with kernels.disabled():
        reference = outputs_and_gradients(conv, x)
    assert [t.dtype for t in ours] == [t.dtype for t in reference]
    assert ours[0].shape == reference[0].shape and ours[0].is_contiguous()
    assert all(close(a, b) for a, b in zip(ours, reference, strict=True))
    assert backward_name(conv, x) == "_Im2colConv3x3Backward"


def test_small_map_convolution_under_autocast_keeps_float32_weights(any_size):
    """bf16 mixed precision: the product in bfloat16, the weight gradient back in float32, as
    autocast's own convolution."""
    torch.manual_seed(0)
    conv = kernels.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = outputs_and_gradients(conv, x)
        with kernels.disabled():
            reference = outputs_and_gradients(conv, x)
    assert ours[0].dtype == reference[0].dtype == torch.bfloat16
    assert ours[2].dtype == reference[2].dtype == torch.float32
    for a, b in zip(ours, reference, strict=True):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


def test_larger_maps_and_other_convolutions_stay_with_pytorch(any_size):
    checks = [
        (kernels.Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 8, 8)),  # 64 output positions
        (kernels.Conv2d(4, 4, 1), torch.randn(1, 4, 4, 4)),  # 1x1
        (kernels.Conv2d(4, 4, 3, padding=1, groups=2), torch.randn(1, 4, 4, 4)),
        (kernels.Conv2d(4, 4, 3, padding=0), torch.randn(1, 4, 4, 4)),
        (kernels.Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 4, 4).to(memory_format=torch.channels_last)),
        (kernels.Conv2d(4, 4, 3, padding=1).half(), torch.randn(1, 4, 4, 4).half()),
    ]
    for conv, x in checks:
        assert backward_name(conv, x) == "ConvolutionBackward0", conv


def test_mismatched_dtypes_raise_pytorchs_error(any_size):
    conv = kernels.Conv2d(4, 4, 3, padding=1).to(torch.bfloat16)
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 4, 4, 4))


def test_flop_counts_are_those_of_the_layers(any_size):
    """FlopCounterMode counts the oneDNN products as it counts PyTorch's own."""
    layer, x = kernels.Linear(40, 24), torch.randn(2, 5, 40)
    conv, image = kernels.Conv2d(8, 6, 3, padding=1), torch.randn(2, 8, 4, 4)
    counts = []
    for context in (kernels.disabled, lambda: torch.enable_grad()):
        counter = FlopCounterMode(display=False)
        with context(), counter:
            layer(x)
            conv(image)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 10 * 40 * 24 + 2 * 32 * 8 * 9 * 6


def test_same_parameters_and_keys_as_torch_layers():
    assert list(kernels.Linear(3, 2).state_dict()) == list(torch.nn.Linear(3, 2).state_dict())
    assert list(kernels.Conv2d(3, 2, 3).state_dict()) == list(torch.nn.Conv2d(3, 2, 3).state_dict())
    conv = kernels.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)


def test_small_layers_stay_with_pytorch_by_default():
    """Under the size floors a oneDNN call's set-up costs more than it saves: PyTorch's own kernels.
    SD 1.5's layers that gain are above them: the 77-token cross-attention keys and values of the
    first level (batch 2) and the 1280-channel 3x3 convolutions of the 4x4 level."""
    small_linear, small_conv = kernels.Linear(64, 64), kernels.Conv2d(512, 512, 3, padding=1)
    assert backward_name(small_linear, torch.randn(154, 64)) == "AddmmBackward0"
    assert backward_name(small_conv, torch.randn(2, 512, 4, 4)) == "ConvolutionBackward0"
    cross_attention_kv = kernels.Linear(768, 320, bias=False)
    assert backward_name(cross_attention_kv, torch.randn(2, 77, 768)) == "_OneDNNLinearBackward"
    level_4_conv = kernels.Conv2d(1280, 1280, 3, padding=1)
    assert backward_name(level_4_conv, torch.randn(2, 1280, 4, 4)) == "_Im2colConv3x3Backward"


def test_turning_the_kernels_off_in_one_thread_leaves_another_threads_on(any_size):
    """disabled() is a context variable, not a process-wide switch: a server job running in another
    thread keeps the kernels while a comparison turns them off here."""
    import threading

    layer = kernels.Linear(40, 24)
    x = torch.randn(6, 40)
    inside, seen = threading.Event(), {}

    def other_job() -> None:
        inside.wait(timeout=30)
        seen["other"] = backward_name(layer, x.clone())

    worker = threading.Thread(target=other_job)
    worker.start()
    with kernels.disabled():
        inside.set()
        worker.join(timeout=30)
        seen["here"] = backward_name(layer, x.clone())
    assert seen == {"other": "_OneDNNLinearBackward", "here": "AddmmBackward0"}

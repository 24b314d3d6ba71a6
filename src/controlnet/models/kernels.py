"""Faster CPU kernels for two cases where PyTorch's own choice is slow, with the same results.

1. float32 linear layers. PyTorch runs float32 ``F.linear`` through MKL's sgemm; oneDNN's matmul
   (which PyTorch already uses for bfloat16) computes the same product faster on the shapes of a
   UNet's attention and feed-forward layers: a layer's forward and backward 1.1-1.7x on an AVX-512
   EPYC (the wide GEGLU projections most). The weight gradient stays with MKL (no faster there).
2. 3x3 convolutions with at most 16 output positions and many channels: the UNet's 4x4 level, which
   a 256 px training step reaches. oneDNN's direct convolution produces only a few dozen output
   pixels per weight it reads there and runs at about a third of the machine's speed, its weight
   gradient worse. The same convolution as a matrix product (im2col: ``F.unfold``, then oneDNN's
   matmul over all the batch's positions) runs forward and backward 1.3-2.1x faster in float32,
   1.4-1.9x in bfloat16.

Both give the same sums in another order: float32 results agree to about 1e-6 relative, bfloat16
to one rounding step. ``benchmarks/bench_kernels.py`` prints both sides on the machine at hand.

``Linear`` and ``Conv2d`` are ``nn.Linear`` / ``nn.Conv2d`` with these kernels where they apply
(same parameters, same state-dict keys) and PyTorch's own everywhere else: other devices and
dtypes, autocast to float16, tensor subclasses (FSDP's DTensor), ``torch.compile``, channels_last
weights. ``disabled()`` turns them off in the current thread (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Where the kernels apply (measured with benchmarks/bench_kernels.py and the whole training step).
# Below these sizes a oneDNN call's fixed cost (about 70 microseconds here) outweighs the gain: the
# tiny test models ran 30% slower with no floor.
MIN_MULTIPLY_ADDS = 2**25  # linear layers: rows x in x out (SD 1.5's smallest, the 77-token k/v, is 2^25.2)
# 3x3 convolutions: output positions per image (4x4 gains 1.4-3x; 8x8 is even forward and mixed
# backward) and in x out channels (SD 1.5's 4x4 level has 1280; at 512 or fewer oneDNN's own is
# as fast or faster).
SMALL_MAP_POSITIONS = 16
MIN_CONV_CHANNEL_PRODUCT = 768 * 768

# Whether the kernels are on, for the current thread or task only (a context variable): turning them
# off to compare never changes what another job of the same process computes.
_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("controlnet_kernels_enabled", default=True)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """PyTorch's own kernels inside the block (to compare with them), in this thread or task only."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


@functools.cache
def _onednn_matmul_available() -> bool:
    """Whether this build has oneDNN's matmul op; on the first call, teach ``FlopCounterMode`` its
    cost (it knows PyTorch's own products only), so that FLOP counts stay right with these kernels."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _matmul_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape) * weight_shape[0]

    return True


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN (``weight`` [out, in]; any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _plain(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a CPU product of ``x`` runs in here (autocast's if it is on), or None where these
    kernels do not apply."""
    if not _enabled.get() or x.device.type != "cpu" or torch.compiler.is_compiling() or not _onednn_matmul_available():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype in (torch.float32, torch.bfloat16) else None


def _parameter_gradients(ctx, grad_rows: torch.Tensor, input_rows: torch.Tensor) -> tuple:
    """The weight gradient [out, in] and the bias gradient of a product ``input_rows @ weight.T + bias``
    from its output gradient (both [rows, ...]), each only if asked for (a frozen layer skips them;
    a missing bias is never asked for)."""
    grad_weight = grad_rows.t() @ input_rows if ctx.needs_input_grad[1] else None
    grad_bias = grad_rows.sum(0) if ctx.needs_input_grad[2] else None
    return grad_weight, grad_bias


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _matmul(grad, weight.t()) if ctx.needs_input_grad[0] else None
        rows = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        return grad_x, *_parameter_gradients(ctx, *rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, by oneDNN for float32 on a CPU (bfloat16 goes there already)."""
    if (
        x.numel() * weight.shape[0] >= MIN_MULTIPLY_ADDS  # first: the cheapest test, and most small layers fail it
        and weight.dtype == torch.float32
        and _compute_dtype(x) == torch.float32
        and _plain(x, weight, bias)
    ):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _Im2colConv3x3(torch.autograd.Function):
    """A 3x3 convolution (padding 1, stride 1 or 2) as one matrix product over all output positions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
        batch, channels, height, width = x.shape
        out_channels = weight.shape[0]
        out_height, out_width = (height - 1) // stride + 1, (width - 1) // stride + 1
        # [N, C*9, L] -> [N*L, C*9]: one row per output position, in the weight's (c, ky, kx) order
        columns = F.unfold(x, 3, padding=1, stride=stride).transpose(1, 2).reshape(-1, channels * 9)
        out = _matmul(columns, weight.reshape(out_channels, -1), bias)
        ctx.save_for_backward(columns, weight)
        ctx.geometry = (batch, channels, height, width, stride, out_height * out_width)
        return out.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        columns, weight = ctx.saved_tensors
        batch, channels, height, width, stride, positions = ctx.geometry
        out_channels = weight.shape[0]
        flat = grad.permute(0, 2, 3, 1).reshape(-1, out_channels)  # [N*L, C_out]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_columns = _matmul(flat, weight.reshape(out_channels, -1).t())  # [N*L, C*9]
            grad_columns = grad_columns.view(batch, positions, channels * 9).transpose(1, 2)
            grad_x = F.fold(grad_columns, (height, width), 3, padding=1, stride=stride)
        grad_weight, grad_bias = _parameter_gradients(ctx, flat, columns)
        if grad_weight is not None:
            grad_weight = grad_weight.view_as(weight)
        return grad_x, grad_weight, grad_bias, None


def _small_map_conv3x3(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` is a 3x3 convolution that im2col runs faster (see the docstring)."""
    if conv.in_channels * conv.out_channels < MIN_CONV_CHANNEL_PRODUCT or conv.kernel_size != (3, 3):
        return False
    if conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        return False
    if conv.stride not in ((1, 1), (2, 2)) or conv.padding_mode != "zeros" or x.dim() != 4:
        return False
    stride = conv.stride[0]
    positions = ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1)
    return positions <= SMALL_MAP_POSITIONS and x.is_contiguous() and conv.weight.is_contiguous()


class Linear(nn.Linear):
    """``nn.Linear`` through ``kernels.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d``, as im2col + oneDNN matmul where that is faster (3x3 on maps of 4x4 or less)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _small_map_conv3x3(self, x):  # first: the cheapest test, and most convolutions fail it
            return super().forward(x)
        dtype = _compute_dtype(x)
        if dtype is None or not _plain(x, self.weight, self.bias):
            return super().forward(x)
        if not torch.is_autocast_enabled("cpu") and self.weight.dtype != x.dtype:
            return super().forward(x)  # PyTorch's own error
        weight, bias = self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):  # what autocast would do: the product in its dtype
            return _Im2colConv3x3.apply(x.to(dtype), weight, bias, self.stride[0])

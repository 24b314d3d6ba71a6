"""PiDiNet, the pixel-difference edge network (Su et al., ICCV 2021; ``table5_pidinet.pth``,
github.com/hellozhuo/pidinet: MIT licence text, preceded by the authors' note that it is for
research and that commercial use should be discussed with them first; annotator/pidinet/LICENSE),
in the configuration ControlNet 1.1 uses: 60 channels, the "carv4" pattern of pixel-difference
convolutions, CDCM dilation modules of 24 channels and CSAM attention (ControlNet-v1-1-nightly
annotator/pidinet/model.py, ``pidinet()``).

A pixel-difference convolution convolves differences of pixels instead of pixels, by a 3x3 kernel w:
- "cd" (central): sum_i w_i (x_i - x_centre); the same as w with sum(w) taken from its centre.
- "ad" (angular): sum_i w_i (x_i - x_next(i)), neighbours taken clockwise around the centre; the
  same as the kernel w - w[clockwise predecessor] (the centre stays w_centre - w_centre = 0).
- "rd" (radial): the eight outer taps of a 5x5 window minus the inner ring's taps in the same
  directions, weighted by w's outer taps; the same as a 5x5 kernel with +w at the outer positions and
  -w at the inner ones.
So each is a plain convolution of rewritten weights. The file holds the 3x3 kernels; `convert()`
rewrites them once after loading (as the PiDiNet authors' ``convert_pidinet`` does), and the network
then runs ordinary convolutions. The reference detector does not convert: it rebuilds the kernels
from the 3x3 weights at every call (the same values), and evaluates "cd" as two convolutions,
conv(x, w) - conv(x, sum(w)), which is kept here (see `PixelDifferenceConv`).

Module names equal the file's keys once DataParallel's ``module.`` prefix is removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 60  # channels of the first stage; 120 and 240 after it
DILATION_CHANNELS = 24  # the CDCM modules' width ("dil" in the reference)
# The "carv4" pattern: the kind of the init block's convolution, then of each of the 15 blocks.
CARV4: tuple[str, ...] = ("cd", "ad", "rd", "cv") * 4

# Where each tap of the 3x3 kernel (row-major 0..8) takes its "next" pixel for "ad": the clockwise
# predecessor around the centre (the centre, 4, pairs with itself).
_CLOCKWISE_PREDECESSOR = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# For "rd": the 5x5 positions (row-major 0..24) of the outer taps and of the inner taps in the same
# eight directions. They take the stored kernel's taps 1..8 (row-major) in this order; tap 0 is unused.
_RD_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
_RD_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


def plain_kernel(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """The ordinary convolution kernel equal to a pixel-difference convolution of ``kind`` ("cv",
    "ad" or "rd") with the 3x3 ``weight`` (out, in / groups, 3, 3): 3x3, or 5x5 for "rd". ("cd" is
    kept as the reference computes it: see `PixelDifferenceConv`.)"""
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels, in_channels, 9)
    if kind == "cv":
        return weight.clone()
    if kind == "ad":
        return (flat - flat[:, :, list(_CLOCKWISE_PREDECESSOR)]).reshape(weight.shape)
    if kind == "rd":
        kernel = weight.new_zeros(out_channels, in_channels, 25)
        kernel[:, :, list(_RD_OUTER)] = flat[:, :, 1:]
        kernel[:, :, list(_RD_INNER)] = -flat[:, :, 1:]
        return kernel.reshape(out_channels, in_channels, 5, 5)
    raise ValueError(f"no plain kernel for the pixel-difference convolution {kind!r}")


class PixelDifferenceConv(nn.Conv2d):
    """A 3x3 convolution (no bias) whose stored weight is a pixel-difference kernel of ``kind``.

    `convert()` (once, after loading) makes it an ordinary convolution: "ad" and "rd" kernels are
    rewritten (`plain_kernel`); "cd" keeps w and subtracts conv(x, sum(w)), a 1x1 (per-channel, for
    the depthwise blocks) product, as the reference does, so that its sums are the reference's to
    the last bit (folding sum(w) into w's centre changes their order, and the random weights of the
    tests amplify such differences into visible ones)."""

    def __init__(self, kind: str, channels_in: int, channels_out: int, groups: int = 1) -> None:
        super().__init__(channels_in, channels_out, 3, padding=1, groups=groups, bias=False)
        self.kind = kind
        self.converted = False
        self.centre: nn.Parameter | None = None

    def convert(self) -> None:
        with torch.no_grad():
            if self.kind == "cd":
                self.centre = nn.Parameter(self.weight.sum(dim=(2, 3), keepdim=True), requires_grad=False)
            else:
                kernel = plain_kernel(self.kind, self.weight)
                self.weight = nn.Parameter(kernel, requires_grad=False)
                size = kernel.shape[-1]
                self.kernel_size, self.padding = (size, size), (size // 2, size // 2)
        self.converted = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.converted:
            raise RuntimeError("PixelDifferenceConv used before convert()")
        y = super().forward(x)
        if self.centre is not None:
            y = y - F.conv2d(x, self.centre, groups=self.groups)
        return y


class PDCBlock(nn.Module):
    """Depthwise pixel-difference convolution, ReLU, 1x1 convolution, plus the input; stride 2
    blocks first max-pool and project the shortcut to the new width."""

    def __init__(self, kind: str, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.pool = nn.MaxPool2d(2, 2)
            self.shortcut = nn.Conv2d(channels_in, channels_out, 1)
        self.conv1 = PixelDifferenceConv(kind, channels_in, channels_in, groups=channels_in)
        self.conv2 = nn.Conv2d(channels_in, channels_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = self.pool(x)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1 to 24 channels, then the sum of four 3x3
    convolutions dilated 5, 7, 9 and 11."""

    def __init__(self, channels_in: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 1)
        self.conv2_1, self.conv2_2, self.conv2_3, self.conv2_4 = (
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False) for d in (5, 7, 9, 11)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention: the input scaled by sigmoid(conv3x3(conv1x1(relu(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    """A 1x1 convolution to one edge map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """(1, 3, H, W) BGR in 0..1 -> the fused edge probability (1, 1, H, W), the last of the
    reference's five outputs (the only one the annotator uses). Call `convert()` once after loading."""

    def __init__(self) -> None:
        super().__init__()
        kinds = iter(CARV4)
        self.init_block = PixelDifferenceConv(next(kinds), 3, WIDTH)
        widths = (WIDTH, 2 * WIDTH, 4 * WIDTH, 4 * WIDTH)
        # the blocks of each stage by name: block1_1..block1_3, then block{2,3,4}_1..4, the first of
        # stages 2-4 halving the size (plain strings: registering the modules twice would add keys)
        self._stages = tuple(tuple(f"block{s}_{i}" for i in range(1, 4 if s == 1 else 5)) for s in range(1, 5))
        channels = WIDTH
        for names, width in zip(self._stages, widths, strict=True):
            for name in names:
                stride = 2 if name.endswith("_1") and name != "block1_1" else 1
                setattr(self, name, PDCBlock(next(kinds), channels, width, stride))
                channels = width
        self.dilations = nn.ModuleList(CDCM(w, DILATION_CHANNELS) for w in widths)
        self.attentions = nn.ModuleList(CSAM(DILATION_CHANNELS) for _ in widths)
        self.conv_reduces = nn.ModuleList(MapReduce(DILATION_CHANNELS) for _ in widths)
        self.classifier = nn.Conv2d(4, 1, 1)

    def convert(self) -> PiDiNet:
        """Rewrite every pixel-difference kernel as the equal plain kernel (once, after loading)."""
        for module in self.modules():
            if isinstance(module, PixelDifferenceConv):
                module.convert()
        return self

    def forward(self, bgr: torch.Tensor) -> torch.Tensor:
        height, width = bgr.shape[-2:]
        x = self.init_block(bgr)
        edges = []
        for k, stage in enumerate(self._stages):
            for name in stage:
                x = getattr(self, name)(x)
            edge = self.conv_reduces[k](self.attentions[k](self.dilations[k](x)))
            edges.append(F.interpolate(edge, (height, width), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(edges, dim=1)))

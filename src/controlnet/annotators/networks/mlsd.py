"""M-LSD large (Gu et al. 2022, "Towards light-weight and real-time line segment detection";
github.com/navervision/mlsd, Apache-2.0), the PyTorch port ControlNet uses for `mlsd`
(``mlsd_large_512_fp32.pth``; ControlNet-v1-1-nightly annotator/mlsd/models/mbv2_mlsd_large.py).

A MobileNetV2 encoder cut after its 96-channel stage (features 0-13), whose features at strides 2,
4, 8, 16 and 16 feed a decoder of four merge blocks (A: 1x1 conv + BN + ReLU on both inputs, the
deeper one bilinearly doubled, then concatenated; B: two 3x3 conv + BN + ReLU with a residual), and
a head (C: dilated 3x3, 3x3, 1x1 to 16 channels). The last 9 channels are the output, at half the
input size: channel 0 the logit of "a segment's centre is here", channels 1-4 the displacements
from the centre to the segment's two ends (x, y, x, y).

As in the TFLite model it was ported from, stride-2 convolutions pad only on the right and bottom
(one zero column and row). Module names equal the file's keys (``backbone.features.3.conv.1.0.
weight``, ``block15.conv1.0.weight``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# MobileNetV2's inverted-residual stages as M-LSD keeps them: expansion, channels, repeats, stride
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
_TAPS = (1, 3, 6, 10, 13)  # the features whose outputs the decoder reads


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6; stride 2 pads one zero row and column after, as TFLite."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = 0 if stride == 2 else (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (unless 1), 3x3 depthwise, 1x1 projection + BN; a
    residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel=1)] if expansion != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False)]
        self.conv = nn.Sequential(*layers, nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """The encoder: input 4 channels (RGB and a constant one), outputs the five tapped features."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(4, 32, stride=2)]
        channels = 32
        for expansion, cout, repeats, stride in _STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(channels, cout, stride if i == 0 else 1, expansion))
                channels = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        return taps


def _conv_bn_relu(cin: int, cout: int, kernel: int, padding: int = 0, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class BlockTypeA(nn.Module):
    """Merge a shallow feature `a` and a deep one `b`: both through 1x1 conv + BN + ReLU, `b`
    doubled in size (bilinear, corners aligned) unless `upscale` is False, then [a, b]."""

    def __init__(self, in_a: int, in_b: int, out_a: int, out_b: int, upscale: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_b, out_b, 1)
        self.conv2 = _conv_bn_relu(in_a, out_a, 1)
        self.upscale = upscale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = self.conv1(b)
        a = self.conv2(a)
        if self.upscale:
            b = F.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((a, b), dim=1)


class BlockTypeB(nn.Module):
    """3x3 conv + BN + ReLU with a residual, then 3x3 conv + BN + ReLU to `cout` channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cin, 3, padding=1)
        self.conv2 = _conv_bn_relu(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class BlockTypeC(nn.Module):
    """The head: 3x3 conv dilated 5 + BN + ReLU, 3x3 conv + BN + ReLU, 1x1 conv to `cout`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cin, 3, padding=5, dilation=5)
        self.conv2 = _conv_bn_relu(cin, cin, 3, padding=1)
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    """(N, 4, H, W) in [-1, 1] (RGB and a channel of ones, /127.5 - 1), H and W multiples of 32 ->
    (N, 9, H/2, W/2): the centre logits and the end displacements in channels 0-4."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV2Features()
        self.block15 = BlockTypeA(64, 96, 64, 64, upscale=False)
        self.block16 = BlockTypeB(128, 64)
        self.block17 = BlockTypeA(32, 64, 64, 64)
        self.block18 = BlockTypeB(128, 64)
        self.block19 = BlockTypeA(24, 64, 64, 64)
        self.block20 = BlockTypeB(128, 64)
        self.block21 = BlockTypeA(16, 64, 64, 64)
        self.block22 = BlockTypeB(128, 64)
        self.block23 = BlockTypeC(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]

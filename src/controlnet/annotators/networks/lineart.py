"""The line-art generator of "Learning to generate line drawings that convey geometry and semantics"
(Chan, Durand, Isola 2022; github.com/carolineec/informative-drawings, MIT licence), as ControlNet
1.1 uses it for `lineart_realistic` (``sk_model.pth``) and `lineart_coarse` (``sk_model2.pth``):
ControlNet-v1-1-nightly annotator/lineart/__init__.py builds it with 3 residual blocks.

A ResNet-style image-to-image network: a 7x7 stem, two stride-2 convolutions, residual blocks, two
transposed convolutions back to full size and a 7x7 convolution to one sigmoid channel (dark lines
on white). Its normalisations are InstanceNorm without affine parameters or running statistics, so
the file holds convolutions only. Module names equal the file's keys (``model0.1.weight``,
``model2.0.conv_block.1.weight``, ...): the positions inside each `nn.Sequential` are the original's.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.InstanceNorm2d:
    # the original's nn.InstanceNorm2d defaults: no affine parameters, statistics of each image
    return nn.InstanceNorm2d(channels)


class ResidualBlock(nn.Module):
    """x + (pad, 3x3 conv, norm, ReLU, pad, 3x3 conv, norm)(x); convolutions at positions 1 and 5."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """RGB in [0, 1], (N, 3, H, W) with H and W multiples of 4 -> line map in [0, 1], (N, 1, H, W)."""

    def __init__(self, residual_blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), _norm(64), nn.ReLU(inplace=True))
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            _norm(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1),
            _norm(256),
            nn.ReLU(inplace=True),
        )
        self.model2 = nn.Sequential(*(ResidualBlock(256) for _ in range(residual_blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1),
            _norm(128),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1),
            _norm(64),
            nn.ReLU(inplace=True),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))

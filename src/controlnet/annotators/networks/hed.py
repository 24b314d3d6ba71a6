"""ControlNet 1.1's retrained HED soft-edge network (``ControlNetHED.pth``, lllyasviel/Annotators,
Apache-2.0; ControlNet-v1-1-nightly annotator/hed/__init__.py, class ControlNetHED_Apache2).

Unlike the original HED (BGR, Caffe VGG-16), this network takes RGB pixels in 0..255 and subtracts
a learned per-channel mean (`norm`). Five VGG-style stages (64, 128, 256, 512, 512 channels; 2, 2,
3, 3, 3 convolutions with ReLU; a 2x2 max-pool before stages 2-5) each end in a 1x1 `projection` to
one side map. The annotator resizes the five side maps to the image and averages them before the
sigmoid. Module names equal the file's keys (``norm``, ``block{1..5}.convs.{i}``,
``block{1..5}.projection``).
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

# (input channels, output channels, convolutions) of the five stages
STAGES: tuple[tuple[int, int, int], ...] = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class HEDStage(nn.Module):
    """3x3 convolutions, each followed by ReLU, and a 1x1 projection of the result to one side map."""

    def __init__(self, channels_in: int, channels: int, layers: int) -> None:
        super().__init__()
        widths = [channels_in] + [channels] * layers
        self.convs = nn.Sequential(*(nn.Conv2d(a, b, 3, padding=1) for a, b in pairwise(widths)))
        self.projection = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)  # in place: the convolution's output is not kept
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """(1, 3, H, W) RGB in 0..255 -> five side maps (1, 1, H / 2**k, W / 2**k), k = 0..4, as logits."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # the learned mean pixel
        self.block1, self.block2, self.block3, self.block4, self.block5 = (HEDStage(*s) for s in STAGES)

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        x = rgb - self.norm
        sides = []
        for k, stage in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            if k:
                x = F.max_pool2d(x, 2, 2)
            x, side = stage(x)
            sides.append(side)
        return sides

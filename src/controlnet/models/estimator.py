"""A small UNet-style encoder-decoder that reads a map off an image: the world estimators.

`controlnet eval` scores a generated image by estimating the condition back from it (the ControlNet++
protocol, which uses pretrained depth and segmentation networks). For the synthetic world, the
estimators are this network trained on the world's exact ground truth (`controlnet train-estimator`):
image -> depth (one channel) and image -> the world's segmentation classes (one logit per class).

Four levels (full, 1/2, 1/4 and 1/8 size), each two 3x3 convolutions with group normalisation and
SiLU; the decoder upsamples and joins each level's encoder features (the skip connections keep the
object borders sharp). The input has a fourth channel, each pixel's row (-1 at the top, 1 at the
bottom): the world's camera never moves, so the row alone says much of the floor's depth and
where the wall ends, which a small receptive field could not see. About 0.23 M parameters at the
default widths: small enough to train in minutes and run in milliseconds on one CPU core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 48, 64)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by a group normalisation and SiLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        groups = 4 if out_channels % 4 == 0 else 1
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
        )


class Estimator(nn.Module):
    """(B, 3, H, W) images in [-1, 1] -> (B, out_channels, H, W); H and W multiples of
    2 ** (len(widths) - 1)."""

    def __init__(self, out_channels: int, widths: tuple[int, ...] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        if out_channels < 1 or len(widths) < 2 or min(widths) < 1:
            raise ValueError(
                f"an estimator needs out_channels >= 1 and two or more widths, got {out_channels}, {widths}"
            )
        self.widths = tuple(widths)
        self.down = nn.ModuleList(ConvBlock(a, b) for a, b in zip((4, *widths[:-1]), widths, strict=True))
        # From the deepest level up: the upsampled features joined with the encoder's at that size.
        self.up = nn.ModuleList(
            ConvBlock(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        """What the image sides must be a multiple of."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(f"image sides must be multiples of {self.multiple}, got {tuple(x.shape[-2:])}")
        rows = torch.linspace(-1.0, 1.0, x.shape[-2], dtype=x.dtype, device=x.device)
        x = torch.cat([x, rows[:, None].expand(x.shape[-2:]).expand(x.shape[0], 1, -1, -1)], dim=1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], dim=1))
        return self.head(x)

"""The anime line-art network of Anime2Sketch (github.com/Mukosame/Anime2Sketch, MIT licence), as
ControlNet 1.1 uses it for `lineart_anime` (``netG.pth``): pix2pix's U-Net generator with 8
down-samplings, 64 base channels and InstanceNorm without affine parameters or running statistics
(ControlNet-v1-1-nightly annotator/lineart_anime/__init__.py).

Each level is ``LeakyReLU(0.2), 4x4 stride-2 conv, norm, <inner level>, ReLU, 4x4 stride-2
transposed conv, norm`` and passes its (activated) input on beside its output; the outermost level
has no activation or norm before its convolution and ends in tanh, the innermost has no inner level
and no norm after its down convolution. Every convolution has a bias (pix2pix gives them one when
the norm is InstanceNorm). Module names equal the file's keys: the levels are nested under
``model`` as in the original, each level's layers at the original `nn.Sequential` positions
(``model.model.1.model.3.model.1.weight``, ...).
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def _down(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1)


def _up(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1)


class UnetLevel(nn.Module):
    """One level of the U-Net: `outer` channels in and out, `inner` channels inside, `inner_level`
    the next level down (None for the innermost), `inputs` the image channels of the outermost."""

    def __init__(
        self,
        outer: int,
        inner: int,
        inner_level: UnetLevel | None = None,
        inputs: int | None = None,
        outermost: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        self.innermost = inner_level is None
        if outermost:
            assert inner_level is not None and inputs is not None
            layers = [_down(inputs, inner), inner_level, nn.ReLU(True), _up(inner * 2, outer), nn.Tanh()]
        elif inner_level is None:
            layers = [nn.LeakyReLU(0.2, True), _down(outer, inner), nn.ReLU(True), _up(inner, outer), _norm(outer)]
        else:
            layers = [
                *(nn.LeakyReLU(0.2, True), _down(outer, inner), _norm(inner), inner_level),
                *(nn.ReLU(True), _up(inner * 2, outer), _norm(outer)),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # The original's first layer is an in-place LeakyReLU, so the input it passes on beside its
        # output is the activated one.
        x = self.model[0](x)
        return torch.cat([x, self.model[1:](x)], 1)


class AnimeLineartUnet(nn.Module):
    """RGB in [-1, 1], (N, 3, H, W) with H and W multiples of 256 -> lines in [-1, 1], (N, 1, H, W)
    (dark lines on white)."""

    def __init__(self, downs: int = 8, base: int = 64) -> None:
        super().__init__()
        level = UnetLevel(base * 8, base * 8)
        for _ in range(downs - 5):
            level = UnetLevel(base * 8, base * 8, level)
        for scale in (4, 2, 1):
            level = UnetLevel(base * scale, base * scale * 2, level)
        self.model = UnetLevel(1, base, level, inputs=3, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

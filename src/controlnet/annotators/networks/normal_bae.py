"""NormalBAE: the surface-normal network of Bae, Budvytis and Cipolla, "Estimating and Exploiting
the Aleatoric Uncertainty in Surface Normal Estimation" (ICCV 2021), as ControlNet 1.1's normal
annotator runs it with ``scannet.pt``.

Facts from ControlNet-v1-1-nightly annotator/normalbae/models/ (NNET.py, submodules/encoder.py,
submodules/decoder.py, submodules/submodules.py) and the copy of Ross Wightman's geffnet it vendors
(submodules/efficientnet_repo/geffnet: gen_efficientnet.py ``tf_efficientnet_b5_ap``,
efficientnet_builder.py, conv2d_layers.py); the code here is written anew from them.

- The encoder is EfficientNet-B5 in its TensorFlow-compatible form: TF "same" padding (asymmetric,
  decided by the input's size, for the strided convolutions; symmetric otherwise) and BatchNorm eps
  1e-3. Its classifier is removed; the decoder reads the outputs of block stages 0, 1, 2 and 4 and of
  the 1x1 head convolution (before the head's BatchNorm, which the file holds but no path uses).
- The decoder upsamples (bilinear, corners aligned) and fuses skip features, predicts normals plus a
  concentration kappa at 1/8 resolution, then refines them at 1/4, 1/2 and 1/1 with per-pixel MLPs
  (1x1 Conv1d) over upsampled features and the upsampled previous prediction. In training those
  refinements run on sampled pixels only (uncertainty-guided sampling); at inference, the path the
  annotator takes, they run on every pixel, which is all this module implements.

Module names equal the keys of ``scannet.pt`` (after its ``module.`` prefix), so it loads strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_TF_BN_EPS = 1e-3  # geffnet's BN_EPS_TF_DEFAULT, which the tf_ models use

# EfficientNet-B5 (width x1.6, depth x2.2 of B0, channels rounded to multiples of 8, repeats rounded
# up), as geffnet's builder expands B0's definition: per stage (kind, repeats, kernel, first stride,
# expansion, output channels). "ds" = depthwise-separable block, "ir" = inverted residual.
_STEM = 48
_STAGES = (
    ("ds", 3, 3, 1, 1, 24),
    ("ir", 5, 3, 2, 6, 40),
    ("ir", 5, 5, 2, 6, 64),
    ("ir", 7, 3, 2, 6, 128),
    ("ir", 7, 5, 1, 6, 176),
    ("ir", 9, 5, 2, 6, 304),
    ("ir", 3, 3, 1, 6, 512),
)
_HEAD = 2048
_SKIPS = (0, 1, 2, 4)  # stages whose outputs the decoder reads (1/2, 1/4, 1/8, 1/16 resolution)


class SameConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's "same" padding: the output has ceil(size / stride)
    pixels, and the padding that needs is split with the extra pixel at the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, depthwise: bool = False) -> nn.Conv2d:
    """geffnet's 'same' convolution without bias: static symmetric padding at stride 1, else dynamic."""
    groups = cout if depthwise else 1
    if stride == 1:
        return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
    return SameConv2d(cin, cout, kernel, stride, groups=groups, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_TF_BN_EPS)


class SqueezeExcite(nn.Module):
    """Channel gating: mean over the image -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid, times x."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class DepthwiseSeparable(nn.Module):
    """Depthwise conv -> BN -> SiLU -> squeeze-excite -> 1x1 conv -> BN (no activation), plus the
    input when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and cin == cout
        self.conv_dw = _conv(cin, cin, kernel, stride, depthwise=True)
        self.bn1 = _bn(cin)
        self.se = SqueezeExcite(cin, cin // 4)  # geffnet's se_ratio 0.25 of the block's input
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
        return y + x if self.residual else y


class InvertedResidual(nn.Module):
    """1x1 expansion -> BN -> SiLU -> depthwise conv -> BN -> SiLU -> squeeze-excite -> 1x1
    projection -> BN, plus the input when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride, depthwise=True)
        self.bn2 = _bn(mid)
        self.se = SqueezeExcite(mid, cin // 4)  # reduced from the block's input width, as geffnet does
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn1(self.conv_pw(x)))
        y = self.se(F.silu(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.residual else y


def _stage(kind: str, repeats: int, kernel: int, stride: int, expansion: int, cin: int, cout: int) -> nn.Sequential:
    blocks = []
    for i in range(repeats):  # only a stage's first block strides or changes the width
        first_in, step = (cin, stride) if i == 0 else (cout, 1)
        if kind == "ds":
            blocks.append(DepthwiseSeparable(first_in, cout, kernel, step))
        else:
            blocks.append(InvertedResidual(first_in, cout, kernel, step, expansion))
    return nn.Sequential(*blocks)


class EfficientNetB5(nn.Module):
    """geffnet's tf_efficientnet_b5_ap without its pooling and classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = _conv(3, _STEM, 3, 2)
        self.bn1 = _bn(_STEM)
        stages, width = [], _STEM
        for kind, repeats, kernel, stride, expansion, out in _STAGES:
            stages.append(_stage(kind, repeats, kernel, stride, expansion, width, out))
            width = out
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(width, _HEAD, 1)
        self.bn2 = _bn(_HEAD)  # in the file; the decoder takes conv_head's output before it

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's inputs: stage 0, 1, 2 and 4 outputs, then the head convolution's output."""
        x = F.silu(self.bn1(self.conv_stem(x)))
        features = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in _SKIPS:
                features.append(x)
        features.append(self.conv_head(x))
        return features


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.original_model = EfficientNetB5()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.original_model(x)


class UpSample(nn.Module):
    """Upsample to the skip's size (bilinear, corners aligned), concatenate, then twice
    3x3 conv -> BN -> LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=list(skip.shape[-2:]), mode="bilinear", align_corners=True)
        return self._net(torch.cat([up, skip], dim=1))


def _pixel_mlp(cin: int) -> nn.Sequential:
    """Four 1x1 Conv1d layers (ReLU between) from features + previous prediction to 4 outputs."""
    return nn.Sequential(
        nn.Conv1d(cin, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 4, 1),
    )


def normalize_prediction(x: torch.Tensor) -> torch.Tensor:
    """Channels 0-2 scaled to a unit normal (1e-10 added to the length), channel 3 (kappa) mapped
    to elu(kappa) + 1.01, as the original's norm_normalize."""
    nx, ny, nz, kappa = torch.split(x, 1, dim=1)
    length = torch.sqrt(nx**2.0 + ny**2.0 + nz**2.0) + 1e-10
    return torch.cat([nx / length, ny / length, nz / length, F.elu(kappa) + 1.0 + 0.01], dim=1)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(_HEAD, _HEAD, 1)
        self.up1 = UpSample(_HEAD + 176, 1024)
        self.up2 = UpSample(1024 + 64, 512)
        self.up3 = UpSample(512 + 40, 256)
        self.up4 = UpSample(256 + 24, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = _pixel_mlp(512 + 4)
        self.out_conv_res2 = _pixel_mlp(256 + 4)
        self.out_conv_res1 = _pixel_mlp(128 + 4)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The full-resolution prediction (twice the size of stage 0's output): (B, 4, H, W)."""
        half, quarter, eighth, sixteenth, head = features
        d1 = self.up1(self.conv2(head), sixteenth)
        d2 = self.up2(d1, eighth)
        d3 = self.up3(d2, quarter)
        d4 = self.up4(d3, half)
        prediction = normalize_prediction(self.out_conv_res8(d2))
        for mlp, feats in ((self.out_conv_res4, d2), (self.out_conv_res2, d3), (self.out_conv_res1, d4)):
            prediction = _refine(mlp, feats, prediction)
        return prediction


def _refine(mlp: nn.Sequential, features: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """One refinement at twice the resolution, on every pixel (the original's inference branch)."""
    up = torch.cat(
        [
            F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=True),
            F.interpolate(prediction, scale_factor=2, mode="bilinear", align_corners=True),
        ],
        dim=1,
    )
    b, c, h, w = up.shape
    # The 1x1 Conv1d layers are matrix products over rows of (pixel, channels): in the channels-last
    # layout the features already are those rows, so no full-resolution copy is made to transpose
    # them for a convolution (in bf16 that copy cost as much as the whole encoder).
    rows = up.permute(0, 2, 3, 1).reshape(b * h * w, c)
    for layer in mlp:
        rows = F.linear(rows, layer.weight[:, :, 0], layer.bias) if isinstance(layer, nn.Conv1d) else layer(rows)
    return normalize_prediction(rows.view(b, h, w, 4).permute(0, 3, 1, 2))


class NormalBae(nn.Module):
    """Image normalised with ImageNet statistics (B, 3, H, W) -> (B, 4, H, W): a unit surface
    normal (x, y, z) and the concentration kappa per pixel. H and W must be multiples of 8: the
    refinements double the 1/8 prediction three times and meet skip features of other sizes
    otherwise (the original fails there too; the annotator pads to multiples of 64 as the
    AUTOMATIC1111 extension does)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

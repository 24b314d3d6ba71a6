"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability
for Text-to-Image Diffusion Models"): a small network, run once per generation, that turns a
condition image into one feature map per UNet level; the UNet adds them to its encoder
(`UNet.forward`'s ``adapter_features``).

Module names equal the keys of TencentARC's release (``ldm/modules/encoders/adapter.py``), so its
files load without a key map:

- `FullAdapter` (their ``Adapter``): ``conv_in``, then ``body.{level * num_res_blocks + j}``, one flat
  list of `AdapterResBlock`; the first block of every level but the first halves the size.
- `LightAdapter` (their ``Adapter_light``, the colour adapter): ``body.{level}``, one `Extractor` per
  level (1x1 in, residual blocks at a quarter of the width, 1x1 out).

Both start with a pixel unshuffle (the image [B, C, H, W] to [B, C * 64, H/8, W/8]: the latent
size) and return the feature after each level: [B, channels[i], H / 8 / 2^i, W / 8 / 2^i]. The SDXL
adapter (``full_xl``, TencentARC's ``Adapter_XL``) unshuffles 16x and halves once, before its third
level: features at H/16, H/16, H/32, H/32 for SDXL's second and third levels and its middle block
(`models.unet.adapter_blocks`).

Average pooling between levels rounds up (``ceil_mode``, as diffusers' ``T2IAdapter``): equal to the
original on the even sizes it supports, and on odd sizes the maps keep the UNet's own sizes (its
stride-2 convolutions round up too), where the original's would not fit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import T2IAdapterConfig
from .kernels import Conv2d


class Downsample(nn.Module):
    """The original's ``Downsample`` (key ``down_opt.op``): a 3x3 stride-2 conv (``use_conv``) or
    2x2 average pooling, which has no weights."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = (
            Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class AdapterResBlock(nn.Module):
    """The full adapter's ``ResnetBlock``: [downsample] -> [in_conv] -> x + block2(relu(block1(x))).

    ``in_conv`` exists where the width changes or without ``sk`` (``shortcut_conv``), and ``skep``
    replaces the identity on the residual path with a convolution (``shortcut_conv``).
    """

    def __init__(self, channels_in: int, channels_out: int, down: bool, config: T2IAdapterConfig) -> None:
        super().__init__()
        k, pad = config.kernel_size, config.kernel_size // 2
        self.in_conv = (
            Conv2d(channels_in, channels_out, k, padding=pad)
            if channels_in != channels_out or config.shortcut_conv
            else None
        )
        self.block1 = Conv2d(channels_out, channels_out, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = Conv2d(channels_out, channels_out, k, padding=pad)
        self.skep = Conv2d(channels_in, channels_out, k, padding=pad) if config.shortcut_conv else None
        self.down_opt = Downsample(channels_in, config.conv_downsample) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        h = self.block2(self.act(self.block1(x)))
        # As the original, skep reads in_conv's output: with sk=False it works only where the width
        # stays (no released file has sk=False).
        return h + (self.skep(x) if self.skep is not None else x)


class FullAdapter(nn.Module):
    """TencentARC's ``Adapter`` (and ``Adapter_XL``, kind ``full_xl``: the same blocks, halving the
    size before the third level only): condition image [B, in_channels, H, W] in [0, 1] -> one
    feature map per level."""

    def __init__(self, config: T2IAdapterConfig) -> None:
        super().__init__()
        if config.kind not in ("full", "full_xl"):
            raise ValueError(f"FullAdapter needs a 'full' or 'full_xl' adapter configuration, got {config.kind!r}")
        self.config = config
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        self.conv_in = Conv2d(config.in_channels * config.downscale_factor**2, config.channels[0], 3, padding=1)
        blocks = []
        for level, width in enumerate(config.channels):
            for j in range(config.num_res_blocks):
                previous = config.channels[level - 1] if level > 0 and j == 0 else width
                down = j == 0 and config.downsamples_before(level)
                blocks.append(AdapterResBlock(previous, width, down=down, config=config))
        self.body = nn.ModuleList(blocks)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv_in(self.unshuffle(image))
        features = []
        for level in range(len(self.config.channels)):
            for j in range(self.config.num_res_blocks):
                x = self.body[level * self.config.num_res_blocks + j](x)
            features.append(x)
        return features


class LightResBlock(nn.Module):
    """``ResnetBlock_light``: x + block2(relu(block1(x))), both 3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class Extractor(nn.Module):
    """The light adapter's level (``extractor``): [2x2 average pool] -> 1x1 conv to a quarter of the
    width -> residual blocks -> 1x1 conv to the width."""

    def __init__(self, channels_in: int, channels_out: int, num_res_blocks: int, down: bool) -> None:
        super().__init__()
        inner = channels_out // 4
        self.in_conv = Conv2d(channels_in, inner, 1)
        self.body = nn.Sequential(*(LightResBlock(inner) for _ in range(num_res_blocks)))
        self.out_conv = Conv2d(inner, channels_out, 1)
        self.down_opt = Downsample(channels_in, use_conv=False) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class LightAdapter(nn.Module):
    """TencentARC's ``Adapter_light``: condition image [B, in_channels, H, W] in [0, 1] -> one feature
    map per level."""

    def __init__(self, config: T2IAdapterConfig) -> None:
        super().__init__()
        if config.kind != "light":
            raise ValueError(f"LightAdapter needs a 'light' adapter configuration, got {config.kind!r}")
        self.config = config
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        widths_in = [config.in_channels * config.downscale_factor**2, *config.channels[:-1]]
        self.body = nn.ModuleList(
            Extractor(c_in, c_out, config.num_res_blocks, down=level > 0)
            for level, (c_in, c_out) in enumerate(zip(widths_in, config.channels, strict=True))
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(image)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


T2IAdapter = FullAdapter | LightAdapter


def build_adapter(config: T2IAdapterConfig) -> T2IAdapter:
    """The adapter ``config`` describes: a `FullAdapter` (full or XL) or a `LightAdapter`."""
    return LightAdapter(config) if config.kind == "light" else FullAdapter(config)


def scale_features(features: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """Every feature map times ``scale`` (the original's ``cond_weight``, diffusers'
    ``adapter_conditioning_scale``)."""
    return [f * scale for f in features]

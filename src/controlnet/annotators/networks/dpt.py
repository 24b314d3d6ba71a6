"""The pieces MiDaS DPT-Hybrid and Depth Anything V2 share: a pre-norm ViT block and the DPT decoder
(per-level 3x3 convolutions, then fusion blocks that merge coarse into fine and upsample by 2).

Facts from MiDaS (isl-org, vendored in ControlNet-v1-1-nightly annotator/midas/midas/blocks.py,
vit.py) and Depth-Anything-V2 (depth_anything_v2/util/blocks.py, dinov2_layers/): the module names
here are those of the original files' keys (``scratch.layer1_rn``, ``refinenetN.resConfUnit1.conv1``,
``blocks.N.attn.qkv``), so both files load without a key map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's and DINOv2's layout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, nn.GELU's default in both originals


class LayerScale(nn.Module):
    """A learned per-channel factor on a residual branch (DINOv2's ``ls1``/``ls2``, key ``gamma``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6 in
    both timm's ViT and DINOv2. DINOv2 scales each branch (`layer_scale`)."""

    def __init__(self, dim: int, heads: int, layer_scale: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)
        self.ls1: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()
        self.ls2: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, added to the input (no batch norm in either model)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """DPT fusion: the coarser path plus a residual unit of this level's features, another residual
    unit, bilinear upsampling (align_corners=True; x2, or to `size` as Depth Anything asks), 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    """The decoder's ``scratch``: a 3x3 convolution (no bias) per level to `features` channels and the
    four fusion blocks; the model adds its own output head."""

    def __init__(self, in_channels: tuple[int, ...], features: int) -> None:
        super().__init__()
        for i, channels in enumerate(in_channels, start=1):
            self.add_module(f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            self.add_module(f"refinenet{i}", FeatureFusionBlock(features))

    def fuse(self, levels: list[torch.Tensor], sized: bool) -> torch.Tensor:
        """The finest fused map from four levels (fine to coarse). `sized`: each fusion upsamples to
        the next finer level's size (Depth Anything, whose levels need not halve exactly), else x2."""
        rn = [getattr(self, f"layer{i}_rn")(x) for i, x in enumerate(levels, start=1)]
        refine = [getattr(self, f"refinenet{i}") for i in range(1, 5)]
        path = refine[3](rn[3], size=tuple(rn[2].shape[2:]) if sized else None)
        path = refine[2](path, rn[2], size=tuple(rn[1].shape[2:]) if sized else None)
        path = refine[1](path, rn[1], size=tuple(rn[0].shape[2:]) if sized else None)
        return refine[0](path, rn[0])

"""MiDaS v3 DPT-Hybrid (``dpt_hybrid-midas-501f0c75.pt``): relative inverse depth from an RGB image.

The encoder is timm's ``vit_base_resnet50_384``: a ResNet-50-style BiT stem and three stages
(weight-standardised convolutions with TensorFlow "SAME" padding, GroupNorm) whose 1/16 map is
projected to ViT-B/16 tokens; the decoder (DPT) reassembles the first two ResNet stages and the
outputs of transformer blocks 8 and 11 into four levels and fuses them. Facts from MiDaS as vendored
in ControlNet-v1-1-nightly annotator/midas/midas/ (vit.py ``_make_vit_b_rn50_backbone``,
``forward_flex``; dpt_depth.py; blocks.py) and timm's vision_transformer_hybrid.py / resnetv2.py
(``_resnetv2(layers=(3, 4, 9))``, StdConv2dSame eps 1e-8). Module names are the file's keys
(``pretrained.model....``, ``scratch....``), including the unused ImageNet head it carries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dpt import Block, Scratch

_WIDTH = 768  # ViT-B
_DEPTH = 12
_HEADS = 12
_PATCH = 16
_GRID = 24  # the 384 px training grid of the position embeddings


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "SAME" padding: output = ceil(input / stride), the extra pixel on the right/bottom."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """Conv2d whose weights are standardised per output channel (zero mean, unit variance, eps 1e-8)
    before use, with "SAME" padding; no bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # batch_norm over each output channel's weights = (w - mean) / sqrt(biased var + eps), as timm computes it
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-8
        )
        w = w.reshape_as(self.weight)
        return F.conv2d(_pad_same(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups), then ReLU unless `act` is False."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride)
        self.norm = GroupNormAct(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck (1x1, 3x3 with the stride, 1x1 to 4x), the shortcut projected in a
    stage's first block, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int, first: bool) -> None:
        super().__init__()
        mid = cout // 4
        self.downsample = Downsample(cin, cout, stride) if first else None
        self.conv1 = StdConv2dSame(cin, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, cout, 1)
        self.norm3 = GroupNormAct(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.norm1(self.conv1(x))
        y = self.norm2(self.conv2(y))
        return F.relu(self.norm3(self.conv3(y)) + shortcut)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, i == 0) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StdConv2dSame(3, 64, 7, 2)
        self.norm = GroupNormAct(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 3x3/2 max pool with "SAME" padding; 0 as the pad value equals timm's -inf after the ReLU.
        return F.max_pool2d(_pad_same(self.norm(self.conv(x)), 3, 2), 3, 2)


class ResNetBackbone(nn.Module):
    """The BiT ResNet: stem to 1/4, stages of 3, 4, 9 blocks to 256, 512, 1024 channels (1/4, 1/8, 1/16)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        self.stages = nn.ModuleList([Stage(64, 256, 3, 1), Stage(256, 512, 4, 2), Stage(512, 1024, 9, 2)])


class HybridEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNetBackbone()
        self.proj = nn.Conv2d(1024, _WIDTH, 1)


class HybridViT(nn.Module):
    """timm's VisionTransformer with the hybrid patch embedding (only the parts MiDaS runs, plus the
    unused final ``norm`` and ImageNet ``head`` the file holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = HybridEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, _WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + _GRID * _GRID, _WIDTH))
        self.blocks = nn.ModuleList(Block(_WIDTH, _HEADS) for _ in range(_DEPTH))
        self.norm = nn.LayerNorm(_WIDTH, eps=1e-6)
        self.head = nn.Linear(_WIDTH, 1000)

    def position(self, rows: int, cols: int) -> torch.Tensor:
        """The position embeddings for a rows x cols grid: the 24x24 grid resized bilinearly
        (align_corners=False), the class token's unchanged (MiDaS vit.py ``_resize_pos_embed``)."""
        grid = self.pos_embed[:, 1:].reshape(1, _GRID, _GRID, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


class ProjectReadout(nn.Module):
    """Each patch token concatenated with the class token, projected back to the width, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * _WIDTH, _WIDTH), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, 1:]
        return self.project(torch.cat([tokens, x[:, :1].expand_as(tokens)], dim=-1))


class Pretrained(nn.Module):
    """``pretrained``: the ViT and the reassembly of blocks 8 and 11 (``act_postprocess3/4``: readout
    at index 0, a 1x1 convolution at 3, for level 4 a 3x3/2 convolution at 4; indices 1 and 2 are
    the original's parameter-free transpose and unflatten). Levels 1 and 2 are the ResNet stages
    as they are, so the file has no ``act_postprocess1/2`` weights."""

    def __init__(self) -> None:
        super().__init__()
        self.model = HybridViT()
        self.act_postprocess3 = nn.Sequential(ProjectReadout(), nn.Identity(), nn.Identity(), nn.Conv2d(_WIDTH, 768, 1))
        self.act_postprocess4 = nn.Sequential(
            ProjectReadout(), nn.Identity(), nn.Identity(), nn.Conv2d(_WIDTH, 768, 1), nn.Conv2d(768, 768, 3, 2, 1)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        rows, cols = x.shape[2] // _PATCH, x.shape[3] // _PATCH
        vit, backbone = self.model, self.model.patch_embed.backbone
        h = backbone.stem(x)
        level1 = backbone.stages[0](h)
        level2 = backbone.stages[1](level1)
        h = vit.patch_embed.proj(backbone.stages[2](level2)).flatten(2).transpose(1, 2)
        h = torch.cat([vit.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + vit.position(rows, cols)
        taken = []
        for i, block in enumerate(vit.blocks):
            h = block(h)
            if i in (8, 11):  # the original's hooks on blocks 8 and 11 (before the final norm)
                taken.append(h)
        levels = [level1, level2]
        for post, tokens in zip((self.act_postprocess3, self.act_postprocess4), taken, strict=True):
            grid = post[0](tokens).transpose(1, 2).unflatten(2, (rows, cols))
            for layer in post[3:]:
                grid = layer(grid)
            levels.append(grid)
        return levels


class DPTHybridMiDaS(nn.Module):
    """``DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)``: (N, 3, H, W) in [-1, 1] with H
    and W multiples of 32 -> (N, H, W) non-negative relative inverse depth."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = Pretrained()
        self.scratch = Scratch((256, 512, 768, 768), 256)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(256, 128, 3, padding=1),
            nn.Identity(),  # x2 bilinear upsampling (align_corners=True) in the original, no weights
            nn.Conv2d(128, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.scratch.fuse(self.pretrained(x), sized=False)
        head = self.scratch.output_conv
        out = F.interpolate(head[0](path), scale_factor=2, mode="bilinear", align_corners=True)
        for layer in head[2:]:
            out = layer(out)
        return out.squeeze(1)

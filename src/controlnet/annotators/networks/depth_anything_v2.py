"""Depth Anything V2 (``depth_anything_v2_vits.pth``, ``_vitb``, ``_vitl``): relative inverse depth
from a DINOv2 ViT (patch 14) and a DPT head.

Facts from Depth-Anything-V2 (depth_anything_v2/dpt.py ``DepthAnythingV2``, ``DPTHead``;
dinov2.py ``DinoVisionTransformer`` built with img_size 518, layer scale, no register tokens,
``interpolate_offset`` 0.1; util/blocks.py) and its README's per-encoder configurations. Module
names are the files' keys (``pretrained....``, ``depth_head....``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dpt import Block, Scratch

PATCH = 14
_GRID = 37  # 518 / 14: the grid the position embeddings were trained at


@dataclass(frozen=True)
class Encoder:
    """One DINOv2 size and the head built for it (Depth-Anything-V2 README ``model_configs``)."""

    name: str
    width: int
    depth: int
    heads: int
    taken: tuple[int, ...]  # the blocks whose outputs feed the head
    features: int
    head_channels: tuple[int, int, int, int]


ENCODERS = {
    e.name: e
    for e in (
        Encoder("vits", 384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384)),
        Encoder("vitb", 768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768)),
        Encoder("vitl", 1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
    )
}


class PatchEmbed(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, PATCH, PATCH)


class DINOv2(nn.Module):
    """The ViT ``pretrained``: patch embedding, class token, learned positions (37 x 37 + 1), blocks
    with layer scale, final LayerNorm applied to each taken block's output. ``mask_token`` is kept
    for the file (training only)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.taken = encoder.taken
        self.patch_embed = PatchEmbed(encoder.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + _GRID * _GRID, encoder.width))
        self.mask_token = nn.Parameter(torch.zeros(1, encoder.width))
        self.blocks = nn.ModuleList(Block(encoder.width, encoder.heads, layer_scale=True) for _ in range(encoder.depth))
        self.norm = nn.LayerNorm(encoder.width, eps=1e-6)

    def position(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a rows x cols grid (dinov2.py ``interpolate_pos_encoding``): as
        they are for the square 37 x 37 grid; else resized bicubically in float32 by the scale
        factors (grid + 0.1) / 37, the offset that keeps floor(37 * factor) from falling one short."""
        if rows == cols == _GRID:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].float().reshape(1, _GRID, _GRID, dim).permute(0, 3, 1, 2)
        scale = ((rows + 0.1) / _GRID, (cols + 0.1) / _GRID)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([self.pos_embed[:, :1].float(), grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        rows, cols = x.shape[2] // PATCH, x.shape[3] // PATCH
        h = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.position(rows, cols)
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.taken:
                out.append(self.norm(h)[:, 1:])  # the class token is dropped (use_clstoken=False)
        return out


class DPTHead(nn.Module):
    """``depth_head``: per level a 1x1 projection and a resize (x4, x2, as is, /2), the DPT fusion,
    then conv, bilinear resize to the input's size, conv, ReLU, 1x1 conv, ReLU."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        c = encoder.head_channels
        self.projects = nn.ModuleList(nn.Conv2d(encoder.width, ch, 1) for ch in c)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], 4, 4),
                nn.ConvTranspose2d(c[1], c[1], 2, 2),
                nn.Identity(),
                nn.Conv2d(c[3], c[3], 3, 2, 1),
            ]
        )
        f = encoder.features
        self.scratch = Scratch(c, f)
        self.scratch.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity()
        )

    def forward(self, tokens: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        levels = []
        for i, t in enumerate(tokens):
            grid = t.transpose(1, 2).reshape(t.shape[0], t.shape[-1], rows, cols)
            levels.append(self.resize_layers[i](self.projects[i](grid)))
        out = self.scratch.output_conv1(self.scratch.fuse(levels, sized=True))
        out = F.interpolate(out, (rows * PATCH, cols * PATCH), mode="bilinear", align_corners=True)
        return self.scratch.output_conv2(out)


class DepthAnythingV2(nn.Module):
    """(N, 3, H, W) ImageNet-normalised RGB, H and W multiples of 14 -> (N, H, W) relative inverse
    depth (non-negative)."""

    def __init__(self, encoder: str) -> None:
        super().__init__()
        self.pretrained = DINOv2(ENCODERS[encoder])
        self.depth_head = DPTHead(ENCODERS[encoder])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[2] // PATCH, x.shape[3] // PATCH
        return F.relu(self.depth_head(self.pretrained(x), rows, cols)).squeeze(1)

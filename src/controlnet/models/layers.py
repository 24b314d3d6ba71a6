"""Building blocks shared by the UNet and the ControlNet (latent-diffusion ``openaimodel`` layout).

Module and parameter names equal the original checkpoint keys (``in_layers``, ``emb_layers``,
``transformer_blocks.0.attn1.to_q``, ...), so original files load with no key map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kernels import Conv2d, Linear


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` and return it.

    The ControlNet paper's central device (section 3.1): a layer initialised at zero adds nothing
    at the start of training, so the locked model's output is untouched while gradients still reach
    the trainable copy. Also used, as in the original UNet, on the last conv of each residual branch.
    """
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype, as the original ``GroupNorm32``:
    the statistics of half-precision activations are not precise enough.

    bfloat16 needs no conversion: PyTorch's bf16 kernel accumulates its statistics in float32 and
    rounds once; it agrees with the float32 round trip to one bf16 rounding step, in a few elements
    (tests/test_models.py), at a fraction of the cost (13x on a channels_last CPU tensor at 512 px:
    no two extra passes over the activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.bfloat16):
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels)


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep features (cosines first, then sines; max period 10000) as ``timestep_embedding``.

    The frequencies are computed once, on the CPU (as the original, so every device gets the same
    bits; even inside a meta-device build), and moved once to another device when first used there:
    a CPU model never changes the attribute, so a compiled graph's guards on it hold from the first
    call. They are not a buffer, so models built on the meta device and then loaded from a file
    need no fix-up.
    """

    def __init__(self, channels: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.channels = channels
        self.max_period = max_period
        half = channels // 2
        exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device="cpu") / half
        self._freqs = torch.exp(exponent)

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        if self._freqs.device != device:
            self._freqs = self._freqs.to(device)
        return self._freqs

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        # timesteps: [B] -> [B, channels], in float32 as the original.
        args = timesteps[:, None].float() * self._frequencies(timesteps.device)[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.channels % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between (no scale-shift norm)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels, groups), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(0.0),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            # Odd latent sizes: match the skip connection's size exactly.
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention through ``scaled_dot_product_attention`` (``CrossAttention``)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.slice_size: int | None = None  # queries per slice (low-memory mode); None: all at once
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch = x.shape[0]
        # [B, N, heads * d] -> [B, heads, N, d]
        q, k, v = (
            t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        if self.slice_size is None or q.shape[2] <= self.slice_size:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # each slice of queries attends to all keys: the same result, a smaller peak
            out = torch.cat(
                [F.scaled_dot_product_attention(part, k, v) for part in q.split(self.slice_size, dim=2)], dim=2
            )
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3]))


class GEGLU(nn.Module):
    """Gated GELU projection: half of the output gates the other half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with 1x1-conv (SD 1.x) or linear (SD 2.x) projections."""

    def __init__(
        self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, use_linear: bool, groups: int
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner) if use_linear else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = zero_module(Linear(inner, channels) if use_linear else Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it takes: the time embedding (ResBlock), the text
    context (SpatialTransformer), or neither.

    ``gradient_checkpointing``: in training, keep only the block's inputs and recompute its
    activations during the backward pass (less memory, about a third more compute).
    """

    gradient_checkpointing = False

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._layers, x, emb, context, output_size, use_reentrant=False)
        return self._layers(x, emb, context, output_size)

    def _layers(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, output_size: tuple[int, int] | None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x

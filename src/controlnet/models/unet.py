"""The Stable Diffusion UNet in the latent-diffusion layout (``time_embed``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``), with ControlNet residual injection.

The encoder half is built by :func:`build_encoder`, which the ControlNet's trainable copy reuses, so
both always have the same structure and the copy's keys equal the UNet's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import UNetConfig
from .kernels import Conv2d, Linear
from .layers import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedding,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    zero_module,
)


def _transformer(config: UNetConfig, channels: int) -> SpatialTransformer:
    heads = config.heads_for(channels)
    return SpatialTransformer(
        channels,
        heads=heads,
        head_dim=channels // heads,
        depth=config.transformer_depth,
        context_dim=config.context_dim,
        use_linear=config.use_linear_in_transformer,
        groups=config.norm_groups,
    )


def build_time_embed(config: UNetConfig) -> nn.Sequential:
    """The MLP over the sinusoidal features: keys ``time_embed.0`` and ``time_embed.2``."""
    return nn.Sequential(
        Linear(config.model_channels, config.time_embed_dim),
        nn.SiLU(),
        Linear(config.time_embed_dim, config.time_embed_dim),
    )


def build_encoder(config: UNetConfig) -> tuple[nn.ModuleList, TimestepEmbedSequential]:
    """``input_blocks`` and ``middle_block``: the part of the UNet the ControlNet copies.

    SD 1.x/2.x have 12 input blocks: conv_in, then per level ``num_res_blocks`` x (ResBlock
    [+ SpatialTransformer]) and a Downsample between levels.
    """
    emb = config.time_embed_dim
    groups = config.norm_groups
    blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(config.in_channels, config.model_channels, 3, padding=1))])
    channels = config.model_channels
    downsampling = 1
    for level, width in enumerate(config.level_channels):
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(channels, emb, width, groups)]
            channels = width
            if downsampling in config.attention_resolutions:
                layers.append(_transformer(config, channels))
            blocks.append(TimestepEmbedSequential(*layers))
        if level != len(config.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(channels)))
            downsampling *= 2
    middle = TimestepEmbedSequential(
        ResBlock(channels, emb, channels, groups),
        _transformer(config, channels),
        ResBlock(channels, emb, channels, groups),
    )
    return blocks, middle


def build_decoder(config: UNetConfig) -> nn.ModuleList:
    """``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` ResBlocks, each reading
    the previous output concatenated with one skip connection, and an Upsample closing each level
    but the last."""
    emb = config.time_embed_dim
    groups = config.norm_groups
    skip_channels = config.encoder_block_channels()
    channels = config.level_channels[-1]
    downsampling = 2 ** (len(config.channel_mult) - 1)
    blocks = nn.ModuleList()
    for level in reversed(range(len(config.channel_mult))):
        width = config.level_channels[level]
        for i in range(config.num_res_blocks + 1):
            layers: list[nn.Module] = [ResBlock(channels + skip_channels.pop(), emb, width, groups)]
            channels = width
            if downsampling in config.attention_resolutions:
                layers.append(_transformer(config, channels))
            if level and i == config.num_res_blocks:
                layers.append(Upsample(channels))
                downsampling //= 2
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks


class UNet(nn.Module):
    """The denoiser: latents, timesteps and text context in, predicted noise (or v) out."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.time_features = TimestepEmbedding(config.model_channels)
        self.time_embed = build_time_embed(config)
        self.input_blocks, self.middle_block = build_encoder(config)
        self.output_blocks = build_decoder(config)
        self.out = nn.Sequential(
            normalization(config.model_channels, config.norm_groups),
            nn.SiLU(),
            zero_module(Conv2d(config.model_channels, config.out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        control: list[torch.Tensor] | None = None,
        only_mid_control: bool = False,
        adapter_features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict noise (or v) for latents ``x`` [B, C, H, W] at ``timesteps`` [B].

        ``control``: the ControlNet's 13 residuals (12 skips in encoder order, then the middle), as
        ``ControlledUnetModel``: the middle residual is added to the middle block's output and each
        skip connection gets its residual before the decoder concatenates it. ``only_mid_control``
        injects the middle residual only.

        ``adapter_features``: a T2I-Adapter's feature maps, one per level, each added to the hidden
        state after the level's last ResBlock (and transformer), before its downsampling, so the
        skip connection and everything deeper see it: TencentARC's UNet (input blocks 2, 5, 8 and 11
        in SD) and diffusers' ``down_intrablock_additional_residuals``.
        """
        emb = self.time_embed(self.time_features(timesteps).to(self.time_embed[0].weight.dtype))
        additions = self._adapter_additions(adapter_features)
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i in additions:
                h = _add_feature(h, additions[i], i)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"expected {len(skips) + 1} control residuals, got {len(control)}")
            h = h + control[-1]
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None and not only_mid_control:
                skip = skip + control[len(skips)]
            next_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(torch.cat([h, skip], dim=1), emb, context, output_size=next_size)
        return self.out(h)

    def _adapter_additions(self, features: Sequence[torch.Tensor] | None) -> dict[int, torch.Tensor]:
        """{input block index: adapter feature} for the blocks that close each level."""
        if features is None:
            return {}
        ends = level_end_blocks(self.config)
        if len(features) != len(ends):
            raise ValueError(f"expected {len(ends)} adapter features (one per UNet level), got {len(features)}")
        return dict(zip(ends, features, strict=True))


def level_end_blocks(config: UNetConfig) -> tuple[int, ...]:
    """Indices of the input blocks that close each level (the last ResBlock before a Downsample, or
    the last block): 2, 5, 8, 11 for SD (``input_blocks[0]`` is conv_in; a level is
    ``num_res_blocks`` blocks and a Downsample)."""
    per_level = config.num_res_blocks + 1
    return tuple(level * per_level + config.num_res_blocks for level in range(len(config.channel_mult)))


def _add_feature(h: torch.Tensor, feature: torch.Tensor, block: int) -> torch.Tensor:
    if feature.shape[1:] != h.shape[1:]:
        raise ValueError(
            f"adapter feature of shape {list(feature.shape)} does not fit input block {block}'s output "
            f"{list(h.shape)}: the adapter or the condition image's size does not match this UNet"
        )
    return h + feature

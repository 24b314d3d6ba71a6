"""The Stable Diffusion UNet in the latent-diffusion layout (``time_embed``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``; SDXL's ``label_emb``), with ControlNet residual injection.

The encoder half is built by :func:`build_encoder`, which the ControlNet's trainable copy reuses, so
both always have the same structure and the copy's keys equal the UNet's; both embed the timestep
(and SDXL's vector y) with :func:`embed_time`.
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


def _transformer(config: UNetConfig, channels: int, depth: int) -> SpatialTransformer:
    heads = config.heads_for(channels)
    return SpatialTransformer(
        channels,
        heads=heads,
        head_dim=channels // heads,
        depth=depth,
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


def build_label_embed(config: UNetConfig) -> nn.Sequential | None:
    """SDXL's ``label_emb``: an MLP from the vector y to the time embedding's width, nested one level
    deeper than ``time_embed`` as sgm builds it for ``num_classes="sequential"`` (keys
    ``label_emb.0.0``, ``label_emb.0.2``; diffusers' ``add_embedding.linear_1/2``). None without
    ``adm_in_channels``."""
    if config.adm_in_channels is None:
        return None
    emb = config.time_embed_dim
    return nn.Sequential(nn.Sequential(Linear(config.adm_in_channels, emb), nn.SiLU(), Linear(emb, emb)))


def embed_time(
    model: nn.Module, timesteps: torch.Tensor, y: torch.Tensor | None, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """The embedding every ResBlock reads: ``time_embed`` of the timesteps' sinusoids, plus
    ``label_emb(y)`` for SDXL (sgm ``UNetModel.forward``: ``emb = emb + self.label_emb(y)``).

    ``model`` is a UNet or a ControlNet: both hold ``time_features``, ``time_embed`` and
    ``label_emb`` (None without ``adm_in_channels``). ``y``: [B, adm_in_channels]. ``extra``: an
    embedding added before ``label_emb(y)`` (the union ControlNet's control types, in diffusers' order).
    """
    dtype = model.time_embed[0].weight.dtype
    emb = model.time_embed(model.time_features(timesteps).to(dtype))
    if extra is not None:
        emb = emb + extra.to(dtype)
    label_emb = model.label_emb
    if label_emb is None:
        if y is not None:
            raise ValueError("this model takes no vector y (its UNet has no adm_in_channels); pass y=None")
        return emb
    width = label_emb[0][0].in_features
    if y is None:
        raise ValueError(
            f"this model needs the vector y [batch, {width}]: the pooled text embedding and the size "
            "conditioning (models.conditioning.added_vector)"
        )
    if y.shape != (emb.shape[0], width):
        raise ValueError(f"y must have shape [{emb.shape[0]}, {width}] (batch, adm_in_channels), got {list(y.shape)}")
    return emb + label_emb(y.to(dtype))


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
                layers.append(_transformer(config, channels, config.transformer_depth_at(level)))
            blocks.append(TimestepEmbedSequential(*layers))
        if level != len(config.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(channels)))
            downsampling *= 2
    middle = TimestepEmbedSequential(
        ResBlock(channels, emb, channels, groups),
        _transformer(config, channels, config.middle_transformer_depth),
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
                layers.append(_transformer(config, channels, config.transformer_depth_at(level)))
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
        self.label_emb = build_label_embed(config)
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
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (or v) for latents ``x`` [B, C, H, W] at ``timesteps`` [B].

        ``y``: SDXL's vector [B, adm_in_channels] (the pooled text embedding and the size
        conditioning, ``models.conditioning.added_vector``), required exactly when the config has
        ``adm_in_channels``.

        ``control``: the ControlNet's 13 residuals (12 skips in encoder order, then the middle), as
        ``ControlledUnetModel``: the middle residual is added to the middle block's output and each
        skip connection gets its residual before the decoder concatenates it. ``only_mid_control``
        injects the middle residual only.

        ``adapter_features``: a T2I-Adapter's feature maps, each added to the hidden state after an
        input block (`adapter_blocks`: one per level, after its last ResBlock and transformer, before
        its downsampling; the XL adapter's four on SDXL), so the skip connection and everything deeper
        see it, or to the middle block's output: TencentARC's UNet (input blocks 2, 5, 8 and 11 in SD)
        and diffusers' ``down_intrablock_additional_residuals``.
        """
        emb = embed_time(self, timesteps, y)
        additions = self._adapter_additions(adapter_features)
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i in additions:
                h = _add_feature(h, additions[i], f"input block {i}")
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if MIDDLE in additions:  # before the ControlNet's middle residual, as diffusers adds them
            h = _add_feature(h, additions[MIDDLE], "the middle block")
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
        """{input block index or MIDDLE: adapter feature}, as `adapter_blocks` places them."""
        if features is None:
            return {}
        return dict(zip(adapter_blocks(self.config, len(features)), features, strict=True))


MIDDLE = -1  # where `adapter_blocks` places a feature on the middle block's output


def level_end_blocks(config: UNetConfig) -> tuple[int, ...]:
    """Indices of the input blocks that close each level (the last ResBlock before a Downsample, or
    the last block): 2, 5, 8, 11 for SD (``input_blocks[0]`` is conv_in; a level is
    ``num_res_blocks`` blocks and a Downsample)."""
    per_level = config.num_res_blocks + 1
    return tuple(level * per_level + config.num_res_blocks for level in range(len(config.channel_mult)))


def adapter_blocks(config: UNetConfig, count: int) -> tuple[int, ...]:
    """Where ``count`` T2I-Adapter features go: input-block indices, or MIDDLE for the middle block's
    output.

    - One per level (TencentARC's SD adapters: ``(id + 1) % 3 == 0`` in their UNet): each level's last
      block, `level_end_blocks`.
    - One more than levels (the SDXL adapters, ``full_xl``: TencentARC runs them through diffusers'
      UNet): diffusers' ``down_intrablock_additional_residuals`` rule, one per down block, after its
      last ResBlock/transformer pair where it has cross-attention but after its downsampling where
      it has none, then the last on the middle block's output. For SDXL (no attention at the first
      level): input blocks 3, 5 and 8, and the middle block.
    """
    levels = len(config.channel_mult)
    if count == levels:
        return level_end_blocks(config)
    if count == levels + 1:
        ends = level_end_blocks(config)
        last = levels - 1
        places = [end if config.has_attention(level) or level == last else end + 1 for level, end in enumerate(ends)]
        return (*places, MIDDLE)
    raise ValueError(
        f"expected {levels} adapter features (one per UNet level) or {levels + 1} (an XL adapter's: one per level "
        f"and the middle block), got {count}"
    )


def _add_feature(h: torch.Tensor, feature: torch.Tensor, where: str) -> torch.Tensor:
    if feature.shape[1:] != h.shape[1:]:
        raise ValueError(
            f"adapter feature of shape {list(feature.shape)} does not fit {where}'s output "
            f"{list(h.shape)}: the adapter or the condition image's size does not match this UNet"
        )
    return h + feature

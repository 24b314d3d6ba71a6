"""ControlNet (Zhang, Rao, Agrawala 2023, section 3): a trainable copy of the UNet's encoder that
reads a condition image and returns 13 residuals for the locked UNet, through zero convolutions.

Layout and names as the original ``cldm.ControlNet``: ``time_embed``, ``input_hint_block``,
``input_blocks``, ``zero_convs``, ``middle_block``, ``middle_block_out``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ..config import ControlNetConfig
from .kernels import Conv2d
from .layers import TimestepEmbedding, TimestepEmbedSequential, zero_module
from .unet import UNet, build_encoder, build_label_embed, build_time_embed, embed_time

# The 0.825 ** (12 - i) scales of the original apps' guess mode ("ControlNet is more important"):
# shallow residuals are damped (about 0.1 at the first skip), the middle one is kept whole.
SOFT_SCALE_BASE = 0.825


def soft_control_scales(strength: float, count: int = 13) -> list[float]:
    """Guess-mode scales ``strength * 0.825 ** (count - 1 - i)`` for i = 0 .. count - 1."""
    return [strength * SOFT_SCALE_BASE ** (count - 1 - i) for i in range(count)]


def zero_conv(channels: int) -> TimestepEmbedSequential:
    """A 1x1 convolution whose weight and bias start at zero (paper section 3.1): ``zero_convs.N.0``."""
    return TimestepEmbedSequential(zero_module(Conv2d(channels, channels, 1)))


def build_hint_encoder(config: ControlNetConfig) -> TimestepEmbedSequential:
    """``input_hint_block``: condition image [B, 3, H, W] in [0, 1] -> [B, model_channels, H/f, W/f].

    3x3 convolutions with SiLU between: one into the first stage's width, then per later stage a conv
    at the width and a stride-2 conv into the next (SD's four stages: eight convs at state-dict
    indices 0, 2, ..., 14, f = 8); the last conv, into the UNet's width, starts at zero.
    """
    widths = config.hint_block_channels
    plan = [(config.hint_channels, widths[0], 1)]  # (in, out, stride)
    for width, wider in itertools.pairwise(widths):
        plan += [(width, width, 1), (width, wider, 2)]
    layers: list[nn.Module] = []
    for channels_in, channels_out, stride in plan:
        layers += [Conv2d(channels_in, channels_out, 3, stride=stride, padding=1), nn.SiLU()]
    layers.append(zero_module(Conv2d(widths[-1], config.unet.model_channels, 3, padding=1)))
    return TimestepEmbedSequential(*layers)


class ControlNet(nn.Module):
    """The trainable copy: (noisy latents, hint features, timesteps, text) -> 13 residuals."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        unet = config.unet
        self.time_features = TimestepEmbedding(unet.model_channels)
        self.time_embed = build_time_embed(unet)
        self.label_emb = build_label_embed(unet)  # SDXL: its ControlNets read the vector y too
        self.input_hint_block = build_hint_encoder(config)
        self.input_blocks, self.middle_block = build_encoder(unet)
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in unet.encoder_block_channels())
        self.middle_block_out = zero_conv(unet.level_channels[-1])

    @classmethod
    def from_unet(cls, unet: UNet, config: ControlNetConfig | None = None) -> ControlNet:
        """A new ControlNet for ``unet`` (the original ``tool_add_control``): the encoder copy starts
        as the UNet's weights, the hint encoder at its initialisation, the zero convs at zero."""
        config = config or ControlNetConfig(unet=unet.config)
        if config.unet != unet.config:
            raise ValueError("the ControlNet's UNet configuration must equal the UNet it copies")
        parameter = next(unet.parameters())
        controlnet = cls(config).to(device=parameter.device, dtype=parameter.dtype)
        encoder = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
        copied = {k: v for k, v in unet.state_dict().items() if k.startswith(encoder)}
        # Every encoder key exists in both (build_encoder made both); only the new parts stay fresh.
        missing, _ = controlnet.load_state_dict(copied, strict=False)
        fresh = ("input_hint_block.", "zero_convs.", "middle_block_out.")
        if any(not k.startswith(fresh) for k in missing):
            raise RuntimeError(f"UNet encoder lacks keys the ControlNet copies: {missing[:5]}")
        return controlnet

    def zero_initialised_convs(self) -> list[nn.Conv2d]:
        """The layers that start at zero: the zero convolutions (13 for SD: one per encoder block and
        the middle block's) and the hint encoder's last conv."""
        return [*(block[0] for block in self.zero_convs), self.middle_block_out[0], self.input_hint_block[-1]]

    @torch.no_grad()
    def gaussian_init_(self, generator: torch.Generator | None = None) -> ControlNet:
        """The paper's ablative study (zero convolutions replaced by standard convolution layers
        initialised with Gaussian weights): every zero-initialised conv gets weights drawn from
        N(0, 1 / fan_in), the variance-preserving scale of a standard layer, and a zero bias. The
        ControlNet then disturbs the locked model from the first step. Returns ``self``."""
        for conv in self.zero_initialised_convs():
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            weight = torch.randn(conv.weight.shape, generator=generator) / fan_in**0.5
            conv.weight.copy_(weight.to(conv.weight))
            conv.bias.zero_()
        return self

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint features [B, model_channels, H/8, W/8] from a condition image [B, 3, H, W] in [0, 1].

        They do not depend on the timestep: compute them once per generation, not once per step.
        """
        return self.input_hint_block(hint, None, None)

    def forward(
        self,
        x: torch.Tensor,
        hint_features: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The residuals (13 for SD, 10 for SDXL): one per input block (after its zero conv) and the middle
        block's.

        The hint features are added to the copy's hidden state right after ``input_blocks[0]``.
        ``y``: SDXL's vector, as the UNet takes it (``UNet.forward``).
        """
        return self.residuals(x, hint_features, embed_time(self, timesteps, y), context)

    def residuals(
        self, x: torch.Tensor, hint_features: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        """`forward` from the time embedding ``emb`` on."""
        h = self.input_blocks[0](x, emb, context) + hint_features
        residuals = [self.zero_convs[0](h, emb, context)]
        for block, zero in zip(self.input_blocks[1:], self.zero_convs[1:], strict=True):
            h = block(h, emb, context)
            residuals.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h, emb, context))
        return residuals


def scale_residuals(
    residuals: Sequence[torch.Tensor], scales: Sequence[float], global_average_pooling: bool = False
) -> list[torch.Tensor]:
    """Multiply each residual by its control scale (``control_scales``); with global average pooling
    (the 1.1 shuffle model), then average each over H and W, in the original's order."""
    if len(scales) != len(residuals):
        raise ValueError(f"need one control scale per residual ({len(residuals)}), got {len(scales)}")
    scaled = [r * s for r, s in zip(residuals, scales, strict=True)]
    if global_average_pooling:
        scaled = [r.mean(dim=(2, 3), keepdim=True) for r in scaled]
    return scaled

"""The Stable Diffusion VAE (``ldm.models.autoencoder.AutoencoderKL``) with the original key names.

Module and parameter names equal the keys of an LDM checkpoint after the ``first_stage_model.``
prefix, so an SD file loads with ``load_state_dict(strict=True)`` and no renaming. Behaviour is that
of the original ``Encoder``/``Decoder`` in ``ldm.modules.diffusionmodules.model`` with the SD
``ddconfig`` (``double_z=True``, no attention outside the middle blocks, no dropout, no tanh).

The code is layout-agnostic: every op (GroupNorm, convs, pad, nearest upsampling, the flatten and
transpose around attention) runs on ``torch.channels_last`` tensors without forcing a copy back to
NCHW, so ``model.to(memory_format=torch.channels_last)`` is the fast path on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VAEConfig

__all__ = ["AutoencoderKL", "Decoder", "DiagonalGaussian", "Encoder"]

# The original clamps the log-variance before exponentiating so a wild encoder output cannot give
# an infinite or zero standard deviation.
_LOGVAR_MIN = -30.0
_LOGVAR_MAX = 20.0


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # ldm's Normalize(): eps 1e-6 (not PyTorch's 1e-5 default); the checkpoints were trained with it.
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected when widths differ) skip.

    The original's dropout (p=0 in every SD config) and time embedding (``temb_ch=0``) are absent.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Identity holds no parameters, so blocks that keep their width have no nin_shortcut key,
        # exactly as in the checkpoint.
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection.

    q, k, v and proj_out stay 1x1 convolutions because that is how the checkpoint stores them; the
    attention itself goes through ``scaled_dot_product_attention`` (default scale ``C ** -0.5``, as
    the original's explicit ``bmm``/softmax) so the fused CPU/GPU kernels are used.
    """

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    @staticmethod
    def _tokens(x: Tensor) -> Tensor:
        # [B, C, H, W] -> [B, 1, H*W, C]: one head. For channels_last input this is a pure view.
        return x.flatten(2).transpose(1, 2).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        out = F.scaled_dot_product_attention(self._tokens(self.q(h)), self._tokens(self.k(h)), self._tokens(self.v(h)))
        # Back to [B, C, H, W]; reshape (not view) because the strides depend on the input layout.
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only.

    The asymmetric pad is the original's (torch convs cannot pad asymmetrically); symmetric padding
    would shift every latent by half a pixel.
    """

    _PAD = (0, 1, 0, 1)  # (left, right, top, bottom)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self._PAD))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (``mid.block_1/attn_1/block_2``)."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _EncoderLevel(nn.Module):
    """One resolution of the encoder: ``down.N.block.M`` and, except at the last level, ``down.N.downsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm_groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[i], widths[i + 1], norm_groups) for i in range(num_blocks))
        self.downsample: Downsample | None = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class _DecoderLevel(nn.Module):
    """One resolution of the decoder: ``up.N.block.M`` and, except at level 0, ``up.N.upsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm_groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[i], widths[i + 1], norm_groups) for i in range(num_blocks))
        self.upsample: Upsample | None = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2 * z_channels, H / f, W / f] (f = 2 ** (levels - 1))."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups = config.ch, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, padding=1)
        # Level i reads the previous level's width; level 0 reads conv_in's ch (ldm's in_ch_mult = (1,) + ch_mult).
        in_widths = (ch, *(ch * m for m in config.ch_mult[:-1]))
        last = len(config.ch_mult) - 1
        self.down = nn.ModuleList(
            _EncoderLevel(in_widths[i], ch * m, config.num_res_blocks, groups, downsample=i != last)
            for i, m in enumerate(config.ch_mult)
        )
        top = ch * config.ch_mult[-1]
        self.mid = MidBlock(top, groups)
        self.norm_out = _group_norm(top, groups)
        # double_z: mean and log-variance side by side on the channel axis.
        self.conv_out = nn.Conv2d(top, 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_channels, h * f, w * f], not squashed by tanh.

    ``up[i]`` is the level at resolution i (0 = full size) as in the checkpoint, so the forward pass
    walks ``up`` from the last index to the first; every level has ``num_res_blocks + 1`` blocks.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups = config.ch, config.norm_groups
        top = ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, top, kernel_size=3, padding=1)
        self.mid = MidBlock(top, groups)
        # Level i reads the width of level i + 1 (the one run before it); the last level reads the mid block's.
        in_widths = (*(ch * m for m in config.ch_mult[1:]), top)
        self.up = nn.ModuleList(
            _DecoderLevel(in_widths[i], ch * m, config.num_res_blocks + 1, groups, upsample=i != 0)
            for i, m in enumerate(config.ch_mult)
        )
        bottom = ch * config.ch_mult[0]
        self.norm_out = _group_norm(bottom, groups)
        self.conv_out = nn.Conv2d(bottom, config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior: a Gaussian with diagonal covariance per latent element.

    ``moments`` is the ``quant_conv`` output [B, 2 * C, h, w]: mean then log-variance on the channel
    axis. The log-variance is clamped to [-30, 20] as in the original.
    """

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * noise``, noise drawn in float32 on the generator's device.

        Drawing in float32 on the generator's device (on the mean's device without a generator)
        makes a seed give the same noise whatever the model's dtype and device, and equals the
        original's ``torch.randn(shape)`` for a float32 CPU model.
        """
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """The SD VAE: ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder`` with LDM key names.

    ``encode`` takes images in [-1, 1] and returns the posterior; ``decode`` takes latents and returns
    images in about [-1, 1] (not clamped). Neither applies ``scale_factor``: the diffusion pipeline
    multiplies encoded latents by :attr:`scale_factor` before diffusion and divides by it before
    ``decode``, as the original ``LatentDiffusion`` does.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else VAEConfig()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def scale_factor(self) -> float:
        """Multiplier from VAE latents to diffusion latents (0.18215 for SD); applied by the pipeline."""
        return self.config.scale_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the latents ``encode`` produces and ``decode`` takes."""
        return self.config.embed_dim

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for SD)."""
        return self.config.downsample_factor

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of the downsample factor) -> posterior
        over unscaled latents [B, embed_dim, H / f, W / f]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images [B, 3, h * f, w * f] in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Reconstruction ``decode(encode(images))`` through the posterior mode, or a sample of it."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(latents)

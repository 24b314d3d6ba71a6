"""TAESD, the tiny autoencoder (madebyollin/taesd): a distilled stand-in for the SD VAE that
decodes latents in a few milliseconds per image, for a fast final decode and live previews.

Module names equal the keys of the original files: ``encoder.*`` is ``taesd_encoder.pth``'s
``nn.Sequential`` (``0.weight``, ``1.conv.0.weight``, ...) and ``decoder.*`` is
``taesd_decoder.pth``'s (index 0 is the parameter-free clamp, so its first convolution is
``1.weight``). ``taesdxl_*`` (SDXL's latents) has the same layout with other weights; 16-channel
variants (taesd3, taef1) differ only in ``latent_channels``.

**Latents.** TAESD's latent space is the diffusion model's: its "scale factor" is 1 (the TAESD
README; diffusers' ``AutoencoderTiny`` config has ``scaling_factor`` 1.0, so its pipelines hand it
their latents unchanged). So ``decode`` takes the latents the sampler returns, *already scaled*
(SD's VAE latents times 0.18215, SDXL's times 0.13025), and ``encode`` returns latents on that
scale: ``taesd.decode(x)`` stands for ``vae.decode(x / vae.scale_factor)`` and ``taesd.encode(img)``
for ``vae.encode(img).mode() * vae.scale_factor``. ``scale_factor`` (1.0) is there so that code
written for the VAE's convention works unchanged.

**Images.** In and out in [-1, 1] like the VAE (the original nets work in [0, 1]; ``encode``
and ``decode`` convert, as diffusers' ``EncoderTiny``/``DecoderTiny`` do). The decoder's output is
not clamped.

``scale_latents``/``unscale_latents`` are the original's convention for storing latents as 8-bit
images (``latent_magnitude`` 3, ``latent_shift`` 0.5: [-3, 3] to [0, 1]); ``forward`` is the
round trip through them, as diffusers' ``AutoencoderTiny.forward``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TinyAutoencoder", "tiny_decoder", "tiny_encoder"]

WIDTH = 64  # every TAESD convolution's channels
LATENT_MAGNITUDE = 3.0
LATENT_SHIFT = 0.5


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the decoder's input to (-3, 3): ``3 tanh(x / 3)``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between, plus the input, then ReLU (every TAESD block is
    64 -> 64 wide, so the skip is the identity and holds no weights)."""

    def __init__(self, channels: int = WIDTH) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(latent_channels: int = 4) -> nn.Sequential:
    """Images [B, 3, H, W] in [0, 1] -> latents [B, latent_channels, H / 8, W / 8]: three stride-2
    convolutions (no bias), each followed by three blocks."""
    layers: list[nn.Module] = [_conv(3, WIDTH), Block()]
    for _ in range(3):
        layers += [_conv(WIDTH, WIDTH, stride=2, bias=False), Block(), Block(), Block()]
    return nn.Sequential(*layers, _conv(WIDTH, latent_channels))


def tiny_decoder(latent_channels: int = 4) -> nn.Sequential:
    """Latents -> images in about [0, 1], 8 times larger: three nearest 2x upsamplings, each after
    three blocks and before a convolution (no bias)."""
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
    for _ in range(3):
        layers += [Block(), Block(), Block(), nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
    return nn.Sequential(*layers, Block(), _conv(WIDTH, 3))


class TinyAutoencoder(nn.Module):
    """TAESD: ``encoder`` and ``decoder``, either of which may be absent (None) when only one file
    was loaded; a preview or a final decode needs the decoder only."""

    def __init__(self, latent_channels: int = 4, *, encoder: bool = True, decoder: bool = True) -> None:
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("a TinyAutoencoder needs an encoder, a decoder or both")
        self.latent_channels = latent_channels
        self.encoder = tiny_encoder(latent_channels) if encoder else None
        self.decoder = tiny_decoder(latent_channels) if decoder else None

    @property
    def scale_factor(self) -> float:
        """TAESD's latents are the diffusion model's: no scaling (see the module's docstring)."""
        return 1.0

    @property
    def downsample_factor(self) -> int:
        return 8

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of 8) -> diffusion latents [B, C, H / 8, W / 8]."""
        if self.encoder is None:
            raise ValueError("this TAESD was loaded without its encoder (taesd_encoder.pth); give the encoder file too")
        return self.encoder(images.add(1).div(2))

    def decode(self, latents: Tensor) -> Tensor:
        """Diffusion latents [B, C, h, w] (as the sampler returns them) -> images [B, 3, 8h, 8w] in
        about [-1, 1] (not clamped)."""
        if self.decoder is None:
            raise ValueError("this TAESD was loaded without its decoder (taesd_decoder.pth); give the decoder file too")
        return self.decoder(latents).mul(2).sub(1)

    @staticmethod
    def scale_latents(latents: Tensor) -> Tensor:
        """Latents -> [0, 1], clamped: how the original stores them as 8-bit images."""
        return latents.div(2 * LATENT_MAGNITUDE).add(LATENT_SHIFT).clamp(0, 1)

    @staticmethod
    def unscale_latents(stored: Tensor) -> Tensor:
        """[0, 1] -> latents: the inverse of `scale_latents` (inside its range)."""
        return stored.sub(LATENT_SHIFT).mul(2 * LATENT_MAGNITUDE)

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction through latents quantized to 8 bits (diffusers' ``AutoencoderTiny.forward``)."""
        stored = self.scale_latents(self.encode(images)).mul(255).round().byte()
        return self.decode(self.unscale_latents(stored / 255.0))

"""The Stable Diffusion stack as one object: UNet, VAE and text encoder(s), built from a ModelConfig."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from ..config import ModelConfig
from .conditioning import SizeConditioning, size_vector
from .text import DualTextEncoder, TextEncoder, build_text_encoder
from .unet import UNet
from .vae import AutoencoderKL

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_empty(factory: Callable[[], ModuleT]) -> ModuleT:
    """Build a module on the meta device: no memory, no random initialisation. Its weights must
    then be loaded with ``load_state_dict(..., assign=True)``; SD 1.5's UNet alone would otherwise
    spend seconds initialising 860M parameters that the file overwrites."""
    with torch.device("meta"):
        return factory()


def build_text_encoders(config: ModelConfig) -> TextEncoder | DualTextEncoder:
    """The model's text encoder: one (SD 1.x, 2.x), or SDXL's two as one module (``text_2`` set)."""
    if config.text_2 is None:
        return build_text_encoder(config.text)
    return DualTextEncoder(config.text, config.text_2)


class StableDiffusion(nn.Module):
    """A latent diffusion model: ``unet`` denoises latents, ``vae`` maps images to latents and back,
    ``text_encoder`` turns token ids into the context the UNet cross-attends to (for SDXL both text
    encoders, whose ``encode`` also gives the pooled embedding of the UNet's vector y)."""

    def __init__(self, config: ModelConfig, *, empty: bool = False) -> None:
        super().__init__()
        self.config = config
        if empty:
            self.unet = build_empty(lambda: UNet(config.unet))
            self.vae = build_empty(lambda: AutoencoderKL(config.vae))
            self.text_encoder = build_empty(lambda: build_text_encoders(config))
        else:
            self.unet = UNet(config.unet)
            self.vae = AutoencoderKL(config.vae)
            self.text_encoder = build_text_encoders(config)

    def added_conditioning(
        self, pooled: torch.Tensor, height: int, width: int, size: SizeConditioning | None = None
    ) -> torch.Tensor:
        """SDXL's vector y [B, adm_in_channels] for images of ``height`` x ``width`` pixels: the pooled
        text embedding (``text_encoder.encode(tokens).pooled``) and the size conditioning, by default
        original = target = that size and crop (0, 0) (models/conditioning.py)."""
        if self.config.unet.adm_in_channels is None:
            raise ValueError(f"{self.config.name}: this model takes no size conditioning (it is not SDXL-like)")
        return size_vector(pooled, height, width, size)

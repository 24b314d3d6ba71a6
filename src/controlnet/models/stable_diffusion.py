"""The Stable Diffusion stack as one object: UNet, VAE and text encoder, built from a ModelConfig."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from ..config import ModelConfig
from .text import build_text_encoder
from .unet import UNet
from .vae import AutoencoderKL

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_empty(factory: Callable[[], ModuleT]) -> ModuleT:
    """Build a module on the meta device: no memory, no random initialisation. Its weights must
    then be loaded with ``load_state_dict(..., assign=True)``; SD 1.5's UNet alone would otherwise
    spend seconds initialising 860M parameters that the file overwrites."""
    with torch.device("meta"):
        return factory()


class StableDiffusion(nn.Module):
    """A latent diffusion model: ``unet`` denoises latents, ``vae`` maps images to latents and back,
    ``text_encoder`` turns token ids into the context the UNet cross-attends to."""

    def __init__(self, config: ModelConfig, *, empty: bool = False) -> None:
        super().__init__()
        self.config = config
        if empty:
            self.unet = build_empty(lambda: UNet(config.unet))
            self.vae = build_empty(lambda: AutoencoderKL(config.vae))
            self.text_encoder = build_empty(lambda: build_text_encoder(config.text))
        else:
            self.unet = UNet(config.unet)
            self.vae = AutoencoderKL(config.vae)
            self.text_encoder = build_text_encoder(config.text)

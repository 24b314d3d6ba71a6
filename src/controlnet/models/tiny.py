"""Seeded random models of the ``tiny`` configuration, for tests, benchmarks and examples that must
run every code path in a fraction of a second. Their images are noise: for pictures, use the shipped
model (shipped.py)."""

from __future__ import annotations

import numpy as np
import torch

from ..config import TINY
from .controlnet import ControlNet
from .stable_diffusion import StableDiffusion


def circle_edges(size: int) -> np.ndarray:
    """A white circle outline on black, [size, size, 3] uint8: a stand-in Canny map."""
    ys, xs = np.mgrid[:size, :size]
    radius = np.hypot(ys - size / 2, xs - size / 2)
    ring = np.abs(radius - size / 3) < 1.0
    return np.repeat((ring * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _wake_zero_layers(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give small random weights to every zero-initialised layer: untrained, they would hide the
    paths they close (a fresh UNet's output conv is zero, so it would predict zero noise)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("weight") and parameter.ndim > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def random_tiny_models(seed: int = 0) -> tuple[StableDiffusion, ControlNet]:
    """A tiny base model and ControlNet with seeded random weights (zero layers woken up)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = StableDiffusion(TINY).eval()
    controlnet = ControlNet.from_unet(model.unet, model.config.controlnet()).eval()
    _wake_zero_layers(model, generator)
    _wake_zero_layers(controlnet, generator)
    return model, controlnet

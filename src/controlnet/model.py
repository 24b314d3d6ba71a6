"""Kept for code written against the earlier layout (``from controlnet.model import
StableDiffusion``): the code lives in :mod:`controlnet.models.stable_diffusion`."""

from .models.stable_diffusion import StableDiffusion, build_empty

__all__ = ["StableDiffusion", "build_empty"]

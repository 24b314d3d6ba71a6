"""Kept for code written against the earlier layout (``from controlnet.controlnet import
ControlNet, scale_residuals``): the code lives in :mod:`controlnet.models.controlnet`."""

from .models.controlnet import ControlNet, build_hint_encoder, scale_residuals, soft_control_scales, zero_conv

__all__ = ["ControlNet", "build_hint_encoder", "scale_residuals", "soft_control_scales", "zero_conv"]

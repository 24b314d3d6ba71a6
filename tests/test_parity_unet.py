"""Parity of the UNet and the ControlNet with diffusers, an independent implementation, on identical
random weights at full SD 1.5 and SD 2.1 size with a small latent (16x16).

Tolerance: max abs error <= 1e-4 of the output's largest magnitude (fp32).
"""

from __future__ import annotations

import pytest
import torch

from controlnet.config import SD15, SD21, WORLD, ModelConfig
from controlnet.formats.diffusers_unet import controlnet_ldm_to_diffusers, unet_ldm_to_diffusers
from controlnet.formats.diffusers_unet_config import controlnet_config_to_diffusers, unet_config_to_diffusers
from controlnet.models.controlnet import ControlNet, scale_residuals
from controlnet.models.unet import UNet

from .helpers import random_module, relative_error

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4
pytestmark = pytest.mark.slow


def _twins(config: ModelConfig, seed: int):
    """Our UNet and ControlNet with random weights, and diffusers' models sharing the same tensors."""
    unet = random_module(lambda: UNet(config.unet), seed)
    controlnet = random_module(lambda: ControlNet(config.controlnet()), seed + 1)
    with torch.device("meta"):
        their_unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(config.unet))
        their_controlnet = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(controlnet.config))
    their_unet.load_state_dict(unet_ldm_to_diffusers(unet.state_dict(), config.unet), strict=True, assign=True)
    their_controlnet.load_state_dict(
        controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config), strict=True, assign=True
    )
    return unet, controlnet, their_unet.eval(), their_controlnet.eval()


def _inputs(config: ModelConfig, seed: int):
    generator = torch.Generator().manual_seed(seed)
    latent = 128 // config.vae.downsample_factor
    x = torch.randn(2, config.unet.in_channels, latent, latent, generator=generator)
    t = torch.tensor([981, 41])
    context = torch.randn(2, 77, config.unet.context_dim, generator=generator)
    hint = torch.rand(2, 3, 128, 128, generator=generator)
    return x, t, context, hint


# world: 8 latent channels and a three-stage hint encoder for its 4x VAE
@pytest.mark.parametrize("config", [SD15, SD21, WORLD], ids=["sd15", "sd21", "world"])
@torch.no_grad()
def test_controlnet_and_controlled_unet_match_diffusers(config):
    unet, controlnet, their_unet, their_controlnet = _twins(config, seed=10)
    x, t, context, hint = _inputs(config, seed=11)
    strength = 0.7

    raw = controlnet(x, controlnet.encode_hint(hint), t, context)
    residuals = scale_residuals(raw, [strength] * len(raw))
    down, mid = their_controlnet(
        x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=strength, return_dict=False
    )
    errors = [relative_error(ours, theirs) for ours, theirs in zip(residuals, [*down, mid], strict=True)]
    assert max(errors) <= TOLERANCE, errors

    plain = unet(x, t, context)
    their_plain = their_unet(x, t, encoder_hidden_states=context).sample
    assert relative_error(plain, their_plain) <= TOLERANCE

    controlled = unet(x, t, context, control=residuals)
    their_controlled = their_unet(
        x, t, encoder_hidden_states=context, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    error = relative_error(controlled, their_controlled)
    print(
        f"{config.name}: residuals {max(errors):.1e}, plain UNet {relative_error(plain, their_plain):.1e}, "
        f"controlled UNet {error:.1e} (relative max abs error)"
    )
    assert error <= TOLERANCE
    assert relative_error(controlled, plain) > 1e-2  # the control did something


@torch.no_grad()
def test_global_average_pooling_matches_diffusers_global_pool_conditions():
    config = SD15
    controlnet = random_module(lambda: ControlNet(config.controlnet(global_average_pooling=True)), seed=3)
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(controlnet.config))
    theirs.load_state_dict(controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config), assign=True)
    x, t, context, hint = _inputs(config, seed=4)
    ours = scale_residuals(controlnet(x, controlnet.encode_hint(hint), t, context), [1.0] * 13, True)
    down, mid = theirs.eval()(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert all(r.shape[-2:] == (1, 1) for r in ours)
    assert max(relative_error(a, b) for a, b in zip(ours, [*down, mid], strict=True)) <= TOLERANCE

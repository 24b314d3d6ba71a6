"""The eps and v parametrisations, written once: how noisy latents, the clean latents, the noise
and a model's output relate. The samplers turn an output into clean latents and noise with it;
training noises latents and builds its regression target with it.

With ``a`` the alpha-bar of a timestep (``sqrt_alpha`` = sqrt(a), ``sqrt_one_minus_alpha`` =
sqrt(1 - a)): ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (Ho et al. 2020, eq. 4), and a v-model predicts
``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho 2022, sec. 4; k-diffusion's CompVisVDenoiser).
"""

from __future__ import annotations

import torch

from ..config import PredictionType


def noised(x0: torch.Tensor, eps: torch.Tensor, sqrt_alpha, sqrt_one_minus_alpha) -> torch.Tensor:
    """``x_t``: the clean latents ``x0`` noised with ``eps`` to the level of ``a``."""
    return sqrt_alpha * x0 + sqrt_one_minus_alpha * eps


def target(prediction: PredictionType, x0: torch.Tensor, eps: torch.Tensor, sqrt_alpha, sqrt_one_minus_alpha):
    """What a model of this parametrisation should output for ``x_t = noised(x0, eps, ...)``."""
    return eps if prediction == "eps" else sqrt_alpha * eps - sqrt_one_minus_alpha * x0


def x0_and_eps(
    prediction: PredictionType, x_t: torch.Tensor, output: torch.Tensor, sqrt_alpha, sqrt_one_minus_alpha
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents and the noise that a model ``output`` at ``x_t`` stands for."""
    if prediction == "v":
        return sqrt_alpha * x_t - sqrt_one_minus_alpha * output, sqrt_alpha * output + sqrt_one_minus_alpha * x_t
    return (x_t - sqrt_one_minus_alpha * output) / sqrt_alpha, output

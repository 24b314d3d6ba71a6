"""Noise levels of a model's training schedule, and the schedules samplers walk down them (float64,
on the CPU). A noise level is named by its sigma: ``sigma = sqrt((1 - a) / a)``, ``a`` the alpha-bar
of a timestep.

References: Karras et al. 2022 (arXiv:2206.00364), eq. 5; the original's "uniform" DDIM steps
(docs/reference.md, "Sampling as the original does it"); k-diffusion's discrete schedules.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ScheduleConfig


def training_alphas_cumprod(schedule: ScheduleConfig) -> torch.Tensor:
    """Alpha-bar per training step, float64 holding the float32 values of the original's buffer."""
    return schedule.alphas_cumprod().float().double()


def training_sigmas(schedule: ScheduleConfig) -> torch.Tensor:
    """The 1000 training noise levels ``sqrt((1 - a) / a)``, increasing with t (float64)."""
    alphas = training_alphas_cumprod(schedule)
    return ((1 - alphas) / alphas).sqrt()


def sigma_to_t(sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous model timesteps for ``sigmas``: log-sigma interpolated linearly between the two
    nearest training levels and clamped to [0, T - 1] (k-diffusion's ``DiscreteSchedule.sigma_to_t``)."""
    log_train = train_sigmas.log().numpy()
    t = np.interp(sigmas.double().log().numpy(), log_train, np.arange(len(log_train), dtype=np.float64))
    return torch.from_numpy(t)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``steps`` levels even in ``sigma^(1/rho)``, then 0 ([steps + 1])."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def default_sigmas(steps: int, train_sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``get_sigmas(n)``: ``t = linspace(T - 1, 0, steps)``, log-sigma interpolated
    at those t, then 0 ([steps + 1]). (diffusers interpolates sigma itself, not its log.)"""
    t = np.linspace(len(train_sigmas) - 1, 0, steps)
    log_train = train_sigmas.log().numpy()
    sigmas = torch.from_numpy(np.exp(np.interp(t, np.arange(len(log_train)), log_train)))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The original's "uniform" DDIM steps, ascending: ``c = T // steps``; ``0, c, 2c, ...`` each plus 1.

    As the original, when ``T`` is not a multiple of ``steps`` this gives a few more steps than
    asked (``range(0, T, c)``): S=20 gives 1, 51, ..., 951; S=30 gives 31 steps. Where the
    original would reach ``t = T`` and fail with an IndexError (when ``c`` divides ``T - 1``:
    S = 3, 9, 27, 36, 37, 101..111, ...), that one out-of-range step is dropped.
    """
    _check_steps(steps, num_timesteps)
    stride = num_timesteps // steps
    return [t + 1 for t in range(0, num_timesteps, stride) if t + 1 < num_timesteps]


def _check_steps(steps: int, num_timesteps: int) -> None:
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")

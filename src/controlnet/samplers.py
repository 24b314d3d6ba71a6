"""Samplers: pure functions over a denoiser ``f(x, t) -> model output`` (eps or v).

The sampler never sees ControlNet or guidance; those live inside the denoiser it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ScheduleConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The original's "uniform" DDIM steps: ``c = T // steps``; ``0, c, 2c, ...`` each plus 1.

    As the original, when ``T`` is not a multiple of ``steps`` this gives a few more steps than
    asked (``range(0, T, c)``): S=20 gives 1, 51, ..., 951.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    stride = num_timesteps // steps
    return [t + 1 for t in range(0, num_timesteps, stride)]


@dataclass(frozen=True)
class DDIMSchedule:
    """The per-step constants of DDIM, computed once per generation (float64, then float32)."""

    timesteps: list[int]
    alphas: torch.Tensor  # alpha-bar at each step
    alphas_prev: torch.Tensor  # alpha-bar of the next (smaller) step; alphas_cumprod[0] after the last
    sigmas: torch.Tensor  # eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))

    @classmethod
    def make(cls, schedule: ScheduleConfig, steps: int, eta: float = 0.0) -> DDIMSchedule:
        timesteps = ddim_timesteps(steps, schedule.num_timesteps)
        # The original keeps alphas_cumprod as a float32 buffer and derives the DDIM constants from it.
        cumprod = schedule.alphas_cumprod().float().double()
        alphas = cumprod[timesteps]
        alphas_prev = torch.cat([cumprod[:1], cumprod[timesteps[:-1]]])
        sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        return cls(timesteps, alphas.float(), alphas_prev.float(), sigmas.float())


def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: DDIMSchedule,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from the noisiest step down, as the original ``DDIMSampler``:
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z``."""
    total = len(schedule.timesteps)
    for i, index in enumerate(reversed(range(total))):
        t = torch.full((x.shape[0],), schedule.timesteps[index], device=x.device, dtype=torch.long)
        a, a_prev, sigma = schedule.alphas[index], schedule.alphas_prev[index], schedule.sigmas[index]
        output = denoise(x, t)
        if prediction == "v":
            eps = a.sqrt() * output + (1 - a).sqrt() * x
            x0 = a.sqrt() * x - (1 - a).sqrt() * output
        else:
            eps = output
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma * noise
        if callback is not None:
            callback(i + 1, total)
    return x

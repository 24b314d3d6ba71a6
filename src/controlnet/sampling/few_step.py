"""Few-step samplers for distilled models: LCM and TCD, each as a ``*_prepare`` (the constants of a
plan) and a ``*_loop`` over a run of samplers.py, registered there beside the others.

Both walk the timesteps of the schedule the model was distilled on: ``original_steps`` (50) evenly
spaced training steps ``k - 1, 2k - 1, ..., T - 1`` (``k = T // 50``: 19, 39, ..., 999), of which a
run of N steps takes every ``50 / N``-th, from the top (N = 4: 999, 759, 499, 259). More than 50
steps would leave that schedule and are refused, as diffusers refuses them.

**LCM** (Luo et al. 2023, "Latent Consistency Models", arXiv:2310.04378, alg. 3, the multistep
consistency sampler): at each step the model's clean-latent estimate passes through the consistency
model's boundary condition, ``f(x, t) = c_skip(t) x + c_out(t) x0`` with ``c_skip = s^2 / (u^2 +
s^2)``, ``c_out = u / sqrt(u^2 + s^2)``, ``u = 10 t`` and ``s = sigma_data = 0.5`` (diffusers'
``timestep_scaling`` and ``sigma_data``), then is noised afresh to the next step's level; the last
step returns ``f`` itself (no noise, so one step is deterministic).

**TCD** (Zheng et al. 2024, "Trajectory Consistency Distillation", arXiv:2402.19159, sec. 4.4,
strategic stochastic sampling): step ``t -> t'`` goes deterministically (DDIM-like, through x0 and
eps) to the lower level ``s = floor((1 - gamma) t')``, then noises back up from ``s`` to ``t'``.
``gamma`` (diffusers' ``eta``; the plan's ``eta``) sets the stochasticity: 0 is deterministic DDIM
on the consistency model, 1 re-noises from x0 at every step (LCM's sampler without the boundary
condition). The last step goes to ``s = 0``, i.e. ``alphas_cumprod[0]`` (sigma 0.029), as DDIM.

Both equal diffusers' ``LCMScheduler`` and ``TCDScheduler`` with their default configuration
(tests/test_few_step_samplers.py): the same timesteps, per-step updates and noise draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import ScheduleConfig
from .schedules import training_alphas_cumprod

if TYPE_CHECKING:
    from .samplers import _Run

Coefficients = dict[str, torch.Tensor]

ORIGINAL_STEPS = 50  # the distillation schedule's steps (diffusers' original_inference_steps)
TIMESTEP_SCALING = 10.0  # LCM's boundary condition reads u = 10 t (diffusers' timestep_scaling)
SIGMA_DATA = 0.5
TCD_GAMMA = 0.3  # TCD's default gamma (diffusers' TCD pipelines' eta; the paper's)


def distilled_timesteps(steps: int, num_timesteps: int = 1000, original_steps: int = ORIGINAL_STEPS) -> list[int]:
    """The LCM/TCD timesteps of an ``steps``-step run, in evaluation order (diffusers'
    ``set_timesteps``): every ``original_steps / steps``-th of the distillation schedule."""
    if not 1 <= steps <= original_steps:
        raise ValueError(
            f"lcm and tcd take 1 to {original_steps} steps (the {original_steps}-step schedule they were "
            f"distilled on), got {steps}"
        )
    k = num_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[indices]]


def _sigma(alpha: torch.Tensor) -> torch.Tensor:
    return ((1 - alpha) / alpha).sqrt()


def _f32(value: torch.Tensor) -> torch.Tensor:
    """float64 holding float32 values: diffusers computes these scalars in float32."""
    return value.float().double()


# ----------------------------------------------------------------------------------------------
# LCM


def lcm_prepare(schedule: ScheduleConfig, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, Coefficients]:
    """Timesteps, levels and per-step constants of LCM's multistep sampler (``eta`` unused: 0)."""
    cumprod = training_alphas_cumprod(schedule)
    timesteps = distilled_timesteps(steps, schedule.num_timesteps)
    alpha = cumprod[timesteps]
    alpha_next = torch.cat([cumprod[timesteps[1:]], alpha.new_ones(1)])  # last step: f itself, no noise
    u = torch.tensor(timesteps, dtype=torch.float64) * TIMESTEP_SCALING
    coefficients = {
        "sqrt_alpha": alpha.sqrt(),
        "sqrt_one_minus_alpha": (1 - alpha).sqrt(),
        "c_skip": _f32(SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2)),
        "c_out": _f32(u / (u**2 + SIGMA_DATA**2).sqrt()),
        "sqrt_alpha_next": alpha_next.sqrt(),
        "noise_std": (1 - alpha_next).sqrt(),  # 0 on the last step
    }
    sigmas = torch.cat([_sigma(alpha), alpha.new_zeros(1)])
    return torch.tensor(timesteps, dtype=torch.float64), sigmas, coefficients


def lcm_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """LCM multistep sampling (Luo et al. 2023, alg. 3): ``f = c_skip x + c_out x0``, then
    ``x_next = sqrt(a_next) f + sqrt(1 - a_next) z``; the last step returns ``f``."""
    c = run.c
    for i in range(run.total):
        x = c["c_skip"][i] * x + c["c_out"][i] * run.denoised(x, i)
        if run.nonzero("noise_std", i):
            x = c["sqrt_alpha_next"][i] * x + c["noise_std"][i] * run.randn(x)
        x = run.end_step(x, i)
    return x


# ----------------------------------------------------------------------------------------------
# TCD


def tcd_prepare(schedule: ScheduleConfig, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, Coefficients]:
    """Timesteps, levels and per-step constants of TCD's strategic stochastic sampling with
    ``gamma = eta``."""
    cumprod = training_alphas_cumprod(schedule)
    timesteps = distilled_timesteps(steps, schedule.num_timesteps)
    targets = [*timesteps[1:], 0]  # t' of each step; the last goes to 0
    # s = floor((1 - gamma) t'), computed as diffusers does (a float32 product of the integer t').
    lower = [int(torch.floor((1 - eta) * torch.tensor(t, dtype=torch.long))) for t in targets]
    alpha, alpha_target, alpha_s = cumprod[timesteps], cumprod[targets], cumprod[lower]
    # Noise back up from s to t' on every step but the last, and only with gamma > 0 (at gamma 0,
    # s = t': deterministic). alpha_s > alpha_target wherever it is drawn (s < t').
    renoise = torch.tensor([eta > 0 and i < steps - 1 for i in range(steps)])
    kept = torch.where(renoise, alpha_target / alpha_s, torch.ones_like(alpha))
    coefficients = {
        "sqrt_alpha": alpha.sqrt(),
        "sqrt_one_minus_alpha": (1 - alpha).sqrt(),
        "sqrt_alpha_s": alpha_s.sqrt(),
        "sqrt_one_minus_alpha_s": (1 - alpha_s).sqrt(),
        "renoise_scale": _f32(kept).sqrt(),
        "noise_std": (1 - _f32(kept)).sqrt(),  # 0 where no noise is drawn
    }
    sigmas = torch.cat([_sigma(alpha), _sigma(cumprod[:1])])  # the last step lands on alphas_cumprod[0]
    return torch.tensor(timesteps, dtype=torch.float64), sigmas, coefficients


def tcd_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """TCD (Zheng et al. 2024, sec. 4.4): ``x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps``, then
    ``x_t' = sqrt(a_t' / a_s) x_s + sqrt(1 - a_t' / a_s) z`` (gamma > 0, not on the last step)."""
    c = run.c
    for i in range(run.total):
        x0, eps = run.predict(x, i)
        x = c["sqrt_alpha_s"][i] * x0 + c["sqrt_one_minus_alpha_s"][i] * eps
        if run.nonzero("noise_std", i):
            x = c["renoise_scale"][i] * x + c["noise_std"][i] * run.randn(x)
        x = run.end_step(x, i)
    return x

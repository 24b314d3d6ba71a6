"""Each sampler's own arithmetic: the constants it computes once for a plan (``*_prepare``) and its
loop over the steps (``*_loop``), which calls the model through a run of samplers.py (``run.predict``,
``run.denoised``, ``run.end_step``, ...). samplers.py registers them by name.

References: DDIM, Song et al. 2021 (arXiv:2010.02502), eq. 12; Karras et al. 2022
(arXiv:2206.00364), alg. 2 (Euler steps in sigma space); DPM-Solver++, Lu et al. 2022
(arXiv:2211.01095), alg. 2; UniPC, Zhao et al. 2023 (arXiv:2302.04867), alg. 2 with
``B(h) = e^h - 1`` ("bh2").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import ScheduleConfig
from .schedules import ddim_timesteps, training_alphas_cumprod, training_sigmas

if TYPE_CHECKING:
    from .samplers import _Run

Coefficients = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# DDIM (VP space), exactly as the original's DDIMSampler


def ddim_prepare(schedule: ScheduleConfig, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, Coefficients]:
    """The original's ``make_ddim_sampling_parameters``, from the float32 alphas_cumprod buffer.

    Like the original, the float32 values are combined in float64 and the results cast to
    float32; the step after the smallest timestep goes to ``alphas_cumprod[0]``.
    """
    cumprod = training_alphas_cumprod(schedule)
    timesteps = list(reversed(ddim_timesteps(steps, schedule.num_timesteps)))  # evaluation order
    alpha = cumprod[timesteps]
    alpha_prev = torch.cat([cumprod[timesteps[1:]], cumprod[:1]])
    eta_sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
    alpha, alpha_prev, eta_sigma = (v.float().double() for v in (alpha, alpha_prev, eta_sigma))
    coefficients = {
        "alpha": alpha,
        "alpha_prev": alpha_prev,
        "eta_sigma": eta_sigma,  # the std of the noise added per step (eq. 16)
        "sqrt_alpha": alpha.sqrt(),
        "sqrt_one_minus_alpha": (1 - alpha).sqrt(),
        "sqrt_alpha_prev": alpha_prev.sqrt(),
        "direction": (1 - alpha_prev - eta_sigma**2).sqrt(),  # the "direction pointing to x_t"
    }
    levels = torch.cat([alpha, alpha_prev[-1:]])  # the last step lands on alphas_cumprod[0], not 0
    sigmas = ((1 - levels) / levels).sqrt()
    return torch.tensor(timesteps, dtype=torch.float64), sigmas, coefficients


def ddim_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z``."""
    c = run.c
    for i in range(run.total):
        x0, eps = run.predict(x, i)
        x = c["sqrt_alpha_prev"][i] * x0 + c["direction"][i] * eps
        if run.nonzero("eta_sigma", i):
            x = x + c["eta_sigma"][i] * run.randn(x)
        x = run.end_step(x, i)
    return x


# ----------------------------------------------------------------------------------------------
# k-diffusion samplers (sigma space): Euler, Euler ancestral, DPM++ 2M


def euler_prepare(sigmas: torch.Tensor) -> Coefficients:
    return {"sigma": sigmas[:-1], "dt": sigmas[1:] - sigmas[:-1]}


def euler_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """Euler steps on the probability-flow ODE ``dx/dsigma = (x - x0) / sigma`` (Karras et al.,
    alg. 2 without churn; k-diffusion's ``sample_euler``)."""
    c = run.c
    for i in range(run.total):
        derivative = (x - run.denoised(x, i)) / c["sigma"][i]
        x = x + derivative * c["dt"][i]
        x = run.end_step(x, i)
    return x


def euler_ancestral_prepare(sigmas: torch.Tensor) -> Coefficients:
    """Split each step into a deterministic step down to ``sigma_down`` and fresh noise of std
    ``sigma_up``, ``sigma_down^2 + sigma_up^2 = sigma_next^2`` (k-diffusion's ``get_ancestral_step``, eta 1)."""
    now, nxt = sigmas[:-1], sigmas[1:]
    sigma_up = torch.minimum(nxt, (nxt**2 * (now**2 - nxt**2) / now**2).sqrt())
    sigma_down = (nxt**2 - sigma_up**2).sqrt()
    return {"sigma": now, "dt": sigma_down - now, "sigma_up": sigma_up}


def euler_ancestral_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, eta 1)."""
    c = run.c
    for i in range(run.total):
        derivative = (x - run.denoised(x, i)) / c["sigma"][i]
        x = x + derivative * c["dt"][i]
        if run.nonzero("sigma_up", i):
            x = x + run.randn(x) * c["sigma_up"][i]
        x = run.end_step(x, i)
    return x


def dpmpp_2m_prepare(sigmas: torch.Tensor) -> Coefficients:
    """DPM-Solver++(2M) constants in ``lambda = -log sigma``: ``h_i = lambda_{i+1} - lambda_i``."""
    now, nxt = sigmas[:-1], sigmas[1:]
    h = now.log() - nxt.log()  # +inf on a step to sigma 0
    phi = -torch.expm1(-h)  # 1 - e^-h
    # r_i = h_{i-1} / h_i; the second-order term weighs (x0_i - x0_{i-1}) by phi / (2 r_i). Unused on
    # a run's first step and on a step to sigma 0 (first order there: k-diffusion and diffusers).
    half_inv_r = torch.zeros_like(h)
    half_inv_r[1:] = h[1:] / (2 * h[:-1])
    correction = torch.where(torch.isfinite(h), phi * half_inv_r, torch.zeros_like(h))
    return {"ratio": nxt / now, "phi": phi, "phi_correction": correction}


def dpmpp_2m_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2; k-diffusion's ``sample_dpmpp_2m``):
    ``x_next = (sigma_next / sigma) x + (1 - e^-h) D`` with ``D = x0 + (x0 - x0_prev) / (2 r)``;
    first order (``D = x0``) on a run's first step and on the step to sigma 0."""
    c = run.c
    previous = None
    for i in range(run.total):
        x0 = run.denoised(x, i)
        x = c["ratio"][i] * x + c["phi"][i] * x0
        if previous is not None and not run.to_zero(i):
            x = x + c["phi_correction"][i] * (x0 - previous)
        previous = x0
        x = run.end_step(x, i)
    return x


# ----------------------------------------------------------------------------------------------
# UniPC (VP space): UniP-2 predictor with UniC-2 corrector, B(h) = e^h - 1 ("bh2")


def unipc_prepare(schedule: ScheduleConfig, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, Coefficients]:
    """diffusers' ``UniPCMultistepScheduler`` defaults (order 2, bh2, predict x0, lower_order_final)
    with its default "linspace" spacing: ``round(linspace(0, T - 1, steps + 1))`` reversed without
    the final 0, so the first step is at t = 999 (pure noise; "leading" would start lower)."""
    if steps >= schedule.num_timesteps:
        raise ValueError(f"unipc needs fewer than {schedule.num_timesteps} steps, got {steps}")
    train = training_sigmas(schedule)
    timesteps = np.linspace(0, schedule.num_timesteps - 1, steps + 1).round()[::-1][:-1].copy()
    sigmas = torch.cat([train[torch.from_numpy(timesteps).long()], train.new_zeros(1)])
    alpha = 1 / (sigmas**2 + 1).sqrt()  # VP: x = alpha x0 + s eps, s = sigma * alpha
    s = sigmas * alpha
    coefficients = {"sqrt_alpha": alpha[:-1], "sqrt_one_minus_alpha": s[:-1], **unipc_coefficients(sigmas)}
    return torch.from_numpy(timesteps).double(), sigmas, coefficients


def unipc_coefficients(sigmas: torch.Tensor) -> Coefficients:
    """Per-step constants of UniP (step i: level i -> i + 1) and of UniC (at step i, correcting
    level i from level i - 1), for predict-x0 with ``hh = -h`` and ``B(h) = expm1(hh)``."""
    alpha = 1 / (sigmas**2 + 1).sqrt()
    lam = -sigmas.log()  # lambda = log(alpha / s); +inf at sigma 0
    h = lam[1:] - lam[:-1]  # [N]
    expm1 = torch.expm1(-h)  # h phi_1 = B(h) for bh2; -1 on the step to sigma 0
    p_x0 = -alpha[1:] * expm1  # coefficient of the current x0 in the first-order update
    r = torch.ones_like(h)  # r_i = (lambda_{i-1} - lambda_i) / h_i = -h_{i-1} / h_i
    r[1:] = -h[:-1] / h[1:]
    p_d1 = torch.where(torch.isfinite(h), p_x0 * 0.5 / r, torch.zeros_like(h))  # rho_p = 1/2 (order 2)
    c1_t, c2_d1, c2_t = torch.zeros_like(h), torch.zeros_like(h), torch.zeros_like(h)
    for i in range(1, len(h)):
        hh, b = -h[i - 1], expm1[i - 1]
        c1_t[i] = p_x0[i - 1] * 0.5  # rho_c = 1/2 (order 1)
        if i >= 2:
            rk = -h[i - 2] / h[i - 1]
            phi1 = b / hh - 1  # h phi_2 / h, then h phi_3 / h^2 (diffusers' h_phi_k recursion)
            b1, b2 = phi1 / b, (phi1 / hh - 0.5) * 2 / b
            rho0 = (b1 - b2) / (1 - rk)  # solves [[1, 1], [rk, 1]] rho = [b1, b2]
            c2_d1[i], c2_t[i] = p_x0[i - 1] * rho0 / rk, p_x0[i - 1] * (b1 - rho0)
    ratio = torch.where(sigmas[1:] > 0, (sigmas[1:] * alpha[1:]) / (sigmas[:-1] * alpha[:-1]), 0.0)
    return {"p_ratio": ratio, "p_x0": p_x0, "p_d1": p_d1, "c1_t": c1_t, "c2_d1": c2_d1, "c2_t": c2_t}


def unipc_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) as diffusers' multistep scheduler. Step i evaluates the model at
    ``x_i``; UniC re-derives ``x_i`` from ``x_{i-1}`` with that new x0 (no extra model call);
    UniP then steps to ``x_{i+1}``. Orders: 1 on a run's first step and on the last step
    (lower_order_final), 2 between; the corrector takes the order of the predictor it corrects."""
    c = run.c
    x0_prev = x0_prev2 = x_prev = None
    for i in range(run.total):
        x0 = run.denoised(x, i)
        if x0_prev is not None:  # UniC: correct x_i
            x = c["p_ratio"][i - 1] * x_prev + c["p_x0"][i - 1] * x0_prev
            if x0_prev2 is not None:
                x = x + c["c2_d1"][i] * (x0_prev2 - x0_prev) + c["c2_t"][i] * (x0 - x0_prev)
            else:
                x = x + c["c1_t"][i] * (x0 - x0_prev)
        x_prev = x
        x = c["p_ratio"][i] * x + c["p_x0"][i] * x0  # UniP, first order
        if x0_prev is not None and i < run.total - 1:
            x = x + c["p_d1"][i] * (x0_prev - x0)  # second order
        x0_prev2, x0_prev = x0_prev, x0
        x = run.end_step(x, i)
    return x

"""Samplers: loops over a denoiser ``denoise(x, t) -> model output`` (eps or v).

The sampler never sees ControlNet or guidance; those live inside the denoiser it is given
(docs/architecture.md, "sampling/").

**The denoiser contract.** ``denoise(x, t)`` takes latents ``x`` [B, C, H, W] in the
*variance-preserving* (VP) space, ``x = sqrt(a) x0 + sqrt(1 - a) eps`` with ``a`` the
alpha-bar of ``t``, and float32 timesteps ``t`` [B] on the model's discrete scale 0..999
(fractional for the sigma-space samplers), and returns the raw model output: eps or v, as
``ScheduleConfig.prediction`` says. Samplers turn it into ``x0``/``eps`` themselves.

**Spaces.** Everything a caller sees is in VP space, the space DDIM works in: the latents
``sample`` starts from and returns, what ``after_step`` receives, what ``Plan.noise`` makes.
The k-diffusion samplers (Euler, Euler ancestral, DPM++ 2M) integrate in sigma space,
``x_sigma = x0 + sigma eps = x_vp * sqrt(sigma^2 + 1)``; the one conversion between the two
lives in ``_Run.to_vp`` / ``_Run.from_vp`` (the model input scaling ``c_in = 1/sqrt(sigma^2+1)``
of k-diffusion is ``to_vp``). A noise level is named by its sigma throughout:
``sigma = sqrt((1 - a) / a)``, i.e. ``a = 1 / (1 + sigma^2)``.

**Usage.**

    plan = make_plan("dpmpp_2m_karras", model_config.schedule, steps=20)
    latents = sample(denoise, torch.randn(shape, generator=g), plan, generator=g)  # txt2img

    plan = make_plan("ddim", schedule, 20).from_strength(0.6)                      # img2img:
    latents = sample(denoise, noise, plan, init=init_latents)  # the last 12 of the 20 steps

Inpainting (diffusers' StableDiffusionInpaintPipeline for 4-channel UNets): after each step put
the init latents, noised to the level the step reached, back outside the mask::

    def keep(x, i):  # x: VP latents after step i, at plan.noise_level(i + 1)
        return mask * x + (1 - mask) * plan.noise(init_latents, noise, i + 1)

    latents = sample(denoise, noise, plan, init=init_latents, after_step=keep)

The level after the last step is 0 (``plan.noise(x0, noise, plan.total_steps)`` is ``x0``),
except for DDIM, whose last step lands on ``alphas_cumprod[0]`` (sigma 0.029): the original
decodes those latents as the result, and so does this module; ``plan.sigmas`` says so.

References: DDIM, Song et al. 2021 (arXiv:2010.02502), eq. 12; DPM-Solver++, Lu et al. 2022
(arXiv:2211.01095), alg. 2; Karras et al. 2022 (arXiv:2206.00364), eq. 5 (sigma schedule) and
alg. 2 (Euler steps in sigma space); UniPC, Zhao et al. 2023 (arXiv:2302.04867), alg. 2 with
``B(h) = e^h - 1`` ("bh2"); v-prediction, Salimans & Ho 2022 (arXiv:2202.00512).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..config import PredictionType, ScheduleConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int], None]  # (completed steps, total steps)
AfterStep = Callable[[torch.Tensor, int], torch.Tensor]  # (VP latents after step i, i) -> latents
Space = Literal["vp", "sigma"]
Coefficients = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Noise levels of the training schedule (float64, CPU)


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


# ----------------------------------------------------------------------------------------------
# The plan: every constant of one generation, computed once


@dataclass(frozen=True, eq=False)
class Plan:
    """What a sampler needs for one generation, computed once (float64, CPU).

    ``timesteps[i]``: the model timestep evaluated at step ``i``, in evaluation order (DDIM and
    UniPC: integers; sigma samplers: fractional). ``sigmas[i]``: the noise level of the latents
    before step ``i``; ``sigmas[total_steps]``, the level of the result, is 0 (DDIM: 0.029, the
    level of ``alphas_cumprod[0]``, as the original). ``coefficients``: the sampler's per-step
    constants, each indexed by step (``[N]``) or by level (``[N + 1]``), so that truncating the
    steps (img2img) is a slice.
    """

    sampler: str
    prediction: PredictionType
    timesteps: torch.Tensor  # [N] float64
    sigmas: torch.Tensor  # [N + 1] float64, decreasing
    coefficients: Mapping[str, torch.Tensor] = dataclasses.field(repr=False)

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    def noise_level(self, step: int) -> float:
        """Sigma of the latents before ``step`` (0..total_steps; ``total_steps``: the result's)."""
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"step must be between 0 and {self.total_steps}, got {step}")
        return float(self.sigmas[step])

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Clean latents ``x0`` noised to the level before ``step``, in VP space:
        ``sqrt(a) x0 + sqrt(1 - a) noise`` = ``(x0 + sigma noise) / sqrt(sigma^2 + 1)``.

        ``step=0`` is img2img's starting point; ``step=i + 1`` is the level step ``i`` reached
        (inpainting); ``step=total_steps`` returns ``x0`` (DDIM: ``x0`` at ``alphas_cumprod[0]``).
        """
        sigma = self.noise_level(step)
        scale = 1 / math.sqrt(sigma**2 + 1)
        return x0 * scale + noise * (sigma * scale)

    def start(self, noise: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        """The VP latents ``sample`` starts from: ``init`` noised to the first level (img2img), or
        for a full run the unit Gaussian ``noise`` at the sampler's starting level: DDIM and UniPC
        take it as is (the original and diffusers), the sigma samplers as ``sigma_max * noise`` in
        sigma space (k-diffusion)."""
        if init is not None:
            return self.noise(init, noise, 0)
        if SAMPLERS[self.sampler].space == "vp":
            return noise
        return self.noise(torch.zeros_like(noise), noise, 0)  # sigma_max * noise, in VP space

    def from_strength(self, strength: float) -> Plan:
        """The img2img plan: the last ``int(total_steps * strength)`` steps (diffusers, A1111).

        Pass the init latents to ``sample(..., init=...)``; they are noised to the first kept
        step's level. (The original's img2img script noises one DDIM step higher than it starts
        denoising from; this follows diffusers, which does not.)
        """
        if not 0 < strength <= 1:
            raise ValueError(f"denoising strength must be in (0, 1], got {strength}")
        keep = min(int(self.total_steps * strength), self.total_steps)
        if keep < 1:
            raise ValueError(f"strength {strength} of {self.total_steps} steps leaves no step to run")
        first = self.total_steps - keep
        return dataclasses.replace(
            self,
            timesteps=self.timesteps[first:],
            sigmas=self.sigmas[first:],
            coefficients={name: value[first:] for name, value in self.coefficients.items()},
        )


def make_plan(name: str, schedule: ScheduleConfig, steps: int, *, eta: float = 0.0) -> Plan:
    """The plan of sampler ``name`` for ``steps`` steps of ``schedule``.

    ``eta`` is DDIM's (0: deterministic, 1: DDPM-like noise); other samplers take none (Euler
    ancestral always adds the full ancestral noise, eta 1).
    """
    spec = get_sampler(name)
    _check_steps(steps, schedule.num_timesteps)
    # Above 1 the DDIM update's "direction" sqrt(1 - alpha_prev - sigma^2) is the root of a negative
    # number (Song et al. 2021, eq. 12): NaN latents, black images. NaN fails both comparisons.
    if not 0 <= eta <= 1 or (eta != 0 and name != "ddim"):
        raise ValueError(f"eta must be between 0 and 1 and applies to 'ddim' only, got eta={eta} for {name!r}")
    if spec.vp_constants is not None:
        timesteps, sigmas, coefficients = spec.vp_constants(schedule, steps, eta)
    else:
        timesteps, sigmas, coefficients = _sigma_space_constants(spec, schedule, spec.sigma_schedule(schedule, steps))
    return Plan(name, schedule.prediction, timesteps, sigmas, coefficients)


def plan_from_sigmas(name: str, schedule: ScheduleConfig, sigmas: Sequence[float] | torch.Tensor) -> Plan:
    """A plan for a sigma-space sampler on custom noise levels: decreasing, positive, then a final 0."""
    spec = get_sampler(name)
    if spec.space != "sigma":
        raise ValueError(f"sampler {name!r} has its own timesteps; custom sigmas apply to {_sigma_names()}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    body = sigmas[:-1]
    if len(sigmas) < 2 or sigmas[-1] != 0 or (body <= 0).any() or (body[1:] >= body[:-1]).any():
        raise ValueError("sigmas must be decreasing and positive, followed by a final 0")
    return Plan(name, schedule.prediction, *_sigma_space_constants(spec, schedule, sigmas))


def _sigma_space_constants(
    spec: SamplerSpec, schedule: ScheduleConfig, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Coefficients]:
    """Timesteps and the model-input constants common to the sigma samplers, plus the sampler's own."""
    vp_scale = 1 / (sigmas**2 + 1).sqrt()  # x_vp = x_sigma * vp_scale: k-diffusion's c_in
    coefficients = {
        "vp_scale": vp_scale,
        "sqrt_alpha": vp_scale[:-1],
        "sqrt_one_minus_alpha": (sigmas * vp_scale)[:-1],
        **spec.sigma_constants(sigmas),
    }
    return sigma_to_t(sigmas[:-1], training_sigmas(schedule)), sigmas, coefficients


# ----------------------------------------------------------------------------------------------
# Running a plan


def sample(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    *,
    init: torch.Tensor | None = None,
    generator: Generators = None,
    callback: StepCallback | None = None,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """Run ``plan`` and return the clean latents (VP space; at sigma 0 all spaces agree).

    ``x``: unit Gaussian noise [B, C, H, W]; without ``init`` it is the starting point (scaled
    to the first level, see ``Plan.start``), with ``init`` it is the noise added to the clean
    latents ``init`` (img2img; use a plan from ``Plan.from_strength``).
    ``generator``: the source of ancestral / eta noise; one generator, or one per batch item.
    ``callback(completed, total)``: after each step, ``completed = step_index + 1`` (which is
    also the index of the step to be evaluated next).
    ``after_step(x, step_index) -> x``: after each step, before ``callback``, on the VP latents
    at ``plan.noise_level(step_index + 1)``; what it returns continues the run (inpainting).
    Returns the VP latents at ``plan.noise_level(total_steps)``: 0 but for DDIM (0.029).
    With UniPC the next step's corrector recomputes the state from the previous sample, so an
    edit there acts through the model outputs (as in diffusers); the final step's edit is exact.
    """
    spec = SAMPLERS[plan.sampler]
    run = _Run(denoise, plan, x, generator, callback, after_step, spec.space)
    with torch.no_grad():
        state = run.from_vp(plan.start(x, init), 0)
        state = spec.loop(run, state)
        return run.to_vp(state, plan.total_steps)


class _Run:
    """One run of a plan: its constants on the latents' device, the model call and the hooks."""

    def __init__(
        self,
        denoise: Denoiser,
        plan: Plan,
        x: torch.Tensor,
        generator: Generators,
        callback: StepCallback | None,
        after_step: AfterStep | None,
        space: Space,
    ) -> None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.c = {name: value.to(x.device, dtype) for name, value in plan.coefficients.items()}
        timesteps = plan.timesteps.to(torch.float32)[:, None].expand(-1, x.shape[0])
        self.timesteps = timesteps.contiguous().to(x.device)  # [N, B]: row i is step i's t
        self.denoise, self.plan, self.space = denoise, plan, space
        self.generator, self.callback, self.after_step = generator, callback, after_step
        self.total = plan.total_steps

    def to_vp(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Sigma-space latents at ``plan.sigmas[level]`` -> VP space (identity for VP samplers)."""
        return x if self.space == "vp" else x * self.c["vp_scale"][level]

    def from_vp(self, x: torch.Tensor, level: int) -> torch.Tensor:
        return x if self.space == "vp" else x / self.c["vp_scale"][level]

    def predict(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` from the model at step ``i``, for the sampler's own latents ``x``."""
        x_vp = self.to_vp(x, i)
        output = self.denoise(x_vp, self.timesteps[i])
        sqrt_alpha, sqrt_one_minus_alpha = self.c["sqrt_alpha"][i], self.c["sqrt_one_minus_alpha"][i]
        if self.plan.prediction == "v":
            # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, sec. 4); k-diffusion's CompVisVDenoiser.
            return sqrt_alpha * x_vp - sqrt_one_minus_alpha * output, sqrt_alpha * output + sqrt_one_minus_alpha * x_vp
        return (x_vp - sqrt_one_minus_alpha * output) / sqrt_alpha, output

    def denoised(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model's clean-latent estimate at step ``i``: k-diffusion's ``model(x, sigma)``."""
        return self.predict(x, i)[0]

    def randn(self, x: torch.Tensor) -> torch.Tensor:
        """Unit noise like ``x`` from the run's generator(s), drawn on the generator's device."""
        if self.generator is None or isinstance(self.generator, torch.Generator):
            device = x.device if self.generator is None else self.generator.device
            return torch.randn(x.shape, generator=self.generator, device=device, dtype=x.dtype).to(x.device)
        if len(self.generator) != x.shape[0]:
            raise ValueError(f"got {len(self.generator)} generators for a batch of {x.shape[0]}")
        draws = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in self.generator]
        return torch.stack(draws).to(x.device)

    def nonzero(self, name: str, i: int) -> bool:
        """Whether coefficient ``name`` of step ``i`` is non-zero, read on the CPU copy (no device sync)."""
        return bool(self.plan.coefficients[name][i] != 0)

    def to_zero(self, i: int) -> bool:
        """Whether step ``i`` ends at sigma 0."""
        return bool(self.plan.sigmas[i + 1] == 0)

    def end_step(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The caller's hooks after step ``i``: ``after_step`` sees and returns VP latents."""
        if self.after_step is not None:
            x = self.from_vp(self.after_step(self.to_vp(x, i + 1), i), i + 1)
        if self.callback is not None:
            self.callback(i + 1, self.total)
        return x


# ----------------------------------------------------------------------------------------------
# DDIM (VP space), exactly as the original's DDIMSampler


def _ddim_prepare(schedule: ScheduleConfig, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, Coefficients]:
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


def _ddim_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
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


def _euler_prepare(sigmas: torch.Tensor) -> Coefficients:
    return {"sigma": sigmas[:-1], "dt": sigmas[1:] - sigmas[:-1]}


def _euler_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """Euler steps on the probability-flow ODE ``dx/dsigma = (x - x0) / sigma`` (Karras et al.,
    alg. 2 without churn; k-diffusion's ``sample_euler``)."""
    c = run.c
    for i in range(run.total):
        derivative = (x - run.denoised(x, i)) / c["sigma"][i]
        x = x + derivative * c["dt"][i]
        x = run.end_step(x, i)
    return x


def _euler_ancestral_prepare(sigmas: torch.Tensor) -> Coefficients:
    """Split each step into a deterministic step down to ``sigma_down`` and fresh noise of std
    ``sigma_up``, ``sigma_down^2 + sigma_up^2 = sigma_next^2`` (k-diffusion's ``get_ancestral_step``, eta 1)."""
    now, nxt = sigmas[:-1], sigmas[1:]
    sigma_up = torch.minimum(nxt, (nxt**2 * (now**2 - nxt**2) / now**2).sqrt())
    sigma_down = (nxt**2 - sigma_up**2).sqrt()
    return {"sigma": now, "dt": sigma_down - now, "sigma_up": sigma_up}


def _euler_ancestral_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, eta 1)."""
    c = run.c
    for i in range(run.total):
        derivative = (x - run.denoised(x, i)) / c["sigma"][i]
        x = x + derivative * c["dt"][i]
        if run.nonzero("sigma_up", i):
            x = x + run.randn(x) * c["sigma_up"][i]
        x = run.end_step(x, i)
    return x


def _dpmpp_2m_prepare(sigmas: torch.Tensor) -> Coefficients:
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


def _dpmpp_2m_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
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


def _unipc_prepare(schedule: ScheduleConfig, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, Coefficients]:
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
    coefficients = {"sqrt_alpha": alpha[:-1], "sqrt_one_minus_alpha": s[:-1], **_unipc_coefficients(sigmas)}
    return torch.from_numpy(timesteps).double(), sigmas, coefficients


def _unipc_coefficients(sigmas: torch.Tensor) -> Coefficients:
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


def _unipc_loop(run: _Run, x: torch.Tensor) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------
# The registry


VPConstants = Callable[[ScheduleConfig, int, float], tuple[torch.Tensor, torch.Tensor, Coefficients]]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its loop and how its constants are made.

    VP samplers (DDIM, UniPC) have their own timesteps: ``vp_constants(schedule, steps, eta)``
    gives ``(timesteps, sigmas, coefficients)``. Sigma samplers take any noise levels:
    ``sigma_schedule(schedule, steps)`` gives the default ones and ``sigma_constants(sigmas)``
    the per-step constants for them.
    """

    name: str
    loop: Callable[[_Run, torch.Tensor], torch.Tensor]
    summary: str
    vp_constants: VPConstants | None = None
    sigma_schedule: Callable[[ScheduleConfig, int], torch.Tensor] | None = None
    sigma_constants: Callable[[torch.Tensor], Coefficients] | None = None

    @property
    def space(self) -> Space:
        return "vp" if self.vp_constants is not None else "sigma"


def _karras(schedule: ScheduleConfig, steps: int) -> torch.Tensor:
    train = training_sigmas(schedule)
    return karras_sigmas(steps, float(train[0]), float(train[-1]))


def _default(schedule: ScheduleConfig, steps: int) -> torch.Tensor:
    return default_sigmas(steps, training_sigmas(schedule))


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddim", _ddim_loop, "DDIM as the original (eta 0: deterministic)", vp_constants=_ddim_prepare),
        SamplerSpec("euler", _euler_loop, "Euler", sigma_schedule=_default, sigma_constants=_euler_prepare),
        SamplerSpec(
            "euler_a",
            _euler_ancestral_loop,
            "Euler ancestral",
            sigma_schedule=_default,
            sigma_constants=_euler_ancestral_prepare,
        ),
        SamplerSpec("dpmpp_2m", _dpmpp_2m_loop, "DPM++ 2M", sigma_schedule=_default, sigma_constants=_dpmpp_2m_prepare),
        SamplerSpec(
            "dpmpp_2m_karras",
            _dpmpp_2m_loop,
            "DPM++ 2M Karras",
            sigma_schedule=_karras,
            sigma_constants=_dpmpp_2m_prepare,
        ),
        SamplerSpec("unipc", _unipc_loop, "UniPC (bh2, order 2)", vp_constants=_unipc_prepare),
    )
}


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called ``name``, or a ``ValueError`` listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def _sigma_names() -> str:
    return ", ".join(name for name, spec in SAMPLERS.items() if spec.space == "sigma")

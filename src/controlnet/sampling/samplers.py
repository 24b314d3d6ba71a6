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
except for DDIM and TCD, whose last step lands on ``alphas_cumprod[0]`` (sigma 0.029): the
original (and diffusers' TCD) decodes those latents as the result, and so does this module;
``plan.sigmas`` says so.

The samplers' own arithmetic is in solvers.py (the few-step LCM and TCD in few_step.py), the noise
levels in schedules.py, the eps/v algebra in parametrisation.py. v-prediction: Salimans & Ho 2022 (arXiv:2202.00512).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import PredictionType, ScheduleConfig
from .few_step import TCD_GAMMA, lcm_loop, lcm_prepare, tcd_loop, tcd_prepare
from .parametrisation import noised, x0_and_eps
from .schedules import (
    _check_steps,
    default_sigmas,
    karras_sigmas,
    sigma_to_t,
    training_sigmas,
)
from .solvers import (
    ddim_loop,
    ddim_prepare,
    dpmpp_2m_loop,
    dpmpp_2m_prepare,
    euler_ancestral_loop,
    euler_ancestral_prepare,
    euler_loop,
    euler_prepare,
    unipc_loop,
    unipc_prepare,
)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int], None]  # (completed steps, total steps)
AfterStep = Callable[[torch.Tensor, int], torch.Tensor]  # (VP latents after step i, i) -> latents
OnDenoised = Callable[[torch.Tensor, int], None]  # (the model's clean-latent estimate at step i, i)
Space = Literal["vp", "sigma"]
Coefficients = dict[str, torch.Tensor]  # a sampler's per-step constants (solvers.py)


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
        sqrt_alpha = 1 / math.sqrt(sigma**2 + 1)  # a = 1 / (1 + sigma^2)
        return noised(x0, noise, sqrt_alpha, sigma * sqrt_alpha)

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


def make_plan(name: str, schedule: ScheduleConfig, steps: int, *, eta: float | None = None) -> Plan:
    """The plan of sampler ``name`` for ``steps`` steps of ``schedule``.

    ``eta``: the sampler's stochasticity, for the samplers that take one (``SamplerSpec.eta``):
    DDIM's eta (0: deterministic, 1: DDPM-like noise) and TCD's gamma (0: deterministic, 1: fresh
    noise from x0 at every step). None: the sampler's own default (DDIM 0, TCD 0.3). The other
    samplers take none (Euler ancestral always adds the full ancestral noise, eta 1).
    """
    spec = get_sampler(name)
    _check_steps(steps, schedule.num_timesteps)
    # Above 1 the DDIM update's "direction" sqrt(1 - alpha_prev - sigma^2) is the root of a negative
    # number (Song et al. 2021, eq. 12): NaN latents, black images. NaN fails both comparisons.
    if eta is not None and (not 0 <= eta <= 1 or (eta != 0 and spec.eta is None)):
        raise ValueError(f"eta must be between 0 and 1 and applies to {_eta_names()} only, got eta={eta} for {name!r}")
    eta = (spec.eta or 0.0) if eta is None else eta
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
    on_denoised: OnDenoised | None = None,
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
    Returns the VP latents at ``plan.noise_level(total_steps)``: 0 but for DDIM and TCD (0.029).
    With UniPC the next step's corrector recomputes the state from the previous sample, so an
    edit there acts through the model outputs (as in diffusers); the final step's edit is exact.
    ``on_denoised(x0, step_index)``: at each step, the model's clean-latent estimate ``x0`` (the
    latents the pipeline decodes; k-diffusion's callback's ``denoised``), once per model call:
    what a live preview shows. It must not change ``x0``.
    """
    spec = SAMPLERS[plan.sampler]
    run = _Run(denoise, plan, x, generator, callback, after_step, spec.space, on_denoised)
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
        on_denoised: OnDenoised | None = None,
    ) -> None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.c = {name: value.to(x.device, dtype) for name, value in plan.coefficients.items()}
        timesteps = plan.timesteps.to(torch.float32)[:, None].expand(-1, x.shape[0])
        self.timesteps = timesteps.contiguous().to(x.device)  # [N, B]: row i is step i's t
        self.denoise, self.plan, self.space = denoise, plan, space
        self.generator, self.callback, self.after_step = generator, callback, after_step
        self.on_denoised = on_denoised
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
        x0, eps = x0_and_eps(
            self.plan.prediction, x_vp, output, self.c["sqrt_alpha"][i], self.c["sqrt_one_minus_alpha"][i]
        )
        if self.on_denoised is not None:
            self.on_denoised(x0, i)
        return x0, eps

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
# The registry


VPConstants = Callable[[ScheduleConfig, int, float], tuple[torch.Tensor, torch.Tensor, Coefficients]]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its loop and how its constants are made.

    VP samplers (DDIM, UniPC, LCM, TCD) have their own timesteps: ``vp_constants(schedule, steps,
    eta)`` gives ``(timesteps, sigmas, coefficients)``. Sigma samplers take any noise levels:
    ``sigma_schedule(schedule, steps)`` gives the default ones and ``sigma_constants(sigmas)``
    the per-step constants for them. ``eta``: the default of the sampler's stochasticity setting
    (``make_plan``'s ``eta``), None for a sampler that takes none.
    """

    name: str
    loop: Callable[[_Run, torch.Tensor], torch.Tensor]
    summary: str
    vp_constants: VPConstants | None = None
    sigma_schedule: Callable[[ScheduleConfig, int], torch.Tensor] | None = None
    sigma_constants: Callable[[torch.Tensor], Coefficients] | None = None
    eta: float | None = None

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
        SamplerSpec(
            "ddim", ddim_loop, "DDIM as the original (eta 0: deterministic)", vp_constants=ddim_prepare, eta=0.0
        ),
        SamplerSpec("euler", euler_loop, "Euler", sigma_schedule=_default, sigma_constants=euler_prepare),
        SamplerSpec(
            "euler_a",
            euler_ancestral_loop,
            "Euler ancestral",
            sigma_schedule=_default,
            sigma_constants=euler_ancestral_prepare,
        ),
        SamplerSpec("dpmpp_2m", dpmpp_2m_loop, "DPM++ 2M", sigma_schedule=_default, sigma_constants=dpmpp_2m_prepare),
        SamplerSpec(
            "dpmpp_2m_karras",
            dpmpp_2m_loop,
            "DPM++ 2M Karras",
            sigma_schedule=_karras,
            sigma_constants=dpmpp_2m_prepare,
        ),
        SamplerSpec("unipc", unipc_loop, "UniPC (bh2, order 2)", vp_constants=unipc_prepare),
        SamplerSpec(
            "lcm", lcm_loop, "LCM, for LCM models and LCM-LoRA (2-8 steps, guidance 1-2)", vp_constants=lcm_prepare
        ),
        SamplerSpec(
            "tcd",
            tcd_loop,
            "TCD, for TCD-LoRA and LCM models (2-8 steps; eta: its gamma, 0.3 by default)",
            vp_constants=tcd_prepare,
            eta=TCD_GAMMA,
        ),
    )
}


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called ``name``, or a ``ValueError`` listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def _eta_names() -> str:
    return " and ".join(repr(name) for name, spec in SAMPLERS.items() if spec.eta is not None)


def _sigma_names() -> str:
    return ", ".join(name for name, spec in SAMPLERS.items() if spec.space == "sigma")

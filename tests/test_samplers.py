"""Samplers: DDIM exactly as the original, parity with diffusers' schedulers, convergence on data
whose exact denoiser is known, seeds, img2img plans, the inpainting hook and bad input.

Parity tests give diffusers our float32 ``alphas_cumprod``: diffusers builds the schedule in
float32 (alpha-bar differs by up to 1e-6 relative, 1 - alpha-bar by 2e-5), which would hide the
algorithms' agreement; ``test_diffusers_schedule_is_ours_to_float32`` bounds that difference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from controlnet.config import ScheduleConfig
from controlnet.sampling.samplers import (
    SAMPLERS,
    Plan,
    get_sampler,
    make_plan,
    plan_from_sigmas,
    sample,
)
from controlnet.sampling.schedules import training_alphas_cumprod

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
DETERMINISTIC = ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]


# ----------------------------------------------------------------------------------------------
# Toy denoisers


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic, nonlinear in x and dependent on t: any mix-up of steps or levels shows."""
    tt = t.to(x.dtype)[:, None, None, None] / 1000
    return 0.8 * x * (1 - 0.5 * tt) + 0.3 * torch.sin(3 * x + tt)


def toy_without_t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """For diffusers schedulers that round (or respace) the timesteps they give the model."""
    return 0.8 * x + 0.3 * torch.sin(3 * x)


def numpy_alphas_cumprod() -> np.ndarray:
    """The original's "linear" schedule, computed independently, kept as a float32 buffer."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas).astype(np.float32).astype(np.float64)


def alpha_bar_at(t: torch.Tensor) -> torch.Tensor:
    """Alpha-bar at continuous timesteps: log-sigma interpolated between training steps (the
    inverse of the samplers' sigma -> t map), so the toy denoisers below are exact at any t."""
    alphas = torch.from_numpy(numpy_alphas_cumprod())
    log_sigmas = ((1 - alphas) / alphas).sqrt().log()
    t = t.double().cpu().clamp(0, 999)
    low, weight = t.floor().long().clamp(max=998), t - t.floor().clamp(max=998)
    sigma = ((1 - weight) * log_sigmas[low] + weight * log_sigmas[low + 1]).exp()
    return 1 / (1 + sigma**2)


def gaussian_denoiser(mu: float, s: float, prediction: str):
    """The exact denoiser for data N(mu, s^2) per pixel: x_t = sqrt(a) x0 + sqrt(1 - a) eps is
    Gaussian, so E[eps | x_t] = (x_t - sqrt(a) mu) sqrt(1 - a) / (a s^2 + 1 - a)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        a = alpha_bar_at(t).to(x)[:, None, None, None]
        eps = (x - a.sqrt() * mu) * (1 - a).sqrt() / (a * s**2 + 1 - a)
        if prediction == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v

    return denoise


def point_denoiser(point: torch.Tensor, prediction: str):
    """The exact denoiser when every sample is ``point``: eps = (x_t - sqrt(a) point) / sqrt(1 - a)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_bar_at(t).to(x)[:, None, None, None]
        eps = (x - a.sqrt() * point) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * point

    return denoise


def set_alphas_cumprod(scheduler, schedule: ScheduleConfig) -> None:
    alphas = training_alphas_cumprod(schedule).float()
    scheduler.alphas_cumprod = alphas
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = alphas[0]


def run_diffusers(scheduler, x: torch.Tensor, denoise, timesteps=None, **step_args) -> torch.Tensor:
    """The diffusers pipeline loop: scale the input, call the model, step."""
    for t in scheduler.timesteps if timesteps is None else timesteps:
        output = denoise(scheduler.scale_model_input(x, t), torch.full((x.shape[0],), float(t)))
        x = scheduler.step(output, t, x, **step_args).prev_sample
    return x


def noise(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# (a) (b) (c) DDIM as the original


def test_ddim_timesteps_and_constants_equal_the_original_formulas():
    alphas_cumprod = numpy_alphas_cumprod()
    steps = list(range(951, 0, -50))  # evaluation order of 1, 51, ..., 951
    for eta in (0.0, 1.0):
        plan = make_plan("ddim", ScheduleConfig(), 20, eta=eta)
        assert plan.timesteps.tolist() == steps and plan.total_steps == 20
        alpha = alphas_cumprod[steps]
        alpha_prev = np.append(alphas_cumprod[steps[1:]], alphas_cumprod[0])
        sigma = eta * np.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
        np.testing.assert_allclose(plan.coefficients["alpha"].numpy(), alpha, rtol=1e-7)
        np.testing.assert_allclose(plan.coefficients["alpha_prev"].numpy(), alpha_prev, rtol=1e-7)
        np.testing.assert_allclose(plan.coefficients["eta_sigma"].numpy(), sigma, rtol=1e-6, atol=0)
    assert make_plan("ddim", ScheduleConfig(), 30).total_steps == 31  # the original's range(0, T, T // S)
    assert make_plan("ddim", ScheduleConfig(), 27).timesteps[0] == 963  # not 1000: out of range, dropped


def test_one_ddim_step_equals_the_formula_by_hand():
    schedule = ScheduleConfig()
    plan = make_plan("ddim", schedule, 20, eta=1.0)
    x = noise(1, 4, 8, 8)
    after_first = []
    sample(toy, x, plan, generator=torch.Generator().manual_seed(3), after_step=lambda y, i: after_first.append(y) or y)

    alphas = numpy_alphas_cumprod()
    a, a_prev = alphas[951], alphas[901]
    sigma = math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    eps = toy(x, torch.tensor([951.0]))
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(after_first[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_scheduler(prediction, eta):
    schedule = ScheduleConfig(prediction=prediction)
    scheduler = diffusers.DDIMScheduler(
        **DIFFUSERS_SCHEDULE,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )
    set_alphas_cumprod(scheduler, schedule)
    scheduler.set_timesteps(20)
    plan = make_plan("ddim", schedule, 20, eta=eta)
    assert scheduler.timesteps.tolist() == plan.timesteps.tolist()

    x = noise(2, 4, 8, 8)
    # diffusers draws its eta noise with torch.randn on the same generator, step by step.
    reference = run_diffusers(scheduler, x, toy, eta=eta, generator=torch.Generator().manual_seed(5))
    ours = sample(toy, x, plan, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=2e-6)


def test_diffusers_schedule_is_ours_to_float32():
    scheduler = diffusers.DDIMScheduler(**DIFFUSERS_SCHEDULE)
    ours = training_alphas_cumprod(ScheduleConfig())
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours, rtol=1.5e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# (d) Convergence on Gaussian data, whose exact denoiser is known

# |std / s - 1| measured at 50 steps with these seeds: ddim .030, euler .032, euler_a .055,
# ddim eta=1 .054, dpmpp_2m .010, dpmpp_2m_karras .003, unipc .012 (first-order and ancestral
# samplers lose variance on coarse steps; the Karras levels and UniPC's corrector do best). The
# bounds add the sampling error of a standard deviation over 65536 samples (0.003, thrice).
STD_TOLERANCE = {
    "ddim": 0.05,
    "euler": 0.05,
    "euler_a": 0.08,
    "dpmpp_2m": 0.03,
    "dpmpp_2m_karras": 0.015,
    "unipc": 0.025,
}


# LCM and TCD sample a consistency model, which maps x_t to its trajectory's end; given the
# posterior mean E[x0 | x_t] (what this denoiser is) their re-noising loses variance by design
# (tests/test_few_step_samplers.py checks LCM with the exact consistency function instead).
POSTERIOR_MEAN_SAMPLERS = sorted(set(SAMPLERS) - {"lcm", "tcd"})


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", POSTERIOR_MEAN_SAMPLERS)
def test_every_sampler_draws_the_data_distribution(name, prediction):
    mu, s = 0.5, 1.0
    schedule = ScheduleConfig(prediction=prediction)
    plan = make_plan(name, schedule, 50)
    data = mu + s * noise(1, 1, 256, 256, seed=1)  # 65536 samples: standard errors 0.004
    # Start from the exact noisy distribution (the data noised to the first level), so that what
    # remains is the sampler's own error.
    out = sample(gaussian_denoiser(mu, s, prediction), noise(1, 1, 256, 256, seed=2), plan, init=data)
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() / s - 1) < STD_TOLERANCE[name]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_eta_draws_the_data_distribution(prediction):
    mu, s = 0.5, 1.0
    plan = make_plan("ddim", ScheduleConfig(prediction=prediction), 50, eta=1.0)
    data = mu + s * noise(1, 1, 256, 256, seed=1)
    generator = torch.Generator().manual_seed(3)
    out = sample(
        gaussian_denoiser(mu, s, prediction), noise(1, 1, 256, 256, seed=2), plan, init=data, generator=generator
    )
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() / s - 1) < 0.08


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_the_exact_flow_from_pure_noise(name):
    """From unit noise, the probability-flow ODE of Gaussian data is affine: x0 = mu + s z with
    z = (x_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T). Each sample must land near its own x0."""
    mu, s = 0.5, 1.0
    plan = make_plan(name, ScheduleConfig(), 50)
    x = noise(1, 1, 64, 64, dtype=torch.float64)
    out = sample(gaussian_denoiser(mu, s, "eps"), x, plan)
    a = 1 / (1 + plan.noise_level(0) ** 2)
    exact = mu + s * (plan.start(x) - math.sqrt(a) * mu) / math.sqrt(a * s**2 + 1 - a)
    bound = {"ddim": 0.15, "euler": 0.15, "dpmpp_2m": 0.08, "dpmpp_2m_karras": 0.01, "unipc": 0.05}[name]
    assert (out - exact).abs().max().item() < bound


# ----------------------------------------------------------------------------------------------
# (e) Parity with diffusers' DPM++ 2M Karras, Euler ancestral and UniPC


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_karras_equals_diffusers(prediction):
    """DPMSolverMultistepScheduler(use_karras_sigmas, dpmsolver++, order 2). Both take the last
    step (to sigma 0) at first order: k-diffusion because sigma_next is 0, diffusers because
    final_sigmas_type="zero" forces lower_order_final there; no other step differs. diffusers
    rounds the model timesteps to integers while the sigmas stay exact; we keep k-diffusion's
    continuous t, so the trajectories are compared on a denoiser that ignores t."""
    schedule = ScheduleConfig(prediction=prediction)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **DIFFUSERS_SCHEDULE,
        use_karras_sigmas=True,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )
    set_alphas_cumprod(scheduler, schedule)
    scheduler.set_timesteps(20)
    plan = make_plan("dpmpp_2m_karras", schedule, 20)
    torch.testing.assert_close(plan.sigmas, scheduler.sigmas.double(), rtol=1e-6, atol=0)
    assert (plan.timesteps - scheduler.timesteps.double()).abs().max() <= 0.5

    x = noise(2, 4, 8, 8)
    reference = run_diffusers(scheduler, plan.start(x), toy_without_t)  # diffusers works in VP space
    torch.testing.assert_close(sample(toy_without_t, x, plan), reference, rtol=2e-6, atol=4e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_ancestral_equals_diffusers_on_its_sigmas(prediction):
    """EulerAncestralDiscreteScheduler interpolates sigma linearly in t where k-diffusion (our
    ``euler_a``) interpolates log-sigma; given diffusers' sigmas the steps and noise draws agree."""
    schedule = ScheduleConfig(prediction=prediction)
    scheduler = diffusers.EulerAncestralDiscreteScheduler(
        **DIFFUSERS_SCHEDULE, prediction_type=DIFFUSERS_PREDICTION[prediction]
    )
    set_alphas_cumprod(scheduler, schedule)
    scheduler.set_timesteps(20)
    plan = plan_from_sigmas("euler_a", schedule, scheduler.sigmas)

    x = noise(2, 4, 8, 8)
    start = x * scheduler.init_noise_sigma  # sigma_max * noise in sigma space, as ours
    reference = run_diffusers(scheduler, start, toy_without_t, generator=torch.Generator().manual_seed(7))
    ours = sample(toy_without_t, x, plan, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [20, 7, 2, 1])
def test_unipc_equals_diffusers_defaults(prediction, steps):
    schedule = ScheduleConfig(prediction=prediction)
    scheduler = diffusers.UniPCMultistepScheduler(
        **DIFFUSERS_SCHEDULE, prediction_type=DIFFUSERS_PREDICTION[prediction]
    )
    set_alphas_cumprod(scheduler, schedule)
    scheduler.set_timesteps(steps)
    plan = make_plan("unipc", schedule, steps)
    assert plan.timesteps.tolist() == scheduler.timesteps.tolist()

    x = noise(2, 4, 8, 8)
    reference = run_diffusers(scheduler, x, toy)
    torch.testing.assert_close(sample(toy, x, plan), reference, rtol=2e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (f) Seeds


@pytest.mark.parametrize(("name", "eta"), [("euler_a", 0.0), ("ddim", 1.0)])
def test_a_seed_reproduces_and_each_batch_item_has_its_own_generator(name, eta):
    plan = make_plan(name, ScheduleConfig(), 8, eta=eta)
    x = noise(2, 4, 8, 8)

    def run(*seeds: int, batch: torch.Tensor = x) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(toy, batch, plan, generator=generators[0] if len(seeds) == 1 else generators)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    both = run(1, 2)  # one generator per image: an image does not depend on the batch around it
    assert torch.equal(both[1:], run(2, batch=x[1:]))
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        run(1, 2, 3)


# ----------------------------------------------------------------------------------------------
# (g) img2img plans, noising, the inpainting hook


def test_from_strength_keeps_the_last_steps():
    plan = make_plan("dpmpp_2m_karras", ScheduleConfig(), 20)
    img2img = plan.from_strength(0.6)
    assert img2img.total_steps == 12
    assert torch.equal(img2img.timesteps, plan.timesteps[8:]) and torch.equal(img2img.sigmas, plan.sigmas[8:])
    assert plan.from_strength(1.0).total_steps == 20
    assert plan.from_strength(0.05).total_steps == 1  # int(20 * 0.05) = 1: the last step only
    with pytest.raises(ValueError, match="leaves no step"):
        plan.from_strength(0.04)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        plan.from_strength(1.5)


def test_noise_brings_clean_latents_to_the_first_level():
    x0, n = noise(1, 4, 8, 8, seed=1), noise(1, 4, 8, 8, seed=2)
    ddim = make_plan("ddim", ScheduleConfig(), 20).from_strength(0.5)  # starts at t = 451
    a = numpy_alphas_cumprod()[451]
    torch.testing.assert_close(ddim.noise(x0, n), math.sqrt(a) * x0 + math.sqrt(1 - a) * n)
    assert torch.equal(ddim.start(n), n)  # a full DDIM run starts from the noise as is

    euler = make_plan("euler", ScheduleConfig(), 20).from_strength(0.5)
    sigma = euler.noise_level(0)
    torch.testing.assert_close(euler.noise(x0, n) * math.sqrt(sigma**2 + 1), x0 + sigma * n)  # sigma space
    full = make_plan("euler", ScheduleConfig(), 20)  # sigma_max * noise in sigma space
    torch.testing.assert_close(full.start(n) * math.sqrt(full.noise_level(0) ** 2 + 1), full.noise_level(0) * n)
    assert torch.equal(euler.noise(x0, n, euler.total_steps), x0)


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "unipc"])
def test_img2img_equals_diffusers_img2img(name):
    """diffusers' img2img: set_timesteps(N), keep timesteps[N - int(N s):], set_begin_index,
    add_noise at the first kept step; the multistep solvers restart at first order."""
    schedule = ScheduleConfig()
    if name == "unipc":
        scheduler = diffusers.UniPCMultistepScheduler(**DIFFUSERS_SCHEDULE)
        denoise = toy
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, use_karras_sigmas=True)
        denoise = toy_without_t
    set_alphas_cumprod(scheduler, schedule)
    scheduler.set_timesteps(20)
    begin = 20 - int(20 * 0.6)
    scheduler.set_begin_index(begin)
    timesteps = scheduler.timesteps[begin:]
    init, n = noise(2, 4, 8, 8, seed=1), noise(2, 4, 8, 8, seed=2)
    start = scheduler.add_noise(init, n, timesteps[:1])
    reference = run_diffusers(scheduler, start, denoise, timesteps=timesteps)

    plan = make_plan(name, schedule, 20).from_strength(0.6)
    torch.testing.assert_close(plan.start(n, init), start, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sample(denoise, n, plan, init=init), reference, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_after_step_sees_the_latents_at_the_level_the_step_reached(name):
    """Data that is a single point: every deterministic sampler is exact, so after step i the
    latents are the init noised to ``noise_level(i + 1)`` with the very same noise."""
    plan = make_plan(name, ScheduleConfig(prediction="v"), 10)
    point, n = noise(1, 4, 8, 8, seed=1, dtype=torch.float64), noise(1, 4, 8, 8, seed=2, dtype=torch.float64)
    seen, progress = [], []

    def after_step(x: torch.Tensor, i: int) -> torch.Tensor:
        seen.append((x - plan.noise(point, n, i + 1)).abs().max().item())
        return x

    out = sample(
        point_denoiser(point, "v"),
        n,
        plan,
        init=point,
        after_step=after_step,
        callback=lambda done, total: progress.append((done, total)),
    )
    assert max(seen) < 1e-5 and len(seen) == 10
    assert progress == [(i + 1, 10) for i in range(10)]
    torch.testing.assert_close(out, plan.noise(point, n, 10), rtol=0, atol=1e-5)
    assert plan.noise_level(10) == (pytest.approx(0.0292, abs=1e-4) if name == "ddim" else 0.0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inpainting_hook_keeps_the_init_outside_the_mask(name):
    plan = make_plan(name, ScheduleConfig(), 6)
    init, n = noise(1, 4, 8, 8, seed=1), noise(1, 4, 8, 8, seed=2)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # repaint the left half

    def keep(x: torch.Tensor, i: int) -> torch.Tensor:
        return mask * x + (1 - mask) * plan.noise(init, n, i + 1)

    out = sample(toy, n, plan, generator=torch.Generator().manual_seed(0), after_step=keep)
    assert torch.equal(out[..., 4:], plan.noise(init, n, plan.total_steps)[..., 4:])  # init itself but for DDIM
    assert not torch.allclose(out[..., :4], init[..., :4])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_denoiser_gets_the_plan_timesteps_in_order(name):
    plan = make_plan(name, ScheduleConfig(), 9)
    calls = []

    def record(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return toy(x, t)

    sample(record, noise(3, 4, 8, 8), plan, generator=torch.Generator().manual_seed(0))
    assert len(calls) == plan.total_steps
    assert all(t.dtype == torch.float32 and t.shape == (3,) for t in calls)
    assert torch.equal(torch.stack([t[0] for t in calls]), plan.timesteps.float())
    assert all(t0 > t1 for t0, t1 in zip(plan.timesteps, plan.timesteps[1:], strict=False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_latents_keep_their_dtype(dtype):
    for name in SAMPLERS:
        out = sample(toy, noise(1, 4, 8, 8, dtype=dtype), make_plan(name, ScheduleConfig(), 4))
        assert out.dtype == dtype and torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------------------------
# (h) Bad input


def test_unknown_sampler_and_bad_steps_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'; choose one of ddim, euler, euler_a"):
        make_plan("plms", ScheduleConfig(), 20)
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("DDIM")
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="steps must be between 1 and 1000, got 0"):
            make_plan(name, ScheduleConfig(), 0)
    with pytest.raises(ValueError, match="got 1001"):
        make_plan("ddim", ScheduleConfig(), 1001)
    with pytest.raises(ValueError, match="applies to 'ddim' and 'tcd' only"):
        make_plan("euler_a", ScheduleConfig(), 20, eta=0.5)
    with pytest.raises(ValueError, match="eta must be between 0 and 1"):
        make_plan("ddim", ScheduleConfig(), 20, eta=-1.0)
    with pytest.raises(ValueError, match="decreasing and positive"):
        plan_from_sigmas("euler", ScheduleConfig(), [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="own timesteps"):
        plan_from_sigmas("ddim", ScheduleConfig(), [2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="step must be between 0 and 20"):
        make_plan("ddim", ScheduleConfig(), 20).noise_level(21)


def test_every_registered_sampler_runs_a_single_step():
    for name in SAMPLERS:
        plan = make_plan(name, ScheduleConfig(), 1)
        assert isinstance(plan, Plan) and plan.total_steps == 1
        assert torch.isfinite(sample(toy, noise(1, 4, 8, 8), plan, generator=torch.Generator())).all()

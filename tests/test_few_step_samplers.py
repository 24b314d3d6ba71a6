"""The few-step samplers LCM and TCD (sampling/few_step.py) against diffusers' ``LCMScheduler`` and
``TCDScheduler``: the timesteps, every step's latents (boundary condition, gamma, the noise drawn
from the generator) on the same deterministic model outputs, img2img, and what they do on data
whose consistency function is known exactly.

Tolerance: diffusers computes its per-step scalars in float32 (from the float32 alpha-bar we give
it), we in float64 rounded to float32; trajectories agree to rtol 2e-6 / atol 2e-6 on latents of
magnitude ~1-4 (float32 rounding of a few operations per step).
"""

from __future__ import annotations

import math

import pytest
import torch

from controlnet.config import ScheduleConfig
from controlnet.sampling.few_step import distilled_timesteps
from controlnet.sampling.samplers import SAMPLERS, make_plan, sample
from controlnet.sampling.schedules import training_alphas_cumprod

diffusers = pytest.importorskip("diffusers")

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
RTOL, ATOL = 2e-6, 2e-6


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a model: nonlinear in x, dependent on t (integer here)."""
    tt = t.to(x.dtype)[:, None, None, None] / 1000
    return 0.8 * x * (1 - 0.5 * tt) + 0.3 * torch.sin(3 * x + tt)


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def scheduler(name: str, prediction: str = "eps"):
    """diffusers' scheduler with its defaults, holding our float32 alpha-bar (the same numbers:
    test_samplers.test_diffusers_schedule_is_ours_to_float32)."""
    cls = diffusers.LCMScheduler if name == "lcm" else diffusers.TCDScheduler
    made = cls(**SCHEDULE, prediction_type=PREDICTION[prediction])
    made.alphas_cumprod = training_alphas_cumprod(ScheduleConfig(prediction=prediction)).float()
    return made


def diffusers_trajectory(made, x: torch.Tensor, timesteps=None, **step_args) -> list[torch.Tensor]:
    """diffusers' pipeline loop (LatentConsistencyModelPipeline, and the SD pipelines with
    TCDScheduler): each step's prev_sample."""
    seen = []
    for t in made.timesteps if timesteps is None else timesteps:
        output = toy(made.scale_model_input(x, t), torch.full((x.shape[0],), float(t)))
        x = made.step(output, t, x, **step_args).prev_sample
        seen.append(x)
    return seen


def our_trajectory(plan, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    seen = []

    def record(latents: torch.Tensor, i: int) -> torch.Tensor:
        seen.append(latents.clone())
        return latents

    out = sample(toy, x, plan, after_step=record, **kwargs)
    assert torch.equal(out, seen[-1])
    return seen


def assert_same_trajectory(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, step=step: f"step {step}: {m}")


# ----------------------------------------------------------------------------------------------
# Timesteps


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_timesteps_are_diffusers_for_every_step_count(name):
    made = scheduler(name)
    for steps in range(1, 51):
        made.set_timesteps(steps)
        assert make_plan(name, ScheduleConfig(), steps).timesteps.tolist() == made.timesteps.tolist(), steps
    assert distilled_timesteps(4) == [999, 759, 499, 259]
    assert distilled_timesteps(1) == [999]


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_more_steps_than_the_distillation_schedule_are_refused(name):
    with pytest.raises(ValueError, match=r"lcm and tcd take 1 to 50 steps .*got 51"):
        make_plan(name, ScheduleConfig(), 51)
    made = scheduler(name)
    with pytest.raises(ValueError, match="smaller than `num_inference_steps`: 51"):
        made.set_timesteps(51)  # diffusers refuses them too


# ----------------------------------------------------------------------------------------------
# LCM


def test_lcm_boundary_condition_scalings_are_diffusers():
    made = scheduler("lcm")
    made.set_timesteps(8)
    plan = make_plan("lcm", ScheduleConfig(), 8)
    for i, t in enumerate(made.timesteps):
        c_skip, c_out = made.get_scalings_for_boundary_condition_discrete(t)
        assert plan.coefficients["c_skip"][i].item() == pytest.approx(float(c_skip), rel=1e-7, abs=0)
        assert plan.coefficients["c_out"][i].item() == pytest.approx(float(c_out), rel=1e-7, abs=0)
    # u = 10 t: c_skip is 2.5e-9 at t = 999 and tiny even at the lowest step (t = 19: 1.7e-6).
    assert plan.coefficients["c_skip"].max() < 2e-6 and plan.coefficients["c_out"].min() > 1 - 2e-6


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_equals_diffusers_step_by_step(steps, prediction):
    made = scheduler("lcm", prediction)
    made.set_timesteps(steps)
    x = noise(2, 4, 8, 8)
    reference = diffusers_trajectory(made, x, generator=torch.Generator().manual_seed(7))
    plan = make_plan("lcm", ScheduleConfig(prediction=prediction), steps)
    assert_same_trajectory(our_trajectory(plan, x, generator=torch.Generator().manual_seed(7)), reference)


def test_lcm_draws_one_noise_per_step_but_the_last_from_each_images_generator():
    """diffusers draws ``randn`` of the batch's shape on the one generator, or one image's shape on
    each of a list; nothing after the last step, so one step draws nothing at all."""
    made = scheduler("lcm")
    made.set_timesteps(4)
    x = noise(2, 4, 8, 8)
    reference = diffusers_trajectory(made, x, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    plan = make_plan("lcm", ScheduleConfig(), 4)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    assert_same_trajectory(our_trajectory(plan, x, generator=generators), reference)
    # Three draws of [4, 8, 8] each: the generators are where three draws leave them.
    after_three = torch.Generator().manual_seed(3)
    for _ in range(3):
        torch.randn(4, 8, 8, generator=after_three)
    assert torch.equal(generators[0].get_state(), after_three.get_state())

    one = torch.Generator().manual_seed(5)
    state = one.get_state()
    sample(toy, x, make_plan("lcm", ScheduleConfig(), 1), generator=one)
    assert torch.equal(one.get_state(), state)


# ----------------------------------------------------------------------------------------------
# TCD


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("steps", "gamma"), [(4, 0.3), (8, 0.3), (4, 0.0), (4, 1.0), (6, 0.55), (1, 0.3), (2, 0.9)])
def test_tcd_equals_diffusers_step_by_step(steps, gamma, prediction):
    made = scheduler("tcd", prediction)
    made.set_timesteps(steps)
    x = noise(2, 4, 8, 8, seed=1)
    reference = diffusers_trajectory(made, x, eta=gamma, generator=torch.Generator().manual_seed(11))
    plan = make_plan("tcd", ScheduleConfig(prediction=prediction), steps, eta=gamma)
    assert_same_trajectory(our_trajectory(plan, x, generator=torch.Generator().manual_seed(11)), reference)


def test_tcd_gamma_is_its_eta_with_diffusers_default_and_lands_where_diffusers_does():
    assert SAMPLERS["tcd"].eta == 0.3  # the TCD pipelines' default eta
    default, explicit = make_plan("tcd", ScheduleConfig(), 4), make_plan("tcd", ScheduleConfig(), 4, eta=0.3)
    for name, value in default.coefficients.items():
        assert torch.equal(value, explicit.coefficients[name]), name
    # The last step goes to s = floor((1 - gamma) * 0) = 0: alphas_cumprod[0], sigma 0.029, as DDIM.
    a0 = training_alphas_cumprod(ScheduleConfig())[0].item()
    assert default.noise_level(4) == pytest.approx(math.sqrt((1 - a0) / a0), rel=1e-12)
    # gamma 0: deterministic, no draws at all.
    generator = torch.Generator().manual_seed(2)
    state = generator.get_state()
    sample(toy, noise(1, 4, 8, 8), make_plan("tcd", ScheduleConfig(), 4, eta=0.0), generator=generator)
    assert torch.equal(generator.get_state(), state)


def test_eta_applies_to_ddim_and_tcd_only_within_0_and_1():
    with pytest.raises(ValueError, match=r"applies to 'ddim' and 'tcd' only, got eta=0\.3 for 'lcm'"):
        make_plan("lcm", ScheduleConfig(), 4, eta=0.3)
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="eta must be between 0 and 1"):
            make_plan("tcd", ScheduleConfig(), 4, eta=bad)
    make_plan("lcm", ScheduleConfig(), 4, eta=0.0)  # 0: "no eta", as every interface sends by default


# ----------------------------------------------------------------------------------------------
# img2img, the inpainting hook's levels


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_img2img_keeps_the_last_steps_and_equals_diffusers_on_those_timesteps(name):
    """``from_strength`` keeps the last ``int(N s)`` steps (A1111's rule, as for every sampler here).
    diffusers' LCM img2img pipeline instead respaces all N steps below the strength; given our
    timesteps as its custom schedule, its steps equal ours."""
    plan = make_plan(name, ScheduleConfig(), 8).from_strength(0.5)
    assert plan.timesteps.tolist() == [499.0, 379.0, 259.0, 139.0]
    made = scheduler(name)
    made.set_timesteps(timesteps=[int(t) for t in plan.timesteps])
    init, n = noise(2, 4, 8, 8, seed=1), noise(2, 4, 8, 8, seed=2)
    start = made.add_noise(init, n, made.timesteps[:1])
    torch.testing.assert_close(plan.start(n, init), start, rtol=1e-6, atol=1e-6)
    step_args = {"eta": 0.3} if name == "tcd" else {}
    reference = diffusers_trajectory(made, start, generator=torch.Generator().manual_seed(4), **step_args)
    ours = our_trajectory(plan, n, init=init, generator=torch.Generator().manual_seed(4))
    assert_same_trajectory(ours, reference)


def consistency_denoiser(mu: float, s: float):
    """The exact consistency function of data N(mu, s^2) per pixel, as an eps-model: the
    probability-flow ODE maps x_t to x0 = mu + s (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a)."""
    alphas = training_alphas_cumprod(ScheduleConfig())

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas[t.long().cpu()].to(x)[:, None, None, None]
        x0 = mu + s * (x - a.sqrt() * mu) / (a * s**2 + 1 - a).sqrt()
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return denoise


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_with_an_exact_consistency_function_draws_the_data_distribution(steps):
    """What LCM is for: a model that maps any x_t to its trajectory's end. With the exact one of
    Gaussian data, started from the exact noisy distribution at t = 999 (the data noised to the
    first level, as test_samplers does), one to eight steps give the data's mean and spread
    (measured: within 0.006 of both; the sampling error over 65536 pixels is 0.004).
    With the posterior mean E[x0 | x_t] instead, which is what an ordinary model predicts, the
    re-noising loses variance: at 50 steps the spread is 0.68 of the data's. TCD's deterministic
    part (x_s from x0 and the model's eps) is exact for its own distilled model, not for this
    function; it is checked against diffusers above."""
    mu, s = 0.5, 1.0
    plan = make_plan("lcm", ScheduleConfig(), steps)
    data = mu + s * noise(1, 1, 256, 256, seed=1)
    generator = torch.Generator().manual_seed(3)
    out = sample(consistency_denoiser(mu, s), noise(1, 1, 256, 256, seed=2), plan, init=data, generator=generator)
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.std().item() / s - 1) < 0.01


def test_the_denoised_hook_sees_each_steps_clean_estimate():
    """``sample(..., on_denoised=...)``: the model's x0 at every step, what a live preview decodes;
    for DDIM it is diffusers' pred_original_sample."""
    made = diffusers.DDIMScheduler(
        **SCHEDULE, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    made.alphas_cumprod = training_alphas_cumprod(ScheduleConfig()).float()
    made.final_alpha_cumprod = made.alphas_cumprod[0]
    made.set_timesteps(10)
    x, reference = noise(1, 4, 8, 8), []
    state = x
    for t in made.timesteps:
        step = made.step(toy(state, torch.full((1,), float(t))), t, state)
        state = step.prev_sample
        reference.append(step.pred_original_sample)
    seen = []
    sample(toy, x, make_plan("ddim", ScheduleConfig(), 10), on_denoised=lambda x0, i: seen.append((i, x0.clone())))
    assert [i for i, _ in seen] == list(range(10))
    for (_, ours), theirs in zip(seen, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-5)
    for name in SAMPLERS:  # once per step, every sampler
        steps: list[int] = []
        sample(toy, x, make_plan(name, ScheduleConfig(), 4), on_denoised=lambda x0, i, steps=steps: steps.append(i))
        assert steps == [0, 1, 2, 3], name

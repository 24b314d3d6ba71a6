"""Guidance at most 1 runs the batch of one (diffusers' rule), and the eta setting: the sampler's
own by default (DDIM 0, TCD's gamma 0.3), allowed where the sampler takes one, recorded as used."""

from __future__ import annotations

import pytest
import torch

from controlnet.models.tiny import circle_edges, random_tiny_models
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.serve.a1111 import sampler as a1111_sampler
from controlnet.settings import GENERATION, SettingError, check_generation

EDGES = circle_edges(64)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    model, controlnet = random_tiny_models(seed=0)
    return Pipeline(model, [controlnet], dtype="float32")


def _batches(module: torch.nn.Module, run) -> list[int]:
    """The batch size of each forward pass of ``module`` while ``run()`` runs."""
    seen: list[int] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_guidance_of_at_most_one_runs_the_conditional_batch_alone(pipe, scale):
    def run():
        pipe.generate("a circle", [ControlUnit(EDGES)], num_images=2, steps=3, seed=1, guidance_scale=scale)

    assert _batches(pipe.model.unet, run) == [2, 2, 2]
    assert _batches(pipe.controlnets[0], run) == [2, 2, 2]
    # The negative prompt is not encoded: one text, the prompt's.
    assert _batches(pipe.model.text_encoder, run) == [1]


def test_guidance_above_one_batches_both_sides(pipe):
    def run():
        pipe.generate("a circle", [ControlUnit(EDGES)], num_images=2, steps=3, seed=1, guidance_scale=1.5)

    assert _batches(pipe.model.unet, run) == [4, 4, 4]
    assert _batches(pipe.model.text_encoder, run) == [2]


def test_without_guidance_the_negative_prompt_changes_nothing(pipe):
    """Scale 1 gave cond exactly before (uncond + 1 * (cond - uncond)); now the uncond side is not
    even computed, and the negative prompt is ignored."""
    unit = ControlUnit(EDGES)
    one = pipe.generate("a circle", [unit], steps=3, seed=5, guidance_scale=1.0, output="float")
    other = pipe.generate(
        "a circle", [unit], steps=3, seed=5, guidance_scale=1.0, negative_prompt="blurry", output="float"
    )
    guided = pipe.generate("a circle", [unit], steps=3, seed=5, guidance_scale=3.0, output="float")
    assert (one.images[0] == other.images[0]).all()
    assert not (one.images[0] == guided.images[0]).all()


def test_eta_defaults_to_the_samplers_own_and_the_record_keeps_the_one_used(pipe):
    assert GENERATION["eta"].default is None
    runs = {
        ("ddim", None): 0.0,
        ("tcd", None): 0.3,
        ("tcd", 0.7): 0.7,
        ("ddim", 0.5): 0.5,
        ("lcm", None): 0.0,
        ("euler", None): 0.0,
    }
    for (sampler, eta), used in runs.items():
        result = pipe.generate("a circle", steps=2, seed=3, sampler=sampler, eta=eta, guidance_scale=1.0)
        assert result.settings["eta"] == used, (sampler, eta)


def test_tcd_gamma_zero_and_the_default_differ(pipe):
    kwargs = {"steps": 4, "seed": 3, "sampler": "tcd", "guidance_scale": 1.0, "output": "float"}
    deterministic = pipe.generate("a circle", eta=0.0, **kwargs).images[0]
    default = pipe.generate("a circle", **kwargs).images[0]
    explicit = pipe.generate("a circle", eta=0.3, **kwargs).images[0]
    assert (default == explicit).all()
    assert not (default == deterministic).all()


def test_eta_is_refused_in_one_line_for_a_sampler_that_takes_none():
    check_generation({"sampler": "tcd", "eta": 0.5})
    check_generation({"sampler": "ddim", "eta": 1.0})
    check_generation({"sampler": "euler", "eta": 0.0})
    with pytest.raises(SettingError, match=r"^eta applies to the ddim, tcd samplers only, got eta 0.5 for euler$"):
        check_generation({"sampler": "euler", "eta": 0.5})
    with pytest.raises(SettingError, match="eta must be between 0 and 1"):
        check_generation({"sampler": "tcd", "eta": 1.5})


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_few_step_samplers_refuse_more_than_50_steps_in_one_line(pipe, sampler):
    check_generation({"sampler": sampler, "steps": 50})
    check_generation({"sampler": "ddim", "steps": 51})
    with pytest.raises(SettingError, match=f"^steps must be at most 50 for {sampler} .*got 51$") as caught:
        pipe.generate("a circle", steps=51, sampler=sampler)
    assert "\n" not in str(caught.value)


def test_the_a1111_api_names_lcm():
    assert a1111_sampler("LCM") == ("lcm", "LCM")
    assert a1111_sampler("k_lcm") == ("lcm", "LCM")

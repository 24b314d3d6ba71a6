"""The core bounds the work of one generation and never returns a silently wrong image: prompts are
capped (characters, then tokens) and must be text a PNG record can hold; images longer than 4:1 are
refused before anything is resized; values that would make NaN (eta above 1, a NaN guidance or
strength) are refused; a NaN that appears anyway stops the job with a message naming where."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from controlnet.annotators import run_annotator
from controlnet.config import SD15
from controlnet.imaging.resize import MAX_ASPECT_RATIO, resize_image
from controlnet.models import tokenizer as tokenizer_module
from controlnet.models.tiny import random_tiny_models
from controlnet.models.tokenizer import default_tokenizer
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.runtime import NonFiniteError
from controlnet.sampling.prompts import MAX_PROMPT_CHARACTERS, MAX_PROMPT_TOKENS, check_prompts
from controlnet.sampling.samplers import make_plan

EDGES = np.zeros((64, 64, 3), np.uint8)
EDGES[16:48, 16] = 255


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    model, controlnet = random_tiny_models(seed=0)
    return Pipeline(model, [controlnet], dtype="float32")


# -- prompts --------------------------------------------------------------------------------------


def test_a_prompt_of_the_longest_allowed_length_is_accepted():
    words = " ".join(["red"] * MAX_PROMPT_TOKENS)
    assert len(default_tokenizer().encode(words)) == MAX_PROMPT_TOKENS
    check_prompts(words)  # no error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x" * (MAX_PROMPT_CHARACTERS + 1), f"the limit is {MAX_PROMPT_CHARACTERS:,}"),
        (" ".join(["red"] * (MAX_PROMPT_TOKENS + 1)), f"{MAX_PROMPT_TOKENS + 1} tokens long; the limit is 600"),
        ("a red\0 circle", "contains a NUL character"),
        ("a red \ud800 circle", "lone surrogate"),
        (b"a red circle", "must be text, got bytes"),
        (None, "must be text, got NoneType"),
    ],
)
def test_bad_prompts_are_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as refused:
        check_prompts("a circle", negative_prompt=text)
    assert str(refused.value).startswith("the negative prompt") and "\n" not in str(refused.value)


def test_a_huge_prompt_is_refused_before_the_tokenizer_reads_it(monkeypatch):
    def tokenize(_text):
        raise AssertionError("the tokenizer ran on a text over the character limit")

    monkeypatch.setattr(default_tokenizer(), "encode", tokenize)
    with pytest.raises(ValueError, match="4,194,304 characters long"):
        check_prompts("x" * 4 * 2**20)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "added_prompt"])
def test_the_pipeline_checks_every_prompt_before_any_work(pipe, field):
    calls = []
    kwargs = {"prompt": "a circle", field: "x" * (MAX_PROMPT_CHARACTERS + 1)}
    with pytest.raises(ValueError, match="characters long"):
        pipe.generate(**kwargs, steps=1, progress=lambda *step: calls.append(step))
    assert calls == []


def test_the_prompt_and_its_added_prompt_are_bounded_together(pipe):
    half = " ".join(["red"] * (MAX_PROMPT_TOKENS // 2 + 10))
    with pytest.raises(ValueError, match="the prompt with the added prompt is 621 tokens long"):
        pipe.generate(half, added_prompt=half, steps=1)


def test_the_tokenizer_remembers_a_bounded_number_of_words(monkeypatch):
    tokenizer = default_tokenizer()
    monkeypatch.setattr(tokenizer_module, "_MAX_CACHED_WORDS", 50)
    monkeypatch.setattr(tokenizer, "_cache", dict(tokenizer._cache))
    expected = tokenizer.encode("zebra")
    tokenizer.encode(" ".join(f"word{i}x" for i in range(500)))
    assert len(tokenizer._cache) <= 50
    assert tokenizer.encode("zebra") == expected  # forgetting changes nothing but speed
    long_word = "q" * 500
    ids = tokenizer.encode(long_word)
    assert tokenizer.encode(long_word) == ids and not any(len(word) > 64 for word in tokenizer._cache)


# -- output sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(1, 64), (64, 1), (1, 4096), (100, 401)])
def test_images_longer_than_4_to_1_are_refused_before_resizing(height, width):
    image = np.zeros((height, width, 3), np.uint8)
    with pytest.raises(ValueError, match=f"is {width}x{height}: its long side is more than 4 times"):
        resize_image(image, 512)
    with pytest.raises(ValueError, match="more than 4 times"):
        run_annotator("canny", image, 512)


def test_an_image_of_exactly_4_to_1_keeps_its_output_within_4_times_the_resolution():
    assert MAX_ASPECT_RATIO == 4
    assert resize_image(np.zeros((100, 400, 3), np.uint8), 128).shape == (128, 512, 3)


def test_a_thin_control_image_is_refused_by_the_pipeline_before_sampling(pipe):
    calls = []
    thin = np.full((1, 64, 3), 255, np.uint8)  # would ask for a 4096x64 output at resolution 64
    with pytest.raises(ValueError, match="is 64x1"):
        pipe.generate("a line", [ControlUnit(thin)], steps=1, progress=lambda *step: calls.append(step))
    with pytest.raises(ValueError, match="is 64x1"):
        pipe.generate("a line", init_image=thin, steps=1)
    assert calls == []


# -- values that would make NaN ---------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.5, -0.1, math.nan, math.inf])
def test_ddim_eta_outside_0_to_1_is_refused(eta):
    with pytest.raises(ValueError, match="eta must be between 0 and 1"):
        make_plan("ddim", SD15.schedule, 20, eta=eta)


def test_ddim_eta_1_is_finite():
    plan = make_plan("ddim", SD15.schedule, 20, eta=1.0)
    assert all(bool(torch.isfinite(value).all()) for value in plan.coefficients.values())


@pytest.mark.parametrize(
    ("kwargs", "unit", "message"),
    [
        ({"guidance_scale": math.nan}, {}, "guidance scale must be a number, got nan"),
        ({"guidance_scale": math.inf}, {}, "guidance scale must be a number, got inf"),
        ({"eta": 1.5}, {}, "eta must be between 0 and 1"),
        ({}, {"strength": math.nan}, "control unit 0: strength must be a number, got nan"),
        ({}, {"strength": -1.0}, "control unit 0: strength must be between 0 and 2, got -1.0"),
        ({}, {"start": math.nan}, "control unit 0: start must be a number, got nan"),
        ({}, {"end": math.inf}, "control unit 0: end must be a number, got inf"),
        ({}, {"scales": [1.0] * 12 + [math.nan]}, "control unit 0: scales must be finite"),
        ({"init_image": EDGES, "denoising_strength": math.nan}, {}, "denoising strength must be a number, got nan"),
        (
            {"init_image": EDGES, "denoising_strength": 1.5},
            {},
            "denoising strength must be between 0.01 and 1, got 1.5",
        ),
    ],
)
def test_values_that_would_make_nan_are_refused(pipe, kwargs, unit, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("a circle", [ControlUnit(EDGES, **unit)], steps=2, **kwargs)


def _poison(module: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.Tensor]:
    """Set one weight of ``module`` to NaN; return the weight and its saved values."""
    weight = next(p for p in module.parameters() if p.ndim > 1)
    saved = weight.detach().clone()
    weight.data.view(-1)[0] = math.nan
    return weight, saved


@pytest.mark.parametrize(
    ("part", "message"),
    [("unet", "the latents after sampling .UNet and ControlNets in float32. hold NaN or infinite values"),
     ("vae", "the images decoded by the VAE .in float32. hold NaN or infinite values")],
)  # fmt: skip
def test_a_nan_during_generation_stops_with_where_it_came_from(pipe, part, message):
    module = pipe.model.unet if part == "unet" else pipe.model.vae.decoder
    weight, saved = _poison(module)
    try:
        with pytest.raises(NonFiniteError, match=message):
            pipe.generate("a circle", [ControlUnit(EDGES)], steps=2, seed=0)
    finally:
        weight.data.copy_(saved)
    assert pipe.generate("a circle", [ControlUnit(EDGES)], steps=2, seed=0).images[0].shape == (64, 64, 3)

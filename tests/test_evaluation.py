"""Controllability metrics and the evaluation run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from controlnet.annotators import ANNOTATORS
from controlnet.annotators.canny import canny
from controlnet.datasets.synthetic import scene_sample, write_dataset
from controlnet.evaluation import Reextraction, edge_f1, evaluate, scene_adherence, ssim
from controlnet.pipeline import GenerationResult


def test_edge_f1_counts_exact_edge_pixels():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    edges = canny(image, 100, 200)
    assert edge_f1(image, edges).f1 == 1.0
    shifted = np.roll(edges, 3, axis=1)  # the same square, 3 pixels off: few exact matches
    assert edge_f1(image, shifted).f1 < 0.5
    half = edges.copy()
    half[:16] = 0
    score = edge_f1(image, half)
    assert score.recall == 1.0 and 0.4 < score.precision < 0.6
    assert edge_f1(np.zeros_like(image), np.zeros((32, 32), np.uint8)).f1 == 1.0


def test_ssim_is_one_for_equal_maps_and_lower_for_different_ones():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0.0 < ssim(a, np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)) < 1.0


def test_scene_adherence_finds_a_scene_in_its_own_image_and_not_in_others():
    own = [scene_sample(i, size=64) for i in range(40)]
    other = [scene_sample(i + 500, size=64) for i in range(40)]
    assert all(scene_adherence(s.target, s.scene).score == 1.0 for s in own)
    wrong = np.mean([scene_adherence(o.target, s.scene).score for s, o in zip(own, other, strict=True)])
    assert wrong < 0.3
    flat = np.zeros((64, 64, 3), np.uint8)  # black everywhere: at most a black object or background
    assert np.mean([scene_adherence(flat, s.scene).score for s in own]) < 0.2


class _ReplayPipeline:
    """Stands for a model that draws exactly the data's images (or a fixed wrong one)."""

    def __init__(self, data, wrong: bool = False) -> None:
        from controlnet.datasets.folders import read_records
        from controlnet.imaging.images import load_image

        self.targets = {r.prompt: load_image(r.target) for r in read_records(data)}
        self.wrong = wrong
        self.model = SimpleNamespace(config=SimpleNamespace(native_resolution=64, name="replay"))
        self.calls = []

    def generate(self, prompt, controls, *, num_images, seed, **settings):
        self.calls.append((prompt, len(controls), num_images, seed, settings))
        image = np.zeros((64, 64, 3), np.uint8) if self.wrong else self.targets[prompt]
        return GenerationResult([image] * num_images, [], [seed + i for i in range(num_images)], {})


def test_evaluate_scores_a_perfect_model_one_and_a_blank_one_low(tmp_path):
    data = tmp_path / "scenes"
    write_dataset(data, "scenes", 6, size=64, seed=3)
    perfect = _ReplayPipeline(data)
    results = evaluate(perfect, data, tmp_path / "good", count=5, images_per_condition=2, steps=3)
    summary = results["summary"]
    assert summary["edge_f1"] == 1.0 and summary["scene_score"] == 1.0 and summary["edge_ssim"] == pytest.approx(1.0)
    assert len(results["samples"]) == 5 and results["settings"]["images_per_condition"] == 2
    assert all(call[1:4] == (1, 2, 0) and call[4]["guidance_scale"] == 7.5 for call in perfect.calls)
    assert json.loads((tmp_path / "good" / "results.json").read_text())["summary"] == summary
    assert (tmp_path / "good" / "grid.png").exists()
    blank = evaluate(_ReplayPipeline(data, wrong=True), data, tmp_path / "bad", count=5, images_per_condition=1)
    assert blank["summary"]["edge_f1"] < 0.1 and blank["summary"]["scene_score"] < 0.3


def test_evaluate_re_extracts_with_the_annotator_that_made_the_conditions(tmp_path):
    """Conditions made by another annotator (scribble here): re-extracted with it, a model that draws
    the data's images scores SSIM 1, a blank one less; the results name the annotator."""
    from controlnet.annotators import run_annotator
    from controlnet.datasets.folders import read_records
    from controlnet.imaging.images import load_image, save_png

    data = tmp_path / "scenes"
    write_dataset(data, "scenes", 3, size=64, seed=3)
    for record in read_records(data):
        save_png(record.source, run_annotator("scribble", load_image(record.target), None, threshold=100))
    scribbles = Reextraction("scribble", {"threshold": 100})
    results = evaluate(_ReplayPipeline(data), data, tmp_path / "good", count=3, images_per_condition=1,
                       reextraction=scribbles)  # fmt: skip
    assert results["summary"]["map_ssim"] == pytest.approx(1.0) and "edge_f1" not in results["summary"]
    assert results["settings"]["annotator"] == "scribble"
    assert results["settings"]["annotator_params"] == {"threshold": 100}
    blank = evaluate(_ReplayPipeline(data, wrong=True), data, tmp_path / "bad", count=3, images_per_condition=1,
                     reextraction=scribbles)  # fmt: skip
    assert blank["summary"]["map_ssim"] < 0.9


def test_eval_command_runs_on_the_default_model_and_refuses_bad_input(tmp_path, capsys):
    from controlnet.cli import main

    data = tmp_path / "scenes"
    write_dataset(data, "scenes", 3, size=64)
    argv = ["eval", "--data", str(data), "--out", str(tmp_path / "out"), "--count", "2", "--steps", "2"]
    assert main([*argv, "--images-per-condition", "1"]) == 0
    output = capsys.readouterr().out
    assert "edge_f1" in output and "scene_score" in output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["count"] == 2
    assert main([*argv, "--count", "0"]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    capsys.readouterr()
    assert main([*argv, "--annotator", "nope"]) == 2
    assert "--annotator: unknown annotator 'nope'" in capsys.readouterr().err
    assert main([*argv, "--annotator", "scribble", "--annotator-param", "threshold=999"]) == 2
    assert "scribble parameter 'threshold' must be in" in capsys.readouterr().err
    network = next((n for n, a in sorted(ANNOTATORS.items()) if a.weights), None)
    if network is not None:  # its file missing: named with the folder searched, before a model loads
        status = main([*argv, "--annotator", network, "--annotators-dir", str(tmp_path / "empty")])
        err = capsys.readouterr().err.strip()
        assert status == 1 and len(err.splitlines()) == 1 and str(tmp_path / "empty") in err


# -- no NaN in the results, no results lost (issue 16) ------------------------------------------


class _OverflowingPipeline(_ReplayPipeline):
    """Generation whose numbers overflow: the pipeline's own check refuses the NaN images."""

    def generate(self, prompt, controls, **settings):
        from controlnet.runtime import NonFiniteError

        raise NonFiniteError("the latents after sampling hold NaN or infinite values")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"guidance_scale": float("nan")}, "guidance scale must be a number, got nan"),
        ({"guidance_scale": float("inf")}, "guidance scale must be a number, got inf"),
        ({"seed": -1}, "seed must be between 0"),  # a random seed: scores no one could reproduce
        ({"resolution": 100}, "resolution must be a multiple of 64"),  # the images would not match the condition
        ({"steps": 0}, "steps must be between 1 and 100"),
        ({"images_per_condition": 0}, "images must be between 1 and 12, got 0"),
        (
            {"reextraction": Reextraction("canny", {"low_threshold": 0})},
            r"canny parameter 'low_threshold' must be in \[1, 255\], got 0",
        ),
        ({"reextraction": Reextraction("inpaint")}, "annotator 'inpaint' needs more than an image"),
        ({"reextraction": Reextraction("nope")}, "unknown annotator 'nope'"),
        ({"sampler": "plms"}, "sampler must be one of ddim"),
        ({"count": 0}, "count must be at least 1"),
    ],
)
def test_evaluate_refuses_bad_settings_before_generating(tmp_path, settings, message):
    data = tmp_path / "scenes"
    write_dataset(data, "scenes", 2, size=64, seed=3)
    pipe = _ReplayPipeline(data)
    with pytest.raises(ValueError, match=message):
        evaluate(pipe, data, tmp_path / "out", **settings)
    assert pipe.calls == [] and not (tmp_path / "out").exists()


def test_evaluate_never_writes_nan_and_keeps_the_earlier_results(tmp_path):
    from controlnet.evaluation import check_scores
    from controlnet.runtime import NonFiniteError

    data = tmp_path / "scenes"
    write_dataset(data, "scenes", 2, size=64, seed=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier results\n")
    with pytest.raises(NonFiniteError, match="the latents after sampling hold NaN"):
        evaluate(_OverflowingPipeline(data), data, out, count=2, images_per_condition=1)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == "earlier results\n"
    with pytest.raises(NonFiniteError, match=r"the edge_f1 score of a\.png is nan: results\.json not written"):
        check_scores({"summary": {"edge_f1": 0.5}, "samples": [{"source": "a.png", "edge_f1": float("nan")}]})

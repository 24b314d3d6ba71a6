"""The world's scores (world_evaluation.py): each right on constructed cases, the shipped estimators
better than a trivial guess on held-out renders, `controlnet eval` choosing them by the data, and
the estimator training deterministic and resumable."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from controlnet.annotators.pose.keypoints import Person, Poses
from controlnet.datasets.synthetic import SCENE_COLORS
from controlnet.datasets.world import FLOOR, WALL, world_sample, write_world
from controlnet.evaluation import evaluate
from controlnet.formats.errors import CheckpointError
from controlnet.world_evaluation import (
    PERSON,
    SEG_CLASSES,
    depth_rmse,
    find_world,
    load_estimator,
    pose_agreement,
    prompt_adherence,
    seg_classes,
    seg_miou,
)

SIZE = 128  # the estimators' size


@pytest.fixture(scope="module")
def samples():
    """Held-out renders (seed 1, as `controlnet data world --seed 1`), never trained on."""
    return [world_sample(i, size=SIZE, seed=1) for i in range(24)]


@pytest.fixture(scope="module")
def figures(samples):
    return [s for s in samples if s.poses.people]


# -- prompt adherence -------------------------------------------------------------------------------


def test_prompt_adherence_is_perfect_on_the_renders_and_low_on_other_scenes(samples):
    own = [prompt_adherence(s.image, s.scene, s.instance) for s in samples]
    assert np.mean([a.score for a in own]) >= 0.97 and sum(a.score == 1.0 for a in own) >= 22
    other = [prompt_adherence(o.image, s.scene, s.instance) for s, o in itertools.pairwise(samples)]
    assert np.mean([a.score for a in other]) < 0.3


def test_prompt_adherence_names_the_part_that_is_wrong(samples):
    sample = next(s for s in samples if len(s.scene["objects"]) >= 2)
    target = sample.scene["objects"][0]
    used = {sample.scene["background"], sample.scene["floor"], *(o["color"] for o in sample.scene["objects"])}
    other = next(c for c in SCENE_COLORS if c not in used)
    image = sample.image.copy()
    image[sample.instance == target["instance"]] = SCENE_COLORS[other]  # one object recoloured
    score = prompt_adherence(image, sample.scene, sample.instance)
    count = len(sample.scene["objects"])
    assert score.objects_right == pytest.approx(1 - 1 / count) and score.background_right and score.floor_right
    assert score.score == pytest.approx(1 - 1 / (count + 2))
    image[sample.instance == WALL] = SCENE_COLORS[other]
    image[sample.instance == FLOOR] = (0, 0, 0) if sample.scene["floor"] != "black" else (250, 250, 250)
    score = prompt_adherence(image, sample.scene, sample.instance)
    assert not score.background_right and not score.floor_right


def test_a_grey_wall_is_grey_though_white_in_shade_looks_the_same():
    instance = np.zeros((16, 16), np.int64)
    instance[8:] = FLOOR
    scene = {"background": "gray", "floor": "white", "objects": []}
    image = np.zeros((16, 16, 3), np.uint8)
    image[:8] = SCENE_COLORS["gray"]  # exactly white at shade 0.51 too
    image[8:] = np.array(SCENE_COLORS["white"]) * 0.7  # white lit from the side
    score = prompt_adherence(image, scene, instance)
    assert score.background_right and score.floor_right and score.score == 1.0


# -- depth, seg ------------------------------------------------------------------------------------


def test_depth_rmse_is_zero_for_the_map_itself_and_grows_when_it_moves(samples):
    depth = samples[0].conditions["depth"]
    levels = depth[:, :, 0] / 255.0
    assert depth_rmse(levels, depth) == 0.0
    assert depth_rmse(np.roll(levels, 8, axis=0), depth) > depth_rmse(np.roll(levels, 2, axis=0), depth) > 0.01
    assert depth_rmse(np.full_like(levels, 0.5), depth) > 0.1
    with pytest.raises(ValueError, match="sizes differ"):
        depth_rmse(levels[:64], depth)


def test_seg_classes_read_the_world_seg_maps_and_miou_scores_them(samples):
    from controlnet.datasets.world import CLASSES

    for s in samples[:6]:
        classes = seg_classes(s.conditions["seg"])
        kinds = {SEG_CLASSES[c] for c in np.unique(classes)}
        assert kinds == {"wall", "floor"} | {o["kind"] for o in s.scene["objects"]}
        assert all(CLASSES[SEG_CLASSES[c]][0] == o["seg_class"] for o in s.scene["objects"] for c in
                   np.unique(classes[s.instance == o["instance"]]))  # fmt: skip
    wanted = seg_classes(samples[0].conditions["seg"])
    assert seg_miou(wanted, wanted).miou == 1.0 and seg_miou(wanted, wanted).accuracy == 1.0
    moved = seg_miou(np.roll(wanted, 6, axis=1), wanted)
    assert 0.2 < moved.miou < 0.95
    flat = seg_miou(np.zeros_like(wanted), wanted)  # all wall
    assert flat.miou < moved.miou and flat.accuracy < 0.7


# -- pose -----------------------------------------------------------------------------------------


def test_pose_agreement_is_high_for_the_figures_own_pixels_and_low_otherwise(figures):
    assert len(figures) >= 4
    exact = [pose_agreement(seg_classes(s.conditions["seg"]) == PERSON, s.poses) for s in figures]
    assert min(p.score for p in exact) >= 0.95 and np.mean([p.precision for p in exact]) >= 0.99
    for s, p in zip(figures, exact, strict=True):
        person = seg_classes(s.conditions["seg"]) == PERSON
        moved = pose_agreement(np.roll(person, 8, axis=1), s.poses)
        assert moved.score < p.score - 0.2
        everywhere = pose_agreement(np.ones_like(person), s.poses)
        assert everywhere.limbs == 1.0 and everywhere.precision < 0.3
        assert pose_agreement(np.zeros_like(person), s.poses).score == 0.0


def test_pose_agreement_counts_drawn_limbs_and_skips_images_without_figures():
    body = np.full((18, 3), np.nan)
    body[[1, 8]] = [(0.5, 0.2, 1), (0.5, 0.8, 1)]  # neck and right hip: one limb, straight down
    poses = Poses(64, 64, [Person(body=body)])
    person = np.zeros((64, 64), bool)
    person[13:51, 30:34] = True
    score = pose_agreement(person, poses)
    assert score.limbs == 1.0 and score.precision == 1.0
    person[:, :8] = True  # a second, undrawn figure at the side: outside the band
    assert pose_agreement(person, poses).precision < 0.5
    person[13:51, 30:34] = False
    assert pose_agreement(person, poses).limbs == 0.0
    assert pose_agreement(person, Poses(64, 64, [])) is None


# -- the shipped estimators -----------------------------------------------------------------------


def test_the_shipped_estimators_beat_a_trivial_guess_on_held_out_renders(samples):
    depth, seg = load_estimator("depth"), load_estimator("seg")
    images = [s.image for s in samples]
    # The trivial guess: the mean depth map, the commonest class per pixel, of the other renders.
    maps = np.stack([s.conditions["depth"][:, :, 0] / 255.0 for s in samples])
    guess = [(maps.sum(axis=0) - m) / (len(maps) - 1) for m in maps]
    estimated = depth.predict(images)
    found = np.mean([depth_rmse(e, s.conditions["depth"]) for e, s in zip(estimated, samples, strict=True)])
    trivial = np.mean([depth_rmse(g, s.conditions["depth"]) for g, s in zip(guess, samples, strict=True)])
    assert found < 0.6 * trivial and found < 0.08
    classes = [seg_classes(s.conditions["seg"]) for s in samples]
    counts = np.stack([np.stack(classes) == c for c in range(len(SEG_CLASSES))]).sum(axis=1)
    commonest = counts.argmax(axis=0)
    found = np.mean([seg_miou(p, c).miou for p, c in zip(seg.predict(images), classes, strict=True)])
    trivial = np.mean([seg_miou(commonest, c).miou for c in classes])
    assert found > trivial + 0.2 and found > 0.6


def test_load_estimator_refuses_other_files_in_one_line(tmp_path):
    from controlnet.world_evaluation import estimator_path

    with pytest.raises(CheckpointError, match="not a world seg estimator"):
        load_estimator("seg", estimator_path("depth"))
    (tmp_path / "junk.safetensors").write_text("not weights")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors"):
        load_estimator("depth", tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="unknown estimator task 'normal'"):
        load_estimator("normal")


# -- controlnet eval on world data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "world"
    write_world(out, 8, size=SIZE, seed=1)
    return out


class _Blank:
    """A model that draws a grey image whatever it is asked."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.model = SimpleNamespace(config=SimpleNamespace(native_resolution=SIZE, name="blank"))

    def generate(self, prompt, controls, *, num_images, seed, **settings):
        from controlnet.pipeline import GenerationResult

        return GenerationResult([np.full((SIZE, SIZE, 3), 128, np.uint8)] * num_images, [], [seed], {})


@pytest.mark.parametrize(
    "condition, metric",
    [("canny", "edge_f1"), ("depth", "depth_rmse"), ("seg", "seg_miou"), ("pose", "pose_score"), ("normal", None)],
)
def test_eval_scores_each_world_condition_by_its_own_measure(world, tmp_path, condition, metric):
    data = world if condition == "canny" else world / condition
    assert find_world(data).condition == condition
    truth = evaluate(None, data, tmp_path / "truth", count=8)
    summary = truth["summary"]
    assert summary["prompt_adherence"] >= 0.95 and truth["settings"]["world_condition"] == condition
    assert truth["settings"]["model"].startswith("ground truth") and truth["settings"]["images_per_condition"] == 1
    own = {"edge_f1", "depth_rmse", "seg_miou", "pose_score"}
    assert own & set(summary) == ({metric} if metric else set())
    blank = evaluate(_Blank(), data, tmp_path / "blank", count=8, images_per_condition=1, steps=1)["summary"]
    assert blank["prompt_adherence"] < 0.3
    if metric == "depth_rmse":  # the wall and floor are where they always are: the objects tell more
        assert summary[metric] < blank[metric] - 0.02
        assert summary["depth_rmse_objects"] < blank["depth_rmse_objects"] - 0.08
    elif metric is not None:
        assert summary[metric] > blank[metric] + 0.3
    if metric == "pose_score":  # only the samples with figures have it
        samples = truth["samples"]
        assert 0 < sum("pose_score" in s for s in samples) < len(samples)


def test_other_data_is_not_taken_for_the_world(tmp_path):
    from controlnet.datasets.synthetic import write_dataset

    write_dataset(tmp_path / "depth", "scenes", 2, size=64)  # named like a condition, not inside a world
    assert find_world(tmp_path / "depth") is None


def test_eval_command_on_world_data_and_its_mistakes(world, tmp_path, capsys):
    import shutil

    from controlnet.cli import main

    out = tmp_path / "out"
    assert main(["eval", "--ground-truth", "--data", str(world / "seg"), "--out", str(out), "--count", "3"]) == 0
    printed = capsys.readouterr().out
    assert "seg_miou" in printed and "prompt_adherence" in printed
    assert json.loads((out / "results.json").read_text())["settings"]["count"] == 3
    cases = [
        (["--ground-truth", "--data", str(world), "--base", str(world / "prompt.json")], 2, "--ground-truth scores"),
        (["--ground-truth", "--data", str(world / "depth"), "--annotator", "scribble"], 2, "scored by the world's own"),
    ]
    old = tmp_path / "old"
    shutil.copytree(world, old)
    shutil.rmtree(old / "instance")  # written before instance maps existed
    cases.append((["--ground-truth", "--data", str(old / "depth")], 1, "no instance map"))
    for argv, status, message in cases:
        assert main(["eval", "--out", str(tmp_path / "o"), *argv]) == status
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


# -- training an estimator ------------------------------------------------------------------------


def _settings(data, out, **changes):
    from controlnet.train.estimator import EstimatorSettings

    base = {"task": "seg", "data": data, "out": out, "steps": 4, "batch_size": 2, "checkpoint_every": 2,
            "validation_data": data, "mixed_precision": "no", "widths": (4, 8)}  # fmt: skip
    return EstimatorSettings(**(base | changes))


def test_estimator_training_is_deterministic_and_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    from controlnet.formats.tensors import read_state_dict
    from controlnet.train.estimator import train_estimator

    data = tmp_path / "world"
    write_world(data, 4, size=64, seed=3)
    whole = train_estimator(_settings(data, tmp_path / "whole"), log=lambda line: None)

    def interrupt(line: str) -> None:
        if line.startswith("step 2,"):  # logged once the step-2 checkpoint is written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_estimator(_settings(data, tmp_path / "resumed"), log=interrupt)
    lines = []
    resumed = train_estimator(_settings(data, tmp_path / "resumed"), log=lines.append)
    assert any("resumed from" in line and "at step 2" in line for line in lines)
    a, meta = read_state_dict(whole)
    b, _ = read_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["task"] == "seg" and meta["classes"] == ",".join(SEG_CLASSES) and "held_out_seg_miou" in meta
    assert "controlnet train-estimator --task seg" in meta["command"]
    estimator = load_estimator("seg", whole)  # the export loads as the shipped files do
    assert estimator.predict([np.zeros((64, 64, 3), np.uint8)])[0].shape == (64, 64)
    other = train_estimator(_settings(data, tmp_path / "seed1", seed=1), log=lambda line: None)
    assert not all(torch.equal(a[k], read_state_dict(other)[0][k]) for k in a)
    with pytest.raises(ValueError, match="written by a run with batch_size 2, not 1"):
        train_estimator(_settings(data, tmp_path / "whole", batch_size=1), log=lambda line: None)


def test_train_estimator_command_refuses_mistakes_in_one_line(tmp_path, capsys):
    from controlnet.cli import main
    from controlnet.datasets.synthetic import write_dataset

    write_dataset(tmp_path / "scenes", "scenes", 2, size=64)
    base = ["train-estimator", "--task", "depth", "--out", str(tmp_path / "out")]
    cases = [
        ([*base, "--data", str(tmp_path / "none")], 2, "--data"),
        ([*base, "--data", str(tmp_path / "scenes"), "--steps", "0"], 2, "--steps must be between 1"),
        ([*base, "--data", str(tmp_path / "scenes"), "--learning-rate", "nan"], 2, "--learning-rate must be"),
        ([*base, "--data", str(tmp_path / "scenes")], 1, "not a 'controlnet data world' folder"),
    ]
    for argv, status, message in cases:
        assert main(argv) == status
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err

"""`controlnet eval` beyond one ControlNet (issue 19, points 4-6): a T2I-Adapter in its place
(--adapter), the empty prompt (--empty-prompt: ControlNets in guess mode, no prompt adherence), and
compositions on world data (--also COND, --unit-strength, --unit-window): which units are built with
which maps, strengths, windows, prompt and mode, once per image, and which scores are reported.
The plumbing, not quality: a recording stand-in for the pipeline, and tiny random models on the
command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from controlnet import shipped
from controlnet.cli import main
from controlnet.datasets.folders import read_records
from controlnet.datasets.synthetic import write_dataset
from controlnet.datasets.world import write_world
from controlnet.evaluation import EvalUnit, evaluate
from controlnet.imaging.images import load_image
from controlnet.pipeline import GenerationResult

SIZE = 64
COUNT = 3
ADHERENCE_ORDER = ["prompt_adherence", "objects_right", "background_right", "floor_right"]
ADHERENCE = set(ADHERENCE_ORDER)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the real ~/.cache (the model hash cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-units") / "world"
    write_world(out, COUNT, size=SIZE, seed=1)
    return out


class _Recorder:
    """Stands for a pipeline with three ControlNets and a T2I-Adapter: records each call (prompt,
    units, settings) and draws the k-th call's images as the k-th scene's own image (evaluate goes
    through the records in order), so that the scores are those of the data's images."""

    def __init__(self, data: Path) -> None:
        self.targets = [load_image(r.target) for r in read_records(data)]
        self.model = SimpleNamespace(config=SimpleNamespace(native_resolution=SIZE, name="recorder"))
        self.controlnets, self.adapters = ["c0", "c1", "c2"], ["a0"]
        self.files = {"controlnet": [Path(f"c{i}.safetensors") for i in range(3)], "adapter": [Path("a0.pth")]}
        self.calls = []

    def generate(self, prompt, controls, *, num_images, seed, **settings):
        self.calls.append(SimpleNamespace(prompt=prompt, units=list(controls), num_images=num_images, seed=seed))
        image = self.targets[len(self.calls) - 1]
        return GenerationResult([image] * num_images, [], [seed + i for i in range(num_images)], {})


def _map(world: Path, condition: str, i: int) -> np.ndarray:
    return load_image(world / condition / f"{i}.png")


# -- compositions -----------------------------------------------------------------------------------


def test_a_composition_generates_once_per_image_with_each_units_map_and_settings(world, tmp_path):
    pipe = _Recorder(world / "pose")
    units = [
        EvalUnit(None, "controlnet", 0, strength=0.8),
        EvalUnit("depth", "controlnet", 1, strength=0.5, start=0.2, end=0.6),
        EvalUnit("canny", "controlnet", 2, strength=1.2, end=0.5),
    ]
    results = evaluate(pipe, world / "pose", tmp_path / "out", count=COUNT, images_per_condition=2, steps=1,
                       units=units)  # fmt: skip
    assert len(pipe.calls) == COUNT  # one generation per image set: every condition scored on the same images
    captions = [r.prompt for r in read_records(world / "pose")]
    for i, call in enumerate(pipe.calls):
        assert call.prompt == captions[i] and call.num_images == 2 and call.seed == 0
        pose, depth, canny = call.units
        for unit, condition in ((pose, "pose"), (depth, "depth"), (canny, "canny")):
            assert np.array_equal(unit.image, _map(world, condition, i)) and unit.mode == "balanced"
            assert unit.adapter is None
        assert [(u.controlnet, u.strength, u.start, u.end) for u in call.units] == [
            (0, 0.8, 0.0, 1.0),
            (1, 0.5, 0.2, 0.6),
            (2, 1.2, 0.0, 0.5),
        ]
    settings = results["settings"]
    assert settings["world_condition"] == "pose" and not settings["empty_prompt"] and not settings["guess_mode"]
    assert set(settings["estimators"]) == {"seg", "depth"}
    assert settings["units"] == [
        {"condition": "pose", "model": "controlnet", "index": 0, "file": "c0.safetensors",
         "strength": 0.8, "start": 0.0, "end": 1.0, "mode": "balanced"},
        {"condition": "depth", "model": "controlnet", "index": 1, "file": "c1.safetensors",
         "strength": 0.5, "start": 0.2, "end": 0.6, "mode": "balanced"},
        {"condition": "canny", "model": "controlnet", "index": 2, "file": "c2.safetensors",
         "strength": 1.2, "start": 0.0, "end": 0.5, "mode": "balanced"},
    ]  # fmt: skip
    conditions = results["conditions"]
    assert list(conditions) == ["pose", "depth", "canny"]
    assert set(conditions["depth"]) == {"depth_rmse", "depth_rmse_objects"}
    assert set(conditions["canny"]) == {"edge_f1", "edge_precision", "edge_recall", "edge_ssim"}
    assert set(conditions["pose"]) <= {"pose_score", "pose_limbs", "pose_precision"}
    for scores in conditions.values():
        assert all(results["summary"][k] == v for k, v in scores.items())
    assert set(results["summary"]) >= ADHERENCE
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    # Each composed condition is scored on the composed images as its own data scores them alone:
    # here the images are the scenes' own, so per sample the scores equal the ceilings' run alone (to
    # float32 rounding: the estimator reads two images at once here, one there).
    for condition in ("depth", "canny"):
        alone = evaluate(None, world if condition == "canny" else world / condition, tmp_path / condition,
                         count=COUNT)  # fmt: skip
        for composed, single in zip(results["samples"], alone["samples"], strict=True):
            expected = {k: pytest.approx(single[k], rel=1e-5) for k in conditions[condition]}
            assert {k: composed[k] for k in conditions[condition]} == expected


def test_a_composition_with_the_canny_data_scores_the_others_too(world, tmp_path):
    pipe = _Recorder(world)
    units = [EvalUnit(), EvalUnit("seg", index=1, strength=0.7)]
    results = evaluate(pipe, world, tmp_path / "out", count=2, images_per_condition=1, steps=1, units=units)
    assert [len(c.units) for c in pipe.calls] == [2, 2]
    assert np.array_equal(pipe.calls[1].units[0].image, load_image(world / "canny" / "1.png"))
    assert np.array_equal(pipe.calls[1].units[1].image, _map(world, "seg", 1))
    assert list(results["conditions"]) == ["canny", "seg"] and "seg_miou" in results["summary"]
    assert "edge_f1" in results["conditions"]["canny"] and results["settings"]["estimators"].keys() == {"seg"}


# -- the empty prompt, adapters ---------------------------------------------------------------------


def test_the_empty_prompt_puts_controlnets_in_guess_mode_and_reports_no_adherence(world, tmp_path):
    pipe = _Recorder(world / "seg")
    units = [EvalUnit(), EvalUnit("depth", index=1)]
    results = evaluate(pipe, world / "seg", tmp_path / "out", count=2, images_per_condition=1, steps=1,
                       units=units, empty_prompt=True)  # fmt: skip
    assert [c.prompt for c in pipe.calls] == ["", ""]
    assert all(u.mode == "control" for c in pipe.calls for u in c.units)
    settings = results["settings"]
    assert settings["empty_prompt"] and settings["guess_mode"]
    assert [u["mode"] for u in settings["units"]] == ["control", "control"]
    assert not ADHERENCE & set(results["summary"]) and not any(ADHERENCE & set(s) for s in results["samples"])
    assert all(s["prompt"] == "" for s in results["samples"])
    assert {"seg_miou", "depth_rmse"} <= set(results["summary"])
    assert "prompt_adherence" not in (tmp_path / "out" / "results.json").read_text()


def test_the_empty_prompt_on_shapes_data_reports_no_scene_score(tmp_path):
    data = tmp_path / "scenes"
    write_dataset(data, "scenes", 2, size=SIZE, seed=3)
    pipe = _Recorder(data)
    results = evaluate(pipe, data, tmp_path / "out", count=2, images_per_condition=1, steps=1, empty_prompt=True)
    assert "scene_score" not in results["summary"] and results["summary"]["edge_f1"] == 1.0
    assert [u.mode for c in pipe.calls for u in c.units] == ["control", "control"]
    with_prompt = evaluate(_Recorder(data), data, tmp_path / "with", count=2, images_per_condition=1, steps=1)
    assert with_prompt["summary"]["scene_score"] == 1.0 and not with_prompt["settings"]["empty_prompt"]
    assert list(with_prompt["conditions"]) == ["canny"] and with_prompt["settings"]["units"][0]["index"] == 0


def test_an_adapter_unit_reads_the_data_and_stays_balanced_without_a_prompt(world, tmp_path):
    pipe = _Recorder(world)
    results = evaluate(pipe, world, tmp_path / "out", count=2, images_per_condition=1, steps=1,
                       units=[EvalUnit(model="adapter", strength=0.9, end=0.5)], empty_prompt=True)  # fmt: skip
    [unit] = pipe.calls[0].units
    assert unit.adapter == 0 and unit.mode == "balanced" and (unit.strength, unit.end) == (0.9, 0.5)
    assert pipe.calls[0].prompt == ""
    settings = results["settings"]
    assert settings["empty_prompt"] and not settings["guess_mode"]  # adapters have no guess mode
    assert settings["units"] == [{"condition": "canny", "model": "adapter", "index": 0, "file": "a0.pth",
                                  "strength": 0.9, "start": 0.0, "end": 0.5, "mode": "balanced"}]  # fmt: skip
    assert "edge_f1" in results["summary"] and "prompt_adherence" not in results["summary"]


def test_the_existing_runs_keep_their_keys(world, tmp_path):
    """results.json of a run without the new options: the same keys as before, and the new ones."""
    results = evaluate(_Recorder(world / "depth"), world / "depth", tmp_path / "out", count=2, images_per_condition=1)
    assert list(results) == ["summary", "settings", "conditions", "samples"]
    assert list(results["summary"]) == [*ADHERENCE_ORDER, "depth_rmse", "depth_rmse_objects"]
    assert set(results["samples"][0]) == {"source", "prompt", *ADHERENCE, "depth_rmse", "depth_rmse_objects"}
    assert {"data", "count", "images_per_condition", "steps", "guidance_scale", "seed", "sampler", "resolution",
            "control", "annotator", "annotator_params", "model", "world_condition",
            "estimators"} < set(results["settings"])  # fmt: skip
    assert results["settings"]["units"][0] == {"condition": "depth", "model": "controlnet", "index": 0,
                                               "file": "c0.safetensors", "strength": 1.0, "start": 0.0,
                                               "end": 1.0, "mode": "balanced"}  # fmt: skip
    base = evaluate(_Recorder(world), world, tmp_path / "base", count=1, images_per_condition=1, use_control=False)
    assert base["settings"]["units"] == [] and base["settings"]["control"] is False
    truth = evaluate(None, world / "seg", tmp_path / "truth", count=1)
    assert truth["settings"]["units"] == [] and list(truth["conditions"]) == ["seg"]


# -- refusals in the Python API -------------------------------------------------------------------


@pytest.mark.parametrize(
    "units, message",
    [
        ([EvalUnit(), EvalUnit("nope", index=1)], r"the nope unit: 'nope' is not a condition of the world; choose"),
        ([EvalUnit(), EvalUnit("depth", index=1), EvalUnit("depth", index=2)], "two units read the depth maps"),
        ([EvalUnit(), EvalUnit("depth", index=1, strength=3.0)], "the depth unit: strength must be between 0 and 2"),
        ([EvalUnit(), EvalUnit("depth", index=1, start=0.8, end=0.2)], r"the depth unit: start \(0.8\) must not be"),
        ([EvalUnit(), EvalUnit("depth", index=5)], r"the depth unit: ControlNet 5 does not exist \(3 loaded\)"),
        ([EvalUnit(model="adapter", index=1)], r"the pose unit: T2I-Adapter 1 does not exist \(1 loaded\)"),
        ([EvalUnit(model="lora")], "the pose unit: model must be one of controlnet, adapter, got 'lora'"),
        ([EvalUnit("depth", index=1)], r"no unit reads the evaluated folder's own \(pose\) maps"),
        ([], "units is empty"),
    ],
)
def test_evaluate_refuses_bad_units_before_generating(world, tmp_path, units, message):
    pipe = _Recorder(world / "pose")
    with pytest.raises(ValueError, match=message):
        evaluate(pipe, world / "pose", tmp_path / "out", count=2, units=units)
    assert pipe.calls == [] and not (tmp_path / "out").exists()


def test_evaluate_refuses_compositions_it_cannot_make(world, tmp_path):
    data = tmp_path / "scenes"
    write_dataset(data, "scenes", 2, size=SIZE, seed=3)
    pipe = _Recorder(data)
    with pytest.raises(ValueError, match=r"the depth unit: .*scenes is not world data"):
        evaluate(pipe, data, tmp_path / "out", units=[EvalUnit(), EvalUnit("depth", index=1)])
    partial = tmp_path / "partial"
    shutil.copytree(world, partial)
    shutil.rmtree(partial / "depth")
    with pytest.raises(ValueError, match=r"depth: no such condition folder \(no prompt\.json\) in the world"):
        evaluate(pipe, partial / "pose", tmp_path / "out", units=[EvalUnit(), EvalUnit("depth", index=1)])
    with pytest.raises(ValueError, match="pipe=None scores the data's own images: it takes no units"):
        evaluate(None, world, tmp_path / "out", units=[EvalUnit()])
    with pytest.raises(ValueError, match="it takes no units and no empty_prompt"):
        evaluate(None, world, tmp_path / "out", empty_prompt=True)
    with pytest.raises(ValueError, match="use_control=False generates from the prompts alone: it takes no units"):
        evaluate(pipe, data, tmp_path / "out", use_control=False, units=[EvalUnit()])
    assert pipe.calls == [] and not (tmp_path / "out").exists()


# -- the command line, with tiny random models ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    """A weights folder like the world model's: a tiny base, a ControlNet per condition, a canny adapter."""
    from controlnet.formats.ldm import save_ldm
    from controlnet.models.tiny import random_tiny_models

    from .helpers import write_tiny_adapter

    folder = tmp_path_factory.mktemp("weights")
    model, _ = random_tiny_models(seed=1)
    save_ldm(folder / "tiny.safetensors", model)
    for seed, condition in enumerate(("canny", "depth", "seg", "pose", "scribble"), start=2):
        save_ldm(folder / f"tiny-{condition}.safetensors", controlnet=random_tiny_models(seed=seed)[1])
    write_tiny_adapter(folder / "tiny-canny-adapter.pth", seed=9)
    return folder


@pytest.fixture
def tiny_registry(tiny_files, monkeypatch) -> Path:
    """The shipped registry replaced by the tiny models, named as the world's are."""
    controls = [
        shipped.Control(c, f"tiny-{c}.safetensors", "controlnet", f"{c} maps", None)
        for c in ("canny", "depth", "seg", "pose", "scribble")
    ]
    controls.append(shipped.Control("canny", "tiny-canny-adapter.pth", "adapter", "Canny edges", "canny"))
    monkeypatch.setattr(shipped, "MODEL", shipped.ShippedModel("tiny (a test's)", "tiny.safetensors", tuple(controls)))
    monkeypatch.setattr(shipped, "weights_folder", lambda: tiny_files)
    return tiny_files


@pytest.fixture
def generations(monkeypatch) -> list:
    """Every Pipeline.generate call of the test, recorded, then run."""
    from controlnet.pipeline import Pipeline

    calls, original = [], Pipeline.generate

    def recorded(self, prompt, controls=(), **settings):
        calls.append(SimpleNamespace(prompt=prompt, units=list(controls), pipe=self))
        return original(self, prompt, controls, **settings)

    monkeypatch.setattr(Pipeline, "generate", recorded)
    return calls


FAST = ["--count", "2", "--images-per-condition", "1", "--steps", "1"]


def test_eval_command_composes_shipped_controlnets_with_their_strengths_and_windows(
    world, tiny_registry, generations, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["eval", "--data", str(world / "pose"), "--out", str(out), *FAST, "--also", "depth", "--also", "canny",
            "--unit-strength", "depth=0.5", "--unit-window", "depth=0.25:0.75", "--unit-strength", "pose=1.5",
            "--empty-prompt"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "depth_rmse" in capsys.readouterr().out
    assert len(generations) == 2  # once per image: the three conditions are scored on the same images
    pipe = generations[0].pipe
    assert [p.name for p in pipe.files["controlnet"]] == ["tiny-pose.safetensors", "tiny-depth.safetensors",
                                                          "tiny-canny.safetensors"]  # fmt: skip
    for i, call in enumerate(generations):
        assert call.prompt == ""
        assert [(u.controlnet, u.strength, u.start, u.end, u.mode) for u in call.units] == [
            (0, 1.5, 0.0, 1.0, "control"),
            (1, 0.5, 0.25, 0.75, "control"),
            (2, 1.0, 0.0, 1.0, "control"),
        ]
        for unit, condition in zip(call.units, ("pose", "depth", "canny"), strict=True):
            assert np.array_equal(unit.image, _map(world, condition, i))
    results = json.loads((out / "results.json").read_text())
    assert [(u["condition"], Path(u["file"]).name) for u in results["settings"]["units"]] == [
        ("pose", "tiny-pose.safetensors"),
        ("depth", "tiny-depth.safetensors"),
        ("canny", "tiny-canny.safetensors"),
    ]
    assert results["settings"]["guess_mode"] and results["settings"]["empty_prompt"]
    assert list(results["conditions"]) == ["pose", "depth", "canny"]
    assert {"depth_rmse", "edge_f1"} <= set(results["summary"]) and not ADHERENCE & set(results["summary"])


def test_eval_command_evaluates_a_shipped_adapter(world, tiny_registry, generations, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--data", str(world), "--out", str(out), *FAST, "--adapter", "canny",
                 "--unit-window", "canny=0:0.5"]) == 0, capsys.readouterr().err  # fmt: skip
    pipe = generations[0].pipe
    assert pipe.controlnets == [] and [p.name for p in pipe.files["adapter"]] == ["tiny-canny-adapter.pth"]
    assert all([(u.adapter, u.end, u.mode) for u in c.units] == [(0, 0.5, "balanced")] for c in generations)
    results = json.loads((out / "results.json").read_text())
    [unit] = results["settings"]["units"]
    assert unit["model"] == "adapter" and Path(unit["file"]).name == "tiny-canny-adapter.pth"
    assert {"edge_f1", "prompt_adherence"} <= set(results["summary"]) and generations[0].prompt != ""


def test_eval_command_with_an_adapter_and_an_empty_prompt_is_not_guess_mode(world, tiny_registry, generations,
                                                                               tmp_path, capsys):  # fmt: skip
    out = tmp_path / "out"
    assert main(["eval", "--data", str(world), "--out", str(out), *FAST, "--adapter", "canny", "--also", "seg",
                 "--empty-prompt"]) == 0, capsys.readouterr().err  # fmt: skip
    [(adapter, controlnet)] = {tuple((u.adapter, u.mode) for u in c.units) for c in generations}
    assert adapter == (0, "balanced") and controlnet == (None, "control")
    assert generations[0].units[1].controlnet == 0  # the seg ControlNet: the only one loaded
    assert [p.name for p in generations[0].pipe.files["controlnet"]] == ["tiny-seg.safetensors"]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["guess_mode"] and [u["mode"] for u in results["settings"]["units"]] == [
        "balanced",
        "control",
    ]


@pytest.mark.parametrize(
    "options, status, message",
    [
        (
            ["--adapter", "canny", "--controlnet", "canny"],
            2,
            "--adapter evaluates a T2I-Adapter in place of a ControlNet; it contradicts --controlnet",
        ),
        (
            ["--adapter", "canny", "--no-control"],
            2,
            "--adapter evaluates a T2I-Adapter in place of a ControlNet; it contradicts --no-control",
        ),
        (["--adapter", "nope"], 2, "--adapter nope: no such file or folder, nor a shipped T2I-Adapter name"),
        (["--ground-truth", "--adapter", "canny"], 2, "it takes no --base, --controlnet, --adapter or --no-control"),
        (["--ground-truth", "--empty-prompt"], 2, "it generates nothing to take --empty-prompt"),
        (["--ground-truth", "--also", "depth"], 2, "it generates nothing to take --also"),
        (["--no-control", "--also", "depth"], 2, "--no-control evaluates the base alone; it contradicts --also"),
        (["--no-control", "--unit-strength", "pose=1"], 2, "it contradicts --unit-strength"),
        (["--also", "nope"], 2, "--also nope: 'nope' is not a condition of the world; choose among canny, depth"),
        (["--also", "pose"], 2, "--also pose: pose is the evaluated folder's own condition"),
        (["--also", "depth", "--also", "depth"], 2, "--also depth: given twice"),
        (["--also", "normal"], 2, "--also normal: no shipped ControlNet is called 'normal'"),
        (["--base", "{world}/prompt.json", "--also", "depth"], 2, "no ControlNet to evaluate: pass --controlnet"),
        (
            ["--unit-strength", "depth=0.5"],
            2,
            "--unit-strength depth=0.5: no unit reads depth maps here (the units read pose)",
        ),
        (["--unit-strength", "pose"], 2, "bad --unit-strength 'pose'; use COND=S"),
        (["--unit-strength", "pose=strong"], 2, "--unit-strength pose: 'strong' is not a number"),
        (["--unit-strength", "pose=3"], 2, "--unit-strength pose: strength must be between 0 and 2, got 3.0"),
        (["--unit-strength", "pose=nan"], 2, "--unit-strength pose: strength must be a number, got nan"),
        (["--unit-strength", "pose=1", "--unit-strength", "pose=0.5"], 2, "--unit-strength pose: given twice"),
        (["--unit-window", "pose=0.5"], 2, "--unit-window pose: '0.5' is not START:END"),
        (["--unit-window", "pose=0.8:0.2"], 2, "--unit-window pose: start (0.8) must not be after end (0.2)"),
        (["--unit-window", "pose=0:1.5"], 2, "--unit-window pose: end must be between 0 and 1, got 1.5"),
        (
            ["--also", "depth", "--unit-window", "seg=0:1"],
            2,
            "no unit reads seg maps here (the units read pose, depth)",
        ),
    ],
)
def test_eval_command_refuses_in_one_line(world, tiny_registry, tmp_path, capsys, monkeypatch, options, status,
                                          message):  # fmt: skip
    from controlnet.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "from_files", pytest.fail)  # every mistake is found before a model loads
    options = [o.replace("{world}", str(world)) for o in options]
    assert main(["eval", "--data", str(world / "pose"), "--out", str(tmp_path / "out"), *options]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_eval_command_refuses_compositions_without_their_data_in_one_line(world, tiny_registry, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    write_dataset(scenes, "scenes", 2, size=SIZE, seed=3)
    partial = tmp_path / "partial"
    shutil.copytree(world, partial)
    shutil.rmtree(partial / "seg")
    cases = [
        (scenes, "--also depth: ", "is not world data ('controlnet data world'): no other condition of its scenes"),
        (partial / "pose", "--also seg: ", "seg: no such condition folder (no prompt.json) in the world"),
    ]
    for data, start, message in cases:
        option = start.split(":")[0].split()
        assert main(["eval", "--data", str(data), "--out", str(tmp_path / "out"), *option]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and start in err and message in err, err

"""scripts/train_world_model.sh end to end at toy scale (SMOKE=1): data, VAE, base, a ControlNet per
condition and the canny T2I-Adapter with the project's own commands, each stage's float16 file
loadable, and a second run skipping every finished stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from controlnet.loading import load_adapter, load_base, load_controlnet

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("canny", "depth", "seg", "pose", "scribble")


def test_the_world_recipe_runs_every_stage_and_skips_the_finished_ones(tmp_path):
    controlnet = Path(sys.executable).with_name("controlnet")
    env = {**os.environ, "SMOKE": "1", "WORK": str(tmp_path), "CONTROLNET": str(controlnet)}
    script = ROOT / "scripts" / "train_world_model.sh"
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    ship = tmp_path / "ship"  # a smoke run never writes into the package or training/
    expected = ["world.safetensors", "world-canny-adapter.safetensors"] + [f"world-{c}.safetensors" for c in CONDITIONS]
    assert sorted(p.name for p in ship.iterdir()) == sorted(expected)
    base = load_base(ship / "world.safetensors")
    assert base.config.name == "world" and base.config.vae.z_channels == 8
    with safe_open(ship / "world.safetensors", "pt") as weights:  # shipped as float16
        names = weights.keys()  # a safe_open handle is not iterable
        assert {weights.get_slice(k).get_dtype() for k in names} == {"F16", "I64"}  # I64: the position ids
    for condition in CONDITIONS:
        load_controlnet(ship / f"world-{condition}.safetensors", base.config)
    load_adapter(ship / "world-canny-adapter.safetensors", base.config)
    assert (tmp_path / "held-out" / "seg" / "prompt.json").exists()
    load_controlnet(tmp_path / "experiment" / "world-canny-gaussian.safetensors", base.config)
    settings = json.loads((tmp_path / "controlnet-canny-gaussian" / "config.json").read_text())
    assert settings["control_init"] == "gaussian" and settings["keep_checkpoints"] == 100  # the ablation's run
    assert len(list((tmp_path / "controlnet-canny" / "checkpoints").glob("step-*"))) >= 1
    # The experiment's scoring runs on both runs: the zero run's initial images are the base's own.
    experiment = [
        sys.executable,
        str(ROOT / "scripts" / "zero_conv_experiment.py"),
        "--data",
        str(tmp_path / "held-out"),
    ]
    experiment += [
        "--zero",
        str(tmp_path / "controlnet-canny"),
        "--gaussian",
        str(tmp_path / "controlnet-canny-gaussian"),
    ]
    experiment += ["--count", "2", "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "figures")]
    scored = subprocess.run(experiment, capture_output=True, text=True, timeout=900)
    assert scored.returncode == 0, scored.stderr[-2000:]
    runs = json.loads((tmp_path / "figures" / "summary.json").read_text())["runs"]
    assert [step for step, _, _ in runs["zero"]["f1_prompt"]] == [0, 2]
    assert runs["zero"]["distance_prompt"][0][1] == 0.0 < runs["gaussian"]["distance_prompt"][0][1]
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("done already") == 2 + len(CONDITIONS) + 2

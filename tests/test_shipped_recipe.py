"""scripts/train_shipped_model.sh end to end at toy scale (SMOKE=1): data, VAE, base, ControlNet and
both evaluations run with the project's own commands, and a second run skips the finished stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_model_recipe_runs_end_to_end_and_resumes(tmp_path):
    controlnet = Path(sys.executable).with_name("controlnet")
    env = {**os.environ, "SMOKE": "1", "WORK": str(tmp_path), "CONTROLNET": str(controlnet)}
    script = ROOT / "scripts" / "train_shipped_model.sh"
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    for path in ("vae/vae.safetensors", "base/base.safetensors", "controlnet/controlnet.safetensors"):
        assert (tmp_path / path).exists()
    for name in ("eval-control", "eval-base"):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["settings"]["control"] == (name == "eval-control") and "scene_score" in results["summary"]
    shipped = sorted(p.name for p in (tmp_path / "ship").iterdir())  # a smoke run never touches the package's
    assert shipped == ["shapes-canny.safetensors", "shapes.safetensors"]
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 3

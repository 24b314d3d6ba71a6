"""The zero-convolution experiment of docs/experiments.md, scored with error bars: two ControlNet
training runs on the same base, one with the paper's zero convolutions and one with them drawn from
a Gaussian (its ablation), each scored at its initialisation and at every kept checkpoint on many
held-out scenes with several seeds.

For every (run, step): Canny edge F1 of the generated images against their control, with the
prompt and with an empty prompt, and the distance of the images from those the frozen base makes
from the same prompts and seeds without any ControlNet (mean |difference| / 255; 0 = untouched).
Each scene's score is the mean over its seeds; the figures show the mean over scenes with a 95%
interval (1.96 standard errors over scenes). Scores are kept in OUT/scores.json as they are made, so
an interrupted run goes on where it stopped. Writes f1_prompt.png, f1_empty_prompt.png,
base_distance.png and summary.json to OUT.

    .venv/bin/python scripts/zero_conv_experiment.py --zero ~/.cache/controlnet-world/controlnet-canny \\
        --gaussian ~/.cache/controlnet-world/controlnet-canny-gaussian \\
        --data ~/.cache/controlnet-world/held-out --count 50 --seeds 3 --out docs/experiments/world
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import torch

from controlnet.datasets.folders import read_records
from controlnet.evaluation import edge_f1
from controlnet.imaging.charts import line_chart
from controlnet.imaging.images import load_image
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.train.config import STATE_FILE, TrainConfig
from controlnet.train.objectives import build_objective

MODES = {"prompt": True, "empty_prompt": False}  # score name -> whether the scene's prompt is used
PREFIX = "controlnet."  # the controlnet task's name for the ControlNet's parameters in a checkpoint


def run_steps(run: Path) -> list[int]:
    """0 (the initialisation) and the step of every checkpoint the run kept."""
    steps = sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))
    return [0, *steps]


def controlnet_at(objective, run: Path, step: int):
    """The run's ControlNet at ``step`` (0: as its objective builds it, from the run's own seed)."""
    controlnet = copy.deepcopy(objective.controlnet)
    if step:
        state = torch.load(run / "checkpoints" / f"step-{step:08d}" / STATE_FILE, map_location="cpu", weights_only=True)
        weights = {k.removeprefix(PREFIX): v for k, v in state["trainable"].items() if k.startswith(PREFIX)}
        controlnet.load_state_dict(weights)
    return controlnet.eval()


def generate(pipe: Pipeline, records, seeds: int, steps: int, use_control: bool) -> dict[str, list[np.ndarray]]:
    """{mode: one [seeds, H, W, 3] uint8 array per scene}: images seed 0 .. seeds - 1 of every scene."""
    images = {}
    for mode, with_prompt in MODES.items():
        images[mode] = []
        for record in records:
            units = [ControlUnit(load_image(record.source))] if use_control else []
            prompt = record.prompt if with_prompt else ""
            result = pipe.generate(prompt, units, num_images=seeds, seed=0, steps=steps, guidance_scale=7.5)
            images[mode].append(np.stack(result.images))
    return images


def score(images, base_images, records) -> dict[str, list[float]]:
    """Per-scene scores (each the mean over the scene's seeds)."""
    scores = {}
    for mode in MODES:
        conditions = [load_image(record.source) for record in records]
        scores[f"f1_{mode}"] = [
            float(np.mean([edge_f1(image, condition).f1 for image in scene]))
            for scene, condition in zip(images[mode], conditions, strict=True)
        ]
        scores[f"distance_{mode}"] = [
            float(np.abs(scene.astype(np.float32) - base.astype(np.float32)).mean() / 255)
            for scene, base in zip(images[mode], base_images[mode], strict=True)
        ]
    return scores


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval over scenes)."""
    mean = float(np.mean(values))
    half = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, half


def figures(scores: dict, out: Path) -> dict:
    """The three figures and the summary: each run's mean and interval of every score by step."""
    runs = sorted({key.split("/")[0] for key in scores})
    summary = {
        run: {
            metric: [
                [step, *interval(scores[f"{run}/{step}"][metric])]
                for step in sorted(int(k.split("/")[1]) for k in scores if k.startswith(f"{run}/"))
            ]
            for metric in next(iter(scores.values()))
        }
        for run in runs
    }
    charts = {
        "f1_prompt": ("Canny edge F1, with the prompt (mean over scenes, 95% interval)", "edge F1", "f1_prompt"),
        "f1_empty_prompt": (
            "Canny edge F1, empty prompt (mean over scenes, 95% interval)",
            "edge F1",
            "f1_empty_prompt",
        ),
        "base_distance": (
            "distance from the frozen base's images, with the prompt (mean |difference| / 255)",
            "distance",
            "distance_prompt",
        ),
    }
    for name, (title, y_label, metric) in charts.items():
        series = {run: [(s, m) for s, m, _ in summary[run][metric]] for run in runs}
        errors = {run: [h for _, _, h in summary[run][metric]] for run in runs}
        line_chart(out / f"{name}.png", series, title, "training step", y_label, errors=errors)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=Path, required=True, help="the run with zero convolutions")
    parser.add_argument("--gaussian", type=Path, required=True, help="the run with Gaussian-initialised ones")
    parser.add_argument("--data", type=Path, required=True, help="held-out scenes (their Canny edges)")
    parser.add_argument("--count", type=int, default=50, help="scenes")
    parser.add_argument("--seeds", type=int, default=3, help="images per scene (seeds 0, 1, ...)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = read_records(args.data)[: args.count]
    saved = args.out / "scores.json"
    scores = json.loads(saved.read_text()) if saved.exists() else {}

    base_images = None
    for name, run in (("zero", args.zero), ("gaussian", args.gaussian)):
        objective = build_objective(TrainConfig(**json.loads((run / "config.json").read_text())))
        model = objective.model
        if base_images is None:
            base_images = generate(Pipeline(model), records, args.seeds, args.steps, use_control=False)
        for step in run_steps(run):
            key = f"{name}/{step}"
            if key in scores:
                continue
            pipe = Pipeline(model, controlnets=[controlnet_at(objective, run, step)])
            scores[key] = score(generate(pipe, records, args.seeds, args.steps, True), base_images, records)
            saved.write_text(json.dumps(scores) + "\n")
            print(key, {k: round(interval(v)[0], 4) for k, v in scores[key].items()}, flush=True)
    summary = figures(scores, args.out)
    settings = {"scenes": len(records), "seeds": args.seeds, "steps": args.steps, "data": str(args.data)}
    (args.out / "summary.json").write_text(json.dumps({"settings": settings, "runs": summary}, indent=2) + "\n")
    print(f"figures and summary.json: {args.out}")


if __name__ == "__main__":
    main()

"""The world model's scores (docs/model-card.md, docs/experiments.md): every shipped control with and
without its model, with an empty prompt, the T2I-Adapter beside the canny ControlNet, and the two
compositions against their conditions alone, all by `controlnet eval` on the same held-out scenes
with the same seeds (issue 19, points 4, 5 and 6).

Each run's results.json (and its grid.png, the first 8 scenes) goes to --out/<run>/; a run whose
results.json exists is not run again, so the script resumes after an interruption. At the end it
writes --out/scores.json (each run's summary and settings) and --out/scores.md (the tables the model
card shows), and prints the tables.

    .venv/bin/python scripts/world_scores.py --data ~/.cache/controlnet-world/held-out \\
        --out docs/experiments/world/scores --count 50

The shipped model must be the world model (shipped.MODEL), or --base and the files by name are its.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLNET = str(Path(sys.executable).with_name("controlnet"))
# The compositions of docs/experiments.md (and the demo's examples): the data's unit first.
POSE_DEPTH = ("--also", "depth", "--unit-strength", "depth=0.8", "--unit-window", "depth=0:0.6")
CANNY_SEG = ("--also", "seg", "--unit-strength", "canny=0.7", "--unit-strength", "seg=0.7")


@dataclass(frozen=True)
class Run:
    name: str
    condition: str  # the data's: canny is the world folder itself, the others its subfolders
    args: tuple[str, ...]
    label: str  # how the tables name it


RUNS = (
    Run("canny", "canny", ("--controlnet", "canny"), "canny ControlNet"),
    Run("canny-base", "canny", ("--no-control",), "base alone (prompt only)"),
    Run("canny-empty", "canny", ("--controlnet", "canny", "--empty-prompt"), "canny ControlNet, empty prompt"),
    Run("canny-adapter", "canny", ("--adapter", "canny"), "canny T2I-Adapter"),
    Run("canny-adapter-empty", "canny", ("--adapter", "canny", "--empty-prompt"), "canny T2I-Adapter, empty prompt"),
    Run("depth", "depth", ("--controlnet", "depth"), "depth ControlNet"),
    Run("depth-base", "depth", ("--no-control",), "base alone (prompt only)"),
    Run("depth-empty", "depth", ("--controlnet", "depth", "--empty-prompt"), "depth ControlNet, empty prompt"),
    Run("seg", "seg", ("--controlnet", "seg"), "seg ControlNet"),
    Run("seg-base", "seg", ("--no-control",), "base alone (prompt only)"),
    Run("seg-empty", "seg", ("--controlnet", "seg", "--empty-prompt"), "seg ControlNet, empty prompt"),
    Run("pose", "pose", ("--controlnet", "pose"), "pose ControlNet"),
    Run("pose-base", "pose", ("--no-control",), "base alone (prompt only)"),
    Run("pose-empty", "pose", ("--controlnet", "pose", "--empty-prompt"), "pose ControlNet, empty prompt"),
    Run("scribble", "scribble", ("--controlnet", "scribble"), "scribble ControlNet"),
    Run("scribble-base", "scribble", ("--no-control",), "base alone (prompt only)"),
    Run("pose-depth", "pose", ("--controlnet", "pose", *POSE_DEPTH), "pose + depth 0.8 until 60%"),
    Run(
        "pose-depth-empty",
        "pose",
        ("--controlnet", "pose", *POSE_DEPTH, "--empty-prompt"),
        "pose + depth, empty prompt",
    ),
    Run("canny-seg", "canny", ("--controlnet", "canny", *CANNY_SEG), "canny 0.7 + seg 0.7"),
    Run(
        "canny-seg-empty", "canny", ("--controlnet", "canny", *CANNY_SEG, "--empty-prompt"), "canny + seg, empty prompt"
    ),
)
# Each condition's own measure (world_evaluation.py), then prompt adherence.
MEASURES = {
    "canny": ("edge_f1", "edge_ssim"),
    "depth": ("depth_rmse", "depth_rmse_objects"),
    "seg": ("seg_miou", "seg_accuracy"),
    "pose": ("pose_score", "pose_limbs"),
    "scribble": (),
}
ADHERENCE = ("prompt_adherence", "objects_right", "background_right", "floor_right")
TABLES = {  # title -> (runs, columns)
    "Each control alone": (
        (
            "canny",
            "canny-base",
            "canny-empty",
            "depth",
            "depth-base",
            "depth-empty",
            "seg",
            "seg-base",
            "seg-empty",
            "pose",
            "pose-base",
            "pose-empty",
            "scribble",
            "scribble-base",
        ),
        ("edge_f1", "depth_rmse", "depth_rmse_objects", "seg_miou", "pose_score", *ADHERENCE),
    ),
    "The T2I-Adapter beside the ControlNet (canny)": (
        ("canny", "canny-adapter", "canny-empty", "canny-adapter-empty", "canny-base"),
        ("edge_f1", "edge_ssim", *ADHERENCE),
    ),
    "Compositions against each condition alone": (
        ("pose", "depth", "pose-depth", "pose-depth-empty", "canny", "seg", "canny-seg", "canny-seg-empty"),
        ("edge_f1", "depth_rmse", "depth_rmse_objects", "seg_miou", "pose_score", *ADHERENCE),
    ),
}


def run_eval(run: Run, args: argparse.Namespace) -> dict:
    out = args.out / run.name
    results = out / "results.json"
    if not results.is_file():
        data = args.data if run.condition == "canny" else args.data / run.condition
        command = [CONTROLNET, "eval", "--data", str(data), "--out", str(out), "--count", str(args.count),
                   "--images-per-condition", str(args.images), "--steps", "20", "--seed", "0", *run.args]  # fmt: skip
        if args.base:
            command += ["--base", str(args.base)]
        started = time.perf_counter()
        print(f"{run.name}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        print(f"{run.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(results.read_text())


def table(title: str, runs: tuple[str, ...], columns: tuple[str, ...], results: dict[str, dict]) -> str:
    """One Markdown table: a row per run, a column per score; a blank where the run has no such score
    (the depth RMSE of the canny run, adherence under an empty prompt)."""
    wanted = [c for c in columns if any(c in results[r]["summary"] for r in runs)]
    lines = [f"**{title}**", "", "| run | " + " | ".join(wanted) + " |", "|---" * (len(wanted) + 1) + "|"]
    by_name = {run.name: run for run in RUNS}
    for name in runs:
        summary = results[name]["summary"]
        cells = [f"{summary[c]:.3f}" if c in summary else "" for c in wanted]
        lines.append(f"| {by_name[name].label} (`{name}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the held-out world (controlnet data world --seed 1)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=50, help="held-out scenes (default 50)")
    parser.add_argument("--images", type=int, default=4, help="images per scene, seeds 0.. (default 4)")
    parser.add_argument("--base", type=Path, help="the base model (default: the shipped one)")
    parser.add_argument("--only", nargs="*", help="these runs alone (no tables)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [run for run in RUNS if not args.only or run.name in args.only]
    results = {run.name: run_eval(run, args) for run in chosen}
    if args.only:
        return
    keep = {name: {"summary": r["summary"], "settings": r["settings"]} for name, r in results.items()}
    (args.out / "scores.json").write_text(json.dumps(keep, indent=2) + "\n")
    setting = (
        f"{args.count} held-out scenes x {args.images} images (seeds 0-{args.images - 1}), 20 DDIM steps, guidance 7.5"
    )
    text = "\n".join(table(title, runs, columns, results) for title, (runs, columns) in TABLES.items())
    (args.out / "scores.md").write_text(f"{setting}\n\n{text}")
    print(f"{setting}\n\n{text}")


if __name__ == "__main__":
    main()

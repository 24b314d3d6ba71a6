"""The figures and numbers of docs/experiments.md from two ControlNet training runs: one with zero
convolutions (the paper) and one with them initialised from a Gaussian (its ablation).

Reads each run's metrics.csv (training loss), validation.csv (edge F1 with and without the prompt,
distance of the images from the frozen base's) and validation/step-N.png grids, all written by
`controlnet train`. Writes loss.png, controllability.png, base_distance.png, samples-zero.png,
samples-gaussian.png and summary.json to --out. Run by `scripts/train_shipped_model.sh experiment`;
by hand:

    .venv/bin/python scripts/experiment_figures.py --zero RUN --gaussian RUN --out docs/experiments
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

from PIL import Image

from controlnet.imaging.charts import grid_cell, image_grid, line_chart
from controlnet.train.config import VALIDATION_ROWS

SAMPLE_COLUMNS = 4  # validation scenes shown in the sample grids


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        sys.exit(f"experiment_figures: {path} is missing: is this a finished `controlnet train` run?")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def series(rows: list[dict[str, str]], column: str) -> list[tuple[float, float]]:
    return [(float(row["step"]), float(row[column])) for row in rows if row.get(column)]


def smoothed(points: list[tuple[float, float]], window: int = 5) -> list[tuple[float, float]]:
    """A centred moving average: the per-50-step loss means are still noisy (random timesteps)."""
    out = []
    for i, (step, _) in enumerate(points):
        part = points[max(0, i - window // 2) : i + window // 2 + 1]
        out.append((step, sum(y for _, y in part) / len(part)))
    return out


def convergence(f1: list[tuple[float, float]]) -> dict[str, float | None]:
    """Where edge F1 rose: the first step at which half of the run's total gain is reached, and the
    largest rise between two consecutive validations (a sudden convergence shows as one big jump)."""
    start, best = f1[0][1], max(y for _, y in f1)
    half = next((step for step, y in f1 if y - start >= 0.5 * (best - start)), None) if best > start else None
    jumps = [(b[1] - a[1], a[0], b[0]) for a, b in itertools.pairwise(f1)]
    rise, after, before = max(jumps) if jumps else (0.0, None, None)
    return {
        "f1_start": start,
        "f1_final": f1[-1][1],
        "f1_best": best,
        "half_gain_step": half,
        "largest_rise": rise,
        "largest_rise_between": [after, before],
    }


def sample_grid(run: Path, steps: list[int], cell: int) -> Image.Image:
    """Rows: the control images, then the images generated with their prompts at each step."""
    first = Image.open(run / "validation" / f"step-{steps[0]:08d}.png")
    rows = [[grid_cell(first, 0, c, (cell, cell), VALIDATION_ROWS) for c in range(SAMPLE_COLUMNS)]]
    labels = ["control"]
    for step in steps:
        grid = Image.open(run / "validation" / f"step-{step:08d}.png")
        rows.append([grid_cell(grid, 2, c, (cell, cell), VALIDATION_ROWS) for c in range(SAMPLE_COLUMNS)])
        labels.append(f"step {step}")
    return image_grid(rows, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=Path, required=True, help="the run with zero convolutions")
    parser.add_argument("--gaussian", type=Path, required=True, help="the run with Gaussian-initialised ones")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cell", type=int, default=128, help="the validation image size")
    parser.add_argument("--sample-steps", default="0,100,200,300,500,1000,2000", help="steps shown in the grids")
    args = parser.parse_args()
    runs = {"zero convolutions": args.zero, "Gaussian init": args.gaussian}
    args.out.mkdir(parents=True, exist_ok=True)

    metrics = {name: read_csv(run / "metrics.csv") for name, run in runs.items()}
    validation = {name: read_csv(run / "validation.csv") for name, run in runs.items()}
    line_chart(
        args.out / "loss.png",
        {name: smoothed(series(rows, "loss")) for name, rows in metrics.items()},
        "training loss (noise MSE, moving average of 5 x 50 steps)",
        "step",
        "loss",
    )
    curves = {}
    for name, rows in validation.items():
        curves[f"{name}, prompt"] = series(rows, "edge_f1")
        curves[f"{name}, empty prompt"] = series(rows, "edge_f1_no_prompt")
    line_chart(args.out / "controllability.png", curves, "Canny edge F1 of validation images", "step", "edge F1")
    line_chart(
        args.out / "base_distance.png",
        {name: series(rows, "base_distance") for name, rows in validation.items()},
        "distance of the images (with control) from the frozen base's (mean |difference| / 255)",
        "step",
        "distance",
    )

    summary = {}
    for key, (name, run) in zip(("zero", "gaussian"), runs.items(), strict=True):
        rows = validation[name]
        available = {int(row["step"]) for row in rows}
        wanted = [int(step) for step in args.sample_steps.split(",") if int(step) in available]
        sample_grid(run, wanted, args.cell).save(args.out / f"samples-{key}.png")
        losses = series(metrics[name], "loss")
        summary[key] = {
            **convergence(series(rows, "edge_f1")),
            "f1_no_prompt_final": float(rows[-1]["edge_f1_no_prompt"]),
            "base_distance_step0": float(rows[0]["base_distance"]),
            "base_distance_final": float(rows[-1]["base_distance"]),
            "loss_first_50": losses[0][1],
            "loss_last_250": sum(y for _, y in losses[-5:]) / len(losses[-5:]),
            "steps": int(rows[-1]["step"]),
        }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()

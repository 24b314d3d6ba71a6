"""The ceiling of every world score: `controlnet eval --ground-truth` on each condition of a held-out
world, that is the scores of the data's own images (what a model that drew the data exactly would
get; the estimators' own errors included). Prints a Markdown table (docs/model-card.md has it) and
writes each condition's results.json under --out.

    .venv/bin/python scripts/world_eval_ceiling.py --data ~/.cache/controlnet-world/held-out --out eval-ceiling

The held-out world: `controlnet data world --out DIR --count 300 --seed 1` (with its instance maps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controlnet.evaluation import evaluate

CONDITIONS = ("canny", "depth", "seg", "pose")
COLUMNS = ("edge_f1", "depth_rmse", "depth_rmse_objects", "seg_miou", "seg_accuracy", "pose_score", "pose_limbs",
           "pose_precision", "prompt_adherence", "objects_right", "background_right", "floor_right")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a held-out world folder (controlnet data world)")
    parser.add_argument("--out", type=Path, required=True, help="folder for each condition's results")
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    rows = []
    for condition in CONDITIONS:
        data = args.data if condition == "canny" else args.data / condition
        summary = evaluate(None, data, args.out / condition, count=args.count)["summary"]
        rows.append([condition, *(f"{summary[c]:.3f}" if c in summary else "" for c in COLUMNS)])
    print(f"ground truth, {args.count} held-out samples of {args.data}")
    print("| condition | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

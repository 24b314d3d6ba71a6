"""The figure of docs/training.md's synthetic world: for a few samples of `controlnet data world`,
the image, then its exact canny, depth, normal, seg, pose and scribble maps, with the caption
printed. Run from the repository root:

    .venv/bin/python scripts/world_figure.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from controlnet.datasets.world import CONDITIONS, world_sample

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "world.png"
INDICES = (0, 3, 7, 11)  # a seed-0 selection with solids, flat shapes and figures


def main() -> None:
    rows = []
    for index in INDICES:
        sample = world_sample(index, size=128, seed=0)
        print(f"{index}: {sample.prompt}")
        rows.append(np.concatenate([sample.image, *(sample.conditions[c] for c in CONDITIONS)], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""The pictures of docs/annotators.md: every annotator's map of the same real photograph.

The photograph is scikit-image's astronaut (Eileen Collins, NASA: public domain), 256 x 256. The
weight-free annotators run on it as they are; `depth_from_file` and `seg_from_labels` take a depth
map and a label image instead, drawn here (a tilted floor with a ball; a street scene of ADE20k
classes), and `openpose_json` draws docs/examples/pose.json. A network annotator is drawn only when
its weight files are in the annotators folder (random weights would draw nothing meaningful): run
this with the real files to add their pictures. Run from the repository root (dev extra installed):

    .venv/bin/python scripts/annotator_gallery.py [--annotators-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from controlnet.annotators import ANNOTATORS, Runtime, annotate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images" / "annotators"
POSE = ROOT / "docs" / "examples" / "pose.json"
SIZE = 256
PARAMS = {"tile": {"down_sampling_rate": 4.0}}  # its default (1) keeps a 256 px photo as it is


def photograph() -> np.ndarray:
    from skimage import data

    return cv2.resize(data.astronaut(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def depth_picture() -> np.ndarray:
    """A floor receding to the horizon with a ball on it: near is bright, as the depth models take it."""
    rows = np.linspace(0.0, 1.0, SIZE)[:, None].repeat(SIZE, axis=1)
    depth = np.where(rows > 0.35, (rows - 0.35) / 0.65, 0.0)  # the floor comes nearer downwards; sky far
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ball = (xx - 150) ** 2 + (yy - 170) ** 2 < 50**2
    bulge = np.sqrt(np.clip(1 - ((xx - 150) ** 2 + (yy - 170) ** 2) / 50**2, 0, 1))
    depth = np.where(ball, 0.55 + 0.35 * bulge, depth)
    return np.round(depth * 200).astype(np.uint8)  # a map that does not span 0-255: the annotator stretches it


def label_picture() -> np.ndarray:
    """A street of ADE20k classes (0-149: 1 building, 2 sky, 4 tree, 6 road, 9 grass, 12 person, 20 car)."""
    labels = np.full((SIZE, SIZE), 2, np.uint8)
    labels[60:170, 20:120] = 1
    labels[170:, :] = 9
    labels[190:, 60:200] = 6
    cv2.circle(labels, (190, 110), 45, 4, -1)
    labels[150:170, 185:195] = 4
    cv2.rectangle(labels, (80, 200), (170, 235), 20, -1)
    cv2.ellipse(labels, (215, 185), (10, 30), 0, 0, 360, 12, -1)
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators-dir", type=Path, help="folder of the annotators' weight files")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.default(args.annotators_dir, "cpu", "float32")
    photo = photograph()
    inputs = {"depth_from_file": depth_picture(), "seg_from_labels": label_picture()}
    Image.fromarray(photo).save(OUT / "photo.png")
    Image.fromarray(inputs["depth_from_file"]).save(OUT / "depth_from_file-input.png")
    # the label values (0-20) are shown 12 times brighter, or the picture would look black
    Image.fromarray(inputs["seg_from_labels"] * 12).save(OUT / "seg_from_labels-input.png")
    for name, annotator in ANNOTATORS.items():
        if annotator.inputs or name == "none":
            continue  # inpaint and image_to_mask need a mask; none is the photo itself
        missing = ", ".join(w.name for w in annotator.missing(runtime.folder))
        if missing:
            print(f"{name}: skipped, {missing} not in {runtime.folder}")
            continue
        if annotator.from_file is not None:
            result = annotator.from_file(POSE, SIZE * 4 // 5, SIZE)
        else:
            result = annotate(name, inputs.get(name, photo), SIZE, runtime=runtime, **PARAMS.get(name, {}))
        Image.fromarray(result.image).save(OUT / f"{name}.png", optimize=True)
        print(f"{name}: {OUT / f'{name}.png'}")


if __name__ == "__main__":
    main()

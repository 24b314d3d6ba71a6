"""Poses as the ControlNet 1.1 pose annotators keep them: the people on one canvas, each with an
OpenPose body (18 keypoints, COCO order), two hands (21 each) and a face (70), every keypoint
normalised to the canvas (x / width, y / height), as the original renderer is given them.

Keypoint order (OpenPose COCO-18): 0 nose, 1 neck, 2 right shoulder, 3 right elbow, 4 right wrist,
5 left shoulder, 6 left elbow, 7 left wrist, 8 right hip, 9 right knee, 10 right ankle, 11 left hip,
12 left knee, 13 left ankle, 14 right eye, 15 left eye, 16 right ear, 17 left ear. Hands: 0 wrist,
then 4 points per finger from the thumb. docs/annotators.md has the JSON format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BODY_POINTS = 18
HAND_POINTS = 21
FACE_POINTS = 70


@dataclass
class Person:
    """One person. Each part is an (N, 3) float64 array of x, y (normalised to the canvas) and a
    confidence, a row of NaN where that keypoint was not found; a part not detected at all is None."""

    body: np.ndarray | None = None  # (18, 3)
    left_hand: np.ndarray | None = None  # (21, 3)
    right_hand: np.ndarray | None = None  # (21, 3)
    face: np.ndarray | None = None  # (70, 3)


@dataclass
class Poses:
    """Everyone on a canvas of `width` x `height` pixels."""

    width: int
    height: int
    people: list[Person] = field(default_factory=list)

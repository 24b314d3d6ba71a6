"""Drawing poses as the ControlNet 1.1 pose models saw them: the canvas an openpose annotator
returns, and what an OpenPose JSON file renders to.

The convention is the one of ControlNet-v1-1-nightly annotator/openpose/util.py (draw_bodypose,
draw_handpose, draw_facepose) in the per-person order of its successors, the AUTOMATIC1111
extension's annotator/openpose/__init__.py draw_poses and controlnet_aux open_pose: for each
person its body, then its left and right hand, then its face, on a black canvas.

- Body: 17 limbs, each a filled ellipse polygon (centre the limb's midpoint, half-axes half its
  length and the stick width 4, turned by its angle) in 60 % of its colour; then each keypoint a
  filled circle of radius 4 in its full colour. Limb i and keypoint i share colour i of 18.
- Hand: 20 edges as 2-pixel lines coloured round the hue circle, then each point a filled circle
  of radius 4 in (0, 0, 255); a point whose pixel column or row is 0 (or less) is left out, as the
  original tests `> 0.01` on the integer pixel.
- Face: each point a white filled circle of radius 3, with the same test.

Pixel positions truncate `x * width` toward zero, as the original's `int()` does. The nightly
drew the limbs of all people first, dimmed the whole canvas once, then all joints; with people
that do not overlap the two orders give the same pixels.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from .keypoints import BODY_POINTS, FACE_POINTS, HAND_POINTS, Person, Poses

STICK_WIDTH = 4
JOINT_RADIUS = 4
HAND_JOINT_RADIUS = 4
FACE_RADIUS = 3
LIMB_DIM = 0.6  # the limbs are drawn at 60 % of their colour (the nightly multiplied the canvas)
MAX_SIDE = 8192  # the largest canvas side drawn
MAX_OFFSET = 1000.0  # how far (in canvas widths and heights) a keypoint may lie off the canvas

# Keypoint pairs of the 17 drawn limbs, 0-based (the original lists them 1-based, with two more,
# shoulder to ear, that it never draws).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# RGB; limb i and keypoint i take colour i.
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# Hand: the wrist (0) to each finger's first joint, then along the finger, thumb first.
HAND_EDGES = tuple((0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4))
# Edge i is coloured at hue i / 20, full saturation and value, scaled to 0-255 (floats: OpenCV
# rounds them, as it did the original's matplotlib colours, which are computed the same way).
HAND_COLORS = tuple(tuple(255 * c for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)) for i in range(20))
HAND_JOINT_COLOR = (0, 0, 255)
FACE_COLOR = (255, 255, 255)


def draw_poses(poses: Poses, *, body: bool = True, hands: bool = False, face: bool = False) -> np.ndarray:
    """The uint8 (height, width, 3) RGB pose map of `poses` on a black canvas of its size, with the
    chosen parts (the openpose annotator draws the body; openpose_full all three)."""
    _check_size(poses.width, poses.height)
    canvas = np.zeros((poses.height, poses.width, 3), np.uint8)
    for person in poses.people:
        if not isinstance(person, Person):
            raise ValueError(f"poses.people must hold Person objects, got {type(person).__name__}")
        if body and person.body is not None:
            draw_body(canvas, _part(person.body, BODY_POINTS, "body"))
        if hands:
            for name in ("left_hand", "right_hand"):
                points = getattr(person, name)
                if points is not None:
                    draw_hand(canvas, _part(points, HAND_POINTS, name))
        if face and person.face is not None:
            draw_face(canvas, _part(person.face, FACE_POINTS, "face"))
    return canvas


def draw_body(canvas: np.ndarray, points: np.ndarray) -> None:
    """One body's limbs then joints on `canvas` (in place); `points` (18, 2+) normalised, NaN absent."""
    height, width = canvas.shape[:2]
    present = _present(points)
    for (a, b), color in zip(LIMBS, COLORS[: len(LIMBS)], strict=True):
        if not (present[a] and present[b]):
            continue
        # Same float64 operations, in the same order, as the original, so every int() agrees.
        xs = np.array([points[a, 0], points[b, 0]]) * float(width)
        ys = np.array([points[a, 1], points[b, 1]]) * float(height)
        centre = (int(np.mean(xs)), int(np.mean(ys)))
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * LIMB_DIM) for c in color])
    for i, color in enumerate(COLORS):
        if present[i]:
            cv2.circle(canvas, _pixel(points[i], width, height), JOINT_RADIUS, color, thickness=-1)


def draw_hand(canvas: np.ndarray, points: np.ndarray) -> None:
    """One hand's edges then points on `canvas` (in place); `points` (21, 2+) normalised, NaN absent."""
    height, width = canvas.shape[:2]
    present = _present(points)
    pixels = [_pixel(p, width, height) if ok else None for p, ok in zip(points, present, strict=True)]
    for (a, b), color in zip(HAND_EDGES, HAND_COLORS, strict=True):
        pa, pb = pixels[a], pixels[b]
        if pa is not None and pb is not None and _inside(pa) and _inside(pb):
            cv2.line(canvas, pa, pb, color, thickness=2)
    for p in pixels:
        if p is not None and _inside(p):
            cv2.circle(canvas, p, HAND_JOINT_RADIUS, HAND_JOINT_COLOR, thickness=-1)


def draw_face(canvas: np.ndarray, points: np.ndarray) -> None:
    """One face's points on `canvas` (in place); `points` (70, 2+) normalised, NaN absent."""
    height, width = canvas.shape[:2]
    for p, ok in zip(points, _present(points), strict=True):
        if ok and _inside(pixel := _pixel(p, width, height)):
            cv2.circle(canvas, pixel, FACE_RADIUS, FACE_COLOR, thickness=-1)


def _pixel(point: np.ndarray, width: int, height: int) -> tuple[int, int]:
    return int(point[0] * width), int(point[1] * height)


def _inside(pixel: tuple[int, int]) -> bool:
    # The original's `x > eps and y > eps` with eps = 0.01 on integer pixels: column and row >= 1.
    return pixel[0] > 0.01 and pixel[1] > 0.01


def _present(points: np.ndarray) -> np.ndarray:
    return np.isfinite(points[:, 0]) & np.isfinite(points[:, 1])


def _part(points: object, count: int, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != count or array.shape[1] < 2:
        raise ValueError(f"a person's {name} must be an ({count}, 3) array of x, y, confidence; got {array.shape}")
    # Far-off points would overflow OpenCV's int32 pixels; absent (NaN) rows are skipped anyway.
    if np.any(np.abs(array[:, :2][np.isfinite(array[:, :2])]) > MAX_OFFSET):
        raise ValueError(f"a person's {name} has a keypoint more than {MAX_OFFSET:g} canvases away from the canvas")
    return array


def _check_size(width: object, height: object) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_SIDE:
            raise ValueError(f"the pose canvas {name} must be 1 to {MAX_SIDE} whole pixels, got {value!r}")

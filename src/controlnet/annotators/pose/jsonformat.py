"""Poses to and from OpenPose JSON: the format of CMU OpenPose's `--write_json`, of the
AUTOMATIC1111 ControlNet extension's pose editor and "Upload JSON", and of its detected poses.

    {"people": [{"pose_keypoints_2d": [x, y, c, ...],        # 18 points (COCO) or 25 (BODY_25)
                 "hand_left_keypoints_2d": [...],           # 21 points, or null / []
                 "hand_right_keypoints_2d": [...],          # 21 points, or null / []
                 "face_keypoints_2d": [...]}],              # 70 points, or null / []
     "canvas_width": 512, "canvas_height": 768}

Reading follows the extension (annotator/openpose/__init__.py decode_json_as_poses and
util.py is_normalized): each part of each person is normalised when all its present points lie
within [-1, 1], else it is in pixels of the canvas. A point is absent when its confidence is 0
(CMU and the extension write 0, 0, 0 for it). The extension keeps only points of confidence 1;
CMU writes real confidences, so any confidence above 0 is kept here. BODY_25 bodies (CMU's default
model) are reduced to the 18 COCO points the ControlNet pose models know (MidHip and the feet
dropped). CMU's files record no canvas size: give it as `canvas`. A person must hold at least one of the four
keys (null or [] for a part not detected; other keys, CMU's `person_id` or its 3D lists, are ignored):
a person of none of them, `{}` or a misspelled key, is refused rather than drawn as nothing.

Writing follows the extension's encode_poses_as_json: normalised coordinates, confidence 1 for
every present point (the extension drops points below 1), absent points as 0, 0, 0, missing
parts as null. A pose with a point beyond the canvas's right or bottom edge (normalised > 1) is
written in pixels instead, since readers would take such a part for pixels.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .draw import MAX_OFFSET, MAX_SIDE
from .keypoints import BODY_POINTS, FACE_POINTS, HAND_POINTS, Person, Poses

PARTS = (  # JSON key, Person field, number of points
    ("pose_keypoints_2d", "body", BODY_POINTS),
    ("hand_left_keypoints_2d", "left_hand", HAND_POINTS),
    ("hand_right_keypoints_2d", "right_hand", HAND_POINTS),
    ("face_keypoints_2d", "face", FACE_POINTS),
)
BODY_25_POINTS = 25
# The COCO-18 points' places in CMU's BODY_25 order (BODY_25 adds MidHip at 8 and six foot points).
BODY_25_TO_COCO = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
MAX_BYTES = 64 * 2**20  # a pose file larger than this is not a pose file


def read_pose_json(source: str | bytes | os.PathLike, *, canvas: tuple[int, int] | None = None) -> Poses:
    """The poses of an OpenPose JSON file, or of its text (a str starting with "{" or "[").
    `canvas` (width, height) is used when the JSON gives no canvas size (CMU's files).

    Raises ValueError, in one line naming the problem and what is allowed, for a missing or
    unreadable file, text that is not JSON, and JSON that is not OpenPose poses."""
    text = _text(source)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{_name(source)}: not JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{_name(source)}: not JSON (nested too deeply)") from None
    try:
        return parse_pose_json(data, canvas=canvas)
    except ValueError as error:
        raise ValueError(f"{_name(source)}: {error}") from None


def parse_pose_json(data: Any, *, canvas: tuple[int, int] | None = None) -> Poses:
    """The poses of decoded OpenPose JSON (a dict, or a list holding one dict, as the extension's
    render API takes them); see `read_pose_json`."""
    if isinstance(data, list):
        if len(data) != 1:
            raise ValueError(f"holds a list of {len(data)} poses; one image takes one pose object")
        data = data[0]
    if not isinstance(data, dict):
        raise ValueError(f"must be an OpenPose JSON object with 'people', got {_kind(data)}")
    width, height = _canvas(data, canvas)
    if data.get("animals"):
        raise ValueError("holds animal poses, which are not supported; only 'people' are drawn")
    people = data.get("people")
    if not isinstance(people, list):
        raise ValueError(f"'people' must be a list of people, got {_kind(people)}")
    return Poses(width, height, [_person(p, i, width, height) for i, p in enumerate(people)])


def poses_to_json(poses: Poses, *, confidences: bool = False) -> dict[str, Any]:
    """`poses` as an OpenPose JSON object (see the module docstring). With `confidences`, each
    present point keeps its own confidence, as CMU writes them (the extension reads only points of
    confidence 1)."""
    scale = (poses.width, poses.height) if _beyond_canvas(poses) else (1, 1)
    people = [
        {key: _flatten(getattr(person, field), scale, confidences) for key, field, _ in PARTS}
        for person in poses.people
    ]
    return {"people": people, "animals": [], "canvas_width": int(poses.width), "canvas_height": int(poses.height)}


def _text(source: str | bytes | os.PathLike) -> str:
    if isinstance(source, bytes):
        source = source.decode("utf-8", errors="replace")
    if isinstance(source, str) and source.lstrip()[:1] in ("{", "["):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"a pose JSON must be given as a file path or JSON text, got {_kind(source)}")
    path = Path(source)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, too large for a pose file (at most {MAX_BYTES})")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not JSON (not UTF-8 text)") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None


def _name(source: object) -> str:
    return "pose JSON" if isinstance(source, bytes) or str(source).lstrip()[:1] in ("{", "[") else str(source)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _canvas(data: dict, canvas: tuple[int, int] | None) -> tuple[int, int]:
    if "canvas_width" not in data and "canvas_height" not in data:
        if canvas is None:
            raise ValueError("has no canvas_width and canvas_height (CMU's files lack them): give the image size")
        return _side("canvas width", canvas[0]), _side("canvas height", canvas[1])
    for key in ("canvas_width", "canvas_height"):
        if key not in data:
            raise ValueError(f"has no {key!r}; it must give canvas_width and canvas_height in pixels")
    return _side("canvas_width", data["canvas_width"]), _side("canvas_height", data["canvas_height"])


def _side(name: str, value: Any) -> int:
    if not _finite(value) or value != int(value) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"{name} must be a whole number of pixels from 1 to {MAX_SIDE}, got {_show(value)}")
    return int(value)


def _finite(value: Any) -> bool:
    """A JSON number (not a bool) that a float holds finitely (huge integers do not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _person(entry: Any, index: int, width: int, height: int) -> Person:
    if not isinstance(entry, dict):
        raise ValueError(f"people[{index}] must be an object of keypoint lists, got {_kind(entry)}")
    if not any(key in entry for key, _, _ in PARTS):  # {} or a misspelled key: a person of nothing
        keys = ", ".join(_show(k) for k in list(entry)[:4]) + (", ..." if len(entry) > 4 else "")
        raise ValueError(
            f"people[{index}] has none of {', '.join(key for key, _, _ in PARTS)} (null or [] for a part "
            f"not detected)" + (f"; it has {keys}" if entry else "; it is empty")
        )
    parts = {}
    for key, field, count in PARTS:
        where = f"people[{index}].{key}"
        points = _points(entry.get(key), where, count)
        parts[field] = None if points is None else _normalise(points, where, width, height)
    return Person(**parts)


def _points(numbers: Any, where: str, count: int) -> np.ndarray | None:
    """An (N, 3) array from the flat list, absent points NaN; None for a missing part."""
    if numbers is None or (isinstance(numbers, list) and not numbers):
        return None
    allowed = (count, BODY_25_POINTS) if count == BODY_POINTS else (count,)
    sizes = " or ".join(f"{3 * n} numbers ({n} points of x, y, confidence)" for n in allowed)
    if not isinstance(numbers, list) or len(numbers) not in [3 * n for n in allowed]:
        got = f"{len(numbers)} numbers" if isinstance(numbers, list) else _kind(numbers)
        raise ValueError(f"{where} must be a list of {sizes}, got {got}")
    for i, v in enumerate(numbers):
        if not _finite(v):
            raise ValueError(f"{where}[{i}] must be a finite number, got {_show(v)}")
    points = np.array(numbers, dtype=np.float64).reshape(-1, 3)
    if len(points) == BODY_25_POINTS and count == BODY_POINTS:
        points = points[list(BODY_25_TO_COCO)]
    points[points[:, 2] <= 0] = np.nan
    return points


def _normalise(points: np.ndarray, where: str, width: int, height: int) -> np.ndarray:
    """Pixels to canvas fractions, unless all present points already lie within [-1, 1] (the
    extension's test). Each fraction is nudged (by an ulp or two) so that `int(fraction * size)`,
    as the drawing computes it, gives back `int(pixel)` exactly, as the extension draws pixels."""
    present = ~np.isnan(points[:, 0])
    if np.all(np.abs(points[present, :2]) <= 1):
        return points
    out = points.copy()
    for axis, size in ((0, width), (1, height)):
        pixel = points[present, axis]
        fraction = pixel / size
        for _ in range(4):
            short = np.abs(fraction * size) < np.abs(pixel)
            if not short.any():
                break
            fraction[short] = np.nextafter(fraction[short], np.copysign(np.inf, pixel[short]))
        out[present, axis] = fraction
    if np.any(np.abs(out[present, :2]) > MAX_OFFSET):
        raise ValueError(f"{where} has a point more than {MAX_OFFSET:g} canvas sizes away from the canvas")
    return out


def _beyond_canvas(poses: Poses) -> bool:
    parts = [getattr(p, field) for p in poses.people for _, field, _ in PARTS]
    return any(np.nanmax(np.abs(part[:, :2]), initial=0) > 1 for part in parts if part is not None)


def _flatten(points: np.ndarray | None, scale: tuple[int, int], confidences: bool) -> list[float] | None:
    if points is None:
        return None
    flat: list[float] = []
    for x, y, c in np.asarray(points, dtype=np.float64)[:, :3]:
        if math.isnan(x) or math.isnan(y):
            flat += [0.0, 0.0, 0.0]
        else:
            flat += [float(x) * scale[0], float(y) * scale[1], float(c) if confidences and c > 0 else 1.0]
    return flat

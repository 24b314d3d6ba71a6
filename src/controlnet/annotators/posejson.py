"""openpose_json: a pose map drawn from an OpenPose JSON file, with no network and no image.

The file is what the AUTOMATIC1111 extension's pose editor saves, what CMU OpenPose's
`--write_json` writes, and what our openpose annotators write with `--json` (pose/jsonformat.py);
it is drawn as the ControlNet 1.1 pose models were trained (pose/draw.py), at the file's canvas
size unless another is asked for (the coordinates are kept as fractions of the canvas).

Unlike the other annotators it takes a file, not an image: `render_pose_json` (the map) and
`annotate_pose_json` (the map and the poses as JSON, an `Annotation`; the annotator's `from_file`)
are its entry points. Given an image, the registered annotator refuses in one line, saying so.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .base import Annotation, Annotator, AnnotatorFn, Param, Runtime
from .pose.draw import draw_poses
from .pose.jsonformat import poses_to_json, read_pose_json
from .pose.keypoints import Poses

PoseSource = str | bytes | os.PathLike


def render_pose_json(
    source: PoseSource,
    width: int | None = None,
    height: int | None = None,
    *,
    draw_body: bool = True,
    draw_hand: bool = True,
    draw_face: bool = True,
) -> np.ndarray:
    """The uint8 (H, W, 3) pose map of an OpenPose JSON file (or its text): at the file's canvas
    size, or at `width` x `height` (both or neither; for CMU files, which record no size, both).
    Body, hands and face are drawn, as the extension renders a JSON, unless turned off.

    Raises ValueError in one line for a bad file or size (see `pose.jsonformat.read_pose_json`)."""
    return annotate_pose_json(
        source, width, height, draw_body=draw_body, draw_hand=draw_hand, draw_face=draw_face
    ).image


def annotate_pose_json(
    source: PoseSource,
    width: int | None = None,
    height: int | None = None,
    *,
    canvas: tuple[int, int] | None = None,
    **params: Any,
) -> Annotation:
    """`render_pose_json`'s map, and the poses as OpenPose JSON (normalised, as our openpose
    annotators write them) in `Annotation.data`. `canvas` (width, height) is the picture a file
    without a canvas size (CMU's) was detected on; else `width` x `height` is taken for it.
    `params` are the annotator's (checked)."""
    if (width is None) != (height is None):
        raise ValueError(f"give both width and height of the pose map, or neither; got {width!r} x {height!r}")
    resolved = OPENPOSE_JSON.resolve(params)
    size = None if width is None or height is None else (width, height)
    poses = read_pose_json(source, canvas=canvas or size)
    if size is not None:
        poses = Poses(size[0], size[1], poses.people)
    image = draw_poses(poses, body=resolved["draw_body"], hands=resolved["draw_hand"], face=resolved["draw_face"])
    return Annotation(image, poses_to_json(poses))


def _refuse_images(runtime: Runtime) -> AnnotatorFn:
    def refuse(image: np.ndarray, **params: Any) -> np.ndarray:
        raise ValueError(
            "openpose_json draws an OpenPose JSON file, not an image: give it POSE.json "
            "(controlnet annotate openpose_json POSE.json OUT.png)"
        )

    return refuse


OPENPOSE_JSON = Annotator(
    "openpose_json",
    "an OpenPose JSON file (A1111 pose editor, CMU --write_json, our --json) drawn as the ControlNet "
    "1.1 openpose models were trained; takes the .json file instead of an image, needs no weights",
    _refuse_images,
    (
        Param("draw_body", True, help="draw the bodies (18 keypoints, 17 coloured limbs)"),
        Param("draw_hand", True, help="draw the hands the file gives (21 points each)"),
        Param("draw_face", True, help="draw the faces the file gives (70 white points)"),
    ),
    from_file=annotate_pose_json,
)

ANNOTATORS: tuple[Annotator, ...] = (OPENPOSE_JSON,)

"""OpenPose detection, as the AUTOMATIC1111 extension names its modules: ``openpose`` (body),
``openpose_hand`` (body and hands), ``openpose_face`` (body and face), ``openpose_faceonly`` (the
face alone drawn) and ``openpose_full`` (body, hands and face). Their maps feed
``control_v11p_sd15_openpose``; each also gives the detected poses as OpenPose JSON
(`Annotation.data`), which `posejson` renders back after a user edits it.

The steps are ControlNet-v1-1-nightly's annotator/openpose (and the extension's
annotator/openpose/__init__.py ``detect_poses``, which names the modules; controlnet_aux open_pose
is the same): the image as BGR; bodies from the body network's maps (pose/body.py); for each body,
hands from boxes beyond its wrists (pose/hand.py) and a face from a box around its nose
(pose/face.py); all keypoints normalised to the image and drawn as the ControlNet 1.1 pose models
were trained (pose/draw.py). The modules take no parameter besides the resolution, which
`run_annotator` applies. The weights are CMU's OpenPose models (non-commercial licence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import runtime as policy
from .base import Annotation, Annotator, AnnotatorFn, Runtime, pad_to_64
from .networks.openpose import BodyPoseNet, FaceNet, HandPoseNet
from .pose.body import body_maps, detect_bodies
from .pose.draw import draw_poses
from .pose.face import face_box, face_heatmaps, face_peaks
from .pose.hand import hand_boxes, hand_heatmaps, hand_peaks
from .pose.jsonformat import poses_to_json
from .pose.keypoints import Person, Poses
from .weights import WeightFile, check_files, load_network

_SOURCE = "https://huggingface.co/lllyasviel/Annotators"

BODY_WEIGHTS = WeightFile(
    "body_pose_model.pth",
    "the OpenPose body network (CMU; 18 keypoints and part affinity fields)",
    _SOURCE,
    markers=("conv4_3_CPM.weight", "conv5_5_CPM_L1.weight", "Mconv7_stage6_L2.weight"),
)
# The hand and face files have the same keys; their maps' channels tell them apart.
_KEYPOINT_MARKERS = ("conv5_3_CPM.weight", "conv6_2_CPM.weight", "Mconv7_stage6.weight")
HAND_WEIGHTS = WeightFile(
    "hand_pose_model.pth",
    "the OpenPose hand network (CMU; 21 keypoints)",
    _SOURCE,
    markers=_KEYPOINT_MARKERS,
    shapes=(("conv6_2_CPM.weight", (22, 512, 1, 1)),),
)
FACE_WEIGHTS = WeightFile(
    "facenet.pth",
    "the OpenPose face network (CMU; 70 landmarks)",
    _SOURCE,
    markers=_KEYPOINT_MARKERS,
    shapes=(("conv6_2_CPM.weight", (71, 512, 1, 1)),),
)


@dataclass(frozen=True)
class Detector:
    """The networks one annotator runs (None: that part is not detected) and where they run."""

    body: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    hand: Callable[[torch.Tensor], torch.Tensor] | None = None
    face: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    @property
    def place(self) -> tuple[str, torch.dtype, bool]:
        return self.device, self.dtype, self.channels_last


def detect_poses(rgb: np.ndarray, detector: Detector) -> Poses:
    """Everyone in an RGB uint8 image: bodies, and hands and faces where the detector has those
    networks, normalised to the image (x / width, y / height). Confidences: the heatmaps' values."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    height, width = bgr.shape[:2]
    heatmaps, pafs = body_maps(detector.body, bgr, *detector.place)
    policy.check_finite(heatmaps, "the OpenPose body network's heatmaps")
    people = []
    for body in detect_bodies(heatmaps, pafs):
        person = Person(body=_normalised(body, 0, 0, width, height))
        if detector.hand is not None:
            for x, y, side, is_left in hand_boxes(body, width, height):
                box = bgr[y : y + side, x : x + side]
                peaks = hand_peaks(hand_heatmaps(detector.hand, box, *detector.place), *box.shape[:2])
                # A keypoint in the box's first row or column counts as not found (the reference
                # marks a box coordinate of 0 as absent).
                peaks[(peaks[:, 0] < 1e-6) | (peaks[:, 1] < 1e-6)] = np.nan
                setattr(person, "left_hand" if is_left else "right_hand", _normalised(peaks, x, y, width, height))
        if detector.face is not None and (box := face_box(body, width, height)) is not None:
            x, y, side = box
            peaks = face_peaks(face_heatmaps(detector.face, bgr[y : y + side, x : x + side], *detector.place))
            peaks[(peaks[:, 0] < 1e-6) | (peaks[:, 1] < 1e-6)] = np.nan
            person.face = _normalised(peaks, x, y, width, height)
        people.append(person)
    return Poses(width, height, people)


def annotate_poses(rgb: np.ndarray, detector: Detector, body: bool, hands: bool, face: bool) -> Annotation:
    """The map of the chosen parts of everyone in an RGB uint8 image, and the poses as OpenPose
    JSON. As the extension's ``resize_image_with_pad`` / ``remove_pad``, an image whose sides are
    not multiples of 64 is edge-padded to them for the detection and drawing, and the map cropped;
    the JSON is of the image's canvas (run_annotator's images need no padding)."""
    h, w = rgb.shape[:2]
    poses = detect_poses(pad_to_64(rgb), detector)
    canvas = np.ascontiguousarray(draw_poses(poses, body=body, hands=hands, face=face)[:h, :w])
    return Annotation(canvas, poses_to_json(_cropped(poses, w, h)))


def _cropped(poses: Poses, width: int, height: int) -> Poses:
    """`poses` on the top-left `width` x `height` pixels of their canvas, normalised to those."""
    if (poses.width, poses.height) == (width, height):
        return poses
    scale = np.array([poses.width / width, poses.height / height, 1.0])
    parts = ("body", "left_hand", "right_hand", "face")
    people = [
        Person(**{k: None if getattr(p, k) is None else getattr(p, k) * scale for k in parts}) for p in poses.people
    ]
    return Poses(width, height, people)


def _normalised(points: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """(N, 3) points in a box's pixels (x, y, confidence; NaN rows absent) as (N, 3) normalised to
    the image, in float64 (the reference divides the body's pixels in float64)."""
    out = np.array(points, dtype=np.float64)
    out[:, 0] = (out[:, 0] + x) / float(width)
    out[:, 1] = (out[:, 1] + y) / float(height)
    return out


def _factory(weights: tuple[WeightFile, ...], draw_body: bool) -> Callable[[Runtime], AnnotatorFn]:
    hands, face = HAND_WEIGHTS in weights, FACE_WEIGHTS in weights

    def build(runtime: Runtime) -> AnnotatorFn:
        check_files(weights, runtime.folder)  # every missing file named before any is read
        dtype = policy.DTYPES[runtime.dtype]

        def load(weight: WeightFile, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
            return load_network(weight, runtime.folder, make, runtime.device, runtime.dtype)

        detector = Detector(
            load(BODY_WEIGHTS, BodyPoseNet),
            load(HAND_WEIGHTS, HandPoseNet) if hands else None,
            load(FACE_WEIGHTS, FaceNet) if face else None,
            runtime.device,
            dtype,
            policy.use_channels_last(runtime.device, dtype),
        )

        return lambda image: annotate_poses(image, detector, draw_body, hands, face)

    return build


def _annotator(name: str, what: str, hands: bool, face: bool, draw_body: bool = True) -> Annotator:
    weights = (BODY_WEIGHTS, *((HAND_WEIGHTS,) if hands else ()), *((FACE_WEIGHTS,) if face else ()))
    description = f"OpenPose {what}, drawn as ControlNet 1.1 was trained (control_v11p_sd15_openpose); poses as JSON"
    return Annotator(name, description, _factory(weights, draw_body), weights=weights)


ANNOTATORS: tuple[Annotator, ...] = (
    _annotator("openpose", "body keypoints", hands=False, face=False),
    _annotator("openpose_hand", "body and hand keypoints", hands=True, face=False),
    _annotator("openpose_face", "body keypoints and face landmarks", hands=False, face=True),
    _annotator("openpose_faceonly", "face landmarks (the body is found, not drawn)", False, True, draw_body=False),
    _annotator("openpose_full", "body, hand keypoints and face landmarks", hands=True, face=True),
)

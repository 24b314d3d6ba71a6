"""OpenPose detection (annotators/openpose.py: openpose, openpose_hand, openpose_face,
openpose_faceonly, openpose_full) against controlnet_aux's open_pose on the same inputs.

Keypoints found by random weights on a photo mean nothing, so the stages are compared apart:
1. the networks and the maps: random weights with the real files' key layouts, saved under the real
   names; the body network's heatmaps and part affinity fields over a photo, the hand and face
   networks' outputs on a photo's pixels, and the hand and face maps of a box (made by a cheap
   stand-in network of the real one's shapes: the reference runs the hand network at four scales
   up to 736 pixels, too slow for this suite's budget) equal the reference's;
2. peaks, limbs, people, hand and face keypoints equal the reference's on the same maps: synthetic
   body maps of people (Gaussian peaks, consistent fields) fed to both;
3. end to end: the detected poses of every annotator and their drawings equal the reference's on
   those maps; the annotators return an image of the input's size and valid OpenPose JSON.

Tolerance: none for float32 on the CPU: every map, keypoint and pixel compared is equal, bit for bit
(the same convolutions and resizes in the same order; SciPy's Gaussian filter, which the package
does without, is rewritten in the same order of operations). bfloat16 has its stated bound.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from safetensors.torch import save_file
from torch import nn

from controlnet.annotators import Runtime, annotate, get_annotator
from controlnet.annotators import openpose as ours
from controlnet.annotators.networks.openpose import BodyPoseNet, FaceNet, HandPoseNet
from controlnet.annotators.pose.body import LIMBS, PAF_CHANNELS, body_maps, connect_limbs, find_peaks, group_people
from controlnet.annotators.pose.draw import draw_poses
from controlnet.annotators.pose.face import face_box, face_heatmaps, face_peaks
from controlnet.annotators.pose.hand import hand_boxes, hand_heatmaps, hand_peaks
from controlnet.annotators.pose.jsonformat import parse_pose_json
from controlnet.annotators.pose.maps import gaussian_filter
from controlnet.annotators.weights import AnnotatorWeightsError, load_network

from . import annotator_weights
from .reference_annotators import aux_module
from .reference_annotators import matplotlib_colors as reference_matplotlib_colors

BODY, HAND, FACE = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
NETWORKS = {BODY: BodyPoseNet, HAND: HandPoseNet, FACE: FaceNet}


def _photo(height: int, width: int) -> np.ndarray:
    """scikit-image's astronaut resized to `height` squared (INTER_AREA), widened to `width` by
    mirroring its right side."""
    rgb = skimage.data.astronaut()
    scaled = cv2.resize(rgb, (height, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(np.pad(scaled, ((0, 0), (0, max(0, width - height)), (0, 0)), mode="reflect"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The three files under their real names, as plain state dicts with the files' flat keys."""
    where = tmp_path_factory.mktemp("openpose_weights")
    for name in NETWORKS:
        annotator_weights.write(where, name)
    return where


def _aux(name: str = ""):
    """controlnet_aux's open_pose package (its __init__ run first, so that the package is whole
    whichever test asks first), or its module `name`."""
    package = aux_module("open_pose")
    return aux_module(f"open_pose.{name}") if name else package


def _reference_classes() -> dict[str, type]:
    model, face = _aux("model"), _aux("face")
    return {BODY: model.bodypose_model, HAND: model.handpose_model, FACE: face.FaceNet}


def _reference_net(name: str, folder: Path) -> nn.Module:
    """controlnet_aux's network for `name`, filled from the file as its Body/Hand/Face do (built
    without its initialisation, which the file's tensors replace)."""
    with torch.device("meta"):
        net = _reference_classes()[name]()
    state = torch.load(folder / name, weights_only=True)
    net.load_state_dict(state if name == FACE else _aux("util").transfer(net, state), assign=True)
    return net.eval()


def _ours(name: str, folder: Path, dtype: str = "float32") -> nn.Module:
    weight = {BODY: ours.BODY_WEIGHTS, HAND: ours.HAND_WEIGHTS, FACE: ours.FACE_WEIGHTS}[name]
    return load_network(weight, folder, NETWORKS[name], "cpu", dtype)


# ------------------------------------------------------------------------------------------------
# 1. Networks and maps


def test_the_networks_have_the_files_keys_and_shapes() -> None:
    """The reference's module names without their first part (util.transfer) are the files' keys."""
    for name, reference in _reference_classes().items():
        with torch.device("meta"):
            mine = {k: v.shape for k, v in NETWORKS[name]().state_dict().items()}
            theirs = {(k if name == FACE else k.split(".", 1)[1]): v.shape for k, v in reference().state_dict().items()}
        assert mine == theirs


class _Stop(Exception):
    pass


def test_body_heatmaps_and_fields_equal_the_reference_on_a_photo(folder, monkeypatch) -> None:
    """The maps controlnet_aux's Body makes (taken from its last resize; its peak search is then
    stopped: on random maps its Python loop over every pair of candidates would take minutes)."""
    bgr = _photo(192, 192)[:, 32:160, ::-1].copy()  # narrow: the network sees 184 x 128 pixels
    body_module, util = _aux("body"), _aux("util")
    reference = object.__new__(body_module.Body)
    reference.model = _reference_net(BODY, folder)
    captured = {}
    resize = util.smart_resize

    def keep(x, size):
        out = resize(x, size)
        if x.ndim == 3:  # the whole maps, not the channels it resizes one by one
            captured[x.shape[2]] = out
        return out

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(util, "smart_resize", keep)
    monkeypatch.setattr(body_module, "gaussian_filter", stop)
    with pytest.raises(_Stop):
        reference(bgr)
    heatmaps, pafs = body_maps(_ours(BODY, folder), bgr)
    assert heatmaps.shape == (192, 128, 19) and pafs.shape == (192, 128, 38) and heatmaps.dtype == np.float64
    np.testing.assert_array_equal(heatmaps, captured[19])
    np.testing.assert_array_equal(pafs, captured[38])
    assert heatmaps.std() > 0.05 and pafs.std() > 0.05  # random weights, but maps that vary


@pytest.mark.parametrize("name", [HAND, FACE])
def test_hand_and_face_networks_equal_the_reference_on_a_photo(name, folder) -> None:
    crop = _photo(64, 64)[:, :, ::-1].astype(np.float32) / 256 - 0.5
    x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)[None]))
    with torch.inference_mode():
        expected = _reference_net(name, folder)(x)
        got = _ours(name, folder)(x)
    expected = expected[-1] if name == FACE else expected  # its FaceNet returns every stage's maps
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.std() > 0.1


def test_networks_in_bfloat16_stay_close_to_float32(folder) -> None:
    """Bound: the hand network's maps in bfloat16 differ from float32's by at most 5 % of their
    range (bfloat16 keeps 8 bits of mantissa through 30 convolutions; measured 0.7 %)."""
    x = torch.from_numpy(np.ascontiguousarray(_photo(64, 64)[:, :, ::-1].transpose(2, 0, 1)[None])) / 256 - 0.5
    with torch.inference_mode():
        full = _ours(HAND, folder)(x)
        half = _ours(HAND, folder, "bfloat16")(x.bfloat16().contiguous(memory_format=torch.channels_last)).float()
    assert (half - full).abs().max() <= 0.05 * (full.max() - full.min())


class _StandIn(nn.Module):
    """A cheap network with the real one's input and output shapes (maps at 1/8 of the input): a
    random 1x1 convolution of the 8x8-averaged pixels. `quiet` channels never exceed any threshold."""

    def __init__(self, maps: int, seed: int, quiet: tuple[int, ...] = ()) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, maps, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.copy_(0.1 * torch.randn(maps, generator=generator))
            self.conv.weight[list(quiet)] = 0
            self.conv.bias[list(quiet)] = -10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.avg_pool2d(x, 8))


class _EveryStage(nn.Module):
    """controlnet_aux's FaceNet interface: the list of the stages' maps, the last one used."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]


def test_hand_maps_and_keypoints_equal_the_reference_on_a_box(monkeypatch) -> None:
    """The four scales averaged on the 128 grid (taken where the reference smooths them), then the
    keypoints of the strongest blobs, for a box of the photo."""
    box = _photo(256, 256)[60:150, 100:190, ::-1].copy()
    hand_module = _aux("hand")
    reference = object.__new__(hand_module.Hand)
    reference.model = net = _StandIn(22, 3)
    smoothed = []
    smooth = hand_module.gaussian_filter
    monkeypatch.setattr(hand_module, "gaussian_filter", lambda m, sigma: smoothed.append(m.copy()) or smooth(m, sigma))
    expected_peaks = reference(box)
    heatmaps = hand_heatmaps(net, box)
    np.testing.assert_array_equal(heatmaps[:, :, :21], np.stack(smoothed, axis=2))
    peaks = hand_peaks(heatmaps, *box.shape[:2])
    np.testing.assert_array_equal(peaks[:, :2], expected_peaks)
    assert 5 < np.count_nonzero(peaks[:, 0]) < 21  # most keypoints found, some not


def test_face_maps_and_landmarks_equal_the_reference_on_a_box() -> None:
    """The maps resized to the box, and the landmarks; the reference lists only the landmarks found
    (and the background's maximum: silenced here), ours keep their places."""
    box = _photo(256, 256)[20:100, 90:170, ::-1].copy()
    face_module = _aux("face")
    reference = object.__new__(face_module.Face)
    net = _StandIn(71, 4, quiet=(70,))
    reference.model = _EveryStage(net)
    expected = reference(box)
    heatmaps = face_heatmaps(net, box)
    np.testing.assert_array_equal(heatmaps, expected)
    landmarks = face_peaks(heatmaps)
    found = ~np.isnan(landmarks[:, 0])
    assert 10 < found.sum() < 70
    np.testing.assert_array_equal(landmarks[found, :2], reference.compute_peaks_from_heatmaps(expected))


# ------------------------------------------------------------------------------------------------
# 2. Keypoints from the same maps: synthetic people

HEIGHT, WIDTH = 256, 320  # sizes at which the reference's float32 hand and face coordinates and
# our float64 ones truncate to the same pixels (as at 512, 576, 640, 768, 1024, ...)


def _skeleton(dx: float, dy: float, scale: float, raised: bool) -> np.ndarray:
    """18 keypoints (x, y) of a standing person, moved and scaled; `raised`: the right arm up."""
    points = np.array([
        (96, 38), (96, 66), (72, 68), (60, 104), (50, 138), (120, 68), (134, 104), (146, 136), (82, 136),
        (80, 180), (78, 224), (110, 136), (114, 180), (116, 224), (89, 31), (103, 31), (84, 36), (108, 36),
    ], dtype=np.float64)  # fmt: skip
    if raised:
        points[3], points[4] = (54, 44), (48, 12)
    return points * scale + (dx, dy)


PEOPLE = [_skeleton(0, 0, 1.0, False), _skeleton(150, 12, 0.9, True)]
PARTIAL = _skeleton(205, 0, 1.0, False)[[8, 9, 10]]  # three keypoints: too few to be a person
STRAY_NOSE = (290.0, 200.0)


def _synthetic_maps() -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (Gaussian peaks of sigma 2.5, a little noise, the background as 1 - max) and fields
    (the limb's unit vector within 3 pixels of it) of two people, a partial one and a stray nose."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    rng = np.random.default_rng(5)
    heatmaps = rng.normal(0, 0.01, (HEIGHT, WIDTH, 19))
    pafs = np.zeros((HEIGHT, WIDTH, 38))

    def peak(part: int, x: float, y: float, height: float = 0.9) -> None:
        heatmaps[:, :, part] += height * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.5**2))

    def limb(channels: tuple[int, int], a: np.ndarray, b: np.ndarray) -> None:
        length = np.hypot(*(b - a))
        ux, uy = (b - a) / length
        along = (xs - a[0]) * ux + (ys - a[1]) * uy
        across = np.abs((xs - a[0]) * uy - (ys - a[1]) * ux)
        near = (along >= -3) & (along <= length + 3) & (across <= 3)
        pafs[near, channels[0]], pafs[near, channels[1]] = ux, uy

    for person in PEOPLE:
        for part, (x, y) in enumerate(person):
            peak(part, x, y)
        for (a, b), channels in zip(LIMBS, PAF_CHANNELS, strict=True):
            limb(channels, person[a], person[b])
    for part, (x, y) in zip((8, 9, 10), PARTIAL, strict=True):
        peak(part, x, y, 0.6)
    limb(PAF_CHANNELS[7], PARTIAL[0], PARTIAL[1])
    limb(PAF_CHANNELS[8], PARTIAL[1], PARTIAL[2])
    peak(0, *STRAY_NOSE, 0.5)
    heatmaps[:, :, 18] = 1 - heatmaps[:, :, :18].max(axis=2)
    return heatmaps, pafs


class _Zeros(nn.Module):
    """The body network's output shapes, all zero (the maps are put in after the network)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        return torch.zeros(n, 38, h // 8, w // 8), torch.zeros(n, 19, h // 8, w // 8)


@pytest.fixture
def reference_on_maps(monkeypatch):
    """controlnet_aux's Body given the synthetic maps in place of its network's (its last resize to
    the image returns them); and the maps."""
    heatmaps, pafs = _synthetic_maps()
    util, body_module = _aux("util"), _aux("body")
    resize = util.smart_resize

    def maps_instead(x, size):
        if x.ndim == 3 and x.shape[2] in (19, 38) and tuple(size) == (HEIGHT, WIDTH):
            return (heatmaps if x.shape[2] == 19 else pafs).copy()
        return resize(x, size)

    monkeypatch.setattr(util, "smart_resize", maps_instead)
    body = object.__new__(body_module.Body)
    body.model = _Zeros()
    return body, heatmaps, pafs


def test_peaks_limbs_and_people_equal_the_reference_on_the_same_maps(reference_on_maps) -> None:
    body, heatmaps, pafs = reference_on_maps
    candidates, people = body(np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    peaks = find_peaks(heatmaps)
    np.testing.assert_array_equal(np.concatenate(peaks), candidates)
    mine = group_people(np.concatenate(peaks), connect_limbs(peaks, pafs, HEIGHT))
    np.testing.assert_array_equal(mine, people)
    assert len(mine) == 2 and (mine[:, -1] == 18).all()  # the partial person and the stray nose dropped


def test_the_gaussian_filter_is_scipys() -> None:
    from scipy.ndimage import gaussian_filter as scipy_filter

    x = np.random.default_rng(0).normal(size=(70, 90))
    np.testing.assert_array_equal(gaussian_filter(x, 3), scipy_filter(x, sigma=3))


def test_hand_and_face_boxes_equal_the_reference_near_the_edges_and_when_small() -> None:
    """Random bodies, keypoints missing at random, many near or beyond the image's edges, boxes of
    every size: the same boxes (or none) as util.handDetect and util.faceDetect."""
    util, body_module = _aux("util"), _aux("body")
    rng = np.random.default_rng(8)
    boxes = 0
    for _ in range(300):
        body = np.column_stack([rng.uniform(-20, WIDTH + 20, 18), rng.uniform(-20, HEIGHT + 20, 18)])
        body[rng.random(18) < 0.15] = np.nan
        if rng.random() < 0.5:  # a small head: the face box under 20 pixels
            body[[14, 15, 16, 17]] = body[0] + rng.uniform(-4, 4, (4, 2))
        keypoints = [None if np.isnan(x) else body_module.Keypoint(x, y) for x, y in body]
        theirs = body_module.BodyResult(keypoints, 0.0, 0)
        image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        assert hand_boxes(body, WIDTH, HEIGHT) == util.handDetect(theirs, image)
        assert face_box(body, WIDTH, HEIGHT) == util.faceDetect(theirs, image)
        boxes += len(hand_boxes(body, WIDTH, HEIGHT)) + (face_box(body, WIDTH, HEIGHT) is not None)
    assert boxes > 100


# ------------------------------------------------------------------------------------------------
# 3. End to end


@pytest.fixture
def matplotlib_colors() -> Iterator[None]:
    """controlnet_aux's hand drawing calls matplotlib.colors.hsv_to_rgb: a stand-in where absent."""
    with reference_matplotlib_colors():
        yield


FLAGS = {  # annotator: (body, hands, face), as the extension's modules draw
    "openpose": (True, False, False),
    "openpose_hand": (True, True, False),
    "openpose_face": (True, False, True),
    "openpose_faceonly": (False, False, True),
    "openpose_full": (True, True, True),
}


def test_detected_poses_and_their_drawings_equal_the_reference(reference_on_maps, matplotlib_colors, monkeypatch):
    """On the synthetic body maps and a photo: the bodies, hands (boxes and keypoints, by a stand-in
    hand network) and faces (by a stand-in face network whose background is silenced) equal
    controlnet_aux's detect_poses, and each annotator's drawing equals its draw_poses."""
    body, heatmaps, pafs = reference_on_maps
    rgb = _photo(HEIGHT, WIDTH)
    hand, face = _StandIn(22, 6), _StandIn(71, 7, quiet=(70,))
    aux = _aux()
    hands_module, face_module = _aux("hand"), _aux("face")
    hand_estimator, face_estimator = object.__new__(hands_module.Hand), object.__new__(face_module.Face)
    hand_estimator.model, face_estimator.model = hand, _EveryStage(face)
    expected = aux.OpenposeDetector(body, hand_estimator, face_estimator).detect_poses(rgb, True, True)
    monkeypatch.setattr(ours, "body_maps", lambda *args: (heatmaps, pafs))
    poses = ours.detect_poses(rgb, ours.Detector(body=None, hand=hand, face=face))
    assert len(poses.people) == len(expected) == 2
    assert all(p.left_hand is not None and p.right_hand is not None and p.face is not None for p in poses.people)
    for person, theirs in zip(poses.people, expected, strict=True):
        _same_points(person.body, theirs.body.keypoints)
        _same_points(person.left_hand, theirs.left_hand)
        _same_points(person.right_hand, theirs.right_hand)
        _same_points(person.face, theirs.face)
    for name, (draw_body, draw_hands, draw_face) in FLAGS.items():
        image = draw_poses(poses, body=draw_body, hands=draw_hands, face=draw_face)
        np.testing.assert_array_equal(image, aux.draw_poses(expected, HEIGHT, WIDTH, draw_body, draw_hands, draw_face))
        assert image.any(), name


def test_an_image_off_the_64_grid_is_padded_for_detection_and_its_map_cropped(reference_on_maps, monkeypatch):
    """As the extension's resize_image_with_pad: the image edge-padded to 256 x 320 (the synthetic
    maps' size), the map cropped back; the JSON's canvas is the image's, its points the same."""
    _, heatmaps, pafs = reference_on_maps
    monkeypatch.setattr(ours, "body_maps", lambda *args: (heatmaps, pafs))
    detector = ours.Detector(body=None, hand=_StandIn(22, 6), face=_StandIn(71, 7, quiet=(70,)))
    rgb = _photo(HEIGHT, WIDTH)[:250, :300]
    padded = np.pad(rgb, ((0, 6), (0, 20), (0, 0)), mode="edge")
    detected = ours.detect_poses(padded, detector)
    result = ours.annotate_poses(rgb, detector, True, True, True)
    np.testing.assert_array_equal(result.image, draw_poses(detected, body=True, hands=True, face=True)[:250, :300])
    assert (result.data["canvas_width"], result.data["canvas_height"]) == (300, 250)
    cropped = parse_pose_json(result.data)
    for mine, full in zip(cropped.people, detected.people, strict=True):
        np.testing.assert_allclose(mine.body[:, 0] * 300, full.body[:, 0] * WIDTH, rtol=1e-12)
        np.testing.assert_allclose(mine.face[:, 1] * 250, full.face[:, 1] * HEIGHT, rtol=1e-12)


def _same_points(mine: np.ndarray | None, theirs: list | None) -> None:
    """Our keypoints (NaN rows absent) against the reference's list: its absent body points None,
    absent hand points at -1 / size, absent face landmarks left out of the list."""
    assert (mine is None) == (theirs is None)
    if mine is None:
        return
    present = ~np.isnan(mine[:, 0])
    listed = [k for k in theirs if k is not None and k.x >= 0 and k.y >= 0]
    assert present.sum() == len(listed) and present.sum() > 0
    # The body's float64 coordinates equal; the hands' and face's differ by float32's rounding.
    tolerance = 0 if len(mine) == 18 else 1e-6
    np.testing.assert_allclose(mine[present, :2], [(k.x, k.y) for k in listed], rtol=0, atol=tolerance)


def test_an_annotator_gives_its_map_and_the_poses_as_openpose_json(folder) -> None:
    rgb = _photo(128, 128)[:, 32:96].copy()  # narrow: the network sees 184 x 96 pixels
    result = annotate("openpose", rgb, runtime=Runtime(folder))
    assert result.image.shape == rgb.shape and result.image.dtype == np.uint8
    data = json.loads(json.dumps(result.data))  # plain JSON
    assert (data["canvas_width"], data["canvas_height"]) == (64, 128) and isinstance(data["people"], list)
    assert len(parse_pose_json(data).people) == len(data["people"])


def test_every_annotator_is_registered_with_its_files() -> None:
    for name, (_, hands, face) in FLAGS.items():
        files = [w.name for w in get_annotator(name).weights]
        assert files == [BODY, *([HAND] if hands else []), *([FACE] if face else [])]


# ------------------------------------------------------------------------------------------------
# Bad weight files


def _folder_with(tmp_path: Path, files: dict[str, Path | bytes]) -> Path:
    for name, source in files.items():
        if isinstance(source, bytes):
            (tmp_path / name).write_bytes(source)
        else:
            (tmp_path / name).symlink_to(source)
    return tmp_path


def _refusal(name: str, folder: Path) -> str:
    with pytest.raises(AnnotatorWeightsError) as refused:
        annotate(name, np.zeros((64, 64, 3), np.uint8), runtime=Runtime(folder))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_missing_hand_file_is_named_before_anything_is_read(folder, tmp_path) -> None:
    message = _refusal("openpose_full", _folder_with(tmp_path, {BODY: folder / BODY, FACE: folder / FACE}))
    assert HAND in message and "huggingface.co/lllyasviel/Annotators" in message


def test_the_hand_model_given_as_the_body_model_is_named(folder, tmp_path) -> None:
    message = _refusal("openpose", _folder_with(tmp_path, {BODY: folder / HAND}))
    assert "not the OpenPose body network" in message and f"looks like {HAND}" in message


def test_the_face_model_given_as_the_hand_model_is_named(folder, tmp_path) -> None:
    message = _refusal("openpose_hand", _folder_with(tmp_path, {BODY: folder / BODY, HAND: folder / FACE}))
    assert "not the OpenPose hand network" in message and "(22, 512, 1, 1)" in message and f"like {FACE}" in message


def test_a_corrupt_file_is_refused_in_one_line(tmp_path) -> None:
    message = _refusal("openpose", _folder_with(tmp_path, {BODY: b"\x80\x04 not a pickle"}))
    assert BODY in message


def test_a_safetensors_file_loads_as_the_pth(folder, tmp_path) -> None:
    save_file(torch.load(folder / FACE, weights_only=True), tmp_path / "facenet.safetensors")
    from_safetensors = _ours(FACE, tmp_path).state_dict()
    for key, value in _ours(FACE, folder).state_dict().items():
        assert torch.equal(from_safetensors[key], value), key

"""The weight-free maps: threshold and recolor_luminance exact against the AUTOMATIC1111 extension's
formulas (scripts/preprocessor/legacy/processor.py, written out below), seg_from_labels against
mmseg's colouring with controlnet_aux's ADE20k palette, depth_from_file's normalisation; bad input
refused in one line."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from skimage import data as photos

from controlnet.annotators import get_annotator, run_annotator
from controlnet.annotators.maps import ADE20K_PALETTE, depth_map, seg_from_labels

from .reference_annotators import aux_module


def _photo(name: str, height: int = 192, width: int = 256) -> np.ndarray:
    return cv2.resize(getattr(photos, name)(), (width, height), interpolation=cv2.INTER_AREA)


# The extension's formulas, as its processor.py computes them on the (already sized) RGB image.
def _extension_threshold(img: np.ndarray, thr_a: int) -> np.ndarray:
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > thr_a] = 255
    return result


def _extension_recolor_luminance(img: np.ndarray, thr_a: float) -> np.ndarray:
    result = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)
    result = result[:, :, 0].astype(np.float32) / 255.0
    result = result**thr_a
    result = (result * 255.0).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(result, cv2.COLOR_GRAY2RGB)


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("level", [0, 60, 127, 200, 255])
def test_threshold_is_the_extensions(photo: str, level: int) -> None:
    image = _photo(photo)
    np.testing.assert_array_equal(
        run_annotator("threshold", image, threshold=level), _extension_threshold(image, level)
    )


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("gamma", [0.1, 0.45, 1.0, 1.7, 2.0])
def test_recolor_luminance_is_the_extensions(photo: str, gamma: float) -> None:
    image = _photo(photo)
    ours = run_annotator("recolor_luminance", image, gamma_correction=gamma)
    np.testing.assert_array_equal(ours, _extension_recolor_luminance(image, gamma))


def test_the_parameters_are_the_extensions() -> None:
    (threshold,) = get_annotator("threshold").params
    assert (threshold.name, threshold.default, threshold.minimum, threshold.maximum) == ("threshold", 127, 0, 255)
    (gamma,) = get_annotator("recolor_luminance").params
    assert (gamma.name, gamma.default, gamma.minimum, gamma.maximum) == ("gamma_correction", 1.0, 0.1, 2.0)


def test_the_palette_is_ade20ks() -> None:
    np.testing.assert_array_equal(ADE20K_PALETTE, np.array(aux_module("util").ade_palette(), np.uint8))


def _mmseg_colouring(photo: np.ndarray, seg: np.ndarray, palette: list) -> np.ndarray:
    """What the seg annotators return for the labels predicted on ``photo`` (mmseg's show_result
    with opacity 1, then bgr2rgb; ControlNet-v1-1-nightly annotator/uniformer)."""
    color_seg = np.zeros((seg.shape[0], seg.shape[1], 3), dtype=np.uint8)
    for label, color in enumerate(palette):
        color_seg[seg == label, :] = color
    bgr = color_seg[..., ::-1]
    blended = (photo * (1 - 1.0) + bgr * 1.0).astype(np.uint8)
    return blended[..., ::-1]


def test_seg_from_labels_colours_as_the_seg_annotators() -> None:
    labels = np.random.default_rng(0).integers(0, 150, (64, 96), dtype=np.uint8)
    labels[:8, :8] = np.arange(64).reshape(8, 8)
    expected = _mmseg_colouring(_photo("chelsea", 64, 96), labels, aux_module("util").ade_palette())
    np.testing.assert_array_equal(run_annotator("seg_from_labels", labels), expected)
    np.testing.assert_array_equal(seg_from_labels(labels.astype(np.uint16)), expected)  # wider labels too


def test_a_label_image_is_resized_without_blending_its_classes(tmp_path) -> None:
    """Labels are classes: at the annotator's resolution and through the pipeline's fitting they are
    resized nearest-neighbour, so only the image's own classes appear (Lanczos or area would invent
    labels at every boundary, some out of range)."""
    from controlnet.pipeline import ControlUnit, Pipeline

    labels = np.zeros((500, 700), np.uint8)
    labels[:, 350:] = 149  # the last class beside the first: any blending makes labels in between
    labels[200:300, 100:200] = 12
    colours = {tuple(c) for c in ADE20K_PALETTE[[0, 12, 149]]}
    sized = run_annotator("seg_from_labels", labels, 512)
    assert sized.shape == (512, 704, 3) and {tuple(c) for c in sized.reshape(-1, 3)} == colours
    unit = ControlUnit(labels, annotator="seg_from_labels", resize_mode="crop_and_resize")
    fitted = Pipeline.control_map(SimpleNamespace(annotators=None), unit, 256, 320, 256, None)
    assert fitted.shape == (256, 320, 3) and {tuple(c) for c in fitted.reshape(-1, 3)} == colours


def test_seg_from_labels_reads_ade20k_annotation_files_one_based() -> None:
    labels = np.random.default_rng(1).integers(0, 151, (32, 48), dtype=np.uint8)
    ours = run_annotator("seg_from_labels", labels, labels_from="1-150")
    np.testing.assert_array_equal(ours[labels == 0], 0)  # unlabelled: black
    labelled = labels > 0
    np.testing.assert_array_equal(ours[labelled], ADE20K_PALETTE[labels[labelled] - 1])


@pytest.mark.parametrize(
    ("labels", "labels_from", "match"),
    [
        (np.full((8, 8), 150, np.uint8), "0-149", r"label 150 at x=0, y=0 is not an ADE20k class: labels run 0-149"),
        (np.full((8, 8), 151, np.uint8), "1-150", r"label 151 .* labels run 1-150"),
    ],
)
def test_seg_from_labels_refuses_labels_out_of_range(labels: np.ndarray, labels_from: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as refused:
        run_annotator("seg_from_labels", labels, labels_from=labels_from)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (_photo("coffee", 64, 64), "needs a grey label image"),
        (np.zeros((8, 8), np.float32), "integer array"),
        (np.zeros((8,), np.uint8), "integer array"),
    ],
)
def test_seg_from_labels_refuses_what_is_not_a_label_image(labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match) as refused:
        seg_from_labels(labels)
    assert "\n" not in str(refused.value)


def test_depth_from_file_stretches_a_grey_depth_map() -> None:
    depth = np.tile(np.linspace(40, 140, 101).astype(np.uint8), (16, 1))
    ours = run_annotator("depth_from_file", depth)
    expected = np.rint((depth.astype(np.float64) - 40) / 100 * 255).astype(np.uint8)
    np.testing.assert_array_equal(ours, np.repeat(expected[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(run_annotator("depth_from_file", depth, invert=True), 255 - ours)
    kept = run_annotator("depth_from_file", depth, normalize=False)
    np.testing.assert_array_equal(kept[:, :, 0], depth)


def test_depth_from_file_keeps_a_full_range_map_and_blanks_a_flat_one() -> None:
    full = cv2.resize(photos.camera(), (64, 64), interpolation=cv2.INTER_AREA)  # a grey photograph
    full = ((full.astype(np.float64) - full.min()) / (full.max() - full.min()) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(run_annotator("depth_from_file", full)[:, :, 1], full)
    np.testing.assert_array_equal(run_annotator("depth_from_file", np.full((8, 8), 90, np.uint8)), 0)


def test_depth_map_takes_16_bit_and_float_depth() -> None:
    millimetres = np.tile(np.arange(500, 3000, 10, dtype=np.uint16), (4, 1))  # 250 distinct values
    far_bright = depth_map(millimetres)
    assert len(np.unique(far_bright)) == 250  # 16-bit precision kept, not 8-bit steps of 257
    near_bright = depth_map(millimetres, invert=True)
    assert near_bright[0, 0, 0] == 255 and near_bright[0, -1, 0] == 0
    np.testing.assert_array_equal(depth_map(np.full((2, 2), 65535, np.uint16), normalize=False), 255)
    np.testing.assert_array_equal(depth_map(np.full((2, 2), 0.5, np.float32), normalize=False), 128)


def test_depth_from_file_reads_a_colour_image_by_its_luma() -> None:
    image = _photo("coffee", 64, 64)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(run_annotator("depth_from_file", image, normalize=False)[:, :, 2], grey)


@pytest.mark.parametrize(
    ("depth", "match"),
    [
        (np.array([[0.0, np.nan]]), "NaN or infinite"),
        (np.zeros((0, 4), np.uint16), "non-empty numeric array"),
        (np.zeros((4, 4), bool), "non-empty numeric array"),
        (np.zeros((4, 4, 2), np.uint8), r"\(H, W\) or \(H, W, 3\)"),
    ],
)
def test_depth_map_refuses_bad_depth_in_one_line(depth: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match) as refused:
        depth_map(depth)
    assert "\n" not in str(refused.value)

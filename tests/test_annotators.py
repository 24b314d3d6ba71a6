"""Annotators and resizing: exact to OpenCV where the original apps use OpenCV, the registry's
contract for every annotator, and bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from controlnet.annotators import (
    ANNOTATORS,
    Annotator,
    Param,
    Runtime,
    canny,
    fit_to,
    get_annotator,
    pixel_perfect_resolution,
    register,
    resize,
    resize_image,
    run_annotator,
)
from controlnet.annotators.filters import gaussian_blur, make_noise_disk, rgb_to_grey
from controlnet.annotators.weights import AnnotatorWeightsError
from controlnet.imaging.images import HWC3

# ------------------------------------------------------------------------------------------------
# Test images


def _shapes(h: int = 120, w: int = 161) -> np.ndarray:
    """Filled and outlined shapes in several colours, thin diagonal stripes, on a coloured ground."""
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), (30, 60, 90), dtype=np.uint8)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 3) ** 2] = (200, 30, 90)
    img[h // 4 : 3 * h // 4, 2 * w // 3 : 5 * w // 6] = (10, 220, 40)
    ring = np.abs(np.hypot(yy - h / 3, xx - 3 * w / 4) - h / 5) < 1.5
    img[ring] = (250, 250, 250)
    img[((xx + 2 * yy) % 29) < 2] = (255, 255, 0)
    return img


def _gradient(h: int = 64, w: int = 97) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((xx * 255) // (w - 1) + (yy // 8) * 7).clip(0, 255).astype(np.uint8)


def _smooth_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Noise blurred by a box filter: real edges of all strengths and orientations."""
    rng = np.random.default_rng(seed)
    x = rng.random(shape) * 255
    for axis in (0, 1):
        x = (np.roll(x, 1, axis) + x + np.roll(x, -1, axis)) / 3
    return x.clip(0, 255).astype(np.uint8)


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


CANNY_IMAGES = {
    "shapes_rgb": _shapes(),
    "shapes_grey_odd": rgb_to_grey(_shapes(97, 131)),
    "gradient": _gradient(),
    "noise": _noise((37, 53), 1),
    "noise_rgb": _noise((41, 30, 3), 2),
    "smooth_noise_rgb": _smooth_noise((90, 77, 3), 3),
    "rgba": _noise((20, 31, 4), 4),
    "one_pixel": _noise((1, 1), 5),
    "one_row": _noise((1, 17, 3), 6),
    "one_column": _noise((9, 1), 7),
    "flat": np.full((16, 16, 3), 77, dtype=np.uint8),
}
THRESHOLDS = [(100, 200), (200, 100), (1, 255), (50, 50), (0, 0), (30.7, 80.2), (255, 1), (10, 2000)]


# ------------------------------------------------------------------------------------------------
# Canny against OpenCV


@pytest.mark.parametrize("name", sorted(CANNY_IMAGES))
def test_canny_equals_opencv(name: str) -> None:
    cv2 = pytest.importorskip("cv2")
    image = CANNY_IMAGES[name]
    for low, high in THRESHOLDS:
        expected = cv2.Canny(image, low, high)
        np.testing.assert_array_equal(canny(image, low, high), expected, err_msg=f"{name} {low}/{high}")


def test_canny_equals_opencv_on_random_cases() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(11)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(2, 90, 2))
        channels = int(rng.choice([1, 3]))
        image = _smooth_noise((h, w, channels), int(rng.integers(1 << 30)))[:, :, 0 if channels == 1 else slice(None)]
        low, high = (float(v) for v in rng.uniform(0, 300, 2))
        np.testing.assert_array_equal(canny(image, low, high), cv2.Canny(image, low, high))


def test_canny_finds_the_outline_of_a_square() -> None:
    image = np.zeros((32, 32), dtype=np.uint8)
    image[8:24, 8:24] = 255
    edges = canny(image, 100, 200)
    assert set(np.unique(edges)) == {0, 255}
    assert edges[8:24, 8:24][2:-2, 2:-2].max() == 0  # nothing inside
    assert edges[:, :4].max() == 0 and edges[:4].max() == 0  # nothing far outside
    assert edges[16, 6:10].max() == 255 and edges[6:10, 16].max() == 255  # the left and top sides


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.float32), np.zeros((0, 5), np.uint8), np.zeros((2, 2, 2, 2), np.uint8), [1, 2]]
)
def test_canny_rejects_bad_images(bad: object) -> None:
    with pytest.raises(ValueError):
        canny(bad, 100, 200)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Resizing


def _original_resize_image(cv2: object, img: np.ndarray, resolution: int) -> np.ndarray:
    """ControlNet's annotator/util.py resize_image, with OpenCV."""
    h, w = float(img.shape[0]), float(img.shape[1])
    k = float(resolution) / min(h, w)
    h, w = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    flag = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA  # type: ignore[attr-defined]
    return cv2.resize(img, (w, h), interpolation=flag)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("shape", "resolution", "expected"),
    [
        ((300, 500), 512, (512, 832)),  # enlarge: 853.3 -> 832
        ((1024, 1024), 512, (512, 512)),  # exact 2x shrink
        ((999, 701), 512, (704, 512)),
        ((512, 560), 512, (512, 576)),  # k == 1, one axis grows by rounding
        ((64, 64), 256, (256, 256)),
        ((720, 1280), 768, (768, 1344)),
    ],
)
def test_resize_image_sizes(shape: tuple[int, int], resolution: int, expected: tuple[int, int]) -> None:
    out = resize_image(_noise((*shape, 3), 0), resolution)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8
    assert out.shape[0] % 64 == 0 and out.shape[1] % 64 == 0


@pytest.mark.parametrize(
    "shape", [(300, 500, 3), (1024, 1024, 3), (999, 701, 3), (512, 560, 3), (513, 570, 1), (97, 33)]
)
def test_resize_image_equals_the_original(shape: tuple[int, ...]) -> None:
    cv2 = pytest.importorskip("cv2")
    img = _smooth_noise(shape, 1) if len(shape) == 3 and shape[2] == 3 else _noise(shape, 2)
    ours = resize_image(img, 512)
    np.testing.assert_array_equal(ours, _original_resize_image(cv2, img, 512).reshape(ours.shape))


AREA_CASES = [
    ((300, 500), (192, 320)),  # fractional shrink
    ((999, 701), (512, 384)),
    ((7, 5), (3, 2)),
    ((128, 96), (64, 48)),  # 2x2: OpenCV's round-half-up fast path
    ((90, 120), (30, 40)),  # integer 3x: the float fast path
    ((100, 100), (100, 50)),  # one axis kept
    ((513, 570), (512, 576)),  # one axis enlarged: OpenCV's bilinear emulation
    ((10, 10), (25, 37)),  # both enlarged
]


@pytest.mark.parametrize(("src", "dst"), AREA_CASES)
@pytest.mark.parametrize("channels", [1, 3])
def test_area_resize_equals_opencv(src: tuple[int, int], dst: tuple[int, int], channels: int) -> None:
    cv2 = pytest.importorskip("cv2")
    img = _noise((*src, channels), 3)
    expected = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_AREA).reshape(*dst, channels)
    np.testing.assert_array_equal(resize(img, dst[1], dst[0], "area"), expected)


@pytest.mark.parametrize(
    ("src", "dst"), [((300, 500), (512, 832)), ((5, 3), (17, 11)), ((100, 33), (257, 99)), ((300, 500), (100, 700))]
)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_lanczos_resize_equals_opencv(src: tuple[int, int], dst: tuple[int, int], channels: int) -> None:
    cv2 = pytest.importorskip("cv2")
    img = _noise((*src, channels), 4)  # noise: the largest overshoots, clipping exercised
    expected = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_LANCZOS4).reshape(*dst, channels)
    np.testing.assert_array_equal(resize(img, dst[1], dst[0], "lanczos"), expected)


@pytest.mark.parametrize(
    ("src", "dst"), [((10, 10), (25, 37)), ((300, 500), (120, 77)), ((1, 5), (3, 9)), ((77, 91), (160, 333))]
)
def test_linear_and_nearest_resize_equal_opencv(src: tuple[int, int], dst: tuple[int, int]) -> None:
    cv2 = pytest.importorskip("cv2")
    img = _noise((*src, 3), 5)
    ours = resize(img, dst[1], dst[0], "linear")
    np.testing.assert_array_equal(ours, cv2.resize(img, dst[::-1], interpolation=cv2.INTER_LINEAR_EXACT))
    plain = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.abs(ours.astype(int) - plain).max() <= 1
    nearest = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resize(img, dst[1], dst[0], "nearest"), nearest)


def test_resize_keeps_2d_and_float_masks() -> None:
    mask = np.zeros((10, 10), np.float32)
    mask[:5] = 1.0
    out = resize(mask, 20, 40, "linear")
    assert out.shape == (40, 20) and out.dtype == np.float32
    assert out[0, 0] == 1.0 and out[-1, -1] == 0.0 and 0 < out[19, 5] < 1
    assert resize(_noise((8, 8), 0), 4, 4).shape == (4, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros((4, 4), np.float32), 8, 8, "area"), "uint8"),
        ((np.zeros((4, 4), np.uint8), 0, 8, "area"), "width"),
        ((np.zeros((4, 4), np.uint8), 8, 8, "cubic"), "interpolation"),
        ((np.zeros((4, 4), np.uint8), 100_000, 100_000, "area"), "refusing"),
        ((np.zeros((0, 4), np.uint8), 8, 8, "area"), "non-empty"),
    ],
)
def test_resize_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resize(*args)


@pytest.mark.parametrize("resolution", [0, 32, 63, 512.0, True, None])
def test_resize_image_rejects_bad_resolutions(resolution: object) -> None:
    with pytest.raises(ValueError, match="resolution"):
        resize_image(np.zeros((8, 8, 3), np.uint8), resolution)  # type: ignore[arg-type]


def test_fit_to_modes() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = 200  # left half light, right half dark
    stretched = fit_to(img, 64, 64, "just_resize")
    assert stretched.shape == (64, 64, 3)
    # crop_and_resize: cover 100x100 -> scale to 100x200, keep the centre columns 50..150
    cropped = fit_to(img, 100, 100, "crop_and_resize")
    assert cropped.shape == (100, 100, 3)
    np.testing.assert_array_equal(cropped[:, :50], 200)
    np.testing.assert_array_equal(cropped[:, 50:], 0)
    # resize_and_fill: fit 200x200 -> 100x200 band in the middle, padded with the border median
    filled = fit_to(img, 200, 200, "resize_and_fill")
    assert filled.shape == (200, 200, 3)
    np.testing.assert_array_equal(filled[50:150], img)
    border_median = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0).astype(np.uint8)
    np.testing.assert_array_equal(filled[:50], np.broadcast_to(border_median, (50, 200, 3)))
    np.testing.assert_array_equal(filled[150:], np.broadcast_to(border_median, (50, 200, 3)))


def test_fit_to_pads_line_art_with_black() -> None:
    lines = np.zeros((50, 80), np.uint8)
    lines[10:40, 40] = 255
    filled = fit_to(lines, 80, 80, "resize_and_fill")
    assert filled.shape == (80, 80) and filled[:15].max() == 0 and filled[65:].max() == 0


def test_fit_to_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="resize mode"):
        fit_to(np.zeros((4, 4, 3), np.uint8), 8, 8, "stretch")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("image_hw", "target", "mode", "expected"),
    [
        ((512, 768), (1024, 1024), "crop_and_resize", 1024),  # max(1024/512, 1024/768) * 512
        ((512, 768), (1024, 1024), "resize_and_fill", 683),  # min(...) * 512 = 682.67
        ((512, 768), (1024, 1024), "just_resize", 1024),
        ((1000, 500), (512, 768), "crop_and_resize", 512),  # max(768/1000, 512/500) * 500
    ],
)
def test_pixel_perfect_resolution(image_hw: tuple[int, int], target: tuple[int, int], mode: str, expected: int) -> None:
    w, h = target
    k0, k1 = h / image_hw[0], w / image_hw[1]
    k = min(k0, k1) if mode == "resize_and_fill" else max(k0, k1)
    assert pixel_perfect_resolution(image_hw, w, h, mode) == round(k * min(image_hw)) == expected  # type: ignore[arg-type]


def test_pixel_perfect_gives_a_map_that_covers_the_target() -> None:
    image = _noise((300, 500, 3), 0)
    resolution = pixel_perfect_resolution(image.shape[:2], 768, 512, "crop_and_resize")
    detected = resize_image(image, resolution)
    assert detected.shape[0] >= 512 - 32 and detected.shape[1] >= 768 - 32
    assert fit_to(detected, 768, 512).shape == (512, 768, 3)


# ------------------------------------------------------------------------------------------------
# The registry contract: every annotator


# The walks below run every annotator that needs no weight file; each network annotator's family
# test (tests/test_annotators_<family>.py) checks the same contract with random weights of the real
# layout, and here that without its file it refuses in one line, naming the file and where to get it.
# (openpose_json reads a pose file, not an image: tests/test_annotators_pose_json.py walks it.)
CLASSICAL = sorted(name for name, a in ANNOTATORS.items() if not a.weights and a.from_file is None)
NETWORK = sorted(name for name, annotator in ANNOTATORS.items() if annotator.weights)


@pytest.mark.parametrize("name", NETWORK)
def test_a_network_annotator_without_its_files_names_them_all_and_their_source(name: str, tmp_path) -> None:
    missing = get_annotator(name).missing(tmp_path)
    assert missing == list(get_annotator(name).weights)
    with pytest.raises(AnnotatorWeightsError) as refused:
        run_annotator(name, _shapes(64, 64), None, runtime=Runtime(tmp_path))
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path) in message
    for weight in missing:  # openpose_full: body, hand and face, in one line
        assert weight.name in message and weight.network in message and weight.source in message
    with pytest.raises(AnnotatorWeightsError) as checked:  # what the commands call before anything loads
        get_annotator(name).check_weights(tmp_path)
    assert str(checked.value) == message


def test_only_the_missing_files_are_named_and_nothing_is_read_before(tmp_path) -> None:
    (tmp_path / "body_pose_model.pth").write_bytes(b"not read: the other two are missing")
    with pytest.raises(AnnotatorWeightsError) as refused:
        run_annotator("openpose_full", _shapes(64, 64), None, runtime=Runtime(tmp_path))
    message = str(refused.value)
    assert message.startswith("hand_pose_model.pth (the OpenPose hand network (CMU; 21 keypoints)) and facenet.pth ")
    assert "body_pose_model.pth" not in message and "get them from https://huggingface.co/lllyasviel/" in message


def test_the_missing_files_message_lists_each_file_once_and_each_source() -> None:
    from controlnet.annotators.weights import WeightFile, missing_files_error

    a, b, c = (WeightFile(f"{x}.pth", f"the {x} network", f"https://example.org/{x}", markers=()) for x in "abc")
    folder = Path("/nowhere")
    one = str(missing_files_error([a], folder))
    assert one.startswith("a.pth (the a network) is not in /nowhere (") and "get it from https://example.org/a" in one
    same = str(missing_files_error([a, dataclasses.replace(b, source=a.source)], folder))
    assert same.startswith("a.pth (the a network) and b.pth (the b network) are not in /nowhere (")
    assert same.endswith("; get them from https://example.org/a and put them there (or their .safetensors versions)")
    three = str(missing_files_error([a, b, c], folder))
    assert three.startswith("a.pth (the a network), b.pth (the b network) and c.pth (the c network) are not in")
    assert "; get a.pth from https://example.org/a, b.pth from https://example.org/b and c.pth from " in three


def _input_for(name: str, image: np.ndarray) -> np.ndarray:
    """The walk's image as the annotator takes it: seg_from_labels takes ADE20k class indices (grey
    values 0-63 here, within the 150 classes even after resizing's overshoot)."""
    return rgb_to_grey(HWC3(image)) // 4 if name == "seg_from_labels" else image


def _params_for(name: str, h: int, w: int) -> dict:
    if name == "inpaint":
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
        return {"mask": mask}
    return {}


@pytest.mark.parametrize("name", CLASSICAL)
def test_every_annotator_returns_a_hint_of_the_image_size(name: str) -> None:
    image = _input_for(name, _shapes(90, 130))
    out = run_annotator(name, image, None, **_params_for(name, 90, 130))
    annotator = get_annotator(name)
    assert out.shape == (90, 130, 3)
    assert out.dtype == (np.float32 if annotator.float_output else np.uint8)
    again = run_annotator(name, image, None, **_params_for(name, 90, 130))
    np.testing.assert_array_equal(out, again)  # deterministic (seeded where random)


@pytest.mark.parametrize("name", CLASSICAL)
def test_every_annotator_sizes_like_the_original_apps(name: str) -> None:
    image = _input_for(name, _shapes(75, 125))
    out = run_annotator(name, image, 128, **_params_for(name, 75, 125))
    assert out.shape == (128, 192, 3)  # short side 75 -> 128, long side 213.3 -> 192


@pytest.mark.parametrize("name", CLASSICAL)
def test_every_annotator_takes_grey_and_rgba_input(name: str) -> None:
    for image in (rgb_to_grey(_shapes(40, 50)), _noise((40, 50, 4), 1)):
        assert run_annotator(name, _input_for(name, image), **_params_for(name, 40, 50)).shape == (40, 50, 3)


def test_every_parameter_is_described() -> None:
    for annotator in ANNOTATORS.values():
        for p in annotator.params:
            assert p.help
            if p.kind in ("int", "float"):
                assert p.minimum is not None and p.maximum is not None and p.minimum <= p.default <= p.maximum
            if p.kind == "str":
                assert p.default in p.choices


@pytest.mark.parametrize("name", ["shuffle", "color_shuffle"])
def test_random_annotators_follow_their_seed(name: str) -> None:
    image = _shapes(64, 96)
    a = run_annotator(name, image, seed=1)
    np.testing.assert_array_equal(a, run_annotator(name, image, seed=1))
    assert not np.array_equal(a, run_annotator(name, image, seed=2))


def test_canny_annotator_is_the_canny_app() -> None:
    image = _shapes()
    out = run_annotator("canny", image, low_threshold=50, high_threshold=150)
    np.testing.assert_array_equal(out, np.repeat(canny(image, 50, 150)[:, :, None], 3, axis=2))


def test_scribble_is_the_scribble_app() -> None:
    image = np.full((10, 10, 3), 255, np.uint8)
    image[5, :] = (0, 200, 200)  # darkest channel 0 -> stroke
    image[7, :] = (127, 127, 127)  # exactly 127 is not below 127
    out = run_annotator("scribble", image)
    assert out[5].min() == 255 and out[7].max() == 0 and out[0].max() == 0


def test_invert_none_and_grey() -> None:
    image = _shapes(30, 40)
    np.testing.assert_array_equal(run_annotator("invert", image), 255 - image)
    np.testing.assert_array_equal(run_annotator("none", image), image)
    grey = run_annotator("grey", image)
    assert (grey[:, :, 0] == grey[:, :, 1]).all() and (grey[:, :, 1] == grey[:, :, 2]).all()


def test_grey_equals_opencv() -> None:
    cv2 = pytest.importorskip("cv2")
    image = _noise((33, 47, 3), 9)
    np.testing.assert_array_equal(rgb_to_grey(image), cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))


def test_tile_blurs_at_the_same_size() -> None:
    image = _noise((64, 96, 3), 1)
    np.testing.assert_array_equal(run_annotator("tile", image, down_sampling_rate=1.0), image)
    blurred = run_annotator("tile", image, down_sampling_rate=4.0)
    assert blurred.shape == image.shape and blurred.std() < image.std() * 0.8


def test_image_to_mask_thresholds_at_the_percentile() -> None:
    image = np.repeat(np.arange(100, dtype=np.uint8).reshape(10, 10)[:, :, None] * 2, 3, axis=2)
    mask = run_annotator("image_to_mask", image, percentile=30.0)
    assert (mask[:, :, 0] == 255).sum() == 30 and set(np.unique(mask)) == {0, 255}
    inverted = run_annotator("image_to_mask", image, percentile=30.0, invert=True)
    np.testing.assert_array_equal(inverted, 255 - mask)
    red = image.copy()
    red[:, :, 0] = 255 - red[:, :, 0]
    assert (run_annotator("image_to_mask", red, channel="red", percentile=30.0)[-3:, :, 0] == 255).all()


def test_inpaint_hint_marks_masked_pixels_with_minus_one() -> None:
    image = _shapes(64, 64)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    hint = run_annotator("inpaint", image, mask=mask, mask_blur=0.0)
    assert hint.dtype == np.float32 and hint.shape == (64, 64, 3)
    np.testing.assert_array_equal(hint[mask], -1.0)
    np.testing.assert_allclose(hint[~mask], image[~mask].astype(np.float32) / 255.0)
    blurred = run_annotator("inpaint", image, mask=mask, mask_blur=5.0)  # blur rounds the corners
    assert (blurred[32, 32] == -1).all() and (blurred[16, 16] != -1).all()


def test_inpaint_mask_follows_the_resolution() -> None:
    image = _shapes(50, 50)
    mask = np.zeros((50, 50, 3), np.uint8)
    mask[:, :25] = 255  # left half, as an RGB mask
    hint = run_annotator("inpaint", image, 128, mask=mask, mask_blur=0.0)
    assert hint.shape == (128, 128, 3)
    assert (hint[:, :60] == -1).all() and (hint[:, 68:] >= 0).all()


def test_gaussian_blur_is_close_to_opencv() -> None:
    cv2 = pytest.importorskip("cv2")
    x = np.random.default_rng(0).random((40, 33)).astype(np.float32)
    for sigma in (0.5, 2.0, 5.0):
        expected = cv2.GaussianBlur(x, (0, 0), sigma)
        np.testing.assert_allclose(gaussian_blur(x, sigma), expected, atol=1e-5)


def test_noise_disk_is_normalised_and_smooth() -> None:
    noise = make_noise_disk(100, 150, 2, 64, np.random.default_rng(0))
    assert noise.shape == (100, 150, 2) and noise.min() == 0.0 and noise.max() == 1.0
    assert np.abs(np.diff(noise, axis=1)).max() < 0.1


# ------------------------------------------------------------------------------------------------
# Registry errors and extension


def test_unknown_annotator_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown annotator 'sobel'; choose one of canny, scribble"):
        get_annotator("sobel")
    with pytest.raises(ValueError, match="unknown annotator"):
        run_annotator("sobel", np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("canny", {"low": 5}, "has no parameter 'low'; it takes low_threshold, high_threshold"),
        ("canny", {"low_threshold": 0}, r"must be in \[1, 255\]"),
        ("canny", {"high_threshold": 300}, r"must be in \[1, 255\]"),
        ("canny", {"low_threshold": 10.5}, "must be an integer"),
        ("canny", {"low_threshold": "10"}, "must be an integer"),
        ("canny", {"low_threshold": True}, "must be an integer"),
        ("tile", {"down_sampling_rate": float("nan")}, "must be a number"),
        ("image_to_mask", {"channel": "alpha"}, "must be one of luma, red, green, blue"),
        ("image_to_mask", {"invert": 1}, "true or false"),
        ("shuffle", {"seed": -1}, "must be in"),
        ("invert", {"strength": 1}, "takes no parameters"),
        ("inpaint", {}, "needs 'mask'"),
        ("inpaint", {"mask": [[1]]}, "needs 'mask'"),
    ],
)
def test_bad_parameters_are_refused(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_annotator(name, np.zeros((16, 16, 3), np.uint8), **params)


def test_integral_floats_and_numpy_scalars_are_accepted() -> None:
    image = _shapes(32, 32)
    a = run_annotator("canny", image, low_threshold=100.0, high_threshold=np.int64(200))
    np.testing.assert_array_equal(a, run_annotator("canny", image))


@pytest.mark.parametrize(
    "image", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8), np.zeros((0, 8, 3), np.uint8)]
)
def test_bad_images_are_refused(image: np.ndarray) -> None:
    with pytest.raises(ValueError):
        run_annotator("canny", image)


def test_bad_inpaint_masks_are_refused() -> None:
    with pytest.raises(ValueError, match="mask"):
        run_annotator("inpaint", np.zeros((8, 8, 3), np.uint8), mask=np.zeros((8, 8), np.int64))


def test_network_annotators_load_lazily_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []

    def factory(runtime):
        loads.append("weights read")
        return lambda image, gain: (image // 2 * gain).astype(np.uint8)

    fake = Annotator("fake_net", "a network annotator", factory, (Param("gain", 1, 0, 2, help="x"),), weights=())
    monkeypatch.setitem(ANNOTATORS, "fake_net", fake)
    assert loads == []  # registering reads nothing
    image = _shapes(16, 16)
    run_annotator("fake_net", image)
    run_annotator("fake_net", image, gain=2)
    assert loads == ["weights read"]


def test_register_refuses_taken_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(Annotator("canny", "another canny", lambda runtime: lambda image: image))


def test_an_annotator_returning_the_wrong_shape_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Annotator("broken", "returns grey", lambda runtime: lambda image: image[:, :, 0])
    monkeypatch.setitem(ANNOTATORS, "broken", broken)
    with pytest.raises(RuntimeError, match="expected"):
        run_annotator("broken", _shapes(16, 16))


def test_the_weights_folder_is_the_option_else_the_environment_else_the_cache(monkeypatch, tmp_path) -> None:
    from controlnet.annotators.weights import annotators_folder

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONTROLNET_ANNOTATORS", raising=False)
    assert annotators_folder() == tmp_path / "home" / ".cache" / "controlnet" / "annotators"
    monkeypatch.setenv("CONTROLNET_ANNOTATORS", str(tmp_path / "env"))
    assert annotators_folder() == tmp_path / "env" and Runtime.default().folder == tmp_path / "env"
    assert annotators_folder(tmp_path / "given") == tmp_path / "given"  # --annotators-dir wins
    monkeypatch.setenv("CONTROLNET_ANNOTATORS", "")  # set but empty: as if unset
    assert annotators_folder() == tmp_path / "home" / ".cache" / "controlnet" / "annotators"

"""Line art and straight lines (annotators/lineart.py: lineart_standard, lineart_realistic,
lineart_coarse, lineart_anime; annotators/mlsd.py: mlsd, mlsd_lsd) against controlnet_aux's
LineartStandardDetector, LineartDetector, LineartAnimeDetector and MLSDdetector: random weights with
the real files' key layouts (built from controlnet_aux's own networks), saved under the real file
names, run on scikit-image's photographs.

Tolerance: none. On the CPU in float32 every map equals the oracle's, byte for byte (the same
convolutions on the same tensors, the same OpenCV resizes and drawing). M-LSD's decoding of the
network's output into segments is also compared alone, on the same output, segment for segment.
bfloat16 is compared with float32 by the bound stated in its test. ``mlsd_lsd`` has no reference (it
is a stand-in): it is tested for what it promises.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from controlnet.annotators import Runtime, get_annotator, run_annotator
from controlnet.annotators.mlsd import decode_segments, draw_segments
from controlnet.annotators.weights import AnnotatorWeightsError

from . import annotator_weights
from .annotator_weights import mlsd_module, photo
from .reference_annotators import at_own_size, aux_module

REALISTIC, COARSE, ANIME, MLSD = "sk_model.pth", "sk_model2.pth", "netG.pth", "mlsd_large_512_fp32.pth"

PHOTOS = {name: photo(name, width) for name, width in (("astronaut", 256), ("coffee", 320), ("chelsea", 320))}


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """The random tensors of each file, as the file holds them."""
    return {
        REALISTIC: annotator_weights.lineart(0),
        COARSE: annotator_weights.lineart(1),
        ANIME: annotator_weights.lineart_anime(),
        MLSD: annotator_weights.mlsd(),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory, weights) -> Path:
    """The four files under their real names, each a plain state dict."""
    return annotator_weights.write_files(tmp_path_factory.mktemp("lines_weights"), weights)


@pytest.fixture(scope="module")
def oracles(folder) -> dict[str, object]:
    """controlnet_aux's detectors, read by their own from_pretrained from the same folder."""
    return {
        "lineart": aux_module("lineart").LineartDetector.from_pretrained(str(folder)),
        "lineart_anime": aux_module("lineart_anime").LineartAnimeDetector.from_pretrained(str(folder)),
        "mlsd": mlsd_module().MLSDdetector.from_pretrained(str(folder)),
    }


def _ours(name: str, folder: Path, rgb: np.ndarray, dtype: str = "float32", **params) -> np.ndarray:
    return run_annotator(name, rgb, None, runtime=Runtime(folder, "cpu", dtype), **params)


def _assert_grey_levels(out: np.ndarray) -> None:
    """A line-art map that is not degenerate: 3 equal channels, neither all black nor all white, a
    spread of levels."""
    assert out.shape[2] == 3 and (out == out[:, :, :1]).all()
    assert 0.02 < (out < 128).mean() < 0.98 and len(np.unique(out)) > 50


# ------------------------------------------------------------------------------------------------
# lineart_realistic, lineart_coarse, lineart_anime


@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
def test_lineart_realistic_equals_the_reference(photo: str, folder: Path, oracles) -> None:
    rgb = PHOTOS[photo]
    ours = _ours("lineart_realistic", folder, rgb)
    _assert_grey_levels(ours)
    np.testing.assert_array_equal(ours, at_own_size(oracles["lineart"], rgb))


def test_lineart_coarse_reads_its_own_file_and_equals_the_reference(folder: Path, oracles) -> None:
    rgb = PHOTOS["chelsea"]
    ours = _ours("lineart_coarse", folder, rgb)
    _assert_grey_levels(ours)
    np.testing.assert_array_equal(ours, at_own_size(oracles["lineart"], rgb, coarse=True))
    assert not np.array_equal(ours, _ours("lineart_realistic", folder, rgb))


def test_lineart_maps_are_white_lines_on_black(folder: Path, oracles) -> None:
    """The extension inverts the network's dark-on-white map: what the network draws dark is white."""
    rgb = PHOTOS["astronaut"]
    pixels = torch.from_numpy(rgb).float().div(255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        network_map = oracles["lineart"].model(pixels)[0, 0].numpy()
    dark = (network_map * 255.0).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_ours("lineart_realistic", folder, rgb)[:, :, 0], 255 - dark)


def test_lineart_anime_equals_the_reference_through_its_256_pixel_resize(folder: Path, oracles) -> None:
    rgb = PHOTOS["coffee"]  # 256 x 320: resized to 256 x 512 for the network and back
    ours = _ours("lineart_anime", folder, rgb)
    _assert_grey_levels(ours)
    np.testing.assert_array_equal(ours, at_own_size(oracles["lineart_anime"], rgb))


def test_a_size_off_the_64_grid_is_padded_and_cropped_as_the_extension_does(folder: Path, oracles) -> None:
    """The extension edge-pads to multiples of 64 and crops the map back: the same as running the
    reference on the padded image and cropping."""
    rgb = PHOTOS["chelsea"][:200, :250]
    padded = np.pad(rgb, ((0, 56), (0, 6), (0, 0)), mode="edge")
    ours = _ours("lineart_realistic", folder, rgb)
    assert ours.shape == (200, 250, 3)
    np.testing.assert_array_equal(ours, at_own_size(oracles["lineart"], padded)[:200, :250])


def test_bfloat16_lineart_is_close_to_float32(folder: Path) -> None:
    """bf16 keeps 8 bits of mantissa: the map's levels move, lines stay. Measured on this photo:
    mean difference 1.6 levels, 99% of pixels within 7, the largest 17 (coffee 1.7 / 7, chelsea
    2.4 / 10). Bound asserted: mean at most 3 levels, 99% of pixels within 12."""
    rgb = PHOTOS["astronaut"]
    full = _ours("lineart_realistic", folder, rgb).astype(np.int16)
    half = _ours("lineart_realistic", folder, rgb, "bfloat16").astype(np.int16)
    difference = np.abs(full - half)
    assert difference.mean() <= 3.0 and np.percentile(difference, 99) <= 12


# ------------------------------------------------------------------------------------------------
# mlsd


def _assert_some_lines(out: np.ndarray) -> None:
    assert out.shape[2] == 3 and (out == out[:, :, :1]).all() and set(np.unique(out)) <= {0, 255}
    assert 0.001 < (out == 255).mean() < 0.5


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
def test_mlsd_equals_the_reference(photo: str, folder: Path, oracles) -> None:
    rgb = PHOTOS[photo]
    ours = _ours("mlsd", folder, rgb)
    _assert_some_lines(ours)
    np.testing.assert_array_equal(ours, at_own_size(oracles["mlsd"], rgb))


@pytest.mark.parametrize(("thr_v", "thr_d"), [(0.3, 5.0), (0.05, 12.0), (2.0, 0.1)])
def test_mlsd_thresholds_act_as_the_references(thr_v: float, thr_d: float, folder: Path, oracles) -> None:
    """Other thresholds, down to none kept (a score never exceeds 2: a black map, as the reference's
    failure on no segments leaves it)."""
    rgb = PHOTOS["coffee"]
    ours = _ours("mlsd", folder, rgb, thr_v=thr_v, thr_d=thr_d)
    np.testing.assert_array_equal(ours, at_own_size(oracles["mlsd"], rgb, thr_v=thr_v, thr_d=thr_d))
    assert (ours.max() == 0) == (thr_v == 2.0)


def test_mlsd_pads_a_size_off_the_64_grid_and_crops_the_map(folder: Path, oracles) -> None:
    rgb = PHOTOS["astronaut"][:230, :200]
    padded = np.pad(rgb, ((0, 26), (0, 56), (0, 0)), mode="edge")
    ours = _ours("mlsd", folder, rgb)
    assert ours.shape == (230, 200, 3)
    np.testing.assert_array_equal(ours, at_own_size(oracles["mlsd"], padded)[:230, :200])


def test_mlsd_thresholds_are_the_extensions_sliders() -> None:
    """Names as controlnet_aux's arguments; defaults and ranges as the extension's "MLSD Value
    Threshold" and "MLSD Distance Threshold" (preprocessor_compiled.py)."""
    params = {p.name: (p.default, p.minimum, p.maximum) for p in get_annotator("mlsd").params}
    assert params == {"thr_v": (0.1, 0.01, 2.0), "thr_d": (0.1, 0.01, 20.0)}
    assert [p.name for p in get_annotator("mlsd_lsd").params] == ["thr_d"]


class _Fixed(nn.Module):
    """A stand-in network that returns a given output (pred_lines asks a network for its device)."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output


def test_mlsd_decoding_equals_the_references_on_the_same_network_output() -> None:
    """The segments from one output: ties of centre scores, both ends off the image, short and long."""
    generator = torch.Generator().manual_seed(5)
    output = torch.randn((1, 9, 48, 64), generator=generator) * torch.tensor([2.0, *[12.0] * 4, *[1.0] * 4]).view(
        1, 9, 1, 1
    )
    output[0, 0, 10:12, 10:12] = 3.0  # four equal peaks: ties in the centre scores
    reference = mlsd_module("utils").pred_lines
    for thr_v, thr_d in [(0.1, 0.1), (0.5, 10.0), (0.9, 3.0)]:
        expected = reference(np.zeros((96, 128, 3), np.uint8), _Fixed(output), [96, 128], thr_v, thr_d)
        ours = decode_segments(output, thr_v, thr_d)
        key = np.lexsort(ours.T)  # ties may come out of topk in another order
        np.testing.assert_array_equal(ours[key], expected[np.lexsort(expected.T)])
        assert len(ours) > 3 and (ours < 0).any() and (ours > 96).any()
        drawn = np.zeros((96, 128, 3), np.uint8)
        for line in expected:
            x0, y0, x1, y1 = (int(v) for v in line)
            cv2.line(drawn, (x0, y0), (x1, y1), [255, 255, 255], 1)
        np.testing.assert_array_equal(draw_segments(ours, 96, 128), drawn[:, :, 0])


def test_mlsd_reads_a_safetensors_file(tmp_path: Path, weights, folder: Path) -> None:
    save_file(weights[MLSD], tmp_path / "mlsd_large_512_fp32.safetensors")
    rgb = PHOTOS["astronaut"]
    np.testing.assert_array_equal(_ours("mlsd", tmp_path, rgb), _ours("mlsd", folder, rgb))


# ------------------------------------------------------------------------------------------------
# Bad weight files


@pytest.mark.parametrize("name", ["lineart_realistic", "lineart_coarse", "lineart_anime", "mlsd"])
def test_a_missing_file_is_named_with_the_folder_and_source(name: str, tmp_path: Path) -> None:
    with pytest.raises(AnnotatorWeightsError) as refused:
        _ours(name, tmp_path, PHOTOS["astronaut"])
    message = str(refused.value)
    expected = get_annotator(name).weights[0]
    assert "\n" not in message and expected.name in message and str(tmp_path) in message
    assert "https://huggingface.co/lllyasviel/Annotators" in message


@pytest.mark.parametrize(
    ("name", "given", "looks_like"),
    [("lineart_realistic", ANIME, "netG.pth"), ("mlsd", REALISTIC, "sk_model.pth"), ("lineart_anime", MLSD, MLSD)],
)
def test_another_annotators_file_names_what_was_expected(name, given, looks_like, tmp_path: Path, weights) -> None:
    expected = get_annotator(name).weights[0]
    torch.save(weights[given], tmp_path / expected.name)
    with pytest.raises(AnnotatorWeightsError) as refused:
        _ours(name, tmp_path, PHOTOS["astronaut"])
    message = str(refused.value)
    assert "\n" not in message and expected.network in message and looks_like in message


def test_a_corrupt_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / MLSD).write_bytes(b"PK\x03\x04 not a zip archive" * 10)
    with pytest.raises(AnnotatorWeightsError) as refused:
        _ours("mlsd", tmp_path, PHOTOS["astronaut"])
    assert "\n" not in str(refused.value) and MLSD in str(refused.value)


# ------------------------------------------------------------------------------------------------
# lineart_standard and mlsd_lsd: no weights


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_lineart_standard_equals_the_reference(photo: str) -> None:
    rgb = PHOTOS[photo]
    ours = run_annotator("lineart_standard", rgb)
    _assert_grey_levels_or_sparse(ours)
    reference = aux_module("lineart_standard").LineartStandardDetector()
    np.testing.assert_array_equal(ours, reference(rgb, detect_resolution=min(rgb.shape[:2]), output_type="np"))


def _assert_grey_levels_or_sparse(out: np.ndarray) -> None:
    """lineart_standard's map: white lines on a mostly black ground, with a spread of levels."""
    assert (out == out[:, :, :1]).all() and 0.5 < (out == 0).mean() < 0.99 and len(np.unique(out)) > 50


def test_lineart_standard_pads_sizes_off_the_64_grid_as_the_extension_does() -> None:
    rgb = PHOTOS["coffee"][:190, :300]
    padded = np.pad(rgb, ((0, 2), (0, 20), (0, 0)), mode="edge")
    reference = aux_module("lineart_standard").LineartStandardDetector()
    expected = reference(padded, detect_resolution=192, output_type="np")[:190, :300]
    np.testing.assert_array_equal(run_annotator("lineart_standard", rgb), expected)


def test_lineart_standard_of_a_flat_image_is_black() -> None:
    """No pixel darker than its surroundings by more than 8: the reference's scale falls back to 16."""
    assert run_annotator("lineart_standard", np.full((64, 64, 3), 90, np.uint8)).max() == 0


def _rectangle() -> np.ndarray:
    """A light 100 x 30 pixel rectangle on a dark ground."""
    image = np.full((128, 192, 3), 40, np.uint8)
    image[40:70, 50:150] = (200, 180, 160)
    return image


def test_mlsd_lsd_draws_the_straight_edges_of_a_rectangle_white_on_black() -> None:
    out = run_annotator("mlsd_lsd", _rectangle())
    assert out.shape == (128, 192, 3) and set(np.unique(out)) == {0, 255} and (out == out[:, :, :1]).all()
    white = out[:, :, 0] == 255
    near = np.zeros_like(white)
    for rows, cols in [((38, 43), (50, 150)), ((67, 72), (50, 150)), ((40, 70), (48, 53)), ((40, 70), (147, 152))]:
        band = white[rows[0] : rows[1], cols[0] : cols[1]]
        along = band.any(axis=0) if cols[1] - cols[0] > rows[1] - rows[0] else band.any(axis=1)
        assert along[3:-3].mean() > 0.9  # each side is drawn along its length
        near[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert not (white & ~near).any()  # nothing away from the sides


def test_mlsd_lsd_distance_threshold_drops_short_segments() -> None:
    """thr_d is half the length in pixels, as mlsd's is at half size: 20 keeps the 100-pixel sides
    only, not the 30-pixel ones."""
    white = run_annotator("mlsd_lsd", _rectangle(), thr_d=20.0)[:, :, 0] == 255
    assert white[38:43, 55:145].any(axis=0).all() and white[67:72, 55:145].any(axis=0).all()
    assert not white[45:65, :].any()


def test_mlsd_lsd_is_deterministic() -> None:
    rgb = PHOTOS["coffee"]
    first = run_annotator("mlsd_lsd", rgb)
    np.testing.assert_array_equal(first, run_annotator("mlsd_lsd", rgb))
    assert 0.005 < (first == 255).mean() < 0.5

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

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from safetensors.torch import save_file
from torch import nn

from controlnet.annotators import Runtime, get_annotator, run_annotator
from controlnet.annotators.mlsd import decode_segments, draw_segments
from controlnet.annotators.weights import AnnotatorWeightsError

from .helpers import randomize
from .reference_annotators import aux_module

REALISTIC, COARSE, ANIME, MLSD = "sk_model.pth", "sk_model2.pth", "netG.pth", "mlsd_large_512_fp32.pth"


def _photo(name: str, width: int) -> np.ndarray:
    """A scikit-image photograph, its short side resized to 256 (INTER_AREA), the centre `width`
    columns kept: sides multiples of 64, as run_annotator sizes them."""
    rgb = getattr(skimage.data, name)()
    h, w = rgb.shape[:2]
    scaled = cv2.resize(rgb, (round(w * 256 / h), 256), interpolation=cv2.INTER_AREA)
    left = (scaled.shape[1] - width) // 2
    return np.ascontiguousarray(scaled[:, left : left + width])


PHOTOS = {"astronaut": _photo("astronaut", 256), "coffee": _photo("coffee", 320), "chelsea": _photo("chelsea", 320)}


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).permute(2, 0, 1)[None]


def _standardise(conv: nn.Module, output: torch.Tensor, channels: slice, mean: float, std: float) -> None:
    """Rescale `conv`'s output channels so that on `output` (its output before) they have this mean
    and standard deviation."""
    with torch.no_grad():
        for c in range(conv.weight.shape[0])[channels]:
            scale = std / output[0, c].std()
            conv.weight[c].mul_(scale)
            conv.bias[c].sub_(output[0, c].mean()).mul_(scale).add_(mean)


def _random_generator(seed: int) -> dict[str, torch.Tensor]:
    """informative-drawings' Generator(3, 1, 3) as controlnet_aux builds it, random (1/sqrt(fan-in)
    weights; its InstanceNorms keep every activation in scale), the last convolution rescaled so that
    its logits on the astronaut have mean 0 and deviation 2: the sigmoid spans most of 0..255."""
    net = randomize(aux_module("lineart").Generator(3, 1, 3), seed).eval()
    with torch.no_grad():
        features = net.model3(net.model2(net.model1(net.model0(_chw(PHOTOS["astronaut"] / 255.0)))))
        _standardise(net.model4[1], net.model4[1](net.model4[0](features)), slice(None), 0.0, 2.0)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _anime_net() -> nn.Module:
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return aux_module("lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def _random_anime() -> dict[str, torch.Tensor]:
    """pix2pix's UnetGenerator(3, 1, 8, 64) with affine-free InstanceNorm, random, its last
    transposed convolution scaled by 0.3 (the tanh then saturates on few pixels). Keys with
    DataParallel's "module." prefix, which the references strip."""
    net = randomize(_anime_net(), 2).eval()
    with torch.no_grad():
        net.model.model[3].weight.mul_(0.3)
    return {f"module.{k}": v.clone() for k, v in net.state_dict().items()}


def _mlsd(submodule: str = ""):
    """controlnet_aux's mlsd package (its __init__, MLSDdetector) or one of its modules, the package
    imported first: the loader enters a package bare when a submodule is asked for before it."""
    package = aux_module("mlsd")
    return aux_module(f"mlsd.{submodule}") if submodule else package


def _random_mlsd() -> dict[str, torch.Tensor]:
    """MobileV2_MLSD_Large, random, with BatchNorm statistics near 0 and 1; the head's output
    channels rescaled on the astronaut: centre logits of mean -1 and deviation 1.5 (many centres
    above the 0.1 score), displacements of deviation 8 pixels. Saved without BatchNorm's
    num_batches_tracked (the file's torch version is unknown; both loaders fill it in)."""
    net = randomize(_mlsd("models.mbv2_mlsd_large").MobileV2_MLSD_Large(), 3).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        features: list[torch.Tensor] = []
        hook = net.block23.conv3.register_forward_hook(lambda m, i, out: features.append(out))
        rgb = PHOTOS["astronaut"].astype(np.float32)
        net(_chw(np.concatenate([rgb, np.ones_like(rgb[:, :, :1])], axis=2) / 127.5 - 1.0))
        hook.remove()
        _standardise(net.block23.conv3, features[0], slice(7, 8), -1.0, 1.5)
        _standardise(net.block23.conv3, features[0], slice(8, 12), 0.0, 8.0)
    return {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """The random tensors of each file, as the file holds them."""
    return {
        REALISTIC: _random_generator(0),
        COARSE: _random_generator(1),
        ANIME: _random_anime(),
        MLSD: _random_mlsd(),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory, weights) -> Path:
    """The four files under their real names, each a plain state dict."""
    where = tmp_path_factory.mktemp("lines_weights")
    for name, tensors in weights.items():
        torch.save(tensors, where / name)
    return where


@pytest.fixture(scope="module")
def oracles(folder) -> dict[str, object]:
    """controlnet_aux's detectors, read by their own from_pretrained from the same folder."""
    return {
        "lineart": aux_module("lineart").LineartDetector.from_pretrained(str(folder)),
        "lineart_anime": aux_module("lineart_anime").LineartAnimeDetector.from_pretrained(str(folder)),
        "mlsd": _mlsd().MLSDdetector.from_pretrained(str(folder)),
    }


def _oracle(detector, rgb: np.ndarray, **options) -> np.ndarray:
    """A detector's map at the image's own size (detect and image resolution = its short side)."""
    side = min(rgb.shape[:2])
    return detector(rgb, detect_resolution=side, image_resolution=side, output_type="np", **options)


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
    np.testing.assert_array_equal(ours, _oracle(oracles["lineart"], rgb))


def test_lineart_coarse_reads_its_own_file_and_equals_the_reference(folder: Path, oracles) -> None:
    rgb = PHOTOS["chelsea"]
    ours = _ours("lineart_coarse", folder, rgb)
    _assert_grey_levels(ours)
    np.testing.assert_array_equal(ours, _oracle(oracles["lineart"], rgb, coarse=True))
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
    np.testing.assert_array_equal(ours, _oracle(oracles["lineart_anime"], rgb))


def test_a_size_off_the_64_grid_is_padded_and_cropped_as_the_extension_does(folder: Path, oracles) -> None:
    """The extension edge-pads to multiples of 64 and crops the map back: the same as running the
    reference on the padded image and cropping."""
    rgb = PHOTOS["chelsea"][:200, :250]
    padded = np.pad(rgb, ((0, 56), (0, 6), (0, 0)), mode="edge")
    ours = _ours("lineart_realistic", folder, rgb)
    assert ours.shape == (200, 250, 3)
    np.testing.assert_array_equal(ours, _oracle(oracles["lineart"], padded)[:200, :250])


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
    np.testing.assert_array_equal(ours, _oracle(oracles["mlsd"], rgb))


@pytest.mark.parametrize(("thr_v", "thr_d"), [(0.3, 5.0), (0.05, 12.0), (2.0, 0.1)])
def test_mlsd_thresholds_act_as_the_references(thr_v: float, thr_d: float, folder: Path, oracles) -> None:
    """Other thresholds, down to none kept (a score never exceeds 2: a black map, as the reference's
    failure on no segments leaves it)."""
    rgb = PHOTOS["coffee"]
    ours = _ours("mlsd", folder, rgb, thr_v=thr_v, thr_d=thr_d)
    np.testing.assert_array_equal(ours, _oracle(oracles["mlsd"], rgb, thr_v=thr_v, thr_d=thr_d))
    assert (ours.max() == 0) == (thr_v == 2.0)


def test_mlsd_pads_a_size_off_the_64_grid_and_crops_the_map(folder: Path, oracles) -> None:
    rgb = PHOTOS["astronaut"][:230, :200]
    padded = np.pad(rgb, ((0, 26), (0, 56), (0, 0)), mode="edge")
    ours = _ours("mlsd", folder, rgb)
    assert ours.shape == (230, 200, 3)
    np.testing.assert_array_equal(ours, _oracle(oracles["mlsd"], padded)[:230, :200])


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
    reference = _mlsd("utils").pred_lines
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

"""Soft edges and scribbles (annotators/softedge.py: softedge_hed, softedge_hedsafe, softedge_pidinet,
softedge_pidisafe, scribble_hed, scribble_pidinet) against controlnet_aux's HEDdetector and
PidiNetDetector on the same weights: random weights with the real files' key layouts, saved under
the real file names, run on scikit-image's photographs.

Tolerance: none. On the CPU in float32 every map equals the oracle's, byte for byte (the networks
run the same convolutions on the same tensors; PiDiNet's rewritten kernels are the values the
reference builds at every call). bfloat16 is compared with float32 by the bound stated in its test.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from controlnet.annotators import Runtime, get_annotator, run_annotator
from controlnet.annotators.networks.pidinet import PixelDifferenceConv, plain_kernel
from controlnet.annotators.weights import AnnotatorWeightsError

from . import annotator_weights
from .annotator_weights import photo, pidi_model
from .reference_annotators import at_own_size, aux_module

HED_FILE, PIDINET_FILE = "ControlNetHED.pth", "table5_pidinet.pth"

PHOTOS = {name: photo(name, width) for name, width in (("astronaut", 256), ("coffee", 320), ("chelsea", 320))}


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """The random tensors of each file, as the file holds them."""
    return {HED_FILE: annotator_weights.hed(), PIDINET_FILE: annotator_weights.pidinet()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, weights) -> Path:
    """Both files under their real names, in their real layouts: ControlNetHED.pth a plain state
    dict; table5_pidinet.pth the PiDiNet authors' checkpoint, {"state_dict": {"module.<key>": ...}}."""
    return annotator_weights.write_files(tmp_path_factory.mktemp("softedge_weights"), weights)


@pytest.fixture(scope="module")
def oracles(folder) -> dict[str, object]:
    """controlnet_aux's detectors, read by their own from_pretrained from the same folder."""
    return {
        "hed": aux_module("hed").HEDdetector.from_pretrained(str(folder)),
        "pidinet": aux_module("pidi").PidiNetDetector.from_pretrained(str(folder)),
    }


def _ours(name: str, folder: Path, rgb: np.ndarray, dtype: str = "float32") -> np.ndarray:
    return run_annotator(name, rgb, None, runtime=Runtime(folder, "cpu", dtype))


def _assert_a_real_map(out: np.ndarray, binary: bool) -> None:
    """Not a degenerate map: for soft edges a spread of levels, for scribbles both 0 and 255."""
    assert out.shape[2] == 3 and (out == out[:, :, :1]).all()
    if binary:
        assert set(np.unique(out)) == {0, 255} and 0.01 < (out == 255).mean() < 0.9  # random weights: dense
    else:
        assert len(np.unique(out)) > 50 and (out == 0).mean() < 0.5 and (out == 255).mean() < 0.5


# ------------------------------------------------------------------------------------------------
# Equal to controlnet_aux on the same weights


@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize(("name", "network"), [("softedge_hed", "hed"), ("softedge_pidinet", "pidinet")])
def test_soft_edges_equal_controlnet_aux_on_photographs(name, network, photo, folder, oracles) -> None:
    rgb = PHOTOS[photo]
    ours = _ours(name, folder, rgb)
    _assert_a_real_map(ours, binary=False)
    np.testing.assert_array_equal(ours, at_own_size(oracles[network], rgb))


@pytest.mark.parametrize(
    ("name", "network", "flags", "photo"),
    [
        ("softedge_hedsafe", "hed", {"safe": True}, "coffee"),
        ("softedge_pidisafe", "pidinet", {"safe": True}, "chelsea"),
        ("scribble_hed", "hed", {"scribble": True}, "chelsea"),
        ("scribble_pidinet", "pidinet", {"scribble": True}, "coffee"),
    ],
)
def test_safe_and_scribble_variants_equal_controlnet_aux(name, network, flags, photo, folder, oracles) -> None:
    rgb = PHOTOS[photo][32:224, 32:288]  # 192 x 256: the post-processing on a smaller map, to save time
    ours = _ours(name, folder, rgb)
    if "safe" in flags:  # safe_step leaves the levels 0, 127 and 255 (x * 1.5 floored, halved)
        assert set(np.unique(ours)) <= {0, 127, 255} and len(np.unique(ours)) == 3
    else:
        _assert_a_real_map(ours, binary=True)
    np.testing.assert_array_equal(ours, at_own_size(oracles[network], rgb, **flags))


def test_other_sizes_are_edge_padded_and_scribbled_after_the_crop_as_the_extension_does(folder, oracles) -> None:
    """The AUTOMATIC1111 extension (scripts/preprocessor/legacy/processor.py) edge-pads the image to
    multiples of 64, runs the network, crops the map back, and for scribble_hed / scribble_pidinet
    thins and thresholds the cropped map. controlnet_aux has no padding; so its detector runs on the
    padded image here and the extension's steps after it (nms 127 / sigma 3, blur sigma 3, > 4)."""
    rgb = PHOTOS["chelsea"][:150, :170]
    padded = np.pad(rgb, ((0, 42), (0, 22), (0, 0)), mode="edge")
    soft = at_own_size(oracles["hed"], padded)[:150, :170, 0]
    np.testing.assert_array_equal(_ours("softedge_hed", folder, rgb)[:, :, 0], soft)
    thin = aux_module("util").nms(soft, 127, 3.0)
    scribble = cv2.GaussianBlur(thin, (0, 0), 3.0)
    scribble = np.where(scribble > 4, 255, 0).astype(np.uint8)
    np.testing.assert_array_equal(_ours("scribble_hed", folder, rgb)[:, :, 0], scribble)


@pytest.mark.parametrize("kind", ["cv", "cd", "ad", "rd"])
def test_pixel_difference_convolutions_equal_the_reference_operators(kind: str) -> None:
    """Each kind, rewritten once as a plain convolution, gives the reference's operator
    (controlnet_aux pidi/model.py createConvFunc) exactly, on a full and on a depthwise layer."""
    make = pidi_model().createConvFunc(kind)
    generator = torch.Generator().manual_seed(3)
    for channels_in, channels_out, groups in ((3, 8, 1), (6, 6, 6)):
        conv = PixelDifferenceConv(kind, channels_in, channels_out, groups)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        weight = conv.weight.detach().clone()
        x = torch.randn(1, channels_in, 13, 17, generator=generator)
        conv.convert()
        with torch.no_grad():
            torch.testing.assert_close(conv(x), make(x, weight, None, 1, 1, 1, groups), rtol=0, atol=0)
    if kind != "cd":
        assert plain_kernel(kind, weight).shape[-1] == (5 if kind == "rd" else 3)


# ------------------------------------------------------------------------------------------------
# Other files and precisions


def test_the_safetensors_version_of_each_file_gives_the_same_maps(tmp_path, weights, folder) -> None:
    """A .safetensors file with the same tensors (PiDiNet's keys still prefixed "module.", with no
    "state_dict" around them: safetensors holds tensors only) is found under its own name."""
    for name, tensors in weights.items():
        save_file(tensors, tmp_path / (Path(name).stem + ".safetensors"))
    rgb = PHOTOS["astronaut"][64:192, 64:192]
    for annotator in ("softedge_hed", "softedge_pidinet"):
        np.testing.assert_array_equal(_ours(annotator, tmp_path, rgb), _ours(annotator, folder, rgb))


# bfloat16 keeps 8 significant bits, so every layer rounds; through HED's 13 layers and PiDiNet's
# 16 blocks the random-weight maps on this crop drift from float32 by (measured: mean 0.57 and at
# most 3 levels for HED, mean 1.37 and at most 9 levels for PiDiNet) at most these bounds: the mean
# absolute difference in levels of 0..255, and the largest.
BF16_BOUNDS = {"softedge_hed": (1.5, 10), "softedge_pidinet": (4.0, 28)}


@pytest.mark.parametrize("name", sorted(BF16_BOUNDS))
def test_bfloat16_maps_stay_close_to_float32(name, folder) -> None:
    rgb = PHOTOS["coffee"][64:192, 96:224]
    full = _ours(name, folder, rgb).astype(np.int16)
    half = _ours(name, folder, rgb, "bfloat16").astype(np.int16)
    mean_bound, max_bound = BF16_BOUNDS[name]
    difference = np.abs(full - half)
    assert difference.mean() <= mean_bound and difference.max() <= max_bound


# ------------------------------------------------------------------------------------------------
# Bad files


@pytest.mark.parametrize("name", ["softedge_hed", "scribble_pidinet"])
def test_a_missing_file_is_one_line_naming_the_file_the_folder_and_the_source(name, tmp_path) -> None:
    weight = get_annotator(name).weights[0]
    with pytest.raises(AnnotatorWeightsError) as refused:
        _ours(name, tmp_path, PHOTOS["astronaut"][:64, :64])
    message = str(refused.value)
    assert "\n" not in message and weight.name in message and str(tmp_path) in message
    assert "https://huggingface.co/lllyasviel/Annotators" in message


@pytest.mark.parametrize(
    ("name", "given", "expected", "looks_like"),
    [
        ("softedge_hed", PIDINET_FILE, HED_FILE, PIDINET_FILE),
        ("softedge_pidisafe", HED_FILE, PIDINET_FILE, HED_FILE),
    ],
)
def test_the_other_network_file_under_this_name_is_named_as_such(
    name, given, expected, looks_like, tmp_path, folder
) -> None:
    (tmp_path / expected).write_bytes((folder / given).read_bytes())
    with pytest.raises(AnnotatorWeightsError) as refused:
        _ours(name, tmp_path, PHOTOS["astronaut"][:64, :64])
    message = str(refused.value)
    network = get_annotator(name).weights[0].network
    assert "\n" not in message and f"not {network}" in message and f"looks like {looks_like}" in message


def test_a_file_of_the_right_keys_but_other_shapes_names_them(tmp_path, weights) -> None:
    tensors = dict(weights[HED_FILE])
    tensors["block5.projection.weight"] = torch.zeros(1, 256, 1, 1)
    torch.save(tensors, tmp_path / HED_FILE)
    with pytest.raises(AnnotatorWeightsError, match=r"block5\.projection\.weight \(1, 256, 1, 1\)") as refused:
        _ours("softedge_hed", tmp_path, PHOTOS["astronaut"][:64, :64])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04" + bytes(200)], ids=["text", "zip"])
def test_a_corrupt_file_is_one_line(content: bytes, tmp_path) -> None:
    (tmp_path / PIDINET_FILE).write_bytes(content)
    with pytest.raises(AnnotatorWeightsError) as refused:
        _ours("softedge_pidinet", tmp_path, PHOTOS["astronaut"][:64, :64])
    message = str(refused.value)
    assert "\n" not in message and PIDINET_FILE in message

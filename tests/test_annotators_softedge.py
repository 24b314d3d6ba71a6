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
import skimage.data
import torch
from safetensors.torch import save_file

from controlnet.annotators import Runtime, get_annotator, run_annotator
from controlnet.annotators.networks.pidinet import PixelDifferenceConv, plain_kernel
from controlnet.annotators.weights import AnnotatorWeightsError

from .reference_annotators import aux_module

HED_FILE, PIDINET_FILE = "ControlNetHED.pth", "table5_pidinet.pth"


def _photo(name: str, width: int) -> np.ndarray:
    """A scikit-image photograph, its short side resized to 256 (INTER_AREA), the centre `width`
    columns kept: sides multiples of 64, as run_annotator sizes them."""
    rgb = getattr(skimage.data, name)()
    h, w = rgb.shape[:2]
    scaled = cv2.resize(rgb, (round(w * 256 / h), 256), interpolation=cv2.INTER_AREA)
    left = (scaled.shape[1] - width) // 2
    return np.ascontiguousarray(scaled[:, left : left + width])


PHOTOS = {"astronaut": _photo("astronaut", 256), "coffee": _photo("coffee", 320), "chelsea": _photo("chelsea", 320)}


def _pidi_model():
    """controlnet_aux pidi/model.py, its package's __init__ (PidiNetDetector) imported first: the
    loader enters a package bare when a submodule is asked for before it."""
    aux_module("pidi")
    return aux_module("pidi.model")


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]


def _random_hed() -> dict[str, torch.Tensor]:
    """ControlNetHED_Apache2's keys and shapes, random: He-normal convolutions (activations keep
    their scale through 13 ReLU layers), a typical mean pixel as `norm`, and each side projection
    rescaled so that its map on the astronaut has mean 0 and standard deviation 3: the sigmoid of
    the mean of the five maps then spans the whole 0..255 range without saturating."""
    torch.manual_seed(0)
    net = aux_module("hed").ControlNetHED_Apache2()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 1.0)
        net.norm.copy_(torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1))
        for k, side in enumerate(net(_chw(PHOTOS["astronaut"])), start=1):
            projection = getattr(net, f"block{k}").projection
            scale = 3.0 / side.std()
            projection.weight.mul_(scale)
            projection.bias.sub_(side.mean()).mul_(scale)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _random_pidinet() -> dict[str, torch.Tensor]:
    """pidinet()'s keys and shapes (carv4, 60 channels, dil 24, attention) with its own random
    initialisation, each side map's reduction rescaled to mean 0 and deviation 1 on the astronaut,
    and random fusion weights: the fused edge probability spans 0..1. Keys as the file has them,
    with DataParallel's "module." prefix."""
    torch.manual_seed(1)
    net = _pidi_model().pidinet().eval()
    sides: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, i, out: sides.append(out)) for r in net.conv_reduces]
    with torch.no_grad():
        net(_chw(PHOTOS["astronaut"][:, :, ::-1]) / 255.0)
        for hook in hooks:
            hook.remove()
        for reduce, side in zip(net.conv_reduces, sides, strict=True):
            scale = 1.0 / side.std()
            reduce.conv.weight.mul_(scale)
            reduce.conv.bias.sub_(side.mean()).mul_(scale)
        net.classifier.weight.normal_(0.0, 1.5)
        net.classifier.bias.zero_()
    return {f"module.{k}": v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """The random tensors of each file, as the file holds them."""
    return {HED_FILE: _random_hed(), PIDINET_FILE: _random_pidinet()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, weights) -> Path:
    """Both files under their real names, in their real layouts: ControlNetHED.pth a plain state
    dict; table5_pidinet.pth the PiDiNet authors' checkpoint, {"state_dict": {"module.<key>": ...}}."""
    where = tmp_path_factory.mktemp("softedge_weights")
    torch.save(weights[HED_FILE], where / HED_FILE)
    torch.save({"epoch": 14, "state_dict": weights[PIDINET_FILE]}, where / PIDINET_FILE)
    return where


@pytest.fixture(scope="module")
def oracles(folder) -> dict[str, object]:
    """controlnet_aux's detectors, read by their own from_pretrained from the same folder."""
    return {
        "hed": aux_module("hed").HEDdetector.from_pretrained(str(folder)),
        "pidinet": aux_module("pidi").PidiNetDetector.from_pretrained(str(folder)),
    }


def _oracle(oracles, network: str, rgb: np.ndarray, **flags) -> np.ndarray:
    """The detector's map at the image's own size (detect and image resolution = its short side)."""
    side = min(rgb.shape[:2])
    return oracles[network](rgb, detect_resolution=side, image_resolution=side, output_type="np", **flags)


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
    np.testing.assert_array_equal(ours, _oracle(oracles, network, rgb))


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
    np.testing.assert_array_equal(ours, _oracle(oracles, network, rgb, **flags))


def test_other_sizes_are_edge_padded_and_scribbled_after_the_crop_as_the_extension_does(folder, oracles) -> None:
    """The AUTOMATIC1111 extension (scripts/preprocessor/legacy/processor.py) edge-pads the image to
    multiples of 64, runs the network, crops the map back, and for scribble_hed / scribble_pidinet
    thins and thresholds the cropped map. controlnet_aux has no padding; so its detector runs on the
    padded image here and the extension's steps after it (nms 127 / sigma 3, blur sigma 3, > 4)."""
    rgb = PHOTOS["chelsea"][:150, :170]
    padded = np.pad(rgb, ((0, 42), (0, 22), (0, 0)), mode="edge")
    soft = _oracle(oracles, "hed", padded)[:150, :170, 0]
    np.testing.assert_array_equal(_ours("softedge_hed", folder, rgb)[:, :, 0], soft)
    thin = aux_module("util").nms(soft, 127, 3.0)
    scribble = cv2.GaussianBlur(thin, (0, 0), 3.0)
    scribble = np.where(scribble > 4, 255, 0).astype(np.uint8)
    np.testing.assert_array_equal(_ours("scribble_hed", folder, rgb)[:, :, 0], scribble)


@pytest.mark.parametrize("kind", ["cv", "cd", "ad", "rd"])
def test_pixel_difference_convolutions_equal_the_reference_operators(kind: str) -> None:
    """Each kind, rewritten once as a plain convolution, gives the reference's operator
    (controlnet_aux pidi/model.py createConvFunc) exactly, on a full and on a depthwise layer."""
    make = _pidi_model().createConvFunc(kind)
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

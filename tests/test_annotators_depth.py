"""The depth family (depth_midas, normal_midas, depth_anything_v2*) against independent
implementations on the same random weights with the real key layouts, on real photographs.

Oracles: controlnet_aux's MiDaS needs timm, which must not be installed beside this project's torch;
transformers' DPTForDepthEstimation (hybrid config: BiT backbone) and DepthAnythingForDepthEstimation
are independent implementations of the same networks, loaded from our files through key maps
(tests/reference_annotators.py). MiDaS's pre- and post-processing is controlnet_aux's own ``MidasDetector.__call__``
(the module is imported with an empty stand-in for ``timm``, which it only calls when building its
network); Depth Anything V2's (not in controlnet_aux 0.0.10) is the extension's
annotator/depth_anything_v2.py written out below.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from controlnet.annotators import ANNOTATORS, Runtime, run_annotator
from controlnet.annotators.depth import DA2_WEIGHTS, MIDAS_WEIGHTS
from controlnet.annotators.networks.depth_anything_v2 import ENCODERS, DepthAnythingV2
from controlnet.annotators.weights import AnnotatorWeightsError

from . import annotator_weights
from .reference_annotators import da2_to_transformers, midas_detector

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
cv2 = pytest.importorskip("cv2")


def _photo(name: str, h: int = 256, w: int = 256) -> np.ndarray:
    image = getattr(skimage_data, name)()
    return np.ascontiguousarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiDaS's file and Depth Anything V2 ViT-S's, random in their real layouts."""
    where = tmp_path_factory.mktemp("depth_weights")
    annotator_weights.write(where, MIDAS_WEIGHTS.name)
    annotator_weights.write(where, DA2_WEIGHTS["vits"].name)
    return where


def _state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / name, weights_only=True)


def _hf_da2(state: dict[str, torch.Tensor], encoder: str) -> torch.nn.Module:
    e = ENCODERS[encoder]
    backbone = transformers.Dinov2Config(
        hidden_size=e.width,
        num_hidden_layers=e.depth,
        num_attention_heads=e.heads,
        patch_size=14,
        image_size=518,
        out_indices=[i + 1 for i in e.taken],
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=e.width,
        patch_size=14,
        fusion_hidden_size=e.features,
        neck_hidden_sizes=list(e.head_channels),
    )
    with torch.device("meta"):  # no random initialisation (13 s of ViT-L's): the file's tensors are taken
        model = transformers.DepthAnythingForDepthEstimation(config).eval()
    model.load_state_dict(da2_to_transformers(state), strict=True, assign=True)
    return model


@pytest.fixture(scope="module")
def aux_midas(folder: Path):
    return midas_detector(_state(folder, MIDAS_WEIGHTS.name))


def _da2_reference(model: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """The extension's DepthAnythingV2Detector (colored=False), written out: image / 255 (we feed
    RGB, see depth.da2_input), resized by util/transform.py's lower-bound rule (518, multiples of
    14) with cubic interpolation in float64, ImageNet-normalised, the network, bilinear back,
    min-max to 0..255, truncated."""
    h, w = rgb.shape[:2]
    scale = max(518 / h, 518 / w)
    sizes = []
    for x in (scale * h, scale * w):
        y = (np.round(x / 14) * 14).astype(int)
        sizes.append(int(y if y >= 518 else np.ceil(x / 14) * 14))
    image = cv2.resize(rgb / 255.0, (sizes[1], sizes[0]), interpolation=cv2.INTER_CUBIC)
    image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32))[None]
    with torch.no_grad():
        depth = model(pixel_values=x).predicted_depth
    depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    return depth.numpy().astype(np.uint8)


def _dinov2_positions(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv2's own position resizing (dinov2.py ``interpolate_pos_encoding``): bicubic by the scale
    factors (grid + 0.1) / 37. transformers resizes to the grid's size instead, which samples other
    points; the oracle is given the original's rule so that the rest of it can be compared."""
    pos = self.position_embeddings.float()
    grid, dim = int(math.sqrt(pos.shape[1] - 1)), pos.shape[-1]
    rows, cols = height // 14, width // 14
    if rows == cols == grid:
        return self.position_embeddings
    patch = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid), mode="bicubic")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos[:, :1], patch], dim=1).to(self.position_embeddings.dtype)


def _hf_da2_with_original_positions(state: dict[str, torch.Tensor], encoder: str) -> torch.nn.Module:
    model = _hf_da2(state, encoder)
    embeddings = model.backbone.embeddings
    embeddings.interpolate_pos_encoding = types.MethodType(_dinov2_positions, embeddings)
    return model


def _fp32(folder: Path) -> Runtime:
    return Runtime(folder, "cpu", "float32")


def _differences(ours: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    return int(diff.max()), int(np.count_nonzero(diff))


def _varied(image: np.ndarray) -> None:
    assert image.min() < 64 and image.max() > 191 and len(np.unique(image)) > 32, "random weights gave a flat map"


# ------------------------------------------------------------------------------------------------
# MiDaS: depth_midas and normal_midas against controlnet_aux's MidasDetector on transformers' DPT


def test_depth_midas_equals_controlnet_aux_on_a_photo(folder: Path, aux_midas) -> None:
    # transformers' hybrid DPT reassembles square token grids only: square photos.
    rgb = _photo("astronaut")
    ours = run_annotator("depth_midas", rgb, runtime=_fp32(folder))
    reference = aux_midas(rgb, detect_resolution=256, image_resolution=256, output_type="np")
    _varied(ours[:, :, 0])
    # Measured: identical (the networks agree to the last bit on this input).
    assert _differences(ours, reference) == (0, 0)


def test_normal_midas_equals_controlnet_aux_with_the_extension_threshold(folder: Path, aux_midas) -> None:
    rgb = _photo("chelsea", 128, 128)
    ours = run_annotator("normal_midas", rgb, runtime=_fp32(folder), bg_th=0.4)
    _, reference = aux_midas(
        rgb, a=2 * math.pi, bg_th=0.4, depth_and_normal=True, detect_resolution=128, image_resolution=128
    )
    assert len(np.unique(ours.reshape(-1, 3), axis=0)) > 32, "random weights gave flat normals"
    # the background (scaled depth below bg_th) faces the viewer: (z, y, x) = (255, 127, 127)
    assert (ours == [255, 127, 127]).all(axis=2).any(), "no background below the threshold"
    # The depths agree to float rounding; a gradient exactly at a .5 level boundary can round the
    # other way. Measured: 1 value of 49152 off by one level. Bound: off by one, at most 16 values.
    worst, count = _differences(ours, reference)
    assert worst <= 1 and count <= 16


def test_midas_reads_the_safetensors_version_and_runs_in_bfloat16(folder: Path, tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(_state(folder, MIDAS_WEIGHTS.name), str(tmp_path / MIDAS_WEIGHTS.safetensors_name))
    rgb = _photo("coffee", 64, 64)
    reference = run_annotator("depth_midas", rgb, runtime=_fp32(folder))
    assert np.array_equal(run_annotator("depth_midas", rgb, runtime=_fp32(tmp_path)), reference)
    half = run_annotator("depth_midas", rgb, runtime=Runtime(folder, "cpu", "bfloat16"))
    # bf16 keeps 8 bits of mantissa through the ResNet and 12 transformer blocks, and min-max scaling
    # stretches the random network's narrow depth range: measured on this photo a mean difference of
    # 9.7 levels (max 80) from float32. Bound: mean below 16.
    assert np.abs(half.astype(int) - reference.astype(int)).mean() < 16


# ------------------------------------------------------------------------------------------------
# Depth Anything V2 against transformers' DepthAnythingForDepthEstimation, the extension's steps


# encoder: its annotator, and the photo (scikit-image name, height, width) it is compared on. The
# preprocessing resizes every photo to a short side of 518 (multiples of 14), so a small photo runs
# the same network on the same token count as a large one: the cost is the network's, not the photo's.
DA2_CASES = {
    # Not square: the network's input is 518 x 644, so the position grid is resized (37 x 46).
    "vits": ("depth_anything_v2_vits", ("coffee", 256, 320)),
    # Square: 518 x 518, the file's own 37 x 37 position grid, unresized. ViT-B's and ViT-L's
    # backbones cost about 3 and 9 times ViT-S's; square inputs (1369 tokens, not 1702) save a fifth.
    "vitb": ("depth_anything_v2_vitb", ("astronaut", 128, 128)),
    "vitl": ("depth_anything_v2", ("chelsea", 128, 128)),
}


@pytest.mark.parametrize("encoder", sorted(DA2_CASES))
def test_depth_anything_v2_equals_the_extension_steps_on_transformers(
    encoder: str, folder: Path, tmp_path: Path
) -> None:
    name, photo = DA2_CASES[encoder]
    weight = DA2_WEIGHTS[encoder]
    if (folder / weight.name).exists():
        where, state = folder, _state(folder, weight.name)
    else:  # ViT-B's and ViT-L's (1.3 GB) files: this test's, deleted after it
        where, state = tmp_path, annotator_weights.TENSORS[weight.name]()
        annotator_weights.write(where, weight.name, state)
    try:
        reference_model = _hf_da2_with_original_positions(state, encoder)
        rgb = _photo(*photo)
        ours = run_annotator(name, rgb, runtime=_fp32(where))
        reference = _da2_reference(reference_model, rgb)
    finally:
        ANNOTATORS[name].release()  # ViT-L's 1.3 GB of weights: not kept for the rest of the suite
        if where == tmp_path:
            (where / weight.name).unlink()
    _varied(ours[:, :, 0])
    assert np.array_equal(ours[:, :, 0], ours[:, :, 2])
    # Measured: identical for each size.
    assert _differences(ours[:, :, 0], reference) == (0, 0)


@pytest.mark.parametrize("encoder", ["vitb", "vitl"])
def test_depth_anything_v2_base_and_large_have_the_original_key_layout(encoder: str) -> None:
    # Built on the meta device (no memory, no run): every key maps onto transformers' model for
    # that size, with the same shape, and nothing is left over on either side (a quick, exact
    # failure before the exactness test above runs them).
    with torch.device("meta"):
        ours = DepthAnythingV2(encoder).state_dict()
        theirs = _hf_da2_meta(encoder).state_dict()
    mapped = da2_to_transformers(ours)
    assert set(mapped) == set(theirs)
    assert all(mapped[k].shape == theirs[k].shape for k in theirs)
    assert DA2_WEIGHTS[encoder].holds(ours)


def _hf_da2_meta(encoder: str) -> torch.nn.Module:
    e = ENCODERS[encoder]
    backbone = transformers.Dinov2Config(
        hidden_size=e.width, num_hidden_layers=e.depth, num_attention_heads=e.heads, patch_size=14, image_size=518
    )
    return transformers.DepthAnythingForDepthEstimation(
        transformers.DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=e.width,
            fusion_hidden_size=e.features,
            neck_hidden_sizes=list(e.head_channels),
        )
    )


# ------------------------------------------------------------------------------------------------
# Bad input


def test_each_depth_annotator_without_its_file_names_it_the_folder_and_the_source(tmp_path: Path) -> None:
    for name in ("depth_midas", "normal_midas", "depth_anything_v2", "depth_anything_v2_vitb"):
        weight = ANNOTATORS[name].weights[0]
        with pytest.raises(AnnotatorWeightsError) as caught:
            run_annotator(name, np.zeros((64, 64, 3), np.uint8), runtime=_fp32(tmp_path))
        message = str(caught.value)
        assert "\n" not in message and weight.name in message and str(tmp_path) in message
        assert weight.source in message


def test_another_depth_file_under_the_midas_name_names_what_was_expected(folder: Path, tmp_path: Path) -> None:
    (tmp_path / MIDAS_WEIGHTS.name).write_bytes((folder / DA2_WEIGHTS["vits"].name).read_bytes())
    with pytest.raises(AnnotatorWeightsError, match="not the MiDaS v3 DPT-Hybrid depth network") as caught:
        run_annotator("depth_midas", np.zeros((64, 64, 3), np.uint8), runtime=_fp32(tmp_path))
    # vits and vitb files hold the same keys (their shapes differ): either is named
    assert "\n" not in str(caught.value) and "looks like depth_anything_v2_vit" in str(caught.value)


def test_a_vits_file_under_the_vitl_name_is_refused_in_one_line(folder: Path, tmp_path: Path) -> None:
    (tmp_path / DA2_WEIGHTS["vitl"].name).write_bytes((folder / DA2_WEIGHTS["vits"].name).read_bytes())
    with pytest.raises(AnnotatorWeightsError, match="ViT-L") as caught:
        run_annotator("depth_anything_v2", np.zeros((64, 64, 3), np.uint8), runtime=_fp32(tmp_path))
    assert "\n" not in str(caught.value)


def test_a_corrupt_depth_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / DA2_WEIGHTS["vits"].name).write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    with pytest.raises(AnnotatorWeightsError) as caught:
        run_annotator("depth_anything_v2_vits", np.zeros((64, 64, 3), np.uint8), runtime=_fp32(tmp_path))
    assert "\n" not in str(caught.value) and DA2_WEIGHTS["vits"].name in str(caught.value)

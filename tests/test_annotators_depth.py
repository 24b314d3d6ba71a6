"""The depth family (depth_midas, normal_midas, depth_anything_v2*) against independent
implementations on the same random weights with the real key layouts, on real photographs.

Oracles: controlnet_aux's MiDaS needs timm, which must not be installed beside this project's torch;
transformers' DPTForDepthEstimation (hybrid config: BiT backbone) and DepthAnythingForDepthEstimation
are independent implementations of the same networks, loaded from our files through key maps
written here. MiDaS's pre- and post-processing is controlnet_aux's own ``MidasDetector.__call__``
(the module is imported with an empty stand-in for ``timm``, which it only calls when building its
network); Depth Anything V2's (not in controlnet_aux 0.0.10) is the extension's
annotator/depth_anything_v2.py written out below.
"""

from __future__ import annotations

import functools
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from controlnet.annotators import ANNOTATORS, Runtime, run_annotator
from controlnet.annotators.depth import DA2_WEIGHTS, MIDAS_WEIGHTS
from controlnet.annotators.networks.depth_anything_v2 import ENCODERS, DepthAnythingV2
from controlnet.annotators.networks.midas import DPTHybridMiDaS
from controlnet.annotators.weights import AnnotatorWeightsError

from .reference_annotators import aux_module

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
cv2 = pytest.importorskip("cv2")


def _photo(name: str, h: int = 256, w: int = 256) -> np.ndarray:
    image = getattr(skimage_data, name)()
    return np.ascontiguousarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA))


# ------------------------------------------------------------------------------------------------
# Random weights with the real layouts


def _randomise(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights that keep activations in range: every tensor normal with std 1/sqrt(fan-in)
    (LayerNorm/GroupNorm weights near 1, biases small, position embeddings and tokens 0.5), and the
    last conv's bias positive so the final ReLU leaves a varied, non-zero map."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        t = torch.randn(value.shape, generator=g)
        if key.endswith("gamma") or (value.ndim == 1 and key.endswith("weight")):
            t = 1.0 + 0.1 * t
        elif value.ndim == 1:
            t = 0.05 * t
        elif "pos_embed" in key or "token" in key:
            t = 0.5 * t
        else:
            t = t / math.sqrt(max(1, value[0].numel()))
        state[key] = t.contiguous()
    return state


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("depth_weights")
    midas = _randomise(DPTHybridMiDaS(), 0)
    midas["scratch.output_conv.4.bias"] = torch.tensor([0.5])
    torch.save(midas, where / MIDAS_WEIGHTS.name)
    da2 = _randomise(DepthAnythingV2("vits"), 1)
    da2["depth_head.scratch.output_conv2.2.bias"] = torch.tensor([0.5])
    torch.save(da2, where / DA2_WEIGHTS["vits"].name)
    return where


def _state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / name, weights_only=True)


# ------------------------------------------------------------------------------------------------
# Key maps from the original files to transformers' layouts (written from the module structures;
# transformers' convert_dpt_hybrid_to_pytorch.py and convert_depth_anything_to_hf.py show the same)


def _split_qkv(prefix: str, kind: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    names = (f"{prefix}.attention.attention.{n}.{kind}" for n in ("query", "key", "value"))
    return dict(zip(names, value.chunk(3, dim=0), strict=True))


def _fusion(rest: str) -> str:
    # refinenetN.resConfUnitK.convJ -> residual_layerK.convolutionJ; out_conv -> projection
    rest = rest.replace("resConfUnit", "residual_layer").replace("out_conv", "projection")
    return rest.replace(".conv1", ".convolution1").replace(".conv2", ".convolution2")


_VIT_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense"}


def _decoder_key(key: str) -> str:
    """``scratch....`` of both models -> transformers' neck."""
    if key.startswith("scratch.layer"):
        return f"neck.convs.{int(key[len('scratch.layer')]) - 1}.{key.rsplit('.', 1)[1]}"
    level = int(key[len("scratch.refinenet")])
    return f"neck.fusion_stage.layers.{4 - level}.{_fusion(key.split('.', 2)[2])}"


def midas_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    vit = "pretrained.model."
    for key, value in state.items():
        if key.startswith(vit + "head."):
            continue  # the ImageNet classifier MiDaS never runs
        if key.startswith(vit + "blocks."):
            _, _, _, n, rest = key.split(".", 4)
            prefix = f"dpt.encoder.layer.{n}"
            if rest.startswith("attn.qkv."):
                out.update(_split_qkv(prefix, rest.rsplit(".", 1)[1], value))
                continue
            name, kind = rest.rsplit(".", 1)
            name = _VIT_BLOCK.get(name, {"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}.get(name))
            out[f"{prefix}.{name}.{kind}"] = value
        elif key.startswith(vit + "patch_embed.backbone."):
            rest = key[len(vit + "patch_embed.backbone.") :]
            if rest.startswith("stem."):
                rest = rest.replace("stem.conv", "embedder.convolution").replace("stem.norm", "embedder.norm")
                out[f"dpt.embeddings.backbone.bit.{rest}"] = value
            else:
                out[f"dpt.embeddings.backbone.bit.encoder.{rest.replace('.blocks.', '.layers.')}"] = value
        elif key.startswith(vit):
            rest = key[len(vit) :]
            simple = {"cls_token": "dpt.embeddings.cls_token", "pos_embed": "dpt.embeddings.position_embeddings"}
            if rest in simple:
                out[simple[rest]] = value
            elif rest.startswith("patch_embed.proj."):
                out[f"dpt.embeddings.projection.{rest.rsplit('.', 1)[1]}"] = value
            else:  # the final norm
                out[f"dpt.layernorm.{rest.rsplit('.', 1)[1]}"] = value
        elif key.startswith("pretrained.act_postprocess"):
            level = int(key[len("pretrained.act_postprocess")]) - 1
            index, kind = key.split(".")[2], key.rsplit(".", 1)[1]
            if index == "0":
                out[f"neck.reassemble_stage.readout_projects.{level}.0.{kind}"] = value
            else:
                part = "projection" if index == "3" else "resize"
                out[f"neck.reassemble_stage.layers.{level}.{part}.{kind}"] = value
        elif key.startswith("scratch.output_conv."):
            out["head.head." + key[len("scratch.output_conv.") :]] = value
        else:
            out[_decoder_key(key)] = value
    return out


def da2_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        kind = key.rsplit(".", 1)[1]
        if key.startswith("pretrained.blocks."):
            _, _, n, rest = key.split(".", 3)
            prefix = f"backbone.encoder.layer.{n}"
            if rest.startswith("attn.qkv."):  # transformers' DINOv2 names them q_proj, k_proj, v_proj
                names = (f"{prefix}.attention.{n}_proj.{kind}" for n in "qkv")
                out.update(zip(names, value.chunk(3, dim=0), strict=True))
                continue
            name = rest.rsplit(".", 1)[0]
            name = {"ls1": "layer_scale1", "ls2": "layer_scale2", "attn.proj": "attention.o_proj"}.get(name, name)
            out[f"{prefix}.{name}.{'lambda1' if kind == 'gamma' else kind}"] = value
        elif key.startswith("pretrained."):
            rest = key[len("pretrained.") :]
            simple = {
                "cls_token": "backbone.embeddings.cls_token",
                "mask_token": "backbone.embeddings.mask_token",
                "pos_embed": "backbone.embeddings.position_embeddings",
            }
            if rest in simple:
                out[simple[rest]] = value
            elif rest.startswith("patch_embed.proj."):
                out[f"backbone.embeddings.patch_embeddings.projection.{kind}"] = value
            else:
                out[f"backbone.layernorm.{kind}"] = value
        elif key.startswith("depth_head.projects.") or key.startswith("depth_head.resize_layers."):
            level = key.split(".")[2]
            part = "projection" if ".projects." in key else "resize"
            out[f"neck.reassemble_stage.layers.{level}.{part}.{kind}"] = value
        elif key.startswith("depth_head.scratch.output_conv"):
            rest = key[len("depth_head.scratch.") :]
            name = {"output_conv1": "conv1", "output_conv2.0": "conv2", "output_conv2.2": "conv3"}[
                rest.rsplit(".", 1)[0]
            ]
            out[f"head.{name}.{kind}"] = value
        else:
            out[_decoder_key(key[len("depth_head.") :])] = value
    return out


def _hf_midas(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' DPT-Hybrid as MiDaS builds it (timm's LayerNorm eps 1e-6, blocks 8 and 11 taken),
    allowed any input size (its embeddings resize the position grid when asked)."""
    config = transformers.DPTConfig(
        is_hybrid=True,
        hidden_size=768,
        reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[256, 512, 768, 768],
        backbone_out_indices=[0, 1, 8, 11],
        layer_norm_eps=1e-6,
        readout_type="project",
    )
    model = transformers.DPTForDepthEstimation(config).eval()
    model.load_state_dict(midas_to_transformers(state), strict=True)
    embeddings = model.dpt.embeddings
    embeddings.forward = functools.partial(type(embeddings).forward, embeddings, interpolate_pos_encoding=True)
    return model


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
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    model.load_state_dict(da2_to_transformers(state), strict=True)
    return model


class _timm_stand_in:
    """An empty ``timm`` while controlnet_aux.midas is imported: its vit.py imports timm at the top
    but only calls it when building a network, which the oracle never asks it to."""

    def __enter__(self) -> None:
        self.added = "timm" not in sys.modules
        if self.added:
            sys.modules["timm"] = types.ModuleType("timm")

    def __exit__(self, *exc: object) -> None:
        if self.added:
            sys.modules.pop("timm", None)


class _Predicts(torch.nn.Module):
    """transformers' model as MidasDetector calls its network: (1, 3, H, W) -> (1, H, W)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(pixel_values=x).predicted_depth


@pytest.fixture(scope="module")
def aux_midas(folder: Path):
    with _timm_stand_in():
        module = aux_module("midas")
    return module.MidasDetector(_Predicts(_hf_midas(_state(folder, MIDAS_WEIGHTS.name))))


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


@pytest.fixture(scope="module")
def hf_da2(folder: Path) -> torch.nn.Module:
    model = _hf_da2(_state(folder, DA2_WEIGHTS["vits"].name), "vits")
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


def test_depth_anything_v2_vits_equals_the_extension_steps_on_transformers(folder: Path, hf_da2) -> None:
    # Not square: the network's input is 518 x 644, so the position grid is resized (37 x 46).
    rgb = _photo("coffee", 256, 320)
    ours = run_annotator("depth_anything_v2_vits", rgb, runtime=_fp32(folder))
    reference = _da2_reference(hf_da2, rgb)
    _varied(ours[:, :, 0])
    assert np.array_equal(ours[:, :, 0], ours[:, :, 2])
    # Measured: identical.
    assert _differences(ours[:, :, 0], reference) == (0, 0)


@pytest.mark.parametrize("encoder", ["vitb", "vitl"])
def test_depth_anything_v2_base_and_large_have_the_original_key_layout(encoder: str) -> None:
    # Built on the meta device (no memory, no run): every key maps onto transformers' model for
    # that size, with the same shape, and nothing is left over on either side.
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

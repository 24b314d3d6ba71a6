"""Depth and normals from monocular depth networks, as the AUTOMATIC1111 extension names them:

- ``depth_midas``: MiDaS v3 DPT-Hybrid inverse depth, min-max scaled to 0..255 (near is white);
  feeds ``control_v11f1p_sd15_depth`` (and ControlNet 1.0's ``control_sd15_depth``).
- ``normal_midas``: normals from the Sobel gradients of that depth, the background (scaled depth
  below ``bg_th``) facing the viewer; feeds ControlNet 1.0's ``control_sd15_normal`` (ControlNet
  1.1's normalbae model was trained on another convention: use ``normal_bae`` for it).
- ``depth_anything_v2`` (ViT-L, the extension's), ``depth_anything_v2_vitb``,
  ``depth_anything_v2_vits``: Depth Anything V2 inverse depth, min-max scaled to 0..255 grey;
  feed the depth ControlNets.

MiDaS steps from ControlNet-v1-1-nightly annotator/midas/__init__.py and the extension's
annotator/midas/__init__.py, scripts/preprocessor/legacy/processor.py (``midas``,
``midas_normal``: ``a`` = 2 pi, slider "Normal Background Threshold" 0..1, default 0.4); Depth
Anything V2 steps from the extension's annotator/depth_anything_v2.py (``colored=False``) and
Depth-Anything-V2's dpt.py / util/transform.py. The image arrives sized by `run_annotator` (sides
multiples of 64); other sizes are edge-padded to multiples of 64 and the map cropped back, as the
extension's ``resize_image_with_pad`` / ``remove_pad`` do (the scaling sees the padded map too).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .. import runtime as policy
from ..imaging.images import HWC3
from .base import Annotator, AnnotatorFn, Param, Runtime, pad_to_64
from .networks.depth_anything_v2 import PATCH, DepthAnythingV2
from .networks.midas import DPTHybridMiDaS
from .weights import WeightFile, load_network

MIDAS_WEIGHTS = WeightFile(
    "dpt_hybrid-midas-501f0c75.pt",
    "the MiDaS v3 DPT-Hybrid depth network",
    "https://huggingface.co/lllyasviel/Annotators",
    markers=(
        "pretrained.model.patch_embed.backbone.stem.conv.weight",
        "pretrained.act_postprocess3.0.project.0.weight",
        "scratch.output_conv.4.weight",
    ),
    # about 493 MB; MiDaS's BaseModel.load also accepts a training checkpoint's ["model"] (a wrapper
    # WeightFile unwraps by default)
)


def _da2_weights(encoder: str, label: str, repo: str) -> WeightFile:
    # The extension reads the ViT-L network as depth_anything_v2_vitl.safetensors, which
    # WeightFile.find accepts beside the .pth name.
    return WeightFile(
        f"depth_anything_v2_{encoder}.pth",
        f"the Depth Anything V2 {label} depth network",
        f"https://huggingface.co/depth-anything/{repo}",
        markers=(
            "pretrained.blocks.0.ls1.gamma",
            "depth_head.scratch.output_conv2.0.weight",
            f"pretrained.blocks.{_LAST[encoder]}.attn.qkv.weight",
        ),
    )


_LAST = {"vits": 11, "vitb": 11, "vitl": 23}  # the last block: tells ViT-L from S and B by key alone
DA2_WEIGHTS = {
    "vits": _da2_weights("vits", "ViT-S", "Depth-Anything-V2-Small"),  # about 99 MB, Apache-2.0
    "vitb": _da2_weights("vitb", "ViT-B", "Depth-Anything-V2-Base"),  # about 390 MB, CC-BY-NC-4.0
    "vitl": _da2_weights("vitl", "ViT-L", "Depth-Anything-V2-Large"),  # about 1.34 GB, CC-BY-NC-4.0
}


# ------------------------------------------------------------------------------------------------
# Steps shared by the annotators


def _run(network: torch.nn.Module, pixels: torch.Tensor, runtime: Runtime, what: str) -> torch.Tensor:
    """The network's (H', W') map for (H, W, 3) float32 pixels, in float32 on the CPU."""
    x = pixels.to(runtime.device, policy.DTYPES[runtime.dtype]).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        out = network(x)[0].float().cpu()
    policy.check_finite(out, what)
    return out


def _scaled(depth: torch.Tensor) -> torch.Tensor:
    """Depth shifted to 0 and divided by its maximum, in float32 (annotator/midas/__init__.py); a
    constant map (which the references would turn into NaN) gives zeros."""
    shifted = depth - torch.min(depth)
    top = torch.max(shifted)
    return shifted / top if top > 0 else shifted


# ------------------------------------------------------------------------------------------------
# MiDaS


def midas_depth(network: DPTHybridMiDaS, rgb: np.ndarray, runtime: Runtime) -> torch.Tensor:
    """MiDaS's raw inverse depth (H, W) float32 for an RGB uint8 image with sides multiples of 32,
    fed at its own size as RGB / 127.5 - 1 (no resizing to 384, unlike MiDaS's own demo)."""
    pixels = torch.from_numpy(rgb).float() / 127.5 - 1.0
    return _run(network, pixels, runtime, "the MiDaS network's depth")


def depth_to_uint8(depth: torch.Tensor) -> np.ndarray:
    """Inverse depth as uint8: min-max scaled, times 255, clipped, truncated."""
    return (_scaled(depth).numpy() * 255.0).clip(0, 255).astype(np.uint8)


def normal_from_depth(depth: torch.Tensor, a: float, bg_th: float) -> np.ndarray:
    """The ControlNet 1.0 normal map (H, W, 3) uint8 from MiDaS's raw depth: x and y the 3x3 Sobel
    gradients of the depth along x and y (float32), z = `a`; x and y set to 0 where the min-max
    scaled depth is below `bg_th` (the far background faces the viewer); the vector normalised,
    times 127.5 plus 127.5, clipped, truncated, and stored as (z, y, x) in RGB."""
    raw = depth.numpy()
    x = cv2.Sobel(raw, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(raw, cv2.CV_32F, 0, 1, ksize=3)
    z = np.ones_like(x) * a
    background = _scaled(depth).numpy() < bg_th
    x[background] = 0
    y[background] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    return np.ascontiguousarray((normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1])


def _load_midas(runtime: Runtime) -> DPTHybridMiDaS:
    return load_network(MIDAS_WEIGHTS, runtime.folder, DPTHybridMiDaS, runtime.device, runtime.dtype)


def _midas_factory(normal: bool) -> Callable[[Runtime], AnnotatorFn]:
    def factory(runtime: Runtime) -> AnnotatorFn:
        network = _load_midas(runtime)

        def depth_map(rgb: np.ndarray) -> np.ndarray:
            h, w = rgb.shape[:2]
            return HWC3(depth_to_uint8(midas_depth(network, pad_to_64(rgb), runtime))[:h, :w])

        def normal_map(rgb: np.ndarray, a: float, bg_th: float) -> np.ndarray:
            h, w = rgb.shape[:2]
            depth = midas_depth(network, pad_to_64(rgb), runtime)
            return np.ascontiguousarray(normal_from_depth(depth, a, bg_th)[:h, :w])

        return normal_map if normal else depth_map

    return factory


# ------------------------------------------------------------------------------------------------
# Depth Anything V2

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DA2_SIDE = 518


def da2_input_size(h: int, w: int) -> tuple[int, int]:
    """The network's input (height, width) for an h x w image: the aspect kept, the short side
    scaled to at least 518, each side rounded to a multiple of 14 (up if rounding fell below 518)
    (util/transform.py ``Resize``, "lower_bound")."""
    scale = max(_DA2_SIDE / h, _DA2_SIDE / w)

    def side(x: float) -> int:
        y = int(np.round(x / PATCH) * PATCH)
        return y if y >= _DA2_SIDE else int(math.ceil(x / PATCH) * PATCH)

    return side(scale * h), side(scale * w)


def da2_input(rgb: np.ndarray) -> torch.Tensor:
    """(H', W', 3) float32 network input: RGB / 255 resized bicubically (in float64, as the
    reference resizes its float image) to `da2_input_size`, ImageNet-normalised. The extension
    converts its RGB image "BGR to RGB" first, so its network sees BGR; the network was trained on
    RGB, which is what it gets here."""
    size_h, size_w = da2_input_size(*rgb.shape[:2])
    pixels = cv2.resize(rgb / 255.0, (size_w, size_h), interpolation=cv2.INTER_CUBIC)
    pixels = (pixels - np.array(_IMAGENET_MEAN)) / np.array(_IMAGENET_STD)
    return torch.from_numpy(pixels.astype(np.float32))


def da2_depth_to_uint8(depth: torch.Tensor, h: int, w: int) -> np.ndarray:
    """The network's depth resized bilinearly to h x w (align_corners=False), min-max scaled to
    0..255 and truncated to uint8 (no clipping, as the extension does)."""
    depth = F.interpolate(depth[None, None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    low, high = depth.min(), depth.max()
    scaled = (depth - low) / (high - low) * 255.0 if high > low else torch.zeros_like(depth)
    return scaled.numpy().astype(np.uint8)


def _da2_factory(encoder: str) -> Callable[[Runtime], AnnotatorFn]:
    def factory(runtime: Runtime) -> AnnotatorFn:
        network = load_network(
            DA2_WEIGHTS[encoder], runtime.folder, lambda: DepthAnythingV2(encoder), runtime.device, runtime.dtype
        )

        def annotate(rgb: np.ndarray) -> np.ndarray:
            h, w = rgb.shape[:2]
            padded = pad_to_64(rgb)
            depth = _run(network, da2_input(padded), runtime, "the Depth Anything V2 network's depth")
            return HWC3(da2_depth_to_uint8(depth, *padded.shape[:2])[:h, :w])

        return annotate

    return factory


_NORMAL_PARAMS = (
    Param(
        "bg_th",
        0.4,
        0.0,
        1.0,
        help="normal background threshold: where the 0..1 depth is below it, normals face the viewer",
    ),
    Param("a", 2 * math.pi, 0.01, 100.0, help="the normal's z before normalising; larger flattens the gradients"),
)

ANNOTATORS: tuple[Annotator, ...] = (
    Annotator(
        "depth_midas",
        "MiDaS DPT-Hybrid depth, near is white (ControlNet 1.1 depth)",
        _midas_factory(normal=False),
        weights=(MIDAS_WEIGHTS,),
    ),
    Annotator(
        "normal_midas",
        "normals from MiDaS depth gradients (ControlNet 1.0 normal)",
        _midas_factory(normal=True),
        _NORMAL_PARAMS,
        weights=(MIDAS_WEIGHTS,),
    ),
    Annotator(
        "depth_anything_v2",
        "Depth Anything V2 (ViT-L) depth, near is white (ControlNet 1.1 depth)",
        _da2_factory("vitl"),
        weights=(DA2_WEIGHTS["vitl"],),
    ),
    Annotator(
        "depth_anything_v2_vitb",
        "Depth Anything V2 (ViT-B) depth, near is white (ControlNet 1.1 depth)",
        _da2_factory("vitb"),
        weights=(DA2_WEIGHTS["vitb"],),
    ),
    Annotator(
        "depth_anything_v2_vits",
        "Depth Anything V2 (ViT-S, Apache-2.0) depth, near is white (ControlNet 1.1 depth)",
        _da2_factory("vits"),
        weights=(DA2_WEIGHTS["vits"],),
    ),
)

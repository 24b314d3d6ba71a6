"""Soft edges (HED, PiDiNet) and the scribbles made from them, as the AUTOMATIC1111 extension names
them: ``softedge_hed``, ``softedge_hedsafe``, ``softedge_pidinet``, ``softedge_pidisafe``,
``scribble_hed``, ``scribble_pidinet``. Soft edges feed ``control_v11p_sd15_softedge``; the
scribbles feed ``control_v11p_sd15_scribble``.

The steps follow ControlNet-v1-1-nightly (annotator/hed/__init__.py, annotator/pidinet/__init__.py,
annotator/util.py, gradio_softedge.py, gradio_scribble.py) and the extension
(scripts/preprocessor/legacy/processor.py: ``hed``, ``hed_safe``, ``pidinet``, ``pidinet_safe``,
``scribble_hed``, ``scribble_pidinet``), which take no parameters besides the resolution. The image
arrives sized by `run_annotator` (sides multiples of 64); other sizes are edge-padded to multiples of
64 and the map cropped back, as the extension's ``resize_image_with_pad`` / ``remove_pad`` do.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch

from .. import runtime as policy
from ..imaging.images import HWC3
from .base import Annotator, AnnotatorFn, Runtime, pad_to_64
from .networks.hed import ControlNetHED
from .networks.pidinet import PiDiNet
from .weights import WeightFile, load_network

_ANNOTATORS_REPO = "https://huggingface.co/lllyasviel/Annotators"

HED_WEIGHTS = WeightFile(
    "ControlNetHED.pth",
    "ControlNet 1.1's HED soft-edge network (ControlNetHED_Apache2)",
    _ANNOTATORS_REPO,
    markers=("norm", "block1.convs.0.weight", "block5.projection.weight"),
)
PIDINET_WEIGHTS = WeightFile(
    "table5_pidinet.pth",
    "the PiDiNet soft-edge network (table 5, carv4)",
    _ANNOTATORS_REPO,
    markers=("init_block.weight", "block4_4.conv1.weight", "attentions.0.conv2.weight"),
)


# ------------------------------------------------------------------------------------------------
# Post-processing (ControlNet-v1-1-nightly annotator/util.py)


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """Quantise a soft edge map in [0, 1] to the levels 0, 1/step, 2/step, ...: floor(x * (step + 1))
    / step, in float32 (the "safe" variants: fewer faint edges for the model to copy as texture)."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


# The four directions of the non-maximum suppression: a pixel survives when it equals the maximum of
# itself and its two neighbours along one of them.
_NMS_KERNELS = tuple(
    np.array(k, np.uint8)
    for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    )
)


def nms(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Thin edges: blur by a Gaussian of ``sigma``, keep the pixels that are a local maximum along
    some direction, and mark those above ``threshold`` 255 (uint8, 0 elsewhere)."""
    blurred = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kept = np.zeros_like(blurred)
    for kernel in _NMS_KERNELS:
        np.putmask(kept, cv2.dilate(blurred, kernel=kernel) == blurred, blurred)
    return np.where(kept > threshold, np.uint8(255), np.uint8(0))


def scribble_from_edges(edges: np.ndarray) -> np.ndarray:
    """The scribble a soft edge map (uint8) gives: edges thinned by `nms` (threshold 127, sigma 3),
    widened again by a Gaussian of sigma 3, and every pixel above 4 set to 255, the rest to 0
    (the extension's ``scribble_hed`` / ``scribble_pidinet``).

    The extension does this on the map cropped back to the image (see the module's docstring);
    ControlNet-v1-1-nightly's gradio_scribble.py and controlnet_aux's ``scribble=True`` do it after
    resizing the map to the output resolution instead. We follow the extension, whose names these
    annotators carry; at sides that are multiples of 64 (as `run_annotator` sizes images) the
    results are the same."""
    thin = nms(edges, 127, 3.0)
    wide = cv2.GaussianBlur(thin, (0, 0), 3.0)
    return np.where(wide > 4, np.uint8(255), np.uint8(0))


def to_uint8(edge: np.ndarray, safe: bool) -> np.ndarray:
    """An edge probability map in [0, 1] as the references store it: safe-stepped if asked, times
    255, clipped, truncated to uint8."""
    if safe:
        edge = safe_step(edge)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# The networks on an image


def _as_input(pixels: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """(H, W, 3) float32 pixels as the network's (1, 3, H, W) input on the runtime's device and
    dtype: a view with channels last in memory, as the references make it (``rearrange`` of HWC)."""
    return pixels.to(runtime.device, policy.DTYPES[runtime.dtype]).permute(2, 0, 1).unsqueeze(0)


def hed_edges(network: ControlNetHED, rgb: np.ndarray, runtime: Runtime) -> np.ndarray:
    """HED's edge probability (H, W) float64 for an RGB uint8 image fed as 0..255: the five side
    maps resized to the image by OpenCV's bilinear resize, averaged in float32, through the sigmoid
    in float64 (annotator/hed/__init__.py)."""
    h, w = rgb.shape[:2]
    with torch.inference_mode():
        sides = network(_as_input(torch.from_numpy(rgb).float(), runtime))
        sides = [side[0, 0].float().cpu().numpy() for side in sides]
    resized = [cv2.resize(side, (w, h), interpolation=cv2.INTER_LINEAR) for side in sides]
    mean = np.mean(np.stack(resized, axis=2), axis=2)  # float32, as the reference averages
    policy.check_finite(mean, "the HED network's edge maps")
    return 1.0 / (1.0 + np.exp(-mean.astype(np.float64)))


def pidinet_edges(network: PiDiNet, rgb: np.ndarray, runtime: Runtime) -> np.ndarray:
    """PiDiNet's fused edge probability (H, W) float32 for an RGB uint8 image, fed as BGR divided
    by 255 in float32 (annotator/pidinet/__init__.py)."""
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1])).float() / 255.0
    with torch.inference_mode():
        edge = network(_as_input(bgr, runtime))[0, 0].float().cpu().numpy()
    policy.check_finite(edge, "the PiDiNet network's edge map")
    return edge


def _load_hed(runtime: Runtime) -> ControlNetHED:
    return load_network(HED_WEIGHTS, runtime.folder, ControlNetHED, runtime.device, runtime.dtype)


def _load_pidinet(runtime: Runtime) -> PiDiNet:
    """PiDiNet read in float32 on the CPU, its pixel-difference kernels rewritten once as plain ones
    (in float32, before any cast), then placed as runtime.py's policy says."""
    network = load_network(PIDINET_WEIGHTS, runtime.folder, PiDiNet, "cpu", "float32").convert()
    dtype = policy.DTYPES[runtime.dtype]
    return policy.prepare(network, runtime.device, dtype, policy.use_channels_last(runtime.device, dtype))


def _soft_edge_factory(
    load: Callable[[Runtime], torch.nn.Module],
    edges: Callable[[torch.nn.Module, np.ndarray, Runtime], np.ndarray],
    safe: bool,
    scribble: bool,
) -> Callable[[Runtime], AnnotatorFn]:
    """The factory of one annotator: the network read once per runtime, then per image: pad to
    multiples of 64, edges, uint8 (safe-stepped if asked), crop, scribble if asked, 3 channels."""

    def factory(runtime: Runtime) -> AnnotatorFn:
        network = load(runtime)

        def annotate(rgb: np.ndarray) -> np.ndarray:
            h, w = rgb.shape[:2]
            edge = to_uint8(edges(network, pad_to_64(rgb), runtime), safe)[:h, :w]
            return HWC3(scribble_from_edges(edge) if scribble else edge)

        return annotate

    return factory


def _annotator(name: str, description: str, network: str, safe: bool = False, scribble: bool = False) -> Annotator:
    load, edges, weights = {
        "hed": (_load_hed, hed_edges, HED_WEIGHTS),
        "pidinet": (_load_pidinet, pidinet_edges, PIDINET_WEIGHTS),
    }[network]
    return Annotator(name, description, _soft_edge_factory(load, edges, safe, scribble), weights=(weights,))


ANNOTATORS: tuple[Annotator, ...] = (
    _annotator("softedge_hed", "HED soft edges (ControlNet 1.1 softedge)", "hed"),
    _annotator("softedge_hedsafe", "HED soft edges quantised to 3 levels (ControlNet 1.1 softedge)", "hed", safe=True),
    _annotator("softedge_pidinet", "PiDiNet soft edges (ControlNet 1.1 softedge)", "pidinet"),
    _annotator(
        "softedge_pidisafe", "PiDiNet soft edges quantised to 3 levels (ControlNet 1.1 softedge)", "pidinet", safe=True
    ),
    _annotator("scribble_hed", "HED edges thinned into scribbles (ControlNet 1.1 scribble)", "hed", scribble=True),
    _annotator(
        "scribble_pidinet", "PiDiNet edges thinned into scribbles (ControlNet 1.1 scribble)", "pidinet", scribble=True
    ),
)

"""Straight lines for ``control_v11p_sd15_mlsd``: ``mlsd`` (the M-LSD network,
``mlsd_large_512_fp32.pth``) and ``mlsd_lsd``, a stand-in that needs no weights (OpenCV's line
segment detector). Both draw the segments found as white 1-pixel lines on black.

``mlsd`` follows the AUTOMATIC1111 extension (scripts/preprocessor/legacy/processor.py ``mlsd``;
annotator/mlsd/__init__.py ``apply_mlsd``; annotator/mlsd/utils.py ``pred_lines``), the same steps as
ControlNet-v1-1-nightly annotator/mlsd: the network sees the image at its own size; its output, at
half that size, is decoded into at most 200 segments; a segment is kept when its centre score is above
``thr_v`` and its length (in half-size pixels) above ``thr_d``, the extension's "MLSD Value Threshold"
and "MLSD Distance Threshold" with their defaults and slider ranges (preprocessor_compiled.py).

``mlsd_lsd`` is not M-LSD and does not reproduce its maps: LSD finds every straight edge it can
prove, where M-LSD was trained to pick the structural lines of a scene (walls, furniture), so its maps
are denser on textured photos. It is there so that the MLSD ControlNet is usable without the file;
``thr_d`` has the same meaning (a segment is kept when half its length in pixels is above it), and LSD
has no score to set a ``thr_v`` against.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .. import runtime as policy
from ..imaging.images import HWC3
from .base import Annotator, AnnotatorFn, Param, Runtime, pad_to_64
from .lineart import ANNOTATORS_REPO, as_input
from .networks.mlsd import MLSDLarge
from .weights import WeightFile, load_network

MLSD_WEIGHTS = WeightFile(
    "mlsd_large_512_fp32.pth",
    "the M-LSD large line segment network",
    ANNOTATORS_REPO,
    markers=("backbone.features.0.0.weight", "block15.conv1.0.weight", "block23.conv3.weight"),
)

TOP_K = 200  # the centres decoded (utils.py pred_lines)
THR_V = Param(
    "thr_v", 0.1, 0.01, 2.0, help="MLSD Value Threshold: a segment is kept when its centre's score is above this"
)
THR_D = Param(
    "thr_d",
    0.1,
    0.01,
    20.0,
    help="MLSD Distance Threshold: a segment is kept when its length, in pixels at half size, is above this",
)


def mlsd_input(rgb: np.ndarray) -> np.ndarray:
    """The network's input, (H, W, 4) float32: RGB and a channel of ones, each v / 127.5 - 1."""
    ones = np.ones((*rgb.shape[:2], 1), np.float32)
    return np.concatenate([rgb.astype(np.float32), ones], axis=2) / 127.5 - 1.0


def decode_segments(output: torch.Tensor, thr_v: float, thr_d: float) -> np.ndarray:
    """Segments (N, 4) float64 as (x0, y0, x1, y1) in pixels of the network's input, from its output
    (1, 5+, h, w) float32 at half size (utils.py ``pred_lines``): the centre scores (sigmoid of channel
    0) kept only where they are the maximum of their 3x3 neighbourhood, the 200 highest, each with the
    displacements to its ends (channels 1-4); those with a score above ``thr_v`` and a length above
    ``thr_d`` kept, their ends doubled to the input's scale."""
    w = output.shape[3]
    heat = torch.sigmoid(output[:, 0])
    peaks = F.max_pool2d(heat, 3, stride=1, padding=1)
    heat = (heat * (peaks == heat).float()).reshape(-1)
    scores, indices = torch.topk(heat, min(TOP_K, heat.numel()))
    ys, xs = (indices // w).numpy(), (indices % w).numpy()
    scores = scores.numpy()
    displacement = output[0, 1:5].permute(1, 2, 0).numpy()  # (h, w, 4): x0, y0, x1, y1 from the centre
    ends = displacement[ys, xs]
    length = np.sqrt(np.sum((ends[:, :2] - ends[:, 2:]) ** 2, axis=-1))  # float32, as the reference
    # thresholds compared in float32 (numpy's rule for a Python float beside float32), as the reference
    keep = (scores > thr_v) & (length > thr_d)
    centres = np.stack([xs, ys, xs, ys], axis=1)[keep].astype(np.float64)
    return 2 * (centres + ends[keep].astype(np.float64))


def draw_segments(segments: np.ndarray, height: int, width: int) -> np.ndarray:
    """White 1-pixel lines (OpenCV's 8-connected ``cv2.line``) on black, (height, width) uint8; the
    ends truncated toward zero to whole pixels, as the references' ``int()`` does."""
    canvas = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in np.trunc(segments).astype(np.int64).tolist():
        cv2.line(canvas, (x0, y0), (x1, y1), 255, 1)
    return canvas


def mlsd_segments(network: MLSDLarge, rgb: np.ndarray, runtime: Runtime, thr_v: float, thr_d: float) -> np.ndarray:
    """The segments M-LSD finds in an RGB uint8 image whose sides are multiples of 32."""
    with torch.inference_mode():
        output = network(as_input(mlsd_input(rgb), runtime)).float().cpu()
    policy.check_finite(output, "the M-LSD network's output")
    return decode_segments(output, thr_v, thr_d)


def _mlsd_factory(runtime: Runtime) -> AnnotatorFn:
    network = load_network(MLSD_WEIGHTS, runtime.folder, MLSDLarge, runtime.device, runtime.dtype)

    def annotate(rgb: np.ndarray, *, thr_v: float, thr_d: float) -> np.ndarray:
        h, w = rgb.shape[:2]
        padded = pad_to_64(rgb)
        segments = mlsd_segments(network, padded, runtime, thr_v, thr_d)
        return HWC3(draw_segments(segments, *padded.shape[:2])[:h, :w])

    return annotate


def lsd_segments(rgb: np.ndarray, thr_d: float) -> np.ndarray:
    """The segments (N, 4) float32 OpenCV's line segment detector (default settings) finds in the
    image's grey levels, those with half their length above ``thr_d``."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    found = cv2.createLineSegmentDetector().detect(grey)[0]
    if found is None:
        return np.zeros((0, 4), np.float32)
    segments = found.reshape(-1, 4)
    half = np.hypot(segments[:, 0] - segments[:, 2], segments[:, 1] - segments[:, 3]) / 2
    return segments[half > thr_d]


def mlsd_lsd(rgb: np.ndarray, *, thr_d: float = 0.1) -> np.ndarray:
    """LSD's segments drawn as the mlsd map is: white 1-pixel lines on black, (H, W, 3) uint8."""
    return HWC3(draw_segments(lsd_segments(rgb, thr_d).astype(np.float64), *rgb.shape[:2]))


ANNOTATORS: tuple[Annotator, ...] = (
    Annotator(
        "mlsd",
        "straight line segments by M-LSD, white on black (ControlNet 1.1 mlsd)",
        _mlsd_factory,
        (THR_V, THR_D),
        weights=(MLSD_WEIGHTS,),
    ),
    Annotator(
        "mlsd_lsd",
        "straight line segments by OpenCV's LSD, no weights: a stand-in for mlsd, not exact to it",
        lambda runtime: mlsd_lsd,
        (THR_D,),
    ),
)

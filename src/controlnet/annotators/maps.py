"""Maps made without a network: ``threshold`` and ``recolor_luminance`` (the AUTOMATIC1111
extension's modules of those names, exact), ``depth_from_file`` (a depth map the user already has,
normalised as the depth models take it) and ``seg_from_labels`` (a label image coloured with the
ADE20k palette the segmentation models were trained on). ``invert`` is a classical annotator
(classic.py).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from .base import Annotator, AnnotatorFn, Param, Runtime
from .filters import rgb_to_grey


def threshold(image: np.ndarray, *, threshold: int = 127) -> np.ndarray:
    """White where every channel is above ``threshold``, black elsewhere: the extension's
    ``threshold`` module (scripts/preprocessor/legacy/processor.py), "Binarization Threshold" 127."""
    out = np.zeros_like(image, dtype=np.uint8)
    out[np.min(image, axis=2) > threshold] = 255
    return out


def recolor_luminance(image: np.ndarray, *, gamma_correction: float = 1.0) -> np.ndarray:
    """The lightness of the image raised to ``gamma_correction``, as grey RGB: the extension's
    ``recolor_luminance`` (processor.py), the map the recolor models are given.

    As the extension does, the RGB image is converted with OpenCV's BGR-to-Lab conversion, so red
    and blue trade places in the lightness (exactness with the extension's maps is kept); L (0-255
    in 8-bit Lab) / 255 is raised to the power in float32, times 255, clipped and truncated."""
    lightness = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2LAB)[:, :, 0].astype(np.float32) / 255.0
    lightness = lightness**gamma_correction
    grey = (lightness * 255.0).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def depth_map(depth: np.ndarray, *, invert: bool = False, normalize: bool = True) -> np.ndarray:
    """A depth image as the depth ControlNets take it: grey RGB uint8, near bright.

    ``depth`` is (H, W), (H, W, 1) or (H, W, 3) of any integer or float type (a 16-bit PNG's
    values included); a colour image is read by its luma (BT.601), a grey one by its one value.
    With ``normalize`` the values are stretched so that the smallest is 0 and the largest 255
    (rounded; a flat image becomes 0), as the depth annotators stretch theirs; without it 8-bit
    values are kept, 16-bit ones divided by 257 and floats taken as 0-1 when no value exceeds 1.
    ``invert`` turns a map whose far values are the bright ones (distances) into near = bright."""
    values = _one_channel(depth).astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the depth image holds NaN or infinite values")
    if normalize:
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    elif depth.dtype == np.uint16:
        values = values / 257.0
    elif depth.dtype.kind == "f" and values.max(initial=0.0) <= 1.0:
        values = values * 255.0
    grey = np.rint(values.clip(0, 255)).astype(np.uint8)
    if invert:
        grey = 255 - grey
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def _one_channel(depth: np.ndarray) -> np.ndarray:
    if not isinstance(depth, np.ndarray) or depth.dtype.kind not in "uif" or depth.size == 0:
        raise ValueError(f"a depth image is a non-empty numeric array, got {_describe(depth)}")
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim == 2:
        return depth
    if depth.ndim != 3 or depth.shape[2] != 3:
        raise ValueError(f"a depth image is (H, W) or (H, W, 3), got shape {depth.shape}")
    if (depth == depth[:, :, :1]).all():
        return depth[:, :, 0]
    if depth.dtype == np.uint8:
        return rgb_to_grey(depth)  # OpenCV's exact integer BT.601 luma
    return depth[:, :, 0] * 0.299 + depth[:, :, 1] * 0.587 + depth[:, :, 2] * 0.114


def _describe(x: object) -> str:
    return f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__


# The ADE20k palette (150 classes, RGB, class 0 first: wall, building, sky, floor, tree, ...) that
# the ControlNet 1.1 seg annotators colour their predictions with (ControlNet-v1-1-nightly
# annotator/uniformer/mmseg/datasets/ade.py ``ADE20KDataset.PALETTE``), as hex bytes.
_ADE20K_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff0652"
    "8fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0"
    "ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff"
    "00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ff"
    "ff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff0070"
    "5cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff500"
    "0abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)
ADE20K_PALETTE: np.ndarray = np.frombuffer(bytes.fromhex(_ADE20K_HEX), np.uint8).reshape(150, 3)
ADE20K_PALETTE.flags.writeable = False

LABEL_RANGES: tuple[str, ...] = ("0-149", "1-150")


def seg_from_labels(labels: np.ndarray, *, labels_from: str = "0-149") -> np.ndarray:
    """A label image coloured as the seg annotators colour their predictions: each pixel's ADE20k
    class index (one value, or the same value in every channel) to its palette colour, RGB uint8.

    ``labels_from`` "0-149": the indices a segmentation model predicts (mmseg's ADE20k classes, 0 =
    wall), what the annotators colour. "1-150": the ADE20k annotation files (ADEChallengeData2016),
    whose 0 marks unlabelled pixels (coloured black) and 1 the wall. Other values are refused."""
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "ui" or labels.ndim not in (2, 3):
        raise ValueError(f"a label image is an (H, W) or (H, W, C) integer array, got {_describe(labels)}")
    if labels.ndim == 3:
        if not (labels == labels[:, :, :1]).all():
            raise ValueError(
                "seg_from_labels needs a grey label image (each pixel's class index in every channel); "
                "this one has colours"
            )
        labels = labels[:, :, 0]
    offset = LABEL_RANGES.index(labels_from) if labels_from in LABEL_RANGES else -1
    if offset < 0:
        raise ValueError(f"labels_from must be one of {', '.join(LABEL_RANGES)}, got {labels_from!r}")
    top = len(ADE20K_PALETTE) - 1 + offset
    if labels.size and int(labels.max()) > top:
        y, x = np.unravel_index(int(np.argmax(labels)), labels.shape)
        raise ValueError(
            f"label {int(labels.max())} at x={x}, y={y} is not an ADE20k class: labels run {offset}-{top} "
            f"(labels_from={labels_from!r}); a label image holds each pixel's class index"
        )
    palette = np.concatenate([np.zeros((1, 3), np.uint8), ADE20K_PALETTE]) if offset else ADE20K_PALETTE
    return palette[labels.astype(np.intp)]


def _depth_from_file(image: np.ndarray, *, invert: bool = False, normalize: bool = True) -> np.ndarray:
    return depth_map(image, invert=invert, normalize=normalize)


def _seg_from_labels(image: np.ndarray, *, labels_from: str = "0-149") -> np.ndarray:
    return seg_from_labels(image, labels_from=labels_from)


def _factory(fn: AnnotatorFn) -> Callable[[Runtime], AnnotatorFn]:
    """The factory of a function that needs nothing loaded."""
    return lambda runtime: fn


ANNOTATORS: tuple[Annotator, ...] = (
    Annotator(
        "threshold",
        "white where every channel is above the threshold, else black (AUTOMATIC1111 threshold)",
        _factory(threshold),
        (
            Param(
                "threshold",
                127,
                0,
                255,
                help="binarization threshold: a pixel is white when all its channels exceed it",
            ),
        ),
    ),
    Annotator(
        "recolor_luminance",
        "lightness (Lab L) with a gamma, as grey: the hint of the recolor models (AUTOMATIC1111 recolor_luminance)",
        _factory(recolor_luminance),
        (Param("gamma_correction", 1.0, 0.1, 2.0, help="the lightness in 0-1 is raised to this power"),),
    ),
    Annotator(
        "depth_from_file",
        "the image is a depth map (grey, near bright): stretched to 0-255 grey for the depth models",
        _factory(_depth_from_file),
        (
            Param("invert", False, help="the map's far values are the bright ones (distances): make near bright"),
            Param("normalize", True, help="stretch the values to span 0-255 (off: 8-bit values kept as they are)"),
        ),
    ),
    Annotator(
        "seg_from_labels",
        "a label image (ADE20k class index per pixel) coloured with the ADE20k palette (ControlNet 1.1 seg)",
        _factory(_seg_from_labels),
        (
            Param(
                "labels_from",
                "0-149",
                choices=LABEL_RANGES,
                help="0-149: a model's class indices (0 = wall); 1-150: ADE20k annotation files (0 = unlabelled)",
            ),
        ),
        resize="nearest",  # labels are classes: resizing must not blend them
    ),
)

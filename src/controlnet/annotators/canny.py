"""Canny edges, bit-exact to `cv2.Canny(image, low, high)` (aperture 3, L1 gradient), in numpy.

The original canny app runs `cv2.Canny` on the resized RGB image (ControlNet 1.0
`annotator/canny`), so this follows OpenCV's algorithm step by step, including its multi-channel
rule and its tie-breaking:

1. Sobel 3x3 derivatives per channel, borders replicated (OpenCV's BORDER_REPLICATE).
2. L1 magnitude |dx| + |dy|; with several channels, each pixel takes the derivatives of the first
   channel with the strictly largest magnitude.
3. Non-maximum suppression in four sectors split at tan(22.5°) and tan(67.5°) in OpenCV's 15-bit
   fixed point; a peak must beat one neighbour strictly (`>`) and the other weakly (`>=`) along the
   horizontal and vertical sectors, and both strictly along the diagonals. Outside the image the
   magnitude is 0.
4. Hysteresis: peaks above `high` are edges, and so are peaks above `low` 8-connected to them.
   Thresholds are floored to integers and swapped if low > high, as OpenCV does.
"""

from __future__ import annotations

import numpy as np

_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)  # tan(22.5°) in fixed point


def canny(image: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
    """Edge map (H, W) uint8 of 0 and 255, equal to `cv2.Canny(image, low, high)`, for a uint8
    (H, W) or (H, W, C) image."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise ValueError("canny takes a non-empty uint8 (H, W) or (H, W, C) image")
    low, high = sorted((low_threshold, high_threshold))
    low, high = int(np.floor(low)), int(np.floor(high))
    x = image[:, :, None] if image.ndim == 2 else image
    dx, dy = _sobel(x.astype(np.int32))
    dx, dy, magnitude = _strongest_channel(dx, dy)
    peaks = _non_maximum_suppression(dx, dy, magnitude) & (magnitude > low)
    return _hysteresis(peaks, peaks & (magnitude > high))


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of an (H, W, C) int32 array with replicated borders."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    diff_x = p[:, 2:] - p[:, :-2]  # (H + 2, W, C): [-1 0 1] along x
    dx = diff_x[:-2] + 2 * diff_x[1:-1] + diff_x[2:]  # smoothed [1 2 1] along y
    smooth_x = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
    dy = smooth_x[2:] - smooth_x[:-2]
    return dx, dy


def _strongest_channel(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the derivatives and L1 magnitude of the first channel with the largest magnitude."""
    magnitude = np.abs(dx) + np.abs(dy)
    best = np.zeros(magnitude.shape[:2], dtype=np.intp)
    best_mag = magnitude[:, :, 0].copy()
    for c in range(1, magnitude.shape[2]):
        better = magnitude[:, :, c] > best_mag  # strict: ties keep the earlier channel
        best[better] = c
        best_mag[better] = magnitude[:, :, c][better]
    pick = best[:, :, None]
    return np.take_along_axis(dx, pick, 2)[:, :, 0], np.take_along_axis(dy, pick, 2)[:, :, 0], best_mag


def _non_maximum_suppression(dx: np.ndarray, dy: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pixels whose magnitude is a local maximum across the edge, with OpenCV's sector and tie rules."""
    p = np.pad(m, 1)  # magnitude 0 outside the image
    left, right, up, down = p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1]
    up_left, up_right, down_left, down_right = p[:-2, :-2], p[:-2, 2:], p[2:, :-2], p[2:, 2:]
    ax = np.abs(dx).astype(np.int64)
    ay = np.abs(dy).astype(np.int64) << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x  # gradient mostly along x: compare left and right
    vertical = ~horizontal & (ay > tg67x)  # mostly along y: compare up and down
    diagonal = ~horizontal & ~vertical
    opposite_signs = (dx ^ dy) < 0  # gradient along the up-right / down-left diagonal
    diagonal_max = np.where(opposite_signs, (m > up_right) & (m > down_left), (m > up_left) & (m > down_right))
    return (horizontal & (m > left) & (m >= right)) | (vertical & (m > up) & (m >= down)) | (diagonal & diagonal_max)


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """255 where a candidate pixel is 8-connected (through candidates) to a strong pixel."""
    ys, xs = np.nonzero(candidates)
    out = np.zeros(candidates.shape, dtype=np.uint8)
    if ys.size == 0:
        return out
    label = _connected_components(ys, xs, candidates.shape)
    keep = np.zeros(ys.size, dtype=bool)
    keep[label[strong[ys, xs]]] = True
    chosen = keep[label]
    out[ys[chosen], xs[chosen]] = 255
    return out


def _connected_components(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Component label (the smallest member index) of each listed pixel, 8-connectivity.

    Union-find in numpy: each round hooks the root of the larger label under the smaller one
    for every edge that still joins two trees, then pointer jumping flattens the trees."""
    n = ys.size
    index = np.full((shape[0] + 2, shape[1] + 2), -1, dtype=np.int64)
    index[ys + 1, xs + 1] = np.arange(n)
    us, vs = [], []
    for oy, ox in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each undirected neighbour pair once
        neighbour = index[ys + 1 + oy, xs + 1 + ox]
        linked = neighbour >= 0
        us.append(np.flatnonzero(linked))
        vs.append(neighbour[linked])
    u, v = np.concatenate(us), np.concatenate(vs)
    label = np.arange(n)
    while True:
        lu, lv = label[u], label[v]
        split = lu != lv
        if not split.any():
            return label
        np.minimum.at(label, np.maximum(lu[split], lv[split]), np.minimum(lu[split], lv[split]))
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped

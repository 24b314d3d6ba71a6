"""Controllability metrics (the ControlNet++ protocol, REFERENCE.md section 9).

The condition is re-extracted from each generated image with the same annotator and settings and
compared with the condition the image was made from:

- Canny: F1 of edge pixels. Both maps are binary; a pixel is a true positive when it is an edge in
  both (exact position: no tolerance band, as ControlNet++ computes it over the pixels).
- Soft edges (HED, lineart): SSIM between the two maps (grey levels in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .annotators.canny import canny


@dataclass(frozen=True)
class EdgeScore:
    precision: float
    recall: float
    f1: float


def _binary(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges)
    if edges.ndim == 3:
        edges = edges.max(axis=2)
    return edges > 127


def edge_f1(
    generated: np.ndarray, condition: np.ndarray, low_threshold: int = 100, high_threshold: int = 200
) -> EdgeScore:
    """Canny edges of ``generated`` (RGB uint8 [H, W, 3]) against the ``condition`` edge map
    (uint8 [H, W] or [H, W, 3], white edges). Empty maps on both sides score 1."""
    if generated.shape[:2] != condition.shape[:2]:
        raise ValueError(f"sizes differ: generated {generated.shape[:2]}, condition {condition.shape[:2]}")
    found = canny(np.ascontiguousarray(generated), low_threshold, high_threshold) > 127
    wanted = _binary(condition)
    true_positive = float(np.logical_and(found, wanted).sum())
    if not found.any() and not wanted.any():
        return EdgeScore(1.0, 1.0, 1.0)
    precision = true_positive / max(1.0, float(found.sum()))
    recall = true_positive / max(1.0, float(wanted.sum()))
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return EdgeScore(precision, recall, f1)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) of two grey maps (uint8 or [0, 1] float), with a
    uniform ``window`` x ``window`` window and the usual constants (K1 = 0.01, K2 = 0.03, L = 1)."""
    x, y = (_grey01(m) for m in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"sizes differ: {x.shape} and {y.shape}")
    c1, c2 = 0.01**2, 0.03**2

    def mean(image: np.ndarray) -> np.ndarray:
        return _box_filter(image, window)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


def _grey01(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image.mean(axis=2)
    image = image.astype(np.float64)
    return image / 255.0 if image.max(initial=0) > 1.0 else image


def _box_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Means over the ``size`` x ``size`` windows that fit inside the image ('valid' positions)."""
    padded = np.pad(np.cumsum(np.cumsum(image, axis=0), axis=1), ((1, 0), (1, 0)))
    total = padded[size:, size:] - padded[:-size, size:] - padded[size:, :-size] + padded[:-size, :-size]
    return total / (size * size)

"""The resampling and smoothing the OpenPose annotators apply to images and score maps, computed as
the reference computes them (ControlNet-v1-1-nightly annotator/openpose/util.py ``smart_resize``,
``smart_resize_k``, ``padRightDownCorner``; the peak search smooths with SciPy's ``gaussian_filter``,
which is written out here so that the package needs no SciPy)."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def resize_to(x: np.ndarray, height: float, width: float) -> np.ndarray:
    """``x`` (H, W) or (H, W, C) resized by OpenCV to int(height) x int(width): by area averaging
    when height + width is smaller than the source's, else by Lanczos-4 (smart_resize). The
    reference resizes maps of other than 1 or 3 channels one channel at a time; OpenCV's resizes
    compute each channel alike, so all are resized at once where OpenCV can (its area resize takes
    at most 4 channels)."""
    shrink = float(height + width) / float(x.shape[0] + x.shape[1]) < 1
    if shrink and x.ndim == 3 and x.shape[2] > 4:
        return np.stack([resize_to(x[:, :, c], height, width) for c in range(x.shape[2])], axis=2)
    out = cv2.resize(x, (int(width), int(height)), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
    return out[:, :, None] if x.ndim == 3 and out.ndim == 2 else out


def rescale(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` resized by ``factor`` in both directions, as `resize_to`, the filter chosen by the
    unrounded target size (smart_resize_k)."""
    return resize_to(x, x.shape[0] * factor, x.shape[1] * factor)


def pad_to_stride(image: np.ndarray, stride: int = 8, value: int = 128) -> tuple[np.ndarray, int, int]:
    """``image`` (H, W, 3) padded at the bottom and right with ``value`` to multiples of ``stride``;
    and the rows and columns added."""
    h, w = image.shape[:2]
    down, right = -h % stride, -w % stride
    padded = np.full((h + down, w + right, image.shape[2]), value, dtype=image.dtype)
    padded[:h, :w] = image
    return padded, down, right


def network_input(bgr: np.ndarray, device: str, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """(H, W, 3) BGR uint8 as the OpenPose networks take it: (1, 3, H, W), pixels / 256 - 0.5,
    computed in float32 as the reference does, then in the network's dtype on its device."""
    scaled = np.ascontiguousarray(bgr.astype(np.float32).transpose(2, 0, 1)[None]) / 256 - 0.5
    tensor = torch.from_numpy(scaled).to(device, dtype)
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """SciPy's ``ndimage.gaussian_filter(x, sigma)`` of a 2-D float64 map, bit for bit: a kernel of
    radius int(4 sigma + 0.5) normalised to sum 1, the map extended by mirroring (edge sample
    repeated: "reflect"), rows then columns, each output the centre tap plus the symmetric pairs
    from the outermost in (the order of SciPy's correlate1d for symmetric kernels)."""
    radius = int(4.0 * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    kernel = kernel / kernel.sum()
    out = np.asarray(x, dtype=np.float64)
    for axis in (0, 1):
        out = _correlate_symmetric(out, kernel, radius, axis)
    return out


def _correlate_symmetric(x: np.ndarray, kernel: np.ndarray, radius: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    padded = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in range(x.ndim)], mode="symmetric")

    def shifted(offset: int) -> np.ndarray:
        window = [slice(None)] * x.ndim
        window[axis] = slice(radius + offset, radius + offset + n)
        return padded[tuple(window)]

    out = shifted(0) * kernel[radius]
    for j in range(radius, 0, -1):
        out += (shifted(-j) + shifted(j)) * kernel[radius - j]
    return out

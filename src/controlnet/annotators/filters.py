"""Small image filters the classical annotators need, in numpy (OpenCV equivalents named)."""

from __future__ import annotations

import numpy as np

# cv2.COLOR_RGB2GRAY for uint8: BT.601 weights in 15-bit fixed point, rounded.
_GREY_SHIFT = 15
_R2Y, _G2Y, _B2Y = 9798, 19235, 3735


def rgb_to_grey(image: np.ndarray) -> np.ndarray:
    """(H, W) luma of an RGB uint8 image, equal to `cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)`."""
    x = image.astype(np.int32)
    y = x[:, :, 0] * _R2Y + x[:, :, 1] * _G2Y + x[:, :, 2] * _B2Y
    return ((y + (1 << (_GREY_SHIFT - 1))) >> _GREY_SHIFT).astype(np.uint8)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float (H, W) or (H, W, C) array like `cv2.GaussianBlur(x, (0, 0), sigma)`
    for float input: kernel size round(8 * sigma + 1) made odd, borders reflected without repeating
    the edge (BORDER_REFLECT_101). Computed in float64, returned in the input dtype."""
    if sigma <= 0:
        return x.copy()
    ksize = int(np.rint(sigma * 8 + 1)) | 1
    taps = np.arange(ksize) - (ksize - 1) / 2
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = x.astype(np.float64)
    for axis in (0, 1):
        out = _convolve_axis(out, kernel, axis)
    return out.astype(x.dtype)


def _convolve_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    radius = len(kernel) // 2
    if x.shape[axis] == 1:
        return x.copy()  # reflection of a single pixel is itself: a normalised blur leaves it unchanged
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="reflect")  # numpy's "reflect" is OpenCV's REFLECT_101
    out = np.zeros_like(x)
    length = x.shape[axis]
    for k, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(k, k + length), axis=axis)
    return out


def _cubic_weights(fx: np.ndarray) -> np.ndarray:
    """OpenCV's bicubic weights (A = -0.75) for taps sx-1..sx+2 at phases fx, shape (n, 4)."""
    a = -0.75
    x = fx.astype(np.float64)
    w0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    w1 = ((a + 2) * x - (a + 3)) * x * x + 1
    w2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    return np.stack([w0, w1, w2, 1 - w0 - w1 - w2], axis=1)


def _cubic_table(src: int, dst: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic taps for output indices start..start+count-1 of a src -> dst resize (half-pixel
    centres, replicated border), so a crop of a large upscale costs only the cropped part."""
    f = (np.arange(start, start + count) + 0.5) * (src / dst) - 0.5
    sx = np.floor(f).astype(np.intp)
    index = np.clip(sx[:, None] + np.arange(-1, 3)[None, :], 0, src - 1)
    return index, _cubic_weights(f - sx)


def make_noise_disk(height: int, width: int, channels: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """ControlNet 1.1's `make_noise_disk` (annotator/util.py): uniform noise on a grid with one
    sample per `cell` pixels, upscaled bicubically with a margin of one cell, cropped to
    (height, width), and normalised to [0, 1]. Returns float64 (height, width, channels)."""
    noise = rng.uniform(0.0, 1.0, size=(height // cell + 2, width // cell + 2, channels))
    yi, yw = _cubic_table(noise.shape[0], height + 2 * cell, cell, height)
    xi, xw = _cubic_table(noise.shape[1], width + 2 * cell, cell, width)
    rows = np.einsum("hwkc,wk->hwc", noise[:, xi], xw)
    out = np.einsum("hkwc,hk->hwc", rows[yi], yw)
    out -= out.min()
    out /= max(float(out.max()), 1e-12)
    return out


def remap_linear(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """`cv2.remap(image, map, None, cv2.INTER_LINEAR)` for maps inside the image: each output pixel
    samples the uint8 (H, W, C) image bilinearly at (map_x, map_y); rounded to uint8."""
    h, w = image.shape[:2]
    x = np.clip(map_x, 0, w - 1)
    y = np.clip(map_y, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.intp), w - 2) if w > 1 else np.zeros(x.shape, np.intp)
    y0 = np.minimum(np.floor(y).astype(np.intp), h - 2) if h > 1 else np.zeros(y.shape, np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    src = image.astype(np.float32)
    top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
    bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
    return np.rint(top * (1 - fy) + bottom * fy).clip(0, 255).astype(np.uint8)

"""Resizing as the ControlNet apps do it, with OpenCV's kernels ported to numpy bit for bit.

The original apps size every input with `resize_image` (ControlNet 1.0/1.1 `annotator/util.py`):
scale so the short side equals the requested resolution, round each side to a multiple of 64, and
resample with `cv2.INTER_LANCZOS4` when enlarging or `cv2.INTER_AREA` when shrinking. The kernels
below reproduce `cv2.resize` exactly for uint8 images (tested against OpenCV 4.10 and 5.0):

- area: OpenCV's box filter with fractional edge weights, accumulated in float32 in OpenCV's
  order; its integer-factor fast path (with its round-half-up 2x2 special case); and its
  "area" emulation when an axis is enlarged (fixed-point bilinear with area-style phases).
- lanczos: OpenCV's 8-tap Lanczos4 with its float coefficients rounded to 11-bit fixed point.
- linear: bit-exact to `cv2.INTER_LINEAR_EXACT` (8-bit weights); within 1 of `cv2.INTER_LINEAR`.
- nearest: `cv2.INTER_NEAREST`.

Every kernel replicates the border pixels, as OpenCV's resize does.

On top of these: the AUTOMATIC1111 extension's resize modes (`fit_to`) and its "pixel perfect"
annotator resolution (`pixel_perfect_resolution`), both from sd-webui-controlnet.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from .images import DEFAULT_MAX_PIXELS

Interpolation = Literal["auto", "area", "lanczos", "linear", "nearest"]
ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill"]
INTERPOLATIONS: tuple[str, ...] = ("auto", "area", "lanczos", "linear", "nearest")
RESIZE_MODES: tuple[str, ...] = ("just_resize", "crop_and_resize", "resize_and_fill")

# The longest an image's long side may be next to its short side. `resize_image` sets the short
# side, so the long side (and the work of everything after it) grows with the aspect ratio: a 64x1
# control image would ask for a 8192x128 output. 4:1 keeps every output within 4x the requested
# resolution squared and covers the panoramas people generate.
MAX_ASPECT_RATIO = 4

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: resize weights are fixed point with 11 fraction bits
_COEF_SCALE = 1 << _COEF_BITS
_FLT_EPSILON = float(np.finfo(np.float32).eps)
_DBL_EPSILON = float(np.finfo(np.float64).eps)


# ----------------------------------------------------------------------------------------------
# Coefficient tables: for each output index, the source indices (clamped = replicated border)
# and their weights, one row per output pixel.


def _area_table(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's `computeResizeAreaTab` for shrinking: each output cell averages the source pixels
    it covers, partly covered pixels weighted by the covered fraction. Returns (dst, taps) index
    and float32 weight arrays; unused taps have weight 0 (adding 0.0 leaves a float sum unchanged)."""
    scale = 1.0 / (dst / src)  # OpenCV computes scale_x = 1 / inv_scale_x, inv_scale_x = dst / src
    rows: list[list[tuple[int, float]]] = []
    for dx in range(dst):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, src - fsx1)
        sx2 = min(math.floor(fsx2), src - 1)
        sx1 = min(math.ceil(fsx1), sx2)
        taps = []
        if sx1 - fsx1 > 1e-3:
            taps.append((sx1 - 1, (sx1 - fsx1) / cell))
        taps.extend((sx, 1.0 / cell) for sx in range(sx1, sx2))
        if fsx2 - sx2 > 1e-3:
            taps.append((sx2, min(fsx2 - sx2, 1.0, cell) / cell))
        rows.append(taps)
    width = max(len(taps) for taps in rows)
    index = np.zeros((dst, width), dtype=np.intp)
    weight = np.zeros((dst, width), dtype=np.float32)
    for dx, taps in enumerate(rows):
        for k, (sx, alpha) in enumerate(taps):
            index[dx, k] = sx
            weight[dx, k] = alpha
    return index, weight


def _area_upscale_table(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA on an enlarged axis: bilinear taps at sx = floor(dx * src / dst), phase
    `frac((dx + 1) - (sx + 1) * dst / src)` in float32, weights in 11-bit fixed point."""
    inv_scale = dst / src
    d = np.arange(dst)
    sx = np.floor(d * (1.0 / inv_scale)).astype(np.intp)
    fx = ((d + 1) - (sx + 1) * inv_scale).astype(np.float32)
    fx = np.where(fx <= 0, np.float32(0), fx - np.floor(fx)).astype(np.float32)
    fx[sx >= src - 1] = 0
    sx = np.minimum(sx, src - 1)
    return _fixed_point_pairs(sx, fx, src)


def _fixed_point_pairs(sx: np.ndarray, fx: np.ndarray, src: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps (sx, sx + 1) with weights saturate_cast<short>((1 - fx, fx) * 2048), as OpenCV's
    fixed-point linear resize stores them."""
    pairs = np.stack([np.float32(1) - fx, fx], axis=1).astype(np.float32)
    weight = np.rint(pairs * np.float32(_COEF_SCALE)).astype(np.int32)
    return np.stack([sx, np.minimum(sx + 1, src - 1)], axis=1), weight


def _linear_table(src: int, dst: int, exact_uint8: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps at half-pixel centres `(dx + 0.5) * src / dst - 0.5`, clamped to the image.
    For uint8 the weights are cv2.INTER_LINEAR_EXACT's: the phase rounded to 8 bits (carrying into
    the next pixel when it rounds to 1) and its complement; otherwise plain float weights."""
    f = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    sx = np.floor(f).astype(np.intp)
    fx = f - sx
    if exact_uint8:
        fx = np.rint(fx * 256).astype(np.int64)
        carry = fx == 256
        sx, fx = sx + carry, np.where(carry, 0, fx)
    outside = (sx < 0) | (sx >= src - 1)
    fx[outside] = 0
    sx = np.clip(sx, 0, src - 1)
    one = 256 if exact_uint8 else 1.0
    return np.stack([sx, np.minimum(sx + 1, src - 1)], axis=1), np.stack([one - fx, fx], axis=1)


def _lanczos4_weights(fx: np.ndarray) -> np.ndarray:
    """OpenCV's `interpolateLanczos4` for an array of float32 phases: (n, 8) float32 weights for
    taps sx-3..sx+4, computed in double with the float32 intermediates OpenCV has, normalised in
    float32. Phases below FLT_EPSILON get the identity kernel."""
    s45 = 0.70710678118654752440084436210485
    cs = np.array([[1, 0], [-s45, -s45], [0, 1], [s45, -s45], [-1, 0], [s45, s45], [0, -1], [-s45, s45]])
    fx = fx.astype(np.float32)
    # `x + 3` and `x + 3 - i` are float32 expressions in OpenCV; sin/cos use libm (math.sin).
    y0 = -(fx + np.float32(3)).astype(np.float64) * math.pi * 0.25
    s0 = np.array([math.sin(v) for v in y0])
    c0 = np.array([math.cos(v) for v in y0])
    taps = np.arange(8, dtype=np.float32)
    y = -((fx[:, None] + np.float32(3)) - taps[None, :]).astype(np.float64) * math.pi * 0.25
    identity = fx < _FLT_EPSILON
    y[identity] = 1.0  # avoid 0/0; these rows are replaced below
    weights = ((cs[:, 0] * s0[:, None] + cs[:, 1] * c0[:, None]) / (y * y)).astype(np.float32)
    total = np.zeros(len(fx), dtype=np.float32)
    for k in range(8):  # float32 running sum, in OpenCV's order
        total = total + weights[:, k]
    weights = weights * (np.float32(1) / total)[:, None]
    weights[identity] = 0
    weights[identity, 3] = 1
    return weights


def _lanczos4_table(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """8 taps per output pixel at `(dx + 0.5) * scale - 0.5` (phase in float32), 11-bit weights."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(f).astype(np.intp)
    fx = (f - sx.astype(np.float32)).astype(np.float32)
    weight = np.rint(_lanczos4_weights(fx) * np.float32(_COEF_SCALE)).astype(np.int32)
    index = np.clip(sx[:, None] + np.arange(-3, 5)[None, :], 0, src - 1)
    return index, weight


# ----------------------------------------------------------------------------------------------
# Kernels on (H, W, C) arrays.


def _rows(src: np.ndarray, index: np.ndarray, weight: np.ndarray, dtype: type) -> np.ndarray:
    """Horizontal pass: out[:, dx] = sum_k src[:, index[dx, k]] * weight[dx, k], summed in tap order
    in `dtype` (the source is gathered in its own dtype and promoted per tap, as OpenCV does)."""
    out = np.zeros((src.shape[0], index.shape[0], src.shape[2]), dtype=dtype)
    term = np.empty_like(out)
    for k in range(index.shape[1]):
        np.multiply(src[:, index[:, k]], weight[None, :, k, None], out=term)
        out += term
    return out


def _columns(buf: np.ndarray, index: np.ndarray, weight: np.ndarray, dtype: type) -> np.ndarray:
    """Vertical pass: out[dy] = sum_k buf[index[dy, k]] * weight[dy, k], summed in tap order."""
    out = np.zeros((index.shape[0], *buf.shape[1:]), dtype=dtype)
    term = np.empty_like(out)
    for k in range(index.shape[1]):
        np.multiply(buf[index[:, k]], weight[:, k, None, None], out=term)
        out += term
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 255).astype(np.uint8)


def _resize_area(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.INTER_AREA on uint8."""
    src_h, src_w = img.shape[:2]
    scale_x, scale_y = 1.0 / (width / src_w), 1.0 / (height / src_h)
    if scale_x < 1 or scale_y < 1:  # OpenCV emulates "area" with bilinear taps when enlarging
        (xi, xw), (yi, yw) = _area_upscale_table(src_w, width), _area_upscale_table(src_h, height)
        buf = _rows(img, xi, xw, np.int32)
        r0, r1 = buf[yi[:, 0]] >> 4, buf[yi[:, 1]] >> 4  # OpenCV's VResizeLinear fixed-point steps
        out = ((yw[:, 0, None, None] * r0) >> 16) + ((yw[:, 1, None, None] * r1) >> 16)
        return _to_uint8((out + 2) >> 2)
    ix, iy = round(scale_x), round(scale_y)
    if abs(scale_x - ix) < _DBL_EPSILON and abs(scale_y - iy) < _DBL_EPSILON:
        blocks = img.reshape(height, iy, width, ix, img.shape[2]).astype(np.int32)
        total = blocks.sum(axis=(1, 3))
        if ix == 2 and iy == 2:  # OpenCV's 2x2 fast path rounds half up
            return ((total + 2) >> 2).astype(np.uint8)
        return _to_uint8(np.rint(total.astype(np.float32) * np.float32(1.0 / (ix * iy))))
    (xi, xw), (yi, yw) = _area_table(src_w, width), _area_table(src_h, height)
    buf = _rows(img, xi, xw, np.float32)
    return _to_uint8(np.rint(_columns(buf, yi, yw, np.float32)))


def _resize_lanczos(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.INTER_LANCZOS4 on uint8: int32 sums (wrapping as OpenCV's do), rounded by 22 bits."""
    (xi, xw), (yi, yw) = _lanczos4_table(img.shape[1], width), _lanczos4_table(img.shape[0], height)
    buf = _rows(img, xi, xw, np.int32)
    out = _columns(buf, yi, yw, np.int32)
    return _to_uint8((out + (1 << (2 * _COEF_BITS - 1))) >> (2 * _COEF_BITS))


def _resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.INTER_LINEAR_EXACT on uint8 (8-bit weights, one rounding); plain bilinear on floats."""
    exact = img.dtype == np.uint8
    (xi, xw), (yi, yw) = _linear_table(img.shape[1], width, exact), _linear_table(img.shape[0], height, exact)
    if not exact:
        xw, yw = xw.astype(img.dtype), yw.astype(img.dtype)
        return _columns(_rows(img, xi, xw, img.dtype), yi, yw, img.dtype)
    out = _columns(_rows(img, xi, xw, np.int64), yi, yw, np.int64)
    return _to_uint8((out + (1 << 15)) >> 16)


def _resize_nearest(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.INTER_NEAREST: source index floor(d * scale), clamped."""
    src_h, src_w = img.shape[:2]
    xs = np.minimum(np.floor(np.arange(width) * (1.0 / (width / src_w))).astype(np.intp), src_w - 1)
    ys = np.minimum(np.floor(np.arange(height) * (1.0 / (height / src_h))).astype(np.intp), src_h - 1)
    return img[ys][:, xs]


_KERNELS = {"area": _resize_area, "lanczos": _resize_lanczos, "linear": _resize_linear, "nearest": _resize_nearest}


# ----------------------------------------------------------------------------------------------
# Public API.


def resize(img: np.ndarray, width: int, height: int, interpolation: Interpolation = "auto") -> np.ndarray:
    """Resize an (H, W) or (H, W, C) image to `width` x `height`, as `cv2.resize` would.

    `interpolation`: "area", "lanczos", "linear", "nearest", or "auto" (Lanczos when the output has
    more pixels than the input, area otherwise: the original apps' rule). uint8 images only, except
    that "linear" and "nearest" also take float32/float64 (for masks). Same size returns a copy.
    """
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, C) array, got {_describe(img)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
    _check_size(width, height)
    if interpolation == "auto":
        interpolation = "lanczos" if width * height > img.shape[0] * img.shape[1] else "area"
    floats_ok = interpolation in ("linear", "nearest") and img.dtype in (np.float32, np.float64)
    if img.dtype != np.uint8 and not floats_ok:
        raise ValueError(f"{interpolation} resize takes uint8 images, got {img.dtype}")
    if (height, width) == img.shape[:2]:
        return img.copy()
    x = img[:, :, None] if img.ndim == 2 else img
    out = _KERNELS[interpolation](x, width, height)
    return out[:, :, 0] if img.ndim == 2 else out


def check_aspect_ratio(width: int, height: int, what: str = "the image") -> None:
    """Refuse (ValueError) an image whose long side is more than MAX_ASPECT_RATIO times its short side."""
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise ValueError(
            f"{what} is {width}x{height}: its long side is more than {MAX_ASPECT_RATIO} times its short side "
            f"(the limit, which bounds the output size); crop it to at most {MAX_ASPECT_RATIO}:1"
        )


def resize_image(img: np.ndarray, resolution: int, interpolation: Interpolation = "auto") -> np.ndarray:
    """The original apps' `resize_image`: scale so the short side is `resolution`, round each side
    to a multiple of 64 (`np.round`, half to even), Lanczos4 when enlarging (k > 1) else area
    (`interpolation` "auto"; "nearest" for label images). Images longer than MAX_ASPECT_RATIO times
    their width (or the reverse) are refused."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 64:
        raise ValueError(f"resolution must be an integer >= 64, got {resolution!r}")
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, C) array, got {_describe(img)}")
    check_aspect_ratio(img.shape[1], img.shape[0])
    new_w, new_h = resized_size(img.shape[1], img.shape[0], resolution)
    if interpolation == "auto":
        interpolation = "lanczos" if float(resolution) / min(img.shape[:2]) > 1 else "area"
    return resize(img, new_w, new_h, interpolation)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) `resize_image` gives a width x height picture: the short side scaled to
    `resolution`, each side rounded to a multiple of 64 (`np.round`, half to even)."""
    k = float(resolution) / min(width, height)
    return int(np.round(width * k / 64.0)) * 64, int(np.round(height * k / 64.0)) * 64


def fit_to(
    img: np.ndarray,
    width: int,
    height: int,
    mode: ResizeMode = "crop_and_resize",
    interpolation: Interpolation = "auto",
) -> np.ndarray:
    """Fit an image (or a detected map) to `width` x `height` with an AUTOMATIC1111 resize mode.

    - "just_resize": stretch to the size, ignoring the aspect ratio.
    - "crop_and_resize" (the extension's default): scale to cover the size, crop the centre.
    - "resize_and_fill": scale to fit inside the size and pad. As sd-webui-controlnet does, the
      padding is the per-channel median of the image's four border lines (truncated to uint8),
      so a line drawing on black is padded with black and a photo with its edge colour.
    Scaled sizes are `round(side * k)` like the extension's `safeint`; `interpolation` as `resize`.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, C) array, got {_describe(img)}")
    _check_size(width, height)
    if mode == "just_resize":
        return resize(img, width, height, interpolation)
    old_h, old_w = img.shape[:2]
    ratios = (height / old_h, width / old_w)
    k = max(ratios) if mode == "crop_and_resize" else min(ratios)
    new_w, new_h = max(1, int(np.round(old_w * k))), max(1, int(np.round(old_h * k)))
    scaled = resize(img, new_w, new_h, interpolation)
    if mode == "crop_and_resize":
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        return scaled[top : top + height, left : left + width].copy()
    out = np.empty((height, width, *img.shape[2:]), dtype=img.dtype)
    out[...] = _border_median(img)
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    out[top : top + new_h, left : left + new_w] = scaled
    return out


def pixel_perfect_resolution(
    image_hw: tuple[int, int], target_w: int, target_h: int, mode: ResizeMode = "crop_and_resize"
) -> int:
    """The annotator resolution that makes the detected map come out at the target size
    (sd-webui-controlnet's "pixel perfect"): with k0 = target_h / H and k1 = target_w / W, it is
    round(min(k0, k1) * min(H, W)) for "resize_and_fill" and round(max(k0, k1) * min(H, W)) for
    the other modes, i.e. the scale `fit_to` applies, expressed as a short-side resolution."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    raw_h, raw_w = (int(v) for v in image_hw)
    if raw_h <= 0 or raw_w <= 0 or target_w <= 0 or target_h <= 0:
        raise ValueError(f"sizes must be positive, got image {raw_h}x{raw_w} and target {target_w}x{target_h}")
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    k = min(k0, k1) if mode == "resize_and_fill" else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))


def _border_median(img: np.ndarray) -> np.ndarray:
    """Per-channel median of the top, bottom, left and right pixel lines, cast to the image dtype."""
    x = img[:, :, None] if img.ndim == 2 else img
    borders = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
    median = np.median(borders, axis=0).astype(img.dtype)
    return median[0] if img.ndim == 2 else median


def _check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if width * height > DEFAULT_MAX_PIXELS:
        raise ValueError(f"refusing to make a {width}x{height} image: over {DEFAULT_MAX_PIXELS} pixels")


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return type(x).__name__

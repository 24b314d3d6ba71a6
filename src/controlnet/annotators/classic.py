"""The classical annotators: no network weights, plain numpy.

Each takes an RGB uint8 (H, W, 3) image and keyword parameters and returns a control image of the
same height and width: uint8 (H, W, 3), except `inpaint`, whose hint is float32 (see there).
Behaviour follows the original apps (ControlNet 1.0 `gradio_*.py`, ControlNet 1.1
`annotator/shuffle`, `gradio_inpaint.py`) and the AUTOMATIC1111 extension where noted.
"""

from __future__ import annotations

import numpy as np

from ..imaging.images import HWC3
from ..imaging.resize import resize
from .canny import canny
from .filters import gaussian_blur, make_noise_disk, remap_linear, rgb_to_grey

CHANNELS: tuple[str, ...] = ("luma", "red", "green", "blue")


def canny_edges(image: np.ndarray, *, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """The canny app's map: `cv2.Canny` on the RGB image (white edges on black), as 3 channels."""
    return HWC3(canny(image, low_threshold, high_threshold))


def scribble(image: np.ndarray, *, threshold: int = 127) -> np.ndarray:
    """User scribbles (the scribble app): dark strokes on a light canvas become white lines on black,
    every pixel whose darkest channel is below `threshold` (127 in the original)."""
    detected = np.zeros_like(image, dtype=np.uint8)
    detected[np.min(image, axis=2) < threshold] = 255
    return detected


def shuffle(image: np.ndarray, *, seed: int = 0, cell_size: int = 256) -> np.ndarray:
    """ControlNet 1.1's ContentShuffleDetector: warp the image through a smooth random flow field
    (one random target per `cell_size` pixels, bicubically interpolated), scrambling layout while
    keeping colours and textures. The same seed gives the same shuffle."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    x = make_noise_disk(h, w, 1, cell_size, rng)[:, :, 0] * float(w - 1)
    y = make_noise_disk(h, w, 1, cell_size, rng)[:, :, 0] * float(h - 1)
    return remap_linear(image, x.astype(np.float32), y.astype(np.float32))


def color_shuffle(image: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """ControlNet 1.1's ColorShuffleDetector: blend two contrast-stretched random colour fields by
    the image's intensity, per channel, then normalise each channel to [0, 255]."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    cell = int(rng.integers(64, 384, endpoint=True))  # random.randint(64, 384) in the original
    a = make_noise_disk(h, w, 3, cell, rng)
    b = make_noise_disk(h, w, 3, cell, rng)
    c = (a + b) / 2.0
    a = (c + (a - c) * 3.0).clip(0, 1)
    b = (c + (b - c) * 3.0).clip(0, 1)
    level = image.astype(np.float32) / 255.0
    y = a * level + b * (1 - level)
    y -= np.min(y, axis=(0, 1), keepdims=True)
    y /= np.maximum(np.max(y, axis=(0, 1), keepdims=True), 1e-5)
    return (y * 255.0).clip(0, 255).astype(np.uint8)


def grey(image: np.ndarray) -> np.ndarray:
    """BT.601 luma (`cv2.COLOR_RGB2GRAY`, exact) repeated on 3 channels: a colour-free condition."""
    return HWC3(rgb_to_grey(image))


def tile(image: np.ndarray, *, down_sampling_rate: float = 1.0) -> np.ndarray:
    """The tile preprocessor (sd-webui-controlnet `tile_resample`, for ControlNet 1.1 tile): shrink
    by `down_sampling_rate` with area averaging, then enlarge back to the input size (Lanczos4),
    giving the blurred image the tile model refines. Rates below 1.1 return the image unchanged."""
    if down_sampling_rate < 1.1:
        return image.copy()
    h, w = image.shape[:2]
    small_w, small_h = max(1, int(w / down_sampling_rate)), max(1, int(h / down_sampling_rate))
    small = resize(image, small_w, small_h, "area")
    return resize(small, w, h, "lanczos")


def image_to_mask(
    image: np.ndarray, *, channel: str = "luma", percentile: float = 50.0, invert: bool = False
) -> np.ndarray:
    """ControlNet 1.1's img2mask, made deterministic: a binary mask, white where `channel` is below
    its `percentile`-th percentile (the original draws the channel, the percentile in [10, 90) and
    the inversion at random). `invert` swaps white and black."""
    values = rgb_to_grey(image) if channel == "luma" else image[:, :, CHANNELS.index(channel) - 1]
    mask = values < np.percentile(values, percentile)
    if invert:
        mask = ~mask
    return HWC3(mask.astype(np.uint8) * 255)


def inpaint(image: np.ndarray, *, mask: np.ndarray, mask_blur: float = 5.0) -> np.ndarray:
    """The inpaint hint (ControlNet 1.1 `gradio_inpaint.py`): the image scaled to [0, 1] as float32,
    with every masked pixel set to -1 in all channels. Hints are otherwise uint8, and -1 has no
    uint8 form, so this hint is float32 (H, W, 3); the pipeline uses it as is, without /255.

    `mask`: (H, W) or (H, W, C) (channel 0 is used), bool, uint8 (0..255) or float (0..1); white /
    true / 1 means "repaint here". It is resized bilinearly to the image if its size differs, blurred
    with a Gaussian of sigma `mask_blur` (0: none), and a pixel is masked where the result is > 0.5.
    """
    h, w = image.shape[:2]
    m = _mask_to_float(mask)
    if m.shape != (h, w):
        m = resize(m, w, h, "linear")
    m = gaussian_blur(m, mask_blur)
    hint = image.astype(np.float32) / 255.0
    hint[m > 0.5] = -1.0
    return hint


def invert(image: np.ndarray) -> np.ndarray:
    """255 - image: turns black-on-white line art into the white-on-black lines the models expect."""
    return 255 - image


def passthrough(image: np.ndarray) -> np.ndarray:
    """The image itself (already RGB uint8 3-channel); for conditions made elsewhere."""
    return image.copy()


def _mask_to_float(mask: np.ndarray) -> np.ndarray:
    """An (H, W) float32 mask in [0, 1] from the accepted mask layouts and dtypes."""
    if mask.ndim == 3:
        mask = mask[:, :, 0]
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"inpaint mask must be a non-empty (H, W) or (H, W, C) array, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if mask.dtype == np.uint8:
        return mask.astype(np.float32) / 255.0
    if np.issubdtype(mask.dtype, np.floating):
        return np.nan_to_num(mask.astype(np.float32)).clip(0.0, 1.0)
    raise ValueError(f"inpaint mask must be bool, uint8 or float, got {mask.dtype}")

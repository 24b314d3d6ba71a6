"""Images in and out: safe loading to RGB uint8 arrays, the original `HWC3`, PNGs with metadata.

`load_image` reads any file Pillow can decode and returns what the original ControlNet apps work on:
an RGB uint8 (H, W, 3) array, with transparency composited over white as their `HWC3` does
(docs/reference.md, "The original app"). Bad input is refused with a one-line `ImageError`: a missing or unreadable
file, an empty file, a file that is not an image, a corrupt or truncated image, and an image larger
than `max_pixels` (decompression bombs are refused from the header, before any pixel is decoded).

Modes: greyscale and 1-bit become three equal channels; 16-bit greyscale ("I;16*", and Pillow's
32-bit "I") is scaled to 8 bits by round(v / 257), not clipped; 32-bit float ("F") is taken as
[0, 1] when no value exceeds 1, else as [0, 255]; LA, RGBA, P and any image with a transparency key
are composited over white; CMYK, YCbCr and palette images are converted to RGB; the EXIF
orientation is applied.

Resizing (`resize_image`, `fit_to`, `pixel_perfect_resolution`, `resize`) lives with its
OpenCV-exact kernels in `controlnet.imaging.resize`.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ..files import atomic_file

DEFAULT_MAX_PIXELS = 8192 * 8192  # the largest image load_image decodes unless told otherwise

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# What Pillow raises on damaged data: truncated streams (OSError), bad chunks or CRCs
# (SyntaxError), bad values (ValueError), short reads (EOFError, struct.error), bad zlib data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageError(ValueError):
    """An image file that cannot or should not be loaded; the message is one line."""


def HWC3(x: np.ndarray) -> np.ndarray:
    """The original apps' `HWC3`: a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array to
    (H, W, 3). Grey is repeated; RGBA is composited over white in float32,
    `color * alpha + 255 * (1 - alpha)`, then clipped and truncated to uint8. A 3-channel input is
    returned as is (not copied). The original's asserts raise ValueError here."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, C) image with C in 1, 3, 4, got shape {x.shape}")
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


ImageSource = str | os.PathLike[str] | bytes  # a file, or a file's bytes already in memory


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file (or its bytes) as an RGB uint8 (H, W, 3) array (see the module docstring
    for modes).

    Raises ImageError (a ValueError) with a one-line message for a missing, unreadable, empty,
    non-image, corrupt or truncated file, or one with more than `max_pixels` pixels."""
    with _open_image(source, max_pixels) as im:
        im.load()
        return _to_rgb(_apply_orientation(im))


def image_size(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding a pixel; ImageError as `load_image`
    (an image over `max_pixels` is refused)."""
    with _open_image(source, max_pixels) as im:
        return im.size


def read_png_text(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, str]:
    """The tEXt, zTXt and iTXt chunks of a PNG as a dict (ImageError as `load_image`)."""
    with _open_image(path, max_pixels) as im:
        if im.format != "PNG":
            raise ImageError(f"{path} is a {im.format} image, not a PNG")
        return {str(k): str(v) for k, v in im.text.items()}


def save_png(path: str | os.PathLike[str], image: np.ndarray, text: Mapping[str, str] | None = None) -> Path:
    """Write a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as a PNG with `text` as
    metadata chunks (tEXt for Latin-1 values, iTXt for other Unicode, compressed when long).

    The file appears atomically: it is written to a temporary file in the same folder, synced,
    then renamed over `path`, so a reader never sees half a file. Returns the path."""
    path = Path(path)
    data = encode_png(image, text)  # encoded first: a bad image or text leaves no file behind
    with atomic_file(path) as f:
        f.write(data)
    return path


def encode_png(image: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
    """The PNG file `save_png` writes, as bytes in memory."""
    array = _png_array(image)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        _check_text(key, value)
        info.add_text(key, value, zip=len(value) > 1024)  # Pillow falls back to iTXt for non-Latin-1
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@contextlib.contextmanager
def _open_image(source: ImageSource, max_pixels: int) -> Iterator[Image.Image]:
    """Open a file (or bytes) with Pillow, refusing oversized images from their header, and turn
    every failure inside the block into a one-line ImageError (naming the file, or "the image")."""
    if isinstance(source, (bytes, bytearray)):
        path: Path | str = "the image"
        f: IO[bytes] = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            f = open(path, "rb")  # noqa: SIM115 -- closed by the `with f` below
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    with f, warnings.catch_warnings():
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both refuse here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if f.seek(0, os.SEEK_END) == 0:
            raise ImageError(f"{path} is empty")
        f.seek(0)
        try:
            with Image.open(f) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"{path} is {width}x{height} pixels, over the limit of {max_pixels}; refusing to decode it"
                    )
                yield im
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{path} is too large to decode safely: {_one_line(e)}") from None
        except UnidentifiedImageError:
            raise ImageError(f"{path} is not an image (or not in a format Pillow reads)") from None
        except _DECODE_ERRORS as e:
            raise ImageError(f"{path} is corrupt or truncated: {_one_line(e)}") from None


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; unreadable EXIF leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im) or im
    except (SyntaxError, ValueError, struct.error, KeyError, TypeError):
        return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image to an RGB uint8 (H, W, 3) array."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.array(im).astype(np.float64).clip(0, 65535)
        return HWC3(np.rint(values / 257.0).astype(np.uint8))
    if mode == "F":
        values = np.nan_to_num(np.array(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.max(initial=0.0) <= 1.0:
            values = values * 255.0
        return HWC3(np.rint(values.clip(0, 255)).astype(np.uint8))
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return HWC3(np.array(im.convert("RGBA")))
    if mode == "RGB":
        return np.array(im)
    if mode in ("L", "1"):
        return HWC3(np.array(im.convert("L")))
    try:
        return np.array(im.convert("RGB"))
    except ValueError as e:
        raise ImageError(f"cannot convert a {mode} image to RGB: {_one_line(e)}") from None


def _png_array(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.size == 0 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ValueError(f"expected a non-empty (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _check_text(key: object, value: object) -> None:
    """PNG text keywords are 1-79 Latin-1 characters without leading/trailing spaces or NUL."""
    if not isinstance(key, str) or not isinstance(value, str):
        raise TypeError(f"PNG text keys and values must be str, got {type(key).__name__}: {type(value).__name__}")
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"PNG text key {key!r} is not Latin-1") from None
    if not 1 <= len(key) <= 79 or key != key.strip() or "\0" in key:
        raise ValueError(f"PNG text key {key!r} must be 1-79 characters, no NUL, no leading/trailing spaces")
    if "\0" in value:
        raise ValueError(f"PNG text value for {key!r} contains a NUL character")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

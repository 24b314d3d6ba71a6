"""Kept for code written against the earlier layout (``from controlnet.images import load_image``):
the code lives in :mod:`controlnet.imaging.images`."""

from .imaging.images import (
    DEFAULT_MAX_PIXELS,
    HWC3,
    ImageError,
    encode_png,
    image_size,
    load_image,
    read_png_text,
    save_png,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "HWC3",
    "ImageError",
    "encode_png",
    "image_size",
    "load_image",
    "read_png_text",
    "save_png",
]

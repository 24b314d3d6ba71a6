"""Annotators (condition extractors): the registry from names to functions image -> control image.

    >>> hint = run_annotator("canny", rgb, 512, low_threshold=100, high_threshold=200)

`run_annotator` sizes the image as the original apps do (`resize_image`: short side to
`resolution`, sides rounded to multiples of 64) and runs the annotator on it. Every annotator
returns uint8 (H, W, 3), except "inpaint", whose hint is float32 (H, W, 3) in [0, 1] with -1 at
masked pixels (`Annotator.float_output`).

The classical annotators are here; each family of the others has its module (`softedge`, `lineart`,
`mlsd`, `openpose`, `depth`, `normal`, `maps`), their networks in `networks/`. Nothing is loaded at import:
a network annotator names its `weights` (weights.py: one folder, original file names) and reads them
in `Annotator.factory` on first use, for the `Runtime` (folder, device, dtype) it is called with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..imaging.images import HWC3
from ..imaging.resize import INTERPOLATIONS, RESIZE_MODES, fit_to, pixel_perfect_resolution, resize, resize_image
from . import classic, depth, lineart, maps, mlsd, normal, openpose, posejson, softedge
from .base import Annotation, Annotator, AnnotatorFn, Param, ParamValue, Runtime
from .canny import canny
from .weights import AnnotatorWeightsError, WeightFile, annotators_folder

__all__ = [
    "ANNOTATORS",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "Annotation",
    "Annotator",
    "AnnotatorFn",
    "AnnotatorWeightsError",
    "Param",
    "ParamValue",
    "Runtime",
    "WeightFile",
    "annotate",
    "annotators_folder",
    "canny",
    "fit_to",
    "get_annotator",
    "pixel_perfect_resolution",
    "register",
    "resize",
    "resize_image",
    "run_annotator",
]

_SEED = Param("seed", 0, 0, 2**32 - 1, help="random seed; the same seed gives the same result")


def _plain(fn: AnnotatorFn) -> Callable[[Runtime], AnnotatorFn]:
    """Factory for a classical annotator: the function itself, nothing to load."""
    return lambda runtime: fn


ANNOTATORS: dict[str, Annotator] = {
    a.name: a
    for a in (
        Annotator(
            "canny",
            "Canny edges, exact to OpenCV (ControlNet canny)",
            _plain(classic.canny_edges),
            (
                Param("low_threshold", 100, 1, 255, help="edges continue through gradients above this"),
                Param("high_threshold", 200, 1, 255, help="edges start at gradients above this"),
            ),
        ),
        Annotator(
            "scribble",
            "dark strokes on a light background -> white lines on black (ControlNet scribble)",
            _plain(classic.scribble),
            (Param("threshold", 127, 1, 255, help="a pixel is a stroke when its darkest channel is below this"),),
        ),
        Annotator(
            "shuffle",
            "content shuffle: warp by a random smooth flow (ControlNet 1.1 shuffle)",
            _plain(classic.shuffle),
            (_SEED, Param("cell_size", 256, 16, 1024, help="pixels per random flow sample; larger is smoother")),
        ),
        Annotator(
            "color_shuffle",
            "random colour fields blended by intensity (ControlNet 1.1 colour shuffle)",
            _plain(classic.color_shuffle),
            (_SEED,),
        ),
        Annotator("grey", "greyscale (BT.601 luma) on 3 channels", _plain(classic.grey)),
        Annotator(
            "tile",
            "downsample then upsample: a blurred image for ControlNet 1.1 tile",
            _plain(classic.tile),
            (Param("down_sampling_rate", 1.0, 1.0, 8.0, help="shrink factor; below 1.1 the image is kept"),),
        ),
        Annotator(
            "image_to_mask",
            "binary mask from an image channel below a percentile (ControlNet 1.1 img2mask)",
            _plain(classic.image_to_mask),
            (
                Param("channel", "luma", choices=classic.CHANNELS, help="which channel to threshold"),
                Param("percentile", 50.0, 0.0, 100.0, help="pixels below this percentile become white"),
                Param("invert", False, help="swap white and black"),
            ),
        ),
        Annotator(
            "inpaint",
            "image with masked pixels set to -1 (ControlNet 1.1 inpaint); float32 hint",
            _plain(classic.inpaint),
            (Param("mask_blur", 5.0, 0.0, 16.0, help="Gaussian sigma applied to the mask before the 0.5 cut"),),
            inputs=("mask",),
            float_output=True,
        ),
        Annotator("invert", "255 - image: black-on-white line art to white-on-black", _plain(classic.invert)),
        Annotator("none", "the image itself, as RGB", _plain(classic.passthrough)),
        *softedge.ANNOTATORS,
        *lineart.ANNOTATORS,
        *mlsd.ANNOTATORS,
        *openpose.ANNOTATORS,
        *depth.ANNOTATORS,
        *normal.ANNOTATORS,
        *maps.ANNOTATORS,
        *posejson.ANNOTATORS,
    )
}


def register(annotator: Annotator, *, replace: bool = False) -> None:
    """Add an annotator to the registry (ValueError if the name is taken, unless `replace`)."""
    if annotator.name in ANNOTATORS and not replace:
        raise ValueError(f"annotator {annotator.name!r} is already registered")
    ANNOTATORS[annotator.name] = annotator


def get_annotator(name: str) -> Annotator:
    """The registered annotator called `name`, or ValueError listing the choices."""
    try:
        return ANNOTATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown annotator {name!r}; choose one of {', '.join(ANNOTATORS)}") from None


def annotate(
    name: str, image: np.ndarray, resolution: int | None = None, *, runtime: Runtime | None = None, **params: Any
) -> Annotation:
    """Run annotator `name` on an RGB uint8 image (grey and RGBA accepted, as `HWC3`): the control
    image and the annotator's data (`Annotation`).

    With `resolution`, the image is first sized by `resize_image` (short side to `resolution`,
    sides multiples of 64), as the original apps do; with None it is used at its own size.
    `runtime` says where network annotators read their weights and run (default:
    `Runtime.default()`). `params` are the annotator's parameters (unknown names and out-of-range
    values raise ValueError) and its array inputs (the inpaint `mask`)."""
    annotator = get_annotator(name)
    rgb = HWC3(image)
    if resolution is not None:
        rgb = resize_image(rgb, resolution, annotator.resize)
    return annotator.annotate(rgb, runtime, **params)


def run_annotator(
    name: str, image: np.ndarray, resolution: int | None = None, *, runtime: Runtime | None = None, **params: Any
) -> np.ndarray:
    """The control image of `annotate` (same arguments)."""
    return annotate(name, image, resolution, runtime=runtime, **params).image

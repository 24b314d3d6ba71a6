"""Line art, as the AUTOMATIC1111 extension names its modules: ``lineart_standard`` (no network),
``lineart_realistic`` (``sk_model.pth``), ``lineart_coarse`` (``sk_model2.pth``) and
``lineart_anime`` (``netG.pth``). The first three feed ``control_v11p_sd15_lineart``,
``lineart_anime`` feeds ``control_v11p_sd15s2_lineart_anime``; all give white lines on black.

The steps follow the extension (scripts/preprocessor/legacy/processor.py: ``lineart_standard``,
``lineart``, ``lineart_coarse``, ``lineart_anime``; annotator/lineart/__init__.py,
annotator/lineart_anime/__init__.py) and ControlNet-v1-1-nightly (annotator/lineart,
annotator/lineart_anime). The networks draw dark lines on white; the extension inverts their uint8
map (``255 - map``), so the map the ControlNet model is fed is white lines on black. None of these
modules takes a parameter besides the resolution. The image arrives sized by `run_annotator` (sides
multiples of 64); other sizes are edge-padded at the bottom and right to multiples of 64 and the map
cropped back, as the extension's ``resize_image_with_pad`` / ``remove_pad`` do.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import nn

from .. import runtime as policy
from ..imaging.images import HWC3
from .base import Annotator, AnnotatorFn, Runtime, pad_to_64
from .networks.lineart import LineartGenerator
from .networks.lineart_anime import AnimeLineartUnet
from .weights import WeightFile, load_network

ANNOTATORS_REPO = "https://huggingface.co/lllyasviel/Annotators"

# sk_model.pth and sk_model2.pth hold the same keys and shapes (the same network, trained apart), so
# no key tells one from the other; the markers tell them from every other annotator's file.
_GENERATOR_MARKERS = ("model0.1.weight", "model2.0.conv_block.1.weight", "model4.1.weight")
REALISTIC_WEIGHTS = WeightFile(
    "sk_model.pth",
    "the line-art generator of informative-drawings (realistic)",
    ANNOTATORS_REPO,
    markers=_GENERATOR_MARKERS,
    size=17_173_511,
)
COARSE_WEIGHTS = WeightFile(
    "sk_model2.pth",
    "the line-art generator of informative-drawings (coarse)",
    ANNOTATORS_REPO,
    markers=_GENERATOR_MARKERS,
)
ANIME_WEIGHTS = WeightFile(
    "netG.pth",
    "the Anime2Sketch U-Net generator (anime line art)",
    ANNOTATORS_REPO,
    markers=("model.model.0.weight", "model.model.1.model.1.weight", "model.model.3.weight"),
    size=217_631_959,
)


def as_input(pixels: np.ndarray, runtime: Runtime) -> torch.Tensor:
    """(H, W, C) float32 pixels as a network's (1, C, H, W) input on the runtime's device and dtype:
    a view with channels last in memory, as the references make it (``rearrange`` of HWC)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(runtime.device, policy.DTYPES[runtime.dtype])
    return tensor.permute(2, 0, 1).unsqueeze(0)


# ------------------------------------------------------------------------------------------------
# lineart_standard: no network (processor.py ``lineart_standard``)


def lineart_standard(rgb: np.ndarray) -> np.ndarray:
    """Dark detail on a light ground as white lines: how much darker than its Gaussian-blurred
    surroundings (sigma 6) each pixel is, in its least-darkened channel, scaled so that the median of
    the values above 8 (at least 16) maps to 127, clipped to uint8."""
    h, w = rgb.shape[:2]
    x = pad_to_64(rgb).astype(np.float32)
    darker = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    strong = darker[darker > 8]
    # the reference takes max(16, median); with no value above 8 its median is NaN and 16 is kept
    scale = max(16, np.median(strong)) if strong.size else 16
    darker /= scale
    darker *= 127
    return HWC3(darker.clip(0, 255).astype(np.uint8)[:h, :w])


# ------------------------------------------------------------------------------------------------
# The networks on an image


def generator_lines(network: LineartGenerator, rgb: np.ndarray, runtime: Runtime) -> np.ndarray:
    """The generator's map (H, W) uint8, dark lines on white, for an RGB uint8 image whose sides are
    multiples of 4: RGB / 255 in, sigmoid out, times 255, clipped, truncated (annotator/lineart)."""
    pixels = torch.from_numpy(rgb).float() / 255.0
    with torch.inference_mode():
        line = network(as_input(pixels.numpy(), runtime))[0, 0].float().cpu().numpy()
    policy.check_finite(line, "the line-art network's map")
    return (line * 255.0).clip(0, 255).astype(np.uint8)


def anime_lines(network: AnimeLineartUnet, rgb: np.ndarray, runtime: Runtime) -> np.ndarray:
    """The anime network's map (H, W) uint8, dark lines on white: the image resized (bicubic) up to
    sides that are multiples of 256, scaled to [-1, 1], the tanh output mapped back to 0..255 and
    resized (bicubic, in float32) to the image, clipped, truncated (annotator/lineart_anime)."""
    h, w = rgb.shape[:2]
    big = cv2.resize(rgb, (256 * -(-w // 256), 256 * -(-h // 256)), interpolation=cv2.INTER_CUBIC)
    pixels = torch.from_numpy(big).float() / 127.5 - 1.0
    with torch.inference_mode():
        line = network(as_input(pixels.numpy(), runtime))[0, 0].float() * 127.5 + 127.5
    line = line.cpu().numpy()
    policy.check_finite(line, "the anime line-art network's map")
    return cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def _network_factory(
    weight: WeightFile,
    make: Callable[[], nn.Module],
    lines: Callable[[nn.Module, np.ndarray, Runtime], np.ndarray],
) -> Callable[[Runtime], AnnotatorFn]:
    """The factory of one network annotator: the network read once per runtime, then per image:
    pad to multiples of 64, the network's dark-on-white map, inverted, cropped, 3 channels."""

    def factory(runtime: Runtime) -> AnnotatorFn:
        network = load_network(weight, runtime.folder, make, runtime.device, runtime.dtype)

        def annotate(rgb: np.ndarray) -> np.ndarray:
            h, w = rgb.shape[:2]
            return HWC3(255 - lines(network, pad_to_64(rgb), runtime)[:h, :w])

        return annotate

    return factory


ANNOTATORS: tuple[Annotator, ...] = (
    Annotator(
        "lineart_standard",
        "lines from dark detail on a light ground, no network (ControlNet 1.1 lineart)",
        lambda runtime: lineart_standard,
    ),
    Annotator(
        "lineart_realistic",
        "line art of a photo by the informative-drawings generator (ControlNet 1.1 lineart)",
        _network_factory(REALISTIC_WEIGHTS, LineartGenerator, generator_lines),
        weights=(REALISTIC_WEIGHTS,),
    ),
    Annotator(
        "lineart_coarse",
        "coarser line art by the informative-drawings generator (ControlNet 1.1 lineart)",
        _network_factory(COARSE_WEIGHTS, LineartGenerator, generator_lines),
        weights=(COARSE_WEIGHTS,),
    ),
    Annotator(
        "lineart_anime",
        "anime-style line art by the Anime2Sketch U-Net (ControlNet 1.1 lineart_anime)",
        _network_factory(ANIME_WEIGHTS, AnimeLineartUnet, anime_lines),
        weights=(ANIME_WEIGHTS,),
    ),
)

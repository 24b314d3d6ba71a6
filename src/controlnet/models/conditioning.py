"""SDXL's size conditioning and the vector ``y`` the UNet (and its ControlNets) read.

SDXL was trained with three pairs of numbers about each training image (Podell et al. 2023, "SDXL",
section 2.2): its size before it was resized (``original_size``), the top-left corner of the crop
taken from it (``crop_top_left``) and the size it was made into (``target_size``). At generation
they steer the result: a small original size gives the blur of an upscaled picture, a crop away
from (0, 0) a cropped-looking subject. What users expect, and what diffusers' and ComfyUI's SDXL
pipelines default to, is original = target = the size generated, crop (0, 0); each can be changed.

The six numbers (heights before widths, top before left) are embedded by sinusoids of 256 channels
each, cosines first, and concatenated after the pooled text embedding:
``y = [pooled (1280), emb(orig_h), emb(orig_w), emb(crop_top), emb(crop_left), emb(target_h),
emb(target_w)]``, 2816 channels: sgm's GeneralConditioner over the ``vector`` outputs of
FrozenOpenCLIPEmbedder2 and three ConcatTimestepEmbedderND (sd_xl_base.yaml, in that order);
diffusers' ``add_time_ids = original_size + crops_coords_top_left + target_size``, ``add_time_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ADDED_TIME_IDS, TIME_ID_EMBED_DIM
from .layers import TimestepEmbedding


def _pair(value: object, what: str, minimum: int) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{what} must be two whole numbers, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{what} must be at least {minimum} each, got {tuple(value)}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size and crop conditioning, in pixels. ``None`` sizes are the generated image's size."""

    original_size: tuple[int, int] | None = None  # (height, width) of the imagined source picture
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the imagined crop from it
    target_size: tuple[int, int] | None = None  # (height, width) the picture was made into

    def __post_init__(self) -> None:
        for name in ("original_size", "target_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _pair(value, name, 1))
        object.__setattr__(self, "crop_top_left", _pair(self.crop_top_left, "crop_top_left", 0))

    def time_ids(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """The six numbers for an image of ``height`` x ``width`` pixels, in the order SDXL reads them."""
        size = _pair((height, width), "the image size", 1)
        original = self.original_size or size
        target = self.target_size or size
        return (*original, *self.crop_top_left, *target)


def time_id_features(time_ids: torch.Tensor) -> torch.Tensor:
    """[B, 6] numbers -> [B, 6 * 256]: each embedded on its own (cosines, then sines), in float32."""
    if time_ids.ndim != 2 or time_ids.shape[1] != ADDED_TIME_IDS:
        raise ValueError(f"time_ids must have shape [batch, {ADDED_TIME_IDS}], got {list(time_ids.shape)}")
    features = TimestepEmbedding(TIME_ID_EMBED_DIM)(time_ids.flatten())  # the timesteps' sinusoids
    return features.reshape(time_ids.shape[0], ADDED_TIME_IDS * TIME_ID_EMBED_DIM)


def added_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's vector y [B, projection_dim + 1536]: the pooled text embedding [B, projection_dim]
    and the embedded size conditioning of ``time_ids`` [B, 6] (one row per image, or one row for all)."""
    if time_ids.shape[0] == 1 and pooled.shape[0] != 1:
        time_ids = time_ids.expand(pooled.shape[0], -1)
    if time_ids.shape[0] != pooled.shape[0]:
        raise ValueError(f"{pooled.shape[0]} pooled embeddings but {time_ids.shape[0]} rows of time_ids")
    features = time_id_features(time_ids.to(pooled.device))
    return torch.cat([pooled, features.to(pooled.dtype)], dim=1)


def size_vector(pooled: torch.Tensor, height: int, width: int, size: SizeConditioning | None = None) -> torch.Tensor:
    """The vector y for images of ``height`` x ``width`` pixels: ``size``'s conditioning (by default
    original = target = that size, crop (0, 0)) after each row of ``pooled``."""
    ids = (size or SizeConditioning()).time_ids(height, width)
    return added_vector(pooled, torch.tensor([ids], dtype=torch.float32))

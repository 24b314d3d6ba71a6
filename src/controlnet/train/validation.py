"""Validation: images generated from fixed samples with fixed seeds, and their scores.

Each objective decides what its validation shows and scores (``Objective.validation_images``);
what they share is here: the fixed samples as images, generation over them, the distances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..runtime import NonFiniteError
from .config import TrainConfig, TrainingError

if TYPE_CHECKING:
    from .logs import RunLog
    from .objectives import Objective

PROMPT_GUIDANCE = 7.5  # the guidance of the "prompt" row; the "no prompt" row has none (1.0)


@dataclass
class ValidationSet:
    """The samples a run validates on (the first ``validation_count`` of the data: fixed prompts
    and control images) and how it generates from them; made once per run."""

    samples: list[dict]
    steps: int
    resolution: int
    device: torch.device
    # The frozen base's images for the samples without control, made once (controlnet task).
    base_images: list | None = field(default=None, repr=False)

    hints: list[np.ndarray] = field(init=False, repr=False)  # the control images, (H, W, 3) uint8
    targets: list[np.ndarray] = field(init=False, repr=False)  # the data images, (H, W, 3) uint8
    prompts: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.hints = [(item["hint"].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for item in self.samples]
        self.targets = [to_uint8(item["image"]) for item in self.samples]
        self.prompts = [item["prompt"] for item in self.samples]

    @classmethod
    def from_dataset(cls, dataset, config: TrainConfig, resolution: int, device: torch.device) -> ValidationSet:
        samples = [dataset[i] for i in range(min(config.validation_count, len(dataset)))]
        return cls(samples, config.validation_steps, resolution, device)


def run_validation(
    objective: Objective, validation: ValidationSet, trainable: dict[str, torch.Tensor], step: int, logs: RunLog
) -> dict[str, float]:
    """The objective's validation images and scores at ``step``, written to the logs; a failure
    (NaN images, a full disk) as a TrainingError."""
    try:
        scores, grid_image = objective.validation_images(validation, trainable)
        logs.validation(step, scores, grid_image)
    except (NonFiniteError, OSError) as failure:
        reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else failure
        raise TrainingError(f"validation at step {step}: {reason}") from None
    return scores


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) image in [-1, 1] as an (H, W, 3) uint8 array."""
    return ((image.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().cpu().numpy()


def validation_pipeline(model, controlnets: Sequence, device: torch.device, adapters: Sequence = ()):
    """A float32 pipeline over the run's model (the frozen parts run in float32 for validation)."""
    from ..pipeline import Pipeline

    return Pipeline(
        model, list(controlnets), device=device, dtype=torch.float32, channels_last=False, adapters=list(adapters)
    )


def generate_row(pipe, validation: ValidationSet, *, use_prompt: bool, control: bool, adapter: bool = False) -> list:
    """One image per sample, seed = the sample's index: with its prompt (guided) or with none
    (unguided), with its control image (through ControlNet 0, or adapter 0) or without."""
    from ..pipeline import ControlUnit

    row = []
    for i, (hint, prompt) in enumerate(zip(validation.hints, validation.prompts, strict=True)):
        result = pipe.generate(
            prompt if use_prompt else "",
            [ControlUnit(hint, adapter=0 if adapter else None)] if control else [],
            seed=i,
            steps=validation.steps,
            guidance_scale=PROMPT_GUIDANCE if use_prompt else 1.0,
            resolution=validation.resolution,
        )
        row.append(result.images[0])
    return row


def base_images(pipe, validation: ValidationSet) -> list:
    """The frozen base's images for the validation prompts and seeds, without control, as the
    "prompt" row (made once: the base does not change)."""
    if validation.base_images is None:
        validation.base_images = generate_row(pipe, validation, use_prompt=True, control=False)
    return validation.base_images


def edge_f1s(images: Sequence, hints: Sequence[np.ndarray]) -> list[float]:
    """The edge F1 of each generated image against its control map."""
    from ..evaluation import edge_f1

    return [edge_f1(image, hint).f1 for image, hint in zip(images, hints, strict=True)]


def mean_pixel_l1(images: Sequence, others: Sequence) -> float:
    """The mean over pairs of images of their mean absolute difference, as a fraction of 0-255."""
    return float(np.mean([pixel_l1(a, b) for a, b in zip(images, others, strict=True)]))


def pixel_l1(a, b) -> float:
    """Mean absolute difference of two images, as a fraction of the 0-255 range."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean() / 255)


def grid(rows: list[list], labels: Sequence[str]):
    """The validation grid: one row of images per label."""
    from ..imaging.charts import image_grid

    return image_grid(rows, list(labels))

"""``controlnet train-estimator``: the world estimators that `controlnet eval` scores with.

A `models.estimator.Estimator` learns image -> depth (L1 against the world's exact depth map, in
its 0-1 grey levels) or image -> segmentation class (cross-entropy against the world's ADE20k
classes, `world_evaluation.SEG_CLASSES`) from a ``controlnet data world`` folder. The wall and the
floor hold about 95% of the pixels and a flat shape a fraction of a percent, so each class's loss is
weighted by the square root of its rarity (`class_weights`: median frequency balancing, Eigen and
Fergus 2015, softened); unweighted, the flat shapes were never learnt. ControlNet++
scores with pretrained estimators the same way (MiDaS for depth, UperNet for ADE20k); these are
trained on the world's ground truth because no pretrained network has seen it.

The images are augmented (mirrored, blurred, re-coloured a little, noised) so that the estimator
reads the soft, slightly off images a small diffusion model makes as well as the renders.

Deterministic from its seed: the initial weights from the seed, the order of the samples from
(seed, epoch), each step's augmentations from (seed, step). Every ``checkpoint_every`` steps
``OUT/checkpoint.pt`` holds the weights, the optimiser and the step, written whole; a run started
again with the same settings resumes from it and ends exactly as an uninterrupted one. At the end
``OUT/world-estimator-TASK.safetensors`` (float16) is written, with the settings and the score on
``validation_data`` in its metadata; ``OUT/metrics.csv`` holds the loss and the validation scores.
"""

from __future__ import annotations

import csv
import math
import os
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.world import FLOOR
from ..models.estimator import DEFAULT_WIDTHS, Estimator
from ..world_evaluation import ESTIMATOR_TASKS, SEG_CLASSES, WorldEstimator, depth_rmse, seg_classes, seg_miou

CHECKPOINT = "checkpoint.pt"
# The objects are about 5% of a world image's pixels, and their depth is what a depth ControlNet
# is judged on (the wall's and the floor's follow from where they are): their L1 weighs 5 times.
OBJECT_WEIGHT = 5.0
WARMUP_STEPS = 50
VALIDATION_COUNT = 100  # held-out images scored at each checkpoint (all of them at the end)


@dataclass(frozen=True)
class EstimatorSettings:
    """One estimator training run (the flags of ``controlnet train-estimator``)."""

    task: str  # depth or seg
    data: Path  # a ``controlnet data world`` folder
    out: Path
    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 2e-3  # AdamW, after a linear warm-up, cosine decay to 0
    seed: int = 0
    checkpoint_every: int = 100
    validation_data: Path | None = None  # another world folder, scored at checkpoints and at the end
    mixed_precision: str = "bf16"  # bf16 autocast (about 2x faster on CPUs with bf16) or "no"
    widths: tuple[int, ...] = field(default=DEFAULT_WIDTHS)

    def check(self) -> None:
        """ValueError (one line) for a setting out of its range."""
        if self.task not in ESTIMATOR_TASKS:
            raise ValueError(f"task must be one of {', '.join(ESTIMATOR_TASKS)}, got {self.task!r}")
        for name, low in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise ValueError(f"learning_rate must be a finite number in (0, 1], got {self.learning_rate}")
        if self.mixed_precision not in ("bf16", "no"):
            raise ValueError(f"mixed_precision must be bf16 or no, got {self.mixed_precision!r}")

    def identity(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        keep = ("task", "steps", "batch_size", "learning_rate", "seed", "mixed_precision", "widths")
        return {k: v for k, v in asdict(self).items() if k in keep} | {"data": str(Path(self.data).resolve())}


def read_world(
    folder: str | os.PathLike, task: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The images (N, H, W, 3) uint8 of a world folder, their targets (depth grey levels or seg
    class indices, (N, H, W) uint8) and where the objects are ((N, H, W) bool, from the instance
    maps). DatasetError for a folder that is not a world, or one written without instance maps."""
    from ..datasets.folders import DatasetError, read_records
    from ..imaging.images import load_image

    folder = Path(folder)
    records = read_records(folder)[:limit]
    if not all(task in r.extra.get("conditions", {}) for r in records):
        raise DatasetError(f"{folder}: not a 'controlnet data world' folder (its records name no {task} maps)")
    images, targets, objects = [], [], []
    for record in records:
        images.append(load_image(record.target))
        condition = load_image(folder / record.extra["conditions"][task])
        targets.append(condition[:, :, 0] if task == "depth" else seg_classes(condition).astype(np.uint8))
        instance = folder / "instance" / f"{record.target.stem}.png"
        if not instance.is_file():
            raise DatasetError(f"{instance}: no instance map; write the data again with 'controlnet data world'")
        objects.append(load_image(instance)[:, :, 0] > FLOOR)
    sizes = {image.shape for image in images} | {(*t.shape, 3) for t in targets + objects}
    if len(sizes) != 1:
        raise DatasetError(f"{folder}: the images and maps differ in size ({sorted(sizes)[:3]})")
    return np.stack(images), np.stack(targets), np.stack(objects)


def _positions(seed: int, step: int, batch: int, count: int) -> np.ndarray:
    """The samples of `step`: consecutive slots of a stream of permutations, one per epoch."""
    slots = np.arange(step * batch, (step + 1) * batch)
    epochs, places = np.divmod(slots, count)
    return np.array([_permutation(seed, int(e), count)[p] for e, p in zip(epochs, places, strict=True)])


@lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0xE5]).permutation(count)


def augment(
    images: np.ndarray, targets: np.ndarray, objects: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image mirrored (with its target and objects) half of the time, blurred half of the time
    (Gaussian, sigma 0.3-1.2: the softness of a small VAE's decoder), its channels scaled by
    0.9-1.1 and noised (standard deviation up to 4 levels). Returns float32 images in [-1, 1], the
    targets and the objects."""
    out_images = np.empty(images.shape, np.float32)
    out_targets, out_objects = targets.copy(), objects.copy()
    for i, image in enumerate(images):
        if rng.random() < 0.5:
            image = image[:, ::-1]
            out_targets[i], out_objects[i] = out_targets[i][:, ::-1], out_objects[i][:, ::-1]
        if rng.random() < 0.5:
            image = cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), rng.uniform(0.3, 1.2))
        noisy = image * rng.uniform(0.9, 1.1, 3) + rng.normal(0.0, rng.uniform(0.0, 4.0), image.shape)
        out_images[i] = noisy.clip(0, 255) / 127.5 - 1.0
    return out_images, out_targets, out_objects


def learning_rate(settings: EstimatorSettings, step: int) -> float:
    """Linear warm-up over `WARMUP_STEPS`, then a cosine decay to 0 at the last step."""
    if step < WARMUP_STEPS:
        return settings.learning_rate * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, settings.steps - WARMUP_STEPS)
    return settings.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def class_weights(targets: np.ndarray) -> torch.Tensor:
    """Each class's loss weight: sqrt(median frequency / its frequency) over the training pixels
    (1 for a class the data does not hold), scaled so that the pixels' mean weight is 1."""
    counts = np.bincount(targets.ravel(), minlength=len(SEG_CLASSES)).astype(np.float64)
    present = counts > 0
    weights = np.ones(len(counts))
    weights[present] = np.sqrt(np.median(counts[present]) / counts[present])
    weights /= (weights * counts).sum() / counts.sum()
    return torch.tensor(weights, dtype=torch.float32)


def _loss(
    task: str, output: torch.Tensor, target: torch.Tensor, objects: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    if task == "depth":  # L1, the objects' pixels weighing OBJECT_WEIGHT times the others'
        pixel_weights = 1.0 + (OBJECT_WEIGHT - 1.0) * objects.float()
        errors = (output[:, 0].float() - target.float() / 255.0).abs()
        return (errors * pixel_weights).sum() / pixel_weights.sum()
    return F.cross_entropy(output.float(), target.long(), weight=weights)


def validate(
    estimator: WorldEstimator, images: np.ndarray, targets: np.ndarray, objects: np.ndarray
) -> dict[str, float]:
    """The estimator's mean score over held-out images: depth RMSE (0-1 levels), over all pixels and
    over the objects', or seg mIoU and pixel accuracy (per image, as `controlnet eval` scores)."""
    found = []
    for start in range(0, len(images), 50):
        found += estimator.predict(list(images[start : start + 50]))
    if estimator.task == "depth":
        return {
            "depth_rmse": float(np.mean([depth_rmse(f, t) for f, t in zip(found, targets, strict=True)])),
            "depth_rmse_objects": float(
                np.mean([depth_rmse(f, t, o) for f, t, o in zip(found, targets, objects, strict=True) if o.any()])
            ),
        }
    scores = [seg_miou(f, t.astype(np.int64)) for f, t in zip(found, targets, strict=True)]
    return {
        "seg_miou": float(np.mean([s.miou for s in scores])),
        "seg_accuracy": float(np.mean([s.accuracy for s in scores])),
    }


def train_estimator(settings: EstimatorSettings, log: Callable[[str], None] = print) -> Path:
    """Train (or resume, or finish) the run `settings` describe; return the exported file."""
    from ..files import atomic_path

    settings.check()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    images, targets, objects = read_world(settings.data, settings.task)
    held_out = None
    if settings.validation_data is not None:
        held_out = read_world(settings.validation_data, settings.task)
    torch.manual_seed(settings.seed)
    network = Estimator(ESTIMATOR_TASKS[settings.task], settings.widths)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    step = _resume(out / CHECKPOINT, settings, network, optimizer, log)
    resolution = images.shape[1]
    estimator = WorldEstimator(settings.task, network, resolution, out)
    log(f"{settings.task} estimator: {sum(p.numel() for p in network.parameters()):,} parameters, "
        f"{len(images)} training images, step {step} of {settings.steps}")  # fmt: skip
    precision = torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float32
    weights = class_weights(targets) if settings.task == "seg" else None
    while step < settings.steps:
        network.train()
        rng = np.random.default_rng([settings.seed, step, 0xA6])
        batch = _positions(settings.seed, step, settings.batch_size, len(images))
        x, y, o = augment(images[batch], targets[batch], objects[batch], rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
            output = network(torch.from_numpy(x).permute(0, 3, 1, 2))
        loss = _loss(settings.task, output, torch.from_numpy(y), torch.from_numpy(o), weights)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step}: stopped before the weights change")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        step += 1
        row = {"step": step, "loss": round(loss.item(), 5), "lr": learning_rate(settings, step - 1)}
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            state = {"network": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "settings": settings.identity()}  # fmt: skip
            with atomic_path(out / CHECKPOINT) as temporary:
                torch.save(state, temporary)
            if held_out is not None:
                network.eval()
                limit = None if step == settings.steps else VALIDATION_COUNT
                row |= validate(estimator, *(array[:limit] for array in held_out))
        _append_metrics(out / "metrics.csv", row)
        if step % 50 == 0 or len(row) > 3:
            log(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    network.eval()
    scores = validate(estimator, *held_out) if held_out is not None else {}
    return _export(network, settings, resolution, scores, out / f"world-estimator-{settings.task}.safetensors", log)


def _resume(path: Path, settings: EstimatorSettings, network, optimizer, log) -> int:
    """The step of the checkpoint at `path` (its states loaded), or 0 when there is none;
    ValueError when it was written by a run with other settings."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    mine = settings.identity()
    differ = [k for k in mine if state["settings"].get(k) != mine[k]]
    if differ:
        name = differ[0]
        raise ValueError(
            f"{path} was written by a run with {name} {state['settings'].get(name)!r}, not {mine[name]!r}: "
            "give the same settings to resume, or another --out"
        )
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    log(f"resumed from {path} at step {state['step']}")
    return int(state["step"])


def _append_metrics(path: Path, row: dict) -> None:
    columns = ["step", "loss", "lr", "depth_rmse", "depth_rmse_objects", "seg_miou", "seg_accuracy"]
    new = not path.is_file()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _export(network, settings: EstimatorSettings, resolution: int, scores: dict, path: Path, log) -> Path:
    """The weights as float16 safetensors, with what a reader needs and how they were made."""
    from ..formats.tensors import save_safetensors

    command = ["controlnet", "train-estimator", "--task", settings.task, "--data", str(settings.data),
               "--out", str(settings.out), "--steps", str(settings.steps), "--batch-size", str(settings.batch_size),
               "--learning-rate", str(settings.learning_rate), "--seed", str(settings.seed),
               "--mixed-precision", settings.mixed_precision]  # fmt: skip
    if settings.validation_data is not None:
        command += ["--validation-data", str(settings.validation_data)]
    metadata = {
        "task": settings.task,
        "widths": ",".join(str(w) for w in settings.widths),
        "resolution": str(resolution),
        "command": shlex.join(command),
        **{f"held_out_{k}": f"{v:.4f}" for k, v in scores.items()},
    }
    if settings.task == "seg":
        metadata["classes"] = ",".join(SEG_CLASSES)
    save_safetensors({k: v.half() for k, v in network.state_dict().items()}, path, metadata)
    log(f"wrote {path}" + "".join(f", held-out {k} {v:.4f}" for k, v in scores.items()))
    return path

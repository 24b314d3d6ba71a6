"""Controllability metrics (the ControlNet++ protocol: docs/reference.md, "Measuring controllability").

The condition is re-extracted from each generated image with the same annotator and settings and
compared with the condition the image was made from:

- Canny: F1 of edge pixels. Both maps are binary; a pixel is a true positive when it is an edge in
  both (exact position: no tolerance band, as ControlNet++ computes it over the pixels).
- Soft edges (HED, lineart) and every other map: SSIM between the two maps (grey levels in [0, 1]).
- Depth: RMSE between the two depth maps (grey levels in [0, 1]), besides SSIM.

`Reextraction` names the annotator (``controlnet eval --annotator``, default canny) and its settings.
Data of the synthetic world (``controlnet data world``) is scored by `world_evaluation` instead:
depth, segmentation and pose through estimators trained on the world, and prompt adherence.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .annotators import Runtime, annotate, get_annotator
from .annotators.canny import canny
from .files import atomic_file

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass(frozen=True)
class EdgeScore:
    precision: float
    recall: float
    f1: float


def _binary(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges)
    if edges.ndim == 3:
        edges = edges.max(axis=2)
    return edges > 127


def edge_f1(
    generated: np.ndarray, condition: np.ndarray, low_threshold: int = 100, high_threshold: int = 200
) -> EdgeScore:
    """Canny edges of ``generated`` (RGB uint8 [H, W, 3]) against the ``condition`` edge map
    (uint8 [H, W] or [H, W, 3], white edges). Empty maps on both sides score 1."""
    if generated.shape[:2] != condition.shape[:2]:
        raise ValueError(f"sizes differ: generated {generated.shape[:2]}, condition {condition.shape[:2]}")
    found = canny(np.ascontiguousarray(generated), low_threshold, high_threshold) > 127
    wanted = _binary(condition)
    true_positive = float(np.logical_and(found, wanted).sum())
    if not found.any() and not wanted.any():
        return EdgeScore(1.0, 1.0, 1.0)
    precision = true_positive / max(1.0, float(found.sum()))
    recall = true_positive / max(1.0, float(wanted.sum()))
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return EdgeScore(precision, recall, f1)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) of two grey maps (uint8 or [0, 1] float), with a
    uniform ``window`` x ``window`` window and the usual constants (K1 = 0.01, K2 = 0.03, L = 1)."""
    x, y = (_grey01(m) for m in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"sizes differ: {x.shape} and {y.shape}")
    c1, c2 = 0.01**2, 0.03**2

    def mean(image: np.ndarray) -> np.ndarray:
        return _box_filter(image, window)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


def _grey01(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image.mean(axis=2)
    image = image.astype(np.float64)
    return image / 255.0 if image.max(initial=0) > 1.0 else image


def _levels(image: np.ndarray) -> np.ndarray:
    """A uint8 map's grey levels in [0, 1] (the mean of its channels)."""
    image = np.asarray(image, np.float64)
    return (image.mean(axis=2) if image.ndim == 3 else image) / 255.0


def _box_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Means over the ``size`` x ``size`` windows that fit inside the image ('valid' positions)."""
    padded = np.pad(np.cumsum(np.cumsum(image, axis=0), axis=1), ((1, 0), (1, 0)))
    total = padded[size:, size:] - padded[:-size, size:] - padded[size:, :-size] + padded[:-size, :-size]
    return total / (size * size)


# -- prompt adherence on the synthetic scenes --------------------------------------------------


@dataclass(frozen=True)
class SceneScore:
    """How well an image shows a scene's named content (see ``scene_adherence``)."""

    objects_found: float  # share of the named (colour, place) objects found
    background_found: bool
    score: float  # the mean over the objects and the background


# A named object counts as present when this share of its box is its colour (a triangle fills
# half of its box, a ring about a third, a star 40%), the background when this share of the
# pixels outside every box is its colour.
OBJECT_SHARE = 0.2
BACKGROUND_SHARE = 0.5


def palette_labels(
    image: np.ndarray, palette: dict[str, tuple[int, int, int]], darkest: float = 1.0
) -> tuple[np.ndarray, list[str]]:
    """Each pixel's nearest palette colour (RGB distance): an index map [H, W] and the names.

    With ``darkest`` < 1 a colour also stands for itself in shade, down to ``darkest`` times its
    value (the synthetic world's objects are lit Lambert + ambient): a pixel's distance to a colour
    c is its distance to the nearest point s * c with ``darkest`` <= s <= 1. Where two colours
    reach a pixel exactly (grey is white in shade), the one that needs less shade wins."""
    names = list(palette)
    colours = np.array([palette[n] for n in names], np.float32)  # (K, 3)
    pixels = image[:, :, None, :].astype(np.float32)  # (H, W, 1, 3)
    # The shade that brings each colour nearest each pixel (the projection onto the ray through c).
    shade = ((pixels * colours).sum(axis=-1) / (colours * colours).sum(axis=-1)).clip(darkest, 1.0)
    distances = ((pixels - shade[..., None] * colours) ** 2).sum(axis=-1) + (1.0 - shade)
    return distances.argmin(axis=-1), names


def scene_adherence(
    image: np.ndarray, scene: dict, palette: dict[str, tuple[int, int, int]] | None = None
) -> SceneScore:
    """Does ``image`` (RGB uint8) show ``scene`` (``synthetic.scene_sample``'s metadata: background
    and objects with colour and box)? Every pixel is given its nearest palette colour; an object is
    found when at least ``OBJECT_SHARE`` of its box has its colour, the background when at least
    ``BACKGROUND_SHARE`` of the pixels outside the boxes have it. With a control image the objects
    must be where their edges are; a shape of the right colour elsewhere does not count."""
    from .datasets.synthetic import SCENE_COLORS

    palette = palette or SCENE_COLORS
    labels, names = palette_labels(image, palette)
    outside = np.ones(labels.shape, bool)
    found = []
    for item in scene["objects"]:
        x0, y0, x1, y1 = item["bbox"]
        box = labels[y0:y1, x0:x1]
        found.append(box.size > 0 and float((box == names.index(item["color"])).mean()) >= OBJECT_SHARE)
        outside[y0:y1, x0:x1] = False
    rest = labels[outside]
    background = rest.size > 0 and float((rest == names.index(scene["background"])).mean()) >= BACKGROUND_SHARE
    objects = float(np.mean(found)) if found else 1.0
    return SceneScore(objects, bool(background), float(np.mean([*found, background])))


@dataclass(frozen=True)
class Reextraction:
    """How the condition is re-extracted from a generated image and compared with the one it was
    made from (the ControlNet++ protocol): the annotator that made the conditions, its parameters,
    and the `Runtime` its weights are read with (None: the default folder and policy)."""

    annotator: str = "canny"
    params: Mapping[str, object] = field(default_factory=dict)
    runtime: Runtime | None = None

    def check(self) -> None:
        """ValueError (one line) for an unknown annotator, one that needs more than the image, a bad
        parameter or a missing weight file."""
        annotator = get_annotator(self.annotator)
        if annotator.inputs or annotator.float_output:
            raise ValueError(f"annotator {self.annotator!r} needs more than an image; it cannot re-extract conditions")
        self.resolved()
        for weight in annotator.weights:
            weight.path((self.runtime or Runtime.default()).folder)

    def resolved(self) -> dict:
        return get_annotator(self.annotator).resolve(self.params)

    def extract(self, image: np.ndarray) -> np.ndarray:
        """The condition re-extracted from ``image``, at its size."""
        return annotate(self.annotator, image, None, runtime=self.runtime, **self.params).image

    def scores(self, images: list[np.ndarray], condition: np.ndarray) -> dict[str, float]:
        """The mean scores of ``images`` against ``condition``: Canny's edge F1 (with its precision
        and recall) and SSIM of the edge maps; for any other annotator SSIM of the maps, and RMSE too
        for depth maps (grey levels in [0, 1])."""
        extracted = [self.extract(image) for image in images]
        if self.annotator == "canny":
            params = self.resolved()
            edges = [edge_f1(image, condition, params["low_threshold"], params["high_threshold"]) for image in images]
            return {
                "edge_f1": float(np.mean([s.f1 for s in edges])),
                "edge_precision": float(np.mean([s.precision for s in edges])),
                "edge_recall": float(np.mean([s.recall for s in edges])),
                "edge_ssim": float(np.mean([ssim(found, condition) for found in extracted])),
            }
        scores = {"map_ssim": float(np.mean([ssim(found, condition) for found in extracted]))}
        if self.annotator.startswith("depth"):
            wanted = _levels(condition)
            scores["depth_rmse"] = float(np.mean([np.sqrt(np.mean((_levels(f) - wanted) ** 2)) for f in extracted]))
        return scores


# -- the evaluation run (``controlnet eval``) ---------------------------------------------------


def check_settings(
    *,
    images_per_condition: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    resolution: int | None,
    sampler: str,
    reextraction: Reextraction,
) -> None:
    """Refuse (ValueError, one line naming the setting and what is allowed) settings that cannot
    give meaningful scores, before any image is generated: the generation settings as settings.py
    defines them, a seed that is not random (scores no one could reproduce), and the annotator's
    parameters as it defines them, with its weight files present."""
    from .settings import MAX_SEED, check_generation

    check_generation(
        {
            "num_images": images_per_condition,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "resolution": resolution,
            "sampler": sampler,
        }
    )
    if not 0 <= seed <= MAX_SEED - images_per_condition + 1:
        raise ValueError(f"seed must be between 0 and {MAX_SEED - images_per_condition + 1}, got {seed}")
    reextraction.check()


def check_scores(results: dict) -> None:
    """NonFiniteError unless every score is a finite number: a NaN in results.json would read as
    a result (and json writes it as the non-standard ``NaN``)."""
    from .runtime import NonFiniteError

    entries = [("the summary", results["summary"]), *((e["source"], e) for e in results["samples"])]
    for where, entry in entries:
        for name, value in entry.items():
            if isinstance(value, float) and not np.isfinite(value):
                raise NonFiniteError(f"the {name} score of {where} is {value}: results.json not written")


def evaluate(
    pipe: Pipeline | None,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    count: int = 50,
    images_per_condition: int = 4,
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    use_control: bool = True,
    resolution: int | None = None,
    sampler: str = "ddim",
    reextraction: Reextraction | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate from the first ``count`` (condition, prompt) pairs of a dataset folder (either
    training layout; the condition image is used as the control map as it is) with fixed seeds
    (``seed + k`` for the k-th image of every condition) and score the images against their
    condition after re-extracting it with ``reextraction``'s annotator (default: Canny edge F1 and
    SSIM of the edge maps; see `Reextraction.scores`), and, where the data carries scene metadata
    (``controlnet data scenes``), ``scene_adherence``. World data (``controlnet data world``: the
    world's folder or one of its condition folders) is scored as `world_evaluation` says: canny by
    re-extraction, depth, seg and pose by the world estimators, and every condition by prompt
    adherence. ``use_control=False`` generates from the prompts alone: the base model's scores, to
    compare with. ``pipe=None`` scores the data's own images instead of generated ones (one per
    condition): the ceiling of every score. Writes ``results.json`` and ``grid.png`` (a row per
    condition: the condition, then its images) to ``out``; returns the results."""
    from .datasets.folders import read_records
    from .imaging.charts import image_grid
    from .imaging.images import load_image
    from .world_evaluation import find_world

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    reextraction = reextraction or Reextraction()
    check_settings(
        images_per_condition=images_per_condition,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        resolution=resolution,
        sampler=sampler,
        reextraction=reextraction,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(data)[:count]
    if not records:
        raise ValueError(f"{data}: no samples to evaluate")
    world = find_world(data)
    if world is not None:
        world.check(records)
    if pipe is None:  # the data's own images, one per condition, at their own size unless told
        resolution = resolution or load_image(records[0].target).shape[0]
        images_per_condition = 1
    resolution = resolution or pipe.model.config.native_resolution
    generation = {
        "num_images": images_per_condition,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "sampler": sampler,
    }
    rows, per_sample = [], []
    for i, record in enumerate(records):
        condition, images, entry = _score_one(pipe, record, generation, use_control, reextraction, world)
        per_sample.append(entry)
        if len(rows) < 8:
            rows.append([condition, *images])
        if progress is not None:
            progress(i + 1, len(records))
    results = _results(pipe, data, per_sample, generation, use_control, reextraction, world)
    check_scores(results)
    # Whole files or none: a disk that fills up leaves the previous results.json as it was.
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    with atomic_file(out / "grid.png") as handle:
        image_grid(rows).save(handle, format="PNG")
    with atomic_file(out / "results.json", "w", encoding="utf-8") as handle:
        handle.write(text)
    return results


def _results(
    pipe, data, per_sample: list[dict], generation: dict, use_control: bool, reextraction: Reextraction, world
) -> dict:
    """What results.json holds: the mean of every score (over the samples that have it: pose
    scores only where a figure is drawn), the settings, and each sample's scores."""
    metrics = list(dict.fromkeys(k for e in per_sample for k in e if k not in ("source", "prompt")))
    summary = {k: float(np.mean([e[k] for e in per_sample if k in e])) for k in metrics}
    settings = {
        "data": str(data),
        "count": len(per_sample),
        "images_per_condition": generation["num_images"],
        **{k: generation[k] for k in ("steps", "guidance_scale", "seed", "sampler", "resolution")},
        "control": use_control,
        "annotator": reextraction.annotator,
        "annotator_params": reextraction.resolved(),
        "model": "ground truth (the data's own images)" if pipe is None else pipe.model.config.name,
    }
    if world is not None:
        settings["world_condition"] = world.condition
        settings["estimators"] = {task: str(world.estimator(task).path) for task in world.estimators()}
    return {"summary": summary, "settings": settings, "samples": per_sample}


def _score_one(pipe, record, generation: dict, use_control: bool, reextraction: Reextraction, world):
    """(the condition at the output size, the generated images, their scores) for one record."""
    from .imaging.images import load_image
    from .pipeline import ControlUnit

    original = load_image(record.source)
    condition = _fit(original, generation["resolution"])
    if pipe is None:
        images = [_fit(load_image(record.target), generation["resolution"], smooth=True)]
    else:
        units = [ControlUnit(condition)] if use_control else []
        images = pipe.generate(record.prompt, units, **generation).images
    entry = {"source": str(record.source), "prompt": record.prompt}
    if world is None or world.condition == "canny":
        entry |= reextraction.scores(images, condition)
    scene = record.extra.get("scene")
    if world is not None:
        entry |= world.scores(record, images, condition)
    elif scene is not None:
        scaled = _scaled_scene(scene, original.shape[1], generation["resolution"])
        adherence = [scene_adherence(image, scaled) for image in images]
        entry["scene_score"] = float(np.mean([a.score for a in adherence]))
        entry["objects_found"] = float(np.mean([a.objects_found for a in adherence]))
        entry["background_found"] = float(np.mean([a.background_found for a in adherence]))
    return condition, images, entry


def format_summary(results: dict) -> str:
    """The summary as a small table."""
    lines = [f"{'metric':20s} {'mean':>8s}"]
    lines += [f"{name:20s} {value:8.3f}" for name, value in results["summary"].items()]
    return "\n".join(lines)


def _fit(image: np.ndarray, resolution: int, smooth: bool = False) -> np.ndarray:
    """The condition at the evaluation size: a square of ``resolution`` (nearest neighbour keeps
    a binary edge map binary; ``smooth``: a picture, resampled with Lanczos)."""
    if image.shape[:2] == (resolution, resolution):
        return image
    from PIL import Image

    kernel = Image.Resampling.LANCZOS if smooth else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(image).resize((resolution, resolution), kernel))


def _scaled_scene(scene: dict, size: int, resolution: int) -> dict:
    """The scene's boxes (in pixels of its ``size``-wide image) at the evaluation size."""
    if size == resolution:
        return scene
    factor = resolution / size
    objects = [{**o, "bbox": [round(v * factor) for v in o["bbox"]]} for o in scene["objects"]]
    return {**scene, "objects": objects}

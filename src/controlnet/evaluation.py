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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .annotators import Runtime, annotate, get_annotator
from .annotators.canny import canny
from .files import atomic_file
from .settings import UNIT

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .world_evaluation import WorldData


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
        annotator.check_weights((self.runtime or Runtime.default()).folder)

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


@dataclass(frozen=True)
class EvalUnit:
    """One control unit of an evaluation: which of the pipeline's models reads which maps, with
    its strength and window (settings.UNIT defines them, their ranges and meaning). ``condition``
    None reads the evaluated folder's own maps; a condition of the synthetic world (``controlnet
    data world``: depth, seg, pose, ...) reads the same scene's map of that condition from the
    world's folder of it, composed with the evaluated folder's (``controlnet eval --also``)."""

    condition: str | None = None
    model: str = "controlnet"  # or "adapter" (settings.UNIT_MODELS): a T2I-Adapter unit
    index: int = 0  # which of the pipeline's ControlNets (or T2I-Adapters)
    strength: float = UNIT["strength"].default
    start: float = UNIT["start"].default
    end: float = UNIT["end"].default

    def mode(self, guess_mode: bool) -> str:
        """The control mode it runs in: in ``guess_mode`` a ControlNet unit's is control (the
        original apps' guess mode), else balanced; an adapter unit's is balanced (it has none)."""
        from .settings import unit_mode

        return unit_mode(UNIT["mode"].default, guess_mode, self.model == "adapter")

    def control_unit(self, control: np.ndarray, guess_mode: bool):
        """The pipeline's unit on the ready map ``control``, in its `mode`."""
        from .pipeline import ControlUnit

        window = {"strength": self.strength, "start": self.start, "end": self.end, "mode": self.mode(guess_mode)}
        if self.model == "adapter":
            return ControlUnit(control, adapter=self.index, **window)
        return ControlUnit(control, controlnet=self.index, **window)


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
    units: Sequence[EvalUnit] | None = None,
    empty_prompt: bool = False,
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
    condition): the ceiling of every score.

    ``units`` (default: ControlNet 0 on the data's maps at full strength, all steps) steer the
    images: one reads the data's own maps; on world data others may read the same scenes' maps of
    other conditions, and each of those conditions is then scored by its own measure on the same
    images (canny by Canny edge F1). ``empty_prompt``: every image from the empty prompt, the
    ControlNet units in guess mode (control mode); prompt adherence then means nothing and is not
    reported. Writes ``results.json`` and ``grid.png`` (a row per condition: the condition, the
    maps composed with it, then its images) to ``out``; returns the results."""
    from .datasets.folders import read_records
    from .imaging.charts import image_grid
    from .imaging.images import load_image
    from .world_evaluation import find_world

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if pipe is None and (units is not None or empty_prompt):
        raise ValueError("pipe=None scores the data's own images: it takes no units and no empty_prompt")
    if units is not None and not use_control:
        raise ValueError("use_control=False generates from the prompts alone: it takes no units")
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
    records = read_records(data)[:count]
    if not records:
        raise ValueError(f"{data}: no samples to evaluate")
    world = find_world(data)
    own = world.condition if world is not None else reextraction.annotator
    if units is None:
        units = [EvalUnit()] if use_control and pipe is not None else []
    elif not units:
        raise ValueError("units is empty: name at least one, or use_control=False for the base alone")
    steering = check_units(units, pipe, world, own, data)
    others = {name: world.condition_maps(name, records) for name in list(steering)[1:]}
    if world is not None:
        world.check(records, list(others))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
    run = _Run(pipe, generation, steering, empty_prompt, reextraction, world, own)
    rows, per_sample, metrics = [], [], {name: {} for name in (own, *others)}
    for i, record in enumerate(records):
        maps, images, entry, scored = _score_one(run, record, {name: paths[i] for name, paths in others.items()})
        per_sample.append(entry)
        for name, keys in scored.items():
            metrics[name].update(dict.fromkeys(keys))
        if len(rows) < 8:
            rows.append([*maps, *images])
        if progress is not None:
            progress(i + 1, len(records))
    results = _results(run, data, per_sample, use_control, metrics)
    check_scores(results)
    # Whole files or none: a disk that fills up leaves the previous results.json as it was.
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    with atomic_file(out / "grid.png") as handle:
        image_grid(rows).save(handle, format="PNG")
    with atomic_file(out / "results.json", "w", encoding="utf-8") as handle:
        handle.write(text)
    return results


def check_units(units: Sequence[EvalUnit], pipe, world, own: str, data) -> dict[str, EvalUnit]:
    """The units by the condition whose maps each reads, the data's own (``own``) first; ValueError
    (one line) before any image is generated for a unit whose settings settings.py refuses, a
    model the pipeline has not loaded, a condition read twice, another condition than the data's
    own without world data (or one the world does not have: `WorldData.condition_folder`), and
    units none of which reads the data's own maps (its scores would score what did not steer)."""
    from .settings import UNIT_MODELS, check_unit

    steering: dict[str, EvalUnit] = {}
    for unit in units:
        name = own if unit.condition in (None, own) else unit.condition
        where = f"the {name} unit"
        if unit.model not in UNIT_MODELS:
            raise ValueError(f"{where}: model must be one of {', '.join(UNIT_MODELS)}, got {unit.model!r}")
        check_unit({"strength": unit.strength, "start": unit.start, "end": unit.end, unit.model: unit.index}, where)
        loaded = getattr(pipe, f"{unit.model}s", None)
        if loaded is not None and unit.index >= len(loaded):
            kind = "T2I-Adapter" if unit.model == "adapter" else "ControlNet"
            raise ValueError(f"{where}: {kind} {unit.index} does not exist ({len(loaded)} loaded)")
        if name != own:
            if world is None:
                raise ValueError(
                    f"{where}: {data} is not world data ('controlnet data world'): no other condition of its scenes"
                )
            try:
                world.condition_folder(name)
            except ValueError as error:  # DatasetError too: the same kind, named by its unit
                raise type(error)(f"{where}: {error}") from None
        if name in steering:
            raise ValueError(f"two units read the {name} maps")
        steering[name] = unit
    if steering and own not in steering:
        raise ValueError(f"no unit reads the evaluated folder's own ({own}) maps")
    return {own: steering.pop(own), **steering} if steering else {}


@dataclass(frozen=True)
class _Run:
    """What every sample of an evaluation is generated and scored with."""

    pipe: Pipeline | None
    generation: dict  # Pipeline.generate's settings
    units: dict[str, EvalUnit]  # by the condition they read, the data's own first (check_units)
    empty_prompt: bool
    reextraction: Reextraction
    world: WorldData | None
    own: str  # the data's condition: the world's, or the annotator that made the maps

    @property
    def guess_mode(self) -> bool:
        """Whether ControlNet units ran in guess mode (the empty prompt's mode; adapters have none)."""
        return self.empty_prompt and any(unit.model == "controlnet" for unit in self.units.values())


def _results(run: _Run, data, per_sample: list[dict], use_control: bool, metrics: dict[str, dict]) -> dict:
    """What results.json holds: the mean of every score (over the samples that have it: pose
    scores only where a figure is drawn), the settings, each condition's scores (the summary's,
    by the condition they measure), and each sample's scores."""
    generation, pipe, world = run.generation, run.pipe, run.world
    names = list(dict.fromkeys(k for e in per_sample for k in e if k not in ("source", "prompt")))
    summary = {k: float(np.mean([e[k] for e in per_sample if k in e])) for k in names}
    settings = {
        "data": str(data),
        "count": len(per_sample),
        "images_per_condition": generation["num_images"],
        **{k: generation[k] for k in ("steps", "guidance_scale", "seed", "sampler", "resolution")},
        "control": use_control,
        "annotator": run.reextraction.annotator,
        "annotator_params": run.reextraction.resolved(),
        "model": "ground truth (the data's own images)" if pipe is None else pipe.model.config.name,
    }
    if world is not None:
        settings["world_condition"] = world.condition
        others = list(run.units)[1:]
        settings["estimators"] = {task: str(world.estimator(task).path) for task in world.estimators(others)}
    settings |= {"empty_prompt": run.empty_prompt, "guess_mode": run.guess_mode, "units": _unit_records(run)}
    conditions = {name: {k: summary[k] for k in keys if k in summary} for name, keys in metrics.items()}
    return {"summary": summary, "settings": settings, "conditions": conditions, "samples": per_sample}


def _unit_records(run: _Run) -> list[dict]:
    """Each unit as results.json records it: the maps it read, its model (with the file it was
    loaded from, where the pipeline knows it), strength, window and the mode it ran in."""
    records = []
    for name, unit in run.units.items():
        record = {"condition": name, "model": unit.model, "index": unit.index}
        files = getattr(run.pipe, "files", {}).get(unit.model, [])
        if unit.index < len(files):
            record["file"] = str(files[unit.index])
        window = {"strength": unit.strength, "start": unit.start, "end": unit.end}
        records.append(record | window | {"mode": unit.mode(run.guess_mode)})
    return records


def _score_one(run: _Run, record, other_maps: Mapping[str, Path]):
    """(the maps at the output size: the record's condition, then ``other_maps``, the other
    conditions' of its scene; the generated images; their scores; the score names by the
    condition they measure) for one record."""
    from .imaging.images import load_image

    resolution, world = run.generation["resolution"], run.world
    original = load_image(record.source)
    condition = _fit(original, resolution)
    maps = {run.own: condition} | {name: _fit(load_image(path), resolution) for name, path in other_maps.items()}
    prompt = "" if run.empty_prompt else record.prompt
    if run.pipe is None:
        images = [_fit(load_image(record.target), resolution, smooth=True)]
    else:
        controls = [unit.control_unit(maps[name], run.guess_mode) for name, unit in run.units.items()]
        images = run.pipe.generate(prompt, controls, **run.generation).images
    entry = {"source": str(record.source), "prompt": prompt}
    instance = None if world is None else world.instance(record, resolution)
    scored = {}
    for name, control in maps.items():
        if name == run.own and (world is None or world.condition == "canny"):
            scored[name] = run.reextraction.scores(images, control)
        elif name == "canny":  # composed with the data's condition: edge F1 as the canny data gets it
            edges = run.reextraction if run.reextraction.annotator == "canny" else Reextraction()
            scored[name] = edges.scores(images, control)
        else:
            scored[name] = world.condition_scores(name, record, images, control, instance)
    # In the order results.json has always had: re-extraction's scores, prompt adherence, the rest.
    parts = list(scored.items())
    first = [parts.pop(0)] if world is None or world.condition == "canny" else []
    # Without a prompt, adherence to it means nothing: not reported (not a number of any kind).
    adherence = {} if run.empty_prompt else _adherence(world, record, images, instance, original, resolution)
    for name, scores in [*first, ("prompt", adherence), *parts]:
        clash = sorted(entry.keys() & scores.keys())
        if clash:
            raise ValueError(f"the {name} scores {', '.join(clash)} are named as other scores of this evaluation")
        entry |= scores
    return list(maps.values()), images, entry, {name: list(scores) for name, scores in scored.items()}


def _adherence(world, record, images: list[np.ndarray], instance, original: np.ndarray, resolution: int) -> dict:
    """Prompt adherence: the world's (`WorldData.adherence_scores`, on the scene's ``instance`` map),
    or the shapes' scene score where the data carries a scene (``controlnet data scenes``, its boxes
    in pixels of the ``original`` condition); none for other data."""
    if world is not None:
        return world.adherence_scores(record, images, instance)
    scene = record.extra.get("scene")
    if scene is None:
        return {}
    scaled = _scaled_scene(scene, original.shape[1], resolution)
    adherence = [scene_adherence(image, scaled) for image in images]
    return {
        "scene_score": float(np.mean([a.score for a in adherence])),
        "objects_found": float(np.mean([a.objects_found for a in adherence])),
        "background_found": float(np.mean([a.background_found for a in adherence])),
    }


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

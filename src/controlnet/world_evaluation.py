"""Scores for models trained on the synthetic world (``controlnet data world``; issue 19).

`controlnet eval` picks them by the dataset it is given (`find_world`): the world's folder itself
holds the canny dataset, ``WORLD/depth``, ``WORLD/seg``, ``WORLD/pose``, ... the others. Each
generated image gets, besides the scores of its condition:

- **prompt adherence** (`prompt_adherence`), for every condition: whether each named object has
  its colour over its own pixels (the sample's instance map, ``WORLD/instance/N.png``), and
  whether the wall (the caption's background) and the floor have theirs.
- **canny**: edge F1 and SSIM of the re-extracted edges (`evaluation.Reextraction`).
- **depth**: RMSE between the control depth and the depth the world depth estimator reads off the
  generated image (`depth_rmse`).
- **seg**: mean IoU of the world segmentation estimator's classes on the generated image against
  the control's classes (`seg_miou`).
- **pose**: how well the figures the segmentation estimator finds follow the drawn skeletons
  (`pose_agreement`).

With several conditions at once (``controlnet eval --also``: the same scenes' maps of another
condition, `WorldData.condition_maps`), each condition's own score is computed on the same images.

This is ControlNet++'s protocol (Li et al. 2024, section 4.1: the condition estimated back from the
generated image by a pretrained network and compared with the input condition), with estimators
trained on the world's exact ground truth (`controlnet train-estimator`, `train/estimator.py`)
instead of MiDaS or an ADE20k segmenter, which have never seen such scenes. An estimator is not
perfect on real data either: ``controlnet eval --ground-truth`` scores the data's own images, the
ceiling of every score.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .annotators.maps import ADE20K_PALETTE
from .annotators.pose.draw import LIMBS
from .annotators.pose.keypoints import Poses
from .datasets.folders import DatasetError, Record, read_records
from .datasets.synthetic import SCENE_COLORS
from .datasets.world import AMBIENT, CLASSES, CONDITIONS, FLOOR, WALL
from .evaluation import palette_labels
from .formats.errors import CheckpointError

# The segmentation estimator's classes, in its output order: the world's things (wall, floor,
# person, one per kind of object), each an ADE20k class whose palette colour the seg maps hold.
SEG_CLASSES: tuple[str, ...] = tuple(CLASSES)
SEG_COLORS = np.array([ADE20K_PALETTE[index] for index, _ in CLASSES.values()], np.int32)  # (12, 3)
PERSON = SEG_CLASSES.index("person")
ESTIMATOR_TASKS: dict[str, int] = {"depth": 1, "seg": len(SEG_CLASSES)}  # task -> output channels

# A named thing has its colour when at least this share of its pixels (less a one-pixel border,
# where the anti-aliased image mixes it with its neighbours) has that colour, shade allowed.
COLOR_SHARE = 0.5
# A drawn limb is found when at least this share of the pixels along it is labelled person.
LIMB_SHARE = 0.5
# The band round a skeleton that its figure's body fills: this times the figure's torso length
# (neck to mid-hip) on each side of every limb. The narrowest that holds nearly all of the figures'
# own pixels (99.96% of them on 178 figures of the training world, the least 98.5%; a wider band
# forgives a figure drawn a few pixels aside).
BAND = 0.3


# -- the estimators ---------------------------------------------------------------------------------


def estimator_path(task: str) -> Path:
    """The shipped estimator for `task` (depth or seg), inside the package."""
    from importlib import resources

    return Path(str(resources.files("controlnet").joinpath("weights", f"world-estimator-{task}.safetensors")))


@dataclass
class WorldEstimator:
    """A trained `models.estimator.Estimator` and what it reads: ``depth`` (near bright, 0-1, as
    the world's depth maps) or ``seg`` (indices into `SEG_CLASSES`), from RGB uint8 images."""

    task: str
    network: torch.nn.Module
    resolution: int  # the image side it was trained at; other images are resized to it
    path: Path

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One map per image, at the image's size: depth as float32 [H, W] in [0, 1], seg as int64
        [H, W] class indices."""
        side = self.resolution
        batch = np.stack([_resized(np.asarray(image), side, cv2.INTER_AREA) for image in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out = self.network(x)
        if self.task == "depth":
            maps = out[:, 0].clamp(0.0, 1.0).numpy()
            return [
                _resized(m, image.shape[0], cv2.INTER_LINEAR, image.shape[1])
                for m, image in zip(maps, images, strict=True)
            ]
        maps = out.argmax(dim=1).numpy().astype(np.uint8)
        return [
            _resized(m, image.shape[0], cv2.INTER_NEAREST, image.shape[1]).astype(np.int64)
            for m, image in zip(maps, images, strict=True)
        ]


def _resized(image: np.ndarray, height: int, interpolation: int, width: int | None = None) -> np.ndarray:
    width = height if width is None else width
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=interpolation)


def load_estimator(task: str, path: str | os.PathLike | None = None) -> WorldEstimator:
    """The world estimator for `task` from `path` (default: the shipped one), read with the safe
    reader; CheckpointError (one line) for a file that is not such an estimator."""
    from .formats.tensors import check_finite, read_state_dict
    from .models.estimator import Estimator

    if task not in ESTIMATOR_TASKS:
        raise ValueError(f"unknown estimator task {task!r}; choose one of {', '.join(ESTIMATOR_TASKS)}")
    path = Path(path) if path is not None else estimator_path(task)
    tensors, metadata = read_state_dict(path)
    check_finite(tensors, path)
    if metadata.get("task") != task:
        raise CheckpointError(f"{path}: not a world {task} estimator (its task: {metadata.get('task', 'none')})")
    if task == "seg" and metadata.get("classes") != ",".join(SEG_CLASSES):
        raise CheckpointError(f"{path}: made for other classes than the world's ({metadata.get('classes')})")
    try:
        widths = tuple(int(w) for w in metadata["widths"].split(","))
        resolution = int(metadata["resolution"])
        network = Estimator(ESTIMATOR_TASKS[task], widths)
        network.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a world estimator file ({str(error).splitlines()[0][:200]})") from None
    return WorldEstimator(task, network.eval(), resolution, path)


@lru_cache(maxsize=4)
def _shipped(task: str) -> WorldEstimator:
    return load_estimator(task)


# -- the scores -----------------------------------------------------------------------------------


def seg_classes(seg_map: np.ndarray) -> np.ndarray:
    """A world seg map (RGB uint8, ADE20k colours) as [H, W] indices into `SEG_CLASSES` (each pixel
    the nearest class colour, so a resampled map still reads)."""
    pixels = np.asarray(seg_map, np.int32)[:, :, None, :3]
    return ((pixels - SEG_COLORS[None, None]) ** 2).sum(axis=-1).argmin(axis=-1)


def depth_rmse(estimated: np.ndarray, condition: np.ndarray, where: np.ndarray | None = None) -> float:
    """RMSE between an estimated depth ([H, W] in [0, 1]) and a depth map (uint8 grey or RGB), both
    near bright, in the 0-1 range of the map's grey levels; over the pixels of `where` ([H, W]
    bool) only when given."""
    wanted = np.asarray(condition, np.float64)
    wanted = (wanted.mean(axis=2) if wanted.ndim == 3 else wanted) / 255.0
    if wanted.shape != estimated.shape:
        raise ValueError(f"sizes differ: estimated {estimated.shape}, condition {wanted.shape}")
    errors = (np.asarray(estimated, np.float64) - wanted) ** 2
    return float(np.sqrt(np.mean(errors if where is None else errors[where])))


@dataclass(frozen=True)
class SegScore:
    miou: float  # mean over the wanted map's classes of |both| / |either|
    accuracy: float  # share of pixels with the wanted class


def seg_miou(predicted: np.ndarray, wanted: np.ndarray) -> SegScore:
    """Intersection over union of two [H, W] class index maps for each class of `wanted` (the
    control's), and their mean. Per image: a few stray pixels of a class the image does not hold
    lower the IoU of the classes they took pixels from, not add a class scoring 0 (ControlNet++
    sums intersections and unions over its whole dataset first, to the same end)."""
    if predicted.shape != wanted.shape:
        raise ValueError(f"sizes differ: predicted {predicted.shape}, wanted {wanted.shape}")
    ious = []
    for c in np.unique(wanted):
        p, w = predicted == c, wanted == c
        ious.append(np.logical_and(p, w).sum() / np.logical_or(p, w).sum())
    return SegScore(float(np.mean(ious)), float((predicted == wanted).mean()))


@dataclass(frozen=True)
class PoseScore:
    """How well the figures in an image follow the drawn skeletons (`pose_agreement`)."""

    limbs: float  # share of the drawn limbs whose pixels are person (recall)
    precision: float  # share of the person pixels inside the skeletons' band
    score: float  # their harmonic mean


def pose_agreement(person: np.ndarray, poses: Poses) -> PoseScore | None:
    """The drawn skeletons of `poses` (normalised keypoints) against a [H, W] person mask (the
    segmentation estimator's person class on a generated image). A limb (one of the 17 OpenPose
    draws) is found when at least `LIMB_SHARE` of the pixels along it are person; precision is the
    share of person pixels within `BAND` torso lengths of a limb of their figure, so that a model
    that paints people everywhere, or in another pose, does not score. None when no limb is drawn
    (no figure: nothing to follow)."""
    height, width = person.shape
    band = np.zeros((height, width), np.uint8)
    found = drawn = 0
    for figure in poses.people:
        if figure.body is None:
            continue
        points = figure.body[:, :2] * (width, height)
        present = np.isfinite(points).all(axis=1)
        radius = _band_radius(points, present, height)
        for a, b in LIMBS:
            if not (present[a] and present[b]):
                continue
            drawn += 1
            steps = max(2, int(np.ceil(np.linalg.norm(points[b] - points[a]))) + 1)
            along = np.linspace(points[a], points[b], steps)
            x = np.clip(along[:, 0].astype(int), 0, width - 1)
            y = np.clip(along[:, 1].astype(int), 0, height - 1)
            found += float(person[y, x].mean()) >= LIMB_SHARE
            ends = [tuple(int(v) for v in points[k]) for k in (a, b)]
            cv2.line(band, ends[0], ends[1], 1, thickness=2 * radius + 1)
    if drawn == 0:
        return None
    painted = int(person.sum())
    precision = float(np.logical_and(person, band > 0).sum() / painted) if painted else 0.0
    limbs = found / drawn
    score = 0.0 if limbs + precision == 0 else 2 * limbs * precision / (limbs + precision)
    return PoseScore(limbs, precision, score)


def _band_radius(points: np.ndarray, present: np.ndarray, height: int) -> int:
    """`BAND` times the figure's torso length in pixels (neck to the middle of its hips; a twentieth
    of the image when those are not drawn), at least 2 pixels."""
    hips = [k for k in (8, 11) if present[k]]
    if not (present[1] and hips):
        return max(2, round(height / 20))
    return max(2, round(BAND * float(np.linalg.norm(points[hips].mean(axis=0) - points[1]))))


@dataclass(frozen=True)
class Adherence:
    """Whether an image shows a world scene's named colours where the scene has them."""

    objects_right: float  # share of the (visible) named objects with their colour
    background_right: bool  # the wall: the caption's background
    floor_right: bool
    score: float  # the mean over every named thing: each object, the wall, the floor


def prompt_adherence(image: np.ndarray, scene: dict[str, Any], instance: np.ndarray) -> Adherence:
    """Does `image` (RGB uint8) have the colours the caption names, each where the scene has its
    thing? Every pixel gets its nearest of the 12 colours, shade allowed down to the world's
    ambient light (`evaluation.palette_labels`); an object, the wall or the floor has its colour
    when at least `COLOR_SHARE` of its pixels in `instance` ([H, W], the sample's instance map at
    the image's size) have it. An object not visible at this size is not counted. As for the shapes
    (`evaluation.scene_adherence`), the places are the control's: without control a model can
    only score by chance on the objects."""
    labels, names = palette_labels(image, SCENE_COLORS, darkest=AMBIENT)

    def right(mask: np.ndarray, colour: str) -> bool | None:
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        pixels = labels[inner if inner.any() else mask]
        return None if pixels.size == 0 else bool((pixels == names.index(colour)).mean() >= COLOR_SHARE)

    objects = [right(instance == o["instance"], o["color"]) for o in scene["objects"]]
    objects = [o for o in objects if o is not None]
    wall = bool(right(instance == WALL, scene["background"]))
    floor = bool(right(instance == FLOOR, scene["floor"]))
    return Adherence(float(np.mean(objects)) if objects else 1.0, wall, floor, float(np.mean([*objects, wall, floor])))


# -- world datasets in `controlnet eval` ------------------------------------------------------------


@dataclass(frozen=True)
class WorldData:
    """A world dataset being evaluated: the world's folder, which condition the evaluated folder
    holds, and the world's records (scene, pose JSON) by their image."""

    root: Path
    condition: str
    by_image: dict[Path, Record]

    def world_record(self, record: Record) -> Record:
        """The world's own record (with the scene) of a record of the evaluated folder."""
        found = self.by_image.get(record.target.resolve())
        if found is None:
            raise DatasetError(f"{record.target}: not an image of the world in {self.root}")
        return found

    def instance_path(self, record: Record) -> Path:
        return self.root / "instance" / f"{record.target.stem}.png"

    def check(self, records: Sequence[Record], others: Sequence[str] = ()) -> None:
        """DatasetError (one line) for a record the scores cannot read (no instance map: data
        written before instance maps existed; no pose file where pose is scored), before any image
        is generated; the estimators this condition and `others` (conditions composed with it)
        need are loaded, so that a missing or bad file is refused now too."""
        for record in records:
            world = self.world_record(record)
            path = self.instance_path(world)
            if not path.is_file():
                raise DatasetError(
                    f"{path}: no instance map (needed for prompt adherence); write the data again with "
                    "'controlnet data world' (the same --seed gives the same samples, now with instance/)"
                )
            if "pose" in (self.condition, *others) and not (self.root / world.extra.get("pose_json", "")).is_file():
                raise DatasetError(f"{self.root / world.extra.get('pose_json', 'pose/?.json')}: no pose file")
        for task in self.estimators(others):
            self.estimator(task)

    def estimators(self, others: Sequence[str] = ()) -> list[str]:
        """The estimators the scores of this condition and of `others` use."""
        needs = {"depth": ["depth"], "seg": ["seg"], "pose": ["seg"]}
        return list(dict.fromkeys(task for c in (self.condition, *others) for task in needs.get(c, [])))

    def estimator(self, task: str) -> WorldEstimator:
        """The shipped estimator for `task`, loaded once."""
        return _shipped(task)

    # -- compositions: the same scenes' maps of another condition --------------------------------

    def condition_folder(self, condition: str) -> Path:
        """The dataset folder of the world's `condition` maps, to compose with the evaluated
        folder's (the world's folder itself for canny, as `find_world` reads it); ValueError (one
        line) for a name that is not a world condition, the evaluated folder's own condition, or a
        condition folder that is not there."""
        if condition not in CONDITIONS:
            raise ValueError(f"{condition!r} is not a condition of the world; choose among {', '.join(CONDITIONS)}")
        if condition == self.condition:
            raise ValueError(f"{condition} is the evaluated folder's own condition; name another to compose with it")
        folder = self.root if condition == "canny" else self.root / condition
        if not (folder / "prompt.json").is_file():
            raise DatasetError(f"{folder}: no such condition folder (no prompt.json) in the world {self.root}")
        return folder

    def condition_maps(self, condition: str, records: Sequence[Record]) -> list[Path]:
        """The `condition` map of each record's scene (`condition_folder`'s record with the same
        image: the same scene, whatever the order); DatasetError (one line) for a scene it lacks."""
        folder = self.condition_folder(condition)
        by_image = {r.target.resolve(): r.source for r in read_records(folder)}
        maps = []
        for record in records:
            found = by_image.get(record.target.resolve())
            if found is None:
                raise DatasetError(f"{folder}: no {condition} map of the scene of {record.target}")
            maps.append(found)
        return maps

    # -- the scores -----------------------------------------------------------------------------------

    def instance(self, record: Record, size: int) -> np.ndarray:
        """The instance map of `record`'s scene at `size` x `size` ([H, W]: 0 wall, 1 floor, objects)."""
        from .imaging.images import load_image

        return _resized(load_image(self.instance_path(self.world_record(record)))[:, :, 0], size, cv2.INTER_NEAREST)

    def adherence_scores(self, record: Record, images: list[np.ndarray], instance: np.ndarray) -> dict[str, float]:
        """The mean prompt adherence of `images` (generated from `record`'s caption) and its parts."""
        adherence = [prompt_adherence(image, self.world_record(record).extra["scene"], instance) for image in images]
        return {
            "prompt_adherence": float(np.mean([a.score for a in adherence])),
            "objects_right": float(np.mean([a.objects_right for a in adherence])),
            "background_right": float(np.mean([a.background_right for a in adherence])),
            "floor_right": float(np.mean([a.floor_right for a in adherence])),
        }

    def condition_scores(
        self, condition: str, record: Record, images: list[np.ndarray], control: np.ndarray, instance: np.ndarray
    ) -> dict[str, float]:
        """The mean scores of `images` against `control`, the scene's `condition` map at their size,
        by that condition's own measure through the estimators: depth, seg, pose (no pose scores
        where the scene has no figure: nothing to follow). Empty for the others (canny is scored by
        re-extraction, `evaluation.Reextraction`; normal and scribble have no measure of their own)."""
        from .annotators.pose.jsonformat import read_pose_json

        scores: dict[str, float] = {}
        if condition == "depth":
            # The wall and the floor are most of every image, and their depth follows from where
            # they are: the objects' pixels alone say whether the objects are at their depth.
            estimated = self.estimator("depth").predict(images)
            objects = instance > FLOOR
            scores["depth_rmse"] = float(np.mean([depth_rmse(e, control) for e in estimated]))
            scores["depth_rmse_objects"] = float(np.mean([depth_rmse(e, control, objects) for e in estimated]))
        elif condition == "seg":
            wanted = seg_classes(control)
            segs = [seg_miou(p, wanted) for p in self.estimator("seg").predict(images)]
            scores["seg_miou"] = float(np.mean([s.miou for s in segs]))
            scores["seg_accuracy"] = float(np.mean([s.accuracy for s in segs]))
        elif condition == "pose":
            poses = read_pose_json(self.root / self.world_record(record).extra["pose_json"])
            found = [pose_agreement(p == PERSON, poses) for p in self.estimator("seg").predict(images)]
            if all(f is not None for f in found):  # no figure: nothing to score
                scores["pose_score"] = float(np.mean([f.score for f in found]))
                scores["pose_limbs"] = float(np.mean([f.limbs for f in found]))
                scores["pose_precision"] = float(np.mean([f.precision for f in found]))
        return scores


def find_world(data: str | os.PathLike) -> WorldData | None:
    """The world dataset `data` belongs to (None for other data): the world's folder itself (its
    records carry world scenes; the condition is canny) or one of its condition folders."""
    data = Path(data)
    for root, condition in ((data, "canny"), (data.parent, data.name)):
        if condition not in CONDITIONS or not (root / "prompt.json").is_file():
            continue
        try:
            records = read_records(root, "fill50k")
        except DatasetError:
            if root == data:
                raise
            continue  # a parent folder that is no dataset: not a world condition folder
        if all(isinstance(r.extra.get("scene"), dict) and "floor" in r.extra["scene"] for r in records):
            return WorldData(root, condition, {r.target.resolve(): r for r in records})
    return None

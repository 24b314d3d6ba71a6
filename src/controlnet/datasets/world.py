"""The synthetic world: shaded 3-D scenes with exact ground truth for every condition.

``controlnet data world`` (issue 19, point 1). A scene is a backdrop wall and a floor, each in one
of `SCENE_COLORS`, with 1 to 4 objects in other colours, all different: solids (`SOLIDS`: sphere,
cube, cylinder, cone) standing on the floor, flat shapes (`FLATS`, the shapes of the ``scenes``
task) painted on it, and articulated figures (head, torso, arms and legs as capsules) in random
poses. `world_render` ray-casts it (a pinhole camera, 2x2 rays per pixel averaged for the image),
shaded Lambert + ambient under one directional light. From the same z-buffer come:

- ``canny``: the canny annotator (100/200) on the image, as the ``scenes`` task's source;
- ``depth``: inverse camera depth stretched to 0-255, grey RGB, near bright (as MiDaS and
  `maps.depth_map` give it);
- ``normal``: camera-frame unit normals in the convention of ControlNet 1.1's ``normal_bae`` maps
  (red toward the image's left, green up, blue toward the viewer), as ``(n + 1) / 2 * 255``
  truncated, that annotator's encoding: a surface facing the viewer is (127, 127, 255), the floor
  seen from above is green, a surface turned to the right has little red;
- ``seg``: ADE20k class colours (`CLASSES`: wall, floor, person, one class per kind);
- ``pose``: the figures' 18 COCO keypoints, projected exactly, drawn by `draw_poses` (black when
  there is no figure); ``pose/{i}.json`` holds them as OpenPose JSON (`poses_to_json`);
- ``scribble``: every object's outline, moved by a smooth random field and thickened: white strokes
  on black.

Sample *i* of seed *s* depends on (s, i) only. The caption (`world_captions`) uses its own generator,
so rephrasing never moves the geometry.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ..annotators.maps import ADE20K_PALETTE, depth_map
from ..annotators.pose.draw import draw_poses
from ..annotators.pose.jsonformat import poses_to_json
from ..annotators.pose.keypoints import Person, Poses
from ..files import atomic_file
from .synthetic import CANNY_THRESHOLDS, SCENE_COLORS, SCENE_SHAPES, check_output, check_size
from .world_captions import caption
from .world_render import Camera, render

SOLIDS: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
FLATS: tuple[str, ...] = SCENE_SHAPES  # circle, square, triangle, ring, star: painted on the floor
CONDITIONS: tuple[str, ...] = ("canny", "depth", "normal", "seg", "pose", "scribble")
DEFAULT_SIZE = 128
# ADE20k class (0-149, mmseg's order) of each thing: its colour is ADE20K_PALETTE[index].
CLASSES: dict[str, tuple[int, str]] = {
    "wall": (0, "wall"),
    "floor": (3, "floor"),
    "person": (12, "person"),
    "sphere": (119, "ball"),
    "cube": (41, "box"),
    "cylinder": (111, "barrel"),
    "cone": (114, "tent"),
    "circle": (142, "plate"),
    "square": (28, "rug"),
    "triangle": (43, "signboard"),
    "ring": (137, "tray"),
    "star": (100, "poster"),
}
CAMERA = Camera()  # the default view: from above the floor's near edge, the backdrop filling the top
SUPERSAMPLE = 2  # rays per pixel side: the image is the mean of 2 x 2 rays
AMBIENT = 0.4
WALL, FLOOR = 0, 1  # instance ids; objects are 2, 3, ...
_AREA = (-2.2, 2.2, -1.3, 2.6)  # x0, x1, z0, z1 of the floor where objects stand
_PLACEMENT_TRIES = 60
_SCENE_TRIES = 6
_MIN_VISIBLE = 0.002  # of the image: an object must show at least this much (else the scene is redrawn)


@dataclass(frozen=True)
class WorldSample:
    """One world sample: the image, its caption, every condition map (RGB uint8, like the image),
    the figures' poses, the scene's metadata (JSON-ready) and the instance map ((H, W) int32: 0
    wall, 1 floor, then each object's ``instance`` as the metadata gives it)."""

    image: np.ndarray
    prompt: str
    conditions: dict[str, np.ndarray]
    poses: Poses
    scene: dict[str, Any]
    instance: np.ndarray


def world_sample(index: int, *, size: int = DEFAULT_SIZE, seed: int = 0, camera: Camera = CAMERA) -> WorldSample:
    """Sample `index` of the world under `seed`, `size` x `size` pixels."""
    from ..annotators import run_annotator  # numpy only; imported here to keep this module light

    check_size(size)
    rng = _rng(seed, index, 0)
    for _ in range(_SCENE_TRIES):  # redraw a scene in which an object is (nearly) hidden
        things, wall, floor, light = _draw_scene(rng, camera)
        frame = _render_scene(things, wall, floor, light, camera, size)
        visible = np.bincount(frame["instance"].ravel(), minlength=len(things) + 2)[2:]
        if visible.min() >= _MIN_VISIBLE * size * size:
            break
    image = frame["image"]
    low, high = CANNY_THRESHOLDS
    poses = Poses(size, size, [_person(t, camera) for t in things if t["kind"] == "person"])
    conditions = {
        "canny": run_annotator("canny", image, low_threshold=low, high_threshold=high),
        "depth": depth_map(frame["disparity"]),
        "normal": _bae_normal_map(frame["normal"]),
        "seg": ADE20K_PALETTE[frame["labels"]],
        "pose": draw_poses(poses),
        "scribble": _scribble(frame["instance"], _rng(seed, index, 2)),
    }
    scene = _metadata(things, wall, floor, light, frame, camera)
    return WorldSample(image, caption(scene, _rng(seed, index, 1)), conditions, poses, scene, frame["instance"])


def _bae_normal_map(normals: np.ndarray) -> np.ndarray:
    """(H, W, 3) camera-frame normals (x right, y up, z toward the viewer) as a normal_bae map: x
    flipped, as BAE's normals (Bae et al. 2021, ScanNet) point red to the left, then each axis
    from [-1, 1] to 0-255 as the annotator writes them."""
    bae = normals * np.array([-1.0, 1.0, 1.0])
    return (((bae + 1) * 0.5).clip(0, 1) * 255.0).astype(np.uint8)


def write_world(
    out: str | os.PathLike[str],
    count: int,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write samples 0..count-1 to `out`; return its prompt.json.

    Layout: ``image/{i}.png`` (the target), ``{condition}/{i}.png`` for each of `CONDITIONS`,
    ``pose/{i}.json`` (OpenPose JSON), ``instance/{i}.png`` (the instance map as grey levels: 0 the
    wall, 1 the floor, then each object's ``instance``; the evaluation reads an object's own pixels
    from it), and the listings, each written last and atomically:
    ``prompt.json`` (the fill50k layout: source = the canny map, so `controlnet train --data OUT`
    trains canny) and ``{condition}/prompt.json`` for every condition (source ``{i}.png``, target
    ``../image/{i}.png``: `controlnet train --data OUT/depth` trains depth). Each line of
    ``prompt.json`` also holds ``conditions`` (condition -> path) and ``scene`` (the metadata)."""
    size = check_size(size)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    _rng(seed, 0, 0)  # check the seed before anything is written
    out = Path(out)
    check_output(out)
    for sub in ("image", "instance", *CONDITIONS):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lines, per_condition = [], {c: [] for c in CONDITIONS}
    for i in range(count):
        sample = world_sample(i, size=size, seed=seed)
        Image.fromarray(sample.image).save(out / "image" / f"{i}.png")
        Image.fromarray(sample.instance.astype(np.uint8)).save(out / "instance" / f"{i}.png")
        paths = {}
        for name, array in sample.conditions.items():
            Image.fromarray(array).save(out / name / f"{i}.png")
            paths[name] = f"{name}/{i}.png"
            line = {"source": f"{i}.png", "target": f"../image/{i}.png", "prompt": sample.prompt}
            per_condition[name].append(json.dumps(line, ensure_ascii=False))
        (out / "pose" / f"{i}.json").write_text(json.dumps(poses_to_json(sample.poses)), encoding="utf-8")
        record = {"source": paths["canny"], "target": f"image/{i}.png", "prompt": sample.prompt}
        record |= {"conditions": paths, "pose_json": f"pose/{i}.json", "scene": sample.scene}
        lines.append(json.dumps(record, ensure_ascii=False))
        if progress is not None:
            progress(i + 1, count)
    for name, rows in per_condition.items():
        _write_lines(out / name / "prompt.json", rows)
    prompt_file = out / "prompt.json"
    _write_lines(prompt_file, lines)  # last: the dataset exists once this does
    return prompt_file


def _write_lines(path: Path, lines: list[str]) -> None:
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Sample `index`'s generator number `stream` (0 scene, 1 caption, 2 scribble) under `seed`."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return np.random.default_rng([int(seed), int(index), 0x57, stream])


# -- scenes ---------------------------------------------------------------------------------------


def _draw_scene(rng: np.random.Generator, camera: Camera) -> tuple[list[dict], str, str, np.ndarray]:
    """The things of a scene (each a dict with kind, colour, footprint and primitives), the wall and
    floor colours and the light direction (unit, toward the light)."""
    names = list(SCENE_COLORS)
    order = rng.permutation(len(names))
    wall, floor = names[order[0]], names[order[1]]
    count = int(rng.integers(1, 5))
    things: list[dict] = []
    for k in range(count):
        roll = rng.random()
        people = sum(t["kind"] == "person" for t in things)
        if roll < 0.25 and people < 2:
            kind = "person"
        elif roll < 0.45:
            kind = FLATS[rng.integers(len(FLATS))]
        else:
            kind = SOLIDS[rng.integers(len(SOLIDS))]
        thing = _place(kind, names[order[2 + k]], rng, camera, things)
        if thing is not None:
            thing["instance"] = 2 + len(things)
            for p in thing["primitives"]:
                p["instance"] = thing["instance"]
            things.append(thing)
    side = rng.choice((-1.0, 1.0))
    light = np.array([side * rng.uniform(0.3, 1.2), rng.uniform(1.0, 2.0), -rng.uniform(0.4, 1.2)])
    return things, wall, floor, light / np.linalg.norm(light)


def _place(kind: str, color: str, rng: np.random.Generator, camera: Camera, others: list[dict]) -> dict | None:
    """A `kind` thing where it is in view and its footprint overlaps no other's (None: no room)."""
    x0, x1, z0, z1 = _AREA
    for _ in range(_PLACEMENT_TRIES):
        x, z = rng.uniform(x0, x1), rng.uniform(z0, z1)
        thing = _make(kind, color, x, z, rng)
        if any(math.dist((x, z), o["position"]) < thing["footprint"] + o["footprint"] for o in others):
            continue
        top = camera.project(np.array([[x, thing["height"], z], [x - thing["footprint"], 0, z],
                                       [x + thing["footprint"], 0, z]]))  # fmt: skip
        if (top > 0.03).all() and (top < 0.97).all():
            return thing
    return None


def _make(kind: str, color: str, x: float, z: float, rng: np.random.Generator) -> dict:
    base = {"kind": kind, "color": color, "position": (float(x), float(z))}
    if kind == "person":
        scale = rng.uniform(0.95, 1.3)
        joints, primitives = _figure(rng, scale, x, z)
        return base | {"footprint": 0.55 * scale, "height": 1.8 * scale, "size": scale, "joints": joints,
                       "primitives": primitives}  # fmt: skip
    r = rng.uniform(0.3, 0.55)
    if kind in FLATS:
        r = rng.uniform(0.4, 0.7)
        return base | {"footprint": r, "height": 0.0, "size": r, "yaw": rng.uniform(-0.4, 0.4), "primitives": []}
    if kind == "sphere":
        p = {"kind": "sphere", "center": (x, r, z), "radius": r}
        height = 2 * r
    elif kind == "cube":
        h = 0.8 * r
        p = {"kind": "box", "center": (x, h, z), "half": h, "yaw": rng.uniform(0, math.pi / 2)}
        height, r = 2 * h, h * math.sqrt(2)
    elif kind == "cylinder":
        height = 2 * r * rng.uniform(0.8, 1.5)
        r *= 0.8
        p = {"kind": "cylinder", "base": (x, z), "radius": r, "height": height}
    else:
        height = 2.4 * r
        p = {"kind": "cone", "base": (x, z), "radius": r, "height": height}
    return base | {"footprint": r, "height": height, "size": float(r), "primitives": [p]}


# Figure proportions (height about 1.8 before scaling): y of hips, neck, shoulders, head centre.
_HIP, _NECK, _SHOULDER, _HEAD, _HEAD_R = 0.92, 1.45, 1.42, 1.62, 0.12
_ARM, _FOREARM, _THIGH, _SHIN = 0.3, 0.28, 0.45, 0.43


def _figure(rng: np.random.Generator, scale: float, x: float, z: float) -> tuple[np.ndarray, list[dict]]:
    """A figure facing the camera in a random pose: its 18 COCO keypoints (world, (18, 3)) and its
    capsules. The person's right side is on the image's left (x < 0 before turning)."""
    j = np.zeros((18, 3))
    j[1] = (0, _NECK, 0)
    for side, (shoulder, elbow, wrist, hip, knee, ankle) in ((-1, (2, 3, 4, 8, 9, 10)), (1, (5, 6, 7, 11, 12, 13))):
        j[shoulder] = (0.2 * side, _SHOULDER, 0)
        up = rng.uniform(0.1, 2.7)  # the upper arm's angle from hanging straight down, outward
        bend = up + rng.uniform(-1.2, 1.6)
        j[elbow] = j[shoulder] + _ARM * np.array([side * math.sin(up), -math.cos(up), -rng.uniform(0, 0.3)])
        j[wrist] = j[elbow] + _FOREARM * np.array([side * math.sin(bend), -math.cos(bend), -rng.uniform(0, 0.3)])
        j[hip] = (0.1 * side, _HIP, 0)
        spread, lift = rng.uniform(-0.05, 0.4), rng.uniform(0, 0.9) * (rng.random() < 0.4)
        thigh = np.array([side * math.sin(spread), -math.cos(spread) * math.cos(lift), -math.sin(lift)])
        j[knee] = j[hip] + _THIGH * thigh / np.linalg.norm(thigh)
        j[ankle] = j[knee] + _SHIN * np.array([side * math.sin(spread), -1.0, 0]) / math.hypot(math.sin(spread), 1)
    head = np.array([0, _HEAD, 0])
    # Nose, eyes and ears (0, 14-17) just inside the head: they project onto it.
    j[[0, 14, 15, 16, 17]] = head + np.array(
        [(0, -0.01, -0.11), (-0.045, 0.03, -0.1), (0.045, 0.03, -0.1), (-0.1, 0.0, -0.01), (0.1, 0.0, -0.01)]
    )
    j = np.concatenate([j, head[None]])  # row 18: the head's centre, turned and moved with the rest
    j[:, 1] += 0.07 - min(j[10, 1], j[13, 1])  # the lower foot on the floor
    yaw = rng.uniform(-0.35, 0.35)
    turn = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    j = (j * scale) @ turn.T + (x, 0, z)
    j, head = j[:18], j[18]

    def capsule(a: np.ndarray, b: np.ndarray, r: float) -> dict:
        return {"kind": "capsule", "a": tuple(a), "b": tuple(b), "radius": r * scale}

    pelvis = (j[8] + j[11]) / 2
    neck_base = j[1] + (pelvis - j[1]) * 0.2
    limbs = [(2, 3, 0.05), (3, 4, 0.045), (5, 6, 0.05), (6, 7, 0.045), (8, 9, 0.075), (9, 10, 0.06),
             (11, 12, 0.075), (12, 13, 0.06), (2, 5, 0.06), (8, 11, 0.08)]  # fmt: skip
    primitives = [capsule(j[a], j[b], r) for a, b, r in limbs]
    primitives += [capsule(neck_base, pelvis, 0.14), capsule(j[1], head, 0.05)]
    primitives.append({"kind": "sphere", "center": tuple(head), "radius": _HEAD_R * scale})
    return j, primitives


def _person(thing: dict, camera: Camera) -> Person:
    """The figure's OpenPose body: its keypoints projected, normalised; off-canvas ones absent."""
    xy = camera.project(thing["joints"])
    body = np.concatenate([xy, np.ones((18, 1))], axis=1)
    body[~((xy >= 0) & (xy < 1)).all(axis=1)] = np.nan
    return Person(body=body)


# -- rendering ------------------------------------------------------------------------------------


def _render_scene(things, wall, floor, light, camera: Camera, size: int) -> dict[str, np.ndarray]:
    """Image, disparity, camera normals, instance ids and ADE labels, each at `size` x `size`."""
    s = SUPERSAMPLE
    big = size * s
    planes = [
        {"kind": "plane", "point": (0, 0, camera.wall_z), "normal": (0, 0, -1.0), "instance": WALL},
        {"kind": "plane", "point": (0, 0, 0), "normal": (0, 1.0, 0), "instance": FLOOR},
    ]
    buffers, rays = render(planes + [p for t in things for p in t["primitives"]], camera, big)
    if not np.isfinite(buffers.t).all():
        raise AssertionError("a ray hit nothing: the camera must see only the wall and the floor")
    hits = camera.eye + buffers.t[:, None] * rays
    _paint_flats(things, buffers.instance, hits)
    colors = np.array([SCENE_COLORS[wall], SCENE_COLORS[floor], *(SCENE_COLORS[t["color"]] for t in things)], float)
    shade = AMBIENT + (1 - AMBIENT) * np.clip(buffers.normal @ light, 0, None)
    rgb = colors[buffers.instance] * shade[:, None]
    forward = camera.frame()[2]
    disparity = 1.0 / (buffers.t * (rays @ forward))
    normal = camera.to_camera(buffers.normal)

    def reduce(values: np.ndarray) -> np.ndarray:  # (big * big, C) -> (size, size, C), the mean of s x s
        return values.reshape(size, s, size, s, -1).mean(axis=(1, 3))

    normal = reduce(normal)
    normal /= np.maximum(np.linalg.norm(normal, axis=2, keepdims=True), 1e-12)
    instance = _mode(buffers.instance.reshape(size, s, size, s).transpose(0, 2, 1, 3).reshape(size, size, s * s))
    classes = np.array([CLASSES["wall"][0], CLASSES["floor"][0], *(CLASSES[t["kind"]][0] for t in things)])
    return {
        "image": np.rint(reduce(rgb)).clip(0, 255).astype(np.uint8),
        "disparity": reduce(disparity[:, None])[:, :, 0],
        "normal": normal,
        "instance": instance,
        "labels": classes[instance],
    }


def _paint_flats(things: list[dict], instance: np.ndarray, hits: np.ndarray) -> None:
    """Give the floor rays that land inside a flat shape that shape's instance (in place)."""
    for t in things:
        if t["kind"] not in FLATS:
            continue
        rows = np.flatnonzero(instance == FLOOR)
        u = hits[rows, 0] - t["position"][0]
        v = hits[rows, 2] - t["position"][1]
        c, s = math.cos(t["yaw"]), math.sin(t["yaw"])
        u, v = c * u + s * v, -s * u + c * v  # v points away from the camera: "up" in the image
        instance[rows[_inside_flat(t["kind"], u, v, t["size"])]] = t["instance"]


def _inside_flat(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    rho = np.hypot(u, v)
    if kind == "circle":
        return rho <= r
    if kind == "ring":
        return (rho <= r) & (rho >= 0.6 * r)
    if kind == "square":
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    # Triangle and star: polygons with vertices at equal angles round the centre, tested sector by sector.
    n, radii = (3, (1.1 * r,)) if kind == "triangle" else (10, (r, 0.45 * r))
    step = 2 * math.pi / n
    angle = np.mod(np.arctan2(v, u) - math.pi / 2, 2 * math.pi)  # from the point straight ahead
    k = np.floor(angle / step).astype(int) % n
    a0, a1 = k * step + math.pi / 2, (k + 1) * step + math.pi / 2
    r0 = np.asarray(radii)[k % len(radii)]
    r1 = np.asarray(radii)[(k + 1) % len(radii)]
    p0 = np.stack([r0 * np.cos(a0), r0 * np.sin(a0)])
    p1 = np.stack([r1 * np.cos(a1), r1 * np.sin(a1)])
    edge, to_point = p1 - p0, np.stack([u, v]) - p0
    return edge[0] * to_point[1] - edge[1] * to_point[0] >= 0  # left of the edge: the centre's side


def _mode(labels: np.ndarray) -> np.ndarray:
    """(H, W, K) -> (H, W): the value most of the K sub-pixels hold (the first of them on ties)."""
    counts = (labels[:, :, :, None] == labels[:, :, None, :]).sum(axis=3)
    return np.take_along_axis(labels, counts.argmax(axis=2)[:, :, None], axis=2)[:, :, 0]


def _scribble(instance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White strokes on black: the outlines between instances, moved by a smooth random field, thickened."""
    size = instance.shape[0]
    edge = np.zeros(instance.shape, bool)
    edge[:, :-1] |= instance[:, 1:] != instance[:, :-1]
    edge[:-1] |= instance[1:] != instance[:-1]
    ys, xs = np.nonzero(edge)
    amplitude = max(1.0, size / 48)
    field = rng.uniform(-amplitude, amplitude, (2, 5, 5)).astype(np.float32)
    dx, dy = (cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in field)
    canvas = np.zeros(instance.shape, np.uint8)
    canvas[np.clip(np.rint(ys + dy[ys, xs]), 0, size - 1).astype(int),
           np.clip(np.rint(xs + dx[ys, xs]), 0, size - 1).astype(int)] = 255  # fmt: skip
    width = max(3, size // 40) | 1
    canvas = cv2.dilate(canvas, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    return np.repeat(canvas[:, :, None], 3, axis=2)


def _metadata(things, wall, floor, light, frame, camera: Camera) -> dict[str, Any]:
    """The scene as JSON: colours, and per object (left to right) kind, colour, position, visible box."""
    instance = frame["instance"]
    forward, eye = camera.frame()[2], np.asarray(camera.eye)
    objects = []
    for t in things:
        ys, xs = np.nonzero(instance == t["instance"])
        centre = np.array([t["position"][0], t["height"] / 2, t["position"][1]])
        objects.append({
            "kind": t["kind"],
            "category": "figure" if t["kind"] == "person" else "flat" if t["kind"] in FLATS else "solid",
            "color": t["color"],
            "position": [round(v, 4) for v in t["position"]],  # x, z on the floor
            "size": round(float(t["size"]), 4),
            "distance": round(float((centre - eye) @ forward), 4),  # camera depth of its centre
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None,
            "pixels": len(xs),
            "seg_class": CLASSES[t["kind"]][0],
            "seg_name": CLASSES[t["kind"]][1],
            "instance": t["instance"],
        })  # fmt: skip
    objects.sort(key=lambda o: (o["bbox"] or [0, 0, 0, 0])[0] + (o["bbox"] or [0, 0, 0, 0])[2])
    return {
        "background": wall,
        "floor": floor,
        "objects": objects,
        "light": [round(float(v), 4) for v in light],
        "camera": {"eye": list(camera.eye), "target": list(camera.target), "fov": camera.fov},
    }

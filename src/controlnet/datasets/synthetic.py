"""Synthetic training data, generated from a seed: the fill50k task and coloured-shape scenes.

Two tasks, each a function from (index, size, seed) to a `Sample` (source, target, prompt):

- ``fill50k``: the toy task of the original ControlNet training tutorial. The source is a circle
  outline on black; the target is the same circle filled with one colour on a background of
  another, and the prompt names both: "pale golden rod circle with old lace background". Colours
  come from `FILL50K_COLORS`, CSS colours written with spaces as the original's prompts are. The
  outline is drawn in a third palette colour, independent of the other two, so the hint carries
  only the geometry and the colours must come from the prompt (the point of the task).
- ``scenes``: for training a small text-to-image model from scratch plus a Canny ControlNet. A
  background colour and 1 to 3 shapes (`SCENE_SHAPES`) in colours from the small, visually
  distinct `SCENE_COLORS`, captioned from the content: "a red circle and a blue square on a yellow
  background". The source is the Canny edge map of the target, by the project's own canny
  annotator with its default thresholds (100/200), so training sees what inference will give it.
  Each sample also carries structured metadata (`Sample.scene`) for evaluation.

Sample *i* of seed *s* depends on (s, i) only: any sample can be regenerated on its own, and
writing more samples never changes the earlier ones. Shapes are drawn at 4x the size and reduced
with a box filter, so their edges are anti-aliased as in a photograph.

`write_dataset` writes samples in the fill50k layout (`prompt.json` JSON lines, `source/`,
`target/`), which `controlnet.datasets.folders.ControlDataset` reads back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_file

# CSS colours, named with spaces as in the original fill50k prompts. Black is left out: the
# fill50k source background is black, and an outline must show on it.
FILL50K_COLORS: dict[str, tuple[int, int, int]] = {
    "alice blue": (240, 248, 255),
    "aquamarine": (127, 255, 212),
    "blue": (0, 0, 255),
    "blue violet": (138, 43, 226),
    "brown": (165, 42, 42),
    "burly wood": (222, 184, 135),
    "cadet blue": (95, 158, 160),
    "chartreuse": (127, 255, 0),
    "chocolate": (210, 105, 30),
    "coral": (255, 127, 80),
    "cornflower blue": (100, 149, 237),
    "crimson": (220, 20, 60),
    "cyan": (0, 255, 255),
    "dark blue": (0, 0, 139),
    "dark green": (0, 100, 0),
    "dark orange": (255, 140, 0),
    "dark slate gray": (47, 79, 79),
    "deep pink": (255, 20, 147),
    "deep sky blue": (0, 191, 255),
    "dim gray": (105, 105, 105),
    "fire brick": (178, 34, 34),
    "forest green": (34, 139, 34),
    "gold": (255, 215, 0),
    "golden rod": (218, 165, 32),
    "gray": (128, 128, 128),
    "green yellow": (173, 255, 47),
    "hot pink": (255, 105, 180),
    "indigo": (75, 0, 130),
    "khaki": (240, 230, 140),
    "lavender": (230, 230, 250),
    "light blue": (173, 216, 230),
    "light coral": (240, 128, 128),
    "light green": (144, 238, 144),
    "lime green": (50, 205, 50),
    "magenta": (255, 0, 255),
    "maroon": (128, 0, 0),
    "medium purple": (147, 112, 219),
    "midnight blue": (25, 25, 112),
    "navy": (0, 0, 128),
    "old lace": (253, 245, 230),
    "olive": (128, 128, 0),
    "orange": (255, 165, 0),
    "orchid": (218, 112, 214),
    "pale golden rod": (238, 232, 170),
    "pale green": (152, 251, 152),
    "peru": (205, 133, 63),
    "pink": (255, 192, 203),
    "purple": (128, 0, 128),
    "red": (255, 0, 0),
    "royal blue": (65, 105, 225),
    "saddle brown": (139, 69, 19),
    "salmon": (250, 128, 114),
    "sea green": (46, 139, 87),
    "sienna": (160, 82, 45),
    "sky blue": (135, 206, 235),
    "steel blue": (70, 130, 180),
    "tan": (210, 180, 140),
    "teal": (0, 128, 128),
    "tomato": (255, 99, 71),
    "turquoise": (64, 224, 208),
    "violet": (238, 130, 238),
    "wheat": (245, 222, 179),
    "white": (255, 255, 255),
    "yellow": (255, 255, 0),
    "yellow green": (154, 205, 50),
}

# Few colours, far apart: each must be recognisable in a 64 px image, by a small model and by the
# evaluation that checks generated images for the named colours. Every pair differs by at least
# 80 in some channel, which also keeps every boundary above Canny's high threshold.
SCENE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (250, 220, 30),
    "orange": (250, 130, 10),
    "purple": (130, 40, 170),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (250, 150, 200),
    "cyan": (40, 210, 230),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}
# A shape's outline in output pixels: an ellipse's box (x0, y0, x1, y1) or a polygon's points.
Geometry = tuple[float, float, float, float] | list[tuple[float, float]]
Box = tuple[int, int, int, int]

SCENE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "star")
TASKS: tuple[str, ...] = ("fill50k", "scenes")
DEFAULT_SIZES: dict[str, int] = {"fill50k": 512, "scenes": 64}  # the original's size; the small model's
MIN_SIZE, MAX_SIZE = 32, 1024

CANNY_THRESHOLDS = (100, 200)  # the scenes hint: the canny annotator's (and the original app's) defaults
SUPERSAMPLE = 4  # draw at 4x, reduce with a box filter: anti-aliased edges
_MIN_COLOR_DISTANCE = 60.0  # fill50k circle vs background (RGB distance): the circle must show
_MIN_OUTLINE_LUMA = 110.0  # a fill50k outline must show clearly on the black source background
_SCENE_RADIUS = (0.14, 0.26)  # shape half-extent as a fraction of the size: ~9-17 px at 64 px
_MAX_OVERLAP = 0.2  # of the smaller bounding box: every shape stays recognisable
_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class Sample:
    """One training pair: `source` (the condition) and `target`, RGB uint8 (size, size, 3).

    `scene` is the structured content of a scenes sample (None for fill50k): ``{"background":
    "yellow", "objects": [{"shape": "circle", "color": "red", "bbox": [x0, y0, x1, y1]}, ...]}``,
    objects in the caption's order (left to right); a bbox is in pixels, x1 and y1 exclusive, the
    shape's full extent (a neighbour may cover a little of it)."""

    source: np.ndarray
    target: np.ndarray
    prompt: str
    scene: dict[str, Any] | None = None


def check_size(size: int) -> int:
    """`size` if it can be generated and trained on (a multiple of 8 in [32, 1024]), else ValueError."""
    if isinstance(size, bool) or not isinstance(size, int) or size % 8 or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(
            f"size must be a multiple of 8 (the VAE's factor) between {MIN_SIZE} and {MAX_SIZE}, got {size!r}"
        )
    return size


def fill50k_sample(index: int, *, size: int = 512, seed: int = 0) -> Sample:
    """Sample `index` of the fill50k task: circle outline -> filled circle, "<c> circle with <b> background"."""
    check_size(size)
    rng = _rng(seed, index)
    names = list(FILL50K_COLORS)
    circle = names[rng.integers(len(names))]
    backgrounds = [n for n in names if math.dist(FILL50K_COLORS[n], FILL50K_COLORS[circle]) >= _MIN_COLOR_DISTANCE]
    background = backgrounds[rng.integers(len(backgrounds))]
    outlines = [n for n in names if _luma(FILL50K_COLORS[n]) >= _MIN_OUTLINE_LUMA]
    outline = outlines[rng.integers(len(outlines))]
    radius = rng.uniform(0.08, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    width = max(1, size // 256)  # the outline: 1 px up to 256, 2 px at the original's 512

    def draw_outline(draw: ImageDraw.ImageDraw) -> None:
        draw.ellipse(_scaled(box), outline=FILL50K_COLORS[outline], width=width * SUPERSAMPLE)

    def draw_disc(draw: ImageDraw.ImageDraw) -> None:
        draw.ellipse(_scaled(box), fill=FILL50K_COLORS[circle])

    return Sample(
        source=_render(size, (0, 0, 0), [draw_outline]),
        target=_render(size, FILL50K_COLORS[background], [draw_disc]),
        prompt=f"{circle} circle with {background} background",
    )


def scene_sample(index: int, *, size: int = 64, seed: int = 0) -> Sample:
    """Sample `index` of the scenes task: Canny edges -> 1 to 3 coloured shapes on a background.

    Colours are all different (background and shapes); shapes may repeat. A shape that finds no
    place overlapping the others by at most 20% of the smaller bounding box is left out (and so
    not captioned): rare, and decided by the seed like everything else."""
    from ..annotators import run_annotator  # numpy only; imported here to keep this module light

    check_size(size)
    rng = _rng(seed, index)
    names = list(SCENE_COLORS)
    count = int(rng.integers(1, 4))
    order = rng.permutation(len(names))
    background, colors = names[order[0]], [names[i] for i in order[1 : count + 1]]
    placed: list[tuple[str, str, Geometry, Box]] = []  # shape, colour, geometry, bbox
    for color in colors:
        shape = SCENE_SHAPES[rng.integers(len(SCENE_SHAPES))]
        for _ in range(_PLACEMENT_TRIES):
            radius = rng.uniform(*_SCENE_RADIUS) * size
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            geometry = _shape_geometry(shape, cx, cy, radius)
            bbox = _bbox(geometry, size)
            if all(_overlap(bbox, other[3]) <= _MAX_OVERLAP for other in placed):
                placed.append((shape, color, geometry, bbox))
                break
    drawers = [_shape_drawer(shape, SCENE_COLORS[color], geometry) for shape, color, geometry, _ in placed]
    target = _render(size, SCENE_COLORS[background], drawers)
    low, high = CANNY_THRESHOLDS
    source = run_annotator("canny", target, low_threshold=low, high_threshold=high)  # at the target's own size
    # Caption order: left to right (then top to bottom), whatever order the shapes were drawn in.
    ordered = sorted(placed, key=lambda p: (p[3][0] + p[3][2], p[3][1] + p[3][3]))
    objects = [{"shape": shape, "color": color, "bbox": list(bbox)} for shape, color, _, bbox in ordered]
    scene = {"background": background, "objects": objects}
    return Sample(source=source, target=target, prompt=scene_caption(scene), scene=scene)


def scene_caption(scene: dict[str, Any]) -> str:
    """The caption of a scene: "a red circle, a blue square and an orange star on a white background"."""
    items = [f"{_article(o['color'])} {o['color']} {o['shape']}" for o in scene["objects"]]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{listed} on {_article(scene['background'])} {scene['background']} background"


GENERATORS: dict[str, Callable[..., Sample]] = {"fill50k": fill50k_sample, "scenes": scene_sample}


def generate(task: str, index: int, *, size: int | None = None, seed: int = 0) -> Sample:
    """Sample `index` of `task` ("fill50k" or "scenes") at `size` (default: the task's own)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return GENERATORS[task](index, size=DEFAULT_SIZES[task] if size is None else size, seed=seed)


def write_dataset(
    out: str | os.PathLike[str],
    task: str,
    count: int,
    *,
    size: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write samples 0..count-1 of `task` to the folder `out` in the fill50k layout; return its prompt.json.

    Layout: ``source/{i}.png``, ``target/{i}.png`` and ``prompt.json``, one JSON object a line:
    ``{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}``, plus ``"scene"``
    (the structured content) for the scenes task. The images are written first and prompt.json
    last, through a temporary file renamed into place: an interrupted run leaves no prompt.json,
    never one that names missing images. A folder that already holds a dataset is refused
    (`check_output`): nothing is overwritten but the images of an interrupted run.
    `progress(done, count)` is called after each sample."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    size = check_size(DEFAULT_SIZES[task] if size is None else size)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    _rng(seed, 0)  # check the seed before anything is written
    out = Path(out)
    check_output(out)
    for sub in ("source", "target"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        sample = generate(task, i, size=size, seed=seed)
        record: dict[str, Any] = {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": sample.prompt}
        # Written directly, not one by one atomically: the dataset exists once prompt.json, written
        # last and atomically, does; a run cut short leaves no prompt.json and is refused as it is.
        Image.fromarray(sample.source).save(out / record["source"])
        Image.fromarray(sample.target).save(out / record["target"])
        if sample.scene is not None:
            record["scene"] = sample.scene
        lines.append(json.dumps(record, ensure_ascii=False))
        if progress is not None:
            progress(i + 1, count)
    prompt_file = out / "prompt.json"
    with atomic_file(prompt_file, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return prompt_file


def check_output(out: str | os.PathLike[str]) -> None:
    """FileExistsError if `out` is not a folder or already holds a dataset (prompt.json or metadata.jsonl).

    A folder with images but no listing (what an interrupted run leaves) is accepted: its images
    are written again."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    for name in ("prompt.json", "metadata.jsonl"):
        if (out / name).exists():
            raise FileExistsError(f"{out} already holds a dataset ({name}); choose another folder")


# -- drawing ------------------------------------------------------------------------------------


def _rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index` under `seed`: independent of every other sample."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return np.random.default_rng([int(seed), int(index)])


def _render(
    size: int, background: tuple[int, int, int], drawers: list[Callable[[ImageDraw.ImageDraw], None]]
) -> np.ndarray:
    """Draw at SUPERSAMPLE x `size`, reduce with a box filter (each pixel the mean of its 4x4 cell)."""
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), background)
    draw = ImageDraw.Draw(big)
    for drawer in drawers:
        drawer(draw)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX)).copy()


def _scaled(points: Geometry) -> Any:
    """Coordinates in output pixels -> supersampled pixels (a flat box or a list of (x, y))."""
    if points and isinstance(points[0], tuple):
        return [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points]
    return [v * SUPERSAMPLE for v in points]


def _shape_geometry(shape: str, cx: float, cy: float, r: float) -> Geometry:
    """A shape of half-extent about `r` at (cx, cy): an ellipse box (circle, ring) or polygon points."""
    if shape in ("circle", "ring"):
        return (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        h = 0.85 * r  # a square as large as the circle's box looks much bigger than the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        big = 1.1 * r  # equilateral, pointing up, centred on its bounding box
        half_width, half_height = big * math.sqrt(3) / 2, 0.75 * big
        return [(cx, cy - half_height), (cx + half_width, cy + half_height), (cx - half_width, cy + half_height)]
    if shape == "star":
        points = []
        for k in range(10):  # five points, pointing up; inner radius 0.45: the points stay visible
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SCENE_SHAPES)}")


def _shape_drawer(shape: str, rgb: tuple[int, int, int], geometry: Geometry) -> Callable[[ImageDraw.ImageDraw], None]:
    def draw(d: ImageDraw.ImageDraw) -> None:
        if shape == "circle":
            d.ellipse(_scaled(geometry), fill=rgb)
        elif shape == "ring":
            thickness = 0.4 * (geometry[2] - geometry[0]) / 2  # 40% of the radius: clearly a ring at 64 px
            d.ellipse(_scaled(geometry), outline=rgb, width=max(1, round(thickness * SUPERSAMPLE)))
        else:
            d.polygon(_scaled(geometry), fill=rgb)

    return draw


def _bbox(geometry: Geometry, size: int) -> Box:
    """Pixel bounding box (x0, y0, x1, y1), x1 and y1 exclusive, clipped to the image."""
    if isinstance(geometry, tuple):
        xs, ys = (geometry[0], geometry[2]), (geometry[1], geometry[3])
    else:
        xs, ys = tuple(x for x, _ in geometry), tuple(y for _, y in geometry)
    return (
        max(0, math.floor(min(xs))),
        max(0, math.floor(min(ys))),
        min(size, math.ceil(max(xs))),
        min(size, math.ceil(max(ys))),
    )


def _overlap(a: Box, b: Box) -> float:
    """Area of the intersection of two boxes over the area of the smaller."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"

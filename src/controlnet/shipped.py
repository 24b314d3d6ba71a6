"""The project's own model, shipped inside the package: the default when no model files are named.

A small latent diffusion model (the ``shapes`` preset: VAE, text encoder, UNet; 128x128 images)
trained from scratch on the synthetic shape scenes, and a Canny ControlNet trained on top of it,
both by ``scripts/train_shipped_model.sh`` with this project's own commands. Stored as float16
safetensors (about 29 MB together). What it was trained on, how, and its scores:
docs/model-card.md.

It knows 12 colours (``synthetic.SCENE_COLORS``) and 5 shapes (circle, square, triangle, ring,
star): prompts like "a red circle and a blue star on a yellow background", control images like the
Canny edges of such scenes (``examples()``).

The shipped ControlNets (and T2I-Adapters) are chosen by name wherever a model file can be named
(``--controlnet canny``, a unit's ``controlnet=canny``, the server's menus and JSON API): `MODEL`
is the registry of what ships, `resolve` turns what a user typed into a file, `find` a name into
an index among a pipeline's models. Which model ships is the one line ``MODEL = ...``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# A unit's model field (settings.UNIT_MODELS) -> how messages name that kind of model.
KINDS = {"controlnet": "ControlNet", "adapter": "T2I-Adapter"}


@dataclass(frozen=True)
class Control:
    """A shipped ControlNet or T2I-Adapter, under the name users type."""

    name: str  # what users type: --controlnet canny, a unit's controlnet=canny (unique within its kind)
    file: str  # in the package's weights folder
    kind: str  # "controlnet" or "adapter" (KINDS)
    description: str  # the control maps it reads, one line
    # The annotator that makes such maps from a picture (annotators/), None where none fits: the
    # world's depth, seg and pose maps come from its ground truth, which no annotator reproduces.
    annotator: str | None

    @property
    def path(self) -> Path:
        return weights_folder() / self.file


@dataclass(frozen=True)
class ShippedModel:
    """A base model and the controls trained on it, shipped together."""

    title: str  # said when it is used by default
    base: str  # the base model's file (VAE + text encoder + UNet, LDM layout) in the weights folder
    controls: tuple[Control, ...]  # in the order Pipeline.default() and the server load (and index) them
    examples: str = "examples"  # the folder of its example controls in the package (examples.json lists them)


SHAPES = ShippedModel(
    "shapes (the shipped model: 128 px synthetic scenes, Canny ControlNet)",
    "shapes.safetensors",
    (Control("canny", "shapes-canny.safetensors", "controlnet", "Canny edges, white on black", "canny"),),
)

# The world model (issue 19), trained by scripts/train_world_model.sh on `controlnet data world`
# (datasets/world.py says how each map is made); it ships once its files are in the weights folder.
WORLD = ShippedModel(
    "world (the shipped model: 128 px shaded 3-D scenes; canny, depth, seg, pose and scribble ControlNets)",
    "world.safetensors",
    (
        Control("canny", "world-canny.safetensors", "controlnet", "Canny edges, white on black", "canny"),
        Control("depth", "world-depth.safetensors", "controlnet", "inverse depth, grey, near bright", None),
        Control("seg", "world-seg.safetensors", "controlnet", "ADE20k segmentation colours", None),
        Control("pose", "world-pose.safetensors", "controlnet", "OpenPose skeletons (18 keypoints) on black", None),
        Control("scribble", "world-scribble.safetensors", "controlnet", "rough outlines, white on black", "scribble"),
        Control("canny", "world-canny-adapter.safetensors", "adapter", "Canny edges, white on black", "canny"),
    ),
    examples="examples/world",
)

MODEL = SHAPES  # what ships in src/controlnet/weights/
NAME = MODEL.title
BASE_FILE = MODEL.base


@dataclass(frozen=True)
class ExampleControl:
    """One control of an example: a shipped model by name and the map it reads, with the unit's
    strength and window (settings.UNIT's defaults unless the example says otherwise)."""

    model: str  # a shipped Control's name
    kind: str  # "controlnet" or "adapter" (KINDS)
    image: Path  # the control map, ready (no annotator needed)
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class Example:
    """Control maps of a held-apart scene (the model never trained on it) and a prompt that fits them:
    one control, or several at once (a composition)."""

    name: str
    prompt: str
    controls: tuple[ExampleControl, ...]
    other_prompt: str | None = None  # the same things in other colours
    scene: Path | None = None  # the picture the maps come from (the canny annotator finds the edges in it)

    @property
    def control(self) -> Path:
        """The first control's map."""
        return self.controls[0].image


def _package_file(*parts: str) -> Path:
    return Path(str(resources.files("controlnet").joinpath(*parts)))


def weights_folder() -> Path:
    """The folder of the shipped weight files, inside the package."""
    return _package_file("weights")


def examples_folder() -> Path:
    """The folder of the shipped model's example controls, inside the package."""
    return _package_file(*MODEL.examples.split("/"))


def base_path() -> Path:
    """The shipped base model (VAE + text encoder + UNet), LDM layout."""
    return weights_folder() / MODEL.base


def controls(kind: str) -> list[Control]:
    """The shipped models of ``kind`` ("controlnet" or "adapter"), in registry order."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of control model {kind!r}; choose one of {', '.join(KINDS)}")
    return [control for control in MODEL.controls if control.kind == kind]


def names(kind: str = "controlnet") -> list[str]:
    """What users may type for a shipped model of ``kind``, in registry order."""
    return [control.name for control in controls(kind)]


def paths(kind: str = "controlnet") -> list[Path]:
    """The shipped files of ``kind``, in registry order (as Pipeline.default() loads them)."""
    return [control.path for control in controls(kind)]


def _shipped_names(kind: str) -> str:
    shipped = names(kind)
    if not shipped:
        return f"no {KINDS[kind]} ships with the package"
    return f"the shipped {KINDS[kind]}s: {', '.join(shipped)}"


def control(name: str, kind: str = "controlnet") -> Control:
    """The shipped model of ``kind`` called ``name``; ValueError (one line, listing the names) if none is."""
    for candidate in controls(kind):
        if candidate.name == name:
            return candidate
    raise ValueError(f"no shipped {KINDS[kind]} is called {name!r} ({_shipped_names(kind)})")


def path(name: str, kind: str = "controlnet") -> Path:
    """The file of the shipped model of ``kind`` called ``name`` (e.g. ``path("canny")``)."""
    return control(name, kind).path


def canny_path() -> Path:
    """The shipped Canny ControlNet."""
    return path("canny")


def resolve(value: str | os.PathLike, kind: str = "controlnet") -> Path:
    """What a user typed where a model file is taken (``--controlnet``, ``--adapter``): a file or
    folder that exists is that path (so a file of one's own is never shadowed by a name); else the
    name of a shipped model of ``kind`` is its file; else ValueError, one line naming the value and
    the shipped names."""
    given = Path(value)
    if given.exists():
        return given
    for candidate in controls(kind):
        if candidate.name == str(value):
            return candidate.path
    raise ValueError(f"{value}: no such file or folder, nor a shipped {KINDS[kind]} name ({_shipped_names(kind)})")


def is_shipped(file: str | os.PathLike, kind: str = "controlnet") -> bool:
    """Whether ``file`` is one of the shipped models of ``kind`` (however its path is written)."""
    return shipped_name(file, kind) is not None


def shipped_name(file: str | os.PathLike, kind: str = "controlnet") -> str | None:
    """The name of the shipped model of ``kind`` that ``file`` is, None for any other file."""
    real = os.path.realpath(file)
    return next((c.name for c in controls(kind) if os.path.realpath(c.path) == real), None)


def find(name: str, kind: str, files: Sequence[str | os.PathLike]) -> int | None:
    """The index of the shipped model ``name`` among ``files`` (the models a pipeline or a server
    loaded, in order), None when it is not among them; ValueError when no shipped model of ``kind``
    is called ``name``."""
    real = os.path.realpath(path(name, kind))
    return next((i for i, file in enumerate(files) if os.path.realpath(file) == real), None)


def missing() -> list[Path]:
    """Shipped weight files that are not where the package expects them (empty when installed well)."""
    files = [base_path(), *(control.path for control in MODEL.controls)]
    return [file for file in files if not file.is_file()]


def examples() -> list[Example]:
    """The example controls that ship with the package (``make demo`` uses them)."""
    folder = examples_folder()
    listing = json.loads((folder / "examples.json").read_text())
    return [
        Example(
            item["name"],
            item["prompt"],
            tuple(
                ExampleControl(
                    unit["model"],
                    unit.get("kind", "controlnet"),
                    folder / unit["image"],
                    unit.get("strength", 1.0),
                    unit.get("start", 0.0),
                    unit.get("end", 1.0),
                )
                for unit in item["controls"]
            ),
            item.get("other_prompt"),
            folder / item["scene"] if "scene" in item else None,
        )
        for item in listing
    ]

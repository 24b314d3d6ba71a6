"""The project's own model, shipped inside the package: the default when no model files are named.

A small latent diffusion model (the ``shapes`` preset: VAE, text encoder, UNet; 128x128 images)
trained from scratch on the synthetic shape scenes, and a Canny ControlNet trained on top of it,
both by ``scripts/train_shipped_model.sh`` with this project's own commands. Stored as float16
safetensors (about 29 MB together). What it was trained on, how, and its scores:
docs/model-card.md.

It knows 12 colours (``synthetic.SCENE_COLORS``) and 5 shapes (circle, square, triangle, ring,
star): prompts like "a red circle and a blue star on a yellow background", control images like the
Canny edges of such scenes (``examples()``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

NAME = "shapes (the shipped model: 128 px synthetic scenes, Canny ControlNet)"
BASE_FILE = "shapes.safetensors"
CANNY_FILE = "shapes-canny.safetensors"


@dataclass(frozen=True)
class Example:
    """A shipped control image (Canny edges of a held-apart scene) and a prompt that fits it."""

    name: str
    control: Path
    prompt: str
    other_prompt: str | None = None  # the same shapes in other colours
    scene: Path | None = None  # the picture the edges were detected in (for the canny annotator)


def _package_file(*parts: str) -> Path:
    return Path(str(resources.files("controlnet").joinpath(*parts)))


def base_path() -> Path:
    """The shipped base model (VAE + text encoder + UNet), LDM layout."""
    return _package_file("weights", BASE_FILE)


def canny_path() -> Path:
    """The shipped Canny ControlNet, a 1.1-style control-only file."""
    return _package_file("weights", CANNY_FILE)


def missing() -> list[Path]:
    """Shipped weight files that are not where the package expects them (empty when installed well)."""
    return [path for path in (base_path(), canny_path()) if not path.is_file()]


def examples() -> list[Example]:
    """The example control images that ship with the package (``make demo`` uses them)."""
    folder = _package_file("examples")
    listing = json.loads((folder / "examples.json").read_text())
    return [
        Example(
            item["name"],
            folder / item["control"],
            item["prompt"],
            item.get("other_prompt"),
            folder / item["scene"] if "scene" in item else None,
        )
        for item in listing
    ]

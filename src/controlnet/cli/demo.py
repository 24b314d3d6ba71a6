"""``controlnet demo`` (what ``make demo`` runs): the shipped model on the shipped example controls.

For each shipped example (condition maps of a scene the model never saw: one per shipped
ControlNet, the T2I-Adapter, and compositions of several units at once, each with its strength and
window) it generates an image from the example's prompt; then the first example's maps under a
prompt with other colours (the prompt decides what fills them), and guess mode (the controls alone,
with an empty prompt) on the first example and on every composition. Every image and an overview grid
(controls above, images below) go to the output folder.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import shipped
from ..files import atomic_file
from ..imaging.charts import image_grid
from ..imaging.images import load_image, save_png
from ..pipeline import ControlUnit, Pipeline
from ..runtime import NonFiniteError, default_device
from .common import CommandError, check_device, check_prompts, check_range, one_line, output_folder

SEED = 0  # every demo image uses it: make demo prints the same every time


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    demo = commands.add_parser("demo", help="the shipped model on the shipped example control images")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    demo.add_argument("--prompt", help="one prompt for every example (default: each example's own)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, mps")
    demo.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    return {"demo": cmd_demo}


def cmd_demo(args: argparse.Namespace) -> None:
    check_range("--steps", args.steps, 1, 100)
    if args.prompt is not None:
        check_prompts(args.prompt)
    if args.device != "auto":
        check_device(args.device)
    output_folder(args.out)
    try:
        run_demo(args.out, args.steps, args.prompt, args.device, args.dtype)
    except NonFiniteError as error:
        raise CommandError(one_line(error)) from None


def run_demo(
    out: Path, steps: int = 20, prompt: str | None = None, device: str = "auto", dtype: str | None = None
) -> list[Path]:
    """Generate from every shipped example into ``out``; return the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    device = default_device() if device == "auto" else device
    examples = shipped.examples()
    print(f"controlnet demo: {shipped.NAME}")
    loading = time.perf_counter()
    pipe = Pipeline.default(device, dtype)
    print(f"loaded in {time.perf_counter() - loading:.1f} s ({pipe.dtype} on {pipe.device})")
    size = pipe.model.config.native_resolution

    jobs = [(example.name, example, prompt or example.prompt) for example in examples]
    if prompt is None:  # the same maps under other colours: the prompt still decides what fills them
        first = examples[0]
        jobs.append((f"{first.name}-other-colours", first, first.other_prompt))
    # Guess mode: the controls alone, with an empty prompt (the first example, and every composition).
    guessed = [examples[0], *(example for example in examples[1:] if len(example.controls) > 1)]
    jobs += [(f"{example.name}-guess-mode", example, "") for example in guessed]

    paths, controls, images, started = [], [], [], time.perf_counter()
    for name, example, text in jobs:
        units = [_unit(pipe, control, guess_mode=not text) for control in example.controls]
        result = pipe.generate(text, units, seed=SEED, steps=steps, guidance_scale=7.5, resolution=size)
        path = save_png(out / f"{name}.png", result.images[0])  # whole or not at all (a disk that fills up)
        controls.append(overlay(result.control_maps))
        images.append(result.images[0])
        paths.append(path)
        shown = f'"{text}"' if text else "(empty prompt, guess mode)"
        print(f"  {path}  [{_describe(example)}]  {shown}")
    seconds = time.perf_counter() - started
    print(f"{len(jobs)} images at {size}x{size}, {steps} DDIM steps with guidance: {seconds:.1f} s")

    overview = out / "overview.png"
    grid = image_grid([controls, images], ["control", "image"])
    with atomic_file(overview) as handle:
        grid.save(handle, format="PNG")
    paths.append(overview)
    print(f"overview (controls above, images below): {overview}")
    return paths


def _unit(pipe: Pipeline, control: shipped.ExampleControl, guess_mode: bool) -> ControlUnit:
    """The control unit of one example control: its shipped model by name, its map as it is (a
    ready map: no annotator), its strength and window; "control" mode (the ControlNet decides, the
    paper's guess mode) under an empty prompt."""
    unit = ControlUnit(
        load_image(control.image),
        strength=control.strength,
        start=control.start,
        end=control.end,
        mode="control" if guess_mode else "balanced",
    )
    if control.kind == "adapter":
        unit.adapter = pipe.adapter_index(control.model)
    else:
        unit.controlnet = pipe.controlnet_index(control.model)
    return unit


def _describe(example: shipped.Example) -> str:
    """The example's units, e.g. "pose + depth 0.8 until 60%"."""
    parts = []
    for control in example.controls:
        part = control.model + (" adapter" if control.kind == "adapter" else "")
        if control.strength != 1.0:
            part += f" {control.strength:g}"
        if (control.start, control.end) != (0.0, 1.0):
            part += f" {control.start:.0%}-{control.end:.0%}"
        parts.append(part)
    return " + ".join(parts)


def overlay(maps: list[np.ndarray]) -> np.ndarray:
    """Several control maps as one picture for the overview: the first unit's drawn over the
    others' (pose over depth, edges over segments), where it is not black."""
    shown = maps[-1].copy()
    for layer in reversed(maps[:-1]):
        drawn = layer.max(axis=-1) > 0
        shown[drawn] = layer[drawn]
    return shown

"""``controlnet demo`` (what ``make demo`` runs): the shipped model on the shipped example controls.

For each example control image (Canny edges of a scene the model never saw) it generates an image
from the example's prompt; then the same edges under prompts with other colours (the prompt decides
what fills the edges), and guess mode on the first (the ControlNet alone, with an empty prompt).
Every image and an overview grid (controls above, images below) go to the output folder.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

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

    jobs = [(example.name, example, prompt or example.prompt, "balanced") for example in examples]
    if prompt is None:  # the same edges under other colours: the prompt still decides what fills them
        jobs += [(f"{e.name}-other-colours", e, e.other_prompt, "balanced") for e in examples if e.other_prompt]
    jobs.append((f"{examples[0].name}-guess-mode", examples[0], "", "control"))

    paths, controls, images, started = [], [], [], time.perf_counter()
    for name, example, text, mode in jobs:
        control = load_image(example.control)
        result = pipe.generate(
            text, [ControlUnit(control, mode=mode)], seed=SEED, steps=steps, guidance_scale=7.5, resolution=size
        )
        path = save_png(out / f"{name}.png", result.images[0])  # whole or not at all (a disk that fills up)
        controls.append(result.control_maps[0])
        images.append(result.images[0])
        paths.append(path)
        shown = f'"{text}"' if text else "(empty prompt, guess mode)"
        print(f"  {path}  {shown}")
    seconds = time.perf_counter() - started
    print(f"{len(jobs)} images at {size}x{size}, {steps} DDIM steps with guidance: {seconds:.1f} s")

    overview = out / "overview.png"
    grid = image_grid([controls, images], ["control", "image"])
    with atomic_file(overview) as handle:
        grid.save(handle, format="PNG")
    paths.append(overview)
    print(f"overview (controls above, images below): {overview}")
    return paths

"""``controlnet data TASK``: write a synthetic training set in the fill50k layout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .common import CommandError, UsageError, check_range


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    """``controlnet data TASK``: write a synthetic training set in the fill50k layout."""
    data = commands.add_parser(
        "data",
        help="write a synthetic training set: controlnet data fill50k|scenes|world --out DIR --count N",
        description="Write COUNT samples of a synthetic task to a folder in the fill50k layout (prompt.json, "
        "source/, target/), which training reads. The same --seed always gives the same samples.",
    )
    tasks = data.add_subparsers(dest="task", required=True, metavar="TASK")
    about = {
        "fill50k": "the original tutorial's task: circle outline -> filled circle, '<colour> circle with "
        "<colour> background' (default size 512)",
        "scenes": "1 to 3 coloured shapes on a background, captioned from the content, Canny edges as "
        "the condition, shape metadata in prompt.json (default size 64)",
        "world": "shaded 3-D scenes (spheres, cubes, cylinders, cones, flat shapes, posed figures) with exact "
        "canny, depth, normal, seg, pose and scribble maps, each condition also its own dataset in "
        "OUT/CONDITION, scene metadata in prompt.json, instance maps in OUT/instance (default size 128)",
    }
    for task, help_text in about.items():
        t = tasks.add_parser(task, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        t.add_argument("--out", type=Path, required=True, help="output folder (must not hold a dataset already)")
        t.add_argument("--count", type=int, required=True, help="number of samples")
        t.add_argument("--size", type=int, help="image side in pixels, a multiple of 8 in 32..1024")
        t.add_argument("--seed", type=int, default=0, help="0 or more (default 0)")
    return {"data": cmd_data}


def cmd_data(args: argparse.Namespace) -> None:
    from ..datasets import world
    from ..datasets.synthetic import DEFAULT_SIZES, check_output, check_size, write_dataset

    default = world.DEFAULT_SIZE if args.task == "world" else DEFAULT_SIZES[args.task]
    size = default if args.size is None else args.size
    try:
        check_size(size)
    except ValueError as error:
        raise UsageError(f"--size: {error}") from None
    check_range("--count", args.count, 1, 100_000_000)
    check_range("--seed", args.seed, 0, 2**63 - 1)
    try:
        check_output(args.out)  # nothing may be lost: never into a folder that holds a dataset
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    step = max(1, args.count // 100)  # redraw the progress line about 100 times
    drawn = False

    def progress(done: int, total: int) -> None:
        nonlocal drawn
        # sys.stderr looked up at each call: tests (and callers) may replace it. Only on a terminal:
        # in a log, a hundred carriage-return lines are noise.
        if sys.stderr.isatty() and (done % step == 0 or done == total):
            print(f"\rwriting {args.task} samples {done}/{total}", end="", file=sys.stderr, flush=True)
            drawn = True

    try:
        if args.task == "world":
            world.write_world(args.out, args.count, size=size, seed=args.seed, progress=progress)
        else:
            write_dataset(args.out, args.task, args.count, size=size, seed=args.seed, progress=progress)
    except OSError as error:
        raise CommandError(f"{args.out}: cannot write ({error.strerror or error})") from None
    finally:
        if drawn:
            print(file=sys.stderr, flush=True)  # end the progress line before any other message
    print(f"wrote {args.count} {args.task} samples ({size}x{size}, seed {args.seed}) to {args.out}")

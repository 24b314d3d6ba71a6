"""``controlnet annotate NAME IN OUT``: one annotator on one image; ``--list`` shows them all."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..metadata import format_number, quote, to_json
from .common import (
    CommandError,
    UsageError,
    add_annotators_dir,
    annotator_params,
    check_device,
    check_output,
    check_range,
    one_line,
    save_over,
)


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    annotate = commands.add_parser(
        "annotate",
        help="run one annotator on an image: controlnet annotate NAME IN OUT",
        description="Run one annotator on an image and write the control map as a PNG. "
        "`controlnet annotate --list` shows every annotator with its parameters. openpose_json takes an "
        "OpenPose JSON file instead of an image and draws its poses.",
    )
    annotate.add_argument("name", nargs="?", help="annotator name (canny, scribble, shuffle, ...); see --list")
    annotate.add_argument("input", type=Path, nargs="?")
    annotate.add_argument("output", type=Path, nargs="?", help="a .png file")
    annotate.add_argument("--list", action="store_true", help="list the annotators and their parameters, then exit")
    annotate.add_argument(
        "--resolution",
        type=int,
        help="resize the image first: short side, sides multiples of 64 (default 512; a pose JSON is drawn "
        "at its canvas size unless this is given)",
    )
    annotate.add_argument(
        "--canvas",
        metavar="WIDTHxHEIGHT",
        help="openpose_json: the size of the picture the poses were detected on, for files that do not "
        "record it (CMU OpenPose's --write_json)",
    )
    annotate.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="annotator parameter")
    annotate.add_argument("--json", type=Path, metavar="OUT.json", help="also write what was detected (the poses)")
    annotate.add_argument("--overwrite", action="store_true")
    add_annotators_dir(annotate)
    annotate.add_argument("--device", default="auto", help="where network annotators run: auto (default), cpu, cuda")
    annotate.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="their precision: auto (default) is bfloat16 on a CPU with native bf16, float16 on a GPU, "
        "else float32; float32 gives the reference's maps exactly",
    )
    return {"annotate": cmd_annotate}


def cmd_annotate(args: argparse.Namespace) -> None:
    from ..annotators import Runtime, annotate, get_annotator
    from ..imaging.images import load_image

    if args.list:
        _list_annotators(args.annotators_dir)
        return
    if args.name is None or args.input is None or args.output is None:
        raise UsageError("needs NAME IN OUT (or --list to see the annotators)")
    try:
        annotator = get_annotator(args.name)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if annotator.inputs:
        raise UsageError(
            f"annotator {args.name!r} needs {', '.join(annotator.inputs)}, which the command line cannot give"
        )
    params = annotator_params(annotator, args.param)
    if args.resolution is not None:
        check_range("--resolution", args.resolution, 64, 8192)
    canvas = _canvas(args.canvas) if args.canvas is not None else None
    if canvas is not None and annotator.from_file is None:
        raise UsageError(f"--canvas is for a pose JSON (openpose_json), not for {args.name}")
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"{args.output}: the output is written as PNG; name it .png")
    check_output(args.output, args.overwrite, [args.input])
    if args.json is not None:
        if args.json.suffix.lower() != ".json":
            raise UsageError(f"{args.json}: --json writes JSON; name it .json")
        check_output(args.json, args.overwrite, [args.input, args.output])
    if args.device != "auto":
        check_device(args.device)
    runtime = Runtime.default(args.annotators_dir, None if args.device == "auto" else args.device, args.dtype)
    annotator.check_weights(runtime.folder)  # every missing file, before anything is read: where to get them
    resolution = 512 if args.resolution is None and annotator.from_file is None else args.resolution
    image = None if annotator.from_file is not None else load_image(args.input)  # ImageError: exit 1
    try:
        if image is None:
            result = _annotate_file(annotator, args.input, resolution, canvas, params)
        else:
            result = annotate(args.name, image, resolution, runtime=runtime, **params)
    except ValueError as error:
        raise UsageError(one_line(error)) from None
    if args.json is not None and result.data is None:
        raise UsageError(f"annotator {args.name!r} detects nothing to write as JSON; --json is for the openpose ones")
    record = {"annotator": args.name, "params": params, "resolution": resolution, "version": __version__}
    save_over(args.output, result.image, {"controlnet": to_json(record)})
    print(f"wrote {args.output} ({result.image.shape[1]}x{result.image.shape[0]})")
    if args.json is not None:
        _save_json(args.json, result.data)
        print(f"wrote {args.json}")


def _annotate_file(annotator, path: Path, resolution: int | None, canvas: tuple[int, int] | None, params: dict):
    """An annotator that reads a file (openpose_json): drawn at the file's canvas size, or at the
    size an image of that size would get at ``resolution`` (strokes keep their width)."""
    from ..annotators.pose.jsonformat import read_pose_json
    from ..imaging.resize import check_aspect_ratio, resized_size

    poses = read_pose_json(path, canvas=canvas)
    width, height = (poses.width, poses.height)
    if resolution is not None:
        check_aspect_ratio(width, height, f"the canvas of {path}")
        width, height = resized_size(width, height, resolution)
    return annotator.from_file(path, width, height, canvas=(poses.width, poses.height), **params)


def _canvas(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise UsageError(f"--canvas {text!r}: give WIDTHxHEIGHT in pixels, e.g. 512x768")
    return int(width), int(height)


def _save_json(path: Path, data: dict) -> None:
    """``data`` as JSON, written atomically (never half a file), a failure in one line."""
    import json

    from ..files import atomic_file

    try:
        with atomic_file(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    except OSError as error:
        raise CommandError(f"{path}: cannot write ({error.strerror or error})") from None


def _list_annotators(folder: Path | None) -> None:
    from ..annotators import ANNOTATORS, annotators_folder

    where = annotators_folder(folder)
    print(f"annotator weights are read from {where}")
    for annotator in ANNOTATORS.values():
        print(f"{annotator.name}: {annotator.description}")
        missing = annotator.missing(where)
        for weight in annotator.weights:
            state = "MISSING" if weight in missing else "present"
            print(
                f"    weights {weight.name}: {state}" + (f" (get it from {weight.source})" if weight in missing else "")
            )
        for p in annotator.params:
            if p.kind == "str":
                allowed = "one of " + ", ".join(p.choices)
            elif p.kind == "bool":
                allowed = "true or false"
            else:
                allowed = f"{p.kind} {_bound(p.minimum)}..{_bound(p.maximum)}"
            print(f"    {p.name}={quote(p.default)}  ({allowed})  {p.help}".rstrip())
        for name in annotator.inputs:
            print(f"    needs {name} (Python API only)")


def _bound(value: float | None) -> str:
    return "" if value is None else format_number(value)

"""``controlnet annotate NAME IN OUT``: one annotator on one image; ``--list`` shows them all."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..metadata import format_number, quote, to_json
from .common import UsageError, check_output, check_range, one_line, save_over


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    annotate = commands.add_parser(
        "annotate",
        help="run one annotator on an image: controlnet annotate NAME IN OUT",
        description="Run one annotator on an image and write the control map as a PNG. "
        "`controlnet annotate --list` shows every annotator with its parameters.",
    )
    annotate.add_argument("name", nargs="?", help="annotator name (canny, scribble, shuffle, ...); see --list")
    annotate.add_argument("input", type=Path, nargs="?")
    annotate.add_argument("output", type=Path, nargs="?", help="a .png file")
    annotate.add_argument("--list", action="store_true", help="list the annotators and their parameters, then exit")
    annotate.add_argument("--resolution", type=int, default=512, help="resize the image first (short side, x64)")
    annotate.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="annotator parameter")
    annotate.add_argument("--overwrite", action="store_true")
    return {"annotate": cmd_annotate}


def cmd_annotate(args: argparse.Namespace) -> None:
    from ..annotators import get_annotator, run_annotator
    from ..imaging.images import load_image

    if args.list:
        _list_annotators()
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
    params = _annotator_params(annotator, args.param)
    check_range("--resolution", args.resolution, 64, 8192)
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"{args.output}: the output is written as PNG; name it .png")
    check_output(args.output, args.overwrite, [args.input])
    image = load_image(args.input)
    try:
        result = run_annotator(args.name, image, args.resolution, **params)
    except ValueError as error:
        raise UsageError(one_line(error)) from None
    record = {"annotator": args.name, "params": params, "resolution": args.resolution, "version": __version__}
    save_over(args.output, result, {"controlnet": to_json(record)})
    print(f"wrote {args.output} ({result.shape[1]}x{result.shape[0]})")


def _annotator_params(annotator, items: Sequence[str]) -> dict:
    """--param KEY=VALUE items as the annotator's typed parameters, defaults filled in and checked."""
    known = {p.name: p for p in annotator.params}
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"bad --param {item!r}; use KEY=VALUE")
        param = known.get(key)
        if param is None:
            takes = ", ".join(known) or "no parameters"
            raise UsageError(f"annotator {annotator.name!r} has no parameter {key!r}; it takes {takes}")
        params[key] = _param_value(param, value, annotator.name)
    try:
        return annotator.resolve(params)  # ranges and choices: the annotator's own check
    except ValueError as error:
        raise UsageError(str(error)) from None


def _param_value(param, text: str, annotator: str) -> Any:
    """The text of a --param value as the parameter's kind (bool, int, float or str)."""
    if param.kind == "str":
        return text
    if param.kind == "bool":
        words = {
            "true": True,
            "yes": True,
            "on": True,
            "1": True,
            "false": False,
            "no": False,
            "off": False,
            "0": False,
        }
        if text.lower() not in words:
            raise UsageError(f"{annotator} parameter {param.name!r} must be true or false, got {text!r}")
        return words[text.lower()]
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)  # an int parameter accepts '50.0'; the annotator refuses '50.5'
    except ValueError:
        raise UsageError(f"{annotator} parameter {param.name!r} must be a number, got {text!r}") from None


def _list_annotators() -> None:
    from ..annotators import ANNOTATORS

    for annotator in ANNOTATORS.values():
        print(f"{annotator.name}: {annotator.description}")
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

"""The ``controlnet`` command line: parse input, call the core, format output. No model logic here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .checkpoints import (
    CheckpointError,
    inspect_contents,
    load_base,
    load_controlnet,
    save_diffusers,
    save_ldm,
    transfer_control,
)


class UsageError(Exception):
    """A user mistake on the command line, reported in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnet", description="ControlNet for Stable Diffusion: spatial control of text-to-image diffusion."
    )
    parser.add_argument("--version", action="version", version=f"controlnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole model stack end to end and write images")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    demo.add_argument("--prompt", default="a red circle on a white background")
    demo.add_argument("--steps", type=int, default=20)

    convert = commands.add_parser(
        "convert", help="convert a base model and/or ControlNet between the LDM and diffusers layouts"
    )
    convert.add_argument("input", type=Path, help="LDM file (.safetensors/.ckpt/.pth) or diffusers folder/file")
    convert.add_argument("output", type=Path, help="LDM: a .safetensors file; diffusers: a folder (or .safetensors)")
    convert.add_argument("--to", choices=("ldm", "diffusers"), required=True, help="layout to write")
    convert.add_argument("--prediction", choices=("eps", "v"), help="name the prediction type of an SD 2.x model")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")

    info = commands.add_parser("info", help="say what a model file or folder holds")
    info.add_argument("input", type=Path)

    transfer = commands.add_parser(
        "transfer-control", help="move a ControlNet to a fine-tuned base: control + (new base - old base)"
    )
    transfer.add_argument("controlnet", type=Path, help="the ControlNet (any format)")
    transfer.add_argument("old_base", type=Path, help="the base it was trained on (e.g. SD 1.5)")
    transfer.add_argument("new_base", type=Path, help="the fine-tuned base to move it to")
    transfer.add_argument("output", type=Path, help="a .safetensors file (control-only, LDM layout)")
    transfer.add_argument("--overwrite", action="store_true")
    return parser


def _check_output(path: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    if any(path.resolve() == i.resolve() for i in inputs):
        raise UsageError(f"{path}: the output would overwrite an input; choose another path")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: already exists; pass --overwrite to replace it")


def cmd_convert(args: argparse.Namespace) -> None:
    _check_output(args.output, args.overwrite, [args.input])
    contents = inspect_contents(args.input)
    model = load_base(args.input, prediction=args.prediction) if contents.has_base else None
    controlnet = load_controlnet(args.input, model.config if model else None) if contents.has_controlnet else None
    if args.to == "ldm":
        save_ldm(args.output, model, controlnet)
    else:
        save_diffusers(args.output, model, controlnet)
    held = " + ".join(p for p, m in (("base model", model), ("ControlNet", controlnet)) if m is not None)
    print(f"wrote {held} to {args.output} ({args.to} layout)")


def cmd_info(args: argparse.Namespace) -> None:
    contents = inspect_contents(args.input)
    print(f"{args.input}: {contents.format}")
    if contents.has_base:
        model = load_base(args.input)
        print(f"  base model: {model.config.name} ({model.config.schedule.prediction}-prediction)")
    if contents.has_controlnet:
        controlnet = load_controlnet(args.input)
        pooling = ", global average pooling" if controlnet.config.global_average_pooling else ""
        residuals = len(controlnet.zero_convs) + 1
        print(f"  ControlNet: {residuals} residuals, context {controlnet.config.unet.context_dim}{pooling}")


def cmd_transfer_control(args: argparse.Namespace) -> None:
    _check_output(args.output, args.overwrite, [args.controlnet, args.old_base, args.new_base])
    old, new = load_base(args.old_base), load_base(args.new_base)
    if old.config.unet != new.config.unet:
        raise UsageError("the old and the new base models are of different families")
    controlnet = load_controlnet(args.controlnet, old.config)
    moved = transfer_control(controlnet.state_dict(), old.unet.state_dict(), new.unet.state_dict())
    controlnet.load_state_dict(moved)
    save_ldm(args.output, controlnet=controlnet)
    print(f"wrote {args.output}: {args.controlnet.name} moved onto {args.new_base.name}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    run_demo(args.out, args.prompt, args.steps)


_COMMANDS = {
    "demo": cmd_demo,
    "convert": cmd_convert,
    "info": cmd_info,
    "transfer-control": cmd_transfer_control,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except (UsageError, CheckpointError) as error:
        print(f"controlnet {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        print(f"controlnet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

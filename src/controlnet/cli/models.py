"""The commands on model files: ``convert`` (between the LDM and diffusers layouts; T2I-Adapters
between TencentARC's and diffusers'), ``info``,
``transfer-control`` (a ControlNet onto a fine-tuned base) and ``add-control`` (a new ControlNet)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..formats.detect import inspect_contents
from ..formats.diffusers import save_diffusers
from ..formats.ldm import save_ldm
from ..loading import load_base, load_controlnet, transfer_control
from .common import UsageError, check_output, output_folder

# ``convert --dtype``: the precision of the written weights.
WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    convert = commands.add_parser(
        "convert", help="convert a base model, ControlNet or T2I-Adapter between the LDM and diffusers layouts"
    )
    convert.add_argument("input", type=Path, help="LDM file (.safetensors/.ckpt/.pth) or diffusers folder/file")
    convert.add_argument("output", type=Path, help="LDM: a .safetensors file; diffusers: a folder (or .safetensors)")
    convert.add_argument("--to", choices=("ldm", "diffusers"), required=True, help="layout to write")
    convert.add_argument("--prediction", choices=("eps", "v"), help="name the prediction type of an SD 2.x model")
    convert.add_argument(
        "--dtype", choices=tuple(WEIGHT_DTYPES), default="fp32", help="precision of the written weights"
    )
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

    add_control = commands.add_parser(
        "add-control", help="a new ControlNet for a base model (the original tool_add_control)"
    )
    add_control.add_argument("base", type=Path, help="the base model (LDM file or diffusers folder)")
    add_control.add_argument("output", type=Path, help="a .safetensors file (control-only, 1.1-style layout)")
    add_control.add_argument("--overwrite", action="store_true")
    return {
        "convert": cmd_convert,
        "info": cmd_info,
        "transfer-control": cmd_transfer_control,
        "add-control": cmd_add_control,
    }


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    check_output(args.output, args.overwrite, [args.input])
    output_folder(args.output.parent)
    contents = inspect_contents(args.input)
    if contents.has_adapter:
        _convert_adapter(args)
        return
    model = load_base(args.input, prediction=args.prediction) if contents.has_base else None
    controlnet = load_controlnet(args.input, model.config if model else None) if contents.has_controlnet else None
    dtype = getattr(torch, WEIGHT_DTYPES[args.dtype])
    model = model.to(dtype) if model is not None else None
    controlnet = controlnet.to(dtype) if controlnet is not None else None
    if args.to == "ldm":
        save_ldm(args.output, model, controlnet)
    else:
        save_diffusers(args.output, model, controlnet)
    held = " + ".join(p for p, m in (("base model", model), ("ControlNet", controlnet)) if m is not None)
    print(f"wrote {held} to {args.output} ({args.to} layout, {args.dtype})")


def _convert_adapter(args: argparse.Namespace) -> None:
    """A T2I-Adapter: ``--to ldm`` writes TencentARC's layout (one safetensors file, as the original
    apps read), ``--to diffusers`` a diffusers T2IAdapter folder."""
    import torch

    from ..formats.diffusers import save_adapter_folder
    from ..formats.t2i_adapter import save_adapter_file
    from ..loading import load_adapter

    dtype = getattr(torch, WEIGHT_DTYPES[args.dtype])
    adapter = load_adapter(args.input, dtype=dtype)
    if args.to == "ldm":
        save_adapter_file(args.output, adapter.state_dict())
    else:
        save_adapter_folder(args.output, adapter.state_dict(), adapter.config)
    layout = "TencentARC" if args.to == "ldm" else "diffusers"
    print(f"wrote T2I-Adapter ({adapter.config.kind}) to {args.output} ({layout} layout, {args.dtype})")


def cmd_info(args: argparse.Namespace) -> None:
    contents = inspect_contents(args.input)
    print(f"{args.input}: {contents.format}")
    if contents.has_adapter:
        from ..loading import load_adapter

        config = load_adapter(args.input).config
        widths = list(config.channels)
        print(f"  T2I-Adapter: {config.kind}, {config.in_channels}-channel images, feature widths {widths}")
    if contents.has_base:
        model = load_base(args.input)
        print(f"  base model: {model.config.name} ({model.config.schedule.prediction}-prediction)")
    if contents.has_controlnet:
        controlnet = load_controlnet(args.input)
        pooling = ", global average pooling" if controlnet.config.global_average_pooling else ""
        residuals = len(controlnet.zero_convs) + 1
        print(f"  ControlNet: {residuals} residuals, context {controlnet.config.unet.context_dim}{pooling}")


def cmd_transfer_control(args: argparse.Namespace) -> None:
    check_output(args.output, args.overwrite, [args.controlnet, args.old_base, args.new_base])
    output_folder(args.output.parent)
    old, new = load_base(args.old_base), load_base(args.new_base)
    if old.config.unet != new.config.unet:
        raise UsageError("the old and the new base models are of different families")
    controlnet = load_controlnet(args.controlnet, old.config)
    moved = transfer_control(controlnet.state_dict(), old.unet.state_dict(), new.unet.state_dict())
    controlnet.load_state_dict(moved)
    save_ldm(args.output, controlnet=controlnet)
    print(f"wrote {args.output}: {args.controlnet.name} moved onto {args.new_base.name}")


def cmd_add_control(args: argparse.Namespace) -> None:
    from ..train import add_control

    check_output(args.output, args.overwrite, [args.base])
    output_folder(args.output.parent)
    path = add_control(args.base, args.output)
    print(f"ControlNet for {args.base} (encoder copied, zero convolutions at zero): {path}")

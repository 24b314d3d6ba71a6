"""The ``controlnet`` command line: parse input, call the core, format output. No model logic here."""

from __future__ import annotations

import argparse
import json
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

    _add_generate(commands)
    annotate = commands.add_parser("annotate", help="run one annotator on an image: controlnet annotate NAME IN OUT")
    annotate.add_argument("name", help="annotator name (canny, scribble, shuffle, ...); see --list")
    annotate.add_argument("input", type=Path)
    annotate.add_argument("output", type=Path, help="a .png file")
    annotate.add_argument("--resolution", type=int, default=512, help="resize the image first (short side, x64)")
    annotate.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="annotator parameter")
    annotate.add_argument("--overwrite", action="store_true")

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


ORIGINAL_ADDED_PROMPT = "best quality, extremely detailed"
ORIGINAL_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)


def _add_generate(commands) -> None:
    """``controlnet generate``: every option of the original canny app, same defaults (REFERENCE.md 5)."""
    g = commands.add_parser(
        "generate",
        help="generate images that follow a prompt and control images",
        description="Without --base the shipped default model is used. One unit comes from --image "
        "(with --annotator, --strength, --start, --end, --control-mode); more with repeated --control "
        "'image=PATH,annotator=canny,strength=1,start=0,end=1,mode=balanced,controlnet=0,resize=crop_and_resize'.",
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", type=Path, help="control image of the first unit")
    g.add_argument("--control", action="append", default=[], metavar="SPEC", help="another control unit (repeatable)")
    g.add_argument("--base", type=Path, help="base model: LDM file or diffusers folder")
    g.add_argument("--controlnet", type=Path, action="append", default=[], help="ControlNet file (repeatable)")
    g.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    g.add_argument("--seed", type=int, default=-1, help="0..2147483647; -1 picks a random seed (default)")
    g.add_argument("--steps", type=int, default=20, help="1..100 (default 20)")
    g.add_argument("--resolution", type=int, help="short side, 256..768 step 64 (default: the model's native size)")
    g.add_argument("--strength", type=float, default=1.0, help="control strength 0..2 (default 1.0)")
    g.add_argument("--num-samples", type=int, default=1, help="images, 1..12 (default 1)")
    g.add_argument("--guidance", type=float, default=9.0, help="guidance scale 0.1..30 (default 9.0)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0.0)")
    g.add_argument("--sampler", default="ddim", help="ddim (default), dpmpp_2m_karras, euler_a, unipc, ...")
    g.add_argument("--guess-mode", action="store_true", help="the original guess mode (= --control-mode control)")
    g.add_argument("--control-mode", default="balanced", choices=("balanced", "prompt", "control"))
    g.add_argument("--start", type=float, default=0.0, help="fraction of the steps where control starts")
    g.add_argument("--end", type=float, default=1.0, help="fraction of the steps where control ends")
    g.add_argument("--annotator", default="canny", help="annotator for --image (default canny; 'none': a ready map)")
    g.add_argument(
        "--resize-mode", default="crop_and_resize", choices=("just_resize", "crop_and_resize", "resize_and_fill")
    )
    g.add_argument("--added-prompt", default=ORIGINAL_ADDED_PROMPT)
    g.add_argument("--negative-prompt", default=ORIGINAL_NEGATIVE_PROMPT)
    g.add_argument("--low-threshold", type=int, default=100, help="Canny low threshold 1..255 (default 100)")
    g.add_argument("--high-threshold", type=int, default=200, help="Canny high threshold 1..255 (default 200)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, got {value}")


def _parse_unit(spec: str) -> dict:
    """'image=a.png,annotator=canny,strength=0.5' -> a dict of ControlUnit fields."""
    fields = {"image", "annotator", "strength", "start", "end", "mode", "controlnet", "resize"}
    unit: dict = {}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in fields:
            raise UsageError(f"bad --control item {part!r}; use KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        unit[key.strip()] = value.strip()
    if "image" not in unit:
        raise UsageError(f"--control {spec!r} needs image=PATH")
    return unit


def _units(args: argparse.Namespace):
    from .images import load_image
    from .pipeline import ControlUnit

    mode = "control" if args.guess_mode else args.control_mode
    specs = []
    if args.image is not None:
        specs.append(
            {
                "image": str(args.image),
                "annotator": args.annotator,
                "strength": args.strength,
                "start": args.start,
                "end": args.end,
                "mode": mode,
                "resize": args.resize_mode,
            }
        )
    specs += [_parse_unit(s) for s in args.control]
    units = []
    for spec in specs:
        annotator = spec.get("annotator", "none")
        params = (
            {"low_threshold": args.low_threshold, "high_threshold": args.high_threshold} if annotator == "canny" else {}
        )
        try:
            unit = ControlUnit(
                image=load_image(spec["image"]),
                annotator=annotator,
                annotator_params=params,
                controlnet=int(spec.get("controlnet", 0)),
                strength=float(spec.get("strength", 1.0)),
                start=float(spec.get("start", 0.0)),
                end=float(spec.get("end", 1.0)),
                mode=spec.get("mode", "balanced"),
                resize_mode=spec.get("resize", "crop_and_resize"),
            )
        except ValueError as error:
            raise UsageError(f"control unit {spec['image']}: {error}") from None
        _check_range("strength", unit.strength, 0.0, 2.0)
        units.append(unit)
    return units


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .images import save_png
    from .pipeline import Pipeline

    _check_range("--steps", args.steps, 1, 100)
    _check_range("--num-samples", args.num_samples, 1, 12)
    _check_range("--guidance", args.guidance, 0.1, 30.0)
    _check_range("--seed", args.seed, -1, 2147483647)
    _check_range("--low-threshold", args.low_threshold, 1, 255)
    _check_range("--high-threshold", args.high_threshold, 1, 255)
    if args.resolution is not None and (args.resolution % 64 or not 64 <= args.resolution <= 2048):
        raise UsageError(f"--resolution must be a multiple of 64 between 64 and 2048, got {args.resolution}")
    units = _units(args)
    out = _writable_folder(args.out)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.base is None:
        if args.controlnet:
            raise UsageError("--controlnet needs --base (the base model it was trained for)")
        pipe = _default_pipeline(args.device, dtype)
    else:
        pipe = Pipeline.from_files(args.base, args.controlnet, device=args.device, dtype=dtype)
    if units and not pipe.controlnets:
        raise UsageError("control images were given but no ControlNet: pass --controlnet PATH")
    try:
        result = pipe.generate(
            args.prompt,
            units,
            negative_prompt=args.negative_prompt,
            added_prompt=args.added_prompt,
            num_images=args.num_samples,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance,
            eta=args.eta,
            sampler=args.sampler,
            resolution=args.resolution,
            progress=_progress_bar(),
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    metadata = {"controlnet": json.dumps(result.settings, sort_keys=True)}
    for i, control_map in enumerate(result.control_maps):
        path = _free_name(out, f"control-{i}")
        save_png(path, control_map, metadata)
        print(f"detected map {i}: {path}")
    for image, seed in zip(result.images, result.seeds, strict=True):
        path = _free_name(out, f"{seed}")
        save_png(path, image, {**metadata, "seed": str(seed)})
        print(f"image (seed {seed}): {path}")


def _default_pipeline(device: str, dtype):
    from .demo import random_tiny_models
    from .pipeline import Pipeline

    print("no --base given: using the tiny configuration with seeded random weights (no trained model ships yet)")
    model, controlnet = random_tiny_models()
    return Pipeline(model, [controlnet], device=device, dtype=dtype)


def _writable_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{path}: cannot write there ({error.strerror or error})") from None
    return path


def _free_name(folder: Path, stem: str) -> Path:
    """``stem.png``, or ``stem-1.png``, ... : never overwrite an earlier result."""
    candidate, n = folder / f"{stem}.png", 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}.png"
    return candidate


def _progress_bar():
    def show(step: int, total: int) -> None:
        filled = round(30 * step / total)
        end = "\n" if step == total else ""
        print(f"\rsampling [{'#' * filled}{'.' * (30 - filled)}] {step}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def cmd_annotate(args: argparse.Namespace) -> None:
    from .annotators import run_annotator
    from .images import load_image, save_png

    _check_output(args.output, args.overwrite, [args.input])
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"bad --param {item!r}; use KEY=VALUE")
        params[key] = float(value) if value.replace(".", "", 1).lstrip("-").isdigit() else value
    try:
        result = run_annotator(args.name, load_image(args.input), args.resolution, **params)
    except ValueError as error:
        raise UsageError(str(error)) from None
    save_png(args.output, result, {"annotator": args.name, "params": json.dumps(params)})
    print(f"wrote {args.output} ({result.shape[1]}x{result.shape[0]})")


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
    "generate": cmd_generate,
    "annotate": cmd_annotate,
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

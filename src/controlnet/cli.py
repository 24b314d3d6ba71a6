"""The ``controlnet`` command line: parse input, call the core, format output. No model logic here.

Errors: a user mistake is reported in one line, ``controlnet COMMAND: error: ...``, never a
traceback. Exit status 2: a bad option or argument (as argparse); 1: a file that cannot be read or
written, a model that does not fit, or a value the core refuses; 130: interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, runtime
from .checkpoints import (
    inspect_contents,
    load_base,
    load_controlnet,
    save_diffusers,
    save_ldm,
    transfer_control,
)
from .files import NotWritable, writable_folder
from .metadata import format_number, image_text, map_text, model_records, quote, to_json
from .runtime import NonFiniteError
from .sampling.prompts import ORIGINAL_ADDED_PROMPT, ORIGINAL_NEGATIVE_PROMPT


class CommandError(Exception):
    """A failure the user can act on (e.g. an output that cannot be written): one line, exit 1."""

    exit_status = 1


class UsageError(CommandError):
    """A user mistake on the command line, reported in one line; exit 2 as argparse's own errors."""

    exit_status = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnet", description="ControlNet for Stable Diffusion: spatial control of text-to-image diffusion."
    )
    parser.add_argument("--version", action="version", version=f"controlnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the shipped model on the shipped example control images")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    demo.add_argument("--prompt", help="one prompt for every example (default: each example's own)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, mps")
    demo.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))

    convert = commands.add_parser(
        "convert", help="convert a base model and/or ControlNet between the LDM and diffusers layouts"
    )
    convert.add_argument("input", type=Path, help="LDM file (.safetensors/.ckpt/.pth) or diffusers folder/file")
    convert.add_argument("output", type=Path, help="LDM: a .safetensors file; diffusers: a folder (or .safetensors)")
    convert.add_argument("--to", choices=("ldm", "diffusers"), required=True, help="layout to write")
    convert.add_argument("--prediction", choices=("eps", "v"), help="name the prediction type of an SD 2.x model")
    convert.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="precision of the written weights"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")

    _add_generate(commands)
    _add_serve(commands)
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

    _add_data(commands)
    _add_train(commands)
    _add_eval(commands)
    add_control = commands.add_parser(
        "add-control", help="a new ControlNet for a base model (the original tool_add_control)"
    )
    add_control.add_argument("base", type=Path, help="the base model (LDM file or diffusers folder)")
    add_control.add_argument("output", type=Path, help="a .safetensors file (control-only, 1.1-style layout)")
    add_control.add_argument("--overwrite", action="store_true")
    return parser


_UNIT_FIELDS = ("image", "annotator", "strength", "start", "end", "mode", "controlnet", "resize")


def _add_generate(commands) -> None:
    """``controlnet generate``: every option of the original canny app, same defaults (REFERENCE.md 5)."""
    g = commands.add_parser(
        "generate",
        help="generate images that follow a prompt and control images",
        description="Without --base the shipped default model is used. One unit comes from --image "
        "(with --annotator, --strength, --start, --end, --control-mode); more with repeated --control "
        "'image=PATH,annotator=canny,strength=1,start=0,end=1,mode=balanced,controlnet=0,resize=crop_and_resize'. "
        "Each image is written as SEED.png with its settings, seed and model hashes in the PNG metadata "
        "('parameters' in AUTOMATIC1111's format, 'controlnet' as JSON); existing files are never overwritten.",
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
    g.add_argument(
        "--guess-mode", action="store_true", help="the original guess mode (= --control-mode control), for every unit"
    )
    g.add_argument(
        "--control-mode",
        default="balanced",
        choices=("balanced", "prompt", "control"),
        help="mode of every unit whose --control spec names no mode= (default balanced)",
    )
    g.add_argument("--start", type=float, default=0.0, help="fraction of the steps where control starts")
    g.add_argument("--end", type=float, default=1.0, help="fraction of the steps where control ends")
    g.add_argument("--annotator", default="canny", help="annotator for --image (default canny; 'none': a ready map)")
    g.add_argument(
        "--resize-mode", default="crop_and_resize", choices=("just_resize", "crop_and_resize", "resize_and_fill")
    )
    g.add_argument(
        "--added-prompt",
        help=f"appended to the prompt (default: '{ORIGINAL_ADDED_PROMPT}'; none for the shipped model)",
    )
    g.add_argument(
        "--negative-prompt",
        help="default: the original app's ('longbody, lowres, ...'); none for the shipped model, "
        "which never saw those words",
    )
    g.add_argument("--low-threshold", type=int, default=100, help="Canny low threshold 1..255 (default 100)")
    g.add_argument("--high-threshold", type=int, default=200, help="Canny high threshold 1..255 (default 200)")
    g.add_argument("--init-image", type=Path, help="img2img: start from this image")
    g.add_argument("--denoising-strength", type=float, default=0.75, help="img2img: 0 < s <= 1 (default 0.75)")
    g.add_argument("--mask", type=Path, help="inpainting (with --init-image): white = repaint")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto (default): bfloat16 on a CPU with native bf16, float16 on a GPU, else float32",
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the models: slower start, faster steps (many images)"
    )
    g.add_argument("--device", default="auto", help="auto (default: cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    # NaN fails both comparisons (argparse's float() accepts "nan" and "inf"): refused too.
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, got {value}")


# -- generate -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Unit:
    """A control unit as the command line gave it: the core's ControlUnit and the file it came from."""

    unit: Any  # pipeline.ControlUnit (imported lazily: torch is slow to import)
    path: Path
    sha256: str  # of the image file: the metadata proves which image a result followed


def _parse_unit(spec: str) -> dict[str, str]:
    """'image=a.png,annotator=canny,strength=0.5' -> {'image': 'a.png', 'annotator': 'canny', ...}."""
    unit: dict[str, str] = {}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in _UNIT_FIELDS:
            raise UsageError(
                f"bad --control item {part!r}; use KEY=VALUE with KEY one of {', '.join(sorted(_UNIT_FIELDS))}"
            )
        unit[key.strip()] = value.strip()
    if not unit.get("image"):
        raise UsageError(f"--control {spec!r} needs image=PATH")
    return unit


def _spec_number(spec: dict, key: str, default: float, kind: type) -> Any:
    """spec[key] as an int or float (kind), or a UsageError naming the item."""
    raw = spec.get(key, default)
    try:
        return kind(raw)
    except ValueError:
        raise UsageError(f"--control {key}={raw!r}: not {'an integer' if kind is int else 'a number'}") from None


def _units(args: argparse.Namespace) -> list[_Unit]:
    """The control units of --image and every --control, checked and with their images loaded.

    Everything is checked here, before a model is loaded: a typo costs no waiting."""
    from .annotators import RESIZE_MODES, get_annotator
    from .hashing import file_sha256
    from .pipeline import ControlUnit
    from .sampling.guidance import ControlMode

    default_mode = "control" if args.guess_mode else args.control_mode
    specs: list[dict] = []
    if args.image is not None:
        specs.append(
            {
                "image": str(args.image),
                "annotator": args.annotator,
                "strength": args.strength,
                "start": args.start,
                "end": args.end,
                "resize": args.resize_mode,
            }
        )
    specs += [_parse_unit(s) for s in args.control]
    units = []
    for spec in specs:
        where = f"control unit {spec['image']}"
        annotator_name = spec.get("annotator", "none")
        try:
            annotator = get_annotator(annotator_name)
            mode = ControlMode.parse(spec.get("mode", default_mode)).value
        except ValueError as error:
            raise UsageError(f"{where}: {error}") from None
        if annotator.inputs and not (set(annotator.inputs) <= {"mask"} and args.mask is not None):
            raise UsageError(
                f"{where}: annotator {annotator_name!r} needs {', '.join(annotator.inputs)}, "
                "which the command line cannot give"
            )
        resize_mode = spec.get("resize", "crop_and_resize")
        if resize_mode not in RESIZE_MODES:
            raise UsageError(f"{where}: unknown resize mode {resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        strength = _spec_number(spec, "strength", 1.0, float)
        start = _spec_number(spec, "start", 0.0, float)
        end = _spec_number(spec, "end", 1.0, float)
        controlnet = _spec_number(spec, "controlnet", 0, int)
        _check_range(f"{where}: strength", strength, 0.0, 2.0)
        if not 0.0 <= start <= end <= 1.0:
            raise UsageError(f"{where}: start and end must satisfy 0 <= start <= end <= 1, got {start} and {end}")
        if controlnet < 0:
            raise UsageError(f"{where}: controlnet index must be 0 or more, got {controlnet}")
        params = {"low_threshold": args.low_threshold, "high_threshold": args.high_threshold}
        image = _load_checked_image(spec["image"], f"control image {spec['image']}")
        unit = ControlUnit(
            image=image,
            annotator=annotator_name,
            annotator_params=params if annotator_name == "canny" else {},
            controlnet=controlnet,
            strength=strength,
            start=start,
            end=end,
            mode=mode,
            resize_mode=resize_mode,
        )
        try:
            sha256 = file_sha256(spec["image"])
        except OSError as error:  # read a moment ago, so unlikely: but never a traceback
            raise CommandError(f"cannot read {spec['image']}: {error.strerror or error}") from None
        units.append(_Unit(unit, Path(spec["image"]), sha256))
    return units


def _load_checked_image(path: str | Path, what: str) -> np.ndarray:
    """An input image read (ImageError: one line naming the file) and its shape checked as the
    core will (at most 4:1), before a model is loaded."""
    from .imaging.images import load_image
    from .imaging.resize import check_aspect_ratio

    image = load_image(path)
    try:
        check_aspect_ratio(image.shape[1], image.shape[0], what)
    except ValueError as error:
        raise CommandError(str(error)) from None
    return image


def _check_generate_options(args: argparse.Namespace) -> None:
    """The options that need no file: checked first, so a mistake is reported at once."""
    from .pipeline import GUIDANCE_RANGE, MAX_IMAGES, RESOLUTION_RANGE
    from .runtime import default_device
    from .sampling.samplers import get_sampler

    _check_range("--steps", args.steps, 1, 100)
    _check_range("--num-samples", args.num_samples, 1, MAX_IMAGES)
    _check_range("--guidance", args.guidance, *GUIDANCE_RANGE)
    _check_range("--seed", args.seed, -1, 2147483647)
    _check_range("--low-threshold", args.low_threshold, 1, 255)
    _check_range("--high-threshold", args.high_threshold, 1, 255)
    low, high = RESOLUTION_RANGE
    if args.resolution is not None and (args.resolution % 64 or not low <= args.resolution <= high):
        raise UsageError(f"--resolution must be a multiple of 64 between {low} and {high}, got {args.resolution}")
    try:
        get_sampler(args.sampler)
    except ValueError as error:
        raise UsageError(str(error)) from None
    # Above 1, DDIM's update takes the root of a negative number: NaN latents, black images.
    if not 0 <= args.eta <= 1 or (args.eta != 0 and args.sampler != "ddim"):
        raise UsageError(
            f"--eta must be between 0 and 1 and applies to the ddim sampler only, got {args.eta} for {args.sampler}"
        )
    if not 0 < args.denoising_strength <= 1:
        raise UsageError(f"--denoising-strength must be in (0, 1], got {args.denoising_strength}")
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    if args.guess_mode and args.control_mode not in ("balanced", "control"):
        raise UsageError(
            f"--guess-mode means --control-mode control; it contradicts --control-mode {args.control_mode}"
        )
    if args.controlnet and args.base is None:
        raise UsageError("--controlnet needs --base (the base model it was trained for)")
    original = args.base is not None  # the original app's prompt defaults; the shipped model knows none of those words
    if args.added_prompt is None:
        args.added_prompt = ORIGINAL_ADDED_PROMPT if original else ""
    if args.negative_prompt is None:
        args.negative_prompt = ORIGINAL_NEGATIVE_PROMPT if original else ""
    _check_prompts(args.prompt, args.added_prompt, args.negative_prompt)
    if args.device == "auto":
        args.device = str(default_device())
    _check_device(args.device)


def _check_prompts(prompt: str, added_prompt: str = "", negative_prompt: str = "") -> None:
    """The core's prompt limits (length, NUL, lone surrogates), before a model is loaded."""
    from .sampling.prompts import check_prompts

    try:
        check_prompts(prompt, added_prompt, negative_prompt, ("--prompt", "--added-prompt", "--negative-prompt"))
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_device(name: str) -> None:
    """A device the models can run on and this machine has (runtime.check_device)."""
    from .runtime import check_device

    try:
        check_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def cmd_generate(args: argparse.Namespace) -> None:
    from .imaging.images import load_image
    from .pipeline import Pipeline, viewable_map
    from .runtime import parse_dtype

    _check_generate_options(args)
    units = _units(args)
    out = _writable_folder(args.out)
    dtype = parse_dtype(args.dtype, args.device)
    base, controlnets = args.base, args.controlnet
    if base is None:
        base, controlnets = _shipped_model()
    init_image = None if args.init_image is None else _load_checked_image(args.init_image, "--init-image")
    mask = None if args.mask is None else load_image(args.mask)
    pipe = Pipeline.from_files(base, controlnets, device=args.device, dtype=dtype)
    models = model_records(base, controlnets)
    if args.compile:
        pipe.compile()
    if units and not pipe.controlnets:
        raise UsageError("control images were given but no ControlNet: pass --controlnet PATH")
    for item in units:
        if item.unit.controlnet >= len(pipe.controlnets):
            raise UsageError(
                f"control unit {item.path}: controlnet={item.unit.controlnet}, but only "
                f"{len(pipe.controlnets)} ControlNet(s) are loaded (indices from 0)"
            )
    progress = _ProgressBar()
    try:
        result = pipe.generate(
            args.prompt,
            [item.unit for item in units],
            negative_prompt=args.negative_prompt,
            added_prompt=args.added_prompt,
            num_images=args.num_samples,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance,
            eta=args.eta,
            sampler=args.sampler,
            resolution=args.resolution,
            init_image=init_image,
            denoising_strength=args.denoising_strength,
            mask=mask,
            progress=progress,
        )
    except NonFiniteError as error:  # the settings passed, the numbers overflowed: not an option's typo
        raise CommandError(_one_line(error)) from None
    except ValueError as error:  # the core refused a value: a user mistake, not a bug
        raise UsageError(_one_line(error)) from None
    finally:
        progress.close()

    record = _batch_record(args, pipe, result, units, models)
    for i, control_map in enumerate(result.control_maps):
        text = map_text(record, result.seeds, i)
        path = _save_new(out, f"{result.seeds[0]}-control-{i}", viewable_map(control_map), text)
        print(f"detected map {i}: {path}")
    for i, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        text = image_text(record, models, seed, i)
        path = _save_new(out, f"{seed}", image, text)
        print(f"image (seed {seed}): {path}")


def _shipped_model() -> tuple[Path, list[Path]]:
    """The shipped base model and its Canny ControlNet, used when no --base is given."""
    from . import shipped

    absent = shipped.missing()
    if absent:
        raise UsageError(f"no --base given and the shipped model file {absent[0]} is missing: reinstall the package")
    print(f"no --base given: using {shipped.NAME}")
    return shipped.base_path(), [shipped.canny_path()]


def _batch_record(args: argparse.Namespace, pipe, result, units: Sequence[_Unit], models: dict) -> dict:
    """Everything needed to reproduce the batch, JSON-ready. Starts from the pipeline's own
    settings (so what it adds later is kept) and states explicitly what the metadata relies on."""
    height, width = result.images[0].shape[:2]
    controls = []
    for item in units:
        control = {k: v for k, v in dataclasses.asdict(item.unit).items() if k != "image"}
        # The control image's name and hash: reproducing needs the same image, and the hash proves it.
        control.update(image=item.path.name, image_sha256=item.sha256)
        controls.append(control)
    return {
        **result.settings,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "added_prompt": args.added_prompt,
        "seed": result.seeds[0],
        "num_images": len(result.images),
        "steps": args.steps,
        "sampler": args.sampler,
        "guidance_scale": args.guidance,
        "eta": args.eta,
        "resolution": args.resolution or pipe.model.config.native_resolution,
        "width": int(width),
        "height": int(height),
        "controls": controls,
        "models": models,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "device": args.device,
        "version": __version__,
    }


def _writable_folder(path: Path) -> Path:
    """Create the output folder and prove it writable before any model is loaded."""
    try:
        return writable_folder(path)
    except NotWritable as error:
        raise CommandError(str(error)) from None


def _save_new(folder: Path, stem: str, image: np.ndarray, text: dict[str, str]) -> Path:
    """Write ``stem.png``, or ``stem-1.png``, ...: never overwrite an earlier result.

    The name is claimed by creating the file exclusively first, so two runs writing to the same
    folder at once cannot both pick it; save_png then replaces the empty claim atomically."""
    from .imaging.images import save_png

    n = 0
    while True:
        path = folder / (f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
        try:
            with open(path, "xb"):
                pass
            break
        except FileExistsError:
            n += 1
        except OSError as error:
            raise CommandError(f"{path}: cannot write ({error.strerror or error})") from None
    try:
        save_png(path, image, text)
    except BaseException as error:
        with contextlib.suppress(OSError):
            path.unlink()  # our empty claim, not someone's result
        if isinstance(error, OSError):
            raise CommandError(f"{path}: cannot write ({error.strerror or error})") from None
        raise
    return path


class _ProgressBar:
    """'sampling [####......] 3/20' on stderr, redrawn in place."""

    def __init__(self, label: str = "sampling") -> None:
        self.label = label
        self.open = False  # a line is drawn without its newline yet

    def __call__(self, step: int, total: int) -> None:
        filled = round(30 * step / total)
        end = "\n" if step == total else ""
        # sys.stderr looked up at each call: tests (and callers) may replace it.
        bar = f"[{'#' * filled}{'.' * (30 - filled)}]"
        print(f"\r{self.label} {bar} {step}/{total}", end=end, file=sys.stderr, flush=True)
        self.open = step != total

    def close(self) -> None:
        """End an unfinished line, so an error message after it starts on its own line."""
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


# -- annotate -----------------------------------------------------------------------------------


def cmd_annotate(args: argparse.Namespace) -> None:
    from .annotators import get_annotator, run_annotator
    from .imaging.images import load_image

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
    _check_range("--resolution", args.resolution, 64, 8192)
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"{args.output}: the output is written as PNG; name it .png")
    _check_output(args.output, args.overwrite, [args.input])
    image = load_image(args.input)
    try:
        result = run_annotator(args.name, image, args.resolution, **params)
    except ValueError as error:
        raise UsageError(_one_line(error)) from None
    record = {"annotator": args.name, "params": params, "resolution": args.resolution, "version": __version__}
    _save_over(args.output, result, {"controlnet": to_json(record)})
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
    from .annotators import ANNOTATORS

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


def _save_over(path: Path, image: np.ndarray, text: dict[str, str]) -> None:
    """save_png (atomic) with a failure to write reported in one line."""
    from .imaging.images import save_png

    try:
        save_png(path, image, text)
    except OSError as error:
        raise CommandError(f"{path}: cannot write ({error.strerror or error})") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _os_error(error: OSError) -> str:
    """'PATH: reason' for an OSError (its own text also holds the errno: '[Errno 28] No space ...')."""
    reason = error.strerror or _one_line(error)
    return f"{error.filename}: {reason}" if error.filename else f"cannot read or write a file: {reason}"


# -- data ---------------------------------------------------------------------------------------


def _add_data(commands) -> None:
    """``controlnet data TASK``: write a synthetic training set in the fill50k layout."""
    data = commands.add_parser(
        "data",
        help="write a synthetic training set: controlnet data fill50k|scenes --out DIR --count N",
        description="Write COUNT samples of a synthetic task to a folder in the fill50k layout (prompt.json, "
        "source/, target/), which training reads. The same --seed always gives the same samples.",
    )
    tasks = data.add_subparsers(dest="task", required=True, metavar="TASK")
    about = {
        "fill50k": "the original tutorial's task: circle outline -> filled circle, '<colour> circle with "
        "<colour> background' (default size 512)",
        "scenes": "1 to 3 coloured shapes on a background, captioned from the content, Canny edges as "
        "the condition, shape metadata in prompt.json (default size 64)",
    }
    for task, help_text in about.items():
        t = tasks.add_parser(task, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        t.add_argument("--out", type=Path, required=True, help="output folder (must not hold a dataset already)")
        t.add_argument("--count", type=int, required=True, help="number of samples")
        t.add_argument("--size", type=int, help="image side in pixels, a multiple of 8 in 32..1024")
        t.add_argument("--seed", type=int, default=0, help="0 or more (default 0)")


def cmd_data(args: argparse.Namespace) -> None:
    from .datasets.synthetic import DEFAULT_SIZES, check_output, check_size, write_dataset

    size = DEFAULT_SIZES[args.task] if args.size is None else args.size
    try:
        check_size(size)
    except ValueError as error:
        raise UsageError(f"--size: {error}") from None
    _check_range("--count", args.count, 1, 100_000_000)
    _check_range("--seed", args.seed, 0, 2**63 - 1)
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
        write_dataset(args.out, args.task, args.count, size=size, seed=args.seed, progress=progress)
    except OSError as error:
        raise CommandError(f"{args.out}: cannot write ({error.strerror or error})") from None
    finally:
        if drawn:
            print(file=sys.stderr, flush=True)  # end the progress line before any other message
    print(f"wrote {args.count} {args.task} samples ({size}x{size}, seed {args.seed}) to {args.out}")


# -- convert, info, transfer-control, demo -------------------------------------------------------


def _check_output(path: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    output = path.resolve()
    # An input that is the output, or lies inside an output folder that would be replaced.
    if any(output == i.resolve() or output in i.resolve().parents for i in inputs):
        raise UsageError(f"{path}: the output would overwrite an input; choose another path")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: already exists; pass --overwrite to replace it")


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    _check_output(args.output, args.overwrite, [args.input])
    _writable_folder(args.output.parent)
    contents = inspect_contents(args.input)
    model = load_base(args.input, prediction=args.prediction) if contents.has_base else None
    controlnet = load_controlnet(args.input, model.config if model else None) if contents.has_controlnet else None
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = model.to(dtype) if model is not None else None
    controlnet = controlnet.to(dtype) if controlnet is not None else None
    if args.to == "ldm":
        save_ldm(args.output, model, controlnet)
    else:
        save_diffusers(args.output, model, controlnet)
    held = " + ".join(p for p, m in (("base model", model), ("ControlNet", controlnet)) if m is not None)
    print(f"wrote {held} to {args.output} ({args.to} layout, {args.dtype})")


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
    _writable_folder(args.output.parent)
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

    _check_range("--steps", args.steps, 1, 100)
    if args.prompt is not None:
        _check_prompts(args.prompt)
    if args.device != "auto":
        _check_device(args.device)
    _writable_folder(args.out)
    try:
        run_demo(args.out, args.steps, args.prompt, args.device, args.dtype)
    except NonFiniteError as error:
        raise CommandError(_one_line(error)) from None


# -- serve ----------------------------------------------------------------------------------------


def _add_serve(commands) -> None:
    s = commands.add_parser(
        "serve",
        help="the web UI and a JSON API (Gradio), on 127.0.0.1:7860 by default",
        description="Serve the web UI and the JSON API (POST /api/generate). The shipped model by default; "
        "--models DIR offers the base models and ControlNets found in DIR (and nothing outside it).",
    )
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from other machines")
    s.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    s.add_argument("--models", type=Path, help="a folder of model files to offer in the model picker")
    s.add_argument("--base", type=Path, help="serve this base model (with --controlnet) instead of the shipped one")
    s.add_argument("--controlnet", type=Path, action="append", default=[], help="ControlNet file (repeatable)")
    s.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, mps")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest uploaded image (default 10 MB)")
    s.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest uploaded image in pixels")
    s.add_argument("--max-queue", type=int, default=8, help="jobs waiting or running before refusing (default 8)")
    s.add_argument(
        "--keep-minutes",
        type=float,
        default=60.0,
        help="how long the page's uploads and results stay downloadable (default 60); all go when the server stops",
    )
    s.add_argument(
        "--max-stored-mb", type=float, default=2048.0, help="disk for the page's uploads and results (default 2048)"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401 -- only to say clearly that the extra is missing
    except ImportError:
        raise UsageError("controlnet serve needs Gradio: pip install 'controlnet[ui]'") from None
    from .runtime import default_device

    _check_range("--port", args.port, 1, 65535)
    _check_range("--max-upload-mb", args.max_upload_mb, 0.01, 1024)
    _check_range("--max-pixels", args.max_pixels, 64 * 64, 2**31)
    _check_range("--max-queue", args.max_queue, 1, 10_000)
    _check_range("--keep-minutes", args.keep_minutes, 1, 7 * 24 * 60)
    _check_range("--max-stored-mb", args.max_stored_mb, 1, 2**20)
    auth = None
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not colon or not user or not password:
            raise UsageError("--auth must be USER:PASS, both non-empty")
        auth = (user, password)
    if args.models is not None and not args.models.is_dir():
        raise UsageError(f"--models {args.models}: no such folder")
    if args.controlnet and args.base is None:
        raise UsageError("--controlnet needs --base (the base model it was trained for)")
    for path in [args.base, *args.controlnet]:
        if path is not None and not path.exists():
            raise UsageError(f"{path}: no such file or folder")
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen:
        where = "with --auth" if auth else "WITHOUT a password (add --auth USER:PASS)"
        print(f"warning: --listen serves on every network interface, {where}", file=sys.stderr)
    from .serve.files import Retention
    from .serve.service import Limits, ModelUnavailable
    from .serve.web import serve

    device = str(default_device()) if args.device == "auto" else args.device
    _check_device(device)
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_queue)
    retention = Retention(max_bytes=int(args.max_stored_mb * 2**20), max_age_s=args.keep_minutes * 60)
    try:
        serve(args.models, host, args.port, auth, limits, device, args.dtype, args.base, args.controlnet, retention)
    except ModelUnavailable as error:  # the first model is loaded before serving
        raise CommandError(error.detail) from None


# -- train ----------------------------------------------------------------------------------------


def _add_train(commands) -> None:
    t = commands.add_parser(
        "train",
        help="train a ControlNet on a frozen base (or a small base model from scratch)",
        description="Train a ControlNet on a frozen base model (task controlnet), or a small VAE (task vae) "
        "or UNet + text encoder (task base) from scratch. Run with torchrun for several processes: "
        "torchrun --nproc-per-node N -m controlnet train ...",
    )
    t.add_argument("--data", required=True, help="a fill50k-layout folder (prompt.json) or a diffusers one")
    t.add_argument("--out", required=True, help="the run's folder: checkpoints, logs, validation, exports")
    t.add_argument("--base", help="the base model (controlnet task); the trained VAE's file (base task)")
    t.add_argument("--task", default="controlnet", choices=("controlnet", "base", "vae"))
    t.add_argument("--model-config", help="base/vae tasks: the preset to build from scratch (e.g. tiny)")
    t.add_argument("--controlnet", help="controlnet task: start from this ControlNet, not the base's encoder")
    t.add_argument(
        "--control-init",
        default="zero",
        choices=("zero", "gaussian"),
        help="a new ControlNet's zero convolutions: zero (the paper) or gaussian (its ablation)",
    )
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=4, help="per process and micro-step (default 4)")
    t.add_argument("--gradient-accumulation", type=int, default=1)
    t.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    t.add_argument("--unlock-decoder", action="store_true", help="also train the UNet decoder (sd_locked=False)")
    t.add_argument("--decoder-learning-rate", type=float, help="with --unlock-decoder (default: lr / 10)")
    t.add_argument("--proportion-empty-prompts", type=float, default=0.5, help="prompt drop rate (default 0.5)")
    t.add_argument("--only-mid-control", action="store_true")
    t.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--ema-decay", type=float, help="keep an EMA of the weights (e.g. 0.999); exported")
    t.add_argument("--lr-schedule", default="constant", choices=("constant", "linear", "cosine"))
    t.add_argument("--lr-warmup-steps", type=int, default=0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--keep-checkpoints", type=int, default=3)
    t.add_argument("--validate-every", type=int, default=0, help="steps between validations (0: at the end)")
    t.add_argument("--validation-count", type=int, default=4)
    t.add_argument("--validation-steps", type=int, default=20)
    t.add_argument("--resume", help="'latest' or a checkpoint folder")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resolution", type=int, help="training image size (default: the model's native size)")
    t.add_argument("--no-cache", action="store_true", help="encode latents and prompts at every step")
    t.add_argument("--kl-weight", type=float, default=1e-6, help="vae task: weight of the KL term")
    t.add_argument(
        "--gradient-loss-weight", type=float, default=1.0, help="vae task: weight of the image-gradient L1 term"
    )
    t.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop if more samples are unreadable")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--device", default="cpu", help="cpu or cuda (torchrun: each process its local GPU)")
    t.add_argument(
        "--strategy",
        default="ddp",
        choices=("ddp", "fsdp"),
        help="several processes: replicate or shard the ControlNet",
    )


def cmd_train(args: argparse.Namespace) -> None:
    from .training import TrainConfig, TrainingError, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        base=args.base,
        task=args.task,
        model_config=args.model_config,
        controlnet=args.controlnet,
        control_init=args.control_init,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        learning_rate=args.learning_rate,
        unlock_decoder=args.unlock_decoder,
        decoder_learning_rate=args.decoder_learning_rate,
        proportion_empty_prompts=args.proportion_empty_prompts,
        only_mid_control=args.only_mid_control,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        ema_decay=args.ema_decay,
        lr_schedule=args.lr_schedule,
        lr_warmup_steps=args.lr_warmup_steps,
        max_grad_norm=None if args.max_grad_norm == 0 else args.max_grad_norm,  # 0: no clipping
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        validation_count=args.validation_count,
        validation_steps=args.validation_steps,
        resume=args.resume,
        seed=args.seed,
        resolution=args.resolution,
        cache=not args.no_cache,
        max_bad_fraction=args.max_bad_fraction,
        kl_weight=args.kl_weight,
        gradient_loss_weight=args.gradient_loss_weight,
        log_every=args.log_every,
        device=args.device,
        strategy=args.strategy,
    )
    try:
        config.check()  # every option, before a model or the data is read
    except TrainingError as error:
        raise UsageError(str(error)) from None
    for name in ("data", "base", "controlnet"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise UsageError(f"--{name} {value}: no such file or folder")
    train(config, log=lambda message: print(message, flush=True))


# -- eval -----------------------------------------------------------------------------------------


def _add_eval(commands) -> None:
    e = commands.add_parser(
        "eval",
        help="measure controllability: generate from (condition, prompt) pairs and score the images",
        description="Generate from the first COUNT (condition, prompt) pairs of a dataset folder (fill50k or "
        "diffusers layout) with fixed seeds and report the ControlNet++ metrics: Canny edge F1 of the images "
        "against their condition, SSIM of the edge maps, and, for 'controlnet data scenes' data, whether the "
        "named colours are where the shapes are. Writes results.json and grid.png to --out.",
    )
    e.add_argument("--data", type=Path, required=True, help="a dataset folder (prompt.json or metadata.jsonl)")
    e.add_argument("--out", type=Path, required=True, help="folder for results.json and grid.png")
    e.add_argument("--base", type=Path, help="base model (default: the default model)")
    e.add_argument("--controlnet", type=Path, help="ControlNet (with --base)")
    e.add_argument("--no-control", action="store_true", help="the base model alone, from the prompts")
    e.add_argument("--count", type=int, default=50, help="conditions to evaluate (default 50)")
    e.add_argument("--images-per-condition", type=int, default=4, help="default 4 (the ControlNet++ protocol)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=7.5, help="default 7.5 (the ControlNet++ protocol)")
    e.add_argument("--sampler", default="ddim")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--resolution", type=int, help="default: the model's native resolution")
    e.add_argument("--low-threshold", type=int, default=100)
    e.add_argument("--high-threshold", type=int, default=200)
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))


def _check_eval_options(args: argparse.Namespace) -> None:
    """Every option of eval that needs no model, checked before one is loaded."""
    from .evaluation import check_settings

    if args.count < 1:
        raise UsageError(f"--count must be at least 1, got {args.count}")
    try:  # the other numbers: the evaluation's own check
        check_settings(
            images_per_condition=args.images_per_condition,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            resolution=args.resolution,
            sampler=args.sampler,
            low_threshold=args.low_threshold,
            high_threshold=args.high_threshold,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not args.data.exists():
        raise UsageError(f"--data {args.data}: no such folder")
    if args.controlnet and args.base is None:
        raise UsageError("--controlnet needs --base (the base model it was trained for)")
    if args.controlnet and args.no_control:
        raise UsageError("--no-control evaluates the base alone; it contradicts --controlnet")
    for path in (args.base, args.controlnet):
        if path is not None and not path.exists():
            raise UsageError(f"{path}: no such file or folder")


def cmd_eval(args: argparse.Namespace) -> None:
    from .datasets.folders import read_records
    from .evaluation import evaluate, format_summary
    from .pipeline import Pipeline

    _check_eval_options(args)
    read_records(args.data)  # DatasetError (one line) for a folder without a readable listing
    _writable_folder(args.out)
    base, controlnets = args.base, [args.controlnet] if args.controlnet else []
    if base is None:
        base, controlnets = _shipped_model()
    pipe = Pipeline.from_files(base, controlnets, dtype=args.dtype)
    use_control = not args.no_control
    if use_control and not pipe.controlnets:
        raise UsageError("no ControlNet to evaluate: pass --controlnet PATH, or --no-control for the base alone")
    progress = _ProgressBar("conditions")
    try:
        results = evaluate(
            pipe,
            args.data,
            args.out,
            count=args.count,
            images_per_condition=args.images_per_condition,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            use_control=use_control,
            resolution=args.resolution,
            sampler=args.sampler,
            low_threshold=args.low_threshold,
            high_threshold=args.high_threshold,
            progress=progress,
        )
    except NonFiniteError as error:  # NaN images: nothing is scored, results.json is not written
        raise CommandError(_one_line(error)) from None
    finally:
        progress.close()
    print(format_summary(results))
    print(f"results: {args.out / 'results.json'}; samples: {args.out / 'grid.png'}")


def cmd_add_control(args: argparse.Namespace) -> None:
    from .training import add_control

    _check_output(args.output, args.overwrite, [args.base])
    _writable_folder(args.output.parent)
    path = add_control(args.base, args.output)
    print(f"ControlNet for {args.base} (encoder copied, zero convolutions at zero): {path}")


_COMMANDS = {
    "demo": cmd_demo,
    "generate": cmd_generate,
    "serve": cmd_serve,
    "annotate": cmd_annotate,
    "convert": cmd_convert,
    "info": cmd_info,
    "transfer-control": cmd_transfer_control,
    "data": cmd_data,
    "train": cmd_train,
    "add-control": cmd_add_control,
    "eval": cmd_eval,
}


# Commands whose process runs one job of many model steps: malloc keeps freed memory for the next
# step instead of page-faulting it back from the kernel (runtime.keep_freed_memory). Not ``serve``,
# whose memory between requests goes back to the system.
_MODEL_JOBS = {"demo", "generate", "train", "eval"}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in _MODEL_JOBS:
        runtime.keep_freed_memory()
    # torch warns that it "might not support" the protocol of every plain-pickle checkpoint (old
    # .ckpt files); loading is safe either way, and an error is reported in one line of its own.
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    try:
        _COMMANDS[args.command](args)
    except CommandError as error:
        print(f"controlnet {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return error.exit_status
    except ValueError as error:
        # The core's way of refusing input (CheckpointError and ImageError are ValueErrors too):
        # a bad file or value from the user, so one line, not a traceback.
        print(f"controlnet {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except OSError as error:
        # A file the commands check early can still fail later: a disk that fills up while the
        # results are written, a folder removed meanwhile. The writers leave no half file behind.
        print(f"controlnet {args.command}: error: {_os_error(error)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            f"controlnet {args.command}: error: out of memory; try a smaller --resolution, batch or model",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"controlnet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``controlnet generate``: every option of the original canny app with its defaults,
control units from ``--image`` and ``--control``, and PNGs that carry their settings."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..metadata import image_text, map_text, model_records
from ..runtime import NonFiniteError
from ..sampling.prompts import ORIGINAL_ADDED_PROMPT, ORIGINAL_NEGATIVE_PROMPT
from .common import (
    CommandError,
    ProgressBar,
    UsageError,
    check_device,
    check_prompts,
    check_range,
    one_line,
    output_folder,
    shipped_model,
)

_UNIT_FIELDS = ("image", "annotator", "strength", "start", "end", "mode", "controlnet", "resize")


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
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
    return {"generate": cmd_generate}


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
    from ..annotators import RESIZE_MODES, get_annotator
    from ..hashing import file_sha256
    from ..pipeline import ControlUnit
    from ..sampling.guidance import ControlMode

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
        check_range(f"{where}: strength", strength, 0.0, 2.0)
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
    from ..imaging.images import load_image
    from ..imaging.resize import check_aspect_ratio

    image = load_image(path)
    try:
        check_aspect_ratio(image.shape[1], image.shape[0], what)
    except ValueError as error:
        raise CommandError(str(error)) from None
    return image


def _check_generate_options(args: argparse.Namespace) -> None:
    """The options that need no file: checked first, so a mistake is reported at once."""
    from ..pipeline import GUIDANCE_RANGE, MAX_IMAGES, RESOLUTION_RANGE
    from ..runtime import default_device
    from ..sampling.samplers import get_sampler

    check_range("--steps", args.steps, 1, 100)
    check_range("--num-samples", args.num_samples, 1, MAX_IMAGES)
    check_range("--guidance", args.guidance, *GUIDANCE_RANGE)
    check_range("--seed", args.seed, -1, 2147483647)
    check_range("--low-threshold", args.low_threshold, 1, 255)
    check_range("--high-threshold", args.high_threshold, 1, 255)
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
    check_prompts(args.prompt, args.added_prompt, args.negative_prompt)
    if args.device == "auto":
        args.device = str(default_device())
    check_device(args.device)


def cmd_generate(args: argparse.Namespace) -> None:
    from ..imaging.images import load_image
    from ..pipeline import Pipeline, viewable_map
    from ..runtime import parse_dtype

    _check_generate_options(args)
    units = _units(args)
    out = output_folder(args.out)
    dtype = parse_dtype(args.dtype, args.device)
    base, controlnets = args.base, args.controlnet
    if base is None:
        base, controlnets = shipped_model()
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
    progress = ProgressBar()
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
        raise CommandError(one_line(error)) from None
    except ValueError as error:  # the core refused a value: a user mistake, not a bug
        raise UsageError(one_line(error)) from None
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


def _save_new(folder: Path, stem: str, image: np.ndarray, text: dict[str, str]) -> Path:
    """Write ``stem.png``, or ``stem-1.png``, ...: never overwrite an earlier result.

    The name is claimed by creating the file exclusively first, so two runs writing to the same
    folder at once cannot both pick it; save_png then replaces the empty claim atomically."""
    from ..imaging.images import save_png

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

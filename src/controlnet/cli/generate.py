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

from .. import shipped
from ..annotators import get_annotator
from ..lora import prompt_loras
from ..metadata import image_text, map_text, model_records
from ..runtime import NonFiniteError
from ..sampling.prompts import ORIGINAL_ADDED_PROMPT, ORIGINAL_NEGATIVE_PROMPT
from ..settings import (
    ADAPTER_MODE,
    AUTO_UNION_TYPE,
    GENERATION,
    LORAS,
    UNIT,
    UNIT_MODELS,
    check_generation,
    check_guess_mode,
    check_loras,
    check_unit,
    unit_mode,
    unit_model,
)
from .common import (
    CommandError,
    ProgressBar,
    UsageError,
    add_annotators_dir,
    add_setting,
    annotator_params,
    check_device,
    check_prompts,
    checked,
    model_files,
    one_line,
    output_folder,
)

_UNIT_FIELDS = (
    "image",
    "annotator",
    "strength",
    "start",
    "end",
    "mode",
    "controlnet",
    "adapter",
    "resize",
    "control_type",
)


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    """``controlnet generate``: every option of the original canny app, same defaults (settings.py)."""
    g = commands.add_parser(
        "generate",
        help="generate images that follow a prompt and control images",
        description="Without --base the shipped default model is used, with the shipped ControlNets named by "
        "--controlnet (and --adapter), or all of them. One unit comes from --image "
        "(with --annotator, --strength, --start, --end, --control-mode); more with repeated --control "
        "'image=PATH,annotator=canny,strength=1,start=0,end=1,mode=balanced,controlnet=0,resize=crop_and_resize'; "
        "a unit of a union ControlNet (xinsir's) takes its annotator's control type, or control_type=depth (...); "
        "a unit with adapter=N uses the T2I-Adapter N of --adapter instead of a ControlNet. A unit naming "
        "neither uses ControlNet 0, or T2I-Adapter 0 when no ControlNet is given (--base with --adapter only). "
        "A unit's controlnet= (adapter=) is an index into the --controlnet (--adapter) list, or a shipped "
        "model's name: one already in the list is used, any other is loaded after the list's. "
        "Each image is written as SEED.png with its settings, seed and model hashes in the PNG metadata "
        "('parameters' in AUTOMATIC1111's format, 'controlnet' as JSON); existing files are never overwritten.",
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", type=Path, help="control image of the first unit")
    g.add_argument("--control", action="append", default=[], metavar="SPEC", help="another control unit (repeatable)")
    g.add_argument("--base", type=Path, help="base model: LDM file or diffusers folder")
    g.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH|NAME",
        help=f"ControlNet file (with --base), or a shipped one's name ({_shipped('controlnet')}); repeatable",
    )
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH|NAME",
        help="T2I-Adapter file or diffusers folder (with --base), or a shipped one's name "
        f"({_shipped('adapter')}); repeatable: used by a unit naming adapter=N",
    )
    g.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    names = ("seed", "steps", "resolution", "num_images", "guidance_scale", "eta", "sampler", "guess_mode", "decoder")
    for name in names:
        add_setting(g, GENERATION[name])
    # The first unit's settings (--image); a --control spec names its own, and a ControlNet spec
    # takes --control-mode as its mode unless it names one.
    add_setting(g, UNIT["annotator"], "annotator for --image")
    for name in ("strength", "start", "end", "resize_mode"):
        add_setting(g, UNIT[name])
    add_setting(g, UNIT["control_type"], "--image's union control type: " + UNIT["control_type"].help)
    add_setting(
        g,
        UNIT["mode"],
        "mode of the ControlNet units: --image's and every --control spec's that names no mode= "
        "(a T2I-Adapter unit's is balanced: adapters have no control mode here)",
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
    for param in get_annotator("canny").params:  # the canny annotator's own definition of its parameters
        g.add_argument(
            "--" + param.name.replace("_", "-"),
            type=int,
            default=param.default,
            help=f"Canny: {param.help} ({param.minimum:g}..{param.maximum:g}; default {param.default})",
        )
    g.add_argument(
        "--annotator-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of --image's annotator (repeatable; see controlnet annotate --list); "
        "a --control spec gives its annotator's as KEY=VALUE items",
    )
    add_annotators_dir(g)
    g.add_argument(
        "--lora",
        dest="loras",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help=f"{LORAS.help} (kohya/AUTOMATIC1111 or diffusers/PEFT layout; docs/lora.md)",
    )
    g.add_argument(
        "--lora-dir",
        type=Path,
        help="the folder where the prompt's <lora:NAME:WEIGHT> tags are found (a tag without it is refused)",
    )
    g.add_argument(
        "--taesd",
        action="append",
        default=[],
        metavar="PATH",
        help="TAESD's decoder file (taesd_decoder.pth; again with taesd_encoder.pth) or a diffusers "
        "AutoencoderTiny folder, for --decoder taesd (the TAESD of the base's family: taesdxl_* for SDXL)",
    )
    g.add_argument("--init-image", type=Path, help="img2img: start from this image")
    add_setting(g, GENERATION["denoising_strength"])
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


def _shipped(kind: str) -> str:
    """The shipped models of ``kind`` for --help: 'canny: Canny edges, white on black, ...'."""
    listed = [f"{c.name}: {c.description}" for c in shipped.controls(kind)]
    return "; ".join(listed) or "none ships"


@dataclasses.dataclass
class _Unit:
    """A control unit as the command line gave it: the core's ControlUnit and the file it came from."""

    unit: Any  # pipeline.ControlUnit (imported lazily: torch is slow to import)
    path: Path
    sha256: str  # of the image file: the metadata proves which image a result followed


def _parse_unit(spec: str) -> dict[str, str]:
    """'image=a.png,annotator=canny,strength=0.5' -> {'image': 'a.png', 'annotator': 'canny', ...}.
    Keys other than the unit's own are the annotator's parameters (checked against it later)."""
    unit: dict[str, str] = {}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(
                f"bad --control item {part!r}; use KEY=VALUE with KEY one of {', '.join(sorted(_UNIT_FIELDS))} "
                "or a parameter of the unit's annotator"
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


def _spec_model(spec: dict, kind: str, files: list[Path]) -> int | None:
    """A --control spec's ``controlnet=`` or ``adapter=`` (``kind``), None when not named: an index
    into ``files`` (--controlnet's or --adapter's), or a shipped model's name: its index in
    ``files``, where it is appended when absent (loaded once, however many units name it)."""
    raw = spec.get(kind)
    if raw is None:
        return None
    if _is_index(raw):
        return int(raw)
    try:
        index = shipped.find(raw, kind, files)
    except ValueError as error:
        raise UsageError(f"--control {kind}={raw!r}: not an index, and {error}") from None
    if index is None:
        files.append(shipped.path(raw, kind))
        index = len(files) - 1
    return index


def _units(args: argparse.Namespace, controlnets: list[Path], adapters: list[Path]) -> list[_Unit]:
    """The control units of --image and every --control, checked and with their images loaded.
    ``controlnets`` and ``adapters``: the files the model will load (--controlnet's and --adapter's,
    or the shipped ones); a unit naming a shipped model that is not among them appends it, after
    them, so that the indices units give keep meaning those lists.

    Everything is checked here, before a model is loaded: a typo costs no waiting."""
    from ..pipeline import UNION_TYPES, ControlUnit

    specs: list[dict] = []
    if args.image is not None:
        first = {"image": str(args.image), "annotator": args.annotator, "resize": args.resize_mode}
        first["control_type"] = args.control_type
        specs.append(first | {"strength": args.strength, "start": args.start, "end": args.end})
    elif args.annotator_param:
        raise UsageError("--annotator-param is for the unit of --image, and no --image was given")
    specs += [_parse_unit(s) for s in args.control]
    files = {"controlnet": controlnets, "adapter": adapters}
    given = {kind: len(files[kind]) for kind in UNIT_MODELS}  # what indices refer to: names come after
    naming = any(_names_model(spec) for spec in specs)
    units = []
    for spec in specs:
        where = f"control unit {spec['image']}"
        # The model it names (None: not named), then the one it uses (settings.unit_model).
        named = {kind: _spec_model(spec, kind, files[kind]) for kind in UNIT_MODELS}
        kind, index = unit_model(named["controlnet"], named["adapter"], given["controlnet"], given["adapter"])
        values = {
            "annotator": spec.get("annotator", "none"),
            "strength": _spec_number(spec, "strength", UNIT["strength"].default, float),
            "start": _spec_number(spec, "start", UNIT["start"].default, float),
            "end": _spec_number(spec, "end", UNIT["end"].default, float),
            "mode": spec.get("mode", ADAPTER_MODE if kind == "adapter" else args.mode),
            "resize_mode": spec.get("resize", UNIT["resize_mode"].default),
            "control_type": spec.get("control_type", UNIT["control_type"].default),
        }
        checked(check_unit, values | named | {kind: index}, where)
        # No model at all: said once the base loads (it may be no base). A unit using its model by
        # index (or by default) uses one of the lists given, never one that a name appended.
        if (any(given.values()) or naming) and not _names_model(spec):
            if not any(given.values()):
                raise UsageError(f"{where}: names no model by name, and no --controlnet (or --adapter) is given")
            _check_loaded(where, kind, index, given["controlnet"], given["adapter"])
        values["mode"] = unit_mode(values["mode"], args.guess_mode, kind == "adapter")
        values[kind] = index
        first_unit = spec is specs[0] and args.image is not None
        if Path(spec["image"]).suffix.lower() == ".json":  # a pose, drawn into the unit's map
            image = _pose_map(spec, values["annotator"], args, first_unit)
            values["annotator"] = "none"
            if values["control_type"] == AUTO_UNION_TYPE:  # an openpose map, for a union ControlNet
                values["control_type"] = UNION_TYPES["openpose_json"]
            units.append(_Unit(ControlUnit(image=image, **values), Path(spec["image"]), _sha256(spec["image"])))
            continue
        annotator = get_annotator(values["annotator"])
        if annotator.inputs and not (set(annotator.inputs) <= {"mask"} and args.mask is not None):
            raise UsageError(
                f"{where}: annotator {annotator.name!r} needs {', '.join(annotator.inputs)}, "
                "which the command line cannot give"
            )
        params = _unit_params(annotator, spec, args, first_unit)
        annotator.check_weights(args.annotators_dir)  # missing files, before a model is loaded: where to get them
        image = _load_checked_image(spec["image"], f"control image {spec['image']}")
        unit = ControlUnit(image=image, annotator_params=params, **values)
        units.append(_Unit(unit, Path(spec["image"]), _sha256(spec["image"])))
    _check_modes(args, [item.unit.adapter is not None for item in units])
    return units


def _names_model(spec: dict) -> bool:
    """Whether a spec names its model by a shipped model's name."""
    return any(kind in spec and not _is_index(spec[kind]) for kind in UNIT_MODELS)


def _is_index(value: str) -> bool:
    """Whether a spec's controlnet= or adapter= is an index (else a shipped model's name)."""
    try:
        int(value)
    except ValueError:
        return False
    return True


def _check_loaded(where: str, kind: str, index: int, controlnets: int, adapters: int) -> None:
    """The unit's ControlNet or T2I-Adapter is among those given (indices from 0)."""
    if kind == "controlnet" and index >= controlnets:
        raise UsageError(
            f"{where}: controlnet={index}, but only {controlnets} ControlNet(s) are loaded (indices from 0)"
        )
    if kind == "adapter" and index >= adapters:
        raise UsageError(
            f"{where}: adapter={index}, but only {adapters} T2I-Adapter(s) are loaded "
            "(each --adapter PATH is one, indices from 0)"
        )


def _check_modes(args: argparse.Namespace, adapters: list[bool]) -> None:
    """--guess-mode and --control-mode set the ControlNet units' mode: refused where every unit
    uses a T2I-Adapter, since they would change nothing."""
    checked(check_guess_mode, args.guess_mode, adapters)
    if args.mode != UNIT["mode"].default and adapters and all(adapters):
        raise UsageError(
            f"--control-mode {args.mode} sets the mode of ControlNet units, and every unit here uses a "
            "T2I-Adapter (adapters have no control mode: they act on both sides of guidance)"
        )


def _sha256(path: str) -> str:
    from ..hashing import file_sha256

    try:
        return file_sha256(path)
    except OSError as error:  # read a moment ago, so unlikely: but never a traceback
        raise CommandError(f"cannot read {path}: {error.strerror or error}") from None


def _pose_map(spec: dict, annotator: str, args: argparse.Namespace, first_unit: bool) -> np.ndarray:
    """A pose JSON as a unit's control image: drawn as the openpose models were trained (the
    openpose_json annotator, its parameters from the unit's), at the file's canvas size; the unit
    then uses that map as it is (annotator none)."""
    path = spec["image"]
    if annotator in ("none", "openpose_json") or (first_unit and annotator == UNIT["annotator"].default):
        draw = get_annotator("openpose_json")
    else:
        raise UsageError(
            f"control unit {path}: a pose JSON is drawn as the openpose models were trained (annotator "
            f"openpose_json); annotator {annotator!r} cannot run on it"
        )
    params = _unit_params(draw, spec, args, first_unit)
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    try:
        image = draw.from_file(Path(path), **params).image
    except ValueError as error:
        raise UsageError(one_line(error)) from None
    _check_shape(image, f"the pose map of {path}")
    return image


def _unit_params(annotator, spec: dict, args: argparse.Namespace, first_unit: bool) -> dict:
    """The unit's annotator parameters: --annotator-param for --image's unit, a spec's own KEY=VALUE
    items for a --control unit; canny's thresholds default to --low-threshold/--high-threshold."""
    items = list(args.annotator_param) if first_unit else [f"{k}={v}" for k, v in spec.items() if k not in _UNIT_FIELDS]
    option = "--annotator-param" if first_unit else f"--control {spec['image']}"
    known = {p.name for p in annotator.params}
    for item in items:
        key = item.partition("=")[0].strip()
        if not first_unit and key not in known:
            takes = ", ".join(known) or "none"
            raise UsageError(
                f"bad --control item {item!r}: not a unit field ({', '.join(sorted(_UNIT_FIELDS))}) "
                f"nor a parameter of annotator {annotator.name!r} (its parameters: {takes})"
            )
    params = annotator_params(annotator, items, option)
    if annotator.name == "canny":
        given = {item.partition("=")[0].strip() for item in items}
        for name in ("low_threshold", "high_threshold"):
            if name not in given:
                params[name] = getattr(args, name)
    return params


def _load_checked_image(path: str | Path, what: str) -> np.ndarray:
    """An input image read (ImageError: one line naming the file) and its shape checked as the
    core will (at most 4:1), before a model is loaded."""
    from ..imaging.images import load_image

    image = load_image(path)
    _check_shape(image, what)
    return image


def _check_shape(image: np.ndarray, what: str) -> None:
    from ..imaging.resize import check_aspect_ratio

    try:
        check_aspect_ratio(image.shape[1], image.shape[0], what)
    except ValueError as error:
        raise CommandError(str(error)) from None


def _check_generate_options(args: argparse.Namespace) -> None:
    """The options that need no file: checked first, so a mistake is reported at once."""
    from ..runtime import default_device

    checked(check_generation, {name: getattr(args, name) for name in GENERATION})
    try:  # the canny annotator's own check, as for the JSON API
        get_annotator("canny").resolve({"low_threshold": args.low_threshold, "high_threshold": args.high_threshold})
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    if args.guess_mode and args.mode not in ("balanced", "control"):
        raise UsageError(f"--guess-mode means --control-mode control; it contradicts --control-mode {args.mode}")
    if args.base is not None and not args.base.exists():  # a typo in a path costs no waiting either
        raise CommandError(f"{args.base}: no such file or folder")
    original = args.base is not None  # the original app's prompt defaults; the shipped model knows none of those words
    if args.added_prompt is None:
        args.added_prompt = ORIGINAL_ADDED_PROMPT if original else ""
    if args.negative_prompt is None:
        args.negative_prompt = ORIGINAL_NEGATIVE_PROMPT if original else ""
    check_prompts(args.prompt, args.added_prompt, args.negative_prompt)
    checked(check_loras, args.loras)
    try:
        _, tags = prompt_loras(args.prompt)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if tags and args.lora_dir is None:
        raise UsageError(f"the prompt names LoRA {tags[0][0]!r} (<lora:...>): pass --lora-dir, the folder it is in")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir}: no such folder")
    if args.device == "auto":
        args.device = str(default_device())
    check_device(args.device)


def cmd_generate(args: argparse.Namespace) -> None:
    from ..imaging.images import load_image
    from ..pipeline import Pipeline, viewable_map
    from ..runtime import parse_dtype

    _check_generate_options(args)
    base, controlnets, adapters = model_files(args.base, args.controlnet, args.adapter)
    units = _units(args, controlnets, adapters)  # adds the shipped models units name
    out = output_folder(args.out)
    dtype = parse_dtype(args.dtype, args.device)
    init_image = None if args.init_image is None else _load_checked_image(args.init_image, "--init-image")
    mask = None if args.mask is None else load_image(args.mask)
    pipe = Pipeline.from_files(
        base,
        controlnets,
        device=args.device,
        dtype=dtype,
        annotators_dir=args.annotators_dir,
        adapters=adapters,
        lora_dir=args.lora_dir,
        taesd=args.taesd or None,
    )
    models = model_records(base, controlnets, adapters)
    try:  # before compiling, which freezes the weights; read and checked before any step
        pipe.use_loras(args.prompt, args.loras)
    except ValueError as error:
        raise UsageError(one_line(error)) from None
    if args.compile:
        pipe.compile()
    if units and not pipe.controlnets and not pipe.adapters:
        raise UsageError(
            "control images were given but no ControlNet: pass --controlnet PATH or NAME (or --adapter PATH or NAME)"
        )
    progress = ProgressBar()
    try:
        result = pipe.generate(
            args.prompt,
            [item.unit for item in units],
            negative_prompt=args.negative_prompt,
            added_prompt=args.added_prompt,
            num_images=args.num_images,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            eta=args.eta,
            sampler=args.sampler,
            resolution=args.resolution,
            init_image=init_image,
            denoising_strength=args.denoising_strength,
            mask=mask,
            progress=progress,
            loras=args.loras,
            decoder=args.decoder,
        )
    except NonFiniteError as error:  # the settings passed, the numbers overflowed: not an option's typo
        raise CommandError(one_line(error)) from None
    except ValueError as error:  # the core refused a value: a user mistake, not a bug
        raise UsageError(one_line(error)) from None
    finally:
        progress.close()

    record = _batch_record(args, result, units, models)
    for i, control_map in enumerate(result.control_maps):
        text = map_text(record, result.seeds, i)
        path = _save_new(out, f"{result.seeds[0]}-control-{i}", viewable_map(control_map), text)
        print(f"detected map {i}: {path}")
    for i, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        text = image_text(record, models, seed, i)
        path = _save_new(out, f"{seed}", image, text)
        print(f"image (seed {seed}): {path}")


def _batch_record(args: argparse.Namespace, result, units: Sequence[_Unit], models: dict) -> dict:
    """The pipeline's record, with each control image's file name and hash (reproducing needs the
    same image, and the hash proves it), the models' hashes and the device."""
    controls = []
    for item, control in zip(units, result.settings["controls"], strict=True):
        controls.append({**control, "image": item.path.name, "image_sha256": item.sha256})
    return {**result.settings, "controls": controls, "models": models, "device": args.device}


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

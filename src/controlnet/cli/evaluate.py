"""``controlnet eval``: controllability of a model on a dataset folder (evaluation.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..runtime import NonFiniteError
from ..settings import UNIT, check_unit
from .common import (
    CommandError,
    ProgressBar,
    UsageError,
    add_annotators_dir,
    annotator_params,
    checked,
    model_files,
    one_line,
    output_folder,
)


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    e = commands.add_parser(
        "eval",
        help="measure controllability: generate from (condition, prompt) pairs and score the images",
        description="Generate from the first COUNT (condition, prompt) pairs of a dataset folder (fill50k or "
        "diffusers layout) with fixed seeds and report the ControlNet++ metrics: the condition is re-extracted "
        "from each image with --annotator (the one that made the data's conditions; default canny) and compared "
        "with the one it was made from: Canny edge F1 and SSIM of the edge maps, SSIM of any other map, RMSE of "
        "depth maps; for 'controlnet data scenes' data, also whether the named colours are where the shapes are. "
        "Data of 'controlnet data world' is scored by its condition: WORLD (canny) by edge F1, WORLD/depth by the "
        "depth RMSE and WORLD/seg by the mIoU of the world estimators, WORLD/pose by how the segmented figures "
        "follow the skeletons, and each by prompt adherence (the named colours on their objects, wall and floor). "
        "--adapter evaluates a T2I-Adapter instead of a ControlNet; --empty-prompt generates without the captions "
        "(ControlNets in guess mode; no prompt adherence then). On world data, --also COND composes the data's maps "
        "with the same scenes' COND maps, each through its own shipped ControlNet, and scores every condition by its "
        "own measure on the same images. Writes results.json and grid.png to --out.",
    )
    e.add_argument("--data", type=Path, required=True, help="a dataset folder (prompt.json or metadata.jsonl)")
    e.add_argument("--out", type=Path, required=True, help="folder for results.json and grid.png")
    e.add_argument("--base", type=Path, help="base model (default: the default model)")
    e.add_argument(
        "--controlnet",
        help="ControlNet: a file (with --base) or a shipped name (default: the shipped one for the data's "
        "condition, e.g. depth for WORLD/depth; else the first shipped)",
    )
    e.add_argument(
        "--adapter",
        metavar="PATH|NAME",
        help="evaluate a T2I-Adapter instead of a ControlNet: a file or diffusers folder (with --base), or a "
        "shipped one's name",
    )
    e.add_argument("--no-control", action="store_true", help="the base model alone, from the prompts")
    e.add_argument(
        "--empty-prompt",
        action="store_true",
        help="generate from the empty prompt: ControlNet units in guess mode (control mode), T2I-Adapter units as "
        "ever (balanced); prompt adherence is then not reported",
    )
    e.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="COND",
        help="world data: also steer each image with its scene's COND map (WORLD/COND: depth, seg, pose, canny, "
        "scribble, ...) through the shipped ControlNet named COND, and score COND by its own measure on the same "
        "images (repeatable)",
    )
    e.add_argument(
        "--unit-strength",
        action="append",
        default=[],
        metavar="COND=S",
        help=f"the strength of the unit reading COND's maps (the data's condition or an --also one; "
        f"{UNIT['strength'].describe()}, default {UNIT['strength'].default:g}; repeatable)",
    )
    e.add_argument(
        "--unit-window",
        action="append",
        default=[],
        metavar="COND=START:END",
        help=f"the fractions of the steps where the unit reading COND's maps starts and stops acting "
        f"({UNIT['start'].describe()}, default {UNIT['start'].default:g}:{UNIT['end'].default:g}; repeatable)",
    )
    e.add_argument(
        "--ground-truth",
        action="store_true",
        help="score the data's own images instead of generating (the ceiling of every score; no model is loaded)",
    )
    e.add_argument("--count", type=int, default=50, help="conditions to evaluate (default 50)")
    e.add_argument("--images-per-condition", type=int, default=4, help="default 4 (the ControlNet++ protocol)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=7.5, help="default 7.5 (the ControlNet++ protocol)")
    e.add_argument("--sampler", default="ddim")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--resolution", type=int, help="default: the model's native resolution")
    e.add_argument("--annotator", default="canny", help="re-extracts the condition from each image (default canny)")
    e.add_argument(
        "--annotator-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of --annotator (repeatable; 'controlnet annotate --list' shows them)",
    )
    e.add_argument("--low-threshold", type=int, default=100, help="canny's low threshold (default 100)")
    e.add_argument("--high-threshold", type=int, default=200, help="canny's high threshold (default 200)")
    add_annotators_dir(e)
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    return {"eval": cmd_eval}


def _reextraction(args: argparse.Namespace):
    """The annotator that re-extracts conditions, with its parameters (canny's thresholds from
    --low-threshold/--high-threshold unless --annotator-param gives them) and weights folder."""
    from ..annotators import Runtime, get_annotator
    from ..evaluation import Reextraction

    try:
        annotator = get_annotator(args.annotator)
    except ValueError as error:
        raise UsageError(f"--annotator: {error}") from None
    params = annotator_params(annotator, args.annotator_param, "--annotator-param")
    given = {item.partition("=")[0].strip() for item in args.annotator_param}
    if annotator.name == "canny":
        params |= {name: getattr(args, name) for name in ("low_threshold", "high_threshold") if name not in given}
    return Reextraction(annotator.name, params, Runtime.default(args.annotators_dir, None, args.dtype))


def _check_eval_options(args: argparse.Namespace):
    """Every option of eval that needs no model, checked before one is loaded; the re-extraction."""
    from ..annotators.weights import AnnotatorWeightsError
    from ..evaluation import check_settings

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
            reextraction=(reextraction := _reextraction(args)),
        )
    except AnnotatorWeightsError:
        raise  # a missing file, as every command says it (exit 1), not a usage mistake
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not args.data.exists():
        raise UsageError(f"--data {args.data}: no such folder")
    _check_models(args)
    if args.base is not None and not args.base.exists():
        raise UsageError(f"{args.base}: no such file or folder")
    return reextraction


def _check_models(args: argparse.Namespace) -> None:
    """The options that choose what generates, in one line each where they contradict."""
    if args.controlnet and args.no_control:
        raise UsageError("--no-control evaluates the base alone; it contradicts --controlnet")
    if args.adapter and (args.controlnet or args.no_control):
        other = "--controlnet" if args.controlnet else "--no-control"
        raise UsageError(f"--adapter evaluates a T2I-Adapter in place of a ControlNet; it contradicts {other}")
    units = [("--also", args.also), ("--unit-strength", args.unit_strength), ("--unit-window", args.unit_window)]
    given = [option for option, values in units if values]
    if args.no_control and given:
        raise UsageError(f"--no-control evaluates the base alone; it contradicts {given[0]}")
    if args.ground_truth and (args.base or args.controlnet or args.adapter or args.no_control):
        raise UsageError(
            "--ground-truth scores the data's own images; it takes no --base, --controlnet, --adapter or --no-control"
        )
    if args.ground_truth and (args.empty_prompt or given):
        option = "--empty-prompt" if args.empty_prompt else given[0]
        raise UsageError(f"--ground-truth scores the data's own images; it generates nothing to take {option}")


def _check_world(args: argparse.Namespace, reextraction) -> dict:
    """World data, before a model loads: other conditions than canny are scored by the world's own
    measures (an --annotator would be ignored); the instance maps and the estimators must be there,
    and every --also condition's folder. The units' settings by the condition they read (the
    data's own first; its name: the world condition, else the annotator that made the maps)."""
    from ..datasets.folders import read_records
    from ..world_evaluation import find_world

    world = find_world(args.data)
    if world is not None and world.condition != "canny" and (args.annotator != "canny" or args.annotator_param):
        raise UsageError(
            f"--annotator: {args.data} holds the world's {world.condition} maps, scored by the world's own "
            "measures (controlnet eval --help), not by re-extraction"
        )
    own = world.condition if world is not None else reextraction.annotator
    for condition in args.also:
        if world is None:
            raise UsageError(
                f"--also {condition}: {args.data} is not world data ('controlnet data world'): no other condition "
                "of its scenes to compose with"
            )
        if args.also.count(condition) > 1:
            raise UsageError(f"--also {condition}: given twice")
        try:
            world.condition_folder(condition)
        except ValueError as error:
            raise UsageError(f"--also {condition}: {one_line(error)}") from None
    settings = _unit_settings(args, [own, *args.also])
    if world is not None:
        world.check(read_records(args.data)[: args.count], args.also)
    return settings


def _unit_settings(args: argparse.Namespace, conditions: list[str]) -> dict[str, dict]:
    """--unit-strength COND=S and --unit-window COND=START:END as each unit's strength, start and
    end (settings.UNIT's defaults and checks), by the condition the unit reads."""
    settings = {
        condition: {name: UNIT[name].default for name in ("strength", "start", "end")} for condition in conditions
    }
    seen = set()
    for option, items in (("--unit-strength", args.unit_strength), ("--unit-window", args.unit_window)):
        for item in items:
            condition, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not condition:
                raise UsageError(
                    f"bad {option} {item!r}; use {'COND=S' if option == '--unit-strength' else 'COND=START:END'}"
                )
            if condition not in settings:
                raise UsageError(
                    f"{option} {item}: no unit reads {condition} maps here (the units read {', '.join(conditions)})"
                )
            if (option, condition) in seen:
                raise UsageError(f"{option} {condition}: given twice")
            seen.add((option, condition))
            where = f"{option} {condition}"
            if option == "--unit-strength":
                settings[condition]["strength"] = _number(value, where)
            else:
                start, colon, end = value.partition(":")
                if not colon:
                    raise UsageError(f"{where}: {value!r} is not START:END (e.g. 0:0.5)")
                settings[condition] |= {"start": _number(start, where), "end": _number(end, where)}
            checked(check_unit, settings[condition], where)
    return settings


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{where}: {text.strip()!r} is not a number") from None


def _shipped_for(args: argparse.Namespace) -> list[str]:
    """Without --base and --controlnet: the shipped ControlNet made for the data's world condition
    (WORLD/depth: depth), where one ships; else none named (every shipped one loads, the first
    scored)."""
    from .. import shipped
    from ..world_evaluation import find_world

    world = None if args.base is not None else find_world(args.data)
    return [world.condition] if world is not None and world.condition in shipped.names("controlnet") else []


def _model_files(args: argparse.Namespace):
    """(base, ControlNet files, adapter files) to load: the data's own unit's model first (--controlnet,
    --adapter, or the shipped one for the data's condition), then each --also condition's shipped
    ControlNet."""
    from .. import shipped

    adapters = [args.adapter] if args.adapter else []
    own = [args.controlnet] if args.controlnet else [] if args.adapter else _shipped_for(args)
    if not args.also:
        return model_files(args.base, own, adapters)
    if not own and not adapters:
        if args.base is not None:
            raise UsageError("no ControlNet to evaluate: pass --controlnet PATH (or --adapter PATH) with --base")
        own = shipped.names("controlnet")[:1]  # as without --also: the first shipped one is scored
    also = []
    for condition in args.also:
        try:
            also.append(shipped.path(condition, "controlnet"))
        except ValueError as error:
            raise UsageError(f"--also {condition}: {one_line(error)}") from None
    return model_files(args.base, [*own, *also], adapters)


def _units(args: argparse.Namespace, settings: dict[str, dict]):
    """The evaluation's units: the data's own maps through --adapter's T2I-Adapter or the first
    ControlNet, each --also condition's through its ControlNet (loaded in that order)."""
    from ..evaluation import EvalUnit

    if args.no_control:
        return None
    own, *others = settings
    first = EvalUnit(None, "adapter" if args.adapter else "controlnet", 0, **settings[own])
    offset = 0 if args.adapter else 1
    return [first, *(EvalUnit(c, "controlnet", offset + k, **settings[c]) for k, c in enumerate(others))]


def cmd_eval(args: argparse.Namespace) -> None:
    from ..datasets.folders import read_records
    from ..evaluation import evaluate, format_summary
    from ..pipeline import Pipeline

    reextraction = _check_eval_options(args)
    read_records(args.data)  # DatasetError (one line) for a folder without a readable listing
    settings = _check_world(args, reextraction)
    output_folder(args.out)
    pipe, use_control, units = None, not args.no_control, None
    if not args.ground_truth:
        base, controlnets, adapters = _model_files(args)
        pipe = Pipeline.from_files(base, [] if args.no_control else controlnets, dtype=args.dtype, adapters=adapters)
        if use_control and not pipe.controlnets and not pipe.adapters:
            raise UsageError("no ControlNet to evaluate: pass --controlnet PATH, or --no-control for the base alone")
        units = _units(args, settings)
    progress = ProgressBar("conditions")
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
            reextraction=reextraction,
            units=units,
            empty_prompt=args.empty_prompt,
            progress=progress,
        )
    except NonFiniteError as error:  # NaN images: nothing is scored, results.json is not written
        raise CommandError(one_line(error)) from None
    finally:
        progress.close()
    print(format_summary(results))
    print(f"results: {args.out / 'results.json'}; samples: {args.out / 'grid.png'}")

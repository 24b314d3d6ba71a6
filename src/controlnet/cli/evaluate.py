"""``controlnet eval``: controllability of a model on a dataset folder (evaluation.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..runtime import NonFiniteError
from .common import (
    CommandError,
    ProgressBar,
    UsageError,
    add_annotators_dir,
    annotator_params,
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
        "Writes results.json and grid.png to --out.",
    )
    e.add_argument("--data", type=Path, required=True, help="a dataset folder (prompt.json or metadata.jsonl)")
    e.add_argument("--out", type=Path, required=True, help="folder for results.json and grid.png")
    e.add_argument("--base", type=Path, help="base model (default: the default model)")
    e.add_argument(
        "--controlnet",
        help="ControlNet: a file (with --base) or a shipped name (default: the shipped one for the data's "
        "condition, e.g. depth for WORLD/depth; else the first shipped)",
    )
    e.add_argument("--no-control", action="store_true", help="the base model alone, from the prompts")
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
    if args.controlnet and args.no_control:
        raise UsageError("--no-control evaluates the base alone; it contradicts --controlnet")
    if args.ground_truth and (args.base or args.controlnet or args.no_control):
        raise UsageError(
            "--ground-truth scores the data's own images; it takes no --base, --controlnet or --no-control"
        )
    if args.base is not None and not args.base.exists():
        raise UsageError(f"{args.base}: no such file or folder")
    return reextraction


def _check_world(args: argparse.Namespace) -> None:
    """World data, before a model loads: other conditions than canny are scored by the world's own
    measures (an --annotator would be ignored); the instance maps and the estimators must be there."""
    from ..datasets.folders import read_records
    from ..world_evaluation import find_world

    world = find_world(args.data)
    if world is None:
        return
    if world.condition != "canny" and (args.annotator != "canny" or args.annotator_param):
        raise UsageError(
            f"--annotator: {args.data} holds the world's {world.condition} maps, scored by the world's own "
            "measures (controlnet eval --help), not by re-extraction"
        )
    world.check(read_records(args.data)[: args.count])


def _shipped_for(args: argparse.Namespace) -> list[str]:
    """Without --base and --controlnet: the shipped ControlNet made for the data's world condition
    (WORLD/depth: depth), where one ships; else none named (every shipped one loads, the first
    scored)."""
    from .. import shipped
    from ..world_evaluation import find_world

    world = None if args.base is not None else find_world(args.data)
    return [world.condition] if world is not None and world.condition in shipped.names("controlnet") else []


def cmd_eval(args: argparse.Namespace) -> None:
    from ..datasets.folders import read_records
    from ..evaluation import evaluate, format_summary
    from ..pipeline import Pipeline

    reextraction = _check_eval_options(args)
    read_records(args.data)  # DatasetError (one line) for a folder without a readable listing
    _check_world(args)
    output_folder(args.out)
    pipe, use_control = None, not args.no_control
    if not args.ground_truth:
        base, controlnets, _ = model_files(args.base, [args.controlnet] if args.controlnet else _shipped_for(args))
        pipe = Pipeline.from_files(base, [] if args.no_control else controlnets, dtype=args.dtype)
        if use_control and not pipe.controlnets:
            raise UsageError("no ControlNet to evaluate: pass --controlnet PATH, or --no-control for the base alone")
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
            progress=progress,
        )
    except NonFiniteError as error:  # NaN images: nothing is scored, results.json is not written
        raise CommandError(one_line(error)) from None
    finally:
        progress.close()
    print(format_summary(results))
    print(f"results: {args.out / 'results.json'}; samples: {args.out / 'grid.png'}")

"""``controlnet train-estimator``: train a world estimator (train/estimator.py) that eval scores with."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .common import UsageError, check_range, output_folder


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    from ..train.estimator import EstimatorSettings

    defaults = EstimatorSettings("depth", Path(), Path())
    t = commands.add_parser(
        "train-estimator",
        help="train the small network that reads depth or segmentation back off world images (for eval)",
        description="Train a small UNet-style estimator, image -> depth or image -> the world's segmentation "
        "classes, on a 'controlnet data world' folder; 'controlnet eval' scores world models with it (the "
        "ControlNet++ protocol). Deterministic from --seed; run again with the same options to resume from "
        "OUT/checkpoint.pt. Writes OUT/world-estimator-TASK.safetensors (float16) and OUT/metrics.csv.",
    )
    t.add_argument("--task", required=True, choices=("depth", "seg"), help="what the estimator reads off an image")
    t.add_argument("--data", type=Path, required=True, help="a 'controlnet data world' folder (training images)")
    t.add_argument("--out", type=Path, required=True, help="folder for the checkpoint, the metrics and the weights")
    t.add_argument("--validation-data", type=Path, help="another world folder, scored at each checkpoint and the end")
    t.add_argument("--steps", type=int, default=defaults.steps, help=f"default {defaults.steps}")
    t.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    t.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help=f"AdamW, default {defaults.learning_rate}"
    )
    t.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    t.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps (default 100)")
    t.add_argument("--mixed-precision", choices=("bf16", "no"), default=defaults.mixed_precision, help="default bf16")
    return {"train-estimator": cmd_train_estimator}


def cmd_train_estimator(args: argparse.Namespace) -> None:
    from ..datasets.folders import read_records
    from ..train.estimator import EstimatorSettings, train_estimator

    check_range("--steps", args.steps, 1, 10_000_000)
    check_range("--batch-size", args.batch_size, 1, 4096)
    check_range("--learning-rate", args.learning_rate, 1e-8, 1.0)
    check_range("--seed", args.seed, 0, 2**63 - 1)
    check_range("--checkpoint-every", args.checkpoint_every, 1, 10_000_000)
    for option, folder in (("--data", args.data), ("--validation-data", args.validation_data)):
        if folder is not None and not folder.exists():
            raise UsageError(f"{option} {folder}: no such folder")
        if folder is not None:
            read_records(folder)  # DatasetError (one line) for a folder without a readable listing
    output_folder(args.out)
    settings = EstimatorSettings(
        task=args.task,
        data=args.data,
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        validation_data=args.validation_data,
        mixed_precision=args.mixed_precision,
    )
    train_estimator(settings, log=lambda line: print(line, flush=True))

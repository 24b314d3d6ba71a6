"""``controlnet train``: a ControlNet on a frozen base, or small base models from scratch (train/).

Its flags are ``TrainConfig``'s fields (train/config.py): the flag, type, default, choices and help
of each come from the field's declaration, and the parsed values go back into the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

from ..train.config import TrainConfig, option_name
from .common import UsageError, control_files


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    parser = commands.add_parser(
        "train",
        help="train a ControlNet on a frozen base (or a small base model from scratch)",
        description="Train a ControlNet on a frozen base model (task controlnet), or a small VAE (task vae) "
        "or UNet + text encoder (task base) from scratch. Run with torchrun for several processes: "
        "torchrun --nproc-per-node N -m controlnet train ...",
    )
    hints = typing.get_type_hints(TrainConfig)
    for spec in _options():
        parser.add_argument(option_name(spec), **_argument(spec, hints[spec.name]))
    return {"train": cmd_train}


def _options() -> list[dataclasses.Field]:
    """The fields of ``TrainConfig`` that are options of the command (not those of the Python API only)."""
    return [spec for spec in dataclasses.fields(TrainConfig) if spec.metadata.get("cli", True)]


def _argument(spec: dataclasses.Field, hint: object) -> dict:
    """``add_argument``'s keywords for the field ``spec`` of type ``hint``: a field without a
    default is required; a bool is a switch (``--unlock-decoder``, or ``--no-cache`` for one that
    is on by default); anything else takes a value of its type (``X | None``: of type X)."""
    meta, default = spec.metadata, spec.default
    text = meta["help"].replace("%", "%%")  # argparse formats help with %
    if default is dataclasses.MISSING:
        return {"dest": spec.name, "required": True, "help": text}
    if hint is bool:
        return {"dest": spec.name, "action": "store_false" if default else "store_true", "help": text}
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # X | None -> X
    shown = "" if default is None else f" (default: {default})"
    keywords = {"dest": spec.name, "type": kind, "default": default, "help": text + shown}
    if meta.get("choices"):
        keywords["choices"] = meta["choices"]
    return keywords


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments (each flag's value mapped as its field says)."""
    values = {}
    for spec in _options():
        value, convert = getattr(args, spec.name), spec.metadata.get("from_cli")
        values[spec.name] = convert(value) if convert is not None else value
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import TrainingError, train

    config = _shipped_start(config_from_args(args))
    try:
        config.check()  # every option, before a model or the data is read
    except TrainingError as error:
        raise UsageError(str(error)) from None
    for name in ("data", "base", "controlnet"):
        value = getattr(config, name)
        if value is not None and not Path(value).exists():
            raise UsageError(f"--{name} {value}: no such file or folder")
    train(config, log=lambda message: print(message, flush=True))


def _shipped_start(config: TrainConfig) -> TrainConfig:
    """--controlnet as a file: one that exists, or a shipped ControlNet's name (shipped.resolve),
    which implies the shipped base when no --base is given, as everywhere a ControlNet is named."""
    from .. import shipped

    if config.controlnet is None:
        return config
    [start] = control_files([config.controlnet], "controlnet")
    base = config.base
    if base is None and shipped.is_shipped(start):
        base = str(shipped.base_path())
    return dataclasses.replace(config, controlnet=str(start), base=base)

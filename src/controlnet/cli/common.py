"""What every command shares: its errors (one line, never a traceback), the checks it runs before
loading a model, output files that are never half-written, and the progress bar."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import NotWritable, writable_folder
from ..settings import Setting, SettingError


class CommandError(Exception):
    """A failure the user can act on (e.g. an output that cannot be written): one line, exit 1."""

    exit_status = 1


class UsageError(CommandError):
    """A user mistake on the command line, reported in one line; exit 2 as argparse's own errors."""

    exit_status = 2


def check_range(name: str, value: float, low: float, high: float) -> None:
    # NaN fails both comparisons (argparse's float() accepts "nan" and "inf"): refused too.
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, got {value}")


def check_prompts(prompt: str, added_prompt: str = "", negative_prompt: str = "") -> None:
    """The core's prompt limits (length, NUL, lone surrogates), before a model is loaded."""
    from ..sampling import prompts

    try:
        names = ("--prompt", "--added-prompt", "--negative-prompt")
        prompts.check_prompts(prompt, added_prompt, negative_prompt, names)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_device(name: str) -> None:
    """A device the models can run on and this machine has (runtime.check_device)."""
    from .. import runtime

    try:
        runtime.check_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def shipped_model() -> tuple[Path, list[Path]]:
    """The shipped base model and every shipped ControlNet (registry order: a unit's index means
    what it means in Pipeline.default() and the server), used when no --base is given."""
    from .. import shipped

    absent = shipped.missing()
    if absent:
        raise UsageError(f"no --base given and the shipped model file {absent[0]} is missing: reinstall the package")
    print(f"no --base given: using {shipped.NAME}")
    return shipped.base_path(), shipped.paths("controlnet")


def control_files(values: Sequence[str | Path], kind: str) -> list[Path]:
    """Each value of --controlnet (``kind`` "controlnet") or --adapter ("adapter") as a file: one
    that exists, else a shipped model's name (shipped.resolve); UsageError, one line, otherwise."""
    from .. import shipped

    option = "--controlnet" if kind == "controlnet" else "--adapter"
    try:
        return [shipped.resolve(value, kind) for value in values]
    except ValueError as error:
        raise UsageError(f"{option} {error}") from None


def model_files(
    base: Path | None, controlnets: Sequence[str | Path], adapters: Sequence[str | Path] = ()
) -> tuple[Path, list[Path], list[Path]]:
    """The files a command loads from its --base, --controlnet and --adapter values (files, or
    shipped names). Without --base: the shipped base, with the shipped models named (a file of
    one's own was trained for some base, which --base must name), or with every shipped ControlNet
    and T2I-Adapter when none is named."""
    from .. import shipped

    controlnet_files, adapter_files = control_files(controlnets, "controlnet"), control_files(adapters, "adapter")
    if base is not None:
        return base, controlnet_files, adapter_files
    for option, kind, values, files in (
        ("--controlnet", "controlnet", controlnets, controlnet_files),
        ("--adapter", "adapter", adapters, adapter_files),
    ):
        for value, file in zip(values, files, strict=True):
            if not shipped.is_shipped(file, kind):
                raise UsageError(
                    f"{option} {value}: a file of your own needs --base (the base model it was trained for); "
                    f"without --base, name a shipped one ({', '.join(shipped.names(kind)) or 'none ships'})"
                )
    shipped_base, every_controlnet = shipped_model()
    if not controlnet_files and not adapter_files:
        return shipped_base, every_controlnet, shipped.paths("adapter")
    return shipped_base, controlnet_files, adapter_files


def output_folder(path: Path) -> Path:
    """Create the output folder and prove it writable before any model is loaded."""
    try:
        return writable_folder(path)
    except NotWritable as error:
        raise CommandError(str(error)) from None


def check_output(path: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    output = path.resolve()
    # An input that is the output, or lies inside an output folder that would be replaced.
    if any(output == i.resolve() or output in i.resolve().parents for i in inputs):
        raise UsageError(f"{path}: the output would overwrite an input; choose another path")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: already exists; pass --overwrite to replace it")


def save_over(path: Path, image: np.ndarray, text: dict[str, str]) -> None:
    """save_png (atomic) with a failure to write reported in one line."""
    from ..imaging.images import save_png

    try:
        save_png(path, image, text)
    except OSError as error:
        raise CommandError(f"{path}: cannot write ({error.strerror or error})") from None


class ProgressBar:
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


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def os_error(error: OSError) -> str:
    """'PATH: reason' for an OSError (its own text also holds the errno: '[Errno 28] No space ...')."""
    reason = error.strerror or one_line(error)
    return f"{error.filename}: {reason}" if error.filename else f"cannot read or write a file: {reason}"


def add_setting(parser: argparse.ArgumentParser, setting: Setting, help: str = "") -> None:
    """A command-line option made from a setting (settings.py): its flag, type, default and help,
    which says what is allowed. The value is checked with ``checked`` (the same message as the
    JSON API and the Python API), not by argparse."""
    text = help or setting.help
    if setting.type is bool:
        parser.add_argument(setting.option, dest=setting.name, action="store_true", help=text)
        return
    default = "" if setting.default is None else f"; default {setting.default}"
    parser.add_argument(
        setting.option,
        dest=setting.name,
        type=setting.type,
        default=setting.default,
        metavar=setting.name.upper(),
        help=f"{text} ({setting.describe()}{default})",
    )


def checked(check, *args) -> None:
    """Run a settings check; its SettingError becomes a UsageError (exit 2) with the same text."""
    try:
        check(*args)
    except SettingError as error:
        raise UsageError(str(error)) from None


# -- annotators ---------------------------------------------------------------------------------


def add_annotators_dir(parser: argparse.ArgumentParser) -> None:
    """``--annotators-dir``: the folder of annotator weight files (annotators/weights.py)."""
    from ..annotators.weights import ENV_VAR, FOLDER_OPTION, default_folder

    parser.add_argument(
        FOLDER_OPTION,
        type=Path,
        metavar="DIR",
        help=f"folder of the annotators' weight files, under their original names "
        f"(default: ${ENV_VAR}, else {default_folder()}); nothing is downloaded",
    )


def annotator_params(annotator, items: Sequence[str], option: str = "--param") -> dict:
    """KEY=VALUE items (of ``option``) as the annotator's typed parameters, defaults filled in and
    checked by the annotator's own `resolve`."""
    known = {p.name: p for p in annotator.params}
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"bad {option} {item!r}; use KEY=VALUE")
        param = known.get(key)
        if param is None:
            takes = ", ".join(known) or "no parameters"
            raise UsageError(f"annotator {annotator.name!r} has no parameter {key!r}; it takes {takes}")
        params[key] = param_value(param, value, annotator.name)
    try:
        return annotator.resolve(params)  # ranges and choices: the annotator's own check
    except ValueError as error:
        raise UsageError(str(error)) from None


def param_value(param, text: str, annotator: str) -> Any:
    """The text of a parameter's value as the parameter's kind (bool, int, float or str)."""
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

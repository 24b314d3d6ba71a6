"""What every command shares: its errors (one line, never a traceback), the checks it runs before
loading a model, output files that are never half-written, and the progress bar."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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
    """The shipped base model and its Canny ControlNet, used when no --base is given."""
    from .. import shipped

    absent = shipped.missing()
    if absent:
        raise UsageError(f"no --base given and the shipped model file {absent[0]} is missing: reinstall the package")
    print(f"no --base given: using {shipped.NAME}")
    return shipped.base_path(), [shipped.canny_path()]


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

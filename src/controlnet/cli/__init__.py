"""The ``controlnet`` command line: parse input, call the core, format output. No model logic here.

One module per command (or family of commands), each with ``register(commands)``, which adds its
subparsers and returns its handlers; what they share is in ``common``.

Errors: a user mistake is reported in one line, ``controlnet COMMAND: error: ...``, never a
traceback. Exit status 2: a bad option or argument (as argparse); 1: a file that cannot be read or
written, a model that does not fit, or a value the core refuses; 130: interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from .. import __version__, runtime
from . import annotate, data, demo, estimator, evaluate, generate, models, serve, train
from .common import CommandError, UsageError, one_line, os_error

__all__ = ["CommandError", "UsageError", "main"]

Handler = Callable[[argparse.Namespace], None]
# In the order `controlnet --help` lists them.
_MODULES = (demo, generate, serve, annotate, models, data, train, evaluate, estimator)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="controlnet", description="ControlNet for Stable Diffusion: spatial control of text-to-image diffusion."
    )
    parser.add_argument("--version", action="version", version=f"controlnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for module in _MODULES:
        handlers.update(module.register(subparsers))
    return parser, handlers


# Commands whose process runs one job of many model steps: malloc keeps freed memory for the next
# step instead of page-faulting it back from the kernel (runtime.keep_freed_memory). Not ``serve``,
# whose memory between requests goes back to the system.
_MODEL_JOBS = {"demo", "generate", "train", "eval", "train-estimator"}


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    args = parser.parse_args(argv)
    if args.command in _MODEL_JOBS:
        runtime.keep_freed_memory()
    # torch warns that it "might not support" the protocol of every plain-pickle checkpoint (old
    # .ckpt files); loading is safe either way, and an error is reported in one line of its own.
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    try:
        commands[args.command](args)
    except CommandError as error:
        print(f"controlnet {args.command}: error: {one_line(error)}", file=sys.stderr)
        return error.exit_status
    except ValueError as error:
        # The core's way of refusing input (CheckpointError and ImageError are ValueErrors too):
        # a bad file or value from the user, so one line, not a traceback.
        print(f"controlnet {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of our output stopped (`controlnet annotate --list | head`): nothing to report.
        # Python would complain once more at exit while flushing stdout, so stdout goes nowhere now.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        # A file the commands check early can still fail later: a disk that fills up while the
        # results are written, a folder removed meanwhile. The writers leave no half file behind.
        print(f"controlnet {args.command}: error: {os_error(error)}", file=sys.stderr)
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

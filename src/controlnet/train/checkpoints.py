"""Checkpoints: written whole or not at all, checked before a run resumes from them.

``out/checkpoints/step-N/`` holds ``state.pt`` (everything a resumed run needs) and, written last,
``checkpoint.json``: the size and SHA-256 of ``state.pt``. A checkpoint that does not match its
manifest is damaged: passed over (``find_resume_point``) and set aside, never resumed from.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_folder
from ..formats.tensors import TORCH_LOAD_ERRORS, torch_load_reason
from ..hashing import file_sha256
from .config import CHECKPOINT_PREFIX, MANIFEST_FILE, STATE_FILE, TrainingError
from .distributed import shard_like
from .optim import all_finite


def checkpoint_dirs(out: Path) -> list[Path]:
    """The checkpoint folders ``out/checkpoints/step-N``, oldest first (intact or not: see
    ``read_checkpoint``; a damaged one set aside by a resumed run is named ``damaged-step-N``)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _checkpoint_step(p) is not None]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(folder: Path) -> int | None:
    """N for a folder named ``step-N`` (digits only), else None."""
    digits = folder.name.removeprefix(CHECKPOINT_PREFIX)
    if folder.name.startswith(CHECKPOINT_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def rng_state() -> dict:
    """torch's global generators (the samples' draws have their own, see ``sample_generator``;
    these serve anything else, e.g. dropout)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, state: dict, keep: int) -> Path:
    """``out/checkpoints/step-N``: ``state.pt`` and, written last, a manifest of its size and
    SHA-256 (``checkpoint.json``), in a new folder that takes the checkpoint's place only once
    complete (``files.atomic_folder``; a checkpoint of the same step, saved by an earlier run, is
    replaced then); then all but the last ``keep`` checkpoints are removed.

    The rename makes a checkpoint appear whole or not at all; the manifest lets a later run tell a
    checkpoint damaged since (a truncated copy, a disk error) from an intact one. Weights that are
    not finite are never written (TrainingError): a NaN checkpoint would become the one a resumed
    run starts from. A failure to write (disk full) removes the partial checkpoint and raises
    TrainingError; the checkpoints written before are kept."""
    if not all_finite(state["trainable"].values()):
        raise TrainingError(f"step {step}: the weights hold NaN or infinite values; no checkpoint written")
    final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    try:
        with atomic_folder(final) as folder:
            _write_checkpoint(folder, step, state)
    except OSError as error:
        raise TrainingError(
            f"cannot write the checkpoint {final} ({error.strerror or error}); the checkpoints written before are kept"
        ) from None
    for old in checkpoint_dirs(out)[:-keep]:
        if old != final:  # never the one just written (the newest, unless newer ones are left over)
            shutil.rmtree(old, ignore_errors=True)
    recover_checkpoints(out)
    return final


def _write_checkpoint(folder: Path, step: int, state: dict) -> None:
    """The files of a checkpoint, in the new ``folder`` (atomic_folder syncs them before the swap)."""
    written = folder / STATE_FILE
    torch.save(state, written)
    manifest = {"step": step, "files": {STATE_FILE: {"bytes": written.stat().st_size, "sha256": file_sha256(written)}}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def recover_checkpoints(out: Path) -> None:
    """Tidy what a run killed while saving left behind: a hidden ``.step-N.*.tmp`` folder (a
    checkpoint being written) goes; a hidden ``.step-N.*.old`` one (the checkpoint a resave of step
    N was replacing) is put back when step N is missing (killed between the two renames), and
    removed otherwise. Also the names of runs from before ``files.atomic_folder``:
    ``.step-N.tmp-PID`` and ``.step-N.old-PID``."""
    folder = out / "checkpoints"
    for hidden in sorted(folder.glob(f".{CHECKPOINT_PREFIX}*")):
        final = folder / hidden.name[1:].split(".", 1)[0]
        if ".old" in hidden.name and not final.exists():
            os.replace(hidden, final)
        elif ".old" in hidden.name or ".tmp" in hidden.name:
            shutil.rmtree(hidden, ignore_errors=True)


class DamagedCheckpoint(TrainingError):
    """A checkpoint folder that cannot be resumed from; the message says which and why."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"{folder}: {reason}")
        self.folder, self.reason = folder, reason


def read_checkpoint(folder: Path) -> dict:
    """The state saved in ``folder``, checked: its files are there, ``state.pt`` has the size and
    SHA-256 the manifest recorded (checkpoints written before manifests existed are only loaded),
    it loads, holds what a resumed run needs, for the step its name says, with finite weights.
    DamagedCheckpoint (one line: the folder and the reason) otherwise."""
    state_file, manifest_file = folder / STATE_FILE, folder / MANIFEST_FILE
    if not folder.is_dir():
        raise DamagedCheckpoint(folder, "no such checkpoint folder")
    if not state_file.is_file():
        raise DamagedCheckpoint(folder, f"{STATE_FILE} is missing")
    if manifest_file.exists():
        try:
            recorded = json.loads(manifest_file.read_text(encoding="utf-8"))["files"][STATE_FILE]
            size, sha256 = int(recorded["bytes"]), str(recorded["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DamagedCheckpoint(folder, f"its manifest {MANIFEST_FILE} is unreadable") from None
        actual = state_file.stat().st_size
        if actual != size:
            raise DamagedCheckpoint(
                folder, f"{STATE_FILE} is {actual:,} bytes but {size:,} were written (truncated or overwritten)"
            )
        if file_sha256(state_file) != sha256:
            raise DamagedCheckpoint(folder, f"{STATE_FILE} differs from what was written (SHA-256 mismatch)")
    try:
        state = torch.load(state_file, weights_only=True)
    except pickle.UnpicklingError:  # refused by weights_only: not what save_checkpoint writes
        raise DamagedCheckpoint(folder, f"{STATE_FILE} holds more than tensors and plain data") from None
    except TORCH_LOAD_ERRORS as error:
        raise DamagedCheckpoint(folder, f"{STATE_FILE} cannot be read ({torch_load_reason(error)})") from None
    needed = ("step", "trainable", "optimizer", "rng")
    if (
        not isinstance(state, dict)
        or any(key not in state for key in needed)
        or not isinstance(state["trainable"], dict)
    ):
        raise DamagedCheckpoint(folder, f"{STATE_FILE} is not a training checkpoint (it needs {', '.join(needed)})")
    step = _checkpoint_step(folder)
    if step is not None and state["step"] != step:
        raise DamagedCheckpoint(folder, f"{STATE_FILE} is the state of step {state['step']}, not of step {step}")
    if not all_finite(state["trainable"].values()):
        raise DamagedCheckpoint(folder, "its weights hold NaN or infinite values")
    return state


def find_resume_point(
    out: Path, resume: str | None, log: Callable[[str], None]
) -> tuple[Path, dict, list[Path]] | None:
    """The checkpoint to resume from, its state and the damaged checkpoints passed over; None when
    there is nothing to resume (no ``resume``, or ``latest`` with no checkpoint yet).

    ``latest``: the newest intact checkpoint; each damaged newer one is reported through ``log``
    (which folder, why). None intact: TrainingError listing why. A folder named explicitly must
    be intact itself (TrainingError): the user asked for that one."""
    if resume is None:
        return None
    recover_checkpoints(out)
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise TrainingError(f"--resume {resume}: no such checkpoint folder; use 'latest' or a step-N folder")
        try:
            return path, read_checkpoint(path), []
        except DamagedCheckpoint as error:
            raise TrainingError(f"--resume {resume}: cannot resume from it: {error.reason}") from None
    candidates = checkpoint_dirs(out)
    damaged: list[Path] = []
    reasons: list[str] = []
    for folder in reversed(candidates):
        try:
            state = read_checkpoint(folder)
        except DamagedCheckpoint as error:
            log(f"warning: damaged checkpoint, passed over: {error}")
            damaged.append(folder)
            reasons.append(str(error))
            continue
        return folder, state, damaged
    if candidates:
        raise TrainingError(
            f"--resume latest: no intact checkpoint in {out / 'checkpoints'}: {'; '.join(reasons)}; "
            "move them away to start from scratch"
        )
    return None  # nothing yet: start from scratch


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint ``step-N`` to ``damaged-step-N`` (kept for inspection, no longer
    counted as a checkpoint: neither resumed from nor counted by ``keep_checkpoints``)."""
    target = folder.with_name(f"damaged-{folder.name}")
    n = 1
    while target.exists():
        target = folder.with_name(f"damaged-{folder.name}-{n}")
        n += 1
    os.replace(folder, target)
    return target


def restore_trainable(parameters: dict[str, nn.Parameter], saved: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy a checkpoint's trainable tensors (``saved``, read from ``folder``) into ``parameters``
    (this process's shards of them under FSDP). TrainingError when it lacks one or holds one of
    another shape: a checkpoint of another model (another --base) used to fail deep in copy_."""
    missing = set(parameters) - set(saved)
    if missing:
        raise TrainingError(
            f"{folder}: the checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
        )
    for name, parameter in parameters.items():
        shape = tuple(saved[name].shape)
        if shape != tuple(parameter.shape):  # a sharded parameter's shape is the whole one
            raise TrainingError(
                f"{folder}: the checkpoint's {name} is {list(shape)}, this run's {list(parameter.shape)}: "
                "it was trained for another model"
            )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(shard_like(saved[name], parameter))

"""Checkpoints: written whole or not at all, checked before a run resumes from them."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoints import TORCH_LOAD_ERRORS, torch_load_reason
from ..files import atomic_file
from ..hashing import file_sha256
from .config import CHECKPOINT_PREFIX, MANIFEST_FILE, STATE_FILE, TrainingError
from .optim import all_finite

# ---------------------------------------------------------------------------------------------
# Checkpoints


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
    SHA-256 (``checkpoint.json``), all under a temporary name renamed into place; then all but the
    last ``keep`` checkpoints are removed.

    The rename makes a checkpoint appear whole or not at all; the manifest lets a later run tell a
    checkpoint damaged since (a truncated copy, a disk error) from an intact one. Weights that are
    not finite are never written (TrainingError): a NaN checkpoint would become the one a resumed
    run starts from. A failure to write (disk full) removes the partial checkpoint and raises
    TrainingError; the checkpoints written before are kept."""
    if not all_finite(state["trainable"].values()):
        raise TrainingError(f"step {step}: the weights hold NaN or infinite values; no checkpoint written")
    folder = out / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    temporary = folder / f".{final.name}.tmp-{os.getpid()}"
    replaced = folder / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        with open(temporary / STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        manifest = {
            "step": step,
            "files": {
                STATE_FILE: {
                    "bytes": (temporary / STATE_FILE).stat().st_size,
                    "sha256": file_sha256(temporary / STATE_FILE),
                }
            },
        }
        with atomic_file(temporary / MANIFEST_FILE, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # the same step saved again (a resumed run): replace it
            os.replace(final, replaced)
        os.replace(temporary, final)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if replaced.exists() and not final.exists():
            os.replace(replaced, final)  # put the one it was to replace back
        raise TrainingError(
            f"cannot write the checkpoint {final} ({error.strerror or error}); the checkpoints written before are kept"
        ) from None
    shutil.rmtree(replaced, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-keep]:
        if old != final:  # never the one just written (the newest, unless newer ones are left over)
            shutil.rmtree(old, ignore_errors=True)
    recover_checkpoints(out)
    return final


def recover_checkpoints(out: Path) -> None:
    """Tidy what a run killed while saving left behind: a half-written ``.step-N.tmp-PID`` goes; a
    ``.step-N.old-PID`` (the checkpoint a resave of step N was replacing) is put back when step N
    is missing (killed between the two renames), and removed otherwise."""
    folder = out / "checkpoints"
    for stale in folder.glob(f".{CHECKPOINT_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for replaced in folder.glob(f".{CHECKPOINT_PREFIX}*.old-*"):
        final = folder / replaced.name[1:].rsplit(".old-", 1)[0]
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(replaced, final)


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

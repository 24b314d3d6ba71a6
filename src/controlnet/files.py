"""Writing files and folders so that a reader never sees half of one.

Every temporary file or folder is created here with the permissions any new file or folder gets
(0o666 or 0o777 less the umask), never with ``tempfile.mkstemp``'s 0o600 or ``mkdtemp``'s 0o700:
a rename keeps a file's mode, so a model written through a private temporary file would stay
unreadable to the user's group for good.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _temporary_name(path: Path, kind: str = "tmp") -> Path:
    # Hidden and random: never confused with a real file, never shared by two writers.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{kind}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new empty file beside ``path``, for writers that take a file name (safetensors'
    ``save_file``, ``torch.save``): when the block ends without an error, the file is synced and
    renamed over ``path``; otherwise it is removed. A crash at any moment leaves either the old file
    or the new one, never a part of it."""
    path = Path(path)
    temporary = _temporary_name(path)
    # O_EXCL: the name is ours alone; mode 0o666 is reduced by the umask as for any new file.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    # That mode, read back rather than computed: reading the umask means changing it, a race with
    # other threads. Set again after writing: some writers (safetensors) replace the file with
    # their own temporary one, made 0o600.
    mode = stat.S_IMODE(os.stat(temporary).st_mode)
    done = False
    try:
        yield temporary
        os.chmod(temporary, mode)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        done = True
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` "wb" or "w"); when the block
    ends without an error, sync it and rename it over ``path``; otherwise remove it (`atomic_path`)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes with mode 'wb' or 'w', not {mode!r}")
    with atomic_path(path) as temporary, open(temporary, mode, encoding=encoding) as handle:
        yield handle


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new empty folder beside ``path`` to fill; when the block ends without an error, it takes
    ``path``'s place, and whatever was at ``path`` is removed only then; otherwise the new folder is
    removed and ``path`` is left as it was. The caller decides whether replacing ``path`` is allowed.

    The swap is two renames (old aside, new in); should the second fail, the old one is put back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    os.mkdir(temporary)  # 0o777 less the umask, as any new folder
    try:
        yield temporary
        _swap_in(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _swap_in(new: Path, path: Path) -> None:
    old = None
    if path.exists() or path.is_symlink():
        old = _temporary_name(path, "old")
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        # The new folder is in place: a leftover hidden folder is untidy, not worth failing over.
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


class NotWritable(ValueError):
    """A folder that cannot be made or written to; the message is one line, for the user."""


def writable_folder(path: str | os.PathLike[str], what: str = "") -> Path:
    """Create ``path`` (and its parents) and prove it writable, before anything slow runs;
    NotWritable naming ``what`` (an option, say) and the reason otherwise."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    for folder in (path, *path.parents):  # the first that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise NotWritable(f"{name}: cannot write there: {folder} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise NotWritable(f"{name}: cannot write there ({error.strerror or error})") from None
    return path

"""The one way this package writes a file or a folder: never half of one.

Every writer (PNGs, JSON, safetensors, torch.save checkpoints, whole model folders) writes under a
hidden temporary name beside its target; only a complete, synced result is renamed over the target.
Three context managers, one mechanism, one for each way a writer wants its output:

- ``atomic_file(path, "wb" | "w")``: an open stream (PNG bytes, JSON text);
- ``atomic_path(path)``: a temporary file *name*, for writers that open the file themselves
  (safetensors' ``save_file``, ``torch.save``);
- ``atomic_folder(path)``: a temporary folder to fill (a diffusers model).

A failure at any moment leaves either the old file or folder, whole, or the new one: never a part
of one. An exception removes the temporary at once. A process killed outright (``kill -9``, a power
cut) cannot, so each temporary's name records which writer made it (host and process id), and the
next write to the same target removes those of writers that are no longer running, and puts back a
folder that a killed swap had moved aside (`_tidy`).

Every temporary file or folder is created here with the permissions any new file or folder gets
(0o666 or 0o777 less the umask), never with ``tempfile.mkstemp``'s 0o600 or ``mkdtemp``'s 0o700:
a rename keeps a file's mode, so a model written through a private temporary file would stay
unreadable to the user's group for good.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# ".{target name}.{host}-{pid}-{random}.{tmp|old}": hidden, never confused with a real file, never
# shared by two writers, and telling whose it is once that writer is gone.
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{12}\.(?P<kind>tmp|old)")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` "wb", or "w" for text, UTF-8
    unless ``encoding`` says otherwise); when the block ends without an error it is synced and
    renamed over ``path``, otherwise removed (as `atomic_path`)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes with mode 'wb' or 'w', not {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as temporary, open(temporary, mode, encoding=encoding) as handle:
        yield handle


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new empty file beside ``path``, for writers that take a file name (safetensors'
    ``save_file``, ``torch.save``): when the block ends without an error, the file is synced and
    renamed over ``path``; otherwise it is removed. A crash at any moment leaves either the old file
    or the new one, never a part of it."""
    path = Path(path)
    _tidy(path)
    temporary = _temporary_name(path, "tmp")
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
        _sync_file(temporary)
        os.replace(temporary, path)
        done = True
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new empty folder beside ``path`` (parents made as needed) to fill; when the block ends
    without an error, its files are synced and it takes ``path``'s place, and whatever was at
    ``path`` is removed only then; otherwise the new folder is removed and ``path`` is left as it
    was. The caller decides whether replacing ``path`` is allowed.

    The swap is two renames (old aside, new in); should the second fail, the old one is put back,
    and should the process die between them, the next write to ``path`` puts it back first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _tidy(path)
    temporary = _temporary_name(path, "tmp")
    os.mkdir(temporary)  # 0o777 less the umask, as any new folder
    try:
        yield temporary
        for folder, _, names in os.walk(temporary):
            for name in names:
                if not os.path.islink(os.path.join(folder, name)):
                    _sync_file(Path(folder, name))
        _swap_in(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _sync_folder(path.parent)


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
    if old is not None:
        _remove(old)


def _temporary_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}-{secrets.token_hex(6)}.{kind}")


@functools.cache
def _host() -> str:
    # A process id names a writer only on its own machine (a shared network folder has others).
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tidy(path: Path) -> None:
    """Remove what killed writers left beside ``path``: their temporary files and folders, and a
    folder a killed swap had moved aside, which is put back if nothing took ``path``'s place."""
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return  # a missing or unreadable folder: the write itself will say so
    for entry in entries:
        found = _TEMPORARY.fullmatch(entry.name)
        if found is None or found["target"] != path.name or _writer_alive(found["host"], int(found["pid"])):
            continue
        left = Path(entry.path)
        if found["kind"] == "old" and not (path.exists() or path.is_symlink()):
            with contextlib.suppress(OSError):  # another writer may have put it back first
                os.rename(left, path)
        else:
            _remove(left)


def _writer_alive(host: str, pid: int) -> bool:
    if host != _host() or os.name != "posix":  # not ours to judge (os.kill on Windows terminates)
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but another user's
    return True


def _remove(path: Path) -> None:
    # Only ever a leftover beside a target already written: untidy if it stays, not worth failing over.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _sync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Best effort: the rename has happened and is what
    readers see; some file systems cannot sync a folder, and that is no reason to fail a write."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


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

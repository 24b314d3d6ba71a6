"""The files ``controlnet serve`` keeps on disk: one private folder that the server owns and removes.

Gradio serves files by path. So that it can never be made to serve anything else, everything the
page uploads, shows or offers for download lives under this one folder: Gradio's upload area and
cache (set with ``GRADIO_TEMP_DIR``), the detected maps and the images with their settings. The
folder is made for the server (mode 0700, in the system's temporary folder), kept within bounds
while it runs (a number of files, a number of bytes and an age: the oldest go first), and removed
when the server stops, or when its start fails. The JSON API keeps nothing: its results are
encoded in memory and returned inline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Retention:
    """How much the page's folder may hold; the oldest files are removed first."""

    max_files: int = 1000
    max_bytes: int = 2 * 2**30
    max_age_s: float = 3600.0  # a result can be downloaded for an hour


class ServerFiles:
    """The server's private folder: ``gradio`` holds Gradio's uploads and cache, ``results`` (inside
    it, so Gradio serves the files where they are, without a copy) the page's maps and images."""

    def __init__(self, retention: Retention | None = None, parent: str | os.PathLike[str] | None = None) -> None:
        self.retention = retention or Retention()
        # mkdtemp: a new folder with a random name, mode 0700, so no other user reads or plants files.
        self.root = Path(tempfile.mkdtemp(prefix="controlnet-serve-", dir=parent)).resolve()
        self.gradio = self.root / "gradio"
        self.results = self.gradio / "results"
        self.results.mkdir(parents=True, mode=0o700)
        self._lock = threading.Lock()
        self._on_close: list[Callable[[], None]] = []
        # Removed by close(), or else when this object is collected or the interpreter exits: an
        # app that was built but never served (so never shut down) leaves nothing behind either.
        self._remove = weakref.finalize(self, _remove, str(self.root), self._on_close)

    @property
    def closed(self) -> bool:
        return not self._remove.alive

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the folder is removed (it must not refer to this object)."""
        self._on_close.append(callback)

    def contains(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path``, with every symlink and ``..`` resolved, lies inside the folder."""
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):  # ValueError: a NUL in the path
            return False
        return real == self.root or self.root in real.parents

    def prune(self, now: float | None = None) -> int:
        """Remove files older than the retention's age, then the oldest until within its count and
        bytes; returns how many were removed. Empty folders that Gradio made go too."""
        now = time.time() if now is None else now
        with self._lock:
            files = sorted(self._files(), key=lambda item: item[1])  # oldest first
            removed = 0
            total = sum(size for _, _, size in files)
            for index, (path, mtime, size) in enumerate(files):
                remaining = len(files) - index
                if (
                    now - mtime <= self.retention.max_age_s
                    and remaining <= self.retention.max_files
                    and total <= self.retention.max_bytes
                ):
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
                total -= size
            self._remove_empty_folders(now)
        return removed

    def close(self) -> None:
        """Remove the folder and everything in it."""
        self._remove()

    def _files(self) -> list[tuple[Path, float, int]]:
        found = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    info = path.lstat()
                    found.append((path, info.st_mtime, info.st_size))
        return found

    def _remove_empty_folders(self, now: float) -> None:
        keep = {self.root, self.gradio, self.results}
        for folder, _, _ in os.walk(self.root, topdown=False):  # children first
            if Path(folder) in keep:
                continue
            with contextlib.suppress(OSError):  # gone already, or not empty: rmdir refuses
                # A folder made in the last minute may be about to receive an upload: leave it.
                if now - os.path.getmtime(folder) > 60:
                    os.rmdir(folder)


def _remove(root: str, callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        callback()
    shutil.rmtree(root, ignore_errors=True)

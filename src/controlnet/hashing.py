"""SHA-256 of model files and diffusers folders, cached, so that a result's metadata can name the
exact weights it was made with (AUTOMATIC1111 shows the first 10 hex digits as the "short hash").

    >>> model_sha256("v1-5-pruned-emaonly.safetensors")  # 64 hex digits; fast the second time

Hashing a 4 GB checkpoint takes seconds, so results are cached in
``$XDG_CACHE_HOME/controlnet/hashes.json`` (default ``~/.cache/controlnet/hashes.json``). An entry
is keyed by the file's resolved path and is used only while the file's size and mtime_ns are
unchanged. The cache is an optimisation only: a missing, corrupt or unwritable cache never makes
hashing fail; a corrupt one is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .files import atomic_file

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough to be fast, small enough to never hold a model in memory
SHORT_HASH_LENGTH = 10  # AUTOMATIC1111's short hash
# The files of a diffusers folder that hold weights; configs and tokenizer files are not hashed.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth"})


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes as 64 hex digits, read in 1 MiB chunks (no cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(sha256: str) -> str:
    """The first 10 hex digits, as AUTOMATIC1111 shows a model hash."""
    return sha256[:SHORT_HASH_LENGTH]


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/controlnet/hashes.json``, or ``~/.cache/controlnet/hashes.json``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "controlnet" / "hashes.json"


def cached_file_sha256(path: str | os.PathLike, cache_file: Path | None = None) -> str:
    """`file_sha256` through the cache (see the module docstring)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    cache_file = cache_file or cache_path()
    entries = _read_cache(cache_file)
    entry = entries.get(str(resolved))
    if entry is not None and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry["sha256"]
    sha256 = file_sha256(resolved)
    # Re-read just before writing so a concurrent run's new entries are kept (a lost race only
    # costs a rehash later, never a wrong hash: every entry carries its own size and mtime).
    entries = _read_cache(cache_file)
    entries[str(resolved)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    _write_cache(cache_file, entries)
    return sha256


def folder_sha256(folder: str | os.PathLike, cache_file: Path | None = None) -> str:
    """One hash for a diffusers folder: SHA-256 over its weights files' sorted
    ``relative/path:sha256`` lines, each ending in a newline (hidden files, such as unfinished
    temporary files, are skipped). ValueError if the folder holds no weights file."""
    folder = Path(folder)
    lines = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix in WEIGHT_SUFFIXES and path.is_file() and not any(p.startswith(".") for p in relative.parts):
            lines.append(f"{relative.as_posix()}:{cached_file_sha256(path, cache_file)}\n")
    if not lines:
        raise ValueError(f"{folder}: no weights file to hash (looked for {', '.join(sorted(WEIGHT_SUFFIXES))})")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def model_sha256(path: str | os.PathLike, cache_file: Path | None = None) -> str:
    """The SHA-256 of a model file, or `folder_sha256` of a diffusers folder; cached."""
    path = Path(path)
    return folder_sha256(path, cache_file) if path.is_dir() else cached_file_sha256(path, cache_file)


def _read_cache(cache_file: Path) -> dict[str, dict]:
    """The cache's valid entries; anything unreadable or malformed counts as absent."""
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: entry for key, entry in data.items() if _valid_entry(entry)}


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    sha256 = entry.get("sha256")
    return (
        type(entry.get("size")) is int
        and type(entry.get("mtime_ns")) is int
        and isinstance(sha256, str)
        and len(sha256) == 64
        and all(c in "0123456789abcdef" for c in sha256)
    )


def _write_cache(cache_file: Path, entries: dict[str, dict]) -> None:
    """Write atomically (`files.atomic_file`: a temporary file in the same folder, then a rename),
    so a reader never sees half a file; failures are ignored: the cache only saves time."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache_file, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
            f.write("\n")
    except OSError:
        pass

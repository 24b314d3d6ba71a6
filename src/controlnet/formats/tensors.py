"""Tensor files: read safely, written atomically.

Read: safetensors first; a pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) only through
``torch.load(weights_only=True)``, which builds tensors and refuses anything that would import or
call code. A refused pickle gets our own one-line message naming what it wanted to run (read from
its opcodes, nothing executed), never torch's advice to pass ``weights_only=False``. Files that are
not checkpoints (text, random bytes, empty or truncated zips, lying safetensors headers, TorchScript
archives) and zips compressed other than torch.save's way are refused in one line
(`CheckpointError`). `check_finite` refuses weights holding NaN or infinite values.

Written: `save_safetensors`, through `files.atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_path
from .errors import CheckpointError, first_line, short_list

StateDict = dict[str, torch.Tensor]

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ---------------------------------------------------------------------------------------------
# Reading


def read_state_dict(
    path: str | os.PathLike, wrappers: tuple[str, ...] = ("state_dict",)
) -> tuple[StateDict, dict[str, str]]:
    """All tensors of a ``.safetensors`` or (tensor-only) pickle file, and the safetensors metadata.

    A pickle's dictionary found under one of ``wrappers`` replaces the whole (Lightning checkpoints
    keep the weights under ``state_dict``; some annotator files under ``model``); non-tensor entries
    are dropped.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a weights file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        tensors, metadata = _read_safetensors(path)
    elif path.suffix in _PICKLE_SUFFIXES or zipfile.is_zipfile(path):
        tensors, metadata = _read_pickle(path, wrappers), {}
    else:
        raise CheckpointError(
            f"{path}: unknown file type {path.suffix!r}; expected .safetensors or a PyTorch checkpoint "
            f"({', '.join(_PICKLE_SUFFIXES)})"
        )
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors, metadata


def _looks_like_safetensors(path: Path) -> bool:
    # An 8-byte little-endian header length, then a JSON header starting with '{'.
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(error)})") from None


def read_keys(path: Path) -> list[str]:
    """The tensor names of a file: from the header alone for safetensors, else by reading it."""
    if path.is_file() and (path.suffix == ".safetensors" or _looks_like_safetensors(path)):
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(error)})") from None
        if not keys:
            raise CheckpointError(f"{path}: holds no tensors")
        return keys
    return list(read_state_dict(path)[0])


# ---------------------------------------------------------------------------------------------
# Pickles: tensors only, nothing in them run


class _Ignored:
    """Stands in for the training bookkeeping objects Lightning pickles beside the weights
    (``callbacks``); their state is dropped, no code of theirs is imported or run."""

    def __setstate__(self, state: object) -> None:
        pass


def _inert_globals() -> list:
    """Globals a tensor-only checkpoint may name that build inert data, allowed on top of torch's
    ``weights_only`` list: Lightning's ModelCheckpoint callback (in SD 1.x training checkpoints,
    replaced by :class:`_Ignored`) and numpy scalars and dtypes (``global_step`` in some files)."""
    core = getattr(np, "_core", None) or np.core  # renamed in numpy 2
    scalar = core.multiarray.scalar
    allowed: list = [(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype]
    allowed += [(np.dtype, "numpy.dtype")] + [type(np.dtype(c)) for c in "?bhilqBHILQefdgFD"]
    for name in (
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    ):
        allowed.append((_Ignored, name))
    return allowed


_ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells its zip format from the legacy one
# What torch's weights_only unpickler allows besides torch's own names (torch 2.13); used only to
# name, in a refusal, the globals that made it refuse.
_TORCH_PLAIN_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "_codecs.encode",
        "builtins.set",
        "builtins.bytearray",
        "builtins.complex",
    }
)
# What torch.load may raise on a damaged file besides UnpicklingError: its legacy-format reader lets
# the errors of whatever it trips over through (found by truncating and corrupting real files).
TORCH_LOAD_ERRORS = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    OverflowError,
    MemoryError,
    struct.error,
    zipfile.BadZipFile,
)


def _read_pickle(path: Path, wrappers: tuple[str, ...]) -> StateDict:
    with path.open("rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC or zipfile.is_zipfile(path):
        memory_map = _check_torch_zip(path)
    elif head[:1] == pickle.PROTO and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        memory_map = False  # the legacy torch.save format: pickles in a row, not mappable
    else:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: expected a zip archive written by torch.save or "
            f"a pickle, but the file starts with {_first_bytes(path)}"
        )
    try:
        with torch.serialization.safe_globals(_inert_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=memory_map)
    except pickle.UnpicklingError:
        # weights_only refused the pickle (or could not parse it). torch's text varies between
        # versions and advises weights_only=False, the one thing never to do with such a file:
        # it is never shown; what the pickle names is read here, from its opcodes.
        raise CheckpointError(_refusal(path)) from None
    except TORCH_LOAD_ERRORS as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({torch_load_reason(error)})") from None
    while isinstance(loaded, Mapping):
        inner = next((w for w in wrappers if isinstance(loaded.get(w), Mapping)), None)
        if inner is None:
            break
        loaded = loaded[inner]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a dictionary of tensors")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _first_bytes(path: Path) -> str:
    with path.open("rb") as f:
        return repr(f.read(8))


_ZIP_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


def _check_torch_zip(path: Path) -> bool:
    """Refuse a zip that torch.save did not write (one line); True when every entry is stored.

    torch.load's memory-mapped path reads a storage's bytes straight from the file: from a
    compressed entry it would read the compressed bytes as weights. Deflated entries are read
    correctly by its ordinary path (which inflates), so they are loaded without the memory map.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise CheckpointError(
            f"{path}: a damaged or truncated zip archive ({first_line(error)}); "
            "a PyTorch checkpoint is a complete zip archive written by torch.save"
        ) from None
    names = [entry.filename.rsplit("/", 1)[-1] for entry in entries]
    if "constants.pkl" in names:
        raise CheckpointError(
            f"{path}: a TorchScript program, not a checkpoint of weights; it is not loaded (it would run code)"
        )
    if "data.pkl" not in names:
        raise CheckpointError(f"{path}: a zip archive without data.pkl, not a checkpoint written by torch.save")
    methods = {entry.compress_type for entry in entries} - {zipfile.ZIP_STORED}
    unreadable = sorted(methods - {zipfile.ZIP_DEFLATED})
    if unreadable:
        named = ", ".join(_ZIP_METHODS.get(m, f"method {m}") for m in unreadable)
        raise CheckpointError(
            f"{path}: zip entries compressed with {named}; a PyTorch checkpoint's entries are stored or "
            "deflated: save it again with torch.save"
        )
    return not methods


def torch_load_reason(error: BaseException) -> str:
    """One line on why torch.load failed, without torch's advice to pass weights_only=False."""
    reason = first_line(error)
    # torch's loader errors may end in advice to pass weights_only=False: never passed on.
    return type(error).__name__ if "weights_only" in reason else reason


def _refusal(path: Path) -> str:
    names = _code_globals(path)
    if names:
        return (
            f"{path}: refused: this pickle would run code ({short_list(names)}); only tensor-only checkpoints "
            "are loaded, nothing in them is executed. Prefer a .safetensors file"
        )
    return (
        f"{path}: refused: not a tensor-only checkpoint (its pickle holds objects other than tensors and "
        "plain data, or is damaged); nothing in it was executed. Prefer a .safetensors file"
    )


def _code_globals(path: Path) -> list[str]:
    """The functions and classes a pickle names beyond what tensors need, read from its opcodes
    (``pickletools``: nothing is built, imported or run). Best effort, for the error message only."""
    allowed = _TORCH_PLAIN_GLOBALS | _inert_global_names()
    found: list[str] = []
    try:
        with _pickle_stream(path) as stream:
            # A legacy file is a few pickles in a row (magic number, versions, the object, storage
            # keys) then raw bytes; a zip's data.pkl is one pickle.
            for _ in range(4):
                _scan_pickle(stream, found)
    except (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile, RuntimeError):
        pass  # the end of the pickles, or a damaged one: what was found so far is kept
    unsafe = [name for name in found if not (name.startswith("torch.") or name in allowed)]
    return list(dict.fromkeys(unsafe))


def _inert_global_names() -> frozenset[str]:
    names = set()
    for entry in _inert_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return frozenset(names)


@contextlib.contextmanager
def _pickle_stream(path: Path) -> Iterator[IO[bytes]]:
    """The pickle bytes of a checkpoint as a stream: a zip's data.pkl, or the file itself."""
    if not zipfile.is_zipfile(path):
        with path.open("rb") as stream:
            yield stream
        return
    with zipfile.ZipFile(path) as archive:
        names = [e.filename for e in archive.infolist() if e.filename.rsplit("/", 1)[-1] == "data.pkl"]
        if not names:
            raise ValueError("no data.pkl")
        with archive.open(names[0]) as stream:
            yield stream


def _python3_name(name: str) -> str:
    # Protocol 2 pickles (torch.save's) spell builtins as Python 2 did.
    return "builtins." + name.removeprefix("__builtin__.") if name.startswith("__builtin__.") else name


_STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


def _scan_pickle(stream: IO[bytes], found: list[str]) -> None:
    """Append to ``found`` the ``module.name`` of every global one pickle imports: GLOBAL and INST
    name theirs; STACK_GLOBAL takes the last two strings pushed, maybe fetched from the memo."""
    strings: list[str] = []
    memo: dict[int, object] = {}
    last: object = None  # the value last pushed, when it is a string
    for opcode, arg, _position in pickletools.genops(stream):
        name = opcode.name
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = last
            continue  # stores the top of the stack, pushes nothing
        if name in ("GLOBAL", "INST"):
            found.append(_python3_name(str(arg).replace(" ", ".")))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(_python3_name(f"{strings[-2]}.{strings[-1]}"))
        if name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(int(arg))
        else:
            last = arg if name in _STRING_OPCODES else None
        if isinstance(last, str):
            strings.append(last)


# ---------------------------------------------------------------------------------------------
# Weights that are numbers

# The exponent bits of the 16-bit float formats: all set means infinite or NaN.
_EXPONENT_MASKS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds NaN or an infinity, read in place: no float32 copy of 16-bit weights.

    numpy's isfinite for float32/64, a test of the exponent bits for float16/bfloat16: 0.55 s for
    the 1.43 billion values of an SD 1.5 ControlNet full file (float16, bfloat16 or float32, 2-core
    CPU), where ``torch.isfinite(t).all()`` takes 3.9 to 12.7 s.
    """
    tensor = tensor.detach()
    mask = _EXPONENT_MASKS.get(tensor.dtype)
    if mask is not None:
        bits = tensor.view(torch.int16).numpy()
        return bool(np.any((bits & mask) == mask))
    if tensor.dtype in (torch.float32, torch.float64):
        return not bool(np.isfinite(tensor.numpy()).all())
    return not bool(torch.isfinite(tensor).all())  # other float types (float8, ...): rare


def check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that hold NaN or infinite values: a damaged file (a failed training step,
    a bad conversion or merge) that would otherwise give black or noise images without a word."""
    damaged = [key for key, tensor in tensors.items() if tensor.is_floating_point() and has_non_finite(tensor)]
    if damaged:
        raise CheckpointError(
            f"{path}: {len(damaged)} tensors hold NaN or infinite values (first: {damaged[0]}); the file is damaged"
        )


# ---------------------------------------------------------------------------------------------
# Writing


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically (`files.atomic_path`): never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata={"format": "pt", **metadata})

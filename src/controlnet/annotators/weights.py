"""The annotators' weight files: one folder, the files under their original names, read safely and
strictly, never downloaded.

The folder is, first found: the command's ``--annotators-dir``, the ``CONTROLNET_ANNOTATORS``
environment variable, ``~/.cache/controlnet/annotators``. A file is found under its original name
(``ControlNetHED.pth``) or with a ``.safetensors`` suffix instead (``ControlNetHED.safetensors``).
It is read as every weight file of this package is (formats/tensors.py: safetensors, or a pickle
through ``weights_only``), then checked to be the network it is named for, by keys only that
network's file holds (`WeightFile.markers`): a hand model saved as ``body_pose_model.pth`` is named
as the hand model. `load_strict` then fills the network, every key matched, every shape equal.
Every failure is one line (`AnnotatorWeightsError`) naming the file, the folder and what to do;
`check_files` names every missing file of an annotator that reads several (openpose_full: three).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..formats.errors import CheckpointError, short_list
from ..formats.tensors import StateDict, check_finite, read_state_dict

ENV_VAR = "CONTROLNET_ANNOTATORS"
FOLDER_OPTION = "--annotators-dir"


class AnnotatorWeightsError(ValueError):
    """A weight file an annotator needs is missing, unreadable or not the expected network; the
    message is one line, for the user."""


def default_folder() -> Path:
    """``~/.cache/controlnet/annotators``."""
    return Path.home() / ".cache" / "controlnet" / "annotators"


def annotators_folder(folder: str | os.PathLike | None = None) -> Path:
    """The folder annotator weights are read from: ``folder`` when given, else the environment
    variable ``CONTROLNET_ANNOTATORS`` when set and not empty, else `default_folder()`."""
    if folder is not None and str(folder) != "":
        return Path(folder).expanduser()
    from_env = os.environ.get(ENV_VAR, "")
    return Path(from_env).expanduser() if from_env else default_folder()


def _where(folder: Path) -> str:
    return f"{folder} (the folder set by {FOLDER_OPTION} or {ENV_VAR}; default {default_folder()})"


@dataclass(frozen=True)
class WeightFile:
    """One weight file an annotator reads, as its users have it."""

    name: str  # the original file name, e.g. "ControlNetHED.pth"
    network: str  # what it holds, for messages: "the HED soft-edge network"
    source: str  # where people get it (a URL), for the message when it is missing
    # Keys (after unwrapping and `prefix` removal) that this network's file holds and the other
    # annotator files do not: how a wrong file is told from the right one.
    markers: tuple[str, ...]
    # (key, shape) of marker keys whose shape tells this file from another with the same keys (the
    # OpenPose hand and face networks differ only in their channels); checked with the markers.
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    prefix: str = "module."  # removed from every key that starts with it (DataParallel's prefix)
    wrappers: tuple[str, ...] = ("state_dict", "model")  # dictionaries the weights may be kept under
    size: int | None = None  # the original file's size in bytes, for the docs

    @property
    def safetensors_name(self) -> str:
        return Path(self.name).stem + ".safetensors"

    def find(self, folder: Path) -> Path | None:
        """The file in ``folder`` under its original name or as ``.safetensors``; None if neither."""
        for name in (self.name, self.safetensors_name):
            path = folder / name
            if path.is_file():
                return path
        return None

    def path(self, folder: Path) -> Path:
        """The file in ``folder``, or AnnotatorWeightsError saying where to get it and put it."""
        path = self.find(folder)
        if path is None:
            raise missing_files_error([self], folder)
        return path

    def read(self, folder: Path) -> StateDict:
        """The file's tensors, unwrapped and without `prefix`, checked to be this network's and finite."""
        path = self.path(folder)
        try:
            tensors, _ = read_state_dict(path, self.wrappers)
            check_finite(tensors, path)
        except CheckpointError as error:
            raise AnnotatorWeightsError(f"{error} (expected {self.network})") from None
        tensors = {_without(key, self.prefix): value for key, value in tensors.items()}
        if not self.holds(tensors):
            raise AnnotatorWeightsError(f"{path}: {self._not_this(tensors)}")
        return tensors

    def _not_this(self, tensors: StateDict) -> str:
        absent = [m for m in self.markers if m not in tensors]
        shaped = [
            f"{k} {tuple(tensors[k].shape)} (expected {s})" for k, s in self.shapes if _wrong_shape(tensors, k, s)
        ]
        text = f"not {self.network}: " + (f"it lacks {short_list(absent)}" if absent else f"its {short_list(shaped)}")
        others = [w for w in known_files() if w.name != self.name and w.markers and w.holds(tensors)]
        if others:
            text += f"; it looks like {others[0].name} ({others[0].network})"
        return text

    def holds(self, tensors: StateDict) -> bool:
        """Whether ``tensors`` (already without `prefix`) hold this network's marker keys, each of
        the shape `shapes` gives it."""
        keys = all(_without(m, self.prefix) in tensors for m in self.markers)
        return keys and not any(_wrong_shape(tensors, _without(k, self.prefix), s) for k, s in self.shapes)


def check_files(weights: Sequence[WeightFile], folder: Path) -> None:
    """Nothing when ``folder`` holds every file of ``weights``; else AnnotatorWeightsError naming
    all the missing ones in one line (openpose_full's three, not the first alone)."""
    missing = [w for w in weights if w.find(folder) is None]
    if missing:
        raise missing_files_error(missing, folder)


def missing_files_error(missing: Sequence[WeightFile], folder: Path) -> AnnotatorWeightsError:
    """The one-line error for ``missing`` files (at least one) absent from ``folder``: each file and
    what it holds, the folder searched, and where to get them."""
    if len(missing) == 1:
        (weight,) = missing
        return AnnotatorWeightsError(
            f"{weight.name} ({weight.network}) is not in {_where(folder)}; "
            f"get it from {weight.source} and put it there (or its .safetensors version)"
        )
    files = _and([f"{w.name} ({w.network})" for w in missing])
    sources = list(dict.fromkeys(w.source for w in missing))
    get = f"them from {sources[0]}" if len(sources) == 1 else _and([f"{w.name} from {w.source}" for w in missing])
    return AnnotatorWeightsError(
        f"{files} are not in {_where(folder)}; get {get} and put them there (or their .safetensors versions)"
    )


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _wrong_shape(tensors: StateDict, key: str, shape: tuple[int, ...]) -> bool:
    return key in tensors and tuple(tensors[key].shape) != tuple(shape)


def _without(key: str, prefix: str) -> str:
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


def known_files() -> list[WeightFile]:
    """Every weight file the registered annotators read (imported when asked: the registry imports
    this module)."""
    from . import ANNOTATORS

    files: dict[str, WeightFile] = {}
    for annotator in ANNOTATORS.values():
        for weight in annotator.weights:
            files.setdefault(weight.name, weight)
    return list(files.values())


_BN_COUNTER = ".num_batches_tracked"


def load_strict(module: nn.Module, tensors: StateDict, weight: WeightFile, path: Path | None = None) -> nn.Module:
    """``module`` with every parameter and buffer from ``tensors``: no key missing, none left over,
    every shape equal; else AnnotatorWeightsError naming the file and the first differences."""
    where = path or weight.name
    expected = module.state_dict()
    # BatchNorm's step counter is absent from files saved before torch 0.4.1; torch fills it in
    # (BatchNorm's own loading) and inference never reads it, so its absence is no mismatch.
    counters = {k: torch.zeros_like(v) for k, v in expected.items() if k.endswith(_BN_COUNTER) and k not in tensors}
    tensors = {**tensors, **counters}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [
        f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing ({short_list(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({short_list(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} of other shapes ({short_list(shapes)})")
    if problems:
        raise AnnotatorWeightsError(f"{where} does not match {weight.network}: {'; '.join(problems)}")
    with torch.no_grad():
        module.load_state_dict({k: tensors[k] for k in expected}, strict=True)
    return module


def load_network(weight: WeightFile, folder: Path, make: Callable[[], nn.Module], device: str, dtype: str) -> nn.Module:
    """The network ``make()`` builds, filled strictly from ``weight`` in ``folder``, then placed on
    ``device`` in ``dtype`` (with the memory layout runtime.py's policy picks), in inference mode."""
    from .. import runtime

    tensors = weight.read(folder)
    with torch.device("meta"):
        module = make()  # no memory for the random weights about to be replaced
    module = module.to_empty(device="cpu")
    unfilled = set(dict(module.named_buffers())) - set(module.state_dict())
    if unfilled:  # a programming error: non-persistent buffers would stay uninitialised memory
        raise RuntimeError(f"{type(module).__name__} has non-persistent buffers {sorted(unfilled)}; compute them")
    load_strict(module, tensors, weight, weight.find(folder))
    torch_dtype = runtime.DTYPES[dtype]
    return runtime.prepare(module, device, torch_dtype, runtime.use_channels_last(device, torch_dtype))

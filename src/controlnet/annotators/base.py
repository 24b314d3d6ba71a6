"""The annotator contract: a named function from an RGB image to a control image, with parameters
described well enough for a UI slider or a CLI flag. Network annotators name their weight files
(`weights.WeightFile`) and build their function from a `Runtime` (the weights folder, the device and
dtype) on first use, once per runtime."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..imaging.images import HWC3
from ..imaging.resize import Interpolation
from .weights import WeightFile, annotators_folder, check_files

ParamValue = int | float | bool | str
AnnotatorFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Param:
    """One tunable parameter. Its kind is the type of `default` (bool, int, float or str)."""

    name: str
    default: ParamValue
    minimum: float | None = None  # inclusive bounds for int and float parameters
    maximum: float | None = None
    choices: tuple[str, ...] = ()  # the allowed values of a str parameter
    help: str = ""

    @property
    def kind(self) -> Literal["bool", "int", "float", "str"]:
        if isinstance(self.default, bool):
            return "bool"
        if isinstance(self.default, int):
            return "int"
        return "float" if isinstance(self.default, float) else "str"

    def coerce(self, value: Any, annotator: str) -> ParamValue:
        """`value` as this parameter's kind, or ValueError naming the value and what is allowed."""
        where = f"{annotator} parameter {self.name!r}"
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            return bool(value)
        if kind == "str":
            if value not in self.choices:
                raise ValueError(f"{where} must be one of {', '.join(self.choices)}; got {value!r}")
            return str(value)
        number = _number(value, integral=kind == "int")
        if number is None:
            raise ValueError(f"{where} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        low = self.minimum if self.minimum is not None else -np.inf
        high = self.maximum if self.maximum is not None else np.inf
        if not low <= number <= high:
            raise ValueError(f"{where} must be in [{self.minimum}, {self.maximum}], got {value!r}")
        return number


@dataclass(frozen=True)
class Runtime:
    """What a network annotator runs with: the folder its weight files are read from, and the
    device and dtype (names, as torch spells them) its network runs in. `Runtime.default()` takes
    them from the command's options, else `CONTROLNET_ANNOTATORS` and runtime.py's policy."""

    folder: Path
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def default(cls, folder: str | Path | None = None, device: str | None = None, dtype: str | None = None) -> Runtime:
        """The folder from `weights.annotators_folder`, the device and dtype from runtime.py's policy."""
        from .. import runtime

        place = runtime.check_device(device) if device else runtime.default_device()
        chosen = runtime.parse_dtype(dtype, place)
        return cls(annotators_folder(folder), str(place), runtime.dtype_name(chosen))


@dataclass(frozen=True)
class Annotation:
    """What an annotator made: the control image and, for some, data a user can edit and render
    back (the openpose annotators' poses as OpenPose JSON)."""

    image: np.ndarray
    data: dict[str, Any] | None = None


@dataclass
class Annotator:
    """A condition extractor: `annotator(image, **params)` maps an RGB uint8 (H, W, 3) image to a
    control image of the same height and width, uint8 (H, W, 3), or float32 (H, W, 3) in [0, 1]
    with -1 marking masked pixels when `float_output` (the inpaint hint).

    `factory(runtime)` builds the function; it may return an `Annotation` instead of an array."""

    name: str
    description: str
    # Builds the function. Classical annotators return a plain function; network annotators read
    # their `weights` here, so nothing is read before the first call (and then once per runtime).
    factory: Callable[[Runtime], AnnotatorFn]
    params: tuple[Param, ...] = ()
    inputs: tuple[str, ...] = ()  # required array inputs besides the image, e.g. ("mask",)
    weights: tuple[WeightFile, ...] = ()  # the files a network annotator reads; () for classical ones
    float_output: bool = False
    # For an annotator that reads a file instead of an image (openpose_json: a pose JSON):
    # from_file(path_or_text, width, height, **params) -> Annotation; its `factory` refuses images.
    from_file: Callable[..., Annotation] | None = None
    # How its input image is resized: "nearest" for an image of class labels (seg_from_labels),
    # whose values must never be blended into other classes; "auto" the original apps' rule.
    resize: Interpolation = "auto"
    _built: tuple[Runtime, AnnotatorFn] | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def defaults(self) -> dict[str, ParamValue]:
        return {p.name: p.default for p in self.params}

    def missing(self, folder: str | Path | None = None) -> list[WeightFile]:
        """The weight files this annotator needs that `folder` (see `annotators_folder`) lacks."""
        where = annotators_folder(folder)
        return [w for w in self.weights if w.find(where) is None]

    def check_weights(self, folder: str | Path | None = None) -> None:
        """Nothing when `folder` holds every weight file; else AnnotatorWeightsError, one line naming
        each missing file, the folder and where to get them (before any file is read)."""
        check_files(self.weights, annotators_folder(folder))

    def load(self, runtime: Runtime | None = None) -> AnnotatorFn:
        """The annotator's function for `runtime`, built on first use and kept for the next calls
        with the same runtime (one at a time: a network's weights are released when another
        runtime's replace them). Thread-safe."""
        runtime = runtime or (Runtime(Path()) if not self.weights else Runtime.default())
        with self._lock:
            if self._built is None or self._built[0] != runtime:
                self._built = None  # release the old network before the new one is read
                self._built = (runtime, self.factory(runtime))
            return self._built[1]

    def release(self) -> None:
        """Forget the built function, and with it a network's weights (built again on next use)."""
        with self._lock:
            self._built = None

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `params`, each checked and coerced; array inputs checked present."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known) - set(self.inputs))
        if unknown:
            accepted = ", ".join([*known, *self.inputs]) or "no parameters"
            raise ValueError(f"annotator {self.name!r} has no parameter {unknown[0]!r}; it takes {accepted}")
        resolved: dict[str, Any] = {name: p.coerce(params.get(name, p.default), self.name) for name, p in known.items()}
        for name in self.inputs:
            if not isinstance(params.get(name), np.ndarray):
                raise ValueError(f"annotator {self.name!r} needs {name!r} as a numpy array")
            resolved[name] = params[name]
        return resolved

    def annotate(self, image: np.ndarray, runtime: Runtime | None = None, **params: Any) -> Annotation:
        """The control image and the annotator's data (see `Annotation`)."""
        rgb = HWC3(image)
        if rgb.size == 0:
            raise ValueError(f"annotator {self.name!r} got an empty image of shape {image.shape}")
        out = self.load(runtime)(rgb, **self.resolve(params))
        result = out if isinstance(out, Annotation) else Annotation(out)
        expected = np.float32 if self.float_output else np.uint8
        if result.image.shape != rgb.shape or result.image.dtype != expected:
            raise RuntimeError(
                f"annotator {self.name!r} returned {result.image.shape} {result.image.dtype}, "
                f"expected {rgb.shape} {expected}"
            )
        return result

    def __call__(self, image: np.ndarray, runtime: Runtime | None = None, **params: Any) -> np.ndarray:
        return self.annotate(image, runtime, **params).image


def pad_to_64(image: np.ndarray) -> np.ndarray:
    """The image edge-padded at the bottom and right to sides that are multiples of 64 (the
    extension's ``resize_image_with_pad`` after its resize; itself when they already are); the
    caller crops the map back to the image's size (its ``remove_pad``)."""
    h, w = image.shape[:2]
    pad_h, pad_w = -h % 64, -w % 64
    if not pad_h and not pad_w:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _number(value: Any, integral: bool) -> int | float | None:
    """An int (integral=True, integral floats accepted) or finite float from `value`, else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        as_float = float(value)
    except OverflowError:
        return None
    if not math.isfinite(as_float):
        return None
    if integral:
        return int(value) if as_float.is_integer() else None
    return as_float

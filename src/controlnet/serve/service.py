"""The generation service behind ``controlnet serve``: the web page (ui.py) and the JSON API (api.py) share it.

It checks every request against the ranges of settings.py, keeps a
server on a shared machine safe (an upload size and a pixel limit, bounded prompts and output sizes,
a queue of bounded length, one job per model at a time), runs the pipeline with progress and
cancellation between steps, and returns the images in memory with the PNG text that carries their
settings (metadata.py), as ``controlnet generate`` writes it. It writes no file: the web UI stores
what the page shows in its own bounded folder (files.py); the JSON API returns it inline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import shipped
from ..imaging.images import ImageError, ImageSource, encode_png, load_image
from ..imaging.resize import MAX_ASPECT_RATIO, check_aspect_ratio
from ..metadata import image_text, map_text, model_records
from ..pipeline import UNION_TYPES, ControlUnit, Pipeline, viewable_map
from ..sampling.prompts import ORIGINAL_ADDED_PROMPT, ORIGINAL_NEGATIVE_PROMPT, check_prompts
from ..settings import (
    AUTO_UNION_TYPE,
    GENERATION,
    LORAS,
    UNIT,
    UNIT_MODELS,
    SettingError,
    check_generation,
    check_guess_mode,
    check_loras,
    check_output_size,
    check_unit,
    unit_mode,
    unit_model,
)

SHIPPED = "shipped"  # the name of the shipped model in the model picker
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pth")


class RequestError(ValueError):
    """A bad request: the message names the problem and what is allowed (shown to the user)."""


class QueueFull(RuntimeError):
    """Too many jobs are waiting: the request is refused, not queued."""


class Cancelled(RuntimeError):
    """The user cancelled the job; it stopped between two sampling steps."""


class ModelUnavailable(RuntimeError):
    """A served model's files failed to load: the server's problem, not the request's. The message
    names the model, never a path; ``detail`` (with paths) is for the server's log."""

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"model {model!r} cannot be loaded on this server (the server's log says why)")
        self.detail = f"cannot load model {model}: {detail}"


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20  # one uploaded image
    max_pixels: int = 4096 * 4096  # one uploaded image, checked from its header before decoding
    max_queue: int = 8  # jobs waiting or running, all models together
    # The output's short side: the original app's slider maximum, or a model's native size where
    # that is larger (SDXL's 1024), so that every served model can make pictures at its own size.
    max_resolution: int = 768

    def resolution_limit(self, native: int) -> int:
        """The largest short side for a model whose native size is ``native``."""
        return max(self.max_resolution, native)

    @property
    def max_body_bytes(self) -> int:
        """One HTTP request body: room for a few images in base64 (4/3 of their size) and the rest."""
        return 8 * self.max_upload_bytes


@dataclass
class UnitRequest:
    """One control unit of a request (an AUTOMATIC1111-style unit)."""

    image: np.ndarray
    annotator: str = UNIT["annotator"].default
    annotator_params: dict[str, Any] = field(default_factory=dict)
    strength: float = UNIT["strength"].default
    start: float = UNIT["start"].default
    end: float = UNIT["end"].default
    mode: str = UNIT["mode"].default
    resize_mode: str = UNIT["resize_mode"].default
    control_type: str = UNIT["control_type"].default  # a union ControlNet's type for the map (auto: the annotator's)
    pixel_perfect: bool = UNIT["pixel_perfect"].default  # the annotator runs at the output size
    annotator_resolution: int = UNIT["annotator_resolution"].default  # ... or at this short side
    # The model it uses: one ControlNet or one T2I-Adapter of the served model, by index, by a
    # shipped model's name (shipped.py) or by its file (a Path: the AUTOMATIC1111 API's model names,
    # which a request cannot give as a path); a name or file is found among the served model's once
    # it loads. None: not named; naming neither means ControlNet 0, or T2I-Adapter 0 for a model
    # without ControlNets.
    controlnet: int | str | Path | None = None
    adapter: int | str | Path | None = None


@dataclass
class GenerateRequest:
    """Everything one generation needs; defaults are the original canny app's."""

    prompt: str
    units: list[UnitRequest] = field(default_factory=list)
    model: str = SHIPPED
    negative_prompt: str | None = None  # None: the model's default (see default_prompts)
    added_prompt: str | None = None
    # The rest as settings.GENERATION defines them (defaults, ranges, meaning).
    num_images: int = GENERATION["num_images"].default
    steps: int = GENERATION["steps"].default
    guidance_scale: float = GENERATION["guidance_scale"].default
    eta: float | None = GENERATION["eta"].default  # None: the sampler's own
    seed: int = GENERATION["seed"].default  # -1: a random seed
    sampler: str = GENERATION["sampler"].default
    decoder: str = GENERATION["decoder"].default  # "taesd": the server's TAESD (serve --taesd)
    resolution: int | None = GENERATION["resolution"].default  # None: the model's native size
    # LoRAs by name in the server's LoRA folder (serve --lora-dir), each "NAME" or "NAME:WEIGHT";
    # the prompt's <lora:NAME:WEIGHT> tags are found there too. Never a path.
    loras: tuple = LORAS.default
    # The output's size named (settings.OUTPUT_SIZE: the AUTOMATIC1111 API's width and height; a
    # side not named is the resolution); None for both: sized from the resolution and the images.
    width: int | None = None
    height: int | None = None
    guess_mode: bool = GENERATION["guess_mode"].default
    init_image: np.ndarray | None = None  # img2img / inpainting
    mask: np.ndarray | None = None  # inpainting: white = repaint
    denoising_strength: float = GENERATION["denoising_strength"].default


@dataclass
class GenerateResponse:
    """A finished job, in memory: the caller decides whether anything is stored."""

    images: list[np.ndarray]  # uint8 [H, W, 3]
    control_maps: list[np.ndarray]  # each unit's detected map as a picture, uint8 [H, W, 3]
    seeds: list[int]
    settings: dict[str, Any]
    image_texts: list[dict[str, str]]  # each image's PNG text: its settings (metadata.image_text)
    map_texts: list[dict[str, str]]

    def image_pngs(self) -> list[bytes]:
        return [encode_png(image, text) for image, text in zip(self.images, self.image_texts, strict=True)]

    def map_pngs(self) -> list[bytes]:
        return [encode_png(image, text) for image, text in zip(self.control_maps, self.map_texts, strict=True)]


def default_prompts(model: str) -> tuple[str, str]:
    """(added prompt, negative prompt) by default: empty for the shipped model, which never saw the
    original app's words; the original app's for any other model."""
    if model == SHIPPED:
        return "", ""
    return ORIGINAL_ADDED_PROMPT, ORIGINAL_NEGATIVE_PROMPT


def check_request(request: GenerateRequest, limits: Limits, annotators: Path | None = None) -> None:
    """Refuse a request outside the ranges (settings.py, and this server's ``limits``) with one
    RequestError naming the field and what is allowed. ``annotators``: the folder of annotator
    weights (annotators/weights.py; None: its default). What depends on the model (its ControlNets
    and T2I-Adapters, its native size for the resolution limit) is checked with the model's
    configuration (`unit_models`, `check_resolution`)."""
    _check_prompts(request)
    try:
        check_generation({name: getattr(request, name) for name in GENERATION})
        check_loras(request.loras)
        check_output_size(request.width, request.height)
        if request.mask is not None and request.init_image is None:
            raise SettingError("inpainting needs an init image as well as the mask")
        for i, unit in enumerate(request.units):
            _check_unit(unit, f"control unit {i}", annotators)
    except SettingError as error:
        raise RequestError(str(error)) from None


def _check_prompts(request: GenerateRequest) -> None:
    try:  # None: the model's default, short (the pipeline checks the texts it encodes again)
        check_prompts(request.prompt, request.added_prompt or "", request.negative_prompt or "")
    except ValueError as error:
        raise RequestError(str(error)) from None


def check_guided(request: GenerateRequest) -> None:
    """The page's and the JSON API's rule: something to follow, a prompt or a control image (an
    empty prompt alone is most likely a mistake there), checked after the prompts' own limits, as
    check_request would. The AUTOMATIC1111 API, whose clients send an empty prompt by default,
    makes unconditional images from it as the web UI does."""
    _check_prompts(request)
    if not request.prompt.strip() and not request.units:
        raise RequestError("give a prompt or a control image (or both)")


def check_resolution(request: GenerateRequest, limits: Limits, native: int) -> None:
    """The request's resolution and named output size within this server's limit for a model of
    ``native`` size (`Limits.resolution_limit`): the short side, or a side named alone at most the
    longest side that limit allows. RequestError, one line."""
    limit = limits.resolution_limit(native)
    width, height = request.width, request.height
    named = [side for side in (width, height) if side is not None]
    if request.resolution is not None and request.resolution > limit:
        raise RequestError(f"resolution must be at most {limit} on this server")
    if len(named) == 2 and min(named) > limit:
        raise RequestError(f"{width}x{height}: the short side must be at most {limit} on this server")
    if len(named) == 1 and named[0] > MAX_ASPECT_RATIO * limit:
        side = "width" if width else "height"
        raise RequestError(f"{side} {named[0]}: at most {MAX_ASPECT_RATIO * limit} on this server")


def unit_models(request: GenerateRequest, pipe: Pipeline) -> list[tuple[str, int]]:
    """The model each unit uses, ("controlnet", i) or ("adapter", i) (settings.unit_model), once
    the served model is loaded (``pipe``: its ControlNets and T2I-Adapters, and the files they came
    from, where a shipped model's name is found); RequestError for a unit whose model the served one
    lacks, an adapter unit in a control mode, guess mode with adapters only."""
    units = request.units
    controlnets, adapters = len(pipe.controlnets), len(pipe.adapters)
    models = []
    for i, unit in enumerate(units):
        named = {kind: _index(getattr(unit, kind), kind, pipe, request.model, i) for kind in UNIT_MODELS}
        models.append(unit_model(named["controlnet"], named["adapter"], controlnets, adapters))
        try:  # one model per unit: naming both is refused, by index or by name
            check_unit(named, f"control unit {i}")
        except SettingError as error:
            raise RequestError(str(error)) from None
    try:
        if len(units) > (controlnets + adapters) * 4:  # a bound on the work, and none with no model
            raise SettingError(
                f"{len(units)} control units, but the model has {controlnets} ControlNet(s) "
                f"and {adapters} T2I-Adapter(s)"
            )
        for i, (unit, (kind, index)) in enumerate(zip(units, models, strict=True)):
            count, name = (controlnets, "ControlNet") if kind == "controlnet" else (adapters, "T2I-Adapter")
            if index >= count:
                raise SettingError(f"control unit {i}: {name} {index} does not exist (the model has {count})")
            check_unit({kind: index, "mode": unit.mode}, f"control unit {i}")  # an adapter's mode
        check_guess_mode(request.guess_mode, [kind == "adapter" for kind, _ in models])
    except SettingError as error:
        raise RequestError(str(error)) from None
    return models


def _index(value: int | str | Path | None, kind: str, pipe: Pipeline, model: str, unit: int) -> int | None:
    """A unit's ``controlnet`` or ``adapter`` (``kind``) as an index of the served model's: a
    shipped model's name, or a file, is looked up among the files it loaded."""
    if isinstance(value, Path):
        if value not in pipe.files[kind]:  # found for the model, but it does not fit its base
            raise RequestError(
                f"control unit {unit}: model {model!r} did not load {value.name} (it does not fit the model)"
            )
        return pipe.files[kind].index(value)
    if not isinstance(value, str):
        return value
    index = shipped.find(value, kind, pipe.files[kind])  # the name was checked by check_request
    if index is None:
        held = ", ".join(path.name for path in pipe.files[kind]) or "none"
        raise RequestError(
            f"control unit {unit}: model {model!r} has no shipped {shipped.KINDS[kind]} {value!r} (its "
            f"{shipped.KINDS[kind]}s: {held})"
        )
    return index


def _check_unit(unit: UnitRequest, where: str, annotators: Path | None) -> None:
    from ..annotators import ANNOTATORS

    values = {name: getattr(unit, name) for name in UNIT}
    for kind in UNIT_MODELS:  # a name or a file: its index is known once the model loads
        if isinstance(values[kind], Path):
            values.pop(kind)
        elif isinstance(values[kind], str):
            try:
                shipped.control(values.pop(kind), kind)
            except ValueError as error:
                raise SettingError(f"{where}: {kind}: {error}") from None
    check_unit(values, where)
    missing = ANNOTATORS[unit.annotator].missing(annotators)
    if missing:  # the server's folder is not the client's business: the file's name says enough
        names = [weight.name for weight in missing]
        files = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        sources = ", ".join(dict.fromkeys(weight.source for weight in missing))
        raise SettingError(
            f"{where}: the {unit.annotator} annotator needs {files}, which this server does not have "
            f"(its administrator can get {'it' if len(names) == 1 else 'them'} from {sources})"
        )
    try:  # the annotator's own typed check: kinds, ranges, choices, unknown names
        ANNOTATORS[unit.annotator].resolve(unit.annotator_params)
    except ValueError as error:
        raise SettingError(f"{where}: {error}") from None


def pose_type(values: Mapping[str, Any]) -> str:
    """A unit's control type once its pose is drawn into its map: openpose for a union ControlNet,
    unless the unit names one (its annotator, now none, no longer says it)."""
    control_type = values.get("control_type", AUTO_UNION_TYPE)
    return UNION_TYPES["openpose_json"] if control_type == AUTO_UNION_TYPE else control_type


def draw_pose(source: Any, what: str, annotator: str, params: Mapping | None, limits: Limits) -> np.ndarray:
    """A unit's pose as its control image: OpenPose JSON, decoded (the JSON API's unit image) or a
    file uploaded through the page, drawn as the openpose models were trained (the openpose_json
    annotator, with its parameters when the unit names it: any other annotator cannot run on a
    pose). RequestError, one line naming ``what``, for a bad file, a bad pose or a canvas over the
    pixel limit (checked before drawing)."""
    from ..annotators import get_annotator
    from ..annotators.pose.jsonformat import parse_pose_json

    if annotator not in ("none", "openpose_json"):
        raise RequestError(
            f"{what}: a pose is drawn as the openpose models were trained; annotator {annotator!r} cannot run on it"
        )
    if isinstance(source, (str, os.PathLike)):  # a page upload: bounded, then decoded
        source = _json_upload(source, what, limits)
    draw = get_annotator("openpose_json")
    try:
        resolved = draw.resolve(params or {})
        poses = parse_pose_json(source)
    except ValueError as error:
        raise RequestError(f"{what} {error}") from None
    if poses.width * poses.height > limits.max_pixels:
        size = f"{poses.width}x{poses.height}"
        raise RequestError(f"{what}: the pose canvas {size} is over the limit of {limits.max_pixels} pixels")
    return draw.from_file(json.dumps(source), **resolved).image


def _json_upload(path: str | os.PathLike, what: str, limits: Limits) -> Any:
    _check_upload_size(path, what, limits)
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError):
        raise RequestError(f"{what} is not a JSON file (UTF-8); upload the pose editor's .json") from None
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply to be a pose") from None


def _check_upload_size(source: ImageSource, what: str, limits: Limits) -> None:
    """RequestError when an upload (a file, or its bytes) is gone or over the size limit."""
    if isinstance(source, (bytes, bytearray)):
        size = len(source)
    else:
        try:
            size = os.stat(source).st_size
        except (OSError, ValueError):
            raise RequestError(f"{what} upload is missing; upload it again") from None
    if size > limits.max_upload_bytes:
        raise RequestError(f"{what} is {size / 2**20:.1f} MB; the limit is {limits.max_upload_bytes / 2**20:g} MB")


def read_upload(source: ImageSource, limits: Limits, what: str = "image") -> np.ndarray:
    """An uploaded image (a file, or its bytes) as RGB uint8, refused (RequestError) when over the
    size or pixel limits (from its header, before decoding), not an image, or longer than 4:1.
    Messages name "the upload", never a path of the server."""
    _check_upload_size(source, f"the {what}", limits)
    try:
        image = load_image(source, max_pixels=limits.max_pixels)
        check_aspect_ratio(image.shape[1], image.shape[0], f"the {what}")
        return image
    except ImageError as error:
        message = str(error)
        if not isinstance(source, (bytes, bytearray)):
            message = message.replace(str(source), "the upload")
        raise RequestError(f"the {what}: {message}") from None
    except ValueError as error:
        raise RequestError(str(error)) from None


@dataclass
class ModelEntry:
    """A base model and the ControlNets and T2I-Adapters served with it."""

    name: str
    base: Path
    controlnets: list[Path]
    # The models folder the files were found in: they must still lie inside it when they are loaded
    # (a file replaced by a link that leads out after the server started is refused).
    folder: Path | None = None
    # Named by the operator (--adapter): each must load. Found in a models folder: those that fit.
    adapters: list[Path] = field(default_factory=list)


def inside_folder(path: Path, folder: Path) -> bool:
    """Whether ``path`` and, for a folder, everything in it stay inside ``folder`` once every
    symlink is resolved (a link that leads out of the models folder is refused, not followed)."""
    root = Path(os.path.realpath(folder))

    def within(candidate: str | Path) -> bool:
        real = Path(os.path.realpath(candidate))
        return real == root or root in real.parents

    if not within(path):
        return False
    if path.is_dir():
        for parent, subfolders, names in os.walk(path, followlinks=False):
            for name in [*subfolders, *names]:
                if not within(Path(parent, name)):
                    return False
    return True


def discover_models(folder: Path | None, include_shipped: bool = True) -> list[ModelEntry]:
    """The shipped model, then every base model in ``folder`` (files with a base, or diffusers
    pipeline folders), each with the ControlNets and T2I-Adapters of the folder that fit it (checked
    when it is loaded). Only files inside ``folder`` are ever offered: a symlink that leads out of
    it is skipped with a warning."""
    from ..formats.detect import inspect_contents
    from ..formats.errors import CheckpointError

    entries = []
    if include_shipped:  # every shipped ControlNet and T2I-Adapter, in registry order
        entries.append(
            ModelEntry(SHIPPED, shipped.base_path(), shipped.paths("controlnet"), None, shipped.paths("adapter"))
        )
    if folder is None:
        return entries
    bases, controls, adapters = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not (path.suffix in MODEL_SUFFIXES or path.is_dir()):
            continue
        if not inside_folder(path, folder):
            print(f"controlnet serve: skipping {path.name}: a link that leads out of {folder}", file=sys.stderr)
            continue
        try:
            contents = inspect_contents(path)
        except (CheckpointError, OSError, ValueError):
            continue  # not a model: not offered
        if contents.has_base:
            bases.append((path, contents.has_controlnet))
        elif contents.has_controlnet:
            controls.append(path)
        elif contents.has_adapter:
            adapters.append(path)
    for path, has_own in bases:
        entries.append(ModelEntry(path.name, path, [path] if has_own else list(controls), folder, list(adapters)))
    return entries


class ModelRegistry:
    """The models a server offers, loaded when first used; at most ``keep`` stay in memory. Each has
    a lock: one job per model at a time."""

    def __init__(
        self,
        entries: Sequence[ModelEntry],
        device: str = "cpu",
        dtype: str | None = None,
        keep: int = 1,
        annotators_dir: Path | None = None,
        lora_dir: Path | None = None,
        taesd: Path | None = None,
    ):
        """``lora_dir``: the one folder LoRAs are found in, by name (None: no LoRAs). ``taesd``: the
        TAESD every model is loaded with (its decoder file or diffusers folder; None: none)."""
        if not entries:
            raise ValueError("no models to serve")
        self.entries = {entry.name: entry for entry in entries}
        self.device, self.dtype, self.keep = device, dtype, keep
        self.annotators_dir = annotators_dir
        self.lora_dir = lora_dir
        self.taesd = taesd
        self._loaded: dict[str, tuple[Pipeline, dict]] = {}
        self._locks = {name: threading.Lock() for name in self.entries}
        self._loading = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> ModelEntry:
        if name not in self.entries:
            raise RequestError(f"unknown model {name!r}; choose one of {', '.join(self.entries)}")
        return self.entries[name]

    def lock(self, name: str) -> threading.Lock:
        self.entry(name)
        return self._locks[name]

    def pipeline(self, name: str) -> tuple[Pipeline, dict]:
        """The model's pipeline and its file records (name + sha256), loading it if needed."""
        from ..formats.errors import CheckpointError

        entry = self.entry(name)
        with self._loading:
            if name not in self._loaded:
                while len(self._loaded) >= self.keep:  # free the oldest before loading another
                    self._loaded.pop(next(iter(self._loaded)))
                try:
                    self._check_inside(entry)
                    controlnets, adapters = self._fitting(entry)
                    pipe = Pipeline.from_files(
                        entry.base,
                        controlnets,
                        self.device,
                        self.dtype,
                        annotators_dir=self.annotators_dir,
                        adapters=adapters,
                        lora_dir=self.lora_dir,
                        taesd=self.taesd,
                    )
                    records = model_records(entry.base, controlnets, adapters)
                except (CheckpointError, OSError, ValueError) as error:
                    raise ModelUnavailable(name, " ".join(str(error).split())) from None
                self._loaded[name] = (pipe, records)
            return self._loaded[name]

    @staticmethod
    def _check_inside(entry: ModelEntry) -> None:
        if entry.folder is None:
            return
        for path in {entry.base, *entry.controlnets, *entry.adapters}:
            if not inside_folder(path, entry.folder):
                raise ValueError(f"{path} now leads out of the models folder {entry.folder}")

    @staticmethod
    def _fitting(entry: ModelEntry) -> tuple[list[Path], list[Path]]:
        """The entry's ControlNets that fit its base (one of another family is left out), and its
        T2I-Adapters: a models folder's that fit, or all that the operator named (--adapter: one
        that does not fit makes the model unavailable, with the reason in the server's log)."""
        from ..loading import load_adapter, load_base, load_controlnet

        own = entry.controlnets == [entry.base]  # a base file holding its own ControlNet
        named_adapters = entry.folder is None
        if own and (named_adapters or not entry.adapters):
            return entry.controlnets, list(entry.adapters)
        base = load_base(entry.base)  # a Control-LoRA is rebuilt on its UNet
        config = base.config
        controlnets = (
            entry.controlnets
            if own
            else _loadable(entry.controlnets, lambda p: load_controlnet(p, config, unet=base.unet))
        )
        adapters = entry.adapters if named_adapters else _loadable(entry.adapters, lambda p: load_adapter(p, config))
        return list(controlnets), list(adapters)

    def loaded_native_resolution(self, name: str) -> int | None:
        """The model's native size if it is loaded, else None (it is not loaded for this)."""
        loaded = self._loaded.get(name)
        return None if loaded is None else loaded[0].model.config.native_resolution

    def control_files(self, name: str) -> dict[str, list[Path]]:
        """The model's ControlNet and T2I-Adapter files by kind, in index order: those loaded when
        the model is loaded, else those found for it (`control_models`)."""
        entry = self.entry(name)
        if name in self._loaded:
            return self._loaded[name][0].files
        return {"controlnet": list(entry.controlnets), "adapter": list(entry.adapters)}

    def control_models(self, name: str) -> dict[str, list[str | None]]:
        """The file names of the model's ControlNets and T2I-Adapters, in the order a unit's
        ``controlnet`` and ``adapter`` index them, and beside them (``controlnet_names``,
        ``adapter_names``) the shipped name of each, which a unit may give instead (None: not a
        shipped file). Those loaded when the model is loaded; else those found for it (one that
        turns out not to fit its base is left out when it loads)."""
        files = self.control_files(name)
        return {
            "controlnets": [path.name for path in files["controlnet"]],
            "adapters": [path.name for path in files["adapter"]],
            "controlnet_names": [shipped.shipped_name(path, "controlnet") for path in files["controlnet"]],
            "adapter_names": [shipped.shipped_name(path, "adapter") for path in files["adapter"]],
        }


def _loadable(paths: Sequence[Path], load: Callable[[Path], object]) -> list[Path]:
    """The paths whose model ``load`` accepts: those of another family are left out."""
    from ..formats.errors import CheckpointError

    fitting = []
    for path in paths:
        try:
            load(path)
        except (CheckpointError, ValueError):
            continue
        fitting.append(path)
    return fitting


class JobQueue:
    """Counts jobs waiting or running; refuses one more than ``max_length`` with QueueFull."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._count = 0
        self._lock = threading.Lock()

    @property
    def length(self) -> int:
        return self._count

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self._count >= self.max_length:
                raise QueueFull(f"the server is busy ({self._count} jobs queued, the limit); try again shortly")
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1


class Service:
    """Runs generation requests for the UI and the API; returns the results in memory."""

    def __init__(self, registry: ModelRegistry, limits: Limits | None = None):
        from ..annotators import Runtime

        self.registry = registry
        self.limits = limits or Limits()
        self.queue = JobQueue(self.limits.max_queue)
        # Annotators run where the models do, reading the registry's folder of weights.
        self.annotators = Runtime.default(registry.annotators_dir, registry.device, registry.dtype)

    def load(self, model: str) -> None:
        """Load ``model`` now (the AUTOMATIC1111 API's model switch) as a job does: in the queue
        (QueueFull when it is full), holding the model's lock."""
        self.registry.entry(model)
        with self.queue.slot(), self.registry.lock(model):
            self.registry.pipeline(model)

    def native_resolution(self, model: str) -> int:
        """The model's native image size (loads the model if it is not loaded)."""
        pipe, _ = self.registry.pipeline(model)
        return pipe.model.config.native_resolution

    def resolution_limit(self, model: str) -> int:
        """The largest short side this server makes with ``model`` (loads it if it is not loaded)."""
        return self.limits.resolution_limit(self.native_resolution(model))

    def annotate(self, unit: UnitRequest, resolution: int) -> np.ndarray:
        """The unit's control map as the preview shows it (at ``resolution``, the output's short side)."""
        from ..annotators import run_annotator
        from ..imaging.resize import resize_image

        check_request(GenerateRequest("preview", [unit]), self.limits, annotators=self.annotators.folder)
        try:
            image = resize_image(unit.image, resolution if unit.pixel_perfect else unit.annotator_resolution)
            hint = run_annotator(unit.annotator, image, None, runtime=self.annotators, **unit.annotator_params)
            return viewable_map(hint)
        except ValueError as error:
            raise RequestError(" ".join(str(error).split())) from None

    def generate(
        self,
        request: GenerateRequest,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerateResponse:
        """Queue and run one request. Raises RequestError, QueueFull, Cancelled or ModelUnavailable."""
        self.registry.entry(request.model)  # an unknown model, or a bad value, is refused before queueing
        check_request(request, self.limits, annotators=self.annotators.folder)
        native = self.registry.loaded_native_resolution(request.model)
        if native is not None:  # else known once the model loads
            check_resolution(request, self.limits, native)
        with self.queue.slot(), self.registry.lock(request.model):
            pipe, models = self.registry.pipeline(request.model)
            check_resolution(request, self.limits, pipe.model.config.native_resolution)
            chosen = unit_models(request, pipe)
            added, negative = default_prompts(request.model)
            added = added if request.added_prompt is None else request.added_prompt
            negative = negative if request.negative_prompt is None else request.negative_prompt
            units = [self._control_unit(u, request, m) for u, m in zip(request.units, chosen, strict=True)]
            loras = self.lora_files(request)

            def step(done: int, total: int) -> None:
                if cancelled is not None and cancelled():
                    raise Cancelled(f"stopped after {done} of {total} steps")
                if progress is not None:
                    progress(done, total)

            step(0, request.steps)
            try:
                result = pipe.generate(
                    request.prompt,
                    units,
                    negative_prompt=negative,
                    added_prompt=added,
                    num_images=request.num_images,
                    seed=None if request.seed < 0 else request.seed,
                    steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    eta=request.eta,
                    sampler=request.sampler,
                    resolution=request.resolution,
                    width=request.width,
                    height=request.height,
                    init_image=request.init_image,
                    denoising_strength=request.denoising_strength,
                    mask=request.mask,
                    progress=step,
                    loras=loras,
                    decoder=request.decoder,
                )
            except (ValueError, ImageError) as error:  # the core refused a value: the user's to fix
                message = " ".join(str(error).split())
                if self.registry.lora_dir is not None:  # a LoRA file's message names it: not the server's path
                    message = message.replace(str(self.registry.lora_dir), "the LoRA folder")
                raise RequestError(message) from None
        return self._response(request, result, models, chosen)

    def lora_files(self, request: GenerateRequest) -> list[tuple[Path, float]]:
        """The request's LoRAs as (file, weight), found by name in the server's LoRA folder, and its
        prompt's tags checked the same way (the pipeline finds them there again): nothing outside
        the folder, also through a link; messages name the LoRA, never the server's paths."""
        from ..lora import find_lora, prompt_loras

        try:
            named = check_loras(request.loras)
            _, tags = prompt_loras(request.prompt)
        except ValueError as error:
            raise RequestError(str(error)) from None
        folder = self.registry.lora_dir
        if (named or tags) and folder is None:
            raise RequestError(f"this server offers no LoRAs (LoRA {(named or tags)[0][0]!r} was asked for)")
        found = []
        for name, weight in [*named, *tags]:
            try:
                path = find_lora(name, folder)
            except ValueError as error:
                raise RequestError(str(error).replace(f" in {folder}", " on this server")) from None
            if not inside_folder(path, folder):
                raise RequestError(f"LoRA {name!r} leads out of the server's LoRA folder")
            found.append((path, weight))
        return found[: len(named)]

    def _control_unit(self, unit: UnitRequest, request: GenerateRequest, model: tuple[str, int]) -> ControlUnit:
        image, annotator, params = unit.image, unit.annotator, dict(unit.annotator_params)
        kind, index = model
        control_type = unit.control_type
        if not unit.pixel_perfect:  # annotate at the chosen resolution; the pipeline fits the map
            from ..annotators import run_annotator
            from ..imaging.resize import resize_image

            if control_type == AUTO_UNION_TYPE:  # the map is the annotator's: its union type
                control_type = UNION_TYPES.get(annotator, AUTO_UNION_TYPE)
            try:
                image = resize_image(image, unit.annotator_resolution)
                image = run_annotator(annotator, image, None, runtime=self.annotators, **params)
            except ValueError as error:
                raise RequestError(" ".join(str(error).split())) from None
            annotator, params = "none", {}
        return ControlUnit(
            image=image,
            annotator=annotator,
            annotator_params=params,
            strength=unit.strength,
            start=unit.start,
            end=unit.end,
            mode=unit_mode(unit.mode, request.guess_mode, kind == "adapter"),
            resize_mode=unit.resize_mode,
            control_type=control_type,
            **{kind: index},
        )

    @staticmethod
    def _response(request: GenerateRequest, result, models: dict, chosen: list[tuple[str, int]]) -> GenerateResponse:
        """The pipeline's record, with the request's units as it gave them (pixel perfect included)
        and the model each used (``chosen``), the served model's name and the files' hashes."""
        controls = []
        for unit, (kind, index), used in zip(request.units, chosen, result.settings["controls"], strict=True):
            dropped = ("image", "controlnet", "adapter", "control_type")
            control = {k: v for k, v in dataclasses.asdict(unit).items() if k not in dropped}
            control["mode"] = unit_mode(unit.mode, request.guess_mode, kind == "adapter")
            if "control_type" in used:  # a union ControlNet's unit: the type it used
                control["control_type"] = used["control_type"]
            controls.append(control | {kind: index})
        record = {**result.settings, "controls": controls, "models": models, "model": request.model}
        return GenerateResponse(
            images=list(result.images),
            control_maps=[viewable_map(control_map) for control_map in result.control_maps],
            seeds=list(result.seeds),
            settings=record,
            image_texts=[image_text(record, models, seed, i) for i, seed in enumerate(result.seeds)],
            map_texts=[map_text(record, result.seeds, i) for i in range(len(result.control_maps))],
        )

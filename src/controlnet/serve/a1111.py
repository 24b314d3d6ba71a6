"""The AUTOMATIC1111 web UI's HTTP API, with the ControlNet extension's units, translated onto the
service's own requests (service.GenerateRequest, UnitRequest): one generation path, one set of
checks and limits for the page, the JSON API and this API.

Here is only the translation: A1111 JSON in, our request out; our response in, A1111 JSON out; and
the lists A1111 clients read (models, samplers, modules). The routes are in a1111_routes.py.
Field names, defaults and enum spellings are the web UI's (``modules/api/models.py``) and the
extension's (sd-webui-controlnet v1.1.455, ``internal_controlnet/args.py``, ``scripts/api.py``);
docs/webui.md lists them and where this server differs. Every image comes inline as base64: a
string is never taken for a path on the server, and nothing a request carries is unpickled.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, shipped
from ..hashing import model_sha256, short_hash
from ..imaging.resize import fit_to
from ..metadata import parameters_text
from ..settings import GENERATION, OUTPUT_SIZE, UNIT, UNIT_COUNT, Setting, SettingError, shown
from .api import decode_image
from .service import GenerateRequest, GenerateResponse, Limits, RequestError, UnitRequest

API_VERSION = 3  # the extension's get_api_version() since v1.1.4xx

# -- samplers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """A sampler as the web UI names it, and ours for each scheduler it takes here."""

    name: str
    aliases: tuple[str, ...]
    schedulers: dict[str, str]  # the web UI's scheduler name -> our sampler ("automatic": its default)


# Since web UI v1.9 the noise schedule is a separate "scheduler"; "automatic" is each sampler's own
# default (Karras for DPM++ 2M, the model's uniform sigmas for Euler: sd_samplers_kdiffusion.py).
SAMPLERS = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",),
            {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras", "uniform": "dpmpp_2m"}),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), {"automatic": "euler_a", "uniform": "euler_a"}),
    Sampler("Euler", ("k_euler",), {"automatic": "euler", "uniform": "euler"}),
    Sampler("DDIM", ("ddim",), {"automatic": "ddim"}),
    Sampler("UniPC", ("unipc",), {"automatic": "unipc"}),
    Sampler("LCM", ("k_lcm",), {"automatic": "lcm"}),
)  # fmt: skip
# Before v1.9 the schedule was part of the name, and clients still send those names.
COMBINED = {"dpm++ 2m karras": ("DPM++ 2M", "karras"), "k_dpmpp_2m_ka": ("DPM++ 2M", "karras")}
DEFAULT_SAMPLER = "Euler"  # the API's sampler_index default (its StableDiffusionProcessingAPI)
SCHEDULERS = ("automatic", "uniform", "karras")


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: each sampler's name, aliases and default schedule."""
    return [
        {"name": s.name, "aliases": list(s.aliases),
         "options": {"scheduler": "karras"} if s.schedulers["automatic"].endswith("karras") else {}}
        for s in SAMPLERS
    ]  # fmt: skip


def scheduler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``, as the web UI lists them."""
    return [
        {"name": name, "label": name.title(), "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
         "need_inner_model": False}
        for name in SCHEDULERS
    ]  # fmt: skip


def sampler(name: Any, scheduler: Any = None) -> tuple[str, str]:
    """(our sampler, the web UI's name for it) from ``sampler_name`` and ``scheduler``; our own
    names (``dpmpp_2m_karras``) are taken too. RequestError names the known ones."""
    name = DEFAULT_SAMPLER if name in (None, "") else name
    if not isinstance(name, str):
        raise RequestError(f"sampler_name must be text, got {name!r}")
    key = name.strip().lower()
    if key in COMBINED:  # "DPM++ 2M Karras": the sampler, and its schedule unless one is named
        key, implied = COMBINED[key][0].lower(), COMBINED[key][1]
        scheduler = implied if scheduler in (None, "") or str(scheduler).lower() == "automatic" else scheduler
    found = next((s for s in SAMPLERS if key == s.name.lower() or key in s.aliases), None)
    if found is None:
        if key in GENERATION["sampler"].allowed():  # ours, named as the web UI names it
            return key, next((s.name for s in SAMPLERS if key in s.schedulers.values()), key)
        known = ", ".join(repr(s.name) for s in SAMPLERS)
        raise RequestError(f"unknown sampler {name!r}; this server has {known} (and 'DPM++ 2M Karras')")
    chosen = "automatic" if scheduler in (None, "") else scheduler
    if not isinstance(chosen, str) or chosen.strip().lower() not in found.schedulers:
        raise RequestError(
            f"sampler {found.name!r} takes scheduler {', '.join(found.schedulers)} here, got {scheduler!r}"
        )
    return found.schedulers[chosen.strip().lower()], found.name


# -- unit enums ------------------------------------------------------------------------------------

# The extension's spellings (scripts/enums.py) -> ours; before v1.1.448 it also took the integers,
# which older clients still send: indices into its enums, whose order is ours (settings.UNIT's
# choices for mode and resize_mode).
CONTROL_MODES = {
    "Balanced": "balanced",
    "My prompt is more important": "prompt",
    "ControlNet is more important": "control",
}
RESIZE_MODES_A1111 = {
    "Just Resize": "just_resize",
    "Crop and Resize": "crop_and_resize",
    "Resize and Fill": "resize_and_fill",
    # the old names, still accepted by the extension's validator
    "Inner Fit (Scale to Fit)": "crop_and_resize",
    "Scale to Fit (Inner Fit)": "crop_and_resize",
    "Outer Fit (Shrink to Fit)": "resize_and_fill",
    "Envelope (Outer Fit)": "resize_and_fill",
}


# The extension's ControlNetUnionControlType (a unit's union_control_type) -> settings.UNIT's
# control_type; "Unknown", its default, lets the module decide, as our "auto" does.
UNION_CONTROL_TYPES = {
    "Unknown": "auto",
    "OpenPose": "openpose",
    "Depth": "depth",
    "Soft Edge": "softedge",  # hed/pidi/scribble/ted
    "Hard Edge": "canny",  # canny/lineart/anime_lineart/mlsd
    "Normal Map": "normal",
    "Segmentation": "segment",
    "Tile": "tile",
    "Inpaint": "inpaint",
}


def union_control_type(value: Any, where: str) -> str:
    """A unit's union_control_type (the extension's names, any case; absent: Unknown) as ours."""
    if value in (None, ""):
        return UNIT["control_type"].default
    found = {name.lower(): ours for name, ours in UNION_CONTROL_TYPES.items()}
    if not isinstance(value, str) or value.strip().lower() not in found:
        raise RequestError(
            f"{where}: union_control_type must be one of {', '.join(UNION_CONTROL_TYPES)}, got {shown(value)}"
        )
    return found[value.strip().lower()]


def control_modes() -> tuple[str, ...]:
    """Ours, in the order of the extension's integers: 0 balanced, 1 prompt, 2 control."""
    return UNIT["mode"].allowed()


def resize_modes() -> tuple[str, ...]:
    """Ours, in the order of the extension's integers (and img2img's, the web UI's): 0 just resize,
    1 crop and resize, 2 resize and fill, and 3, the web UI's latent upscale, a just resize here."""
    ours = UNIT["resize_mode"].allowed()
    return (*ours, ours[0])


def enum_value(value: Any, names: dict[str, str], order: tuple[str, ...], what: str) -> str:
    """A unit's control_mode or resize_mode as ours, from the extension's name (any case) or the old
    integer. webuiapi 0.9.9 sent a one-element list (a stray comma): it is unwrapped."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(order):
        return order[value]
    if isinstance(value, str):
        lowered = {name.lower(): ours for name, ours in names.items()}
        if value.strip().lower() in lowered:
            return lowered[value.strip().lower()]
        if value in order:  # our own spelling
            return value
    numbers = f"0..{len(order) - 1}"
    allowed = f"one of {', '.join(repr(name) for name in list(names)[:3])} (or {numbers})" if names else numbers
    raise RequestError(f"{what} must be {allowed}, got {value!r}")


# -- modules (annotators) --------------------------------------------------------------------------

# The extension lists its preprocessors by internal name (module_list) or by menu label
# (alias_names=true); ours are mostly its labels. Where they differ: its name or label -> ours.
MODULE_NAMES = {
    "depth": "depth_midas",
    "normal_map": "normal_midas",
    "lineart": "lineart_realistic",
    "hed": "softedge_hed",
    "hed_safe": "softedge_hedsafe",
    "pidinet": "softedge_pidinet",
    "pidinet_safe": "softedge_pidisafe",
    "pidinet_scribble": "scribble_pidinet",
    "tile_resample": "tile",
}
MODULE_LABELS = {
    "inpaint_global_harmonious": "inpaint",
    "invert (from white bg & black line)": "invert",
    "lineart_standard (from white bg & black line)": "lineart_standard",
    "tile_resample": "tile",
}
# The annotator parameters a unit's threshold_a and threshold_b set: the extension's slider_1 and
# slider_2 (preprocessor_compiled.py: canny's low and high thresholds, ...); for mlsd_lsd and
# scribble, which stand in for its modules of those names, the parameter that plays that slider's
# part. A module not listed has no sliders here: threshold_a and threshold_b are ignored for it, as
# module_list says. Every other parameter keeps its default.
SLIDERS = {
    "canny": ("low_threshold", "high_threshold"),
    "mlsd": ("thr_v", "thr_d"),
    "mlsd_lsd": ("thr_d",),
    "normal_midas": ("bg_th",),
    "recolor_luminance": ("gamma_correction",),
    "threshold": ("threshold",),
    "tile": ("down_sampling_rate",),
    "scribble": ("threshold",),
}


def module(value: Any, where: str) -> str:
    """Our annotator for a unit's ``module``: ours, or the extension's name or label."""
    if value in (None, ""):
        return "none"
    if isinstance(value, str):
        for table in ({name: name for name in module_names()}, MODULE_NAMES, MODULE_LABELS):
            if value in table:
                return table[value]
    raise RequestError(f"{where}: unknown module {value!r}; GET /controlnet/module_list lists them")


def module_names() -> list[str]:
    """The annotators a unit may use, "none" first as the extension lists them; openpose_json reads a
    file, which this API takes as a unit's image instead of running it."""
    from ..annotators import ANNOTATORS

    return ["none", *(name for name, a in ANNOTATORS.items() if name != "none" and a.from_file is None)]


def module_list(alias_names: bool = False) -> dict[str, Any]:
    """``GET /controlnet/module_list``: the names (the extension's internal names, or with
    ``alias_names`` its labels, where they differ from ours) and each one's sliders."""
    table = MODULE_LABELS if alias_names else MODULE_NAMES
    shown = {ours: theirs for theirs, ours in table.items()}
    names = {shown.get(name, name): name for name in module_names()}
    return {"module_list": list(names), "module_detail": {label: module_detail(name) for label, name in names.items()}}


def module_detail(name: str) -> dict[str, Any]:
    """A module's sliders as the extension describes them (name, value, min, max, step): the
    resolution (processor_res), then what threshold_a and threshold_b set (SLIDERS)."""
    from ..annotators import get_annotator

    params = {p.name: p for p in get_annotator(name).params}
    sliders = []
    if name != "none":  # a ready map is not processed
        res = UNIT["annotator_resolution"]
        sliders.append({"name": "Resolution", "value": res.default, "min": res.minimum, "max": res.maximum,
                        "step": res.multiple_of})  # fmt: skip
    for pname in SLIDERS.get(name, ()):
        p = params[pname]
        step = 1 if p.kind == "int" else 0.01
        sliders.append({"name": pname, "value": p.default, "min": p.minimum, "max": p.maximum, "step": step})
    return {"model_free": False, "sliders": sliders}


def slider_params(annotator: str, values: tuple[Any, Any], where: str) -> dict[str, Any]:
    """The annotator parameters threshold_a and threshold_b set. As the extension's
    bound_check_params: -1, or a value outside the slider's range, means the default."""
    from ..annotators import get_annotator

    params = {p.name: p for p in get_annotator(annotator).params}
    chosen = {}
    for field, value, pname in zip(("threshold_a", "threshold_b"), values, SLIDERS.get(annotator, ()), strict=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{where}: {field} must be a number, got {value!r}")
        p = params[pname]
        if p.minimum <= value <= p.maximum:
            chosen[pname] = int(value) if p.kind == "int" else float(value)
    return chosen


def processor_res(value: Any, where: str) -> int:
    """The annotator's resolution (settings.UNIT's annotator_resolution): -1 or out of its range
    is its default (the extension's bound_check_params: 64..2048, else 512); else the nearest
    multiple of 64 that our annotators take."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}: processor_res must be a number, got {value!r}")
    setting = UNIT["annotator_resolution"]
    if not setting.minimum <= value <= setting.maximum:
        return setting.default
    return max(int(setting.minimum), round(value / setting.multiple_of) * setting.multiple_of)


# -- ControlNet models -----------------------------------------------------------------------------


def old_model_hash(path: Path) -> str | None:
    """The web UI's old 8-digit model hash (sd_models.model_hash: SHA-256 of the 64 KiB at 1 MiB),
    which the extension's model_list shows; None for a diffusers folder."""
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def model_title(path: Path) -> str:
    """A ControlNet or T2I-Adapter as the extension's model_list names it: "stem [hash]". Kept
    while the file is unchanged (its size and time): every unit of every request matches its
    model against these titles."""
    try:
        stat = path.stat()
    except OSError:
        return path.stem
    return _title(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _title(path: Path, size: int, mtime_ns: int) -> str:
    digest = old_model_hash(path)
    return f"{path.stem} [{digest}]" if digest else path.stem


def control_model(value: Any, files: dict[str, list[Path]], where: str) -> dict[str, Path]:
    """The unit's model among the served model's ``files`` (by kind), as the extension finds it:
    "name [hash]" exactly, the name without the hash, the stem (any case), a shipped model's name,
    then the shortest stem that contains it. {"controlnet": file} or {"adapter": file}: the file,
    not its index, which the service finds among those the model loaded (a model loaded or evicted
    meanwhile would shift an index taken from this listing)."""
    if value in (None, "", "None", "none"):
        raise RequestError(f"{where}: no ControlNet model selected; GET /controlnet/model_list lists them")
    if not isinstance(value, str):
        raise RequestError(f"{where}: model must be text, got {value!r}")
    wanted = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", value).strip().lower()
    candidates = [(kind, i, path) for kind in ("controlnet", "adapter") for i, path in enumerate(files[kind])]

    def exact(kind: str, path: Path) -> bool:
        names = {model_title(path).lower(), path.name.lower(), path.stem.lower()}
        return value.lower() in names or wanted in names or wanted == shipped.shipped_name(path, kind)

    found = [(kind, i) for kind, i, path in candidates if exact(kind, path)]
    if not found:
        containing = sorted((len(p.stem), kind, i) for kind, i, p in candidates if wanted and wanted in p.stem.lower())
        found = [(kind, i) for _, kind, i in containing]
    if not found:
        held = ", ".join(model_title(path) for _, _, path in candidates) or "none"
        raise RequestError(f"{where}: model {value!r} is not one of this model's ControlNets ({held})")
    kind, index = found[0]
    return {kind: files[kind][index]}


# -- requests --------------------------------------------------------------------------------------


def checked(setting: Setting, value: Any, field: str, where: str = "") -> Any:
    """``value`` checked against our setting, the message naming the A1111 ``field``."""
    try:
        return setting.check(value, where, name=field)
    except SettingError as error:
        raise RequestError(str(error)) from None


# A whole number with no range of its own (batch_size, n_iter, ...), checked as our settings are.
WHOLE_NUMBER = Setting("whole number", 0, "any whole number", -math.inf, math.inf, kind=int)


# A yes or no as pydantic 1 reads one (the web UI's request models and the extension's unit are
# pydantic models): true, false, 1, 0, or one of these words in any case.
TRUE = frozenset({1, "1", "on", "t", "true", "y", "yes"})
FALSE = frozenset({0, "0", "off", "f", "false", "n", "no"})


def boolean(value: Any, field: str, where: str = "") -> bool:
    """``value`` as true or false, as the web UI's pydantic models coerce it; RequestError else."""
    if isinstance(value, bool):
        return value
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, (int, float, str)):
        if key in TRUE:
            return True
        if key in FALSE:
            return False
    prefix = f"{where}: " if where else ""
    raise RequestError(f'{prefix}{field} must be true or false (or 1, 0, "yes", "no", ...), got {shown(value)}')


def _flag(values: dict, field: str, default: bool, where: str = "") -> bool:
    value = values.get(field)
    return default if value is None else boolean(value, field, where)


# Unit fields this server does not implement: refused when set, never silently ignored (the
# extension would torch.load ipadapter_input: it is never unpickled here).
UNSUPPORTED_UNIT_FIELDS = ("advanced_weighting", "effective_region_mask", "ipadapter_input", "batch_images")
# The extension's older spellings (ControlNetUnit.legacy_field_alias, mask_alias).
UNIT_ALIASES = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}


def _aliased(raw: dict, where: str) -> dict:
    values = dict(raw)
    for alias, field in UNIT_ALIASES.items():
        if alias in values:
            if field in values and values[field] is not None:
                raise RequestError(f"{where}: give {field} or its old name {alias}, not both")
            values[field] = values.pop(alias)
    return values


@dataclass
class UnitImages:
    """What a unit's image comes from when it has none of its own, and the request's mask."""

    init_image: np.ndarray | None
    mask: np.ndarray | None


def unit_image(values: dict, where: str, limits: Limits, fallback: UnitImages) -> tuple[np.ndarray, np.ndarray | None]:
    """(image, mask) of a unit: base64 (with or without a data: prefix), {image, mask} or
    [image, mask]; none (null or "") in img2img means the init image, as in the extension."""
    image, mask = values.get("image"), values.get("mask")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, list) and len(image) == 2 and all(isinstance(x, (str, type(None))) for x in image):
        image, mask = image
    mask = None if mask in (None, "") else decode_image(mask, f"{where}: mask", limits)
    if image not in (None, ""):
        return decode_image(image, f"{where}: image", limits), mask
    if fallback.init_image is None:
        raise RequestError(f"{where} is enabled but has no image (in txt2img each enabled unit needs one)")
    return fallback.init_image, mask


def drawn_map(image: np.ndarray, annotator: str, mask: np.ndarray | None) -> tuple[np.ndarray, str]:
    """A unit's (image, module) once its mask is read, as the extension reads a mask given to a
    module other than inpaint (its canvas's sketch, controlnet.py's "using mask as input"): a mask
    that is not blank (its first channel not all within 5 of black, nor of white: gradio's
    near-blank canvases, the extension's issue 1638) is the unit's map, white lines on black, and
    the module is none; a blank one changes nothing."""
    if annotator == "inpaint" or mask is None:
        return image, annotator
    first = mask[:, :, 0]
    if (first <= 5).all() or (first >= 250).all():
        return image, annotator
    return np.repeat(mask[:, :, :1], 3, axis=2), "none"


def _unit_mask(annotator: str, mask: np.ndarray | None, fallback: UnitImages, where: str) -> dict[str, Any]:
    """The inpaint module's mask parameter: the unit's mask, else the img2img mask (another module
    reads none: `drawn_map`)."""
    if annotator != "inpaint":
        return {}
    mask = mask if mask is not None else fallback.mask
    if mask is None:
        raise RequestError(f"{where}: the inpaint module needs a mask (the unit's, or the img2img mask)")
    return {"mask": mask}


def _enabled(values: dict, where: str) -> bool:
    # The extension's default since v1.1.448: a unit without "enabled": true is not used.
    return _flag(values, "enabled", False, where)


def control_unit(
    raw: Any, where: str, files: dict[str, list[Path]], limits: Limits, fallback: UnitImages
) -> tuple[UnitRequest, bool] | None:
    """One ``alwayson_scripts.controlnet.args`` entry as our UnitRequest, and whether its detected
    map is returned (save_detected_map); None for a unit that is not enabled."""
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object (a ControlNet unit), got {type(raw).__name__}")
    values = _aliased(raw, where)
    if not _enabled(values, where):
        return None
    for field in UNSUPPORTED_UNIT_FIELDS:
        if values.get(field) not in (None, [], ""):
            raise RequestError(f"{where}: {field} is not supported by this server")
    annotator = module(values.get("module"), where)
    image, mask = unit_image(values, where, limits, fallback)
    image, annotator = drawn_map(image, annotator, mask)
    params = slider_params(annotator, (values.get("threshold_a", -1), values.get("threshold_b", -1)), where)
    params |= _unit_mask(annotator, mask, fallback, where)
    # The inpaint hint is made at the output size (the extension gives it no resolution slider).
    pixel_perfect = _flag(values, "pixel_perfect", False, where) or annotator == "inpaint"
    start = checked(UNIT["start"], values.get("guidance_start", UNIT["start"].default), "guidance_start", where)
    end = checked(UNIT["end"], values.get("guidance_end", UNIT["end"].default), "guidance_end", where)
    if start > end:  # the extension's guidance_check
        raise RequestError(f"{where}: guidance_start ({start:g}) must not be after guidance_end ({end:g})")
    _flag(values, "low_vram", False, where)  # a memory hint of the extension's: models here load once
    unit = UnitRequest(
        image,
        annotator=annotator,
        annotator_params=params,
        strength=checked(UNIT["strength"], values.get("weight", UNIT["strength"].default), "weight", where),
        start=start,
        end=end,
        mode=enum_value(values.get("control_mode", UNIT["mode"].default), CONTROL_MODES, control_modes(),
                        f"{where}: control_mode"),
        resize_mode=enum_value(values.get("resize_mode", UNIT["resize_mode"].default), RESIZE_MODES_A1111,
                               resize_modes(), f"{where}: resize_mode"),
        pixel_perfect=pixel_perfect,
        annotator_resolution=processor_res(values.get("processor_res", -1), where),
        control_type=union_control_type(values.get("union_control_type"), where),
        **control_model(values.get("model"), files, where),
    )  # fmt: skip
    return unit, _flag(values, "save_detected_map", True, where)


def script_args(body: dict) -> list:
    """The ControlNet units of ``alwayson_scripts``: its "controlnet" entry, the key matched in any
    case as the web UI matches script titles. Other scripts are not run (docs/webui.md)."""
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise RequestError('alwayson_scripts must be an object: {"controlnet": {"args": [units]}}')
    entry = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == "controlnet"), None)
    if entry is None:
        return []
    args = entry.get("args") if isinstance(entry, dict) else entry
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    wheres = (f"ControlNet unit {i}" for i in range(len(args)))
    enabled = sum(isinstance(raw, dict) and _enabled(_aliased(raw, w), w) for raw, w in zip(args, wheres, strict=False))
    if enabled > UNIT_COUNT:  # units not enabled are not counted: they are not used
        raise RequestError(f"{enabled} enabled ControlNet units; at most {UNIT_COUNT} here (control_net_unit_count)")
    return args


# The web UI's features that this server does not have: a request that asks for one is refused,
# not answered with something else. (field, what it is)
UNSUPPORTED = {
    "enable_hr": "hires fix",
    "restore_faces": "face restoration",
    "tiling": "tiling",
    "script_name": "scripts",
    "styles": "saved styles",
    "subseed_strength": "variation seeds",
    "refiner_checkpoint": "a refiner",
}


@dataclass
class Translated:
    """An A1111 request as ours, and what the answer needs besides."""

    request: GenerateRequest
    sampler_name: str  # the web UI's name, for info
    save_maps: list[bool]  # per unit: whether its detected map is returned
    send_images: bool = True  # false: the answer has no images (the web UI's send_images)
    include_init_images: bool = False  # the parameters echo the init image and mask


def generation(body: Any, img2img: bool, model: str, files: dict[str, list[Path]], limits: Limits) -> Translated:
    """A txt2img or img2img body as a GenerateRequest for the served ``model`` (its control
    ``files``). The output is ``width`` x ``height``: every unit's detected map is fitted to it
    with the unit's resize mode (the pipeline's named size)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for field, what in UNSUPPORTED.items():
        if body.get(field) not in (None, False, 0, "", [], "None"):
            raise RequestError(f"{field}: {what} is not supported by this server")
    width, height = size(body)
    init_image, mask = init_images(body, width, height, limits) if img2img else (None, None)
    fallback = UnitImages(init_image, mask)
    units, save_maps = [], []
    for i, raw in enumerate(script_args(body)):
        made = control_unit(raw, f"ControlNet unit {i}", files, limits, fallback)
        if made is not None:
            units.append(made[0])
            save_maps.append(made[1])
    ours, name = sampler(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler"))
    request = GenerateRequest(
        prompt=_text(body, "prompt"),
        units=units,
        model=model,
        negative_prompt=_text(body, "negative_prompt"),
        added_prompt="",  # the web UI has no added prompt: the prompt is used as given
        num_images=_count(body),
        steps=checked(GENERATION["steps"], body.get("steps", 50), "steps"),  # the API's default: 50
        guidance_scale=checked(GENERATION["guidance_scale"], body.get("cfg_scale", 7.0), "cfg_scale"),
        eta=_eta(body, ours),
        seed=_seed(body),
        sampler=ours,
        width=width,
        height=height,
        init_image=init_image,
        mask=mask,
        denoising_strength=checked(GENERATION["denoising_strength"], body.get("denoising_strength", 0.75),
                                   "denoising_strength") if img2img else GENERATION["denoising_strength"].default,
    )  # fmt: skip
    _flag(body, "save_images", False)  # taken, changes nothing: this server keeps no image (docs/webui.md)
    flags = {
        name: _flag(body, name, default) for name, default in (("send_images", True), ("include_init_images", False))
    }
    return Translated(request, name, save_maps, **flags)


def _text(body: dict, field: str) -> str:
    value = "" if body.get(field) is None else body[field]
    if not isinstance(value, str):
        raise RequestError(f"{field} must be text, got {type(value).__name__}")
    return value


def _integer(body: dict, field: str, default: int) -> int:
    value = body.get(field)
    return int(checked(WHOLE_NUMBER, default if value is None else value, field))


def _count(body: dict) -> int:
    """batch_size x n_iter images (the web UI's batches of one prompt are our one batch)."""
    batch, iterations = _integer(body, "batch_size", 1), _integer(body, "n_iter", 1)
    most = GENERATION["num_images"].maximum
    if not (batch >= 1 and iterations >= 1 and batch * iterations <= most):
        raise RequestError(f"batch_size x n_iter must be between 1 and {most:g} images, got {batch} x {iterations}")
    return batch * iterations


def _seed(body: dict) -> int:
    seed = _integer(body, "seed", -1)
    return -1 if seed < 0 else checked(GENERATION["seed"], seed, "seed")  # the web UI: any negative is random


def _eta(body: dict, ours: str) -> float | None:
    """DDIM's eta or TCD's gamma (None: the sampler's own); the other samplers here take none, and
    their eta is ignored (the web UI applies eta to its ancestral samplers, whose noise ours always
    adds in full, as its default eta 1 does)."""
    from ..sampling.samplers import SAMPLERS as SPECS

    eta = body.get("eta")
    if SPECS[ours].eta is None or eta is None:
        return None
    return checked(GENERATION["eta"], eta, "eta")


def size(body: dict) -> tuple[int | None, int | None]:
    """(width, height) as named (settings.OUTPUT_SIZE: multiples of 64, the models' latent grid
    here, where the web UI allows 8), None where not given: a side alone, the other is the model's
    native size; neither, the output is sized as the JSON API's (the model's native short side,
    the init image's or the first unit image's shape). The service checks the server's limit."""
    width, height = (body.get(side) for side in OUTPUT_SIZE)
    return (
        None if width is None else int(checked(OUTPUT_SIZE["width"], width, "width")),
        None if height is None else int(checked(OUTPUT_SIZE["height"], height, "height")),
    )


def init_images(
    body: dict, width: int | None, height: int | None, limits: Limits
) -> tuple[np.ndarray, np.ndarray | None]:
    """img2img's init image and mask (white: repaint), fitted to width x height (where both are
    named) with the request's resize_mode as the web UI does; inpainting_mask_invert=1 repaints the
    black area instead."""
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise RequestError("init_images must be a list with one base64 image")
    if len(images) > 1:
        raise RequestError(f"init_images has {len(images)} images; this server takes one")
    mode = enum_value(body.get("resize_mode", 0), {}, resize_modes(), "resize_mode")
    named = width is not None and height is not None

    def fitted(image: np.ndarray, interpolation: str = "auto") -> np.ndarray:
        return fit_to(image, width, height, mode, interpolation) if named else image

    init = fitted(decode_image(images[0], "init_images[0]", limits))
    if body.get("mask") in (None, ""):
        return init, None
    mask = decode_image(body["mask"], "mask", limits)
    invert = _integer(body, "inpainting_mask_invert", 0)
    if invert not in (0, 1):
        raise RequestError(f"inpainting_mask_invert must be 0 or 1, got {invert}")
    mask = 255 - mask if invert else mask
    return init, fitted(mask, "nearest")


def detect_units(body: Any, limits: Limits) -> list[UnitRequest]:
    """``POST /controlnet/detect`` as one unit per image, run at ``controlnet_processor_res``.
    The images come as ``controlnet_input_images`` (the extension's name) or ``controlnet_images``
    (what webuiapi 0.9.11 and later send)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    annotator = module(body.get("controlnet_module", "none"), "controlnet_module")
    images = body.get("controlnet_input_images") or body.get("controlnet_images")
    if not isinstance(images, list) or not images:
        raise RequestError("no image selected: give controlnet_input_images, a list of base64 images")
    most = int(GENERATION["num_images"].maximum)
    if len(images) > most:
        raise RequestError(f"{len(images)} images to detect; at most {most} a request")
    masks = body.get("controlnet_masks") or []
    if not isinstance(masks, list):
        raise RequestError("controlnet_masks must be a list of base64 images")
    values = (body.get("controlnet_threshold_a", -1), body.get("controlnet_threshold_b", -1))
    params = slider_params(annotator, values, "detect")
    resolution = processor_res(body.get("controlnet_processor_res", -1), "detect")
    units = []
    for i, image in enumerate(images):
        unit_params = dict(params)
        mask = masks[i] if i < len(masks) else None
        if annotator == "inpaint" and mask in (None, ""):
            raise RequestError(f"the inpaint module needs controlnet_masks[{i}]")
        if mask not in (None, ""):
            if annotator != "inpaint":
                raise RequestError(f"controlnet_masks: only the inpaint module reads a mask, not {annotator!r}")
            unit_params["mask"] = decode_image(mask, f"controlnet_masks[{i}]", limits)
        decoded = decode_image(image, f"controlnet_input_images[{i}]", limits)
        units.append(UnitRequest(decoded, annotator, unit_params, pixel_perfect=False, annotator_resolution=resolution))
    return units


# -- answers ---------------------------------------------------------------------------------------


def checkpoint_title(name: str, base: Path) -> dict[str, Any]:
    """A served model as ``/sdapi/v1/sd-models`` lists it: the title "name [short hash]" that
    clients send back as sd_model_checkpoint. The file's name only: never a server path."""
    sha256 = model_sha256(base)
    return {
        "title": f"{name} [{short_hash(sha256)}]",
        "model_name": Path(name).stem,
        "hash": short_hash(sha256),
        "sha256": sha256,
        "filename": base.name,
        "config": None,
    }


def find_checkpoint(value: Any, models: list[dict[str, Any]], names: list[str]) -> str:
    """The served model's name (``names``, beside their ``models`` listing) for an
    sd_model_checkpoint: its title, name, name without extension or hash, any case."""
    if isinstance(value, str):
        wanted = value.strip().lower()
        bare = re.sub(r"\s*\[[0-9a-f]+\]$", "", wanted)
        for name, listing in zip(names, models, strict=True):
            keys = {listing["title"].lower(), name.lower(), listing["model_name"].lower()}
            keys |= {listing["hash"], listing["sha256"]}
            if wanted in keys or bare in keys:
                return name
    titles = ", ".join(listing["title"] for listing in models)
    raise RequestError(f"sd_model_checkpoint {value!r} is not a served model; choose one of {titles}")


def _web_ui_name(names: dict[str, str], ours: str) -> str:
    """The web UI's (first) name for one of ours."""
    return next((theirs for theirs, mine in names.items() if mine == ours), ours)


def schedule_type(translated: Translated) -> str | None:
    """The web UI's "Schedule type" of the sampler used, where its sampler has several here."""
    found = next((s for s in SAMPLERS if s.name == translated.sampler_name), None)
    if found is None or len(set(found.schedulers.values())) < 2:
        return None
    ours = translated.request.sampler
    return next(name.title() for name, sampler in found.schedulers.items() if sampler == ours and name != "automatic")


def web_ui_texts(translated: Translated, response: GenerateResponse) -> GenerateResponse:
    """The response with each image's parameters text (the PNG's, and info's infotexts) in the web
    UI's spellings: its sampler name and schedule type, the units' control and resize modes as the
    extension names them. The JSON record beside it keeps ours."""
    record = response.settings
    controls = [
        control | {"mode": _web_ui_name(CONTROL_MODES, control["mode"]),
                   "resize_mode": _web_ui_name(RESIZE_MODES_A1111, control["resize_mode"])}
        for control in record["controls"]
    ]  # fmt: skip
    spelled = record | {"sampler": translated.sampler_name, "controls": controls}
    schedule, name = schedule_type(translated), translated.sampler_name
    texts = []
    for seed, text in zip(response.seeds, response.image_texts, strict=True):
        parameters = parameters_text(spelled | {"seed": seed}, record["models"])
        if schedule is not None:
            parameters = parameters.replace(f"Sampler: {name}, ", f"Sampler: {name}, Schedule type: {schedule}, ", 1)
        texts.append(text | {"parameters": parameters})
    return dataclasses.replace(response, image_texts=texts)


def generation_response(body: dict, translated: Translated, response: GenerateResponse, detect_maps: bool) -> dict:
    """The web UI's answer: ``images`` (raw base64 PNGs carrying their parameters: the generated
    images, then each unit's detected map as the extension appends them unless ``detect_maps`` is
    off or the unit said save_detected_map false; none with send_images false), ``parameters``
    (the request, as the web UI echoes it) and ``info``, a JSON string; the images' parameters text
    in the web UI's spellings (`web_ui_texts`)."""
    response = web_ui_texts(translated, response)
    images = response.image_pngs() if translated.send_images else []
    if detect_maps and translated.send_images:
        images += [png for png, keep in zip(response.map_pngs(), translated.save_maps, strict=True) if keep]
    parameters = dict(body)
    if "init_images" in parameters and not translated.include_init_images:
        parameters.update(init_images=None, mask=None)  # the web UI leaves them out unless asked
    return {
        "images": [base64.b64encode(png).decode("ascii") for png in images],
        "parameters": parameters,
        "info": json.dumps(info(translated, response)),
    }


def info(translated: Translated, response: GenerateResponse) -> dict[str, Any]:
    """The web UI's ``Processed.js()`` fields that clients read; ``infotexts`` are the text the
    answer's PNGs carry."""
    request, settings, seeds = translated.request, response.settings, response.seeds
    base = settings["models"]["base"]
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(seeds),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": settings["width"],
        "height": settings["height"],
        "sampler_name": translated.sampler_name,
        "cfg_scale": request.guidance_scale,
        "steps": request.steps,
        "batch_size": len(seeds),
        "sd_model_name": Path(request.model).stem,
        "sd_model_hash": short_hash(base["sha256"]) if "sha256" in base else None,
        "denoising_strength": settings.get("denoising_strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [text["parameters"] for text in response.image_texts],
        "styles": [],
        "clip_skip": 1,
        "version": f"controlnet {__version__}",
    }

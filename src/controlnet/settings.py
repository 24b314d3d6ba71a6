"""Every generation setting, defined once: its default, its range or choices, and what it means.

The Python API (``Pipeline.generate``), the command line (``controlnet generate``), the web page and
the JSON API take their defaults, limits and help from here and refuse a value with the same one
line (``SettingError``), and the PNG settings record is built here (``batch_record``). Defaults
and ranges are the original canny app's (docs/reference.md, "The original app"); the control-unit
settings are the AUTOMATIC1111 extension's.

Prompts have their own limits (sampling/prompts.py: characters, then tokens); annotator parameters
are defined by each annotator (annotators/); what a server may refuse besides (its resolution
slider, its upload sizes) is its own (serve/service.Limits).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**31 - 1


class SettingError(ValueError):
    """A setting outside what is allowed: one line naming it, what is allowed and what was given."""


@dataclass(frozen=True)
class Setting:
    """One setting: ``name`` is its name in the Python and JSON APIs (``flag`` on the command line).
    Its kind is the type of ``default`` (bool, int, float or str); None defaults are given by
    ``kind``."""

    name: str
    default: Any
    help: str
    minimum: float | None = None  # inclusive bounds for numbers
    maximum: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()  # a callable: known only at run time
    kind: type | None = None  # when ``default`` is None
    flag: str = ""  # the command line's name, when it is not --name-with-dashes
    label: str = ""  # how messages and the page name it, when not the name with spaces

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ")

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def allowed(self) -> tuple[str, ...]:
        return self.choices() if callable(self.choices) else self.choices

    def describe(self) -> str:
        """What is allowed, as help texts say it: '1..100', 'ddim, euler, ...', 'a multiple of 64 in 64..2048'."""
        if self.allowed():
            return ", ".join(self.allowed())
        if self.type is bool:
            return "true or false"
        span = f"{_number(self.minimum)}..{_number(self.maximum)}"
        return f"a multiple of {self.multiple_of} in {span}" if self.multiple_of else span

    def check(self, value: Any, where: str = "", name: str = "") -> Any:
        """``value`` if allowed, else SettingError: '[where: ]steps must be between 1 and 100, got 0'.
        ``name``: how the message names the setting, when not its title (an API's own field name)."""
        name = name or self.title
        name = f"{where}: {name}" if where else name

        def refuse(allowed: str) -> SettingError:
            return SettingError(f"{name} must be {allowed}, got {shown(value)}")

        if self.allowed():
            if value not in self.allowed():
                raise refuse(f"one of {', '.join(self.allowed())}")
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise refuse("true or false")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise refuse("text")
            return value
        # isfinite for floats only: a Python int has no infinity, and past ~1e308 isfinite overflows.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise refuse("a number")
        if self.type is int and value != int(value):
            raise refuse("a whole number")
        if not self.minimum <= value <= self.maximum:
            raise refuse(f"between {_number(self.minimum)} and {_number(self.maximum)}")
        if self.multiple_of and value % self.multiple_of:
            raise refuse(f"a multiple of {self.multiple_of}")
        return value


def _finite(value: int | float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def shown(value: Any, most: int = 60) -> str:
    """``repr(value)`` as a message quotes it, cut short: a request's value may be megabytes long."""
    try:
        shown = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit for turning it into text
        return "a number of more than 4300 digits"
    return shown if len(shown) <= most else f"{shown[: most - 20]}...({len(shown):,} characters)"


def _number(value: float | None) -> str:
    return "" if value is None else (str(int(value)) if float(value).is_integer() else repr(float(value)))


def _samplers() -> tuple[str, ...]:
    from .sampling.samplers import SAMPLERS

    return tuple(SAMPLERS)


def _annotators() -> tuple[str, ...]:
    from .annotators import ANNOTATORS

    return tuple(ANNOTATORS)


def _union_types() -> tuple[str, ...]:
    from .models.controlnet_union import CONTROL_TYPES

    return (AUTO_UNION_TYPE, *CONTROL_TYPES)


# A unit's union control type by default: the one its annotator makes (pipeline.UNION_TYPES).
AUTO_UNION_TYPE = "auto"


CONTROL_MODES = ("balanced", "prompt", "control")
DECODERS = ("vae", "taesd")  # the final decode: the model's VAE, or the tiny autoencoder (models/taesd.py)
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")

# One generation. The prompts are checked by sampling.prompts.check_prompts.
GENERATION: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("num_images", 1, "images to generate, seed + i each", 1, 12, flag="--num-samples", label="images"),
        Setting("steps", 20, "sampling steps", 1, 100),
        Setting(
            "guidance_scale",
            9.0,
            "classifier-free guidance scale (above 30, float16 overflows: NaN images)",
            0.1,
            30.0,
            flag="--guidance",
        ),
        Setting(
            "eta",
            None,
            "DDIM's eta / TCD's gamma: 0 deterministic, 1 fresh noise at every step (samplers that take one: "
            "ddim, tcd; default: the sampler's own, DDIM 0, TCD 0.3)",
            0.0,
            1.0,
            kind=float,
        ),
        Setting("seed", -1, "the first image's seed; -1 picks one at random", -1, MAX_SEED),
        Setting("sampler", "ddim", "the sampler", choices=_samplers),
        Setting(
            "resolution",
            None,
            "the output's short side (default: the model's native size)",
            64,
            2048,
            multiple_of=64,
            kind=int,
        ),
        Setting(
            "decoder",
            "vae",
            "the final decode: the model's VAE, or TAESD (much faster, a little less detail; needs a TAESD loaded)",
            choices=DECODERS,
        ),
        Setting("denoising_strength", 0.75, "img2img: how far the init image is noised (1: entirely)", 0.01, 1.0),
        Setting(
            "guess_mode",
            False,
            "every ControlNet unit in control mode (the original apps' guess mode); T2I-Adapter units keep theirs",
        ),
    )
}

# The LoRAs of a generation, beside the prompt's <lora:NAME:WEIGHT> tags: each "FILE" or
# "FILE:WEIGHT" (weight 1 by default; lora.parse_lora_argument) in the Python API and on the command
# line, a name in the served LoRA folder in the servers' APIs. Checked by check_loras.
LORAS = Setting(
    "loras",
    (),
    "a LoRA merged into the model for this generation: FILE or FILE:WEIGHT (weight 1 by default); repeatable",
    kind=tuple,
    flag="--lora",
)
MAX_LORAS = 16


def check_loras(value: Any) -> list[tuple[str, float]]:
    """Each entry of ``loras`` as (file or name, weight): a "FILE[:WEIGHT]" text or a (FILE, WEIGHT)
    pair, at most MAX_LORAS; SettingError, one line, for anything else."""
    from .lora import parse_lora_argument

    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SettingError(f"loras must be a list of FILE[:WEIGHT] entries, got {shown(value)}")
    if len(value) > MAX_LORAS:
        raise SettingError(f"loras must be at most {MAX_LORAS} entries, got {len(value)}")
    entries = []
    for entry in value:
        if isinstance(entry, str):
            try:
                path, weight = parse_lora_argument(entry)
            except ValueError as error:
                raise SettingError(str(error)) from None
            entries.append((str(path), weight))
            continue
        pair = isinstance(entry, (tuple, list)) and len(entry) == 2
        name, weight = entry if pair else (None, None)
        if not isinstance(name, (str, os.PathLike)) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise SettingError(f"a LoRA must be FILE[:WEIGHT] or (FILE, WEIGHT), got {shown(entry)}")
        if not _finite(weight):
            raise SettingError(f"LoRA {os.fspath(name)!r}: the weight must be a finite number, got {weight!r}")
        entries.append((os.fspath(name), float(weight)))
    return entries


# The output's width and height, for an interface that names them (the AUTOMATIC1111 API's width
# and height): each side in the resolution's range. Without them the output's short side is the
# resolution and its shape the first control (or init) image's (the original app's rule), which is
# how the page, the JSON API and the command line size it.
_RESOLUTION = GENERATION["resolution"]
OUTPUT_SIZE: dict[str, Setting] = {
    name: Setting(
        name,
        None,
        f"the output's {name}, whatever the images' shapes (a side not named: the resolution)",
        _RESOLUTION.minimum,
        _RESOLUTION.maximum,
        multiple_of=_RESOLUTION.multiple_of,
        kind=int,
    )
    for name in ("width", "height")
}


def check_output_size(width: Any, height: Any, names: tuple[str, str] = ("width", "height")) -> None:
    """A named output size: each side given (not None) as OUTPUT_SIZE allows, and, both given, at
    most 4:1 (imaging.resize.MAX_ASPECT_RATIO, the bound on every image's shape). ``names``: how
    the messages name the two sides."""
    from .imaging.resize import MAX_ASPECT_RATIO

    for setting, value, name in zip(OUTPUT_SIZE.values(), (width, height), names, strict=True):
        if value is not None:
            setting.check(value, name=name)
    if width is not None and height is not None and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise SettingError(
            f"the output size {width}x{height}: its long side may be at most {MAX_ASPECT_RATIO} times its short side"
        )


# One control unit (the AUTOMATIC1111 extension's unit).
UNIT: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "annotator",
            "canny",
            "what extracts the control map from the image ('none': a ready map)",
            choices=_annotators,
        ),
        Setting("strength", 1.0, "control strength", 0.0, 2.0),
        Setting("start", 0.0, "the fraction of the steps where the unit starts acting", 0.0, 1.0),
        Setting("end", 1.0, "the fraction of the steps where it stops", 0.0, 1.0),
        Setting(
            "mode",
            "balanced",
            "balanced, prompt (my prompt is more important) or control (the ControlNet is); "
            "a T2I-Adapter unit: balanced only",
            choices=CONTROL_MODES,
            flag="--control-mode",
            label="control mode",
        ),
        Setting(
            "resize_mode",
            "crop_and_resize",
            "how the image is fitted to the output size",
            choices=RESIZE_MODES,
            label="resize mode",
        ),
        Setting(
            "control_type",
            AUTO_UNION_TYPE,
            "a union ControlNet's (xinsir's) control type for this unit's map; auto: the one its annotator "
            "makes (canny: canny, depth_midas: depth, ...); other models ignore it",
            choices=_union_types,
            label="union control type",
        ),
        Setting("pixel_perfect", True, "run the annotator at the output size"),
        Setting(
            "annotator_resolution", 512, "the annotator's short side when not pixel perfect", 64, 2048, multiple_of=64
        ),
        # A unit uses one model: a ControlNet or a T2I-Adapter (UNIT_MODELS; unit_model says which).
        Setting("controlnet", 0, "which loaded ControlNet the unit uses (from 0)", 0, 63, label="ControlNet index"),
        Setting(
            "adapter",
            None,
            "which loaded T2I-Adapter the unit uses instead of a ControlNet (from 0; none: a ControlNet unit)",
            0,
            63,
            kind=int,
            label="T2I-Adapter index",
        ),
    )
}
# Control units a request may have: the page's unit tabs, and the AUTOMATIC1111 API's
# control_net_unit_count (the extension's default).
UNIT_COUNT = 3
# The settings that name a unit's model: a unit uses one ControlNet or one T2I-Adapter.
UNIT_MODELS = ("controlnet", "adapter")
# A T2I-Adapter unit has no control mode here: it acts on both sides of guidance, as in TencentARC's
# code and diffusers' adapter pipelines ("balanced"). The AUTOMATIC1111 extension also applies its
# prompt and control modes to adapters (soft per-level scales, the conditional side only); that is
# not implemented, so those modes are refused rather than ignored.
ADAPTER_MODE = "balanced"


def check_generation(values: Mapping[str, Any]) -> None:
    """Check every generation setting in ``values`` (unknown names are the caller's to refuse)."""
    for name, value in values.items():
        if name in GENERATION and not (value is None and GENERATION[name].default is None):
            GENERATION[name].check(value)
    sampler = values.get("sampler", GENERATION["sampler"].default)
    if values.get("eta") not in (None, 0) and _sampler_eta(sampler) is None:
        takes = ", ".join(name for name in _samplers() if _sampler_eta(name) is not None)
        raise SettingError(f"eta applies to the {takes} samplers only, got eta {values['eta']!r} for {sampler}")
    if sampler in FEW_STEP_SAMPLERS and values.get("steps", 0) > FEW_STEP_MAX_STEPS:
        raise SettingError(
            f"steps must be at most {FEW_STEP_MAX_STEPS} for {sampler} (the 50 steps its model was distilled on; "
            f"2-8 are meant), got {values['steps']!r}"
        )


def _sampler_eta(name: str) -> float | None:
    """The sampler's own eta (its default), None for a sampler that takes none."""
    from .sampling.samplers import SAMPLERS

    return SAMPLERS[name].eta


# The few-step samplers walk the 50 timesteps of the distillation schedule (sampling/few_step.py).
FEW_STEP_SAMPLERS = ("lcm", "tcd")
FEW_STEP_MAX_STEPS = 50


def check_unit(values: Mapping[str, Any], where: str = "control unit") -> None:
    """Check every unit setting in ``values``, that its window is not reversed, and that it names at
    most one model: a ControlNet (``controlnet``) or a T2I-Adapter (``adapter``; its mode can only
    be balanced). None for either is "not named" (`unit_model` says what a unit then uses)."""
    for name, value in values.items():
        if name in UNIT and not (value is None and name in UNIT_MODELS):
            UNIT[name].check(value, where)
    start, end = values.get("start", 0.0), values.get("end", 1.0)
    if start > end:
        raise SettingError(f"{where}: start ({start:g}) must not be after end ({end:g})")
    adapter = values.get("adapter")
    if adapter is not None and values.get("controlnet") is not None:
        raise SettingError(
            f"{where}: a unit uses one ControlNet (controlnet) or one T2I-Adapter (adapter), not both; "
            f"got controlnet {values['controlnet']} and adapter {adapter}"
        )
    if adapter is not None and values.get("mode", ADAPTER_MODE) != ADAPTER_MODE:
        raise SettingError(
            f"{where}: a T2I-Adapter unit takes control mode {ADAPTER_MODE!r} only (it acts on both sides of "
            f"guidance), got {values['mode']!r}"
        )


def unit_model(controlnet: int | None, adapter: int | None, controlnets: int, adapters: int) -> tuple[str, int]:
    """Which loaded model a unit uses, ("controlnet", i) or ("adapter", i), from what the unit names
    (None: not named) and how many ControlNets and T2I-Adapters are loaded. A unit naming a model
    uses it; one naming neither uses ControlNet 0, or T2I-Adapter 0 where adapters but no
    ControlNet are loaded (a base run or served with adapters only). Naming both is refused by
    `check_unit`."""
    if adapter is not None:
        return "adapter", adapter
    if controlnet is not None:
        return "controlnet", controlnet
    return ("adapter", 0) if controlnets == 0 and adapters > 0 else ("controlnet", 0)


def unit_mode(mode: str, guess_mode: bool, adapter: bool) -> str:
    """The mode a unit runs in: guess mode puts every ControlNet unit in control mode (the original
    app's guess mode); a T2I-Adapter unit keeps its own (balanced: adapters have no control mode)."""
    return "control" if guess_mode and not adapter else mode


def check_guess_mode(guess_mode: bool, adapters: Sequence[bool]) -> None:
    """Refuse guess mode where it would change nothing: units given, and every one a T2I-Adapter
    unit (``adapters``: whether each unit uses an adapter)."""
    if guess_mode and adapters and all(adapters):
        raise SettingError(
            "guess mode puts ControlNet units in control mode, and every unit here uses a T2I-Adapter "
            "(adapters have no control mode: they act on both sides of guidance)"
        )

"""The settings of a training run: ``TrainConfig``, one field per option of ``controlnet train``.

Each field is declared once, with ``option``: its default, its help text, its choices and the
range its values must lie in. ``controlnet train``'s flags (cli/train.py) and
``TrainConfig.check`` are both derived from those declarations, so that the parser, the check
and the config cannot disagree about a setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import shipped
from ..config import preset
from ..runtime import check_device
from ..settings import GENERATION

TASKS = ("controlnet", "adapter", "base", "vae")
CONTROL_INITS = ("zero", "gaussian")
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
STRATEGIES = ("ddp", "fsdp")
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.pt"  # in a checkpoint folder: everything a resumed run needs
MANIFEST_FILE = "checkpoint.json"  # written last: the size and SHA-256 of STATE_FILE
# The rows of a validation grid: control images, data images, generated with their prompts and with
# an empty prompt (the last row for a ControlNet only). Image size: the training resolution.
VALIDATION_ROWS = ("control", "data", "prompt", "no prompt")
# The largest training resolution: the largest size `controlnet generate` accepts, so that what is
# trained can be used; it also bounds memory (a single 2048 px sample through an SD 1.5 UNet needs
# tens of GB of activations). Anything above is a typo: --resolution 100000 asked for terabytes.
MAX_RESOLUTION = int(GENERATION["resolution"].maximum)
# AdamW moves every weight by about the learning rate at each step: above 1 each step moves a
# weight by more than its own typical size, which only diverges (SD's ControlNets train at 1e-5).
MAX_LEARNING_RATE = 1.0
# Validation generates its images as `controlnet generate` does: no more steps than it takes.
MAX_VALIDATION_STEPS = int(GENERATION["steps"].maximum)


class TrainingError(ValueError):
    """A training run cannot start or go on (bad options, data or checkpoint); the message says why."""


@dataclass(frozen=True)
class Range:
    """The values a number may take: from ``low`` to ``high`` (``math.inf``: no upper bound), each
    end closed unless said open; ``integer``: whole numbers only."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def check(self, name: str, value: object) -> None:
        """Refuse (TrainingError) a ``value`` outside the range, or of the wrong kind. NaN fails every
        comparison and infinities are not finite: a float is refused unless it is a finite number
        inside (``float("nan")`` passes ``value < 0`` checks silently, and a NaN learning rate or
        clipping norm trains nothing but NaN weights)."""
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrainingError(f"{name} must be an integer, got {value!r}")
            if value < self.low or value > self.high:
                allowed = f"at least {self.low}" if math.isinf(self.high) else f"between {self.low} and {self.high}"
                raise TrainingError(f"{name} must be {allowed}, got {value}")
            return
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            above = value > self.low if self.low_open else value >= self.low
            below = value < self.high if self.high_open else value <= self.high
            if above and below:
                return
        if math.isinf(self.high):
            allowed = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            allowed = f"in {opening}{self.low:g}, {self.high:g}{closing}"
        raise TrainingError(f"{name} must be a finite number {allowed}, got {value!r}")


def at_least(low: int) -> Range:
    """The whole numbers from ``low`` up."""
    return Range(low, integer=True)


POSITIVE = Range(0.0, math.inf, high_open=True)  # a finite number >= 0
FRACTION = Range(0.0, 1.0)  # a share, from 0 to 1


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    range: Range | None = None,
    flag: str | None = None,
    cli: bool = True,
    from_cli: Any = None,
) -> Any:
    """A field of ``TrainConfig`` with what the command line and the check need to know about it:
    ``help`` (shown by ``controlnet train --help``, followed by the default), ``choices``, the
    ``range`` of its values, its ``flag`` when it is not the field's name (``--no-cache``),
    ``cli=False`` for a setting of the Python API only, and ``from_cli``: how a flag's value maps
    to the field's (``--max-grad-norm 0`` means no clipping: None)."""
    metadata = {"help": help, "choices": choices, "range": range, "flag": flag, "cli": cli, "from_cli": from_cli}
    return field(default=default, metadata=metadata)


def zero_means_none(value: float) -> float | None:
    return None if value == 0 else value


@dataclass
class TrainConfig:
    """Everything a run needs; each field is an option of ``controlnet train`` (``max_steps`` is
    ``--max-steps``) unless it says ``cli=False``. Saved with every checkpoint."""

    data: str = option(help="a fill50k-layout folder (prompt.json) or a diffusers one (metadata.jsonl)")
    out: str = option(help="the run's folder: checkpoints, logs, validation, exports")
    base: str | None = option(None, "the base model (controlnet, adapter tasks); the trained VAE's file (base task)")
    task: str = option(
        "controlnet",
        "controlnet: a ControlNet on a frozen base; adapter: a T2I-Adapter on a frozen base; "
        "vae / base: a small VAE / UNet + text encoder from scratch",
        choices=TASKS,
    )
    model_config: str | None = option(None, "base/vae tasks: the preset to build from scratch (e.g. tiny)")
    controlnet: str | None = option(
        None,
        "controlnet task: start from this ControlNet, not the base's encoder (the command line also takes a "
        f"shipped one's name, {', '.join(shipped.names())}, which implies the shipped base without --base)",
    )
    control_init: str = option(
        "zero",
        "a new ControlNet's zero convolutions: zero (the paper) or gaussian (its ablation)",
        choices=CONTROL_INITS,
    )
    max_steps: int = option(1000, "optimiser steps to train for", range=at_least(1))
    batch_size: int = option(4, "samples per process and micro-step", range=at_least(1))
    gradient_accumulation: int = option(1, "micro-steps per optimiser step", range=at_least(1))
    learning_rate: float = option(1e-5, "AdamW learning rate", range=Range(0.0, MAX_LEARNING_RATE, low_open=True))
    unlock_decoder: bool = option(False, "also train the UNet decoder (the original's sd_locked=False)")
    decoder_learning_rate: float | None = option(
        None,
        "with --unlock-decoder: the decoder's learning rate (default: --learning-rate / 10)",
        range=Range(0.0, MAX_LEARNING_RATE, low_open=True),
    )
    proportion_empty_prompts: float = option(
        0.5, "the share of prompts replaced by the empty one (the paper's prompt drop)", range=FRACTION
    )
    only_mid_control: bool = option(False, "add the ControlNet's residual to the UNet's middle block only")
    mixed_precision: str = option(
        "no", "bf16 (CPUs and GPUs) or fp16 (GPUs, with a gradient scaler)", choices=MIXED_PRECISION
    )
    gradient_checkpointing: bool = option(False, "recompute each block in the backward pass: less memory, slower")
    ema_decay: float | None = option(
        None,
        "keep an EMA of the weights (e.g. 0.999), used for validation and export",
        range=Range(0.0, 1.0, low_open=True, high_open=True),
    )
    lr_schedule: str = option(
        "constant", "the learning rate after the warm-up: constant, or linear or cosine to zero", choices=LR_SCHEDULES
    )
    lr_warmup_steps: int = option(0, "steps of linear warm-up of the learning rate", range=at_least(0))
    # 0 or None: no clipping; a negative norm would flip the gradients.
    max_grad_norm: float | None = option(
        1.0, "clip the gradients' norm to this (0: no clipping)", range=POSITIVE, from_cli=zero_means_none
    )
    weight_decay: float = option(1e-2, "AdamW's weight decay", range=FRACTION, cli=False)
    checkpoint_every: int = option(500, "steps between checkpoints", range=at_least(1))
    keep_checkpoints: int = option(3, "how many of the newest checkpoints to keep", range=at_least(1))
    validate_every: int = option(0, "steps between validations (0: at the end only)", range=at_least(0))
    validation_count: int = option(4, "validation images (the first samples of the data)", range=at_least(1))
    validation_steps: int = option(
        20, "sampling steps of each validation image", range=Range(1, MAX_VALIDATION_STEPS, integer=True)
    )
    resume: str | None = option(None, "continue a run: 'latest' or a checkpoint folder")
    seed: int = option(
        0, "seed of the data order, of every sample's random draws and of new weights", range=at_least(0)
    )
    # Checked by ``check`` with the task: the multiple it must be depends on it.
    resolution: int | None = option(None, "training image size (default: the model's native size)")
    cache: bool = option(
        True, "encode latents and prompts at every step (default: once, kept in the run's cache/)", flag="--no-cache"
    )
    max_bad_fraction: float = option(
        0.05, "stop when more than this share of the samples read so far is unreadable", range=FRACTION
    )
    kl_weight: float = option(1e-6, "vae task: weight of the KL term", range=POSITIVE)
    adversarial_weight: float = option(
        0.0,
        "vae task: weight of a PatchGAN adversarial term (hinge loss, balanced against the reconstruction "
        "as SD's VAE was); 0: none",
        range=POSITIVE,
    )
    gradient_loss_weight: float = option(
        1.0, "vae task: weight of the image-gradient L1 term (against blurred edges)", range=POSITIVE
    )
    crop_size: int | None = option(
        None,
        "vae task: train on a random square crop of this size from each image (the VAE is convolutional "
        "and learns edges locally: more samples per second); default: whole images",
        range=at_least(8),
    )
    log_every: int = option(10, "steps between lines of metrics.csv and of the progress line", range=at_least(1))
    device: str = option("cpu", "cpu or cuda (torchrun: each process its local GPU)")
    strategy: str = option(
        "ddp", "several processes: replicate (ddp) or shard (fsdp, controlnet task) the ControlNet", choices=STRATEGIES
    )
    progress: bool = option(True, "print a progress line every log_every steps", cli=False)
    extra: dict = field(default_factory=dict, metadata={"help": "anything else to record", "cli": False})

    def check(self) -> None:
        """Refuse impossible settings with one clear message each, before anything is loaded: the
        choices and ranges the fields declare, the device, then what depends on several fields."""
        if self.task not in TASKS:
            raise TrainingError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for spec in dataclasses.fields(self):
            value, choices = getattr(self, spec.name), spec.metadata.get("choices")
            if choices is not None and value not in choices:
                raise TrainingError(f"{option_name(spec)} must be one of {', '.join(choices)}")
        device = check_training_device(self.device)
        if self.mixed_precision == "fp16" and device.type != "cuda":
            raise TrainingError("--mixed-precision fp16 needs a GPU (use bf16 on a CPU)")
        for spec in dataclasses.fields(self):
            value, allowed = getattr(self, spec.name), spec.metadata.get("range")
            if allowed is not None and value is not None:  # None: not set (an optional field)
                allowed.check(option_name(spec), value)
        self._check_resolution()
        self._check_combinations()

    def _check_resolution(self) -> None:
        # The VAE halves the size three times; the other tasks validate by generating at the training
        # size, and the pipeline generates in multiples of 64 (another size fails only at the end).
        multiple, why = (8, "the VAE's downsampling") if self.task == "vae" else (64, "validation generates at it")
        resolution = self.resolution
        if resolution is not None and (
            isinstance(resolution, bool)
            or not isinstance(resolution, int)
            or resolution % multiple
            or not multiple <= resolution <= MAX_RESOLUTION
        ):
            raise TrainingError(
                f"--resolution must be a multiple of {multiple} ({why}) between {multiple} and "
                f"{MAX_RESOLUTION} (the largest size controlnet generate takes), got {resolution!r}"
            )

    def _check_combinations(self) -> None:
        if self.decoder_learning_rate is not None and not self.unlock_decoder:
            raise TrainingError("--decoder-learning-rate applies with --unlock-decoder only")
        if self.control_init != "zero" and (self.task != "controlnet" or self.controlnet):
            raise TrainingError("--control-init applies to a new ControlNet (controlnet task without --controlnet)")
        if self.strategy == "fsdp" and self.task != "controlnet":
            raise TrainingError("--strategy fsdp shards the ControlNet: it is for the controlnet task")
        if self.strategy == "fsdp" and self.unlock_decoder:
            raise TrainingError("--strategy fsdp does not shard an unlocked decoder yet; use ddp with --unlock-decoder")
        if self.task in ("controlnet", "adapter") and self.base is None:
            raise TrainingError(f"the {self.task} task needs --base (the frozen base model)")
        if self.adversarial_weight and self.task != "vae":
            raise TrainingError("--adversarial-weight applies to the vae task")
        if self.task == "adapter" and (self.unlock_decoder or self.only_mid_control or self.controlnet):
            raise TrainingError("--unlock-decoder, --only-mid-control and --controlnet apply to the controlnet task")
        if self.task == "vae" and self.model_config is None:
            raise TrainingError("the vae task needs --model-config (the preset whose VAE to train)")
        if self.crop_size is not None:
            self._check_crop_size()
        if self.task == "base" and (self.base is None or self.model_config is None):
            raise TrainingError("the base task needs --model-config and --base (the trained VAE's file)")

    def _check_crop_size(self) -> None:
        if self.task != "vae":
            raise TrainingError("--crop-size applies to the vae task")
        try:
            model = preset(self.model_config)
        except ValueError as error:
            raise TrainingError(f"--model-config: {error}") from None
        factor, size = model.vae.downsample_factor, self.resolution or model.native_resolution
        if self.crop_size % factor or self.crop_size > size:
            raise TrainingError(
                f"--crop-size must be a multiple of {factor} (the VAE's downsampling) and at most the training "
                f"resolution {size}, got {self.crop_size}"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def option_name(spec: dataclasses.Field) -> str:
    """How messages name a field: its command line flag (``--max-steps``), or its words for a
    setting of the Python API only (``weight decay``)."""
    if not spec.metadata.get("cli", True):
        return spec.name.replace("_", " ")
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def check_training_device(name: str) -> torch.device:
    """The device ``name`` if training can run there: cpu, or a CUDA device this machine has."""
    try:
        return check_device(name, ("cpu", "cuda"))
    except ValueError as error:
        raise TrainingError(str(error)) from None

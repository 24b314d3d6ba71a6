"""The settings of a training run (``TrainConfig``), their checks, and the error a run stops with."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from ..pipeline import RESOLUTION_RANGE
from ..runtime import check_device

TASKS = ("controlnet", "base", "vae")
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
MAX_RESOLUTION = RESOLUTION_RANGE[1]
# AdamW moves every weight by about the learning rate at each step: above 1 each step moves a
# weight by more than its own typical size, which only diverges (SD's ControlNets train at 1e-5).
MAX_LEARNING_RATE = 1.0
# Validation samples with a model's schedule of 1000 training timesteps: no more steps than those.
MAX_VALIDATION_STEPS = 1000


class TrainingError(ValueError):
    """A training run cannot start or go on (bad options, data or checkpoint); the message says why."""


@dataclass
class TrainConfig:
    """Everything a run needs; ``controlnet train``'s flags map one to one (``--max-steps`` ->
    ``max_steps``). Saved with every checkpoint."""

    data: str
    out: str
    base: str | None = None  # base model file or folder (controlnet task; base task: its VAE)
    task: str = "controlnet"
    model_config: str | None = None  # base/vae tasks from scratch: a preset name (see config.PRESETS)
    controlnet: str | None = None  # controlnet task: start from this ControlNet instead of the base's encoder
    control_init: str = "zero"  # controlnet task: "gaussian" is the paper's ablation of the zero convolutions
    max_steps: int = 1000
    batch_size: int = 4  # per process and micro-step
    gradient_accumulation: int = 1
    learning_rate: float = 1e-5
    unlock_decoder: bool = False  # the original's sd_locked=False
    decoder_learning_rate: float | None = None  # default: learning_rate / 10
    proportion_empty_prompts: float = 0.5
    only_mid_control: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 1e-2
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0  # 0: only at the end
    validation_count: int = 4  # validation images (the first samples of the data)
    validation_steps: int = 20
    resume: str | None = None  # "latest" or a checkpoint directory
    seed: int = 0
    resolution: int | None = None  # default: the model's native resolution
    cache: bool = True
    max_bad_fraction: float = 0.05
    kl_weight: float = 1e-6  # vae task
    gradient_loss_weight: float = 1.0  # vae task: L1 between image gradients, against blurred edges
    log_every: int = 10
    device: str = "cpu"
    strategy: str = "ddp"  # several processes: ddp (replicas) or fsdp (sharded; controlnet task)
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse impossible settings with one clear message each, before anything is loaded.

        Every number is checked for its range, and NaN and infinities are refused: ``float("nan")``
        passes ``value < 0`` checks silently, and a NaN learning rate or clipping norm trains
        nothing but NaN weights."""
        if self.task not in TASKS:
            raise TrainingError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainingError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainingError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
        device = check_training_device(self.device)
        if self.mixed_precision == "fp16" and device.type != "cuda":
            raise TrainingError("--mixed-precision fp16 needs a GPU (use bf16 on a CPU)")
        for name, value in {
            "--max-steps": self.max_steps,
            "--batch-size": self.batch_size,
            "--gradient-accumulation": self.gradient_accumulation,
            "--checkpoint-every": self.checkpoint_every,
            "--keep-checkpoints": self.keep_checkpoints,
            "--validation-count": self.validation_count,
            "--log-every": self.log_every,
        }.items():
            _check_integer(name, value, 1)
        _check_integer("--validation-steps", self.validation_steps, 1, MAX_VALIDATION_STEPS)
        for name, value in {
            "--lr-warmup-steps": self.lr_warmup_steps,
            "--validate-every": self.validate_every,
            "--seed": self.seed,
        }.items():
            _check_integer(name, value, 0)
        _check_number("--learning-rate", self.learning_rate, 0.0, MAX_LEARNING_RATE, low_open=True)
        if self.decoder_learning_rate is not None:
            if not self.unlock_decoder:
                raise TrainingError("--decoder-learning-rate applies with --unlock-decoder only")
            _check_number("--decoder-learning-rate", self.decoder_learning_rate, 0.0, MAX_LEARNING_RATE, low_open=True)
        if self.ema_decay is not None:
            _check_number("--ema-decay", self.ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        if self.max_grad_norm is not None:  # 0 or None: no clipping; a negative norm would flip the gradients
            _check_number("--max-grad-norm", self.max_grad_norm, 0.0, math.inf, high_open=True)
        _check_number("weight decay", self.weight_decay, 0.0, 1.0)
        _check_number("--proportion-empty-prompts", self.proportion_empty_prompts, 0.0, 1.0)
        _check_number("--max-bad-fraction", self.max_bad_fraction, 0.0, 1.0)
        _check_number("--kl-weight", self.kl_weight, 0.0, math.inf, high_open=True)
        _check_number("--gradient-loss-weight", self.gradient_loss_weight, 0.0, math.inf, high_open=True)
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
        if self.control_init not in CONTROL_INITS:
            raise TrainingError(f"--control-init must be one of {', '.join(CONTROL_INITS)}")
        if self.control_init != "zero" and (self.task != "controlnet" or self.controlnet):
            raise TrainingError("--control-init applies to a new ControlNet (controlnet task without --controlnet)")
        if self.strategy not in STRATEGIES:
            raise TrainingError(f"--strategy must be one of {', '.join(STRATEGIES)}")
        if self.strategy == "fsdp" and self.task != "controlnet":
            raise TrainingError("--strategy fsdp shards the ControlNet: it is for the controlnet task")
        if self.strategy == "fsdp" and self.unlock_decoder:
            raise TrainingError("--strategy fsdp does not shard an unlocked decoder yet; use ddp with --unlock-decoder")
        if self.task == "controlnet" and self.base is None:
            raise TrainingError("the controlnet task needs --base (the frozen base model)")
        if self.task == "vae" and self.model_config is None:
            raise TrainingError("the vae task needs --model-config (the preset whose VAE to train)")
        if self.task == "base" and (self.base is None or self.model_config is None):
            raise TrainingError("the base task needs --model-config and --base (the trained VAE's file)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _check_integer(name: str, value: object, low: int, high: int | None = None) -> None:
    """Refuse (TrainingError) a value that is not an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrainingError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"at least {low}" if high is None else f"between {low} and {high}"
        raise TrainingError(f"{name} must be {allowed}, got {value}")


def _check_number(
    name: str, value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Refuse (TrainingError) a value that is not a finite number in the interval from low to high
    (open at either end when asked). NaN fails every comparison, so it is refused too."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return
    if math.isinf(high):
        allowed = f"{'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise TrainingError(f"{name} must be a finite number {allowed}, got {value!r}")


def check_training_device(name: str) -> torch.device:
    """The device ``name`` if training can run there: cpu, or a CUDA device this machine has."""
    try:
        return check_device(name, ("cpu", "cuda"))
    except ValueError as error:
        raise TrainingError(str(error)) from None

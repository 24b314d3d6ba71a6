"""Training: a ControlNet on a frozen base model, and small base models from scratch.

One loop (``train``) serves three tasks, each an ``Objective`` (what trains and its loss):

- ``controlnet``: the paper's setting (section 3.3). The base model is locked; the ControlNet
  (initialised from the base UNet's encoder, zero convolutions at zero) learns to predict the noise
  together with the frozen UNet: ``|| eps - eps_theta(z_t, t, c_text, c_hint) ||^2``. Half of the
  prompts are replaced by the empty string (section 3.3: it makes the ControlNet read the
  condition itself). With ``unlock_decoder`` (the original's ``sd_locked=False``) the UNet's
  decoder and output layers train too, at their own learning rate.
- ``base``: a UNet and its text encoder from scratch, on a trained VAE's latents (the same loss).
- ``vae``: the autoencoder from scratch: L1 + L2 reconstruction and a small KL term (no
  adversarial or perceptual loss: the small models this is for do not need them).

The frozen parts cost nothing twice: with ``cache`` (the default) the VAE posterior of every
training image and the text encoding of every distinct prompt are computed once and kept in
``<out>/cache``; each step then samples the latents from the cached posterior.

Determinism and resuming: every random draw of a sample (its timestep, noise, prompt drop,
posterior sample) comes from a generator seeded with (seed, the sample's position in the data
stream), and the data order from (seed, epoch). A run is therefore a function of its seed whatever
the number of processes, and resuming needs nothing but the step counter and the saved states.
Checkpoints are directories written under a temporary name and renamed, so one is either complete
or absent.

Many processes: launch with ``torchrun --nproc-per-node N -m controlnet train ...`` (or any
launcher that sets RANK / WORLD_SIZE / MASTER_ADDR); the trainable module is wrapped in
DistributedDataParallel (gloo on CPUs, nccl on GPUs) and every process takes its slice of each
global batch. Multi-node training is torchrun's ``--nnodes`` / ``--rdzv-endpoint``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import TORCH_LOAD_ERRORS, load_base, load_controlnet, save_diffusers, save_ldm, torch_load_reason
from .config import ModelConfig
from .files import NotWritable, atomic_file, writable_folder
from .hashing import file_sha256
from .models.controlnet import ControlNet
from .models.layers import TimestepEmbedSequential
from .models.stable_diffusion import StableDiffusion
from .pipeline import RESOLUTION_RANGE
from .runtime import NonFiniteError, check_device
from .sampling.prompts import encode_prompts

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


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Distributed:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process joined the group (and so leaves it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group this process joined. Left to the interpreter's exit, gloo's
        threads can be torn down mid-flight and abort the process ("terminate called without an
        active exception") after the training has finished."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (so that all of them stop at the same step)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)])
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.item() / self.world_size


def init_distributed(device: str) -> Distributed:
    """Join the process group a launcher (torchrun) describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=torch.device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        backend, place = "nccl", torch.device("cuda", local_rank)
    else:
        backend, place = "gloo", torch.device(device)
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group(backend)
    return Distributed(rank=rank, world_size=world_size, device=place, owns_group=owns_group)


# ---------------------------------------------------------------------------------------------
# The order of the data and the randomness of each sample


class DataStream:
    """Position ``p`` of the data stream is sample ``order(p // n)[p % n]``: every epoch a fresh
    permutation seeded by (seed, epoch). Optimizer step ``s`` consumes positions
    ``[s * G, (s + 1) * G)`` with ``G`` = batch size x processes x accumulation; micro-step ``m`` of
    process ``r`` takes ``B`` of them. The layout of processes does not change which samples a
    step sees, nor their random draws (``sample_generator``)."""

    def __init__(self, size: int, seed: int, batch_size: int, world_size: int, accumulation: int) -> None:
        self.size, self.seed = size, seed
        self.batch_size, self.world_size, self.accumulation = batch_size, world_size, accumulation
        self._epoch, self._order = -1, np.arange(0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._order

    def positions(self, step: int, micro: int, rank: int) -> range:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.batch_size
        return range(start, start + self.batch_size)

    def index(self, position: int) -> int:
        return int(self.order(position // self.size)[position % self.size])


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of every random draw of the sample at ``position``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % (2**63))


# ---------------------------------------------------------------------------------------------
# The frozen parts, computed once


class FrozenCache:
    """The VAE posterior (mean, std) of every training image and the text encoding of every distinct
    prompt (and of the empty prompt), kept in ``folder``. Valid for one dataset, resolution and set
    of frozen weights: a fingerprint of those names the files, so a change makes a new cache."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.path = folder / f"frozen-{fingerprint}.pt"
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.prompt_index: dict[str, int] = {}
        self.text: torch.Tensor | None = None

    def ready(self) -> bool:
        return self.path.exists()

    @torch.no_grad()
    def build(
        self,
        dataset,
        vae: nn.Module | None,
        text_encoder: nn.Module | None,
        batch_size: int,
        device: torch.device,
        report: Callable[[str], None],
    ) -> None:
        """Encode every sample (``vae``) and every distinct prompt (``text_encoder``); write atomically."""
        state: dict[str, object] = {}
        if vae is not None:
            means, stds = [], []
            started = time.perf_counter()
            for first in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
                images = torch.stack([item["image"] for item in items]).to(device)
                posterior = vae.encode(images)
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                if time.perf_counter() - started > 10:
                    report(f"caching latents: {first + len(items)}/{len(dataset)}")
                    started = time.perf_counter()
            state["mean"], state["std"] = torch.cat(means), torch.cat(stds)
        if text_encoder is not None:
            prompts = sorted({dataset.prompt(i) for i in range(len(dataset))} | {""})
            encoded = [
                encode_prompts(text_encoder, prompts[i : i + 64]).float().cpu() for i in range(0, len(prompts), 64)
            ]
            state["prompts"], state["text"] = prompts, torch.cat(encoded)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as handle:
            torch.save(state, handle)

    def load(self) -> None:
        state = torch.load(self.path, weights_only=True)
        self.mean, self.std = state.get("mean"), state.get("std")
        if "prompts" in state:
            self.prompt_index = {p: i for i, p in enumerate(state["prompts"])}
            self.text = state["text"]

    def latents(self, index: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean.shape[1:], generator=generator)
        return self.mean[index] + self.std[index] * noise

    def encoding(self, prompt: str) -> torch.Tensor:
        return self.text[self.prompt_index[prompt]]


def dataset_fingerprint(dataset, resolution: int, *weights: nn.Module | None) -> str:
    """A short hash of what the cache depends on: the samples, the resolution, the frozen weights."""
    digest = hashlib.sha256(f"{resolution}:{len(dataset)}".encode())
    digest.update(dataset.fingerprint().encode())
    for module in weights:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            values = tensor.detach()
            # The first 1024 values and the sum of magnitudes: no float32 copy of a whole model.
            digest.update(values.flatten()[:1024].float().cpu().numpy().tobytes())
            digest.update(str(float(values.abs().sum(dtype=torch.float64))).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# What trains: one objective per task


def diffusion_loss(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
) -> torch.Tensor:
    """The latent diffusion loss (Ho et al. 2020, eq. 14, in latent space as Rombach et al. 2022):
    noise the latents to ``timesteps`` and regress the noise (or v, Salimans & Ho 2022)."""
    alpha = alphas_cumprod[timesteps].to(latents.dtype)[:, None, None, None]
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    target = noise if prediction == "eps" else alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    output = denoise(noisy, timesteps)
    return F.mse_loss(output.float(), target.float())


class Objective(nn.Module):
    """What a task trains: ``trainable`` modules, their ``loss`` on a batch, and what to export."""

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        raise NotImplementedError

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        """Write the trained model(s) to ``out``; ``trainable``: every trainable tensor, whole
        (gathered from the processes' shards under FSDP), by parameter name."""
        raise NotImplementedError


class ControlNetObjective(Objective):
    """The frozen base with its trainable ControlNet (see the module docstring)."""

    def __init__(self, model: StableDiffusion, controlnet: ControlNet, config: TrainConfig) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.controlnet = controlnet.requires_grad_(True).train()
        self.only_mid_control = config.only_mid_control
        self.unlock_decoder = config.unlock_decoder
        if config.unlock_decoder:  # sd_locked=False: the decoder half of the UNet learns too
            for part in (model.unet.output_blocks, model.unet.out):
                part.requires_grad_(True).train()
        self.register_buffer("alphas_cumprod", model.config.schedule.alphas_cumprod().float(), persistent=False)
        self.prediction = model.config.schedule.prediction

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        groups = [{"params": list(self.controlnet.parameters()), "lr": config.learning_rate}]
        if config.unlock_decoder:
            decoder = [*self.model.unet.output_blocks.parameters(), *self.model.unet.out.parameters()]
            lr = config.decoder_learning_rate or config.learning_rate / 10
            groups.append({"params": decoder, "lr": lr})
        return groups

    def loss(self, batch: dict) -> torch.Tensor:
        context, hint = batch["context"], batch["hint"]

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            residuals = self.controlnet(noisy, self.controlnet.encode_hint(hint), t, context)
            return self.model.unet(noisy, t, context, control=residuals, only_mid_control=self.only_mid_control)

        return diffusion_loss(
            denoise, batch["latents"], batch["noise"], batch["timesteps"], self.alphas_cumprod, self.prediction
        )

    def forward(self, batch: dict) -> torch.Tensor:  # DistributedDataParallel calls forward
        return self.loss(batch)

    def plain_controlnet(self, trainable: dict[str, torch.Tensor]) -> ControlNet:
        """A stand-alone float32 ControlNet holding the trained weights (not sharded, not wrapped)."""
        controlnet = ControlNet(self.controlnet.config)
        prefix = "controlnet."
        controlnet.load_state_dict({k.removeprefix(prefix): v for k, v in trainable.items() if k.startswith(prefix)})
        return controlnet.float().eval()

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        """The ControlNet as a 1.1-style control-only file and as a diffusers ControlNet folder."""
        controlnet = self.plain_controlnet(trainable)
        paths = [save_ldm(out / "controlnet.safetensors", controlnet=controlnet)]
        paths.append(save_diffusers(out / "controlnet-diffusers", controlnet=controlnet))
        if self.unlock_decoder:  # the decoder changed: the base model goes with it
            model = StableDiffusion(self.model.config, empty=True)
            unet = {k: v for k, v in self.model.unet.state_dict().items() if not _is_sharded(v)}
            unet.update({k.removeprefix("model.unet."): v for k, v in trainable.items() if k.startswith("model.unet.")})
            model.unet.load_state_dict(unet, assign=True)
            model.vae, model.text_encoder = self.model.vae, self.model.text_encoder
            paths.append(save_ldm(out / "base-unlocked.safetensors", model=model))
        return paths


class BaseObjective(Objective):
    """A UNet and its text encoder from scratch on a frozen VAE's latents."""

    def __init__(self, model: StableDiffusion, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        model.vae.requires_grad_(False).eval()
        model.unet.requires_grad_(True).train()
        model.text_encoder.requires_grad_(True).train()
        self.register_buffer("alphas_cumprod", model.config.schedule.alphas_cumprod().float(), persistent=False)
        self.prediction = model.config.schedule.prediction

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        params = [*self.model.unet.parameters(), *self.model.text_encoder.parameters()]
        return [{"params": params, "lr": config.learning_rate}]

    def loss(self, batch: dict) -> torch.Tensor:
        context = self.model.text_encoder(batch["tokens"])

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.unet(noisy, t, context)

        return diffusion_loss(
            denoise, batch["latents"], batch["noise"], batch["timesteps"], self.alphas_cumprod, self.prediction
        )

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(batch)

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        model = copy.deepcopy(self.model).float().eval()  # never sharded: the whole model is here
        return [save_ldm(out / "base.safetensors", model=model)]


def image_gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the finite differences (along width and height) of two image batches."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


class VAEObjective(Objective):
    """The autoencoder: reconstruction (L1 + L2) through a posterior sample, plus
    ``gradient_loss_weight`` x L1 between the horizontal and vertical differences of the images,
    plus ``kl_weight`` x KL.

    SD's VAE gets sharp edges from a perceptual and an adversarial loss (Rombach et al. 2022); a
    pixel loss alone blurs them, and blurred edges cost a Canny ControlNet its edge F1. The gradient
    term is a cheap stand-in that penalises exactly that.
    """

    def __init__(self, model: StableDiffusion, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.vae = model.vae.requires_grad_(True).train()
        self.kl_weight = config.kl_weight
        self.gradient_loss_weight = config.gradient_loss_weight

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        return [{"params": list(self.vae.parameters()), "lr": config.learning_rate}]

    def loss(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        posterior = self.vae.encode(images)
        latents = posterior.mean + posterior.std * batch["posterior_noise"].to(posterior.mean.dtype)
        reconstruction = self.vae.decode(latents).float()
        rec = (reconstruction - images).abs().mean() + F.mse_loss(reconstruction, images)
        if self.gradient_loss_weight:
            rec = rec + self.gradient_loss_weight * image_gradient_l1(reconstruction, images)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        return rec + self.kl_weight * kl

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(batch)

    @torch.no_grad()
    def calibrate(self, images: Sequence[torch.Tensor]) -> float:
        """Set the VAE's ``scale_factor`` to 1 / (standard deviation of its latents over ``images``),
        so that the diffusion model sees unit-variance latents (SD's 0.18215 was found the same
        way for its VAE, Rombach et al. 2022, appendix G). Returns the factor."""
        self.vae.eval()
        latents = torch.cat([self.vae.encode(batch).mean.float() for batch in images])
        std = latents.std().item()
        if not (math.isfinite(std) and std > 0):  # NaN latents, or a VAE that maps every image to one point
            raise TrainingError(f"the trained VAE's latents have standard deviation {std}: no scale factor can be set")
        factor = float(f"{1.0 / std:.5g}")
        vae_config = dataclasses.replace(self.model.config.vae, scale_factor=factor)
        self.model.config = self.model.config.replace(vae=vae_config)
        self.vae.config = vae_config
        self.vae.train()
        return factor

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        model = copy.deepcopy(self.model).float().eval()
        return [save_ldm(out / "vae.safetensors", model=model)]


# ---------------------------------------------------------------------------------------------
# Optimisation helpers


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``lr_warmup_steps``, then constant, linear to zero or cosine to zero."""
    if step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.lr_warmup_steps) / max(1, config.max_steps - config.lr_warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if config.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """An exponential moving average of the trainable parameters (kept in float32)."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.parameters = list(parameters)
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters, strict=True):
            shadow.lerp_(parameter.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the live ones inside the block (validation, export)."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for shadow, parameter in zip(self.shadow, self.parameters, strict=True):
                parameter.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for value, parameter in zip(saved, self.parameters, strict=True):
                    parameter.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [t.clone() for t in state["shadow"]]


def shard_controlnet_objective(objective: ControlNetObjective) -> None:
    """FSDP (PyTorch's ``fully_shard``): each large block of the ControlNet is its own shard group,
    gathered for its forward and backward only; the objective is
    the root (so the hint encoder, called before the ControlNet's forward, is gathered too). The
    frozen base is not sharded: every process keeps it whole, as with DDP."""
    from torch.distributed.fsdp import fully_shard

    controlnet = objective.controlnet
    for block in (*controlnet.input_blocks, controlnet.middle_block, controlnet.input_hint_block):
        fully_shard(block)
    fully_shard(controlnet)
    frozen = {p for p in objective.parameters() if not p.requires_grad}
    fully_shard(objective, ignored_params=frozen)


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU, gathered from the processes' shards if it is sharded (a collective: every
    process must call it, in the same order). A copy, never a view: the EMA swaps its weights in
    and out of the same storage."""
    if _is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def _like(whole: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``parameter`` is (this process's shard of it, under FSDP)."""
    whole = whole.to(parameter.device, parameter.dtype)
    if _is_sharded(parameter):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole, parameter.device_mesh, parameter.placements)
    return whole


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    for layer in module.modules():
        if isinstance(layer, TimestepEmbedSequential):
            layer.gradient_checkpointing = enabled


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    """The checkpoint folders ``out/checkpoints/step-N``, oldest first (intact or not: see
    ``read_checkpoint``; a damaged one set aside by a resumed run is named ``damaged-step-N``)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _checkpoint_step(p) is not None]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(folder: Path) -> int | None:
    """N for a folder named ``step-N`` (digits only), else None."""
    digits = folder.name.removeprefix(CHECKPOINT_PREFIX)
    if folder.name.startswith(CHECKPOINT_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _rng_state() -> dict:
    """torch's global generators (the samples' draws have their own, see ``sample_generator``;
    these serve anything else, e.g. dropout)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, state: dict, keep: int) -> Path:
    """``out/checkpoints/step-N``: ``state.pt`` and, written last, a manifest of its size and
    SHA-256 (``checkpoint.json``), all under a temporary name renamed into place; then all but the
    last ``keep`` checkpoints are removed.

    The rename makes a checkpoint appear whole or not at all; the manifest lets a later run tell a
    checkpoint damaged since (a truncated copy, a disk error) from an intact one. Weights that are
    not finite are never written (TrainingError): a NaN checkpoint would become the one a resumed
    run starts from. A failure to write (disk full) removes the partial checkpoint and raises
    TrainingError; the checkpoints written before are kept."""
    if not _all_finite(state["trainable"].values()):
        raise TrainingError(f"step {step}: the weights hold NaN or infinite values; no checkpoint written")
    folder = out / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    temporary = folder / f".{final.name}.tmp-{os.getpid()}"
    replaced = folder / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        with open(temporary / STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        manifest = {
            "step": step,
            "files": {
                STATE_FILE: {
                    "bytes": (temporary / STATE_FILE).stat().st_size,
                    "sha256": file_sha256(temporary / STATE_FILE),
                }
            },
        }
        with atomic_file(temporary / MANIFEST_FILE, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # the same step saved again (a resumed run): replace it
            os.replace(final, replaced)
        os.replace(temporary, final)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if replaced.exists() and not final.exists():
            os.replace(replaced, final)  # put the one it was to replace back
        raise TrainingError(
            f"cannot write the checkpoint {final} ({error.strerror or error}); the checkpoints written before are kept"
        ) from None
    shutil.rmtree(replaced, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-keep]:
        if old != final:  # never the one just written (the newest, unless newer ones are left over)
            shutil.rmtree(old, ignore_errors=True)
    recover_checkpoints(out)
    return final


def recover_checkpoints(out: Path) -> None:
    """Tidy what a run killed while saving left behind: a half-written ``.step-N.tmp-PID`` goes; a
    ``.step-N.old-PID`` (the checkpoint a resave of step N was replacing) is put back when step N
    is missing (killed between the two renames), and removed otherwise."""
    folder = out / "checkpoints"
    for stale in folder.glob(f".{CHECKPOINT_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for replaced in folder.glob(f".{CHECKPOINT_PREFIX}*.old-*"):
        final = folder / replaced.name[1:].rsplit(".old-", 1)[0]
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(replaced, final)


class DamagedCheckpoint(TrainingError):
    """A checkpoint folder that cannot be resumed from; the message says which and why."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"{folder}: {reason}")
        self.folder, self.reason = folder, reason


def read_checkpoint(folder: Path) -> dict:
    """The state saved in ``folder``, checked: its files are there, ``state.pt`` has the size and
    SHA-256 the manifest recorded (checkpoints written before manifests existed are only loaded),
    it loads, holds what a resumed run needs, for the step its name says, with finite weights.
    DamagedCheckpoint (one line: the folder and the reason) otherwise."""
    state_file, manifest_file = folder / STATE_FILE, folder / MANIFEST_FILE
    if not folder.is_dir():
        raise DamagedCheckpoint(folder, "no such checkpoint folder")
    if not state_file.is_file():
        raise DamagedCheckpoint(folder, f"{STATE_FILE} is missing")
    if manifest_file.exists():
        try:
            recorded = json.loads(manifest_file.read_text(encoding="utf-8"))["files"][STATE_FILE]
            size, sha256 = int(recorded["bytes"]), str(recorded["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DamagedCheckpoint(folder, f"its manifest {MANIFEST_FILE} is unreadable") from None
        actual = state_file.stat().st_size
        if actual != size:
            raise DamagedCheckpoint(
                folder, f"{STATE_FILE} is {actual:,} bytes but {size:,} were written (truncated or overwritten)"
            )
        if file_sha256(state_file) != sha256:
            raise DamagedCheckpoint(folder, f"{STATE_FILE} differs from what was written (SHA-256 mismatch)")
    try:
        state = torch.load(state_file, weights_only=True)
    except pickle.UnpicklingError:  # refused by weights_only: not what save_checkpoint writes
        raise DamagedCheckpoint(folder, f"{STATE_FILE} holds more than tensors and plain data") from None
    except TORCH_LOAD_ERRORS as error:
        raise DamagedCheckpoint(folder, f"{STATE_FILE} cannot be read ({torch_load_reason(error)})") from None
    needed = ("step", "trainable", "optimizer", "rng")
    if (
        not isinstance(state, dict)
        or any(key not in state for key in needed)
        or not isinstance(state["trainable"], dict)
    ):
        raise DamagedCheckpoint(folder, f"{STATE_FILE} is not a training checkpoint (it needs {', '.join(needed)})")
    step = _checkpoint_step(folder)
    if step is not None and state["step"] != step:
        raise DamagedCheckpoint(folder, f"{STATE_FILE} is the state of step {state['step']}, not of step {step}")
    if not _all_finite(state["trainable"].values()):
        raise DamagedCheckpoint(folder, "its weights hold NaN or infinite values")
    return state


def find_resume_point(
    out: Path, resume: str | None, log: Callable[[str], None]
) -> tuple[Path, dict, list[Path]] | None:
    """The checkpoint to resume from, its state and the damaged checkpoints passed over; None when
    there is nothing to resume (no ``resume``, or ``latest`` with no checkpoint yet).

    ``latest``: the newest intact checkpoint; each damaged newer one is reported through ``log``
    (which folder, why). None intact: TrainingError listing why. A folder named explicitly must
    be intact itself (TrainingError): the user asked for that one."""
    if resume is None:
        return None
    recover_checkpoints(out)
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise TrainingError(f"--resume {resume}: no such checkpoint folder; use 'latest' or a step-N folder")
        try:
            return path, read_checkpoint(path), []
        except DamagedCheckpoint as error:
            raise TrainingError(f"--resume {resume}: cannot resume from it: {error.reason}") from None
    candidates = checkpoint_dirs(out)
    damaged: list[Path] = []
    reasons: list[str] = []
    for folder in reversed(candidates):
        try:
            state = read_checkpoint(folder)
        except DamagedCheckpoint as error:
            log(f"warning: damaged checkpoint, passed over: {error}")
            damaged.append(folder)
            reasons.append(str(error))
            continue
        return folder, state, damaged
    if candidates:
        raise TrainingError(
            f"--resume latest: no intact checkpoint in {out / 'checkpoints'}: {'; '.join(reasons)}; "
            "move them away to start from scratch"
        )
    return None  # nothing yet: start from scratch


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint ``step-N`` to ``damaged-step-N`` (kept for inspection, no longer
    counted as a checkpoint: neither resumed from nor counted by ``keep_checkpoints``)."""
    target = folder.with_name(f"damaged-{folder.name}")
    n = 1
    while target.exists():
        target = folder.with_name(f"damaged-{folder.name}-{n}")
        n += 1
    os.replace(folder, target)
    return target


def _gradient_norm(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all the gradients together (as clipping measures it): NaN or infinite
    when a gradient is (or, in float32, when it exceeds about 1e19: a diverged run too)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite (this process's shards of sharded ones). The
    largest magnitude is NaN or infinite exactly when one value is, and never overflows."""
    local = [t.to_local() if _is_sharded(t) else t for t in tensors]
    local = [t.detach() for t in local if t.numel() and t.is_floating_point()]
    if not local:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(local, norm_type=math.inf)))


# ---------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run: build everything from the config, then ``run()``."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print) -> None:
        config.check()
        self.config = config
        self.out = Path(config.out)
        try:  # before anything slow: a typo in --out costs no waiting
            writable_folder(self.out, "--out")
        except NotWritable as error:
            raise TrainingError(str(error)) from None
        self.dist = init_distributed(config.device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda message: None)
        torch.manual_seed(config.seed)
        self.model, self.objective = self._build_models()
        self.resolution = config.resolution or self.model.config.native_resolution
        self.dataset = self._load_dataset()
        self.stream = DataStream(
            len(self.dataset), config.seed, config.batch_size, self.dist.world_size, config.gradient_accumulation
        )
        self.objective.to(self.device)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(self.objective, True)
        self.fsdp = self.dist.world_size > 1 and config.strategy == "fsdp"
        if self.fsdp:
            shard_controlnet_objective(self.objective)
        # fused: one kernel over all the tensors instead of a loop over ~340 of them (3x faster here)
        self.optimizer = torch.optim.AdamW(
            self.objective.parameter_groups(config), weight_decay=config.weight_decay, betas=(0.9, 0.999), fused=True
        )
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema = EMA(self.trainable, config.ema_decay) if config.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.engine: nn.Module = self.objective
        if self.dist.world_size > 1 and not self.fsdp:
            self.engine = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.cache = self._prepare_cache()  # in float32, before the frozen parts are cast
        self._cast_frozen()
        self.step = 0
        self.metrics_path = self.out / "metrics.csv"
        self._stop = False
        self._base_validation_images: list | None = None
        self.tensorboard = self._tensorboard()

    def _tensorboard(self):
        """A TensorBoard writer in ``<out>/tensorboard`` when the tensorboard package is installed
        (``pip install tensorboard``); the CSV logs and PNG curves are written either way."""
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard is not installed: logging to metrics.csv and PNG curves only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- building ------------------------------------------------------------------------------

    def _build_models(self) -> tuple[StableDiffusion, Objective]:
        config = self.config
        if config.task == "controlnet":
            model = load_base(config.base)
            if config.controlnet:
                controlnet = load_controlnet(config.controlnet, model.config)
            else:
                controlnet = ControlNet.from_unet(model.unet, model.config.controlnet())
                if config.control_init == "gaussian":
                    controlnet.gaussian_init_(torch.Generator().manual_seed(config.seed))
            return model, ControlNetObjective(model.float(), controlnet.float(), config)
        from .config import preset

        try:
            model_config: ModelConfig = preset(config.model_config)
        except (KeyError, ValueError) as error:
            raise TrainingError(f"--model-config: {error}") from None
        if config.task == "vae":
            model = StableDiffusion(model_config)
            return model, VAEObjective(model, config)
        trained = load_base(config.base)  # the VAE's file (a model saved by the vae task)
        scale = trained.config.vae.scale_factor  # calibrated by the vae task
        if dataclasses.replace(trained.config.vae, scale_factor=scale) != dataclasses.replace(
            model_config.vae, scale_factor=scale
        ):
            raise TrainingError(f"{config.base}: its VAE is not the one of --model-config {config.model_config}")
        model = StableDiffusion(model_config.replace(vae=trained.config.vae))
        model.vae.load_state_dict(trained.vae.state_dict())
        return model, BaseObjective(model, config)

    def _load_dataset(self):
        from .datasets.folders import DatasetError, load_dataset

        try:
            return load_dataset(self.config.data, self.resolution, max_bad_fraction=self.config.max_bad_fraction)
        except DatasetError as error:
            raise TrainingError(str(error)) from None

    def _cast_frozen(self) -> None:
        """Under mixed precision, the frozen parts of the controlnet task live in the autocast dtype
        (as diffusers' script keeps them): autocast would otherwise cast their float32 weights again
        at every use (frozen weights are not in its cache), and they take half the memory. An
        unlocked decoder keeps the UNet in float32 (its master weights)."""
        if self.config.task != "controlnet" or self.config.mixed_precision == "no":
            return
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        frozen = [self.model.vae, self.model.text_encoder]
        if not self.config.unlock_decoder:
            frozen.append(self.model.unet)
        for module in frozen:
            module.to(dtype)

    def _prepare_cache(self) -> FrozenCache | None:
        config = self.config
        if not config.cache or config.task == "vae":
            return None
        vae = self.model.vae
        text = self.model.text_encoder if config.task == "controlnet" else None
        fingerprint = dataset_fingerprint(self.dataset, self.resolution, vae, text)
        cache = FrozenCache(self.out / "cache", fingerprint)
        if self.dist.is_main and not cache.ready():
            self.log(f"caching the frozen parts' outputs for {len(self.dataset)} samples in {cache.path}")
            vae.eval()
            cache.build(self.dataset, vae, text, 16, self.device, self.log)
        self.dist.barrier()
        cache.load()
        return cache

    # -- batches -------------------------------------------------------------------------------

    def batch(self, positions: range) -> dict:
        """The samples at ``positions`` of the data stream, with their random draws."""
        config, model = self.config, self.model
        items, generators = [], []
        for position in positions:
            items.append(self.dataset[self.stream.index(position)])
            generators.append(sample_generator(config.seed, position))
        factor = model.vae.downsample_factor
        latent_shape = (model.config.unet.in_channels, self.resolution // factor, self.resolution // factor)
        batch: dict = {}
        if config.task == "vae":
            batch["image"] = torch.stack([item["image"] for item in items])
            batch["posterior_noise"] = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
            return self._to_device(batch)
        timesteps, noises, latents, prompts = [], [], [], []
        for item, generator in zip(items, generators, strict=True):
            timesteps.append(int(torch.randint(0, model.config.schedule.num_timesteps, (1,), generator=generator)))
            noises.append(torch.randn(latent_shape, generator=generator))
            drop = torch.rand((), generator=generator).item() < config.proportion_empty_prompts
            prompts.append("" if drop else item["prompt"])
            if self.cache is not None:
                latents.append(self.cache.latents(item["index"], generator))
        batch["timesteps"] = torch.tensor(timesteps)
        batch["noise"] = torch.stack(noises)
        batch["prompts"] = prompts
        if self.cache is None:
            with torch.no_grad():
                vae_dtype = next(model.vae.parameters()).dtype
                images = torch.stack([item["image"] for item in items]).to(self.device, vae_dtype)
                posterior = model.vae.encode(images)
                noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device)
                batch["latents"] = posterior.mean.float() + posterior.std.float() * noise
        else:
            batch["latents"] = torch.stack(latents)
        batch["latents"] = batch["latents"] * model.vae.scale_factor
        if config.task == "controlnet":
            batch["hint"] = torch.stack([item["hint"] for item in items])
            if self.cache is not None:
                batch["context"] = torch.stack([self.cache.encoding(p) for p in prompts])
            else:
                with torch.no_grad():
                    batch["context"] = encode_prompts(model.text_encoder, prompts).float()
        else:
            batch["tokens"] = model.text_encoder.tokenize(prompts)
        return self._to_device(batch)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _autocast(self):
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one optimizer step --------------------------------------------------------------------

    def train_step(self) -> float:
        """Accumulate the gradients of this step's micro-batches, clip, update; the mean loss."""
        config = self.config
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * lr_multiplier(self.step, config)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.gradient_accumulation):
            batch = self.batch(self.stream.positions(self.step, micro, self.dist.rank))
            last = micro == config.gradient_accumulation - 1
            sync = contextlib.nullcontext()
            if self.fsdp:  # reduce-scatter the gradients on the last micro-step only
                self.objective.set_requires_gradient_sync(last)
            elif not last and self.dist.world_size > 1:
                sync = self.engine.no_sync()
            with sync:
                with self._autocast():
                    loss = self.engine(batch) / config.gradient_accumulation
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.item()
        # The loss and the gradients are checked before the update, so that the weights stay those
        # of the last good step. Every process reaches the same verdict (the loss is averaged over
        # them, the gradient norm is global, and ``any`` combines them): all stop at the same step.
        mean = self.dist.mean(total)
        if not math.isfinite(mean):
            raise self._diverged(f"the loss is {mean}")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # The norm clipping computes anyway, so the check costs no extra pass over the gradients.
        if config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        else:
            norm = _gradient_norm(self.trainable)
        if _is_sharded(norm):
            norm = norm.full_tensor()
        norm = float(norm)
        # fp16's scaler skips a step whose gradients overflowed (and lowers its scale): expected there.
        if self.scaler is None and self.dist.any(not math.isfinite(norm)):
            raise self._diverged(f"the gradient norm is {norm} (the loss was {mean:.4g})")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # The weights are not checked here: a pass over them costs about 0.5 s a step at SD 1.5's
        # size. AdamW's step from finite gradients with a learning rate <= 1 is finite; should a
        # weight still become NaN, the next step's loss shows it, and every checkpoint and export
        # checks the weights before writing them.
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return mean

    def _diverged(self, what: str) -> TrainingError:
        """The one-line error that stops a run whose numbers stopped being finite: the step, what
        went wrong, the likely causes, and what is left to resume from."""
        config = self.config
        causes = [f"the learning rate (--learning-rate {config.learning_rate:g}) is too high"]
        if config.mixed_precision != "no":
            causes.append(f"--mixed-precision {config.mixed_precision} overflowed (try --mixed-precision no)")
        saved = checkpoint_dirs(self.out)
        kept = f"the newest checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        return TrainingError(
            f"step {self.step + 1}: {what}: training diverged; likely {' or '.join(causes)}. "
            f"Stopped without saving anything of this step; {kept}"
        )

    # -- state ---------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole, on the CPU (a collective under FSDP: all processes call it)."""
        return {name: _whole(p) for name, p in self.objective.named_parameters() if p.requires_grad}

    def state(self) -> dict:
        """Everything a resumed run needs (a collective under FSDP; whole on the first process)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optimizer = get_optimizer_state_dict(self.objective, self.optimizer, options=options)
        else:
            optimizer = self.optimizer.state_dict()
        ema = None
        if self.ema is not None:
            ema = {"decay": self.ema.decay, "shadow": [_whole(t) for t in self.ema.shadow]}
        return {
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "trainable": self.trainable_state(),
            "optimizer": optimizer,
            "ema": ema,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": _rng_state(),
        }

    def load_state(self, folder: Path, state: dict | None = None) -> None:
        """Continue from the checkpoint in ``folder`` (``state``: its contents, when already read
        by ``read_checkpoint``)."""
        if state is None:
            state = read_checkpoint(folder)
        parameters = {name: p for name, p in self.objective.named_parameters() if p.requires_grad}
        missing = set(parameters) - set(state["trainable"])
        if missing:
            raise TrainingError(
                f"{folder}: the checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
            )
        for name, parameter in parameters.items():  # a checkpoint of another model (another --base)
            saved = tuple(state["trainable"][name].shape)
            if saved != tuple(parameter.shape):  # a sharded parameter's shape is the whole one
                raise TrainingError(
                    f"{folder}: the checkpoint's {name} is {list(saved)}, this run's {list(parameter.shape)}: "
                    "it was trained for another model"
                )
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(_like(state["trainable"][name], parameter))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.objective, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.shadow = [
                _like(t, p).float() for t, p in zip(state["ema"]["shadow"], self.ema.parameters, strict=True)
            ]
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> Path | None:
        state = self.state()  # every process takes part in gathering it
        path, error = None, None
        if self.dist.is_main:
            try:
                path = save_checkpoint(self.out, self.step, state, self.config.keep_checkpoints)
                self.log(f"checkpoint: {path}")
            except TrainingError as failure:  # disk full: the others must not wait for it forever
                error = failure
        if self.dist.any(error is not None):  # also the barrier: the checkpoint is complete for all
            raise error or TrainingError(f"step {self.step}: the main process could not write the checkpoint")
        return path

    # -- logging -------------------------------------------------------------------------------

    def _record(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        new = not self.metrics_path.exists()
        with open(self.metrics_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _request_stop(self, signum, frame) -> None:
        if self._stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True
        self.log("stopping: the checkpoint is written after this step (press Ctrl-C again to abort)")

    # -- validation ----------------------------------------------------------------------------

    def validation_samples(self) -> list[dict]:
        """The first ``validation_count`` samples of the data: fixed prompts and control images."""
        count = min(self.config.validation_count, len(self.dataset))
        return [self.dataset[i] for i in range(count)]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Generate from the validation samples with fixed seeds; write a grid, log the scores and
        redraw the curves. Runs on the main process only (the others wait)."""
        scores: dict[str, float] = {}
        error: TrainingError | None = None
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            trainable = self.trainable_state()  # every process takes part in gathering it
        if self.dist.is_main:
            try:
                scores = self._validate_on_main(trainable)
            except (NonFiniteError, OSError) as failure:  # NaN images, or a disk full
                reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else failure
                error = TrainingError(f"validation at step {self.step}: {reason}")
        self.objective.train()
        self.model.vae.eval()
        self._cast_frozen()  # the validation pipeline ran the base in float32
        if self.dist.any(error is not None):  # also the barrier: the others wait for the main process
            raise error or TrainingError(f"validation at step {self.step} failed on the main process")
        return scores

    def _validate_on_main(self, trainable: dict[str, torch.Tensor]) -> dict[str, float]:
        scores, grid = self._validation_images(trainable)
        folder = self.out / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / f"step-{self.step:08d}.png") as handle:
            grid.save(handle, format="PNG")
        if self.tensorboard is not None:
            for name, value in scores.items():
                self.tensorboard.add_scalar(f"validation/{name}", value, self.step)
            self.tensorboard.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
        self._record_validation({"step": self.step, **{k: f"{v:.4f}" for k, v in scores.items()}})
        self.draw_curves()
        self.log(f"validation at step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores

    def _validation_images(self, trainable: dict[str, torch.Tensor]):
        from .evaluation import edge_f1
        from .imaging.charts import image_grid
        from .pipeline import ControlUnit, Pipeline

        samples = self.validation_samples()
        hints = [(item["hint"].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for item in samples]
        targets = [((item["image"].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy() for item in samples]
        task = self.config.task
        if task == "vae":
            images = torch.stack([item["image"] for item in samples]).to(self.device)
            decoded = self.model.vae(images).float()
            rebuilt = [((x.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().cpu().numpy() for x in decoded]
            error = float(
                np.mean([np.abs(a.astype(float) - b).mean() / 255 for a, b in zip(rebuilt, targets, strict=True)])
            )
            return {"reconstruction_l1": error}, image_grid([targets, rebuilt], ["data", "VAE"])
        controlnets = [self.objective.plain_controlnet(trainable)] if task == "controlnet" else []
        pipe = Pipeline(self.model, controlnets, device=self.device, dtype=torch.float32, channels_last=False)
        rows, labels, f1s, f1s_empty = [hints, targets], list(VALIDATION_ROWS[:2]), [], []
        prompts = [item["prompt"] for item in samples]
        for label, use_prompt in ((VALIDATION_ROWS[2], True), (VALIDATION_ROWS[3], False)):
            row = []
            for i, (hint, prompt) in enumerate(zip(hints, prompts, strict=True)):
                units = [ControlUnit(hint)] if controlnets else []
                text = prompt if use_prompt else ""
                result = pipe.generate(
                    text,
                    units,
                    seed=i,
                    steps=self.config.validation_steps,
                    guidance_scale=7.5 if use_prompt else 1.0,
                    resolution=self.resolution,
                )
                row.append(result.images[0])
                if controlnets:
                    (f1s if use_prompt else f1s_empty).append(edge_f1(result.images[0], hint).f1)
            rows.append(row)
            labels.append(label)
            if not controlnets:
                break  # a base model without a prompt says little
        scores = {"edge_f1": float(np.mean(f1s)), "edge_f1_no_prompt": float(np.mean(f1s_empty))} if f1s else {}
        if controlnets:  # how far the control moves the locked model's images (0 at step 0 with zero convs)
            base_images = self._base_images(pipe, prompts)
            scores["base_distance"] = float(
                np.mean([_pixel_l1(a, b) for a, b in zip(rows[2], base_images, strict=True)])
            )
        if not controlnets:  # how far the base's images are from their data image (colours mostly)
            scores["pixel_l1"] = float(np.mean([_pixel_l1(a, b) for a, b in zip(rows[2], targets, strict=True)]))
        return scores, image_grid(rows, labels)

    def _base_images(self, pipe, prompts: list[str]) -> list:
        """The frozen base's images for the validation prompts and seeds, without control (made once)."""
        if self._base_validation_images is None:
            self._base_validation_images = [
                pipe.generate(
                    prompt,
                    [],
                    seed=i,
                    steps=self.config.validation_steps,
                    guidance_scale=7.5,  # as the validation's "prompt" row
                    resolution=self.resolution,
                ).images[0]
                for i, prompt in enumerate(prompts)
            ]
        return self._base_validation_images

    def _record_validation(self, row: dict) -> None:
        path = self.out / "validation.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def draw_curves(self) -> None:
        """loss.png (training loss) and validation.png (the validation scores) from the CSV logs."""
        from .imaging.charts import line_chart

        losses = _read_csv(self.metrics_path)
        if losses:
            points = [(float(r["step"]), float(r["loss"])) for r in losses]
            line_chart(self.out / "loss.png", {"training loss": points}, "training loss", "step", "loss", log_y=True)
        scores = _read_csv(self.out / "validation.csv")
        if scores:
            names = [k for k in scores[0] if k != "step"]
            series = {name: [(float(r["step"]), float(r[name])) for r in scores if r.get(name)] for name in names}
            line_chart(self.out / "validation.png", series, "validation", "step", "score")

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> list[Path]:
        """Train to ``max_steps`` (resuming if asked), checkpointing and validating on the way; export."""
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        found = find_resume_point(self.out, config.resume, self.log)
        if found is not None:
            resume, state, damaged = found
            self.load_state(resume, state)
            del state
            self.log(f"resumed from {resume} at step {self.step}")
            self.dist.barrier()  # every process has read its checkpoint before any folder moves
            if self.dist.is_main:
                for folder in damaged:  # kept for inspection, no longer taken for a checkpoint
                    self.log(f"the damaged checkpoint {folder.name} is kept as {set_aside(folder)}")
            if self.dist.is_main:  # the steps after the checkpoint are trained again: log them once
                for path in (self.metrics_path, self.out / "validation.csv"):
                    _truncate_csv(path, self.step)
        elif self.dist.is_main:
            with atomic_file(self.out / "config.json", "w", encoding="utf-8") as handle:
                handle.write(config.to_json() + "\n")
            self.metrics_path.unlink(missing_ok=True)
        previous = signal.signal(signal.SIGINT, self._request_stop) if self._main_thread() else None
        try:
            self._loop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self._stop:
            self.save()
            self.log(f"stopped at step {self.step}; continue with --resume latest")
            return []
        if self.step % config.checkpoint_every:
            self.save()
        if not config.validate_every or self.step % config.validate_every:
            self.validate()
        paths = []
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            trainable = self.trainable_state()
            if self.dist.is_main and isinstance(self.objective, VAEObjective):
                count = min(len(self.dataset), 256)
                images = [
                    torch.stack([self.dataset[i]["image"] for i in range(j, min(j + 16, count))]).to(self.device)
                    for j in range(0, count, 16)
                ]
                factor = self.objective.calibrate(images)
                self.log(f"VAE latent scale factor: {factor} (1 / std of the latents of {count} images)")
        if not _all_finite(trainable.values()):  # whole on every process: they all stop here
            raise TrainingError(f"step {self.step}: the weights to export are not all finite; nothing exported")
        if self.dist.is_main:
            paths = self.objective.export(self.out, trainable)
            for path in paths:
                self.log(f"exported: {path}")
        self.dist.barrier()
        return paths

    @staticmethod
    def _main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()

    def _loop(self) -> None:
        config = self.config
        started, first_step = time.perf_counter(), self.step
        window: list[float] = []
        if config.validate_every and self.step == 0:  # the starting point of the validation curves
            self.validate()
        while self.step < config.max_steps:
            # A Ctrl-C reaches the processes at different moments: they agree before each step.
            self._stop = self.dist.any(self._stop)
            if self._stop:
                break
            loss = self.train_step()
            window.append(loss)
            done = self.step - first_step
            elapsed = time.perf_counter() - started
            rate = done / elapsed if elapsed > 0 else 0.0
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                mean = sum(window) / len(window)
                window.clear()
                lr = self.optimizer.param_groups[0]["lr"]
                samples = rate * self.stream.global_batch
                self._record(
                    {"step": self.step, "loss": f"{mean:.6f}", "lr": f"{lr:.3e}", "samples_per_s": f"{samples:.2f}"}
                )
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar("train/loss", mean, self.step)
                    self.tensorboard.add_scalar("train/lr", lr, self.step)
                if config.progress:
                    eta = (config.max_steps - self.step) / rate if rate > 0 else float("nan")
                    self.log(
                        f"step {self.step}/{config.max_steps}  loss {mean:.4f}  lr {lr:.2e}  "
                        f"{rate:.2f} steps/s ({samples:.1f} samples/s)  ETA {_duration(eta)}"
                    )
            if config.validate_every and self.step % config.validate_every == 0:
                self.validate()
            if self.step % config.checkpoint_every == 0:
                self.save()


def _pixel_l1(a, b) -> float:
    """Mean absolute difference of two images, as a fraction of the 0-255 range."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean() / 255)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _truncate_csv(path: Path, last_step: int) -> None:
    rows = _read_csv(path)
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if _row_step(r) is not None and _row_step(r) <= last_step)


def _row_step(row: dict) -> int | None:
    """A log row's step, or None for a row a killed run left half-written."""
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: TrainConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Run a training from a config (the function behind ``controlnet train``)."""
    trainer = Trainer(config, log)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()


def add_control(base: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A new ControlNet for ``base`` (the original ``tool_add_control``): the encoder copied from the
    base UNet, the hint encoder freshly initialised, the zero convolutions at zero; written as a
    1.1-style control-only ``.safetensors``."""
    model = load_base(base)
    controlnet = ControlNet.from_unet(model.unet, model.config.controlnet())
    return save_ldm(out, controlnet=controlnet)

"""The run: ``Trainer`` (build everything from a config, then train, checkpoint, validate and
export), ``train`` (the function behind ``controlnet train``) and ``add_control``.

The loop is the same for every task: what differs between them is the objective's
(``objectives``). Every process runs this code; the first one alone writes the logs, checkpoints
and exports, and the others wait for it where they must (``Distributed.on_main``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..files import NotWritable, writable_folder
from ..formats.ldm import save_ldm
from ..loading import load_base
from ..models.controlnet import ControlNet
from .checkpoints import (
    checkpoint_dirs,
    find_resume_point,
    read_checkpoint,
    restore_trainable,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from .config import TrainConfig, TrainingError
from .data import DataStream, load_training_data, prepare_cache, sample_generator
from .distributed import gradient_sync, init_distributed, load_optimizer_state, optimizer_state, whole
from .logs import Meter, RunLog
from .objectives import build_objective
from .optim import (
    AUTOCAST_DTYPES,
    EMA,
    adamw,
    all_finite,
    autocast,
    averaged,
    clip_gradients,
    divergence,
    lr_multiplier,
    set_gradient_checkpointing,
    start_step,
    update_weights,
)
from .validation import ValidationSet, run_validation


class Trainer:
    """One training run: build everything from the config, then ``run()``."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print) -> None:
        config.check()
        self.config, self.out = config, Path(config.out)
        try:  # before anything slow: a typo in --out costs no waiting
            writable_folder(self.out, "--out")
        except NotWritable as error:
            raise TrainingError(str(error)) from None
        self.dist = init_distributed(config.device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else _silent
        torch.manual_seed(config.seed)
        self.objective = build_objective(config)
        self.model = self.objective.model
        self.resolution = config.resolution or self.model.config.native_resolution
        self.dataset = load_training_data(config.data, self.resolution, config.max_bad_fraction)
        self.stream = DataStream(
            len(self.dataset), config.seed, config.batch_size, self.dist.world_size, config.gradient_accumulation
        )
        self._set_up_optimisation()
        encoders = self.objective.cached_encoders() if config.cache else None  # in float32, before the cast
        self.cache = prepare_cache(self.dataset, self.resolution, encoders, self.out / "cache", self.dist, self.log)
        self.objective.cast_frozen(self.autocast_dtype)
        self.step, self._stop = 0, False
        self._validation: ValidationSet | None = None
        self.logs = RunLog(self.out, self.dist.is_main, self.log, config.progress)

    def _set_up_optimisation(self) -> None:
        """The objective on its device, sharded (FSDP) or replicated (DDP) over the processes; the
        optimiser, the EMA and fp16's gradient scaler."""
        config = self.config
        self.objective.to(self.device)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(self.objective, True)
        self.fsdp = self.dist.world_size > 1 and config.strategy == "fsdp"
        if self.fsdp:
            self.objective.shard()
        self.optimizer = adamw(self.objective.parameter_groups(config), config)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema = EMA(self.trainable, config.ema_decay) if config.ema_decay else None
        self.autocast_dtype = AUTOCAST_DTYPES.get(config.mixed_precision)
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.engine: nn.Module = self.objective  # what the steps call
        if self.dist.world_size > 1 and not self.fsdp:
            self.engine = self.dist.replicate(self.objective)

    def batch(self, positions: range) -> dict:
        """The samples at ``positions`` of the data stream, with their random draws, on the device."""
        items = [self.dataset[self.stream.index(position)] for position in positions]
        generators = [sample_generator(self.config.seed, position) for position in positions]
        batch = self.objective.batch(items, generators, self.cache)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # -- one optimizer step --------------------------------------------------------------------

    def train_step(self) -> float:
        """Accumulate the gradients of this step's micro-batches, clip, update; the mean loss.

        The loss and the gradients are checked before the update, so that the weights stay those
        of the last good step. Every process reaches the same verdict (the loss is averaged over
        them, the gradient norm is global, and ``any`` combines them): all stop at the same step."""
        start_step(self.optimizer, self.base_lrs, lr_multiplier(self.step, self.config))
        total = 0.0
        for micro in range(self.config.gradient_accumulation):
            total += self._micro_step(micro)
        mean = self.dist.mean(total)
        if not math.isfinite(mean):
            raise self._diverged(f"the loss is {mean}")
        norm = clip_gradients(self.trainable, self.config.max_grad_norm, self.optimizer, self.scaler)
        # fp16's scaler skips a step whose gradients overflowed (and lowers its scale): expected there.
        if self.scaler is None and self.dist.any(not math.isfinite(norm)):
            raise self._diverged(f"the gradient norm is {norm} (the loss was {mean:.4g})")
        update_weights(self.optimizer, self.scaler, self.ema)
        self.step += 1
        return mean

    def _micro_step(self, micro: int) -> float:
        """The forward and backward passes of one micro-batch; its loss (a share of the step's)."""
        accumulation = self.config.gradient_accumulation
        batch = self.batch(self.stream.positions(self.step, micro, self.dist.rank))
        with gradient_sync(self.engine, fsdp=self.fsdp, last=micro == accumulation - 1):
            with autocast(self.device, self.autocast_dtype):
                loss = self.engine(batch) / accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.item()

    def _diverged(self, what: str) -> TrainingError:  # at the step being trained
        return divergence(self.config, self.step + 1, what, checkpoint_dirs(self.out))

    # -- state ---------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole, on the CPU (a collective under FSDP: all processes call it)."""
        return {name: whole(p) for name, p in self.objective.named_parameters() if p.requires_grad}

    def state(self) -> dict:
        """Everything a resumed run needs (a collective under FSDP; whole on the first process)."""
        optimizer = optimizer_state(self.objective, self.optimizer, fsdp=self.fsdp)
        ema = self.ema.state_dict() if self.ema is not None else None
        return {
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "trainable": self.trainable_state(),
            "optimizer": optimizer,
            "ema": ema,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(),
        }

    def load_state(self, folder: Path, state: dict | None = None) -> None:
        """Continue from the checkpoint in ``folder`` (``state``: its contents, when already read
        by ``read_checkpoint``)."""
        if state is None:
            state = read_checkpoint(folder)
        parameters = {name: p for name, p in self.objective.named_parameters() if p.requires_grad}
        restore_trainable(parameters, state["trainable"], folder)
        load_optimizer_state(self.objective, self.optimizer, state["optimizer"], fsdp=self.fsdp)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> Path | None:
        """A checkpoint of this step (written by the first process; the path there, else None)."""
        state = self.state()  # every process takes part in gathering it
        path = self.dist.on_main(
            lambda: save_checkpoint(self.out, self.step, state, self.config.keep_checkpoints),
            f"step {self.step}: the main process could not write the checkpoint",
        )
        self.log(f"checkpoint: {path}")  # on the first process (the others' log is silent)
        return path

    # -- validation ----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Generate from the validation samples with fixed seeds; write a grid, log the scores and
        redraw the curves. Runs on the main process only (the others wait)."""
        with averaged(self.ema):
            trainable = self.trainable_state()  # every process takes part in gathering it
        try:
            scores = self.dist.on_main(
                lambda: self._validate_on_main(trainable), f"validation at step {self.step} failed on the main process"
            )
        finally:
            self.objective.back_to_training(self.autocast_dtype)
        return scores or {}

    def _validate_on_main(self, trainable: dict[str, torch.Tensor]) -> dict[str, float]:
        if self._validation is None:
            self._validation = ValidationSet.from_dataset(self.dataset, self.config, self.resolution, self.device)
        return run_validation(self.objective, self._validation, trainable, self.step, self.logs)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> list[Path]:
        """Train to ``max_steps`` (resuming if asked), checkpointing and validating on the way; export."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._start()
        with _sigint_calls(self._request_stop):
            self._loop()
        if self._stop:
            self.save()
            self.log(f"stopped at step {self.step}; continue with --resume latest")
            return []
        if self.step % self.config.checkpoint_every:
            self.save()
        if not self.config.validate_every or self.step % self.config.validate_every:
            self.validate()
        return self._export()

    def _start(self) -> None:
        """Resume from the checkpoint ``--resume`` names, setting damaged ones aside; or start anew."""
        found = find_resume_point(self.out, self.config.resume, self.log)
        if found is None:
            self.logs.restart(self.config.to_json())
            return
        resume, state, damaged = found
        self.load_state(resume, state)
        del state
        self.log(f"resumed from {resume} at step {self.step}")
        self.dist.barrier()  # every process has read its checkpoint before any folder moves
        if self.dist.is_main:
            for folder in damaged:  # kept for inspection, no longer taken for a checkpoint
                self.log(f"the damaged checkpoint {folder.name} is kept as {set_aside(folder)}")
        self.logs.resume(self.step)

    def _loop(self) -> None:
        config = self.config
        meter = Meter(self.step, self.stream.global_batch)
        if config.validate_every and self.step == 0:  # the starting point of the validation curves
            self.validate()
        while self.step < config.max_steps:
            # A Ctrl-C reaches the processes at different moments: they agree before each step.
            self._stop = self.dist.any(self._stop)
            if self._stop:
                break
            meter.add(self.train_step())
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                self.logs.metrics(self.step, config.max_steps, meter, self.optimizer.param_groups[0]["lr"])
            if config.validate_every and self.step % config.validate_every == 0:
                self.validate()
            if self.step % config.checkpoint_every == 0:
                self.save()

    def _request_stop(self, signum, frame) -> None:
        if self._stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True
        self.log("stopping: the checkpoint is written after this step (press Ctrl-C again to abort)")

    def _export(self) -> list[Path]:
        """The trained model(s), from the EMA's weights if there is one, written by the first process."""
        with averaged(self.ema):
            trainable = self.trainable_state()
            if self.dist.is_main:
                self.objective.before_export(self.dataset, self.device, self.log)
        if not all_finite(trainable.values()):  # whole on every process: they all stop here
            raise TrainingError(f"step {self.step}: the weights to export are not all finite; nothing exported")
        paths = []
        if self.dist.is_main:
            paths = self.objective.export(self.out, trainable)
            for path in paths:
                self.log(f"exported: {path}")
        self.dist.barrier()
        return paths


def _silent(message: str) -> None:
    """The log of the processes other than the first: they say nothing."""


@contextlib.contextmanager
def _sigint_calls(handler: Callable) -> Iterator[None]:
    """Ctrl-C calls ``handler`` inside the block instead of raising KeyboardInterrupt (in the main
    thread only: Python delivers signals there, and only it may set a handler)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, handler) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


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

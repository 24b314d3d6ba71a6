"""Optimisation: AdamW over the objective's parameter groups, the learning-rate schedule, mixed
precision, the EMA of the weights, gradient checkpointing, and the checks that stop a run whose
numbers stopped being finite."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..models.layers import TimestepEmbedSequential
from .config import TrainConfig, TrainingError
from .distributed import is_sharded, shard_like, whole

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed-precision: autocast's dtype


def adamw(groups: list[dict], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``groups``. Fused: one kernel over all the tensors instead of a loop over ~340 of
    them (3x faster here)."""
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.999), fused=True)


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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device`` (None: none)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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
        """The average, whole on the CPU (gathered from the shards under FSDP: a collective)."""
        return {"decay": self.decay, "shadow": [whole(t) for t in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of ``state_dict`` (each process keeps its shard under FSDP)."""
        self.shadow = [shard_like(t, p).float() for t, p in zip(state["shadow"], self.parameters, strict=True)]


def averaged(ema: EMA | None) -> contextlib.AbstractContextManager:
    """The EMA's weights in place of the live ones inside the block, if there is an EMA."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    for layer in module.modules():
        if isinstance(layer, TimestepEmbedSequential):
            layer.gradient_checkpointing = enabled


def start_step(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], multiplier: float) -> None:
    """Each group's learning rate: its base rate times the schedule's ``multiplier``; no gradients."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * multiplier
    optimizer.zero_grad(set_to_none=True)


def clip_gradients(
    parameters: Sequence[torch.Tensor],
    max_norm: float | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> float:
    """Clip the gradients to ``max_norm`` (0 or None: no clipping), unscaled first under fp16; the
    norm before clipping, over every process's gradients. Clipping computes the norm anyway, so
    checking it (NaN or infinite: the run diverged) costs no extra pass over the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm) if max_norm else gradient_norm(parameters)
    if is_sharded(norm):
        norm = norm.full_tensor()
    return float(norm)


def update_weights(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, ema: EMA | None) -> None:
    """The optimiser's step (through fp16's scaler, which skips a step whose gradients overflowed),
    then the EMA's.

    The weights are not checked here: a pass over them costs about 0.5 s a step at SD 1.5's size.
    AdamW's step from finite gradients with a learning rate <= 1 is finite; should a weight still
    become NaN, the next step's loss shows it, and every checkpoint and export checks the weights
    before writing them."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if ema is not None:
        ema.update()


def gradient_norm(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all the gradients together (as clipping measures it): NaN or infinite
    when a gradient is (or, in float32, when it exceeds about 1e19: a diverged run too)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite (this process's shards of sharded ones). The
    largest magnitude is NaN or infinite exactly when one value is, and never overflows."""
    local = [t.to_local() if is_sharded(t) else t for t in tensors]
    local = [t.detach() for t in local if t.numel() and t.is_floating_point()]
    if not local:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(local, norm_type=math.inf)))


def divergence(config: TrainConfig, step: int, what: str, checkpoints: Sequence[Path]) -> TrainingError:
    """The one-line error that stops a run whose numbers stopped being finite at ``step``: what
    went wrong, the likely causes, and what is left to resume from (``checkpoints``, oldest first)."""
    causes = [f"the learning rate (--learning-rate {config.learning_rate:g}) is too high"]
    if config.mixed_precision != "no":
        causes.append(f"--mixed-precision {config.mixed_precision} overflowed (try --mixed-precision no)")
    kept = f"the newest checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written"
    return TrainingError(
        f"step {step}: {what}: training diverged; likely {' or '.join(causes)}. "
        f"Stopped without saving anything of this step; {kept}"
    )

"""Optimisation helpers: the learning-rate schedule, the EMA, gradient checkpointing, finiteness checks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..models.layers import TimestepEmbedSequential
from .config import TrainConfig
from .distributed import is_sharded

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


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    for layer in module.modules():
        if isinstance(layer, TimestepEmbedSequential):
            layer.gradient_checkpointing = enabled


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

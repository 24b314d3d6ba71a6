"""Many processes: this process's place among them (torchrun), how the trainable module is
replicated (DDP) or sharded (FSDP), and tensors gathered from and laid back out as shards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from .config import TrainingError

T = TypeVar("T")


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

    def on_main(self, work: Callable[[], T], failure: str) -> T | None:
        """``work()`` on the first process (None on the others), every process waiting for it. A
        TrainingError there is raised on every process (``failure`` on the others), so that none
        waits forever for a process that stopped (a full disk while writing, say)."""
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except TrainingError as caught:
                error = caught
        if self.any(error is not None):  # also the barrier
            raise error or TrainingError(failure)
        return result

    def replicate(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel (each process on its local GPU with cuda)."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


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


def gradient_sync(engine: nn.Module, *, fsdp: bool, last: bool) -> contextlib.AbstractContextManager:
    """Where the backward pass of a micro-step runs: the gradients are reduced over the processes
    on the last micro-step of an optimiser step only (reduce-scattered under FSDP)."""
    if fsdp:
        engine.set_requires_gradient_sync(last)
    elif not last and isinstance(engine, nn.parallel.DistributedDataParallel):
        return engine.no_sync()
    return contextlib.nullcontext()


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, *, fsdp: bool) -> dict:
    """The optimiser's state, whole on the CPU under FSDP (a collective then: every process calls it)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(module, optimizer, options=options)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict, *, fsdp: bool) -> None:
    """The inverse of ``optimizer_state`` (under FSDP each process keeps its shard of it)."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU, gathered from the processes' shards if it is sharded (a collective: every
    process must call it, in the same order). A copy, never a view: the EMA swaps its weights in
    and out of the same storage."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def shard_like(tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole) laid out as ``parameter`` is (this process's shard of it, under FSDP)."""
    tensor = tensor.to(parameter.device, parameter.dtype)
    if is_sharded(parameter):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor, parameter.device_mesh, parameter.placements)
    return tensor

"""Many processes: this process's place among them (torchrun), and FSDP's sharded tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .objectives import ControlNetObjective

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

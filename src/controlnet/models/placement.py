"""Where the models live between uses: the low-memory mode.

A generation uses its models one stage at a time: the text encoder, then the UNet with the
ControlNets for every step, then the VAE. In low-memory mode only what the current stage needs is
on the compute device (the original app's ``save_memory``); the rest is parked:

- with an accelerator, parked models wait in CPU memory, and a whole model comes to the device for
  its stage;
- on a CPU-only machine there is no slower memory to wait in, so a parked module's weights are
  written once to a safetensors file in a cache folder and freed (the module moves to the meta
  device); using it again reads the file back. The UNet and the ControlNets, which every step
  needs, are streamed block by block (``Placement.stream``): each block's weights are read in for
  its own forward call and freed after it, so a step holds one block's weights at a time (diffusers'
  "sequential CPU offload", with the disk cache as the slower memory). Reading the weights costs
  time at every step; the operating system's file cache keeps them close.

Attention is also computed in slices of queries (see ``layers.Attention.slice_size``) so that no
layer holds the whole attention matrix at once.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import Attention, TimestepEmbedSequential

# Queries per attention slice in low-memory mode: 1024 queries x 4096 keys x 8 heads in fp32 is
# 128 MiB per slice at 512 px, instead of 512 MiB for the whole matrix.
LOW_MEMORY_ATTENTION_SLICE = 1024


def set_attention_slicing(module: nn.Module, slice_size: int | None) -> None:
    """Compute every attention layer of ``module`` in slices of ``slice_size`` queries (None: whole)."""
    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.slice_size = slice_size


def release_freed_memory() -> None:
    """Hand the memory just freed back to the system. glibc keeps freed blocks for reuse (and
    raises its mmap threshold after freeing a large mapped block, so the next ones come from the
    heap): a module read in and freed block by block would otherwise grow the process by the
    sum of its blocks. ``malloc_trim`` returns the free pages (about a millisecond); elsewhere
    than glibc there is nothing to do."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def blocks(module: nn.Module) -> list[nn.Module]:
    """The units a streamed model is parked in, each called as a whole by its owner: the children,
    with lists opened (``input_blocks.3``, ``zero_convs.5``, ...) and so is a direct
    ``TimestepEmbedSequential`` child (the middle block: its layers are called one by one and are
    the largest). Plain Sequentials (``time_embed``, ``out``, the hint encoder) stay whole. Each
    unit holds at most a few hundred MB of SD 1.5 weights."""
    units = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, TimestepEmbedSequential)):
            units.extend(child.children())
        else:
            units.append(child)
    return [unit for unit in units if any(True for _ in unit.parameters())]


class Placement:
    """Moves models to the compute device for a stage and parks them afterwards (low memory)."""

    def __init__(
        self,
        device: torch.device,
        low_memory: bool,
        cache_dir: str | Path | None = None,
        channels_last: bool = False,
    ) -> None:
        self.device = device
        self.low_memory = low_memory
        self.channels_last = channels_last  # the layout of 4-D weights when they come back
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._temporary: tempfile.TemporaryDirectory | None = None
        self._parked_files: dict[int, Path] = {}
        self._streamed: set[int] = set()

    def _folder(self) -> Path:
        if self._cache_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="controlnet-parked-")
            self._cache_dir = Path(self._temporary.name)
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        return self._cache_dir

    def is_parked(self, module: nn.Module) -> bool:
        return any(p.is_meta for p in module.parameters())

    def park(self, module: nn.Module) -> None:
        """Free ``module``'s place on the compute device."""
        if self.device.type != "cpu":
            module.to("cpu")
            return
        if self.is_parked(module):
            return
        path = self._parked_files.get(id(module))
        if path is None:  # weights do not change during inference: write them once
            path = self._folder() / f"{id(module)}.safetensors"
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
            self._parked_files[id(module)] = path
        module.to("meta")
        release_freed_memory()

    def unpark(self, module: nn.Module) -> None:
        if self.device.type != "cpu":
            module.to(self.device)
        elif self.is_parked(module):
            module.load_state_dict(load_file(str(self._parked_files[id(module)])), strict=True, assign=True)
            if self.channels_last:  # the file holds contiguous tensors
                module.to(memory_format=torch.channels_last)

    def stream(self, module: nn.Module) -> None:
        """Low memory on a CPU: park each block of ``module`` (see ``blocks``) on its own, and bring
        it in for its forward call only (forward hooks). ``use`` then leaves ``module`` alone."""
        for block in blocks(module):
            self.park(block)
            block.register_forward_pre_hook(lambda block, args: self.unpark(block))
            block.register_forward_hook(lambda block, args, output: self.park(block))
        self._streamed.add(id(module))

    @contextmanager
    def use(self, *modules: nn.Module) -> Iterator[None]:
        """Have ``modules`` on the compute device for the ``with`` block; park them after it in
        low-memory mode (streamed modules come in block by block by themselves)."""
        modules = tuple(m for m in modules if id(m) not in self._streamed)
        if not self.low_memory:
            yield
            return
        for module in modules:
            self.unpark(module)
        try:
            yield
        finally:
            for module in modules:
                self.park(module)

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

"""Where the models live between uses: the low-memory mode.

A generation uses its models one stage at a time: the text encoder, then the UNet with the
ControlNets for every step, then the VAE. In low-memory mode only the models of the current stage
are on the compute device (the original app's ``save_memory``); the others are parked:

- with an accelerator, parked models wait in CPU memory;
- on a CPU-only machine there is no slower memory to wait in, so a parked model's weights are
  written once to a safetensors file in a cache folder and freed (the module moves to the meta
  device); using it again maps the file back in.

Attention is also computed in slices of queries (see ``layers.Attention.slice_size``) so that no
layer holds the whole attention matrix at once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import Attention

# Queries per attention slice in low-memory mode: 1024 queries x 4096 keys x 8 heads in fp32 is
# 128 MiB per slice at 512 px, instead of 512 MiB for the whole matrix.
LOW_MEMORY_ATTENTION_SLICE = 1024


def set_attention_slicing(module: nn.Module, slice_size: int | None) -> None:
    """Compute every attention layer of ``module`` in slices of ``slice_size`` queries (None: whole)."""
    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.slice_size = slice_size


class Placement:
    """Moves models to the compute device for a stage and parks them afterwards (low memory)."""

    def __init__(self, device: torch.device, low_memory: bool, cache_dir: str | Path | None = None) -> None:
        self.device = device
        self.low_memory = low_memory
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._temporary: tempfile.TemporaryDirectory | None = None
        self._parked_files: dict[int, Path] = {}

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

    def unpark(self, module: nn.Module) -> None:
        if self.device.type != "cpu":
            module.to(self.device)
        elif self.is_parked(module):
            module.load_state_dict(load_file(str(self._parked_files[id(module)])), strict=True, assign=True)

    @contextmanager
    def use(self, *modules: nn.Module) -> Iterator[None]:
        """Have ``modules`` on the compute device for the ``with`` block; park them after it in
        low-memory mode."""
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

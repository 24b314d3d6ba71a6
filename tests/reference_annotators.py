"""The independent implementations the annotator tests compare with: controlnet_aux's modules,
imported one by one.

controlnet_aux (installed with --no-deps by `make test`) imports every annotator, and torchvision, in
its package ``__init__``; torchvision does not install beside the torch this project pins. So its
packages are entered here without running their ``__init__`` files, and the few torchvision names
some of its modules import at the top (transforms used for normalising, never for the networks) are
given a minimal stand-in written from torchvision's documented behaviour, only while such a module
is imported and only when torchvision is absent.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch


def aux_root() -> Path:
    spec = importlib.util.find_spec("controlnet_aux")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("controlnet_aux is not installed (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def aux_module(name: str) -> types.ModuleType:
    """``controlnet_aux.<name>`` (e.g. "hed", "open_pose.body", "lineart"), its parent packages
    entered without their ``__init__`` unless the module is itself a package's ``__init__``."""
    root = aux_root()
    full = f"controlnet_aux.{name}"
    if full in sys.modules:
        return sys.modules[full]
    parts = full.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            folder = str(root.joinpath(*parts[1:depth]))
            spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
            spec.submodule_search_locations = [folder]
            module = importlib.util.module_from_spec(spec)
            sys.modules[package] = module
    with _torchvision_stand_in():
        return importlib.import_module(full)


class _torchvision_stand_in:
    """A minimal ``torchvision.transforms`` while a controlnet_aux module is imported, if needed."""

    def __enter__(self) -> None:
        self.added = importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules
        if self.added:
            vision = types.ModuleType("torchvision")
            transforms = types.ModuleType("torchvision.transforms")
            transforms.Compose = _Compose
            transforms.Normalize = _Normalize
            transforms.ToTensor = _ToTensor
            transforms.ToPILImage = _ToPILImage
            vision.transforms = transforms
            sys.modules["torchvision"] = vision
            sys.modules["torchvision.transforms"] = transforms

    def __exit__(self, *exc: object) -> None:
        if self.added:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.transforms", None)


class _Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x


class _Normalize:
    """torchvision.transforms.Normalize: (x - mean) / std per channel of a (..., C, H, W) tensor."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


class _ToTensor:
    def __call__(self, pic):
        raise NotImplementedError("torchvision.transforms.ToTensor is not used by the compared code paths")


class _ToPILImage:
    def __call__(self, pic):
        raise NotImplementedError("torchvision.transforms.ToPILImage is not used by the compared code paths")

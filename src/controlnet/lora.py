"""LoRAs merged into a model's weights, and unmerged exactly.

``apply_loras(model, [(lora, weight), ...])`` adds each LoRA's low-rank differences, times its
weight, to the UNet's and the text encoder's weights (``W + sum of weight * scale * up @ down``,
summed in float32 and rounded once to the weight's dtype), so that generation runs at the plain
model's speed. The returned :class:`AppliedLoras` keeps the original tensors themselves (the merged
weights are new tensors; nothing is changed in place), and ``restore()`` puts them back: the model
is then bit-identical to what it was. One set of LoRAs at a time per model: restore before applying
another (the handle is also a context manager).

Every layer of every LoRA is matched to a weight of this model (``formats/lora.py``) and checked
against its shape before any weight changes: a layer that names no weight of the model, or that
has the shape of another model family's, is a one-line :class:`CheckpointError`.

The web UI's prompt syntax ``<lora:NAME:WEIGHT>`` (:func:`prompt_loras`, names found in a folder
by :func:`find_lora`) and the command line's ``FILE[:WEIGHT]`` (:func:`parse_lora_argument`) are
parsed here; docs/lora.md.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch
from torch import nn

from .formats.errors import CheckpointError
from .formats.lora import Lora, LoraLayer, Target, load_lora, lora_targets, made_for

__all__ = [
    "LORA_SUFFIXES",
    "AppliedLoras",
    "Lora",
    "apply_loras",
    "find_lora",
    "load_lora",
    "parse_lora_argument",
    "prompt_loras",
]

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")  # what find_lora looks for, in this order

# The models that hold merged LoRAs now, and their handle.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, AppliedLoras] = weakref.WeakKeyDictionary()

Update = tuple[Target, LoraLayer, float]


class AppliedLoras:
    """LoRAs merged into a model: :meth:`restore` gives the model its original weights back."""

    def __init__(self, model: nn.Module, loras: Sequence[tuple[Lora, float]], originals: dict[str, torch.Tensor]):
        self.model = model
        self.loras = tuple(loras)
        self._originals = originals

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names of the weights changed (empty once restored)."""
        return tuple(self._originals)

    def restore(self) -> None:
        """Put the original weight tensors back (the same tensors: bit-identical). Idempotent."""
        with torch.no_grad():
            for name, original in self._originals.items():
                parameter = self.model.get_parameter(name)
                # A model moved to another device since keeps its place (the values are still exact).
                parameter.data = original.to(device=parameter.device)
        self._originals = {}
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> AppliedLoras:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.restore()

    def __repr__(self) -> str:
        names = ", ".join(f"{lora.name}:{weight:g}" for lora, weight in self.loras)
        return f"AppliedLoras([{names}], {len(self._originals)} weights changed)"


def apply_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> AppliedLoras:
    """Merge ``loras`` (each with its weight, the multiplier of AUTOMATIC1111's ``<lora:NAME:WEIGHT>``)
    into ``model``'s UNet and text encoder weights (``model``: a :class:`StableDiffusion`, or any
    module with ``unet`` and/or ``text_encoder``). A weight of 0 leaves the model as it is; several
    LoRAs add. Everything is checked first: on an error nothing has changed."""
    current = _ACTIVE.get(model)
    if current is not None and current.parameters:
        raise ValueError(f"LoRAs are already merged into this model ({current!r}): restore() them first")
    for lora, weight in loras:
        if not isinstance(lora, Lora):
            raise TypeError(f"expected (Lora, weight) pairs, got a {type(lora).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"{lora.name}: a LoRA's weight must be a finite number, got {weight!r}")
    updates = _resolve(model, loras)
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, parameter_updates in updates.items():
            parameter = model.get_parameter(name)
            originals[name] = parameter.data
            parameter.data = _merged(parameter.data, parameter_updates)
    handle = AppliedLoras(model, loras, originals)
    if originals:
        _ACTIVE[model] = handle
    return handle


def _resolve(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> dict[str, list[Update]]:
    """Each weight to change and what changes it; every layer matched and its shape checked."""
    targets = lora_targets(model)
    parameters = dict(model.named_parameters())
    family = model.unet.config.family if getattr(model, "unet", None) is not None else "unknown"
    updates: dict[str, list[Update]] = {}
    for lora, weight in loras:
        unmatched = [layer.key for slot, layer in lora.layers.items() if slot not in targets]
        if unmatched:
            raise CheckpointError(
                f"{lora.source}: {len(unmatched)} of its {len(lora.layers)} layers match no layer of this model "
                f"({family}; first: {unmatched[0]}){_made_for(lora, family)}"
            )
        wrong = []
        for slot, layer in lora.layers.items():
            target = targets[slot]
            parameter = parameters[target.parameter]
            if parameter.is_meta:
                raise ValueError(
                    f"{target.parameter} is not in memory (a parked model, low-memory placement): "
                    "apply LoRAs to a model whose weights are loaded"
                )
            expected = target.shape(parameter)
            if not _fits(layer.shape, expected):
                wrong.append((layer, target, expected))
            elif weight != 0:
                updates.setdefault(target.parameter, []).append((target, layer, float(weight)))
        if wrong:
            layer, target, expected = wrong[0]
            raise CheckpointError(
                f"{lora.source}: {len(wrong)} of its layers do not fit this model ({family}; first: {layer.key} "
                f"changes a {list(layer.shape)} weight, {target.parameter} is {list(expected)})"
                f"{_made_for(lora, family)}"
            )
    return updates


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Equal shapes, a 1x1 convolution's weight being a linear layer's (SD 1.x's proj_in is a conv,
    SD 2.x's a Linear: LoRAs for either store either)."""

    def plain(s: tuple[int, ...]) -> tuple[int, ...]:
        return s[:2] if s[2:] == (1, 1) else s

    return plain(shape) == plain(expected)


def _made_for(lora: Lora, family: str) -> str:
    other = made_for(lora)
    return f"; a LoRA for {other}" if other is not None and other != family else ""


def _merged(weight: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    """A new tensor like ``weight`` (dtype, device, memory format): ``weight`` plus the updates,
    summed in float32 and rounded once."""
    total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for target, layer, multiplier in updates:
        delta = layer.delta(weight.device) * multiplier
        if target.transpose:
            delta = delta.t()
        part = total if target.rows is None else total[target.rows[0] : target.rows[1]]
        part += delta.reshape(part.shape)
    merged = torch.empty_like(weight)
    merged.copy_(weight.to(torch.float32) + total)
    return merged


# --------------------------------------------------------------------------------------------------
# Naming LoRAs: FILE[:WEIGHT] on the command line, <lora:NAME:WEIGHT> in a prompt, found in a folder.
# --------------------------------------------------------------------------------------------------

_TAG = re.compile(r"<lora:([^<>]*)>")


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:WEIGHT`` (weight 1 by default): the path and the weight. A ``:`` followed
    by something that is not a number belongs to the path (``C:\\loras\\x.safetensors``)."""
    head, colon, tail = text.rpartition(":")
    if colon and head:
        try:
            weight = float(tail)
        except ValueError:
            return Path(text), 1.0
        if not math.isfinite(weight):
            raise ValueError(f"--lora {text!r}: the weight must be a finite number")
        return Path(head), weight
    if not text:
        raise ValueError("--lora needs a file: FILE or FILE:WEIGHT")
    return Path(text), 1.0


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its ``<lora:NAME>`` / ``<lora:NAME:WEIGHT>`` tags (AUTOMATIC1111's
    syntax; they are not text to encode), and each tag's name and weight, in order."""
    found: list[tuple[str, float]] = []
    for match in _TAG.finditer(prompt):
        name, _, weight = match.group(1).partition(":")
        name = name.strip()
        if not name or ":" in weight:
            raise ValueError(f"{match.group(0)!r}: write <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"{match.group(0)!r}: the weight must be a number, got {weight!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{match.group(0)!r}: the weight must be a finite number")
        found.append((name, value))
    return " ".join(_TAG.sub(" ", prompt).split()), found


def find_lora(name: str, folder: str | os.PathLike) -> Path:
    """The LoRA file called ``name`` (its name without suffix) in ``folder`` or its subfolders, as
    AUTOMATIC1111 finds ``<lora:NAME>`` in its ``--lora-dir``. ``name`` is a name, never a path:
    nothing outside ``folder`` is found."""
    folder = Path(folder)
    if not name or name != name.strip() or any(c in name for c in "/\\\0") or name.startswith("."):
        raise ValueError(f"LoRA name {name!r}: a file name without folder or suffix is expected")
    if not folder.is_dir():
        raise ValueError(f"the LoRA folder {folder} does not exist")
    candidates = sorted(
        (path for path in folder.rglob("*") if path.suffix in LORA_SUFFIXES and path.stem == name and path.is_file()),
        key=lambda path: (LORA_SUFFIXES.index(path.suffix), len(path.parts), str(path)),
    )
    if not candidates:
        raise ValueError(f"no LoRA called {name!r} in {folder} ({', '.join(LORA_SUFFIXES)} files)")
    same_kind = [path for path in candidates if path.suffix == candidates[0].suffix]
    if len(same_kind) > 1:
        shown = ", ".join(str(path.relative_to(folder)) for path in same_kind[:3])
        raise ValueError(f"{len(same_kind)} LoRAs called {name!r} in {folder} ({shown}): rename one")
    return candidates[0]

"""LoRA files: the kohya / AUTOMATIC1111 layout and the diffusers / PEFT layout, read safely, and
their layers matched to the modules of our (original LDM layout) models.

A LoRA layer changes one Linear or Conv2d weight ``W`` [out, in(, kh, kw)] by a low-rank product:
``W + multiplier * scale * up @ down``, ``down`` [rank, in(, kh, kw)], ``up`` [out, rank(, 1, 1)]
(a convolution LoRA's ``down`` is a kh x kw conv and its ``up`` a 1x1 conv: their product is a
kh x kw kernel). The layouts:

- kohya / AUTOMATIC1111 (``sd-scripts``' ``networks/lora.py``, LyCORIS' LoCon): one module name per
  layer, the model's module path with ``_`` for ``.`` after ``lora_unet_`` (the UNet), ``lora_te_``
  (the text encoder; SDXL: ``lora_te1_`` and ``lora_te2_``), and ``.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` (scale ``alpha / rank``; no alpha, or 0, is a scale of 1, as
  kohya's trainer and AUTOMATIC1111 read it). LyCORIS' Tucker-decomposed convolutions add
  ``.lora_mid.weight`` [rank, rank, kh, kw] between 1x1 ``down`` and ``up``. The UNet's names are
  diffusers' module paths for SD 1.x/2.x (``lora_unet_down_blocks_0_attentions_0_...``; kohya trains
  those on diffusers' UNet) and the original LDM paths for SDXL (``lora_unet_input_blocks_4_1_...``);
  both are understood for every model. The text encoders' are transformers' ``CLIPTextModel`` paths
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
- diffusers / PEFT: ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``,
  ``text_encoder_2.``), scale 1 unless the safetensors metadata ``lora_adapter_metadata`` (PEFT's
  ``LoraConfig`` as diffusers saves it) gives ``lora_alpha`` (and ``alpha_pattern``, ``use_rslora``);
  the names of older diffusers versions: ``...attn1.processor.to_q_lora.down.weight`` (attention
  processors), ``...conv1.lora.down.weight`` and ``...q_proj.lora_linear_layer.down.weight``; a file
  without component prefix is a UNet's (``unet.save_attn_procs``).

Both layouts name diffusers' or transformers' modules (or, for SDXL's UNet, the original ones); our
modules are the original LDM ones, so each is found through the explicit key maps of
:mod:`diffusers_unet` and :mod:`diffusers_text` (:func:`lora_targets`): open_clip's fused ``in_proj``
takes a q, k or v layer in its third of the rows, its ``text_projection`` a transposed one.
Names are compared with every ``.`` as ``_``, so both layouts meet in one table.

Only LoRA layers are read: LoHa, LoKr, DoRA, OFT and full-difference files are refused in one line,
as is any tensor the layouts above do not name. Merging into a model: :mod:`controlnet.lora`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..config import family_name
from .control_lora import is_control_lora
from .diffusers_text import key_tables
from .diffusers_unet import unet_key_pairs
from .errors import CheckpointError
from .tensors import check_finite, read_state_dict

Component = Literal["unet", "text", "text_2"]

# kohya's prefixes; lora_te1_ / lora_te2_ are SDXL's two text encoders.
_KOHYA_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text"),
    ("lora_te2_", "text_2"),
    ("lora_te_", "text"),
)
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
# diffusers' component prefixes (the pipeline's attribute names).
_DIFFUSERS_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("unet.", "unet"),
    ("text_encoder_2.", "text_2"),
    ("text_encoder.", "text"),
)
# The tensor of a layer, by the end of its key: PEFT's, then older diffusers versions'.
_DIFFUSERS_PARTS = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # attention processors: to_q_lora, to_k_lora, to_v_lora, to_out_lora
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
# What the attention processors' to_X_lora layers change (the UNet's names; the text encoder's).
_PROCESSOR_TARGETS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# Other kinds of network, told apart by their keys, refused by name.
_OTHER_KINDS = (
    (re.compile(r"\.hada_w"), "LoHa (LyCORIS)"),
    (re.compile(r"\.lokr_w"), "LoKr (LyCORIS)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)\b"), "DoRA"),
    (re.compile(r"\.oft_"), "OFT"),
    (re.compile(r"\.diff(_b)?$"), "full-difference (LyCORIS 'full')"),
    (re.compile(r"\.lora_B\.bias$"), "LoRA with biases (PEFT lora_bias)"),
)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for PEFT's LoraConfig in safetensors metadata


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank difference: ``scale * up @ (mid) @ down``."""

    key: str  # the module's name as the file spells it, for messages
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw] (1x1 when ``mid`` is set)
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    scale: float  # alpha / rank (kohya), lora_alpha / rank (PEFT), or 1
    mid: torch.Tensor | None = None  # LyCORIS' Tucker core [rank, rank, kh, kw]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it changes: (out, in) or (out, in, kh, kw)."""
        kernel = tuple((self.mid if self.mid is not None else self.down).shape[2:])
        return (int(self.up.shape[0]), int(self.down.shape[1]), *kernel)

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``scale * up @ down`` in float32, of :attr:`shape`."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)  # [out, rank]
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)  # [rank, in * kh * kw]
        if self.mid is None:
            product = up @ down
        else:  # up [o, r], mid [r, s, kh, kw], down [s, i] -> [o, i, kh, kw] (AUTOMATIC1111's rebuild)
            mid = self.mid.to(device=device, dtype=torch.float32)
            product = torch.einsum("rskl,or,si->oikl", mid, up, down)
        return (product * self.scale).reshape(self.shape)


@dataclass(frozen=True)
class Lora:
    """A LoRA file's layers, by component and module name (``.`` written ``_``)."""

    name: str  # the file's name without suffix: what ``<lora:NAME:WEIGHT>`` calls it
    source: str  # the file, for messages
    layout: Literal["kohya", "diffusers"]
    layers: Mapping[tuple[Component, str], LoraLayer]

    def __repr__(self) -> str:
        return f"Lora({self.name!r}, {self.layout}, {len(self.layers)} layers)"


def load_lora(path: str | os.PathLike) -> Lora:
    """Read a LoRA file (safetensors; a pickle only as tensors, :func:`tensors.read_state_dict`).

    Every tensor must be part of a LoRA layer of one of the two layouts; anything else, a layer
    without its ``down`` or ``up``, shapes that do not chain, NaN or infinity: one-line
    :class:`CheckpointError`.
    """
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    check_finite(tensors, path)
    return lora_from_state_dict(tensors, metadata, name=path.stem, source=str(path))


def lora_from_state_dict(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str, source: str
) -> Lora:
    """:func:`load_lora` on tensors already read (``metadata``: the safetensors metadata)."""
    if is_control_lora(tensors):
        raise CheckpointError(f"{source}: a Control-LoRA (a ControlNet stored as differences): load it as a ControlNet")
    for marker, kind in _OTHER_KINDS:
        key = next((k for k in tensors if marker.search(k)), None)
        if key is not None:
            raise CheckpointError(f"{source}: a {kind} file (key {key}); only LoRA and LoCon layers are supported")
    parts: dict[tuple[Component, str], dict[str, torch.Tensor]] = {}
    spelled: dict[tuple[Component, str], str] = {}
    modules: dict[tuple[Component, str], str] = {}  # diffusers' dotted module paths, for PEFT's patterns
    layouts: set[str] = set()
    unknown: list[str] = []
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        layout, component, module, part, spelling = parsed
        layouts.add(layout)
        slot = (component, module.replace(".", "_"))
        spelled.setdefault(slot, spelling)
        if layout == "diffusers":
            modules.setdefault(slot, module)
        if part in parts.setdefault(slot, {}):
            raise CheckpointError(f"{source}: two tensors for the {part} of layer {spelled[slot]} (the second: {key})")
        parts[slot][part] = tensor
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} of its {len(tensors)} tensors are not LoRA layers of the kohya or diffusers "
            f"layout (first: {unknown[0]})"
        )
    config = _peft_config(metadata)
    layers = {
        slot: _layer(spelled[slot], found, config, slot[0], modules.get(slot), source) for slot, found in parts.items()
    }
    layout = "kohya" if layouts == {"kohya"} else "diffusers"
    return Lora(name=name, source=source, layout=layout, layers=layers)


def _parse_key(key: str) -> tuple[str, Component, str, str, str] | None:
    """(layout, component, module name, part, the layer's name as the file spells it) of one
    tensor's key; None when it is not a LoRA tensor of either layout."""
    for prefix, component in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            module, _, part = key[len(prefix) :].partition(".")
            if part in _KOHYA_PARTS and module:
                return "kohya", component, _text_module(module, component, "_"), _KOHYA_PARTS[part], prefix + module
            return None
    component: Component = "unet"  # diffusers' unet.save_attn_procs writes no prefix
    name = key
    for prefix, candidate in _DIFFUSERS_PREFIXES:
        if key.startswith(prefix):
            component, name = candidate, key[len(prefix) :]
            break
    for suffix, part in _DIFFUSERS_PARTS:
        if name.endswith(suffix) and len(name) > len(suffix):
            module = name[: -len(suffix)].replace(".processor.", ".")
            if suffix.startswith("_lora."):  # attn1.to_q_lora -> attn1.to_q; self_attn.to_q_lora -> q_proj
                parent, _, projection = module.rpartition(".")
                targets = _PROCESSOR_TARGETS["unet" if component == "unet" else "text"]
                if projection not in targets:
                    return None
                module = f"{parent}.{targets[projection]}"
            return "diffusers", component, _text_module(module, component, "."), part, key[: -len(suffix)]
    return None


def _text_module(module: str, component: Component, separator: str) -> str:
    """A text encoder's module with transformers' ``text_model.`` in front (files written with
    transformers 5 leave it out); the projection of SDXL's second encoder sits outside it."""
    if component == "unet" or module.startswith(f"text_model{separator}") or module.startswith("text_projection"):
        return module
    return f"text_model{separator}{module}"


def _layer(
    key: str,
    parts: Mapping[str, torch.Tensor],
    config: Mapping[str, object],
    component: Component,
    module: str | None,
    source: str,
) -> LoraLayer:
    """One layer from its tensors; ``module``: its diffusers module path (None for kohya's)."""
    missing = [p for p in ("down", "up") if p not in parts]
    if missing:
        raise CheckpointError(f"{source}: layer {key} has no {missing[0]} weight")
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    rank = int(down.shape[0])
    chained = down.ndim in (2, 4) and up.ndim == down.ndim and int(up.shape[1]) == rank and up.shape[2:] in ((), (1, 1))
    if mid is not None:
        chained = chained and down.shape[2:] == (1, 1) and mid.ndim == 4 and tuple(mid.shape[:2]) == (rank, rank)
    if not chained:
        shapes = f"down {list(down.shape)}, up {list(up.shape)}" + (
            f", mid {list(mid.shape)}" if mid is not None else ""
        )
        raise CheckpointError(f"{source}: layer {key} is not a low-rank pair ({shapes})")
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            raise CheckpointError(f"{source}: layer {key} has an alpha of shape {list(parts['alpha'].shape)}")
        alpha = float(parts["alpha"].float().item())
        scale = alpha / rank if alpha else 1.0  # kohya and AUTOMATIC1111: no alpha, or 0, means alpha = rank
    elif module is not None:
        scale = _peft_scale(config, component, module, rank)
    else:
        scale = 1.0
    return LoraLayer(key=key, down=down, up=up, scale=scale, mid=mid)


# --------------------------------------------------------------------------------------------------
# PEFT's LoraConfig in diffusers' safetensors metadata: lora_alpha, alpha_pattern, use_rslora.
# --------------------------------------------------------------------------------------------------

_METADATA_PREFIXES = {"unet": "unet.", "text": "text_encoder.", "text_2": "text_encoder_2."}


def _peft_config(metadata: Mapping[str, str]) -> dict[str, object]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}  # metadata for people: a file whose scales it cannot give keeps PEFT's default, 1
    return config if isinstance(config, dict) else {}


def _peft_scale(config: Mapping[str, object], component: Component, module: str, rank: int) -> float:
    """PEFT's scaling of a layer: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), the alpha from
    ``alpha_pattern`` where a pattern names the module; 1 without a config (diffusers' default)."""
    prefix = _METADATA_PREFIXES[component]
    # A pipeline's file prefixes each component's config; a model's own (save_lora_adapter) does not.
    own = {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
    if not own and component == "unet":
        own = {k: v for k, v in config.items() if "." not in k}
    alpha = own.get("lora_alpha")
    if not isinstance(alpha, int | float):
        return 1.0
    patterns = own.get("alpha_pattern")
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if _matches(pattern, module) and isinstance(value, int | float):
                alpha = value
                break
    return float(alpha) / (math.sqrt(rank) if own.get("use_rslora") else rank)


def _matches(pattern: str, module: str) -> bool:
    """PEFT's ``get_pattern_key``: the pattern (a regular expression) matches the module's path or a
    suffix of it starting after a ``.``. The text encoder's paths are tried with and without
    ``text_model.``, as transformers 4 and 5 name the modules PEFT adapted."""
    names = (module, module.removeprefix("text_model."))
    try:
        return any(re.match(rf"(.*\.)?({pattern})$", name) for name in names)
    except re.error:
        return False


# --------------------------------------------------------------------------------------------------
# Our modules under the layouts' names.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a LoRA layer goes: a parameter of the model, or some of its rows, maybe transposed."""

    parameter: str  # e.g. unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight
    rows: tuple[int, int] | None = None  # open_clip's fused in_proj_weight: the q, k or v third
    transpose: bool = False  # open_clip's text_projection is stored [in, out]

    def shape(self, parameter: torch.Tensor) -> tuple[int, ...]:
        """The shape of the weight a LoRA layer for this target must have."""
        shape = tuple(parameter.shape)
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0], *shape[1:])
        return shape[::-1] if self.transpose else shape


def lora_targets(model: nn.Module) -> dict[tuple[Component, str], Target]:
    """Every Linear and Conv2d weight of ``model``'s ``unet`` and ``text_encoder`` (a
    :class:`StableDiffusion`, or any module holding those two), under each name a LoRA file may give
    it: the UNet's diffusers and LDM module paths, the text encoders' transformers paths; every ``.``
    written ``_``."""
    table: dict[tuple[Component, str], Target] = {}

    def add(component: Component, name: str, target: Target) -> None:
        slot = (component, name.replace(".", "_"))
        if table.setdefault(slot, target) != target:
            raise AssertionError(f"two layers named {slot}: {table[slot]} and {target}")

    unet = getattr(model, "unet", None)
    if unet is not None:
        weights = dict(unet.named_parameters())
        for ours, theirs in unet_key_pairs(unet.config):
            if ours.endswith(".weight") and weights[ours].ndim >= 2:
                target = Target(f"unet.{ours}")
                add("unet", ours.removesuffix(".weight"), target)
                add("unet", theirs.removesuffix(".weight"), target)
    encoder = getattr(model, "text_encoder", None)
    if encoder is not None:
        embedders = getattr(encoder, "embedders", None)  # SDXL's DualTextEncoder
        named = [("text", "embedders.0.", embedders[0]), ("text_2", "embedders.1.", embedders[1])] if embedders else []
        for component, prefix, text in named or [("text", "", encoder)]:
            for name, target in _text_targets(text, f"text_encoder.{prefix}").items():
                add(component, name, target)
    return table


def _text_targets(encoder: nn.Module, prefix: str) -> dict[str, Target]:
    """A text encoder's linear weights under transformers' module names."""
    weights = dict(encoder.named_parameters())
    renames, splits, transposes, _ = key_tables(encoder.config)
    targets: dict[str, Target] = {}
    for ours, theirs in renames.items():
        if ours.endswith(".weight") and weights[ours].ndim == 2 and "embedding" not in ours:
            targets[theirs.removesuffix(".weight")] = Target(prefix + ours)
    for ours, names in splits.items():
        third = weights[ours].shape[0] // 3
        for index, theirs in enumerate(names):
            if theirs.endswith(".weight"):
                targets[theirs.removesuffix(".weight")] = Target(prefix + ours, (index * third, (index + 1) * third))
    for ours, theirs in transposes.items():
        targets[theirs.removesuffix(".weight")] = Target(prefix + ours, transpose=True)
    return targets


def made_for(lora: Lora) -> str | None:
    """The model family a LoRA was made for, when its layers tell (`config.family_name`): SDXL for
    a second text encoder's layers, else by the context width its cross-attention keys read."""
    if any(component == "text_2" for component, _ in lora.layers):
        return family_name(0, reads_vector=True)
    for (component, name), layer in lora.layers.items():
        if component == "unet" and name.endswith("attn2_to_k"):
            return family_name(layer.shape[1])
    return None

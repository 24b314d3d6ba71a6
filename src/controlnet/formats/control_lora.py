"""Stability's Control-LoRA files (stabilityai/control-lora: ``control-lora-{canny,depth,recolor,
sketch}-rank128.safetensors`` and ``-rank256``; thibaud's openpose rank256): an SDXL ControlNet
stored as low-rank differences from its base model's UNet, so that a file is 400-800 MB instead of
2.5 GB. The ControlNet is rebuilt from the base model it is used with.

The layout, as ComfyUI reads it (``comfy/controlnet.py``: ``ControlLora.pre_run`` and
``ControlLoraOps``; the AUTOMATIC1111 extension ported it, ``scripts/controlnet_lora.py``) and
diffusers converts it (``convert_sai_sd_control_lora_state_dict_to_peft``, with ``lora_alpha`` equal
to the rank, a scale of 1):

- the marker key ``lora_controlnet`` (its value is not used);
- the LDM ControlNet's names, without prefix;
- for a Linear or Conv2d of the encoder copy (``time_embed``, ``label_emb``, ``input_blocks``,
  ``middle_block``), ``<layer>.up`` [out, rank] or [out, rank, 1, 1] and ``<layer>.down`` [rank, in]
  or [rank, in, kh, kw]: its weight is the base UNet's plus
  ``(up.flatten(1) @ down.flatten(1)).reshape(weight.shape)``;
- full tensors for the rest the ControlNet trained (the hint encoder, the zero convolutions, the
  biases and norms): they replace the base UNet's;
- whatever the file does not hold is the base UNet's own weight (ComfyUI sets every UNet weight
  into the ControlNet before the file's).

The ControlNet's configuration is the base UNet's (ComfyUI builds it from the model it runs with),
with the file's hint encoder. Here the differences are added once, when the model is built (in
float32), and strictly: every weight of the ControlNet is accounted for and every tensor of the
file used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ControlNetConfig, UNetConfig, family_name
from .errors import CheckpointError, first_line, short_list
from .tensors import StateDict

MARKER = "lora_controlnet"
# The part of a ControlNet that is a copy of the UNet's encoder (the rest is the ControlNet's own).
ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")


def is_control_lora(keys) -> bool:
    return MARKER in keys


def made_for(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The base family a Control-LoRA was made for (`config.family_name`), from its keys: SDXL when
    it has ``label_emb`` (the vector y), else by its cross-attention context width; None when the
    file does not say."""
    if any(k.startswith("label_emb.") for k in state_dict):
        return family_name(0, reads_vector=True)
    key = next((k for k in state_dict if re.search(r"attn2\.to_k\.(down|weight)$", k)), None)
    return None if key is None else family_name(int(state_dict[key].shape[1]))


def control_lora_config(state_dict: Mapping[str, torch.Tensor], unet: UNetConfig, source: str) -> ControlNetConfig:
    """The ControlNet a Control-LoRA file rebuilds on a base UNet of config ``unet``: that UNet's
    encoder, the file's hint encoder (its input channels and stage widths)."""
    hint = sorted((int(m[1]), k) for k in state_dict if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    if not hint:
        raise CheckpointError(f"{source}: a Control-LoRA without its hint encoder (input_hint_block.*)")
    convs = [state_dict[k] for _, k in hint]
    # Stage 0's width is conv 0's output; each later stage's, that of its stride-2 conv (4, 8, ...).
    widths = tuple(int(convs[2 * stage].shape[0]) for stage in range(len(convs) // 2))
    try:
        return ControlNetConfig(unet=unet, hint_channels=int(convs[0].shape[1]), hint_block_channels=widths)
    except (ValueError, IndexError) as error:
        raise CheckpointError(f"{source}: not a usable Control-LoRA ({first_line(error)})") from None


def control_lora_weights(
    state_dict: Mapping[str, torch.Tensor],
    unet: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype = torch.float32,
) -> StateDict:
    """The ControlNet's weights: ``expected`` (the ControlNet's state dict, for its names and
    shapes; meta tensors do) filled from the Control-LoRA ``state_dict`` and the base ``unet``'s
    state dict, as the module docstring says, in ``dtype``.

    One-line ``CheckpointError`` for a file that does not fit: a tensor that is neither a weight of
    the ControlNet nor half of a low-rank pair, a pair without its other half or without the
    UNet weight it changes, shapes that do not make that weight, a ControlNet weight nobody gives.
    """
    pairs = {k.rsplit(".", 1)[0] for k in state_dict if k.endswith((".up", ".down"))}
    unknown = [k for k in state_dict if k != MARKER and k not in expected and _changed(k) not in expected]
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} tensors of this Control-LoRA fit no ControlNet weight: {short_list(unknown)}"
        )
    weights: StateDict = {}
    missing = []
    for key, like in expected.items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in pairs:
            weights[key] = _merged(state_dict, unet, layer, like.shape, source).to(dtype)
        elif key in state_dict:
            weights[key] = state_dict[key].to(dtype)
        elif key in unet and key.startswith(ENCODER_PREFIXES):
            weights[key] = unet[key].to(dtype, copy=True)  # a copy: the ControlNet must not share the UNet's
        else:
            missing.append(key)
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} ControlNet weights are neither in this Control-LoRA nor in the base UNet: "
            f"{short_list(missing)}"
        )
    return weights


def _changed(key: str) -> str | None:
    """The weight a low-rank half (``<layer>.up``, ``<layer>.down``) changes; None for other keys."""
    layer, _, half = key.rpartition(".")
    return f"{layer}.weight" if half in ("up", "down") else None


def _merged(
    state_dict: Mapping[str, torch.Tensor],
    unet: Mapping[str, torch.Tensor],
    layer: str,
    shape: torch.Size,
    source: str,
) -> torch.Tensor:
    """``layer``'s weight: its base (the file's full tensor if it has one, else the UNet's) plus
    ``up @ down``, in float32."""
    up, down = state_dict.get(f"{layer}.up"), state_dict.get(f"{layer}.down")
    if up is None or down is None:
        raise CheckpointError(f"{source}: {layer} has only one half of its low-rank pair (.up and .down)")
    base = state_dict.get(f"{layer}.weight", unet.get(f"{layer}.weight"))
    if base is None:
        raise CheckpointError(f"{source}: {layer}.up/.down change a weight the base UNet does not have")
    up, down = up.flatten(1), down.flatten(1)
    rank = up.shape[1]
    if base.shape != shape or down.shape[0] != rank or (up.shape[0], down.shape[1]) != (shape[0], shape[1:].numel()):
        raise CheckpointError(
            f"{source}: {layer}: up {list(up.shape)} @ down {list(down.shape)} does not make the base weight "
            f"{list(base.shape)} (the ControlNet's {list(shape)}); is this Control-LoRA made for this base model?"
        )
    return base.float() + (up.float() @ down.float()).reshape(shape)

"""What a model file holds: its layout (`detect_format`, `inspect_contents`), the configuration
of a file that does not store its own, read off its tensors' shapes (a preset of ``config.PRESETS``
from the widths of the first convolution and of the cross-attention keys), and whether a ControlNet
fits a base model (`check_compatible`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import PRESETS, SD21, SD21_V, ControlNetConfig, ModelConfig, UNetConfig, preset_for
from .errors import CheckpointError, first_line, short_list
from .ldm import CONTROL_PREFIX, UNET_PREFIX
from .t2i_adapter import detect_adapter_layout
from .tensors import StateDict, read_keys


def detect_format(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike | None = None) -> str:
    """Name the layout of a state dict:

    ``ldm`` (a base model, maybe with ``control_model.*``), ``ldm-control`` (``control_model.*``
    only), ``ldm-control-bare`` (ControlNet keys without prefix), ``diffusers-controlnet``. An
    error names ``source`` (the file) when given.
    """
    keys = state_dict.keys()
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "ldm"
    if any(k.startswith(CONTROL_PREFIX) for k in keys):
        return "ldm-control"
    if "input_hint_block.0.weight" in keys:
        return "ldm-control-bare"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers-controlnet"
    raise CheckpointError(
        ("" if source is None else f"{source}: ")
        + "unrecognised weights: neither an LDM model (model.diffusion_model.*), an LDM ControlNet "
        f"(control_model.* / input_hint_block.*) nor a diffusers ControlNet; first keys: {short_list(keys)}"
    )


@dataclasses.dataclass(frozen=True)
class Contents:
    """What a model file or folder holds."""

    format: str  # as detect_format, "diffusers-pipeline" / "diffusers-controlnet" for folders, or "*-adapter"
    has_base: bool  # a UNet, VAE and text encoder
    has_controlnet: bool
    has_adapter: bool = False  # a T2I-Adapter (alone: a file holds no other model with it)


def inspect_contents(path: str | os.PathLike) -> Contents:
    """Tell what ``path`` holds, reading only key names where the format allows (safetensors)."""
    path = Path(path)
    if path.is_dir():
        if (path / "unet").is_dir():
            return Contents("diffusers-pipeline", True, (path / "controlnet").is_dir())
        if (path / "config.json").is_file():
            if _diffusers_class(path / "config.json") in ("T2IAdapter", "MultiAdapter"):
                return Contents("diffusers-adapter", False, False, True)
            return Contents("diffusers-controlnet", False, True)
        raise CheckpointError(f"{path}: a folder that is neither a diffusers pipeline nor a diffusers ControlNet")
    keys = read_keys(path)
    try:
        fmt = detect_format(dict.fromkeys(keys), path)
    except CheckpointError as not_a_controlnet:
        try:
            layout = detect_adapter_layout(dict.fromkeys(keys), str(path))
        except CheckpointError:
            raise not_a_controlnet from None
        return Contents(f"{layout}-adapter", False, False, True)
    has_control = fmt != "ldm" or any(k.startswith(CONTROL_PREFIX) for k in keys)
    return Contents(fmt, fmt == "ldm", has_control)


def _diffusers_class(config_json: Path) -> str | None:
    """The ``_class_name`` a diffusers config.json names, if it can be read."""
    try:
        value = json.loads(config_json.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------
# Configurations read off the shapes, for files that do not store theirs


def preset_from_shapes(unet: Mapping[str, torch.Tensor], source: str) -> ModelConfig:
    """The preset a UNet or ControlNet state dict (LDM keys, no prefix) was made for, from the
    width of its first convolution and of its cross-attention keys."""
    model_channels = _size(unet, "input_blocks.0.0.weight", 0, source)
    context_key = next((k for k in unet if k.endswith("attn2.to_k.weight")), None)
    if context_key is None:
        raise CheckpointError(f"{source}: cannot tell the model: no cross-attention weights (attn2.to_k)")
    context_dim = _size(unet, context_key, 1, source)
    in_channels = _size(unet, "input_blocks.0.0.weight", 1, source)
    found = preset_for(model_channels, context_dim, in_channels)
    if found is None:
        known = ", ".join(
            f"{c.name} ({c.unet.model_channels}, {c.unet.context_dim}, {c.unet.in_channels})" for c in PRESETS.values()
        )
        raise CheckpointError(
            f"{source}: unrecognised model: model_channels={model_channels}, context_dim={context_dim}, "
            f"latent channels={in_channels}; known: {known}"
        )
    return found


def _size(tensors: Mapping[str, torch.Tensor], key: str, dim: int, source: str) -> int:
    """``tensors[key].shape[dim]``, or a one-line error when the file lacks that key or dimension."""
    tensor = tensors.get(key)
    if tensor is None:
        raise CheckpointError(f"{source}: cannot tell the model: no {key}")
    if tensor.ndim <= dim:
        raise CheckpointError(f"{source}: {key} has shape {list(tensor.shape)}, not that of a Stable Diffusion model")
    return int(tensor.shape[dim])


def base_config_from_shapes(parts: Mapping[str, StateDict], prediction: str | None, path: Path) -> ModelConfig:
    """The preset of an LDM base model's parts (`ldm.split_ldm`); an SD 2.x model must have its
    prediction type named (``prediction``, or a ``.yaml`` beside the file)."""
    config = preset_from_shapes(parts["unet"], str(path))
    if config.name == "sd21":
        prediction = prediction or _prediction_from_yaml(path)
        if prediction is None:
            raise CheckpointError(
                f"{path}: an SD 2.x model; its eps (512 px) and v-prediction (768 px) versions have the same "
                "weights' shapes: say which with prediction='eps' or 'v' (command line: --prediction eps|v)"
            )
    return with_prediction(config, prediction)


def with_prediction(config: ModelConfig, prediction: str | None) -> ModelConfig:
    """``config`` with the prediction type named; SD 2.x v models are the 768 px ``sd21-v`` preset."""
    if prediction is None or prediction == config.schedule.prediction:
        return config
    if prediction not in ("eps", "v"):
        raise CheckpointError(f"unknown prediction type {prediction!r}; choose 'eps' or 'v'")
    if config.unet == SD21_V.unet and prediction == "v":
        return SD21_V
    if config.unet == SD21.unet and prediction == "eps":
        return SD21
    return config.replace(schedule=dataclasses.replace(config.schedule, prediction=prediction))


def _prediction_from_yaml(path: Path) -> str | None:
    """The convention of the original repo and AUTOMATIC1111: a ``model.yaml`` beside
    ``model.safetensors`` whose ``parameterization: "v"`` marks a v-prediction model."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(errors="replace")
    return "v" if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.MULTILINE) else "eps"


def controlnet_config_from_shapes(control: Mapping[str, torch.Tensor], source: str) -> ControlNetConfig:
    """The configuration of an LDM-layout ControlNet (keys without prefix)."""
    base = preset_from_shapes(control, source)
    hint_channels = _size(control, "input_hint_block.0.weight", 1, source)
    # Stage 0's width is conv 0's output; each later stage's, that of its stride-2 conv (4, 8, ...).
    convs = sum(1 for key in control if re.fullmatch(r"input_hint_block\.\d+\.weight", key))
    widths = tuple(_size(control, f"input_hint_block.{4 * stage}.weight", 0, source) for stage in range(convs // 2))
    # The 1.1 shuffle model pools its residuals; nothing in its shapes says so, only its name
    # (the original ships a separate yaml; the AUTOMATIC1111 extension also goes by the name).
    pooling = "shuffle" in Path(source).name.lower()
    return _controlnet_config(base.unet, hint_channels, widths, pooling, source)


def _controlnet_config(
    unet: UNetConfig, hint_channels: int, widths: tuple[int, ...], pooling: bool, source: str
) -> ControlNetConfig:
    try:
        return ControlNetConfig(
            unet=unet, hint_channels=hint_channels, hint_block_channels=widths, global_average_pooling=pooling
        )
    except ValueError as error:  # widths of 0 in a file whose header lies
        raise CheckpointError(f"{source}: not a usable ControlNet ({first_line(error)})") from None


def diffusers_controlnet_config_from_shapes(
    state_dict: Mapping[str, torch.Tensor], base: ModelConfig | None, source: str
) -> ControlNetConfig:
    """The configuration of a single diffusers-layout ControlNet file, which has no config.json:
    ``base``'s UNet when the widths match it, else that of the preset with those widths."""
    # The hint encoder's widths: conv_in's, then each stride-2 block's (1, 3, 5, ...).
    blocks = sum(1 for key in state_dict if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", key))
    names = ["conv_in.weight", "controlnet_cond_embedding.conv_in.weight"] + [
        f"controlnet_cond_embedding.blocks.{2 * stage - 1}.weight" for stage in range(1, blocks // 2 + 1)
    ]
    missing = [n for n in names if n not in state_dict]
    context_key = next((k for k in state_dict if k.endswith("attn2.to_k.weight")), None)
    if missing or context_key is None:
        raise CheckpointError(
            f"{source}: not a Stable Diffusion ControlNet in diffusers layout "
            f"(no {short_list(missing or ['attn2.to_k'])})"
        )
    model_channels, context_dim = _size(state_dict, names[0], 0, source), _size(state_dict, context_key, 1, source)
    in_channels = _size(state_dict, names[0], 1, source)
    shapes = (model_channels, context_dim, in_channels)
    found = (
        base
        if base is not None and (base.unet.model_channels, base.unet.context_dim, base.unet.in_channels) == shapes
        else preset_for(*shapes)
    )
    if found is None:
        raise CheckpointError(
            f"{source}: unrecognised ControlNet (model_channels={model_channels}, context_dim={context_dim})"
        )
    return _controlnet_config(
        found.unet,
        _size(state_dict, names[1], 1, source),
        tuple(_size(state_dict, n, 0, source) for n in names[1:]),
        "shuffle" in Path(source).name.lower(),
        source,
    )


# ---------------------------------------------------------------------------------------------
# Which base a ControlNet fits


def check_compatible(control: ControlNetConfig, base: ModelConfig, source: str) -> None:
    """Refuse a ControlNet whose encoder copy does not match the base UNet (another SD family), or
    whose hint encoder does not bring the condition image to the base's latent size."""
    if control.unet == base.unet:
        if control.hint_downsample_factor != base.vae.downsample_factor:
            raise CheckpointError(
                f"{source}: this ControlNet's hint encoder shrinks images {control.hint_downsample_factor}x "
                f"but the base model's VAE {base.vae.downsample_factor}x; use a ControlNet trained for this base"
            )
        return
    family = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
    made_for = family.get(control.unet.context_dim, f"a model with context {control.unet.context_dim}")
    base_family = family.get(base.unet.context_dim, f"a model with context {base.unet.context_dim}")
    if made_for == base_family:  # same family name: say what differs
        theirs, ours = dataclasses.asdict(control.unet), dataclasses.asdict(base.unet)
        differences = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in theirs if theirs[k] != ours[k])
        raise CheckpointError(f"{source}: this ControlNet's UNet does not match the base model's ({differences})")
    raise CheckpointError(
        f"{source}: this ControlNet was made for {made_for} but the base model is {base_family} ({base.name}); "
        "use a ControlNet trained for this base"
    )

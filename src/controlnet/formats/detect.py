"""What a model file holds: its layout (`detect_format`, `inspect_contents`), the configuration
of a file that does not store its own, read off its tensors' shapes (a preset of ``config.PRESETS``
from the widths of the first convolution and of the cross-attention keys), and whether a ControlNet
fits a base model (`check_compatible`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..config import PRESETS, SD21, SD21_V, ControlNetConfig, ModelConfig, UNetConfig, UnionConfig, preset_for
from .control_lora import is_control_lora
from .errors import CheckpointError, first_line, short_list
from .ldm import CONTROL_PREFIX, UNET_PREFIX
from .t2i_adapter import detect_adapter_layout
from .tensors import StateDict, read_keys


def detect_format(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike | None = None) -> str:
    """Name the layout of a state dict:

    ``ldm`` (a base model, maybe with ``control_model.*``), ``ldm-control`` (``control_model.*``
    only), ``ldm-control-bare`` (ControlNet keys without prefix), ``diffusers-controlnet``,
    ``control-lora`` (Stability's Control-LoRA: ``lora_controlnet``). An error names ``source``
    (the file) when given.
    """
    keys = state_dict.keys()
    if is_control_lora(keys):
        return "control-lora"
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


def controlnet_config_from_shapes(
    control: Mapping[str, torch.Tensor], source: str, base: ModelConfig | None = None
) -> ControlNetConfig:
    """The configuration of an LDM-layout ControlNet (keys without prefix): the preset (``base``
    when it fits) with the transformers the file's own keys hold (`_encoder_from_keys`)."""
    found = _control_preset(control, "input_blocks.0.0.weight", "label_emb.0.0.weight", base, source)
    n = found.unet.num_res_blocks
    unet = _encoder_from_keys(
        control, found.unet, lambda level: f"input_blocks.{1 + level * (n + 1)}.1", "middle_block.1", source
    )
    hint_channels = _size(control, "input_hint_block.0.weight", 1, source)
    # Stage 0's width is conv 0's output; each later stage's, that of its stride-2 conv (4, 8, ...).
    convs = sum(1 for key in control if re.fullmatch(r"input_hint_block\.\d+\.weight", key))
    widths = tuple(_size(control, f"input_hint_block.{4 * stage}.weight", 0, source) for stage in range(convs // 2))
    # The 1.1 shuffle model pools its residuals; nothing in its shapes says so, only its name
    # (the original ships a separate yaml; the AUTOMATIC1111 extension also goes by the name).
    pooling = "shuffle" in Path(source).name.lower()
    return _controlnet_config(unet, hint_channels, widths, pooling, union_from_shapes(control, source), source)


def _controlnet_config(
    unet: UNetConfig,
    hint_channels: int,
    widths: tuple[int, ...],
    pooling: bool,
    union: UnionConfig | None,
    source: str,
) -> ControlNetConfig:
    try:
        return ControlNetConfig(
            unet=unet,
            hint_channels=hint_channels,
            hint_block_channels=widths,
            global_average_pooling=pooling,
            union=union,
        )
    except ValueError as error:  # widths of 0 in a file whose header lies
        raise CheckpointError(f"{source}: not a usable ControlNet ({first_line(error)})") from None


def union_from_shapes(state_dict: Mapping[str, torch.Tensor], source: str) -> UnionConfig | None:
    """xinsir's union model's parts, when a ControlNet file has them (``task_embedding``: one row per
    control type, the AUTOMATIC1111 extension's ``num_control_type``); same names in both layouts.
    The condition transformer's head count is not in the shapes: xinsir's 8."""
    if "task_embedding" not in state_dict:
        return None
    types = _size(state_dict, "task_embedding", 0, source)
    layers = len({m[1] for k in state_dict if (m := re.match(r"transformer_layes\.(\d+)\.", k))})
    try:
        return UnionConfig(control_types=types, layers=layers)
    except ValueError as error:
        raise CheckpointError(f"{source}: not a usable union ControlNet ({first_line(error)})") from None


def _control_preset(
    state: Mapping[str, torch.Tensor], conv_in: str, label_emb: str, base: ModelConfig | None, source: str
) -> ModelConfig:
    """The preset a ControlNet was made for: ``base`` when its widths, context and vector y fit, else
    the preset that has them. Without cross-attention weights (diffusers' SDXL -small ControlNet has
    none) the context is not in the file: the preset is told by the vector y's width."""
    model_channels, in_channels = _size(state, conv_in, 0, source), _size(state, conv_in, 1, source)
    context_key = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    context = None if context_key is None else _size(state, context_key, 1, source)
    adm = _size(state, label_emb, 1, source) if label_emb in state else None

    def fits(unet: UNetConfig) -> bool:
        same = (unet.model_channels, unet.in_channels, unet.adm_in_channels) == (model_channels, in_channels, adm)
        return same and context in (None, unet.context_dim)

    if base is not None and fits(base.unet):
        return base
    found = next((c for c in PRESETS.values() if fits(c.unet) and (context is not None or adm is not None)), None)
    if found is None:
        raise CheckpointError(
            f"{source}: unrecognised ControlNet (model_channels={model_channels}, context_dim={context}, "
            f"latent channels={in_channels}, vector y={adm})"
        )
    return found


def _encoder_from_keys(
    state: Mapping[str, torch.Tensor],
    unet: UNetConfig,
    level_attention: Callable[[int], str],
    middle_attention: str,
    source: str,
) -> UNetConfig:
    """``unet`` with the transformers a ControlNet file holds: which levels have them (a ``proj_in``
    at ``level_attention(level)``, the level's first block's) and how many blocks each
    (``transformer_blocks.N``), the middle one's at ``middle_attention``. diffusers' SDXL ControlNets
    differ here from their base: -mid has a 1-block transformer at the last level only, -small
    none, and a middle transformer of norm and projections only (AUTOMATIC1111's and ComfyUI's
    ``SDXL_mid_cnet``/``SDXL_small_cnet``). A file without the middle transformer (every ControlNet
    has one) is not read for it: ``unet`` as it is, and strict loading lists what the file lacks."""

    def blocks(prefix: str) -> int:
        return len({m[1] for k in state if (m := re.match(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.", k))})

    if f"{middle_attention}.proj_in.weight" not in state:
        return unet
    levels = range(len(unet.channel_mult))
    attention = [level for level in levels if f"{level_attention(level)}.proj_in.weight" in state]
    depth = [blocks(level_attention(level)) if level in attention else 0 for level in levels]
    middle = blocks(middle_attention)
    if depth[-1] != middle and levels[-1] in attention:
        raise CheckpointError(
            f"{source}: the last level's transformers have {depth[-1]} blocks, the middle one {middle}; not supported"
        )
    depth[-1] = middle
    try:
        return dataclasses.replace(
            unet, attention_resolutions=tuple(2**level for level in attention), transformer_depth=tuple(depth)
        )
    except ValueError as error:
        raise CheckpointError(f"{source}: not a usable ControlNet ({first_line(error)})") from None


def diffusers_controlnet_config_from_shapes(
    state_dict: Mapping[str, torch.Tensor], base: ModelConfig | None, source: str
) -> ControlNetConfig:
    """The configuration of a single diffusers-layout ControlNet file, which has no config.json:
    ``base``'s UNet when the widths match it, else that of the preset with those widths, with the
    transformers the file holds (full, -mid and -small SDXL ControlNets) and the union model's parts."""
    # The hint encoder's widths: conv_in's, then each stride-2 block's (1, 3, 5, ...).
    blocks = sum(1 for key in state_dict if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", key))
    names = ["conv_in.weight", "controlnet_cond_embedding.conv_in.weight"] + [
        f"controlnet_cond_embedding.blocks.{2 * stage - 1}.weight" for stage in range(1, blocks // 2 + 1)
    ]
    missing = [n for n in names if n not in state_dict]
    has_context = any(k.endswith("attn2.to_k.weight") for k in state_dict)
    if missing or not (has_context or "add_embedding.linear_1.weight" in state_dict):
        raise CheckpointError(
            f"{source}: not a Stable Diffusion ControlNet in diffusers layout "
            f"(no {short_list(missing or ['attn2.to_k'])})"
        )
    found = _control_preset(state_dict, names[0], "add_embedding.linear_1.weight", base, source)
    unet = _encoder_from_keys(
        state_dict, found.unet, lambda level: f"down_blocks.{level}.attentions.0", "mid_block.attentions.0", source
    )
    return _controlnet_config(
        unet,
        _size(state_dict, names[1], 1, source),
        tuple(_size(state_dict, n, 0, source) for n in names[1:]),
        "shuffle" in Path(source).name.lower(),
        union_from_shapes(state_dict, source),
        source,
    )


# ---------------------------------------------------------------------------------------------
# Which base a ControlNet fits


# What a ControlNet's encoder copy must share with the base UNet: its residuals go into the base's
# skip connections (the widths and levels), it reads the same latents, text context and vector y.
# Its transformers are its own: diffusers' SDXL -mid and -small ControlNets have fewer than their base.
_SHARED_WITH_BASE = (
    "in_channels",
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "context_dim",
    "adm_in_channels",
)


def check_compatible(control: ControlNetConfig, base: ModelConfig, source: str) -> None:
    """Refuse a ControlNet whose encoder copy does not fit the base UNet (another SD family), or
    whose hint encoder does not bring the condition image to the base's latent size."""
    theirs, ours = dataclasses.asdict(control.unet), dataclasses.asdict(base.unet)
    if all(theirs[k] == ours[k] for k in _SHARED_WITH_BASE):
        if control.hint_downsample_factor != base.vae.downsample_factor:
            raise CheckpointError(
                f"{source}: this ControlNet's hint encoder shrinks images {control.hint_downsample_factor}x "
                f"but the base model's VAE {base.vae.downsample_factor}x; use a ControlNet trained for this base"
            )
        return
    made_for, base_family = control.unet.family, base.unet.family
    if made_for == base_family:  # same family name: say what differs
        differences = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in _SHARED_WITH_BASE if theirs[k] != ours[k])
        raise CheckpointError(f"{source}: this ControlNet's UNet does not match the base model's ({differences})")
    raise CheckpointError(
        f"{source}: this ControlNet was made for {made_for} but the base model is {base_family} ({base.name}); "
        "use a ControlNet trained for this base"
    )

"""The original (LDM) single-file layout: one file holds every model under its own prefix.

Read: ``.safetensors`` and ``.ckpt`` base models, with or without a ``state_dict`` wrapper,
``model_ema.*`` and schedule buffers, with or without ``position_ids`` (`split_ldm`); SDXL files
(``sd_xl_base_1.0.safetensors``: the text encoders under ``conditioner.embedders.0/1.``); ControlNet 1.0
full files (base + ``control_model.*``), 1.1 control-only files, and control files whose keys lack
the ``control_model.`` prefix (`control_part`). Written: `save_ldm`, safetensors only, with the
models' configurations in the file's metadata so that models of no preset load without guessing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import (
    ControlNetConfig,
    ModelConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    UnionConfig,
    VAEConfig,
)
from ..models.controlnet import ControlNet
from ..models.stable_diffusion import StableDiffusion
from ..models.text import is_position_ids_key, position_ids_entries
from .errors import CheckpointError, first_line, short_list
from .tensors import StateDict, save_safetensors

# Where each model lives in an LDM file.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
CONDITIONER_PREFIX = "conditioner."  # SDXL (sgm's GeneralConditioner): embedders.0 CLIP-L, embedders.1 OpenCLIP-G
CONTROL_PREFIX = "control_model."

# Keys of LDM files that no model here reads: the training schedule (recomputed from the config,
# ScheduleConfig) and bookkeeping. EMA weights are read only on request (``use_ema``).
_SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
# Keys of a model's part that are training leftovers, not weights: the VAE's loss (discriminator,
# LPIPS) in checkpoints saved while training the autoencoder.
_TRAINING_LEFTOVERS = ("first_stage_model.loss.",)
# Where our files keep the models' configurations (safetensors metadata).
CONFIG_METADATA_KEY = "controlnet.config"  # the base model's ModelConfig, as JSON
CONTROL_METADATA_KEY = "controlnet.control_config"  # the ControlNet's ControlNetConfig, as JSON


def split_ldm(state_dict: Mapping[str, torch.Tensor], use_ema: bool = False) -> dict[str, StateDict]:
    """Split an LDM file into ``unet``, ``vae``, ``text``, ``control`` parts (prefixes removed).

    The text part is ``cond_stage_model.*`` (SD 1.x, 2.x) or ``conditioner.*`` (SDXL), whose keys
    our models carry as they are. With ``use_ema`` the UNet weights come from ``model_ema.*`` (where
    the original stores the EMA copy under the parameter names with the dots removed). Unknown keys
    raise ``CheckpointError``.
    """
    parts: dict[str, StateDict] = {"unet": {}, "vae": {}, "text": {}, "control": {}}
    prefixes = (
        ("unet", UNET_PREFIX),
        ("vae", VAE_PREFIX),
        ("text", TEXT_PREFIX),
        ("text", CONDITIONER_PREFIX),
        ("control", CONTROL_PREFIX),
    )
    unknown = []
    for key, tensor in state_dict.items():
        if key.startswith(_TRAINING_LEFTOVERS):
            continue
        found = next(((name, prefix) for name, prefix in prefixes if key.startswith(prefix)), None)
        if found is not None:
            parts[found[0]][key[len(found[1]) :]] = tensor
        elif not (key in _SCHEDULE_BUFFERS or key.startswith("model_ema.")):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected keys outside any model: {short_list(unknown)}")
    parts["text"] = _normalise_clip_keys(parts["text"])
    if use_ema:
        parts["unet"] = _ema_weights(state_dict, parts["unet"])
    return parts


def _normalise_clip_keys(text: StateDict) -> StateDict:
    """CLIP text encoder keys (SD 1.x's, SDXL's ``embedders.0.``) as our CLIPTextEncoder names them.

    Files differ on whether they store position_ids (an arange, sometimes saved as floats): never
    a weight, dropped. Older and merged files name the weights ``transformer.embeddings...``
    without ``text_model.`` (an earlier transformers layout): the prefix is put back.
    """
    for under in ("", "embedders.0."):
        old, new = under + "transformer.", under + "transformer.text_model."
        if any(k.startswith(old) for k in text) and not any(k.startswith(new) for k in text):
            text = {new + k.removeprefix(old) if k.startswith(old) else k: v for k, v in text.items()}
    return {k: v for k, v in text.items() if not is_position_ids_key(k)}


def _ema_weights(state_dict: Mapping[str, torch.Tensor], unet: StateDict) -> StateDict:
    ema = {}
    for key in unet:
        ema_key = "model_ema." + ("diffusion_model." + key).replace(".", "")
        if ema_key not in state_dict:
            raise CheckpointError(f"use_ema asked for, but the file has no EMA weights ({ema_key} missing)")
        ema[key] = state_dict[ema_key]
    return ema


def control_part(state_dict: StateDict, fmt: str, path: Path) -> StateDict:
    """The ``control_model.*`` weights (prefix removed) of an LDM-layout file."""
    if "difference" in state_dict:
        raise CheckpointError(
            f"{path}: a 'diff' ControlNet (weights stored as differences from its base model); "
            "not supported: use the full or control-only version of this ControlNet"
        )
    if fmt == "ldm-control-bare":
        return dict(state_dict)
    control = {k[len(CONTROL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    if not control:
        raise CheckpointError(f"{path}: a base model without a ControlNet (no control_model.* keys)")
    if fmt == "ldm-control":  # a control-only file: nothing else but schedule buffers may be there
        others = [k for k in state_dict if not k.startswith(CONTROL_PREFIX) and k not in _SCHEDULE_BUFFERS]
        if others:
            raise CheckpointError(f"{path}: {len(others)} unexpected keys beside control_model.*: {short_list(others)}")
    return control


def ldm_state_dict(
    model: StableDiffusion | None = None, controlnet: ControlNet | None = None
) -> dict[str, torch.Tensor]:
    """The LDM-layout state dict of a base model and/or a ControlNet (as the original files)."""
    tensors: dict[str, torch.Tensor] = {}
    if model is not None:
        tensors.update({UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()})
        tensors.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
        text = text_prefix(model.config)
        tensors.update({text + k: v for k, v in model.text_encoder.state_dict().items()})
        # The original CLIP embedders store position_ids (transformers 4.x's persistent buffer); the
        # files people have mostly do too (SD 1.x's, SDXL's embedder 0).
        tensors.update({text + k: v for k, v in position_ids_entries(model.text_encoder).items()})
    if controlnet is not None:
        tensors.update({CONTROL_PREFIX + k: v for k, v in controlnet.state_dict().items()})
    return tensors


def text_prefix(config: ModelConfig) -> str:
    """Where a base model's text encoders live in its LDM file."""
    return CONDITIONER_PREFIX if config.text_2 is not None else TEXT_PREFIX


def save_ldm(
    path: str | os.PathLike, model: StableDiffusion | None = None, controlnet: ControlNet | None = None
) -> Path:
    """Write a base model and/or a ControlNet as one ``.safetensors`` file in the LDM layout.

    A ControlNet alone gives a 1.1-style control-only file (``control_model.*``). The model
    configuration goes into the file's metadata so that non-preset models load without guessing.
    """
    if model is None and controlnet is None:
        raise ValueError("nothing to save: give a model, a ControlNet or both")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LDM files are written as .safetensors only")
    check_file_output(path)
    metadata = {}
    if model is not None:
        metadata[CONFIG_METADATA_KEY] = _config_to_json(model.config)
    if controlnet is not None:
        metadata[CONTROL_METADATA_KEY] = _config_to_json(controlnet.config)
    save_safetensors(ldm_state_dict(model, controlnet), path, metadata)
    return path


def check_file_output(path: Path) -> None:
    """Refuse to write a weights file where a folder is (a file is never written over a folder)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: an existing folder; a .safetensors file is written there: choose another path")


# ---------------------------------------------------------------------------------------------
# The configurations our files store, as JSON in the safetensors metadata


def _config_to_json(config: object) -> str:
    return json.dumps({"type": type(config).__name__, **dataclasses.asdict(config)}, sort_keys=True)


def _config_from_json(text: str) -> ModelConfig | ControlNetConfig:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    kind = data.pop("type", None)
    if kind == "ModelConfig":
        return ModelConfig(
            name=data["name"],
            unet=_dataclass_from_dict(UNetConfig, data["unet"]),
            vae=_dataclass_from_dict(VAEConfig, data["vae"]),
            text=_dataclass_from_dict(TextEncoderConfig, data["text"]),
            schedule=_dataclass_from_dict(ScheduleConfig, data["schedule"]),
            control_hint_block_channels=tuple(data["control_hint_block_channels"]),
            native_resolution=data["native_resolution"],
            text_2=None if data.get("text_2") is None else _dataclass_from_dict(TextEncoderConfig, data["text_2"]),
        )
    if kind == "ControlNetConfig":
        union = data.get("union")
        return ControlNetConfig(
            unet=_dataclass_from_dict(UNetConfig, data["unet"]),
            hint_channels=data["hint_channels"],
            hint_block_channels=tuple(data["hint_block_channels"]),
            global_average_pooling=data["global_average_pooling"],
            union=None if union is None else _dataclass_from_dict(UnionConfig, union),
        )
    raise ValueError(f"unknown configuration type {kind!r}")


def _dataclass_from_dict(cls, data: Mapping[str, object]):
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def stored_config(
    metadata: Mapping[str, str], source: str, key: str = CONFIG_METADATA_KEY
) -> ModelConfig | ControlNetConfig | None:
    """The configuration a file's metadata stores under ``key``; None when it stores none."""
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return _config_from_json(text)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{source}: its stored model configuration is invalid ({first_line(error)})") from None

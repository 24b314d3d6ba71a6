"""Models from files: `load_base` and `load_controlnet`, for every format people have, strictly.

Read (``formats/``): LDM single files (``.safetensors``, ``.ckpt``), with or without a
``state_dict`` wrapper, ``model_ema.*`` and schedule buffers; ControlNet 1.0 full files (base +
``control_model.*``), 1.1 control-only files (``.pth``, ``.safetensors``) and control files whose
keys lack the ``control_model.`` prefix; diffusers folders (``unet/``, ``vae/``, ``text_encoder/``,
``controlnet/``) and single diffusers-layout ControlNet ``.safetensors`` files. SDXL base models in
both layouts (``sd_xl_base_1.0.safetensors``; folders with ``text_encoder_2/``). `load_adapter`:
T2I-Adapters (TencentARC's ``.pth`` files, diffusers folders and files; ``formats/t2i_adapter``).
`load_vae`: a VAE alone, in place of a base model's (SDXL's fp16-fix VAE, SD's ft-MSE VAE).
`load_taesd`: TAESD, the tiny autoencoder (``taesd_decoder.pth`` and ``taesd_encoder.pth``,
diffusers' ``AutoencoderTiny`` folders; ``formats/taesd``).

Safety (``formats/tensors``): safetensors first; pickles only through
``torch.load(weights_only=True)``; weights holding NaN or infinite values are refused. Strictness
(`load_strict`): every key of every model must be matched, and what does not match is listed with
the file name and the detected format. A ControlNet made for another base family is refused
(`check_compatible`). Any file that is not what it claims to be gives a one-line
``CheckpointError`` naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import ControlNetConfig, ModelConfig, VAEConfig
from .formats import control_lora, diffusers, diffusers_vae, ldm, t2i_adapter, taesd
from .formats.detect import (
    base_config_from_shapes,
    check_compatible,
    controlnet_config_from_shapes,
    detect_format,
    with_prediction,
)
from .formats.errors import CheckpointError, first_line, short_list
from .formats.tensors import StateDict, check_finite, read_state_dict
from .models.controlnet import ControlNet
from .models.controlnet_union import build_controlnet
from .models.stable_diffusion import StableDiffusion, build_empty
from .models.t2i_adapter import T2IAdapter, build_adapter
from .models.taesd import TinyAutoencoder
from .models.unet import UNet
from .models.vae import AutoencoderKL

__all__ = [
    "CheckpointError",
    "check_compatible",
    "load_adapter",
    "load_base",
    "load_controlnet",
    "load_strict",
    "load_taesd",
    "load_vae",
    "transfer_control",
]


def load_base(
    path: str | os.PathLike,
    *,
    prediction: str | None = None,
    use_ema: bool = False,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusion:
    """A Stable Diffusion model from an LDM single file or a diffusers folder.

    ``prediction`` ("eps" or "v") overrides what the file says or implies: SD 2.x eps and v models
    have the same shapes, so a v model from an LDM file without our metadata must be named.
    """
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_base(path, prediction=prediction, dtype=dtype)
    state_dict, metadata = read_state_dict(path)
    fmt = detect_format(state_dict, path)
    if fmt != "ldm":
        raise CheckpointError(f"{path}: holds a ControlNet only ({fmt}), not a base model; pass it as a ControlNet")
    try:
        parts = ldm.split_ldm(state_dict, use_ema=use_ema)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    base_prefixes = (ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.TEXT_PREFIX, ldm.CONDITIONER_PREFIX)
    base_prefixes += ("model_ema.",) if use_ema else ()
    check_finite({k: v for k, v in state_dict.items() if k.startswith(base_prefixes)}, path)
    config = ldm.stored_config(metadata, str(path))
    if isinstance(config, ModelConfig):
        config = with_prediction(config, prediction)
    else:
        config = base_config_from_shapes(parts, prediction, path)
    model = StableDiffusion(config, empty=True)
    source = f"{path.name} (ldm, {config.name})"
    load_strict(model.unet, parts["unet"], "UNet", source)
    load_strict(model.vae, parts["vae"], "VAE", source)
    load_strict(model.text_encoder, parts["text"], "text encoder", source)
    return model.to(dtype)


def _load_diffusers_base(folder: Path, *, prediction: str | None, dtype: torch.dtype) -> StableDiffusion:
    config = diffusers.read_pipeline_config(folder, prediction)
    model = StableDiffusion(config, empty=True)
    parts = (("unet", model.unet, "UNet"), ("vae", model.vae, "VAE"), ("text", model.text_encoder, "text encoder"))
    for part, module, what in parts:
        weights = diffusers.read_pipeline_part(folder, part, config)
        load_strict(module, weights, what, f"{folder.name}/{diffusers.PIPELINE_FOLDERS[part]} (diffusers)")
    return model.to(dtype)


def load_controlnet(
    path: str | os.PathLike,
    base: ModelConfig | None = None,
    *,
    unet: UNet | None = None,
    global_average_pooling: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> ControlNet:
    """A ControlNet from any of the formats in the module docstring (an SDXL union model as a
    `UnionControlNet`).

    With ``base``, a ControlNet made for another base family (say SD 2.x for an SD 1.x base) is
    refused. ``global_average_pooling`` overrides the guess from the name (only the shuffle model pools).
    A Control-LoRA (Stability's ``control-lora-*-rank128/256``) is rebuilt on its base model's UNet:
    pass it as ``unet`` (``load_controlnet(path, model.config, unet=model.unet)``).
    """
    path = Path(path)
    if path.is_dir():
        control, config = diffusers.read_controlnet_folder(path)
        fmt = "diffusers-controlnet"
    else:
        state_dict, metadata = read_state_dict(path)
        fmt = detect_format(state_dict, path)
        if fmt == "control-lora":
            return _load_control_lora(path, state_dict, base, unet, dtype)
        control, config = _read_controlnet_file(path, state_dict, metadata, fmt, base)
    if global_average_pooling is not None:
        config = dataclasses.replace(config, global_average_pooling=global_average_pooling)
    if base is not None:
        check_compatible(config, base, path.name)
    model = build_empty(lambda: build_controlnet(config))
    load_strict(model, control, "ControlNet", f"{path.name} ({fmt})")
    return model.to(dtype)


def _read_controlnet_file(
    path: Path, state_dict: StateDict, metadata: Mapping[str, str], fmt: str, base: ModelConfig | None
) -> tuple[StateDict, ControlNetConfig]:
    """A ControlNet file's weights (LDM layout, no prefix) and configuration."""
    if fmt == "diffusers-controlnet":
        return diffusers.controlnet_from_file(state_dict, base, path)
    control = ldm.control_part(state_dict, fmt, path)
    prefix = "" if fmt == "ldm-control-bare" else ldm.CONTROL_PREFIX
    check_finite({prefix + k: v for k, v in control.items()}, path)
    stored = ldm.stored_config(metadata, str(path), ldm.CONTROL_METADATA_KEY)
    if isinstance(stored, ControlNetConfig):
        return control, stored
    return control, controlnet_config_from_shapes(control, str(path), base)


def _load_control_lora(
    path: Path, state_dict: StateDict, base: ModelConfig | None, unet: UNet | None, dtype: torch.dtype
) -> ControlNet:
    """A Control-LoRA's ControlNet, built on ``unet`` (formats/control_lora.py)."""
    family = control_lora.made_for(state_dict) or "its base family"
    if unet is None:
        raise CheckpointError(
            f"{path.name}: a Control-LoRA is rebuilt from its base model's UNet ({family}); load it with that "
            "base (load_controlnet(path, model.config, unet=model.unet))"
        )
    base_family = unet.config.family
    if family not in ("its base family", base_family):
        raise CheckpointError(
            f"{path.name}: this Control-LoRA was made for {family} but the base model is {base_family}; "
            "use it with a base of its family"
        )
    check_finite(state_dict, path)
    config = control_lora.control_lora_config(state_dict, unet.config, path.name)
    if base is not None:  # the UNet given is that base's; its VAE must fit the hint encoder
        check_compatible(config, base, path.name)
    model = build_empty(lambda: ControlNet(config))
    expected = model.state_dict()
    weights = control_lora.control_lora_weights(state_dict, unet.state_dict(), expected, path.name, dtype)
    load_strict(model, weights, "ControlNet", f"{path.name} (control-lora)")
    return model.to(dtype)


def load_vae(
    path: str | os.PathLike, config: VAEConfig | None = None, *, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """A VAE alone, to put in place of a base model's (``model.vae = load_vae(path, model.config.vae)``):
    SDXL's fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix: SDXL's layout and scale, weights that stay
    finite in float16), SD's ft-MSE VAE, ...

    From a diffusers ``AutoencoderKL`` folder (or a pipeline's ``vae/``; its config.json gives the
    architecture and the latent scale), or a single file in the LDM layout (``encoder.*``, maybe
    under ``first_stage_model.``, a whole LDM model's included) or diffusers' (``encoder.down_blocks.*``),
    whose architecture and scale are ``config``'s (SD's VAE when not given: SD 1.x, 2.x and SDXL
    share it; SDXL's scale is 0.13025, so pass ``SDXL.vae`` or the base's)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        try:
            config = diffusers_vae.vae_config_from_diffusers(diffusers.read_json(folder / "config.json"))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{folder}: not a usable AutoencoderKL config ({first_line(error)})") from None
        weights, fmt = diffusers.read_weights(folder), "diffusers"
    else:
        weights, fmt = read_state_dict(path)[0], "ldm"
        config = config or VAEConfig()
    weights = {k: v for k, v in weights.items() if not k.startswith("first_stage_model.loss.")}
    if any(k.startswith(ldm.VAE_PREFIX) for k in weights):
        weights = {k.removeprefix(ldm.VAE_PREFIX): v for k, v in weights.items() if k.startswith(ldm.VAE_PREFIX)}
    if any(k.startswith("encoder.down_blocks.") for k in weights):
        fmt = "diffusers"
        try:
            weights = diffusers_vae.vae_diffusers_to_ldm(weights, config)
        except ValueError as error:
            raise CheckpointError(f"{path.name} ({fmt}): {first_line(error)}") from None
    elif not any(k.startswith("encoder.") for k in weights):
        raise CheckpointError(
            f"{path}: not a VAE (no encoder.* or first_stage_model.* weights); first keys: {short_list(weights)}"
        )
    check_finite(weights, path)
    model = build_empty(lambda: AutoencoderKL(config))
    load_strict(model, weights, "VAE", f"{path.name} ({fmt})")
    return model.to(dtype)


def load_taesd(
    *paths: str | os.PathLike, base: ModelConfig | None = None, dtype: torch.dtype = torch.float32
) -> TinyAutoencoder:
    """TAESD (models/taesd.py) from its files: ``taesd_decoder.pth`` alone (enough to decode and
    preview), with ``taesd_encoder.pth`` (to encode too), the same as ``.safetensors``, a diffusers
    ``AutoencoderTiny`` folder (``config.json`` and weights) or its weights file alone. SDXL's
    ``taesdxl_*`` files load the same way: the layout is the same, the weights differ, and nothing
    in a file says which family it was made for, so give the one of your base model.

    Each part must be given once and match the model whole. With ``base``, a TAESD whose latents
    are not that base's (channels, 8x downsampling) is refused."""
    if not paths:
        raise ValueError("load_taesd needs a TAESD file or folder")
    weights: StateDict = {}
    sources: dict[str, str] = {}  # part -> where it was read
    stated = {}  # a folder's config.json: its latent channels
    for path in map(Path, paths):
        if path.is_dir():
            stated[path.name] = taesd.check_diffusers_config(diffusers.read_json(path / "config.json"), str(path))
            tensors = diffusers.read_weights(path)
        else:
            tensors = read_state_dict(path)[0]
            check_finite(tensors, path)
        found, layout = taesd.to_whole_layout(tensors, str(path))
        for part in sorted(taesd.parts_of(found)):
            if part in sources:
                raise CheckpointError(f"{path.name}: a second TAESD {part}; the first came from {sources[part]}")
            sources[part] = f"{path.name} ({layout})"
        weights.update(found)
    source = ", ".join(sources.values()) or ", ".join(Path(p).name for p in paths)
    channels = taesd.latent_channels_of(weights, source)
    for folder, count in stated.items():
        if count != channels:
            raise CheckpointError(f"{folder}: config.json says {count} latent channels, its weights have {channels}")
    if base is not None and (base.vae.embed_dim, base.vae.downsample_factor) != (channels, 8):
        raise CheckpointError(
            f"{source}: TAESD reads {channels}-channel latents at 1/8 of the image's size; this base model's "
            f"are {base.vae.embed_dim}-channel at 1/{base.vae.downsample_factor}"
        )
    model = build_empty(lambda: TinyAutoencoder(channels, encoder="encoder" in sources, decoder="decoder" in sources))
    load_strict(model, weights, "TAESD", source)
    return model.to(dtype)


def load_adapter(
    path: str | os.PathLike, base: ModelConfig | None = None, *, dtype: torch.dtype = torch.float32
) -> T2IAdapter:
    """A T2I-Adapter (full or light) from TencentARC's files (``t2iadapter_*_sd14v1.pth``,
    ``*_sd15v2.pth``, also with the ``adapter.`` prefix of their training code), a diffusers folder
    (``config.json`` + weights) or a single diffusers-layout file; its configuration from the
    folder's config.json or the file's shapes. With ``base``, an adapter whose feature widths do
    not fit that base's UNet is refused."""
    path = Path(path)
    if path.is_dir():
        weights, config = diffusers.read_adapter_folder(path)
        fmt = "diffusers-adapter"
    else:
        state_dict, _ = read_state_dict(path)
        fmt = f"{t2i_adapter.detect_adapter_layout(state_dict, str(path))}-adapter"
        check_finite(state_dict, path)
        factor = None if base is None else base.vae.downsample_factor  # the file does not say
        if fmt == "diffusers-adapter":
            config = t2i_adapter.config_from_diffusers_shapes(state_dict, str(path), factor=factor)
            weights = t2i_adapter.adapter_diffusers_to_original(state_dict, config)
        else:
            weights = t2i_adapter.strip_prefix(state_dict)
            config = t2i_adapter.config_from_original(weights, str(path), factor=factor)
    if base is not None:
        t2i_adapter.check_adapter_compatible(config, base, path.name)
    model = build_empty(lambda: build_adapter(config))
    load_strict(model, weights, f"T2I-Adapter ({config.kind})", f"{path.name} ({fmt})")
    return model.to(dtype)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """Load ``state_dict`` into ``module``, every key matched, with a useful error when not.

    ``module`` may live on the meta device (tensors are then assigned, not copied); tensors are
    converted to the dtype of the module's floating-point parameters.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (file {list(state_dict[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    # A file's header may say any dtype: integers or booleans where the model has float weights
    # would load and fail later, far from the file.
    wrong_kind = [
        f"{k} ({state_dict[k].dtype})"
        for k in expected
        if k in state_dict and expected[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if missing or unexpected or mismatched or wrong_kind:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {short_list(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {short_list(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} with another shape: {short_list(mismatched)}")
        if wrong_kind:
            problems.append(f"{len(wrong_kind)} not floating-point: {short_list(wrong_kind)}")
        raise CheckpointError(f"{source}: the {what} weights do not fit the model; " + "; ".join(problems))
    on_meta = any(t.is_meta for t in expected.values())
    converted = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(converted, strict=True, assign=on_meta)


def transfer_control(
    control: Mapping[str, torch.Tensor],
    old_base_unet: Mapping[str, torch.Tensor],
    new_base_unet: Mapping[str, torch.Tensor],
) -> StateDict:
    """Move a ControlNet to a fine-tuned base (the original ``tool_transfer_control``).

    Every control weight that has an equivalent in the UNet becomes ``control + (new - old)``,
    computed in float32; the hint encoder and zero convolutions are kept as they are. All three
    state dicts are in the LDM layout without prefixes.
    """
    transferred = {}
    for key, weight in control.items():
        if key in old_base_unet:
            if key not in new_base_unet:
                raise CheckpointError(f"the new base model lacks {key}")
            if not (weight.shape == old_base_unet[key].shape == new_base_unet[key].shape):
                raise CheckpointError(f"{key}: shapes differ between the ControlNet and the base models")
            moved = weight.float() + (new_base_unet[key].float() - old_base_unet[key].float())
            transferred[key] = moved.to(weight.dtype)
        else:
            transferred[key] = weight
    return transferred

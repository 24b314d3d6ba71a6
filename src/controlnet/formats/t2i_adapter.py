"""T2I-Adapter files: TencentARC's layout (ours, `models.t2i_adapter`) and diffusers', with the
explicit key maps between them and the configuration read off a file's shapes.

- TencentARC (``t2iadapter_*_sd14v1.pth``, ``*_sd15v2.pth``): full adapters ``conv_in.*``,
  ``body.{level * num_res_blocks + j}.{in_conv,block1,block2,skep,down_opt.op}.*``; light adapters
  ``body.{level}.{in_conv,out_conv}.*`` and ``body.{level}.body.{j}.{block1,block2}.*``. Their
  training code saved some with an ``adapter.`` prefix, which is dropped.
- diffusers (``T2IAdapter``: ``config.json`` + ``diffusion_pytorch_model.safetensors``):
  ``adapter.conv_in.*``, ``adapter.body.{level}.in_conv.*``,
  ``adapter.body.{level}.resnets.{j}.{block1,block2}.*`` (full); light adds
  ``adapter.body.{level}.out_conv.*``. diffusers' light ``channels`` omit the last level, which
  repeats the one before.
- The SDXL adapters (TencentARC/t2i-adapter-*-sdxl-1.0: diffusers' ``full_adapter_xl``; TencentARC's
  ``Adapter_XL`` in their layout, as the AUTOMATIC1111 extension's copies hold them): the full
  adapter's keys; told apart by their 16x pixel unshuffle (a first conv reading 256 or 768 channels).

The maps are pure ``dict -> dict`` renames (a round trip is bit-identical); keys they do not know
are kept, for strict loading to name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ModelConfig, T2IAdapterConfig
from .errors import CheckpointError, first_line, short_list
from .tensors import StateDict, save_safetensors

DIFFUSERS_PREFIX = "adapter."
# Keys that mark what a file holds when it is not an adapter: a ControlNet or a base model.
_CONTROLNET_MARKS = ("control_model.", "input_hint_block.", "controlnet_cond_embedding.", "model.diffusion_model.")
_OTHER_ADAPTERS = {
    "style_embedding": "a style adapter (t2iadapter_style: image tokens for the text context)",
    "task_embedding": "a CoAdapter fuser",
}


def detect_adapter_layout(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    """``"tencentarc"`` or ``"diffusers"``; a one-line error for anything else, saying what it is
    when it is a ControlNet, a base model or an adapter kind we do not run."""
    keys = list(state_dict)
    if any(k.startswith(_CONTROLNET_MARKS) for k in keys):
        raise CheckpointError(
            f"{source}: a ControlNet or base model, not a T2I-Adapter; load it as a ControlNet or base model"
        )
    for mark, what in _OTHER_ADAPTERS.items():
        if any(k.startswith(mark) for k in keys):
            raise CheckpointError(f"{source}: {what}, not a spatial T2I-Adapter (full or light); not supported")
    bare = [k.removeprefix(DIFFUSERS_PREFIX) for k in keys]
    if any(re.match(r"body\.\d+\.resnets\.\d+\.", k) for k in bare):
        return "diffusers"
    if any(re.match(r"body\.\d+\.(block1|body\.\d+\.block1)\.weight$", k) for k in bare):
        return "tencentarc"
    raise CheckpointError(
        f"{source}: not a T2I-Adapter (no body.*.block1 / body.*.resnets.* weights); first keys: {short_list(keys)}"
    )


# ---------------------------------------------------------------------------------------------
# Key maps


def adapter_diffusers_to_original(state_dict: Mapping[str, torch.Tensor], config: T2IAdapterConfig) -> StateDict:
    """diffusers ``T2IAdapter`` keys -> TencentARC's (ours)."""
    n, full = config.num_res_blocks, config.kind != "light"
    out = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(DIFFUSERS_PREFIX)
        resnet = re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", name)
        in_conv = re.fullmatch(r"body\.(\d+)\.in_conv\.(.*)", name)
        if full and resnet:  # body.{level}.resnets.{j} -> body.{level * n + j}
            name = f"body.{int(resnet[1]) * n + int(resnet[2])}.{resnet[3]}"
        elif full and in_conv:  # a level's in_conv is its first block's
            name = f"body.{int(in_conv[1]) * n}.in_conv.{in_conv[2]}"
        elif resnet:  # light: body.{level}.resnets.{j} -> body.{level}.body.{j}
            name = f"body.{resnet[1]}.body.{resnet[2]}.{resnet[3]}"
        out[name] = tensor
    return out


def adapter_original_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: T2IAdapterConfig) -> StateDict:
    """TencentARC's (ours) keys -> diffusers ``T2IAdapter``'s."""
    n = config.num_res_blocks
    out = {}
    for key, tensor in state_dict.items():
        name = key
        if config.kind != "light":
            match = re.match(r"body\.(\d+)\.(in_conv|block1|block2)\.(.*)$", key)
            if match:
                level, j = divmod(int(match[1]), n)
                part = "in_conv" if match[2] == "in_conv" else f"resnets.{j}.{match[2]}"
                name = f"body.{level}.{part}.{match[3]}"
        else:
            match = re.match(r"body\.(\d+)\.body\.(\d+)\.(.*)$", key)
            if match:
                name = f"body.{match[1]}.resnets.{match[2]}.{match[3]}"
        out[DIFFUSERS_PREFIX + name] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# Configurations


def config_from_original(
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    num_res_blocks: int | None = None,
    factor: int | None = None,
) -> T2IAdapterConfig:
    """The configuration of a TencentARC-layout adapter (keys without prefix), from its shapes.

    Full: the widths are those of each block's ``block1``; a level ends where the width next changes
    (the released files: 320, 640, 1280, 1280 with 2 blocks each), so ``num_res_blocks`` is the index
    of the first block of another width, or of the first ``down_opt`` convolution, unless given.
    ``factor``: the pixel unshuffle's as the base wants it (its VAE's downsampling; the file does not
    say), taken where the first conv's input fits it; otherwise, or without it, SD's 8 where that
    input is 1 to 4 image channels' worth, else 4 (a base that wants another then refuses the file).
    """
    if "conv_in.weight" in state_dict:
        widths = _indexed(state_dict, r"body\.(\d+)\.block1\.weight", source)
        conv_down = [i for i in range(len(widths)) if f"body.{i}.down_opt.op.weight" in state_dict]
        xl = _is_xl(state_dict, factor, source)
        # A level ends where the width next changes (the XL adapter's first halving comes a level later).
        n = next((i for i, w in enumerate(widths) if w != widths[0]), None)
        n = num_res_blocks or (conv_down[0] if conv_down and not xl else n)
        if n is None or len(widths) % n:
            raise CheckpointError(f"{source}: cannot tell the adapter's levels from its block widths {widths}")
        return _config(
            source,
            kind="full_xl" if xl else "full",
            in_channels=_shape(state_dict, "conv_in.weight", source)[1] // XL_DOWNSCALE_FACTOR**2
            if xl
            else _in_channels(state_dict, "conv_in.weight", factor, source),
            channels=tuple(widths[::n]),
            num_res_blocks=n,
            factor=XL_DOWNSCALE_FACTOR if xl else _unshuffle_factor(state_dict, "conv_in.weight", factor, source),
            kernel_size=_shape(state_dict, "body.0.block2.weight", source)[-1],
            shortcut_conv="body.0.skep.weight" in state_dict,
            conv_downsample=bool(conv_down),
        )
    widths = _indexed(state_dict, r"body\.(\d+)\.out_conv\.weight", source)
    blocks = _indexed(state_dict, r"body\.0\.body\.(\d+)\.block1\.weight", source)
    return _config(
        source,
        kind="light",
        in_channels=_in_channels(state_dict, "body.0.in_conv.weight", factor, source),
        channels=tuple(widths),
        num_res_blocks=len(blocks),
        factor=_unshuffle_factor(state_dict, "body.0.in_conv.weight", factor, source),
    )


def config_from_diffusers(config: Mapping[str, object], source: str) -> T2IAdapterConfig:
    """Our configuration of a diffusers ``T2IAdapter`` ``config.json``."""
    kind = config.get("adapter_type", "full_adapter")
    kinds = {"full_adapter": "full", "light_adapter": "light", "full_adapter_xl": "full_xl"}
    if kind not in kinds:
        raise CheckpointError(
            f"{source}: unknown adapter_type {kind!r}; expected full_adapter, light_adapter or full_adapter_xl"
        )
    try:
        channels = tuple(int(c) for c in config.get("channels", (320, 640, 1280, 1280)))  # type: ignore[union-attr]
        in_channels = int(config.get("in_channels", 3))  # type: ignore[arg-type]
        num_res_blocks = int(config.get("num_res_blocks", 2))  # type: ignore[arg-type]
        # diffusers' default is 8 for every kind; the XL adapters' config.json say 16.
        factor = int(config.get("downscale_factor", 8))  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: unreadable adapter configuration ({first_line(error)})") from None
    if kind == "light_adapter":
        if not channels:
            raise CheckpointError(f"{source}: a light adapter configuration without channels")
        return _config(source, "light", in_channels, (*channels, channels[-1]), num_res_blocks, factor)
    return _config(source, kinds[kind], in_channels, channels, num_res_blocks, factor)


def config_from_diffusers_shapes(
    state_dict: Mapping[str, torch.Tensor], source: str, factor: int | None = None
) -> T2IAdapterConfig:
    """The configuration of a diffusers-layout adapter file without its config.json (``factor``: as
    for :func:`config_from_original`)."""
    bare = strip_prefix(state_dict)
    kind = "full" if "conv_in.weight" in bare else "light"
    blocks = {m[1] for k in bare if (m := re.fullmatch(r"body\.0\.resnets\.(\d+)\.block1\.weight", k))}
    if not blocks:
        raise CheckpointError(f"{source}: not a T2I-Adapter in diffusers layout (no body.0.resnets.*)")
    n = len(blocks)
    probe = T2IAdapterConfig(kind=kind, channels=(4,), num_res_blocks=n)  # the key map needs kind and n only
    return config_from_original(adapter_diffusers_to_original(state_dict, probe), source, n, factor)


def config_to_diffusers(config: T2IAdapterConfig) -> dict:
    """The diffusers ``T2IAdapter`` ``config.json`` of ours; a one-line error where diffusers has no
    equivalent (other kernels, shortcut or strided convolutions, a light adapter whose last two
    widths differ)."""
    if config.kind != "light":
        if (config.kernel_size, config.shortcut_conv, config.conv_downsample) != (1, False, False):
            raise CheckpointError(
                "diffusers' T2IAdapter has only kernel_size=1 without shortcut or strided convolutions"
            )
        channels = list(config.channels)
    else:
        if len(config.channels) < 2 or config.channels[-1] != config.channels[-2]:
            raise CheckpointError("diffusers' light adapter repeats its last width; this one does not")
        channels = list(config.channels[:-1])
    return {
        "_class_name": "T2IAdapter",
        "adapter_type": {"full": "full_adapter", "light": "light_adapter", "full_xl": "full_adapter_xl"}[config.kind],
        "in_channels": config.in_channels,
        "channels": channels,
        "num_res_blocks": config.num_res_blocks,
        "downscale_factor": config.downscale_factor,
    }


def _config(source: str, kind: str, in_channels: int, channels, num_res_blocks: int, factor: int = 8, **rest):
    try:
        return T2IAdapterConfig(
            kind=kind,  # type: ignore[arg-type]
            in_channels=in_channels,
            channels=channels,
            num_res_blocks=num_res_blocks,
            downscale_factor=factor,
            **rest,
        )
    except ValueError as error:
        raise CheckpointError(f"{source}: not a usable T2I-Adapter ({first_line(error)})") from None


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, source: str) -> list[int]:
    tensor = state_dict.get(key)
    if tensor is None:
        raise CheckpointError(f"{source}: not a T2I-Adapter: no {key}")
    if tensor.ndim != 4:
        raise CheckpointError(f"{source}: {key} has shape {list(tensor.shape)}, not a convolution's")
    return list(tensor.shape)


def _indexed(state_dict: Mapping[str, torch.Tensor], pattern: str, source: str) -> list[int]:
    """Output widths of the convolutions ``pattern`` numbers 0, 1, ... (without gaps)."""
    found = {int(m[1]): k for k in state_dict if (m := re.fullmatch(pattern, k))}
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{source}: not a T2I-Adapter: its blocks are missing or not numbered 0, 1, ...")
    return [_shape(state_dict, found[i], source)[0] for i in range(len(found))]


# The SDXL adapters unshuffle 16x: their first conv reads 256 (1 channel) or 768 (3 channels) channels,
# how the AUTOMATIC1111 extension tells them apart (``is_sdxl = cin == 256 or cin == 768``); SD's
# adapters read 64 or 192.
XL_DOWNSCALE_FACTOR = 16
_XL_UNSHUFFLED = (XL_DOWNSCALE_FACTOR**2, 3 * XL_DOWNSCALE_FACTOR**2)


def _is_xl(state_dict: Mapping[str, torch.Tensor], factor: int | None, source: str) -> bool:
    """Whether a full adapter is an SDXL one (for a base with SD's 8x VAE, or an unknown base)."""
    return factor in (None, 8) and _shape(state_dict, "conv_in.weight", source)[1] in _XL_UNSHUFFLED


def _unshuffle_factor(state_dict: Mapping[str, torch.Tensor], key: str, wanted: int | None, source: str) -> int:
    """The pixel unshuffle factor of an adapter whose first conv is ``key``: ``wanted`` where that
    conv's input divides by its square, else 8 (SD's VAE) where it is 1 to 4 image channels' worth
    (64 each), else 4 (a 4x VAE's, 16 each)."""
    unshuffled = _shape(state_dict, key, source)[1]
    if wanted and unshuffled % wanted**2 == 0:
        return wanted
    return 8 if unshuffled % 64 == 0 and unshuffled // 64 <= 4 else 4


def _in_channels(state_dict: Mapping[str, torch.Tensor], key: str, wanted: int | None, source: str) -> int:
    factor = _unshuffle_factor(state_dict, key, wanted, source)
    unshuffled = _shape(state_dict, key, source)[1]
    if unshuffled % factor**2:
        raise CheckpointError(
            f"{source}: {key} reads {unshuffled} channels, not a {factor}x pixel-unshuffled image's (a multiple of "
            f"{factor**2})"
        )
    return unshuffled // factor**2


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A TencentARC-layout state dict without the ``adapter.`` prefix its training code adds."""
    return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in state_dict.items()}


def check_adapter_compatible(config: T2IAdapterConfig, base: ModelConfig, source: str) -> None:
    """Refuse an adapter whose feature maps do not fit the base UNet where they go
    (`models.unet.adapter_blocks`: their widths) or whose pixel unshuffle does not bring images to
    the size there: the latent size for SD's adapters, half of it for the XL adapter, whose first
    feature follows the UNet's first downsampling. Where the adapter's kind says another family
    than the base's (an XL adapter for SD 1.x, an SD adapter for SDXL), the message names both."""
    made_for = "SDXL" if config.kind == "full_xl" else "SD 1.x/2.x"
    family = base.unet.family
    other_family = (made_for == "SDXL") != (family == "SDXL")
    problem = _adapter_misfit(config, base, "its" if other_family else "this T2I-Adapter's")
    if problem is None:
        return
    if other_family:
        problem = f"this T2I-Adapter was made for {made_for} but the base model is {family} ({base.name}): {problem}"
    raise CheckpointError(f"{source}: {problem}; use an adapter made for this base")


def _adapter_misfit(config: T2IAdapterConfig, base: ModelConfig, whose: str) -> str | None:
    """Why the adapter does not fit the base, or None (``whose``: how it names the adapter's widths)."""
    levels = base.unet.level_channels
    if config.kind == "full_xl":  # four features: after the first downsampling, the two other levels' ends, the middle
        factor, widths, what = 2 * base.vae.downsample_factor, (*levels, levels[-1]), "UNet levels and middle block"
        if config.downscale_factor != factor:
            return (
                f"this SDXL-type (XL) T2I-Adapter shrinks images {config.downscale_factor}x but the base "
                f"model {base.name} needs {factor}x"
            )
    else:
        widths, what = levels, "UNet levels"
        if config.downscale_factor != base.vae.downsample_factor:
            return (
                f"this T2I-Adapter shrinks images {config.downscale_factor}x but the base model "
                f"{base.name}'s VAE {base.vae.downsample_factor}x"
            )
    if config.channels != widths:
        fit = f"the base model {base.name}'s {what} {list(widths)}"
        return f"{whose} feature widths {list(config.channels)} do not fit {fit}"
    return None


def save_adapter_file(path: Path, weights: Mapping[str, torch.Tensor]) -> Path:
    """An adapter's weights (ours: TencentARC's key names) as one safetensors file: what
    ``loading.load_adapter`` and the AUTOMATIC1111 extension read from ``t2iadapter_*`` files (the
    configuration is read back from the shapes)."""
    save_safetensors(dict(weights), path, {})
    return path

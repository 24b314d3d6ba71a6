"""TAESD's files (models/taesd.py): the original ones and diffusers' ``AutoencoderTiny``.

- **Original** (madebyollin/taesd): one file per part, ``taesd_encoder.pth`` and
  ``taesd_decoder.pth`` (also as ``.safetensors``; ``taesdxl_*`` for SDXL), each the state dict of
  an ``nn.Sequential``: ``0.weight``, ``1.conv.0.weight``, ... An encoder file starts with its
  first convolution, ``0.weight`` [64, 3, 3, 3]; a decoder's index 0 is its clamp, so it starts
  at ``1.weight`` [64, latent_channels, 3, 3].
- **Whole** (``TinyAutoencoder.state_dict()``): the same keys under ``encoder.`` and ``decoder.``.
- **diffusers** (``AutoencoderTiny``: a folder with ``config.json`` and
  ``diffusion_pytorch_model.safetensors``, or that file alone): ``encoder.layers.N`` is the
  original encoder's ``N``, ``decoder.layers.N`` the original decoder's ``N + 1`` (diffusers'
  ``DecoderTiny`` applies the clamp in ``forward``, not as a layer; its conversion script,
  ``convert_tiny_autoencoder_to_diffusers.py``, maps them so).

Everything is read into the whole layout, which `TinyAutoencoder` loads strictly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError, short_list
from .tensors import StateDict

PARTS = ("encoder", "decoder")
DECODER_OFFSET = 1  # the original decoder's index 0 is the clamp, which diffusers has no layer for
_INDEXED = re.compile(r"^(\d+)\.(.+)$")
_WHOLE = re.compile(r"^(encoder|decoder)\.(\d+)\.(.+)$")
_DIFFUSERS = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")

# What a diffusers AutoencoderTiny config must say for TAESD's architecture (SD's and SDXL's
# TAESD alike); latent_channels is free (4 for SD and SDXL, 16 for taesd3/taef1).
TAESD_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_magnitude": 3,  # models/taesd.py's LATENT_MAGNITUDE and LATENT_SHIFT (8-bit storage)
    "latent_shift": 0.5,
    "scaling_factor": 1.0,  # the diffusion latents are TAESD's: models/taesd.py decodes them as they are
    "shift_factor": 0.0,
}


def to_whole_layout(state_dict: Mapping[str, Any], source: str) -> tuple[StateDict, str]:
    """Any TAESD file's tensors in `TinyAutoencoder`'s layout, and the layout's name ("encoder",
    "decoder": an original part file; "taesd": both parts; "diffusers"). Keys that fit no layout
    are kept under their own names, so that strict loading lists them."""
    keys = list(state_dict)
    if any(_DIFFUSERS.match(k) for k in keys):
        return {_from_diffusers(k): v for k, v in state_dict.items()}, "diffusers"
    if any(_WHOLE.match(k) for k in keys):
        return dict(state_dict), "taesd"
    if keys and all(_INDEXED.match(k) for k in keys):
        part = "encoder" if "0.weight" in state_dict else "decoder"
        return {f"{part}.{k}": v for k, v in state_dict.items()}, part
    raise CheckpointError(
        f"{source}: not a TAESD file (expected taesd_encoder/taesd_decoder keys 0.weight, 1.conv.0.weight, ..., "
        f"or diffusers' encoder.layers.*, decoder.layers.*); first keys: {short_list(keys)}"
    )


def _from_diffusers(key: str) -> str:
    found = _DIFFUSERS.match(key)
    if found is None:
        return key
    part, index, rest = found.groups()
    return f"{part}.{int(index) + (DECODER_OFFSET if part == 'decoder' else 0)}.{rest}"


def to_diffusers_layout(state_dict: Mapping[str, Any]) -> StateDict:
    """`TinyAutoencoder` weights in diffusers' ``AutoencoderTiny`` layout (the inverse of the map above)."""
    converted = {}
    for key, value in state_dict.items():
        found = _WHOLE.match(key)
        if found is None:
            raise ValueError(f"not a TinyAutoencoder key: {key!r}")
        part, index, rest = found.groups()
        converted[f"{part}.layers.{int(index) - (DECODER_OFFSET if part == 'decoder' else 0)}.{rest}"] = value
    return converted


def parts_of(state_dict: Mapping[str, Any]) -> set[str]:
    """Which parts the whole-layout weights hold."""
    return {key.split(".", 1)[0] for key in state_dict} & set(PARTS)


def latent_channels_of(state_dict: Mapping[str, Any], source: str) -> int:
    """The latent channels the weights were made for: the encoder's last convolution's outputs and
    the decoder's first convolution's inputs, which must agree."""
    found = {}
    encoder_out = [k for k in state_dict if re.fullmatch(r"encoder\.\d+\.weight", k)]
    if encoder_out:
        last = max(encoder_out, key=lambda k: int(k.split(".")[1]))
        found["encoder"] = int(state_dict[last].shape[0])
    if "decoder.1.weight" in state_dict and state_dict["decoder.1.weight"].dim() == 4:
        found["decoder"] = int(state_dict["decoder.1.weight"].shape[1])
    if not found:
        raise CheckpointError(
            f"{source}: not a TAESD file (no encoder or decoder convolution); keys: {short_list(state_dict)}"
        )
    if len(set(found.values())) > 1:
        raise CheckpointError(
            f"{source}: the encoder makes {found['encoder']}-channel latents and the decoder reads "
            f"{found['decoder']}-channel ones: not one TAESD (taesd, taesdxl, taesd3 and taef1 differ)"
        )
    return next(iter(found.values()))


def check_diffusers_config(config: Mapping[str, Any], source: str) -> int:
    """A diffusers ``AutoencoderTiny`` config with TAESD's architecture; returns its latent channels."""
    name = config.get("_class_name", "AutoencoderTiny")
    if name != "AutoencoderTiny":
        raise CheckpointError(f"{source}: a diffusers {name}, not an AutoencoderTiny (TAESD)")
    for field, expected in TAESD_CONFIG.items():
        value = config.get(field, expected)
        if (list(value) if isinstance(value, (list, tuple)) else value) != expected:
            raise CheckpointError(f"{source}: {field} is {value!r}; TAESD's architecture has {expected!r}")
    channels = config.get("latent_channels", 4)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise CheckpointError(f"{source}: latent_channels must be a positive integer, got {channels!r}")
    return channels

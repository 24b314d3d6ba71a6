"""Reading and writing the checkpoint files people have: the names the README gives
(``from controlnet.checkpoints import load_base, load_controlnet, save_diffusers``), kept here.

The code lives in :mod:`controlnet.loading` (load_base, load_controlnet, strict loading, the
compatibility check, transfer_control) and :mod:`controlnet.formats`: ``tensors`` (reading tensor
files safely, writing safetensors), ``ldm`` (the original single-file layout, save_ldm),
``detect`` (what a file holds, configurations from shapes) and ``diffusers`` (diffusers folders and
files, save_diffusers), with ``errors`` (CheckpointError).
"""

from __future__ import annotations

from .formats.detect import Contents, check_compatible, detect_format, inspect_contents
from .formats.diffusers import save_diffusers
from .formats.errors import CheckpointError
from .formats.ldm import CONTROL_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ldm_state_dict, save_ldm, split_ldm
from .formats.tensors import TORCH_LOAD_ERRORS, StateDict, read_state_dict, torch_load_reason
from .loading import load_base, load_controlnet, load_strict, transfer_control

__all__ = [
    "CONTROL_PREFIX",
    "TEXT_PREFIX",
    "TORCH_LOAD_ERRORS",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "CheckpointError",
    "Contents",
    "StateDict",
    "check_compatible",
    "detect_format",
    "inspect_contents",
    "ldm_state_dict",
    "load_base",
    "load_controlnet",
    "load_strict",
    "read_state_dict",
    "save_diffusers",
    "save_ldm",
    "split_ldm",
    "torch_load_reason",
    "transfer_control",
]

"""Reading and writing the checkpoint files people have (REFERENCE.md section 3), safely and strictly.

Formats read:
- LDM single files (``.safetensors``, ``.ckpt``), with or without a ``state_dict`` wrapper,
  ``model_ema.*`` and schedule buffers, with or without ``position_ids``;
- ControlNet 1.0 full files (base + ``control_model.*``) and 1.1 control-only files (``.pth``,
  ``.safetensors``), and control files whose keys lack the ``control_model.`` prefix;
- diffusers folders (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``controlnet/``) and
  single diffusers-layout ControlNet ``.safetensors`` files.

Formats written: safetensors in the LDM layout, and diffusers folders / files.

Safety: safetensors first; pickles only through ``torch.load(weights_only=True)``, which refuses any
pickle that would import or call code. Strictness: every key of every model must be matched, and
what does not match is listed with the file name and the detected format; weights holding NaN or
infinite values are refused. Any file that is not what it claims to be gives a one-line
``CheckpointError`` naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import (
    PRESETS,
    SD21,
    SD21_V,
    ControlNetConfig,
    ModelConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from .files import atomic_file, atomic_folder, atomic_path
from .formats import diffusers_text, diffusers_unet, diffusers_vae
from .formats.diffusers_tokenizer import write_hf_tokenizer_files
from .models.controlnet import ControlNet
from .models.stable_diffusion import StableDiffusion, build_empty
from .models.text import POSITION_IDS_KEY, clip_position_ids

StateDict = dict[str, torch.Tensor]

# Where each model lives in an LDM file.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
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
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_CONFIG_METADATA_KEY = "controlnet.config"  # the base model's ModelConfig, as JSON
_CONTROL_METADATA_KEY = "controlnet.control_config"  # the ControlNet's ControlNetConfig, as JSON
# Most keys named in an error message; the counts are always given in full.
_SHOWN = 5


class CheckpointError(ValueError):
    """A model file that cannot be used as asked; the message is one line, for the user."""


# ---------------------------------------------------------------------------------------------
# Reading tensors


def read_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """All tensors of a ``.safetensors`` or (tensor-only) pickle file, and the safetensors metadata.

    A ``state_dict`` wrapper (Lightning checkpoints) is removed; non-tensor entries are dropped.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a weights file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        tensors, metadata = _read_safetensors(path)
    elif path.suffix in _PICKLE_SUFFIXES or zipfile.is_zipfile(path):
        tensors, metadata = _read_pickle(path), {}
    else:
        raise CheckpointError(
            f"{path}: unknown file type {path.suffix!r}; expected .safetensors or a PyTorch checkpoint "
            f"({', '.join(_PICKLE_SUFFIXES)})"
        )
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors, metadata


def _looks_like_safetensors(path: Path) -> bool:
    # An 8-byte little-endian header length, then a JSON header starting with '{'.
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a valid safetensors file ({_first_line(error)})") from None


class _Ignored:
    """Stands in for the training bookkeeping objects Lightning pickles beside the weights
    (``callbacks``); their state is dropped, no code of theirs is imported or run."""

    def __setstate__(self, state: object) -> None:
        pass


def _inert_globals() -> list:
    """Globals a tensor-only checkpoint may name that build inert data, allowed on top of torch's
    ``weights_only`` list: Lightning's ModelCheckpoint callback (in SD 1.x training checkpoints,
    replaced by :class:`_Ignored`) and numpy scalars and dtypes (``global_step`` in some files)."""
    core = getattr(np, "_core", None) or np.core  # renamed in numpy 2
    scalar = core.multiarray.scalar
    allowed: list = [(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype]
    allowed += [(np.dtype, "numpy.dtype")] + [type(np.dtype(c)) for c in "?bhilqBHILQefdgFD"]
    for name in (
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    ):
        allowed.append((_Ignored, name))
    return allowed


_ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells its zip format from the legacy one
# What torch's weights_only unpickler allows besides torch's own names (torch 2.13); used only to
# name, in a refusal, the globals that made it refuse.
_TORCH_PLAIN_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "_codecs.encode",
        "builtins.set",
        "builtins.bytearray",
        "builtins.complex",
    }
)
# What torch.load may raise on a damaged file besides UnpicklingError: its legacy-format reader lets
# the errors of whatever it trips over through (found by truncating and corrupting real files).
TORCH_LOAD_ERRORS = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    OverflowError,
    MemoryError,
    struct.error,
    zipfile.BadZipFile,
)


def _read_pickle(path: Path) -> StateDict:
    with path.open("rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC or zipfile.is_zipfile(path):
        memory_map = _check_torch_zip(path)
    elif head[:1] == pickle.PROTO and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        memory_map = False  # the legacy torch.save format: pickles in a row, not mappable
    else:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: expected a zip archive written by torch.save or "
            f"a pickle, but the file starts with {_first_bytes(path)}"
        )
    try:
        with torch.serialization.safe_globals(_inert_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=memory_map)
    except pickle.UnpicklingError:
        # weights_only refused the pickle (or could not parse it). torch's text varies between
        # versions and advises weights_only=False, the one thing never to do with such a file:
        # it is never shown; what the pickle names is read here, from its opcodes.
        raise CheckpointError(_refusal(path)) from None
    except TORCH_LOAD_ERRORS as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({torch_load_reason(error)})") from None
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a dictionary of tensors")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _first_bytes(path: Path) -> str:
    with path.open("rb") as f:
        return repr(f.read(8))


_ZIP_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


def _check_torch_zip(path: Path) -> bool:
    """Refuse a zip that torch.save did not write (one line); True when every entry is stored.

    torch.load's memory-mapped path reads a storage's bytes straight from the file: from a
    compressed entry it would read the compressed bytes as weights. Deflated entries are read
    correctly by its ordinary path (which inflates), so they are loaded without the memory map.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise CheckpointError(
            f"{path}: a damaged or truncated zip archive ({_first_line(error)}); "
            "a PyTorch checkpoint is a complete zip archive written by torch.save"
        ) from None
    names = [entry.filename.rsplit("/", 1)[-1] for entry in entries]
    if "constants.pkl" in names:
        raise CheckpointError(
            f"{path}: a TorchScript program, not a checkpoint of weights; it is not loaded (it would run code)"
        )
    if "data.pkl" not in names:
        raise CheckpointError(f"{path}: a zip archive without data.pkl, not a checkpoint written by torch.save")
    methods = {entry.compress_type for entry in entries} - {zipfile.ZIP_STORED}
    unreadable = sorted(methods - {zipfile.ZIP_DEFLATED})
    if unreadable:
        named = ", ".join(_ZIP_METHODS.get(m, f"method {m}") for m in unreadable)
        raise CheckpointError(
            f"{path}: zip entries compressed with {named}; a PyTorch checkpoint's entries are stored or "
            "deflated: save it again with torch.save"
        )
    return not methods


def torch_load_reason(error: BaseException) -> str:
    """One line on why torch.load failed, without torch's advice to pass weights_only=False."""
    reason = _first_line(error)
    # torch's loader errors may end in advice to pass weights_only=False: never passed on.
    return type(error).__name__ if "weights_only" in reason else reason


def _refusal(path: Path) -> str:
    names = _code_globals(path)
    if names:
        return (
            f"{path}: refused: this pickle would run code ({_names(names)}); only tensor-only checkpoints "
            "are loaded, nothing in them is executed. Prefer a .safetensors file"
        )
    return (
        f"{path}: refused: not a tensor-only checkpoint (its pickle holds objects other than tensors and "
        "plain data, or is damaged); nothing in it was executed. Prefer a .safetensors file"
    )


def _code_globals(path: Path) -> list[str]:
    """The functions and classes a pickle names beyond what tensors need, read from its opcodes
    (``pickletools``: nothing is built, imported or run). Best effort, for the error message only."""
    allowed = _TORCH_PLAIN_GLOBALS | _inert_global_names()
    found: list[str] = []
    try:
        with _pickle_stream(path) as stream:
            # A legacy file is a few pickles in a row (magic number, versions, the object, storage
            # keys) then raw bytes; a zip's data.pkl is one pickle.
            for _ in range(4):
                _scan_pickle(stream, found)
    except (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile, RuntimeError):
        pass  # the end of the pickles, or a damaged one: what was found so far is kept
    unsafe = [name for name in found if not (name.startswith("torch.") or name in allowed)]
    return list(dict.fromkeys(unsafe))


def _inert_global_names() -> frozenset[str]:
    names = set()
    for entry in _inert_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return frozenset(names)


@contextlib.contextmanager
def _pickle_stream(path: Path) -> Iterator[IO[bytes]]:
    """The pickle bytes of a checkpoint as a stream: a zip's data.pkl, or the file itself."""
    if not zipfile.is_zipfile(path):
        with path.open("rb") as stream:
            yield stream
        return
    with zipfile.ZipFile(path) as archive:
        names = [e.filename for e in archive.infolist() if e.filename.rsplit("/", 1)[-1] == "data.pkl"]
        if not names:
            raise ValueError("no data.pkl")
        with archive.open(names[0]) as stream:
            yield stream


def _python3_name(name: str) -> str:
    # Protocol 2 pickles (torch.save's) spell builtins as Python 2 did.
    return "builtins." + name.removeprefix("__builtin__.") if name.startswith("__builtin__.") else name


_STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


def _scan_pickle(stream: IO[bytes], found: list[str]) -> None:
    """Append to ``found`` the ``module.name`` of every global one pickle imports: GLOBAL and INST
    name theirs; STACK_GLOBAL takes the last two strings pushed, maybe fetched from the memo."""
    strings: list[str] = []
    memo: dict[int, object] = {}
    last: object = None  # the value last pushed, when it is a string
    for opcode, arg, _position in pickletools.genops(stream):
        name = opcode.name
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = last
            continue  # stores the top of the stack, pushes nothing
        if name in ("GLOBAL", "INST"):
            found.append(_python3_name(str(arg).replace(" ", ".")))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(_python3_name(f"{strings[-2]}.{strings[-1]}"))
        if name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(int(arg))
        else:
            last = arg if name in _STRING_OPCODES else None
        if isinstance(last, str):
            strings.append(last)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# What a file holds


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a state dict:

    ``ldm`` (a base model, maybe with ``control_model.*``), ``ldm-control`` (``control_model.*``
    only), ``ldm-control-bare`` (ControlNet keys without prefix), ``diffusers-controlnet``.
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
        "unrecognised weights: neither an LDM model (model.diffusion_model.*), an LDM ControlNet "
        f"(control_model.* / input_hint_block.*) nor a diffusers ControlNet; first keys: {_names(keys)}"
    )


def _detect_format(state_dict: Mapping[str, torch.Tensor], path: Path) -> str:
    try:
        return detect_format(state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


@dataclasses.dataclass(frozen=True)
class Contents:
    """What a model file or folder holds."""

    format: str  # as detect_format, or "diffusers-pipeline" / "diffusers-controlnet" for folders
    has_base: bool  # a UNet, VAE and text encoder
    has_controlnet: bool


def inspect_contents(path: str | os.PathLike) -> Contents:
    """Tell what ``path`` holds, reading only key names where the format allows (safetensors)."""
    path = Path(path)
    if path.is_dir():
        if (path / "unet").is_dir():
            return Contents("diffusers-pipeline", True, (path / "controlnet").is_dir())
        if (path / "config.json").is_file():
            return Contents("diffusers-controlnet", False, True)
        raise CheckpointError(f"{path}: a folder that is neither a diffusers pipeline nor a diffusers ControlNet")
    keys = _read_keys(path)
    fmt = _detect_format(dict.fromkeys(keys), path)
    has_control = fmt != "ldm" or any(k.startswith(CONTROL_PREFIX) for k in keys)
    return Contents(fmt, fmt == "ldm", has_control)


def _read_keys(path: Path) -> list[str]:
    if path.is_file() and (path.suffix == ".safetensors" or _looks_like_safetensors(path)):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a valid safetensors file ({_first_line(error)})") from None
        if not keys:
            raise CheckpointError(f"{path}: holds no tensors")
        return keys
    return list(read_state_dict(path)[0])


def split_ldm(state_dict: Mapping[str, torch.Tensor], use_ema: bool = False) -> dict[str, StateDict]:
    """Split an LDM file into ``unet``, ``vae``, ``text``, ``control`` parts (prefixes removed).

    With ``use_ema`` the UNet weights come from ``model_ema.*`` (where the original stores the EMA
    copy under the parameter names with the dots removed). Unknown keys raise ``CheckpointError``.
    """
    parts: dict[str, StateDict] = {"unet": {}, "vae": {}, "text": {}, "control": {}}
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX, "control": CONTROL_PREFIX}
    unknown = []
    for key, tensor in state_dict.items():
        if key.startswith(_TRAINING_LEFTOVERS):
            continue
        part = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is not None:
            parts[part][key[len(prefixes[part]) :]] = tensor
        elif not (key in _SCHEDULE_BUFFERS or key.startswith("model_ema.")):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected keys outside any model: {_names(unknown)}")
    parts["text"] = _normalise_clip_keys(parts["text"])
    if use_ema:
        parts["unet"] = _ema_weights(state_dict, parts["unet"])
    return parts


def _normalise_clip_keys(text: StateDict) -> StateDict:
    """SD 1.x text encoder keys as our CLIPTextEncoder names them.

    Files differ on whether they store position_ids (an arange, sometimes saved as floats): never
    a weight, dropped. Older and merged files name the weights ``transformer.embeddings...``
    without ``text_model.`` (an earlier transformers layout): the prefix is put back.
    """
    if any(k.startswith("transformer.") for k in text) and not any(
        k.startswith("transformer.text_model.") for k in text
    ):
        text = {"transformer.text_model." + k.removeprefix("transformer."): v for k, v in text.items()}
    text.pop(POSITION_IDS_KEY, None)
    return text


def _ema_weights(state_dict: Mapping[str, torch.Tensor], unet: StateDict) -> StateDict:
    ema = {}
    for key in unet:
        ema_key = "model_ema." + ("diffusion_model." + key).replace(".", "")
        if ema_key not in state_dict:
            raise CheckpointError(f"use_ema asked for, but the file has no EMA weights ({ema_key} missing)")
        ema[key] = state_dict[ema_key]
    return ema


def _names(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


# ---------------------------------------------------------------------------------------------
# Strict loading into modules


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
            problems.append(f"{len(missing)} missing: {_names(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} with another shape: {_names(mismatched)}")
        if wrong_kind:
            problems.append(f"{len(wrong_kind)} not floating-point: {_names(wrong_kind)}")
        raise CheckpointError(f"{source}: the {what} weights do not fit the model; " + "; ".join(problems))
    on_meta = any(t.is_meta for t in expected.values())
    converted = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(converted, strict=True, assign=on_meta)


# ---------------------------------------------------------------------------------------------
# Configurations: from metadata, diffusers config files, or shapes


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
        )
    if kind == "ControlNetConfig":
        return ControlNetConfig(
            unet=_dataclass_from_dict(UNetConfig, data["unet"]),
            hint_channels=data["hint_channels"],
            hint_block_channels=tuple(data["hint_block_channels"]),
            global_average_pooling=data["global_average_pooling"],
        )
    raise ValueError(f"unknown configuration type {kind!r}")


def _dataclass_from_dict(cls, data: Mapping[str, object]):
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def _metadata_config(
    metadata: Mapping[str, str], source: str, key: str = _CONFIG_METADATA_KEY
) -> ModelConfig | ControlNetConfig | None:
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return _config_from_json(text)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{source}: its stored model configuration is invalid ({_first_line(error)})") from None


def _preset_for(model_channels: int, context_dim: int) -> ModelConfig | None:
    """The preset whose UNet has this width and text context: any preset of ``config.PRESETS``
    (SD 2.x gives sd21, the eps model, listed before sd21-v which has the same shapes)."""
    for candidate in PRESETS.values():
        if (candidate.unet.model_channels, candidate.unet.context_dim) == (model_channels, context_dim):
            return candidate
    return None


def _preset_from_shapes(unet: Mapping[str, torch.Tensor], source: str) -> ModelConfig:
    """The preset a UNet or ControlNet state dict (LDM keys, no prefix) was made for, from the
    width of its first convolution and of its cross-attention keys."""
    model_channels = _size(unet, "input_blocks.0.0.weight", 0, source)
    context_key = next((k for k in unet if k.endswith("attn2.to_k.weight")), None)
    if context_key is None:
        raise CheckpointError(f"{source}: cannot tell the model: no cross-attention weights (attn2.to_k)")
    context_dim = _size(unet, context_key, 1, source)
    found = _preset_for(model_channels, context_dim)
    if found is None:
        known = ", ".join(f"{c.name} ({c.unet.model_channels}, {c.unet.context_dim})" for c in PRESETS.values())
        raise CheckpointError(
            f"{source}: unrecognised model: model_channels={model_channels}, context_dim={context_dim}; known: {known}"
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


def _base_config_from_shapes(parts: Mapping[str, StateDict], prediction: str | None, path: Path) -> ModelConfig:
    config = _preset_from_shapes(parts["unet"], str(path))
    if config.name == "sd21":
        prediction = prediction or _prediction_from_yaml(path)
        if prediction is None:
            raise CheckpointError(
                f"{path}: an SD 2.x model; its eps (512 px) and v-prediction (768 px) versions have the same "
                "weights' shapes: say which with prediction='eps' or 'v' (command line: --prediction eps|v)"
            )
    return _with_prediction(config, prediction)


def _with_prediction(config: ModelConfig, prediction: str | None) -> ModelConfig:
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


def _controlnet_config_from_shapes(control: Mapping[str, torch.Tensor], source: str) -> ControlNetConfig:
    base = _preset_from_shapes(control, source)
    hint_channels = _size(control, "input_hint_block.0.weight", 1, source)
    widths = tuple(_size(control, f"input_hint_block.{i}.weight", 0, source) for i in (0, 4, 8, 12))
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
        raise CheckpointError(f"{source}: not a usable ControlNet ({_first_line(error)})") from None


# ---------------------------------------------------------------------------------------------
# Weights that are numbers

# The exponent bits of the 16-bit float formats: all set means infinite or NaN.
_EXPONENT_MASKS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def _has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds NaN or an infinity, read in place: no float32 copy of 16-bit weights.

    numpy's isfinite for float32/64, a test of the exponent bits for float16/bfloat16: 0.55 s for
    the 1.43 billion values of an SD 1.5 ControlNet full file (float16, bfloat16 or float32, 2-core
    CPU), where ``torch.isfinite(t).all()`` takes 3.9 to 12.7 s.
    """
    tensor = tensor.detach()
    mask = _EXPONENT_MASKS.get(tensor.dtype)
    if mask is not None:
        bits = tensor.view(torch.int16).numpy()
        return bool(np.any((bits & mask) == mask))
    if tensor.dtype in (torch.float32, torch.float64):
        return not bool(np.isfinite(tensor.numpy()).all())
    return not bool(torch.isfinite(tensor).all())  # other float types (float8, ...): rare


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that hold NaN or infinite values: a damaged file (a failed training step,
    a bad conversion or merge) that would otherwise give black or noise images without a word."""
    damaged = [key for key, tensor in tensors.items() if tensor.is_floating_point() and _has_non_finite(tensor)]
    if damaged:
        raise CheckpointError(
            f"{path}: {len(damaged)} tensors hold NaN or infinite values (first: {damaged[0]}); the file is damaged"
        )


# ---------------------------------------------------------------------------------------------
# Loading


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
    fmt = _detect_format(state_dict, path)
    if fmt != "ldm":
        raise CheckpointError(f"{path}: holds a ControlNet only ({fmt}), not a base model; pass it as a ControlNet")
    try:
        parts = split_ldm(state_dict, use_ema=use_ema)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    base_prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX) + (("model_ema.",) if use_ema else ())
    _check_finite({k: v for k, v in state_dict.items() if k.startswith(base_prefixes)}, path)
    config = _metadata_config(metadata, str(path))
    if isinstance(config, ModelConfig):
        config = _with_prediction(config, prediction)
    else:
        config = _base_config_from_shapes(parts, prediction, path)
    model = StableDiffusion(config, empty=True)
    source = f"{path.name} (ldm, {config.name})"
    load_strict(model.unet, parts["unet"], "UNet", source)
    load_strict(model.vae, parts["vae"], "VAE", source)
    load_strict(model.text_encoder, parts["text"], "text encoder", source)
    return model.to(dtype)


def load_controlnet(
    path: str | os.PathLike,
    base: ModelConfig | None = None,
    *,
    global_average_pooling: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> ControlNet:
    """A ControlNet from any of the formats in the module docstring.

    With ``base``, a ControlNet made for another base family (say SD 2.x for an SD 1.x base) is
    refused. ``global_average_pooling`` overrides the guess from the name (only the shuffle model pools).
    """
    path = Path(path)
    if path.is_dir():
        control, config, fmt = _read_diffusers_controlnet_folder(path)
    else:
        state_dict, metadata = read_state_dict(path)
        fmt = _detect_format(state_dict, path)
        if fmt == "diffusers-controlnet":
            _check_finite(state_dict, path)
            config = _diffusers_controlnet_config_from_shapes(state_dict, base, str(path))
            control = _from_diffusers(diffusers_unet.controlnet_diffusers_to_ldm, state_dict, config, path, fmt)
        else:
            control = _ldm_control_part(state_dict, fmt, path)
            prefix = "" if fmt == "ldm-control-bare" else CONTROL_PREFIX
            _check_finite({prefix + k: v for k, v in control.items()}, path)
            stored = _metadata_config(metadata, str(path), _CONTROL_METADATA_KEY)
            if isinstance(stored, ControlNetConfig):
                config = stored
            else:
                config = _controlnet_config_from_shapes(control, str(path))
    if global_average_pooling is not None:
        config = dataclasses.replace(config, global_average_pooling=global_average_pooling)
    if base is not None:
        check_compatible(config, base, path.name)
    model = build_empty(lambda: ControlNet(config))
    load_strict(model, control, "ControlNet", f"{path.name} ({fmt})")
    return model.to(dtype)


def _ldm_control_part(state_dict: StateDict, fmt: str, path: Path) -> StateDict:
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
            raise CheckpointError(f"{path}: {len(others)} unexpected keys beside control_model.*: {_names(others)}")
    return control


def check_compatible(control: ControlNetConfig, base: ModelConfig, source: str) -> None:
    """Refuse a ControlNet whose encoder copy does not match the base UNet (another SD family)."""
    if control.unet == base.unet:
        return
    family = {768: "SD 1.x", 1024: "SD 2.x"}
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


def _from_diffusers(convert, state_dict: StateDict, config, path: Path, fmt: str) -> StateDict:
    try:
        return convert(state_dict, config)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path.name} ({fmt}): {_first_line(error)}") from None


def _diffusers_controlnet_config_from_shapes(
    state_dict: Mapping[str, torch.Tensor], base: ModelConfig | None, source: str
) -> ControlNetConfig:
    # A single diffusers-layout file has no config.json: read the family off the shapes.
    names = ["conv_in.weight"] + [
        f"controlnet_cond_embedding.{n}.weight" for n in ("conv_in", "blocks.1", "blocks.3", "blocks.5")
    ]
    missing = [n for n in names if n not in state_dict]
    context_key = next((k for k in state_dict if k.endswith("attn2.to_k.weight")), None)
    if missing or context_key is None:
        raise CheckpointError(
            f"{source}: not a Stable Diffusion ControlNet in diffusers layout (no {_names(missing or ['attn2.to_k'])})"
        )
    model_channels, context_dim = _size(state_dict, names[0], 0, source), _size(state_dict, context_key, 1, source)
    found = (
        base
        if base is not None and (base.unet.model_channels, base.unet.context_dim) == (model_channels, context_dim)
        else _preset_for(model_channels, context_dim)
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
# diffusers folders

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(error)})") from None


def _read_diffusers_weights(folder: Path) -> StateDict:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return _read_finite_weights(folder / name)
    index = next(iter(sorted(folder.glob("*.safetensors.index.json"))), None)
    if index is not None:  # sharded: {"weight_map": {key: shard file}}
        weights: StateDict = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard name {shard!r} is not a file name in that folder")
            weights.update(_read_finite_weights(folder / shard))
        return weights
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(_WEIGHT_NAMES[:2])})")


def _read_finite_weights(path: Path) -> StateDict:
    tensors = read_state_dict(path)[0]
    _check_finite(tensors, path)
    return tensors


def _read_diffusers_controlnet_folder(folder: Path) -> tuple[StateDict, ControlNetConfig, str]:
    if (folder / "controlnet").is_dir():
        folder = folder / "controlnet"
    fmt = "diffusers-controlnet"
    config_json = _read_json(folder / "config.json")
    kind = config_json.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise CheckpointError(f"{folder}: holds a {kind}, not a ControlNet (ControlNetModel)")
    try:
        config = diffusers_unet.controlnet_config_from_diffusers(config_json)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{folder / 'config.json'}: not a ControlNet configuration ({_first_line(error)})"
        ) from None
    weights = _read_diffusers_weights(folder)
    return _from_diffusers(diffusers_unet.controlnet_diffusers_to_ldm, weights, config, folder, fmt), config, fmt


def _load_diffusers_base(folder: Path, *, prediction: str | None, dtype: torch.dtype) -> StableDiffusion:
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: not a diffusers model folder (no {part}/ inside)")
    try:
        unet_config = diffusers_unet.unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
        vae_json = _read_json(folder / "vae" / "config.json")
        vae_config = diffusers_vae.vae_config_from_diffusers(vae_json)
        text_config = diffusers_text.text_config_from_diffusers(_read_json(folder / "text_encoder" / "config.json"))
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: unusable diffusers config ({_first_line(error)})") from None
    schedule = _schedule_from_diffusers(folder / "scheduler" / "scheduler_config.json")
    if prediction is not None:
        schedule = dataclasses.replace(schedule, prediction=prediction)
    known = _preset_for(unet_config.model_channels, unet_config.context_dim)
    if known is not None and known.unet != unet_config:
        known = None  # the same widths, another UNet: not that preset
    config = ModelConfig(
        name=known.name if known is not None else "custom",
        unet=unet_config,
        vae=vae_config,
        text=text_config,
        schedule=schedule,
        native_resolution=int(vae_json.get("sample_size", 512)),
    )
    if known is not None and schedule.prediction == "v" and known.name == "sd21":
        config = config.replace(name="sd21-v")
    model = StableDiffusion(config, empty=True)
    parts = (
        ("unet", model.unet, diffusers_unet.unet_diffusers_to_ldm, unet_config, "UNet"),
        ("vae", model.vae, diffusers_vae.vae_diffusers_to_ldm, vae_config, "VAE"),
        ("text_encoder", model.text_encoder, diffusers_text.text_diffusers_to_ldm, text_config, "text encoder"),
    )
    for sub, module, convert, sub_config, what in parts:
        weights = _from_diffusers(convert, _read_diffusers_weights(folder / sub), sub_config, folder / sub, "diffusers")
        load_strict(module, weights, what, f"{folder.name}/{sub} (diffusers)")
    return model.to(dtype)


def _schedule_from_diffusers(path: Path) -> ScheduleConfig:
    if not path.is_file():
        return ScheduleConfig()
    data = _read_json(path)
    if data.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise CheckpointError(f"{path}: beta_schedule {data['beta_schedule']!r}; only scaled_linear is supported")
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(data.get("prediction_type", "epsilon"))
    if prediction is None:
        raise CheckpointError(f"{path}: prediction_type {data['prediction_type']!r}; allowed: epsilon, v_prediction")
    return ScheduleConfig(
        num_timesteps=int(data.get("num_train_timesteps", 1000)),
        linear_start=float(data.get("beta_start", 0.00085)),
        linear_end=float(data.get("beta_end", 0.012)),
        prediction=prediction,
    )


# ---------------------------------------------------------------------------------------------
# Writing


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata={"format": "pt", **metadata})


def _check_file_output(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path}: an existing folder; a .safetensors file is written there: choose another path")


def _check_folder_output(path: Path) -> None:
    """Refuse to replace anything but an empty folder or a diffusers model's folder (never, say, a
    home folder named by mistake), and a file where a folder is to be written."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: an existing file; a diffusers model is written as a folder: choose another path"
        )
    if not _holds_a_diffusers_model(path) and any(path.iterdir()):
        raise CheckpointError(
            f"{path}: an existing folder that holds no diffusers model (no model_index.json, nor a config.json "
            "naming a diffusers class); only a model folder is replaced: choose another path"
        )


def _holds_a_diffusers_model(path: Path) -> bool:
    """A pipeline folder (model_index.json) or a single model's folder: a config.json that names a
    diffusers class. Many folders hold a config.json (a training run's, a project's): not those."""
    if (path / "model_index.json").is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "_class_name" in config


def ldm_state_dict(
    model: StableDiffusion | None = None, controlnet: ControlNet | None = None
) -> dict[str, torch.Tensor]:
    """The LDM-layout state dict of a base model and/or a ControlNet (as the original files)."""
    tensors: dict[str, torch.Tensor] = {}
    if model is not None:
        tensors.update({UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()})
        tensors.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
        tensors.update({TEXT_PREFIX + k: v for k, v in model.text_encoder.state_dict().items()})
        if model.config.text.arch == "clip":
            # The original CLIP embedder stores position_ids; files people have mostly do too.
            tensors[TEXT_PREFIX + POSITION_IDS_KEY] = clip_position_ids(model.config.text)
    if controlnet is not None:
        tensors.update({CONTROL_PREFIX + k: v for k, v in controlnet.state_dict().items()})
    return tensors


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
    _check_file_output(path)
    metadata = {}
    if model is not None:
        metadata[_CONFIG_METADATA_KEY] = _config_to_json(model.config)
    if controlnet is not None:
        metadata[_CONTROL_METADATA_KEY] = _config_to_json(controlnet.config)
    _atomic_save(ldm_state_dict(model, controlnet), path, metadata)
    return path


def save_diffusers(
    path: str | os.PathLike, model: StableDiffusion | None = None, controlnet: ControlNet | None = None
) -> Path:
    """Write the diffusers layout.

    A base model becomes a pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``, and ``controlnet/`` if one is given). A
    ControlNet alone becomes a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``,
    or, for a path ending in ``.safetensors``, that single weights file.

    A folder is written beside ``path`` and then takes its place: the result holds exactly the new
    model's files, and a failure midway leaves what was at ``path`` as it was. An existing folder is
    replaced only if it is empty or holds a diffusers model; an existing file where a folder is to be
    written (or a folder where a file is) is refused.
    """
    path = Path(path)
    if model is None and controlnet is None:
        raise ValueError("nothing to save: give a model, a ControlNet or both")
    if model is None and path.suffix == ".safetensors":
        _check_file_output(path)
        _atomic_save(diffusers_unet.controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config), path, {})
        return path
    if model is not None and controlnet is not None:
        check_compatible(controlnet.config, model.config, "the ControlNet")
    _check_folder_output(path)
    with atomic_folder(path) as folder:
        if model is None:
            _write_diffusers_controlnet(folder, controlnet)
        else:
            _write_diffusers_pipeline(folder, model, controlnet)
    return path


def _write_diffusers_controlnet(folder: Path, controlnet: ControlNet) -> None:
    weights = diffusers_unet.controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config)
    _write_component(folder, weights, diffusers_unet.controlnet_config_to_diffusers(controlnet.config), "diffusion")


def _write_diffusers_pipeline(folder: Path, model: StableDiffusion, controlnet: ControlNet | None) -> None:
    config = model.config
    _write_component(
        folder / "unet",
        diffusers_unet.unet_ldm_to_diffusers(model.unet.state_dict(), config.unet),
        diffusers_unet.unet_config_to_diffusers(
            config.unet, sample_size=config.native_resolution // config.vae.downsample_factor
        ),
        "diffusion",
    )
    vae_json = diffusers_vae.vae_config_to_diffusers(config.vae, sample_size=config.native_resolution)
    _write_component(
        folder / "vae", diffusers_vae.vae_ldm_to_diffusers(model.vae.state_dict(), config.vae), vae_json, "diffusion"
    )
    _write_component(
        folder / "text_encoder",
        diffusers_text.text_ldm_to_diffusers(model.text_encoder.state_dict(), config.text),
        diffusers_text.text_config_to_diffusers(config.text),
        "model",
    )
    write_hf_tokenizer_files(folder / "tokenizer", pad_token_id=config.text.pad_token_id)
    _write_json(folder / "scheduler" / "scheduler_config.json", _scheduler_config(config.schedule))
    components = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    pipeline = "StableDiffusionPipeline"
    if controlnet is not None:
        _write_diffusers_controlnet(folder / "controlnet", controlnet)
        components["controlnet"] = ["diffusers", "ControlNetModel"]
        pipeline = "StableDiffusionControlNetPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **components}
    index.update({"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    _write_json(folder / "model_index.json", index)


def _write_component(folder: Path, weights: Mapping[str, torch.Tensor], config: dict, stem: str) -> None:
    name = "diffusion_pytorch_model.safetensors" if stem == "diffusion" else "model.safetensors"
    _atomic_save(weights, folder / name, {})
    _write_json(folder / "config.json", config)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _scheduler_config(schedule: ScheduleConfig) -> dict:
    """diffusers' DDIMScheduler set to the original's DDIM (REFERENCE.md section 4)."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": schedule.num_timesteps,
        "beta_start": schedule.linear_start,
        "beta_end": schedule.linear_end,
        "beta_schedule": "scaled_linear",
        "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[schedule.prediction],
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
    }


# ---------------------------------------------------------------------------------------------
# tool_transfer_control


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

"""The diffusers layout on disk: pipeline folders (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, maybe ``controlnet/``; SDXL's also ``text_encoder_2/`` and
``tokenizer_2/``), ControlNet and T2I-Adapter folders, and single diffusers-layout ControlNet
``.safetensors`` files.

Read into our (LDM) layout through the explicit key maps of ``diffusers_unet``, ``diffusers_vae``
and ``diffusers_text``, and written from it the same way; a folder is written whole or not at all
(`files.atomic_folder`), its files through `tensors.save_safetensors` and `files.atomic_file`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..config import ControlNetConfig, ModelConfig, ScheduleConfig, T2IAdapterConfig
from ..files import atomic_file, atomic_folder
from ..models.controlnet import ControlNet
from ..models.stable_diffusion import StableDiffusion
from . import diffusers_text, diffusers_unet, diffusers_unet_config, diffusers_vae, t2i_adapter
from .detect import check_compatible, diffusers_controlnet_config_from_shapes, preset_for
from .diffusers_tokenizer import write_hf_tokenizer_files
from .errors import CheckpointError, first_line
from .ldm import check_file_output
from .tensors import StateDict, check_finite, read_state_dict, save_safetensors

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# The subfolder of a pipeline that holds each part of a base model (as ldm.split_ldm names them).
PIPELINE_FOLDERS = {"unet": "unet", "vae": "vae", "text": "text_encoder"}
# SDXL: the second text encoder's folder; our model holds both encoders as one module, whose keys
# put each under its LDM name (text.DualTextEncoder: embedders.0, embedders.1).
SECOND_TEXT_FOLDER = "text_encoder_2"
_EMBEDDERS = ("embedders.0.", "embedders.1.")
_KEY_MAPS = {
    "unet": diffusers_unet.unet_diffusers_to_ldm,
    "vae": diffusers_vae.vae_diffusers_to_ldm,
    "text": diffusers_text.text_diffusers_to_ldm,
}


# ---------------------------------------------------------------------------------------------
# Reading


def read_pipeline_config(folder: Path, prediction: str | None = None) -> ModelConfig:
    """The configuration of a diffusers pipeline folder, from its config files; ``prediction``
    ("eps" or "v") overrides its scheduler's. A preset's name when the UNet is a preset's."""
    for part in PIPELINE_FOLDERS.values():
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: not a diffusers model folder (no {part}/ inside)")
    # An SDXL pipeline reads the penultimate hidden states of two text encoders (the second's folder
    # says it is SDXL: StableDiffusionXLPipeline.encode_prompt's hidden_states[-2]).
    sdxl = (folder / SECOND_TEXT_FOLDER).is_dir()
    try:
        unet_config = diffusers_unet_config.unet_config_from_diffusers(read_json(folder / "unet" / "config.json"))
        vae_json = read_json(folder / "vae" / "config.json")
        vae_config = diffusers_vae.vae_config_from_diffusers(vae_json)
        text_config = diffusers_text.text_config_from_diffusers(
            read_json(folder / "text_encoder" / "config.json"), penultimate_hidden_state=sdxl
        )
        text_2 = None
        if sdxl:
            text_2 = diffusers_text.text_config_from_diffusers(
                read_json(folder / SECOND_TEXT_FOLDER / "config.json"), penultimate_hidden_state=True
            )
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: unusable diffusers config ({first_line(error)})") from None
    schedule = _schedule_from_diffusers(folder / "scheduler" / "scheduler_config.json")
    if prediction is not None:
        schedule = dataclasses.replace(schedule, prediction=prediction)
    known = preset_for(unet_config.model_channels, unet_config.context_dim, unet_config.in_channels)
    if known is not None and known.unet != unet_config:
        known = None  # the same widths, another UNet: not that preset
    try:
        config = ModelConfig(
            name=known.name if known is not None else "custom",
            unet=unet_config,
            vae=vae_config,
            text=text_config,
            schedule=schedule,
            native_resolution=int(vae_json.get("sample_size", 512)),
            text_2=text_2,
        )
    except ValueError as error:  # the parts' configs do not fit together (say, a UNet's context width)
        raise CheckpointError(f"{folder}: unusable diffusers config ({first_line(error)})") from None
    if known is not None and schedule.prediction == "v" and known.name == "sd21":
        config = config.replace(name="sd21-v")
    return config


def read_pipeline_part(folder: Path, part: str, config: ModelConfig) -> StateDict:
    """The weights of one part of a pipeline folder ("unet", "vae" or "text"), in the LDM layout
    (keys without prefix), checked finite; one part at a time, so that a loader holds no more."""
    if part == "text" and config.text_2 is not None:
        weights: StateDict = {}
        for prefix, name, text in zip(
            _EMBEDDERS, (PIPELINE_FOLDERS["text"], SECOND_TEXT_FOLDER), (config.text, config.text_2), strict=True
        ):
            path = folder / name
            converted = _to_ldm(_KEY_MAPS["text"], read_weights(path), text, path, "diffusers")
            weights.update({prefix + k: v for k, v in converted.items()})
        return weights
    sub_config = {"unet": config.unet, "vae": config.vae, "text": config.text}[part]
    path = folder / PIPELINE_FOLDERS[part]
    return _to_ldm(_KEY_MAPS[part], read_weights(path), sub_config, path, "diffusers")


def _model_folder(folder: Path, subfolder: str, class_name: str, what: str, *aliases: str) -> tuple[Path, dict]:
    """The model's own folder (a pipeline's ``subfolder`` when given the pipeline) and its
    config.json, refused in one line when the config names another model class (than
    ``class_name`` or one of ``aliases``)."""
    if (folder / subfolder).is_dir():
        folder = folder / subfolder
    config_json = read_json(folder / "config.json")
    kind = config_json.get("_class_name", class_name)
    if kind not in (class_name, *aliases):
        raise CheckpointError(f"{folder}: holds a {kind}, not {what} ({class_name})")
    return folder, config_json


def read_controlnet_folder(folder: Path) -> tuple[StateDict, ControlNetConfig]:
    """A diffusers ControlNet folder's weights (LDM layout, no prefix) and configuration; a
    pipeline folder's ``controlnet/`` when given the pipeline."""
    # xinsir's union model: its config.json says ControlNetModel (with num_control_type), diffusers'
    # ControlNetUnionModel writes its own name, xinsir's code calls the class ControlNetModel_Union.
    folder, config_json = _model_folder(
        folder, "controlnet", "ControlNetModel", "a ControlNet", "ControlNetUnionModel", "ControlNetModel_Union"
    )
    try:
        config = diffusers_unet_config.controlnet_config_from_diffusers(config_json)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{folder / 'config.json'}: not a ControlNet configuration ({first_line(error)})"
        ) from None
    weights = read_weights(folder)
    control = _to_ldm(diffusers_unet.controlnet_diffusers_to_ldm, weights, config, folder, "diffusers-controlnet")
    return control, config


def read_adapter_folder(folder: Path) -> tuple[StateDict, T2IAdapterConfig]:
    """A diffusers ``T2IAdapter`` folder's weights (TencentARC layout) and configuration; a
    pipeline folder's ``adapter/`` when given the pipeline."""
    folder, config_json = _model_folder(folder, "adapter", "T2IAdapter", "a T2I-Adapter")
    config = t2i_adapter.config_from_diffusers(config_json, str(folder / "config.json"))
    weights = read_weights(folder)
    if t2i_adapter.detect_adapter_layout(weights, str(folder)) != "diffusers":  # TencentARC keys in a folder
        return t2i_adapter.strip_prefix(weights), config
    return t2i_adapter.adapter_diffusers_to_original(weights, config), config


def controlnet_from_file(
    state_dict: StateDict, base: ModelConfig | None, path: Path
) -> tuple[StateDict, ControlNetConfig]:
    """The weights (LDM layout, no prefix) and configuration of a single diffusers-layout
    ControlNet file, read as `tensors.read_state_dict`; its configuration from its shapes."""
    check_finite(state_dict, path)
    config = diffusers_controlnet_config_from_shapes(state_dict, base, str(path))
    if base is not None:  # a ControlNet of another family: said before its keys are renamed
        check_compatible(config, base, path.name)
    control = _to_ldm(diffusers_unet.controlnet_diffusers_to_ldm, state_dict, config, path, "diffusers-controlnet")
    return control, config


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({first_line(error)})") from None


def read_weights(folder: Path) -> StateDict:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return _read_finite_weights(folder / name)
    index = next(iter(sorted(folder.glob("*.safetensors.index.json"))), None)
    if index is not None:  # sharded: {"weight_map": {key: shard file}}
        weights: StateDict = {}
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard name {shard!r} is not a file name in that folder")
            weights.update(_read_finite_weights(folder / shard))
        return weights
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(_WEIGHT_NAMES[:2])})")


def _read_finite_weights(path: Path) -> StateDict:
    tensors = read_state_dict(path)[0]
    check_finite(tensors, path)
    return tensors


def _to_ldm(convert: Callable, state_dict: StateDict, config: object, path: Path, fmt: str) -> StateDict:
    try:
        return convert(state_dict, config)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path.name} ({fmt}): {first_line(error)}") from None


def _schedule_from_diffusers(path: Path) -> ScheduleConfig:
    if not path.is_file():
        return ScheduleConfig()
    data = read_json(path)
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
        check_file_output(path)
        save_safetensors(_controlnet_weights(controlnet), path, {})
        return path
    if model is not None and controlnet is not None:
        check_compatible(controlnet.config, model.config, "the ControlNet")
    _check_folder_output(path)
    with atomic_folder(path) as folder:
        if model is None:
            _write_controlnet(folder, controlnet)
        else:
            _write_pipeline(folder, model, controlnet)
    return path


def save_adapter_folder(path: str | os.PathLike, weights: Mapping[str, torch.Tensor], config: T2IAdapterConfig) -> Path:
    """A T2I-Adapter (ours: TencentARC's key names) as a diffusers ``T2IAdapter`` folder
    (``config.json`` + ``diffusion_pytorch_model.safetensors``), written as `save_diffusers` writes
    folders: beside ``path``, then in its place."""
    path = Path(path)
    config_json = {"_class_name": "T2IAdapter", **t2i_adapter.config_to_diffusers(config)}
    _check_folder_output(path)
    with atomic_folder(path) as folder:
        _write_component(folder, t2i_adapter.adapter_original_to_diffusers(weights, config), config_json, "diffusion")
    return path


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


def _controlnet_weights(controlnet: ControlNet) -> StateDict:
    return diffusers_unet.controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config)


def _write_controlnet(folder: Path, controlnet: ControlNet) -> None:
    config = diffusers_unet_config.controlnet_config_to_diffusers(controlnet.config)
    _write_component(folder, _controlnet_weights(controlnet), config, "diffusion")


def _write_pipeline(folder: Path, model: StableDiffusion, controlnet: ControlNet | None) -> None:
    config = model.config
    _write_component(
        folder / "unet",
        diffusers_unet.unet_ldm_to_diffusers(model.unet.state_dict(), config.unet),
        diffusers_unet_config.unet_config_to_diffusers(
            config.unet, sample_size=config.native_resolution // config.vae.downsample_factor
        ),
        "diffusion",
    )
    vae_json = diffusers_vae.vae_config_to_diffusers(config.vae, sample_size=config.native_resolution)
    _write_component(
        folder / "vae", diffusers_vae.vae_ldm_to_diffusers(model.vae.state_dict(), config.vae), vae_json, "diffusion"
    )
    components = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **_write_text_encoders(folder, model),
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    _write_json(folder / "scheduler" / "scheduler_config.json", _scheduler_config(config.schedule))
    sdxl = config.text_2 is not None
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    if controlnet is not None:
        _write_controlnet(folder / "controlnet", controlnet)
        union = controlnet.config.union is not None
        components["controlnet"] = ["diffusers", "ControlNetUnionModel" if union else "ControlNetModel"]
        pipeline = "StableDiffusionXLControlNetPipeline" if sdxl else "StableDiffusionControlNetPipeline"
        pipeline = "StableDiffusionXLControlNetUnionPipeline" if union else pipeline
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **components}
    if sdxl:  # as stabilityai/stable-diffusion-xl-base-1.0's model_index.json
        index.update({"force_zeros_for_empty_prompt": True, "add_watermarker": None})
    else:
        index.update(
            {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
        )
    _write_json(folder / "model_index.json", index)


def _write_text_encoders(folder: Path, model: StableDiffusion) -> dict[str, list[str]]:
    """``text_encoder/`` and ``tokenizer/`` (and SDXL's ``text_encoder_2/``, ``tokenizer_2/``: the
    same BPE, padded with 0 as open_clip pads); their model_index.json entries."""
    config, weights = model.config, model.text_encoder.state_dict()
    encoders = [("", config.text, weights)]
    if config.text_2 is not None:
        encoders = [
            (suffix, text, {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
            for suffix, text, prefix in zip(("", "_2"), (config.text, config.text_2), _EMBEDDERS, strict=True)
        ]
    components = {}
    for suffix, text, state in encoders:
        text_json = diffusers_text.text_config_to_diffusers(text)
        converted = diffusers_text.text_ldm_to_diffusers(state, text)
        _write_component(folder / f"text_encoder{suffix}", converted, text_json, "model")
        write_hf_tokenizer_files(folder / f"tokenizer{suffix}", pad_token_id=text.pad_token_id)
        components[f"text_encoder{suffix}"] = ["transformers", text_json["architectures"][0]]
        components[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    return components


def _write_component(folder: Path, weights: Mapping[str, torch.Tensor], config: dict, stem: str) -> None:
    name = "diffusion_pytorch_model.safetensors" if stem == "diffusion" else "model.safetensors"
    save_safetensors(weights, folder / name, {})
    _write_json(folder / "config.json", config)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _scheduler_config(schedule: ScheduleConfig) -> dict:
    """diffusers' DDIMScheduler set to the original's DDIM (docs/reference.md, "Sampling as the original does it")."""
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

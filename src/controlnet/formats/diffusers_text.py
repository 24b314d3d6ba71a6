"""Text encoder: our (LDM) layout <-> the diffusers ``text_encoder/`` folder layout.

Our keys are those of an LDM checkpoint after ``cond_stage_model.`` (see :mod:`controlnet.models.text`).
The diffusers side is what ``text_encoder/model.safetensors`` holds and diffusers' own converter
writes: HF ``CLIPTextModel`` keys *with* the ``text_model.`` prefix
(``text_model.encoder.layers.0.self_attn.q_proj.weight``). transformers 5 names the parameters of an
in-memory ``CLIPTextModel`` without that prefix and strips it when reading a file, so load such a
model from these dicts by removing ``text_model.``, strictly.

The diffusers layout holds exactly the layers the output depends on, always followed by
``final_layer_norm``:

* SD 1.x (``clip``, last layer): a plain renaming, all layers.
* SD 2.x (``openclip``, penultimate): diffusers' convention is a ``CLIPTextModel`` of
  ``layers - 1`` = 23 layers with ``hidden_act="gelu"``, whose ``last_hidden_state`` *is* the
  penultimate output with ``ln_final`` applied. Each ``in_proj`` is split into ``q/k/v_proj``.
  The last resblock, ``text_projection`` and ``logit_scale`` have no place there and are dropped:
  **LDM -> diffusers is lossy for exactly these never-used tensors**. Diffusers -> LDM recreates
  them as zeros, so the result is the full SD 2.x layout (loadable by the original code) and an
  identical model: the placeholder block is never run, and an all-zero pre-LN residual block would
  be the identity anyway.

* SDXL (``final_layer_norm=False``: the pipeline reads ``hidden_states[-2]``, not
  ``last_hidden_state``): the whole model, every layer. ``text_encoder/`` is CLIP ViT-L as for SD 1.x;
  ``text_encoder_2/`` is a ``CLIPTextModelWithProjection`` (``gelu``) whose ``text_projection.weight``
  is open_clip's ``text_projection`` transposed (a Linear stores [out, in], open_clip multiplies by
  [in, out]: diffusers' converter transposes too); ``logit_scale`` alone has no place there.

Consequently :func:`text_config_from_diffusers` maps a ``gelu`` config of ``n`` layers to
``arch="openclip"``, ``layers=n+1``, ``output_layer="penultimate"``, ``projection_dim=width`` (the
SD 2.x preset for n = 23), and a ``quick_gelu`` config to ``arch="clip"``, ``layers=n``,
``output_layer="last"``; told that the pipeline reads the penultimate hidden state (SDXL's folders:
``penultimate_hidden_state=True``), to ``layers=n``, ``output_layer="penultimate"``,
``final_layer_norm=False`` and, for a model with projection, its ``projection_dim``. Diffusers ->
LDM -> diffusers is bit-identical; LDM -> diffusers -> LDM is bit-identical except for the
placeholders. Tensors are only renamed, split, transposed (views) or concatenated. ``position_ids``
entries (old files of either layout) are dropped on read and never written.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from controlnet.config import TextEncoderConfig
from controlnet.models.text import POSITION_IDS_KEY, build_text_encoder, layers_used

_DIFFUSERS_POSITION_IDS = "text_model.embeddings.position_ids"
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, used by both CLIP and OpenCLIP
_FUSED = ("q", "k", "v")  # order of the three blocks of open_clip's in_proj_weight / in_proj_bias


def _layer_names(cfg: TextEncoderConfig, i: int) -> tuple[dict[str, str], dict[str, tuple[str, str, str]]]:
    """Renamed and split (ours -> q, k, v) keys of layer ``i``."""
    theirs = f"text_model.encoder.layers.{i}."
    renames: dict[str, str] = {}
    splits: dict[str, tuple[str, str, str]] = {}
    if cfg.arch == "clip":
        ours = f"transformer.text_model.encoder.layers.{i}."
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            for p in ("weight", "bias"):
                renames[f"{ours}{module}.{p}"] = f"{theirs}{module}.{p}"
        pairs = {"layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    else:
        ours = f"model.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            splits[f"{ours}attn.in_proj_{p}"] = tuple(f"{theirs}self_attn.{x}_proj.{p}" for x in _FUSED)
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
    for ours_module, their_module in pairs.items():
        for p in ("weight", "bias"):
            renames[f"{ours}{ours_module}.{p}"] = f"{theirs}{their_module}.{p}"
    return renames, splits


_PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's, [projection_dim, width]


def _sd2_convention(cfg: TextEncoderConfig) -> bool:
    """diffusers' SD 2.x text encoder: the layers before the output, whose last_hidden_state (after
    final_layer_norm) is the penultimate output; no projection."""
    return cfg.output_layer == "penultimate" and cfg.final_layer_norm


def diffusers_layers(cfg: TextEncoderConfig) -> int:
    """Layers of the diffusers model: all, but one fewer in the SD 2.x convention."""
    return layers_used(cfg) if _sd2_convention(cfg) else cfg.layers


def has_projection(cfg: TextEncoderConfig) -> bool:
    """Whether the diffusers model is a ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``)."""
    return cfg.pooled and not _sd2_convention(cfg)


def key_tables(
    cfg: TextEncoderConfig,
) -> tuple[dict[str, str], dict[str, tuple[str, str, str]], dict[str, str], list[str]]:
    """(renames ours -> theirs, splits ours -> (q, k, v), transposes ours -> theirs, our keys
    diffusers cannot hold)."""
    if cfg.arch == "clip":
        top = "transformer.text_model."
        renames = {
            f"{top}embeddings.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            f"{top}embeddings.position_embedding.weight": "text_model.embeddings.position_embedding.weight",
            f"{top}final_layer_norm.weight": "text_model.final_layer_norm.weight",
            f"{top}final_layer_norm.bias": "text_model.final_layer_norm.bias",
        }
    else:
        renames = {
            "model.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "model.positional_embedding": "text_model.embeddings.position_embedding.weight",
            "model.ln_final.weight": "text_model.final_layer_norm.weight",
            "model.ln_final.bias": "text_model.final_layer_norm.bias",
        }
    splits: dict[str, tuple[str, str, str]] = {}
    kept = diffusers_layers(cfg)
    for i in range(kept):
        layer_renames, layer_splits = _layer_names(cfg, i)
        renames.update(layer_renames)
        splits.update(layer_splits)
    dropped: list[str] = []
    for i in range(kept, cfg.layers):
        layer_renames, layer_splits = _layer_names(cfg, i)
        dropped += [*layer_renames, *layer_splits]
    transposes: dict[str, str] = {}
    if cfg.arch == "openclip" and cfg.projection_dim is not None:
        if has_projection(cfg):
            transposes["model.text_projection"] = _PROJECTION
        else:
            dropped.append("model.text_projection")
        dropped.append("model.logit_scale")
    return renames, splits, transposes, dropped


def _shapes(cfg: TextEncoderConfig) -> dict[str, torch.Size]:
    """Shapes of our parameters, read off the module built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    return {key: value.shape for key, value in model.state_dict().items()}


def _check_keys(actual: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - actual), sorted(actual - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def text_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our text-encoder state dict (keys after ``cond_stage_model.``) -> diffusers file keys."""
    renames, splits, transposes, dropped = key_tables(cfg)
    keys = set(sd) - {POSITION_IDS_KEY}
    _check_keys(keys, {*renames, *splits, *transposes, *dropped}, "text encoder state dict")
    out = {theirs: sd[ours] for ours, theirs in renames.items()}
    for ours, names in splits.items():
        out.update(zip(names, sd[ours].chunk(3, dim=0), strict=True))
    out.update({theirs: sd[ours].t() for ours, theirs in transposes.items()})
    return out


def text_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Diffusers ``text_encoder`` file keys -> our state dict (keys after ``cond_stage_model.``).

    Our keys the diffusers layout cannot hold (see the module docstring) come back as zeros.
    """
    if not any(k.startswith("text_model.") for k in sd):
        # transformers 5's save_pretrained names CLIPTextModel weights without the prefix.
        sd = {k if k == _PROJECTION else "text_model." + k: v for k, v in sd.items()}
    renames, splits, transposes, dropped = key_tables(cfg)
    keys = set(sd) - {_DIFFUSERS_POSITION_IDS}
    expected = {*renames.values(), *(n for names in splits.values() for n in names), *transposes.values()}
    _check_keys(keys, expected, "diffusers text encoder")
    out = {ours: sd[theirs] for ours, theirs in renames.items()}
    for ours, names in splits.items():
        out[ours] = torch.cat([sd[n] for n in names], dim=0)
    out.update({ours: sd[theirs].t() for ours, theirs in transposes.items()})
    if dropped:
        like = sd["text_model.embeddings.token_embedding.weight"]
        shapes = _shapes(cfg)
        for ours in dropped:
            out[ours] = torch.zeros(shapes[ours], dtype=like.dtype, device=like.device)
    return out


def text_config_to_diffusers(cfg: TextEncoderConfig) -> dict[str, object]:
    """``text_encoder/config.json`` of the equivalent HF ``CLIPTextModel`` (``CLIPTextModelWithProjection``
    for SDXL's second encoder)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if has_projection(cfg) else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": diffusers_layers(cfg),
        "num_attention_heads": cfg.heads,
        "hidden_act": cfg.activation,
        "layer_norm_eps": _LAYER_NORM_EPS,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": cfg.projection_dim if cfg.projection_dim is not None else cfg.width,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": cfg.pad_token_id,
    }


def text_config_from_diffusers(d: Mapping[str, object], penultimate_hidden_state: bool = False) -> TextEncoderConfig:
    """Our config for a diffusers ``text_encoder/config.json`` (an HF ``CLIPTextConfig`` dict).

    The activation tells the family apart: ``quick_gelu`` is OpenAI CLIP (SD 1.x), ``gelu`` OpenCLIP
    (SD 2.x, one placeholder layer added back; see the module docstring). Which output the pipeline
    reads is not in the encoder's config: ``penultimate_hidden_state`` for SDXL's two encoders
    (``hidden_states[-2]``, every layer stored, no final LayerNorm).
    """
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ValueError(f"expected a CLIPTextModel config (model_type 'clip_text_model'), got {model_type!r}")
    eps = float(d.get("layer_norm_eps", _LAYER_NORM_EPS))
    if abs(eps - _LAYER_NORM_EPS) > 1e-12:
        raise ValueError(f"layer_norm_eps must be {_LAYER_NORM_EPS} (CLIP and OpenCLIP), got {eps}")
    act = d.get("hidden_act", "quick_gelu")
    common = {
        "vocab_size": int(d.get("vocab_size", 49408)),
        "max_length": int(d.get("max_position_embeddings", 77)),
        "width": int(d["hidden_size"]),
        "heads": int(d["num_attention_heads"]),
        "mlp_width": int(d["intermediate_size"]),
    }
    layers = int(d["num_hidden_layers"])
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"hidden_act must be 'quick_gelu' (CLIP) or 'gelu' (OpenCLIP), got {act!r}")
    if penultimate_hidden_state:
        arch = "clip" if act == "quick_gelu" else "openclip"
        with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        if with_projection and arch == "clip":
            raise ValueError("a CLIP (quick_gelu) text encoder with projection has no LDM counterpart here")
        projection = int(d.get("projection_dim", common["width"])) if with_projection else None
        return TextEncoderConfig(
            arch=arch,
            layers=layers,
            output_layer="penultimate",
            final_layer_norm=False,
            projection_dim=projection,
            **common,
        )
    if act == "quick_gelu":
        return TextEncoderConfig(arch="clip", layers=layers, output_layer="last", **common)
    if act == "gelu":
        return TextEncoderConfig(
            arch="openclip", layers=layers + 1, output_layer="penultimate", projection_dim=common["width"], **common
        )
    raise ValueError(f"hidden_act must be 'quick_gelu' (CLIP) or 'gelu' (OpenCLIP), got {act!r}")

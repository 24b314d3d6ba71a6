"""Key map between our VAE (LDM layout) and diffusers' ``AutoencoderKL`` layout, plus its config.json.

Keys on both sides are relative: ours are an LDM checkpoint's keys without ``first_stage_model.``,
diffusers' are those of ``vae/diffusion_pytorch_model.safetensors``. The renaming is a table built
from the config (:func:`vae_key_table`); the only tensor change is the mid-block attention weights,
1x1 convs ``[C, C, 1, 1]`` in LDM files and Linear ``[C, C]`` in diffusers, converted by views, so
round trips are bit-identical.

Layout differences the table encodes:

* ``down.N.block.M`` <-> ``down_blocks.N.resnets.M`` and ``nin_shortcut`` <-> ``conv_shortcut``;
* ``down.N.downsample`` <-> ``down_blocks.N.downsamplers.0``, ``up.N.upsample`` <-> ``up_blocks.K.upsamplers.0``;
* decoder levels run in opposite order: LDM ``up.N`` (N = 0 is full resolution) is diffusers
  ``up_blocks.(L - 1 - N)`` (``up_blocks.0`` runs first, at the lowest resolution);
* ``mid.block_1/attn_1/block_2`` <-> ``mid_block.resnets.0/attentions.0/resnets.1``, with
  ``norm, q, k, v, proj_out`` <-> ``group_norm, to_q, to_k, to_v, to_out.0``;
* ``norm_out`` <-> ``conv_norm_out``.

Old diffusers files (before the attention refactor, e.g. the original SD 1.5 repository) name the
attention ``query, key, value, proj_attn``; :func:`vae_diffusers_to_ldm` accepts those too.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

from ..config import VAEConfig

__all__ = [
    "VAEKeyPair",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_diffusers_to_ldm",
    "vae_key_table",
    "vae_ldm_to_diffusers",
]

_PARAMS = ("weight", "bias")
_RESNET_PARTS = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_SHORTCUT = ("nin_shortcut", "conv_shortcut")
# LDM AttnBlock name -> diffusers Attention name; q/k/v/proj_out are the ones stored as 1x1 convs.
_ATTN_PARTS = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_ATTN_CONV_PARTS = frozenset({"q", "k", "v", "proj_out"})
# Pre-0.15 diffusers attention names -> current ones.
_LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


class VAEKeyPair(NamedTuple):
    """One parameter: its LDM key, its diffusers key, and whether it is an attention 1x1-conv/Linear weight."""

    ldm: str
    diffusers: str
    reshape: bool


def _pairs(ldm_module: str, diffusers_module: str, reshape_weight: bool = False) -> list[VAEKeyPair]:
    return [
        VAEKeyPair(f"{ldm_module}.{p}", f"{diffusers_module}.{p}", reshape_weight and p == "weight") for p in _PARAMS
    ]


def _resnet(ldm_block: str, diffusers_block: str, has_shortcut: bool) -> list[VAEKeyPair]:
    parts = _RESNET_PARTS + ((_SHORTCUT,) if has_shortcut else ())
    return [pair for ours, theirs in parts for pair in _pairs(f"{ldm_block}.{ours}", f"{diffusers_block}.{theirs}")]


def _mid(ldm_side: str, diffusers_side: str) -> list[VAEKeyPair]:
    table = _resnet(f"{ldm_side}.mid.block_1", f"{diffusers_side}.mid_block.resnets.0", has_shortcut=False)
    for ours, theirs in _ATTN_PARTS:
        table += _pairs(
            f"{ldm_side}.mid.attn_1.{ours}",
            f"{diffusers_side}.mid_block.attentions.0.{theirs}",
            reshape_weight=ours in _ATTN_CONV_PARTS,
        )
    table += _resnet(f"{ldm_side}.mid.block_2", f"{diffusers_side}.mid_block.resnets.1", has_shortcut=False)
    return table


@functools.lru_cache(maxsize=8)
def vae_key_table(cfg: VAEConfig) -> tuple[VAEKeyPair, ...]:
    """Every VAE parameter of ``cfg`` as (LDM key, diffusers key, reshape flag), in LDM state-dict order."""
    levels = len(cfg.ch_mult)
    widths = [cfg.ch * m for m in cfg.ch_mult]
    table = _pairs("encoder.conv_in", "encoder.conv_in")

    block_in = cfg.ch
    for n in range(levels):
        for m in range(cfg.num_res_blocks):
            # A block gets a 1x1 shortcut exactly when it changes the width.
            table += _resnet(
                f"encoder.down.{n}.block.{m}", f"encoder.down_blocks.{n}.resnets.{m}", block_in != widths[n]
            )
            block_in = widths[n]
        if n != levels - 1:
            table += _pairs(f"encoder.down.{n}.downsample.conv", f"encoder.down_blocks.{n}.downsamplers.0.conv")
    table += _mid("encoder", "encoder")
    table += _pairs("encoder.norm_out", "encoder.conv_norm_out")
    table += _pairs("encoder.conv_out", "encoder.conv_out")

    table += _pairs("decoder.conv_in", "decoder.conv_in")
    table += _mid("decoder", "decoder")
    for n in range(levels):
        k = levels - 1 - n  # diffusers counts decoder levels in execution order
        # Level n reads the output of level n + 1 (or of the mid block, for the last level).
        block_in = widths[n + 1] if n + 1 < levels else widths[-1]
        for m in range(cfg.num_res_blocks + 1):
            table += _resnet(f"decoder.up.{n}.block.{m}", f"decoder.up_blocks.{k}.resnets.{m}", block_in != widths[n])
            block_in = widths[n]
        if n != 0:
            table += _pairs(f"decoder.up.{n}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    table += _pairs("decoder.norm_out", "decoder.conv_norm_out")
    table += _pairs("decoder.conv_out", "decoder.conv_out")

    table += _pairs("quant_conv", "quant_conv")
    table += _pairs("post_quant_conv", "post_quant_conv")
    return tuple(table)


def _check_keys(given: Iterable[str], expected: Iterable[str], layout: str) -> None:
    given_set, expected_set = set(given), set(expected)
    unknown = sorted(given_set - expected_set)
    missing = sorted(expected_set - given_set)
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown (first: {', '.join(unknown[:5])})")
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:5])})")
        raise ValueError(f"VAE weights do not match the {layout} layout for this config: {'; '.join(parts)}")


def _conv_to_linear(key: str, t: Tensor) -> Tensor:
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.flatten(1)
    if t.ndim == 2:  # already Linear-shaped (some converted files); keep as is
        return t
    raise ValueError(f"{key}: expected a [C, C, 1, 1] or [C, C] attention weight, got {list(t.shape)}")


def _linear_to_conv(key: str, t: Tensor) -> Tensor:
    if t.ndim == 2:
        return t[:, :, None, None]
    if t.ndim == 4 and t.shape[2:] == (1, 1):  # already conv-shaped; keep as is
        return t
    raise ValueError(f"{key}: expected a [C, C] or [C, C, 1, 1] attention weight, got {list(t.shape)}")


def vae_ldm_to_diffusers(sd: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """Our (LDM, prefix stripped) VAE weights -> diffusers ``AutoencoderKL`` weights.

    Tensors are shared (attention weights are views), not copied. Raises ``ValueError`` when the
    keys are not exactly those of ``cfg``.
    """
    table = vae_key_table(cfg)
    _check_keys(sd, (p.ldm for p in table), "LDM (first_stage_model.*)")
    return {p.diffusers: _conv_to_linear(p.ldm, sd[p.ldm]) if p.reshape else sd[p.ldm] for p in table}


def _modern_attention_key(key: str) -> str:
    head, sep, tail = key.partition(".mid_block.attentions.0.")
    if not sep:
        return key
    name, dot, param = tail.rpartition(".")
    return f"{head}{sep}{_LEGACY_ATTN_NAMES.get(name, name)}{dot}{param}"


def vae_diffusers_to_ldm(sd: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` weights -> our (LDM, prefix stripped) VAE weights.

    Accepts the legacy attention names (``query``, ``key``, ``value``, ``proj_attn``) as well.
    Tensors are shared, not copied. Raises ``ValueError`` when the keys are not exactly those of ``cfg``.
    """
    renamed: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        modern = _modern_attention_key(key)
        if modern in renamed:
            raise ValueError(f"VAE weights hold both legacy and current names for {modern}")
        renamed[modern] = tensor
    table = vae_key_table(cfg)
    _check_keys(renamed, (p.diffusers for p in table), "diffusers AutoencoderKL")
    return {
        p.ldm: _linear_to_conv(p.diffusers, renamed[p.diffusers]) if p.reshape else renamed[p.diffusers] for p in table
    }


def vae_config_to_diffusers(cfg: VAEConfig, *, sample_size: int = 512) -> dict[str, Any]:
    """``config.json`` of a diffusers ``AutoencoderKL`` with the same architecture as ``cfg``.

    ``sample_size`` (the image size diffusers' tiling uses; 512 for SD 1.x, 768 for SD 2.x-v) is not
    part of :class:`VAEConfig`. Raises ``ValueError`` for configs diffusers cannot express: a
    ``z_channels`` different from ``embed_dim`` (diffusers has one ``latent_channels``) or a first
    level wider than ``ch`` (diffusers' ``conv_in`` outputs ``block_out_channels[0]``).
    """
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError(f"diffusers needs z_channels == embed_dim, got {cfg.z_channels} and {cfg.embed_dim}")
    if cfg.ch_mult[0] != 1:
        raise ValueError(f"diffusers needs ch_mult[0] == 1, got ch_mult={cfg.ch_mult}")
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": [_DOWN_BLOCK] * levels,
        "up_block_types": [_UP_BLOCK] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scale_factor,
    }


# diffusers.AutoencoderKL's constructor defaults, used for keys a config.json leaves out (as diffusers does).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (_DOWN_BLOCK,),
    "up_block_types": (_UP_BLOCK,),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def vae_config_from_diffusers(d: Mapping[str, Any]) -> VAEConfig:
    """A :class:`VAEConfig` from a diffusers ``AutoencoderKL`` ``config.json`` (as a dict).

    Keys the VAE's maths does not depend on (``sample_size``, ``force_upcast``, ``_*``) are ignored.
    Raises ``ValueError`` for features this VAE does not implement (other block types or
    activations, a latent shift or per-channel statistics, missing quant convs or mid attention).
    """
    class_name = d.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"expected a diffusers AutoencoderKL config, got _class_name={class_name!r}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in _DIFFUSERS_DEFAULTS}}

    unsupported = []
    if c["act_fn"] != "silu":
        unsupported.append(f"act_fn={c['act_fn']!r}")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if c[key] is not None:
            unsupported.append(f"{key}={c[key]!r}")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not c[key]:
            unsupported.append(f"{key}={c[key]!r}")
    if any(t != _DOWN_BLOCK for t in c["down_block_types"]):
        unsupported.append(f"down_block_types={list(c['down_block_types'])}")
    if any(t != _UP_BLOCK for t in c["up_block_types"]):
        unsupported.append(f"up_block_types={list(c['up_block_types'])}")
    if unsupported:
        raise ValueError(f"unsupported diffusers AutoencoderKL config: {', '.join(unsupported)}")

    widths = tuple(int(w) for w in c["block_out_channels"])
    if not (len(widths) == len(c["down_block_types"]) == len(c["up_block_types"])):
        raise ValueError(
            f"block_out_channels ({len(widths)}), down_block_types ({len(c['down_block_types'])}) and "
            f"up_block_types ({len(c['up_block_types'])}) must have one entry per level"
        )
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {list(widths)} are not multiples of the first width {ch}")
    return VAEConfig(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=int(c["layers_per_block"]),
        z_channels=int(c["latent_channels"]),
        embed_dim=int(c["latent_channels"]),
        scale_factor=float(c["scaling_factor"]),
        norm_groups=int(c["norm_num_groups"]),
    )

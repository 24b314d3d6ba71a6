"""The UNet and the ControlNet between our (original LDM) key layout and diffusers' layout.

Two things live here:

* **Key maps.** :func:`unet_key_pairs` and :func:`controlnet_key_pairs` list every parameter as an
  ``(ldm_name, diffusers_name)`` pair, built from the config the same way the original
  ``openaimodel.UNetModel`` / ``cldm.ControlNet`` build their modules (levels, ResBlocks per level,
  which levels carry a transformer, transformer depth). Names are relative to
  ``model.diffusion_model.`` (UNet) and ``control_model.`` (ControlNet) on the LDM side and to the
  diffusers model (``UNet2DConditionModel`` / ``ControlNetModel``) on the other. The four
  ``*_ldm_to_diffusers`` / ``*_diffusers_to_ldm`` functions rename a state dict strictly with those
  tables: an unknown or a missing key is a ``ValueError``. Tensors are passed through as the same
  objects; the only shape change is the 1x1 conv <-> linear reshape of a transformer's
  ``proj_in``/``proj_out`` when a file's weights disagree with the config (both layouts store
  ``[C, C, 1, 1]`` for SD 1.x and ``[C, C]`` for SD 2.x, so for consistent files nothing changes).

* **Config translation** to and from the ``config.json`` dicts diffusers' ``from_config`` reads.
  diffusers' ``attention_head_dim`` is, despite its name, the number of heads (per level when it is
  a list): diffusers builds each transformer with ``num_attention_heads = attention_head_dim[level]``
  heads of width ``channels // num_attention_heads`` (``UNet2DConditionModel.__init__`` sets
  ``num_attention_heads = num_attention_heads or attention_head_dim``). So SD 1.x (``num_heads=8``)
  is ``attention_head_dim=8`` and SD 2.x (``num_head_channels=64``) is ``[5, 10, 20, 20]``; the
  middle block uses the last level's entry, the decoder levels use the entries of their encoder
  twins (diffusers reverses the list for its up blocks).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..config import ControlNetConfig, UNetConfig

Pair = tuple[str, str]

_PARAMS = ("weight", "bias")


# --------------------------------------------------------------------------------------------------
# The name tables, one generator per kind of block.
# --------------------------------------------------------------------------------------------------


def _leaf_pairs(ldm: str, diffusers: str, params: tuple[str, ...] = _PARAMS) -> Iterator[Pair]:
    """A single layer (conv, linear or norm): its weight and bias."""
    for param in params:
        yield f"{ldm}.{param}", f"{diffusers}.{param}"


def time_embedding_pairs() -> Iterator[Pair]:
    """``time_embed`` (Linear, SiLU, Linear) <-> ``time_embedding.linear_1/linear_2``."""
    yield from _leaf_pairs("time_embed.0", "time_embedding.linear_1")
    yield from _leaf_pairs("time_embed.2", "time_embedding.linear_2")


def conv_in_pairs() -> Iterator[Pair]:
    """The first conv, ``input_blocks.0.0`` <-> ``conv_in``."""
    yield from _leaf_pairs("input_blocks.0.0", "conv_in")


def conv_out_pairs() -> Iterator[Pair]:
    """The UNet's output head: ``out`` (GroupNorm, SiLU, conv) <-> ``conv_norm_out``, ``conv_out``."""
    yield from _leaf_pairs("out.0", "conv_norm_out")
    yield from _leaf_pairs("out.2", "conv_out")


def resnet_pairs(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> Iterator[Pair]:
    """An LDM ``ResBlock`` <-> a diffusers ``ResnetBlock2D``. Both have a 1x1 shortcut conv exactly
    when the block changes the channel count."""
    yield from _leaf_pairs(f"{ldm}.in_layers.0", f"{diffusers}.norm1")
    yield from _leaf_pairs(f"{ldm}.in_layers.2", f"{diffusers}.conv1")
    yield from _leaf_pairs(f"{ldm}.emb_layers.1", f"{diffusers}.time_emb_proj")
    yield from _leaf_pairs(f"{ldm}.out_layers.0", f"{diffusers}.norm2")
    yield from _leaf_pairs(f"{ldm}.out_layers.3", f"{diffusers}.conv2")
    if in_channels != out_channels:
        yield from _leaf_pairs(f"{ldm}.skip_connection", f"{diffusers}.conv_shortcut")


def transformer_pairs(ldm: str, diffusers: str, depth: int) -> Iterator[Pair]:
    """An LDM ``SpatialTransformer`` <-> a diffusers ``Transformer2DModel``: the inner names agree,
    only the prefix changes. Listed one by one so that a missing or extra weight is caught."""
    weight_only = ("weight",)  # the attention projections have no bias
    layers: list[tuple[str, tuple[str, ...]]] = [("norm", _PARAMS), ("proj_in", _PARAMS)]
    for block in range(depth):
        b = f"transformer_blocks.{block}"
        for attn in ("attn1", "attn2"):
            layers += [(f"{b}.{attn}.{p}", weight_only) for p in ("to_q", "to_k", "to_v")]
            layers.append((f"{b}.{attn}.to_out.0", _PARAMS))
        layers += [(f"{b}.{name}", _PARAMS) for name in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")]
    layers.append(("proj_out", _PARAMS))
    for name, params in layers:
        yield from _leaf_pairs(f"{ldm}.{name}", f"{diffusers}.{name}", params)


def downsample_pairs(ldm: str, diffusers: str) -> Iterator[Pair]:
    """A stride-2 conv: LDM ``Downsample.op`` <-> diffusers ``Downsample2D.conv``."""
    yield from _leaf_pairs(f"{ldm}.op", f"{diffusers}.conv")


def upsample_pairs(ldm: str, diffusers: str) -> Iterator[Pair]:
    """Nearest 2x then a conv: LDM ``Upsample.conv`` <-> diffusers ``Upsample2D.conv``."""
    yield from _leaf_pairs(f"{ldm}.conv", f"{diffusers}.conv")


def hint_encoder_pairs() -> Iterator[Pair]:
    """The ControlNet's condition encoder: eight convs at ``input_hint_block.{0,2,...,14}`` (the odd
    indices are SiLUs) <-> ``controlnet_cond_embedding.conv_in``, ``blocks.0..5``, ``conv_out``."""
    yield from _leaf_pairs("input_hint_block.0", "controlnet_cond_embedding.conv_in")
    for block in range(6):
        yield from _leaf_pairs(f"input_hint_block.{2 * block + 2}", f"controlnet_cond_embedding.blocks.{block}")
    yield from _leaf_pairs("input_hint_block.14", "controlnet_cond_embedding.conv_out")


def zero_conv_pairs(count: int) -> Iterator[Pair]:
    """The ControlNet's 1x1 output convs: ``zero_convs.N.0`` <-> ``controlnet_down_blocks.N`` (one per
    encoder block) and ``middle_block_out.0`` <-> ``controlnet_mid_block``."""
    for n in range(count):
        yield from _leaf_pairs(f"zero_convs.{n}.0", f"controlnet_down_blocks.{n}")
    yield from _leaf_pairs("middle_block_out.0", "controlnet_mid_block")


def level_has_attention(cfg: UNetConfig, level: int) -> bool:
    """LDM puts a transformer after each ResBlock of level ``level`` when its downsampling factor
    ``2 ** level`` is one of ``attention_resolutions``."""
    return 2**level in cfg.attention_resolutions


def _encoder_pairs(cfg: UNetConfig) -> Iterator[Pair]:
    """``input_blocks`` and ``middle_block`` <-> ``conv_in``, ``down_blocks`` and ``mid_block``,
    in the order ``UNetModel.__init__`` builds them."""
    yield from conv_in_pairs()
    channels = cfg.model_channels
    index = 1
    last = len(cfg.channel_mult) - 1
    for level, width in enumerate(cfg.level_channels):
        for layer in range(cfg.num_res_blocks):
            yield from resnet_pairs(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{layer}", channels, width)
            channels = width
            if level_has_attention(cfg, level):
                yield from transformer_pairs(
                    f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{layer}", cfg.transformer_depth
                )
            index += 1
        if level != last:
            yield from downsample_pairs(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0")
            index += 1
    yield from resnet_pairs("middle_block.0", "mid_block.resnets.0", channels, channels)
    yield from transformer_pairs("middle_block.1", "mid_block.attentions.0", cfg.transformer_depth)
    yield from resnet_pairs("middle_block.2", "mid_block.resnets.1", channels, channels)


def _decoder_pairs(cfg: UNetConfig) -> Iterator[Pair]:
    """``output_blocks`` <-> ``up_blocks``: LDM level ``L-1-u`` is diffusers up block ``u``; each level
    has ``num_res_blocks + 1`` ResBlocks reading the concatenated skip connection."""
    skips = cfg.encoder_block_channels()
    channels = cfg.level_channels[-1]
    index = 0
    levels = len(cfg.channel_mult)
    for up, level in enumerate(reversed(range(levels))):
        width = cfg.level_channels[level]
        attention = level_has_attention(cfg, level)
        for layer in range(cfg.num_res_blocks + 1):
            skip = skips.pop()
            yield from resnet_pairs(
                f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{layer}", channels + skip, width
            )
            channels = width
            if attention:
                yield from transformer_pairs(
                    f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{layer}", cfg.transformer_depth
                )
            if level != 0 and layer == cfg.num_res_blocks:
                slot = 2 if attention else 1
                yield from upsample_pairs(f"output_blocks.{index}.{slot}", f"up_blocks.{up}.upsamplers.0")
            index += 1


def unet_key_pairs(cfg: UNetConfig) -> Iterator[Pair]:
    """Every UNet parameter as ``(ldm_name, diffusers_name)``, LDM names relative to
    ``model.diffusion_model.``, in LDM module order."""
    yield from time_embedding_pairs()
    yield from _encoder_pairs(cfg)
    yield from _decoder_pairs(cfg)
    yield from conv_out_pairs()


def controlnet_key_pairs(cfg: ControlNetConfig) -> Iterator[Pair]:
    """Every ControlNet parameter as ``(ldm_name, diffusers_name)``, LDM names relative to
    ``control_model.``, in LDM module order."""
    yield from time_embedding_pairs()
    yield from hint_encoder_pairs()
    yield from _encoder_pairs(cfg.unet)
    yield from zero_conv_pairs(len(cfg.unet.encoder_block_channels()))


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """``{ldm_name: diffusers_name}`` for the UNet."""
    return dict(unet_key_pairs(cfg))


def controlnet_key_map(cfg: ControlNetConfig) -> dict[str, str]:
    """``{ldm_name: diffusers_name}`` for the ControlNet."""
    return dict(controlnet_key_pairs(cfg))


# --------------------------------------------------------------------------------------------------
# Renaming state dicts.
# --------------------------------------------------------------------------------------------------


def _sample(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _fit_projection(name: str, tensor: torch.Tensor, linear: bool) -> torch.Tensor:
    """A transformer's ``proj_in``/``proj_out`` weight is ``[C, C]`` (linear) or ``[C, C, 1, 1]``
    (1x1 conv); the same numbers either way. Reshape it to what the config's model holds."""
    if not (name.endswith(".proj_in.weight") or name.endswith(".proj_out.weight")):
        return tensor
    if linear and tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    if not linear and tensor.dim() == 2:
        return tensor.reshape(tensor.shape[0], tensor.shape[1], 1, 1)
    return tensor


def _rename(
    state_dict: Mapping[str, torch.Tensor], pairs: list[Pair], linear: bool, what: str
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` by ``pairs`` (source, destination), strictly."""
    table = dict(pairs)
    unknown = [k for k in state_dict if k not in table]
    missing = [k for k in table if k not in state_dict]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown keys ({_sample(unknown)})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({_sample(missing)})")
        raise ValueError(f"{what}: {' and '.join(parts)}; expected {len(table)} keys, got {len(state_dict)}")
    return {dst: _fit_projection(dst, state_dict[src], linear) for src, dst in pairs}


def unet_ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A UNet state dict in LDM names (without ``model.diffusion_model.``) -> diffusers names."""
    pairs = list(unet_key_pairs(cfg))
    return _rename(state_dict, pairs, cfg.use_linear_in_transformer, "UNet weights (LDM -> diffusers)")


def unet_diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict -> LDM names (without ``model.diffusion_model.``)."""
    pairs = [(d, ldm) for ldm, d in unet_key_pairs(cfg)]
    return _rename(state_dict, pairs, cfg.use_linear_in_transformer, "UNet weights (diffusers -> LDM)")


def controlnet_ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], cfg: ControlNetConfig
) -> dict[str, torch.Tensor]:
    """A ControlNet state dict in LDM names (without ``control_model.``) -> ``ControlNetModel`` names."""
    pairs = list(controlnet_key_pairs(cfg))
    return _rename(state_dict, pairs, cfg.unet.use_linear_in_transformer, "ControlNet weights (LDM -> diffusers)")


def controlnet_diffusers_to_ldm(
    state_dict: Mapping[str, torch.Tensor], cfg: ControlNetConfig
) -> dict[str, torch.Tensor]:
    """A ``ControlNetModel`` state dict -> LDM names (without ``control_model.``)."""
    pairs = [(d, ldm) for ldm, d in controlnet_key_pairs(cfg)]
    return _rename(state_dict, pairs, cfg.unet.use_linear_in_transformer, "ControlNet weights (diffusers -> LDM)")


# --------------------------------------------------------------------------------------------------
# Config translation.
# --------------------------------------------------------------------------------------------------

# Settings of diffusers' models that the LDM UNet has no counterpart for: a config must leave them at
# these values (a missing key means diffusers' default, which is this value).
_FIXED_SETTINGS: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "controlnet_conditioning_channel_order": "rgb",
}
# ControlNetModel has only these of the settings above.
_CONTROLNET_SETTINGS = (
    "flip_sin_to_cos",
    "freq_shift",
    "mid_block_type",
    "only_cross_attention",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_eps",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "controlnet_conditioning_channel_order",
)
_UNET_SETTINGS = tuple(k for k in _FIXED_SETTINGS if k != "controlnet_conditioning_channel_order")

# diffusers' defaults for the settings that carry the architecture.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "global_pool_conditions": False,
}


def _heads_setting(cfg: UNetConfig) -> int | list[int]:
    """diffusers' ``attention_head_dim``: the head count, one int (SD 1.x) or one per level (SD 2.x)."""
    if cfg.num_heads is not None:
        return cfg.num_heads
    return [cfg.heads_for(width) for width in cfg.level_channels]


def _block_settings(cfg: UNetConfig) -> dict[str, Any]:
    """What UNet2DConditionModel and ControlNetModel share: the encoder and middle block."""
    levels = range(len(cfg.channel_mult))
    return {
        "in_channels": cfg.in_channels,
        "down_block_types": [
            "CrossAttnDownBlock2D" if level_has_attention(cfg, level) else "DownBlock2D" for level in levels
        ],
        "block_out_channels": list(cfg.level_channels),
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_groups,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": _heads_setting(cfg),
        "use_linear_projection": cfg.use_linear_in_transformer,
        "upcast_attention": False,
    }


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int = 64) -> dict[str, Any]:
    """A ``config.json`` dict for ``UNet2DConditionModel.from_config`` computing the same function.

    ``sample_size`` is the latent size the model was trained at (64 for 512-pixel models, 96 for
    768); diffusers' pipelines only use it for their default image size.
    """
    blocks = _block_settings(cfg)
    up_block_types = [
        "CrossAttnUpBlock2D" if level_has_attention(cfg, level) else "UpBlock2D"
        for level in reversed(range(len(cfg.channel_mult)))
    ]
    config: dict[str, Any] = {"_class_name": "UNet2DConditionModel", "sample_size": sample_size}
    config.update(blocks)
    config["out_channels"] = cfg.out_channels
    config["up_block_types"] = up_block_types
    config.update({k: _FIXED_SETTINGS[k] for k in _UNET_SETTINGS})
    return config


def controlnet_config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    """A ``config.json`` dict for ``ControlNetModel.from_config`` computing the same function."""
    config: dict[str, Any] = {"_class_name": "ControlNetModel"}
    config.update(_block_settings(cfg.unet))
    config["conditioning_channels"] = cfg.hint_channels
    config["conditioning_embedding_out_channels"] = list(cfg.hint_block_channels)
    config["global_pool_conditions"] = cfg.global_average_pooling
    config.update({k: _FIXED_SETTINGS[k] for k in _CONTROLNET_SETTINGS})
    return config


def _get(d: Mapping[str, Any], key: str) -> Any:
    return d.get(key, _DIFFUSERS_DEFAULTS.get(key, _FIXED_SETTINGS.get(key)))


def _uniform(value: Any, indices: list[int], what: str) -> int:
    """An int setting, or a per-level list whose entries at ``indices`` must all agree."""
    if isinstance(value, int):
        return value
    values = {value[i] for i in indices}
    if len(values) != 1 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{what}={list(value)} varies between levels; the LDM UNet needs one value")
    return values.pop()


def _unet_config_from(d: Mapping[str, Any], kind: str, out_channels: int) -> UNetConfig:
    _check_fixed_settings(d, kind)
    widths, attention_levels = _levels(d, kind)
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise ValueError(f"block_out_channels={widths} are not multiples of the first")
    norm_groups = _get(d, "norm_num_groups")
    if norm_groups is None:
        raise ValueError("norm_num_groups=None (no normalisation) has no LDM counterpart")
    layers = d.get("layers_per_block", _DIFFUSERS_DEFAULTS["layers_per_block"])
    num_res_blocks = _uniform(layers, list(range(len(widths))), "layers_per_block")

    # The middle block always has a transformer and reads the last level's entries.
    used = [*attention_levels, len(widths) - 1]
    depth = _get(d, "transformer_layers_per_block")
    if not isinstance(depth, int) and any(isinstance(x, (list, tuple)) for x in depth):
        raise ValueError("nested transformer_layers_per_block has no LDM counterpart")
    context_dim = _uniform(_get(d, "cross_attention_dim"), used, "cross_attention_dim")
    transformer_depth = _uniform(depth, used, "transformer_layers_per_block")
    num_heads, num_head_channels = _heads_from(d, widths, used)
    return UNetConfig(
        in_channels=int(_get(d, "in_channels")),
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(2**level for level in reversed(attention_levels)),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=transformer_depth,
        context_dim=context_dim,
        use_linear_in_transformer=bool(_get(d, "use_linear_projection")),
        norm_groups=int(norm_groups),
    )


def _check_fixed_settings(d: Mapping[str, Any], kind: str) -> None:
    """Refuse a config that sets anything the LDM UNet cannot do (`_FIXED_SETTINGS`)."""
    settings = _CONTROLNET_SETTINGS if kind == "ControlNetModel" else _UNET_SETTINGS
    for key in settings:
        value, fixed = d.get(key, _FIXED_SETTINGS[key]), _FIXED_SETTINGS[key]
        if isinstance(value, (list, tuple)) and not any(value):
            value = False  # e.g. only_cross_attention given per level
        if value == fixed or (value in (None, False) and fixed in (None, False)):
            continue  # None and False both mean "off"
        raise ValueError(f"{kind} config has {key}={value!r}; only {fixed!r} has an LDM counterpart")


def _levels(d: Mapping[str, Any], kind: str) -> tuple[list[int], list[int]]:
    """The channels of each level and the levels with cross-attention, from the block lists."""
    widths = [int(w) for w in _get(d, "block_out_channels")]
    down = list(_get(d, "down_block_types"))
    if len(down) != len(widths):
        raise ValueError(f"{len(down)} down_block_types for {len(widths)} block_out_channels")
    allowed = ("CrossAttnDownBlock2D", "DownBlock2D")
    if any(t not in allowed for t in down):
        raise ValueError(f"down_block_types={down}: only {allowed} have LDM counterparts")
    if kind == "UNet2DConditionModel":
        up = list(_get(d, "up_block_types"))
        mirror = [t.replace("Down", "Up") for t in reversed(down)]
        if up != mirror:
            raise ValueError(f"up_block_types={up} do not mirror down_block_types (expected {mirror})")
    return widths, [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]


def _heads_from(d: Mapping[str, Any], widths: list[int], used: list[int]) -> tuple[int | None, int | None]:
    """``(num_heads, num_head_channels)``, one of them None, from diffusers' heads per level (see
    the module docstring): a fixed count, or per-level counts that make a fixed head width."""
    heads_setting = d.get("num_attention_heads") or _get(d, "attention_head_dim")
    if isinstance(heads_setting, int):
        return heads_setting, None
    heads = [int(h) for h in heads_setting]
    if len(heads) != len(widths):
        raise ValueError(f"attention_head_dim={heads} needs one entry per level ({len(widths)})")
    for i in used:
        if widths[i] % heads[i]:
            raise ValueError(f"{widths[i]} channels do not split into {heads[i]} heads (attention_head_dim)")
    head_widths = {widths[i] // heads[i] for i in used}
    head_counts = {heads[i] for i in used}
    if len(head_widths) == 1:
        return None, head_widths.pop()
    if len(head_counts) == 1:
        return head_counts.pop(), None
    raise ValueError(
        f"attention_head_dim={heads} (heads per level) is neither a fixed head count nor a fixed head width"
    )


def unet_config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
    """The :class:`UNetConfig` of a ``UNet2DConditionModel`` ``config.json`` dict.

    Raises ``ValueError`` for diffusers settings the LDM UNet cannot express. ``attention_resolutions``
    comes back in LDM's usual descending order (``(4, 2, 1)``). ``upcast_attention`` and ``dropout``
    are accepted whatever their value: neither changes the function in float32 inference.
    """
    return _unet_config_from(d, "UNet2DConditionModel", int(_get(d, "out_channels")))


def controlnet_config_from_diffusers(d: Mapping[str, Any], out_channels: int = 4) -> ControlNetConfig:
    """The :class:`ControlNetConfig` of a ``ControlNetModel`` ``config.json`` dict.

    A ControlNet has no output head, so the base UNet's ``out_channels`` is not in its config: pass
    it if it is not 4.
    """
    unet = _unet_config_from(d, "ControlNetModel", out_channels)
    hint_block = tuple(int(c) for c in _get(d, "conditioning_embedding_out_channels"))
    if len(hint_block) != 4:
        raise ValueError(
            f"conditioning_embedding_out_channels={list(hint_block)}: the LDM hint encoder has exactly 4 stages"
        )
    return ControlNetConfig(
        unet=unet,
        hint_channels=int(_get(d, "conditioning_channels")),
        hint_block_channels=hint_block,  # type: ignore[arg-type]
        global_average_pooling=bool(_get(d, "global_pool_conditions")),
    )

"""The UNet's and the ControlNet's configs to and from the ``config.json`` dicts diffusers'
``from_config`` reads (the key maps are in diffusers_unet.py).

diffusers' ``attention_head_dim`` is, despite its name, the number of heads (per level when it is
a list): diffusers builds each transformer with ``num_attention_heads = attention_head_dim[level]``
heads of width ``channels // num_attention_heads`` (``UNet2DConditionModel.__init__`` sets
``num_attention_heads = num_attention_heads or attention_head_dim``). So SD 1.x (``num_heads=8``)
is ``attention_head_dim=8`` and SD 2.x (``num_head_channels=64``) is ``[5, 10, 20, 20]``; the
middle block uses the last level's entry, the decoder levels use the entries of their encoder
twins (diffusers reverses the list for its up blocks).

SDXL: ``transformer_layers_per_block`` is one depth per level ([1, 2, 10]: the 1 belongs to a level
without attention and is unused), and the vector y is diffusers' ``addition_embed_type="text_time"``
with ``addition_time_embed_dim=256`` and ``projection_class_embeddings_input_dim=2816``
(``adm_in_channels``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import TIME_ID_EMBED_DIM, ControlNetConfig, UNetConfig, UnionConfig
from .diffusers_unet import level_has_attention

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
    "num_class_embeds",
    "resnet_time_scale_shift",
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


def _depth_setting(cfg: UNetConfig) -> int | list[int]:
    """``transformer_layers_per_block``: one int, or one per level with diffusers' own 1 at the levels
    without attention (as SDXL's config.json has it; diffusers never reads those)."""
    if isinstance(cfg.transformer_depth, int):
        return cfg.transformer_depth
    last = len(cfg.channel_mult) - 1  # the middle block's, which may have no blocks (-small)
    return [
        depth if cfg.has_attention(level) or level == last else 1 for level, depth in enumerate(cfg.transformer_depth)
    ]


def _vector_settings(cfg: UNetConfig) -> dict[str, Any]:
    """SDXL's vector y: ``text_time`` added embedding, or none."""
    if cfg.adm_in_channels is None:
        return {
            "addition_embed_type": None,
            "addition_time_embed_dim": None,
            "projection_class_embeddings_input_dim": None,
        }
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_ID_EMBED_DIM,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
    }


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
        "transformer_layers_per_block": _depth_setting(cfg),
        "attention_head_dim": _heads_setting(cfg),
        "use_linear_projection": cfg.use_linear_in_transformer,
        "upcast_attention": False,
        **_vector_settings(cfg),
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
    """A ``config.json`` dict for ``ControlNetModel.from_config`` computing the same function
    (``ControlNetUnionModel`` for a union model)."""
    config: dict[str, Any] = {"_class_name": "ControlNetModel" if cfg.union is None else "ControlNetUnionModel"}
    config.update(_block_settings(cfg.unet))
    config["conditioning_channels"] = cfg.hint_channels
    config["conditioning_embedding_out_channels"] = list(cfg.hint_block_channels)
    config["global_pool_conditions"] = cfg.global_average_pooling
    config.update({k: _FIXED_SETTINGS[k] for k in _CONTROLNET_SETTINGS})
    if cfg.union is not None:
        width = cfg.unet.model_channels  # the tokens are the hint features' means: conv_in's width
        config |= {
            "num_control_type": cfg.union.control_types,
            "num_trans_channel": width,
            "num_trans_head": cfg.union.heads,
            "num_trans_layer": cfg.union.layers,
            "num_proj_channel": width,
        }
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
    if not isinstance(depth, int):
        if any(isinstance(x, (list, tuple)) for x in depth):
            raise ValueError("nested transformer_layers_per_block has no LDM counterpart")
        if len(depth) != len(widths):
            raise ValueError(f"transformer_layers_per_block={list(depth)} needs one entry per level ({len(widths)})")
        depth = tuple(int(x) for x in depth)  # UNetConfig keeps it canonical (one int where it can)
    context_dim = _uniform(_get(d, "cross_attention_dim"), used, "cross_attention_dim")
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
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=bool(_get(d, "use_linear_projection")),
        norm_groups=int(norm_groups),
        adm_in_channels=_adm_from(d, kind),
    )


def _adm_from(d: Mapping[str, Any], kind: str) -> int | None:
    """``adm_in_channels`` from diffusers' added embedding: ``text_time`` (SDXL) or none at all."""
    kind_of = d.get("addition_embed_type")
    time_dim, width = d.get("addition_time_embed_dim"), d.get("projection_class_embeddings_input_dim")
    if kind_of is None:
        if time_dim is not None or width is not None:
            raise ValueError(
                f"{kind} config has addition_time_embed_dim={time_dim!r} / projection_class_embeddings_input_dim="
                f"{width!r} without an addition_embed_type; only SDXL's text_time has an LDM counterpart"
            )
        return None
    if kind_of != "text_time" or time_dim != TIME_ID_EMBED_DIM or not isinstance(width, int):
        raise ValueError(
            f"{kind} config has addition_embed_type={kind_of!r}, addition_time_embed_dim={time_dim!r}, "
            f"projection_class_embeddings_input_dim={width!r}; only SDXL's text_time with "
            f"{TIME_ID_EMBED_DIM} and an int width has an LDM counterpart"
        )
    return width


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
    if not hint_block:
        raise ValueError("conditioning_embedding_out_channels is empty: the hint encoder needs at least 1 stage")
    return ControlNetConfig(
        unet=unet,
        hint_channels=int(_get(d, "conditioning_channels")),
        hint_block_channels=hint_block,  # type: ignore[arg-type]
        global_average_pooling=bool(_get(d, "global_pool_conditions")),
        union=_union_from(d, unet.model_channels),
    )


def _union_from(d: Mapping[str, Any], width: int) -> UnionConfig | None:
    """The union model's parts: ``num_control_type`` (xinsir's config.json and config_promax.json,
    whose ``_class_name`` is ControlNetModel; diffusers' ControlNetUnionModel, whose defaults are
    xinsir's fixed 8 heads, 1 layer and conv_in's width for the tokens)."""
    if "num_control_type" not in d and d.get("_class_name") != "ControlNetUnionModel":
        return None
    for key in ("num_trans_channel", "num_proj_channel"):
        if int(d.get(key, width)) != width:
            raise ValueError(f"{key}={d[key]}: the union model's tokens are the hint features' means, {width} wide")
    return UnionConfig(
        control_types=int(d.get("num_control_type", 6)),
        heads=int(d.get("num_trans_head", 8)),
        layers=int(d.get("num_trans_layer", 1)),
    )

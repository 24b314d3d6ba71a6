"""The UNet and the ControlNet between our (original LDM) key layout and diffusers' layout.

The key maps: :func:`unet_key_pairs` and :func:`controlnet_key_pairs` list every parameter as an
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

The translation of their configs: diffusers_unet_config.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

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


def label_embedding_pairs(cfg: UNetConfig) -> Iterator[Pair]:
    """SDXL's ``label_emb`` (an MLP of the vector y, nested as sgm builds it) <-> ``add_embedding``."""
    if cfg.adm_in_channels is not None:
        yield from _leaf_pairs("label_emb.0.0", "add_embedding.linear_1")
        yield from _leaf_pairs("label_emb.0.2", "add_embedding.linear_2")


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


def hint_encoder_pairs(stages: int = 4) -> Iterator[Pair]:
    """The ControlNet's condition encoder: ``2 * stages`` convs at ``input_hint_block.{0,2,...}`` (the
    odd indices are SiLUs; SD's four stages: 0..14) <-> ``controlnet_cond_embedding.conv_in``,
    ``blocks.0..2 * stages - 3``, ``conv_out``."""
    yield from _leaf_pairs("input_hint_block.0", "controlnet_cond_embedding.conv_in")
    blocks = 2 * (stages - 1)
    for block in range(blocks):
        yield from _leaf_pairs(f"input_hint_block.{2 * block + 2}", f"controlnet_cond_embedding.blocks.{block}")
    yield from _leaf_pairs(f"input_hint_block.{2 * blocks + 2}", "controlnet_cond_embedding.conv_out")


def zero_conv_pairs(count: int) -> Iterator[Pair]:
    """The ControlNet's 1x1 output convs: ``zero_convs.N.0`` <-> ``controlnet_down_blocks.N`` (one per
    encoder block) and ``middle_block_out.0`` <-> ``controlnet_mid_block``."""
    for n in range(count):
        yield from _leaf_pairs(f"zero_convs.{n}.0", f"controlnet_down_blocks.{n}")
    yield from _leaf_pairs("middle_block_out.0", "controlnet_mid_block")


def union_pairs(cfg: ControlNetConfig) -> Iterator[Pair]:
    """xinsir's union model's parts (models/controlnet_union.py): the same names in both layouts
    (diffusers' ``ControlNetUnionModel`` and ComfyUI's LDM one read the same files)."""
    if cfg.union is None:
        return
    yield "task_embedding", "task_embedding"
    for layer in range(cfg.union.layers):
        block = f"transformer_layes.{layer}"
        names = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
        names += [
            f"{layer_name}.{param}" for layer_name in ("ln_1", "mlp.c_fc", "mlp.c_proj", "ln_2") for param in _PARAMS
        ]
        for name in names:
            yield f"{block}.{name}", f"{block}.{name}"
    for name in ("spatial_ch_projs", "control_add_embedding.linear_1", "control_add_embedding.linear_2"):
        yield from _leaf_pairs(name, name)


def level_has_attention(cfg: UNetConfig, level: int) -> bool:
    """LDM puts a transformer after each ResBlock of level ``level`` when its downsampling factor
    ``2 ** level`` is one of ``attention_resolutions``."""
    return cfg.has_attention(level)


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
                    f"input_blocks.{index}.1",
                    f"down_blocks.{level}.attentions.{layer}",
                    cfg.transformer_depth_at(level),
                )
            index += 1
        if level != last:
            yield from downsample_pairs(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0")
            index += 1
    yield from resnet_pairs("middle_block.0", "mid_block.resnets.0", channels, channels)
    yield from transformer_pairs("middle_block.1", "mid_block.attentions.0", cfg.middle_transformer_depth)
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
                    f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{layer}", cfg.transformer_depth_at(level)
                )
            if level != 0 and layer == cfg.num_res_blocks:
                slot = 2 if attention else 1
                yield from upsample_pairs(f"output_blocks.{index}.{slot}", f"up_blocks.{up}.upsamplers.0")
            index += 1


def unet_key_pairs(cfg: UNetConfig) -> Iterator[Pair]:
    """Every UNet parameter as ``(ldm_name, diffusers_name)``, LDM names relative to
    ``model.diffusion_model.``, in LDM module order."""
    yield from time_embedding_pairs()
    yield from label_embedding_pairs(cfg)
    yield from _encoder_pairs(cfg)
    yield from _decoder_pairs(cfg)
    yield from conv_out_pairs()


def controlnet_key_pairs(cfg: ControlNetConfig) -> Iterator[Pair]:
    """Every ControlNet parameter as ``(ldm_name, diffusers_name)``, LDM names relative to
    ``control_model.``, in LDM module order."""
    yield from time_embedding_pairs()
    yield from label_embedding_pairs(cfg.unet)
    yield from hint_encoder_pairs(len(cfg.hint_block_channels))
    yield from _encoder_pairs(cfg.unet)
    yield from zero_conv_pairs(len(cfg.unet.encoder_block_channels()))
    yield from union_pairs(cfg)


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

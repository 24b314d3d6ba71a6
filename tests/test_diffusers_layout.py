"""The LDM <-> diffusers key maps and config translation (controlnet.formats.diffusers_unet).

Full-size models are built on the meta device (names and shapes only, no memory); the tiny preset
is built for real and round-tripped with random weights. diffusers' own single-file converter serves
as an independent oracle for which LDM weight goes where.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders import single_file_utils

from controlnet.config import SD15, SD21, SD21_V, TINY, WORLD, ControlNetConfig, ModelConfig, UNetConfig
from controlnet.formats import diffusers_unet as du
from controlnet.formats import diffusers_unet_config as duc
from controlnet.formats.ldm import CONTROL_PREFIX, UNET_PREFIX

KEYS_FILE = Path(__file__).parent / "data" / "ldm_keys.json"
FULL = {"v15": SD15, "v21": SD21}
PRESETS = {"sd15": SD15, "sd21": SD21, "tiny": TINY}


@pytest.fixture(scope="module")
def ldm_keys() -> dict[str, dict[str, list[int]]]:
    return json.loads(KEYS_FILE.read_text())


def _meta_state(keys: dict[str, list[int]], prefix: str) -> dict[str, torch.Tensor]:
    """Meta tensors (no storage) with the shapes of every ``prefix`` key, prefix removed."""
    return {k[len(prefix) :]: torch.empty(shape, device="meta") for k, shape in keys.items() if k.startswith(prefix)}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _diffusers_models(model: ModelConfig, device: str) -> tuple[UNet2DConditionModel, ControlNetModel]:
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(duc.unet_config_to_diffusers(model.unet))
        control = ControlNetModel.from_config(duc.controlnet_config_to_diffusers(model.controlnet()))
    return unet, control


def _same_objects(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _canonical(cfg: UNetConfig) -> UNetConfig:
    """``attention_resolutions`` as a set of levels, in LDM's usual descending order."""
    levels = [2**i for i in range(len(cfg.channel_mult)) if 2**i in cfg.attention_resolutions]
    return dataclasses.replace(cfg, attention_resolutions=tuple(sorted(levels, reverse=True)))


# ---- (a) full size: every LDM key maps, and the mapped names/shapes are exactly diffusers' --------


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_maps_match_diffusers_models(ldm_keys, version):
    model = FULL[version]
    unet, control = _diffusers_models(model, "meta")

    ldm_unet = _meta_state(ldm_keys[version], UNET_PREFIX)
    assert len(ldm_unet) == 686
    dif_unet = du.unet_ldm_to_diffusers(ldm_unet, model.unet)
    assert _shapes(dif_unet) == _shapes(unet.state_dict())
    assert set(du.unet_key_map(model.unet)) == set(ldm_unet)

    ldm_control = _meta_state(ldm_keys[version], CONTROL_PREFIX)
    assert len(ldm_control) == 340
    dif_control = du.controlnet_ldm_to_diffusers(ldm_control, model.controlnet())
    assert _shapes(dif_control) == _shapes(control.state_dict())
    assert set(du.controlnet_key_map(model.controlnet())) == set(ldm_control)

    # No copies and no reshapes for consistent weights: the very same tensor objects.
    for ldm_state, dif_state, table in (
        (ldm_unet, dif_unet, du.unet_key_map(model.unet)),
        (ldm_control, dif_control, du.controlnet_key_map(model.controlnet())),
    ):
        assert all(dif_state[table[k]] is v for k, v in ldm_state.items())


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_maps_agree_with_diffusers_converter(ldm_keys, version):
    """diffusers' single-file converter is an independent oracle for which weight goes where (same
    shapes alone would not catch, say, two ResBlocks of a level swapped)."""
    model = FULL[version]
    unet_config = duc.unet_config_to_diffusers(model.unet)
    prefixed = {UNET_PREFIX + k: v for k, v in _meta_state(ldm_keys[version], UNET_PREFIX).items()}
    theirs = single_file_utils.convert_ldm_unet_checkpoint(prefixed, unet_config)
    # both pass the same tensor objects through: compare names and identities
    ldm_state = {k[len(UNET_PREFIX) :]: v for k, v in prefixed.items()}
    ours = du.unet_ldm_to_diffusers(ldm_state, model.unet)
    assert _same_objects(ours, theirs)

    control_state = _meta_state(ldm_keys[version], CONTROL_PREFIX)
    control_config = duc.controlnet_config_to_diffusers(model.controlnet())
    theirs = single_file_utils.convert_controlnet_checkpoint(control_state, control_config)
    assert _same_objects(du.controlnet_ldm_to_diffusers(control_state, model.controlnet()), theirs)


# ---- (b) round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_round_trips_keep_tensor_objects(ldm_keys, version):
    model = FULL[version]
    cn = model.controlnet()
    ldm_unet = _meta_state(ldm_keys[version], UNET_PREFIX)
    assert _same_objects(du.unet_diffusers_to_ldm(du.unet_ldm_to_diffusers(ldm_unet, model.unet), model.unet), ldm_unet)
    ldm_control = _meta_state(ldm_keys[version], CONTROL_PREFIX)
    assert _same_objects(
        du.controlnet_diffusers_to_ldm(du.controlnet_ldm_to_diffusers(ldm_control, cn), cn), ldm_control
    )

    unet, control = _diffusers_models(model, "meta")
    dif_unet = unet.state_dict()
    back = du.unet_ldm_to_diffusers(du.unet_diffusers_to_ldm(dif_unet, model.unet), model.unet)
    assert _same_objects(back, dif_unet)
    dif_control = control.state_dict()
    back = du.controlnet_ldm_to_diffusers(du.controlnet_diffusers_to_ldm(dif_control, cn), cn)
    assert _same_objects(back, dif_control)
    # The LDM names and shapes from diffusers' models are exactly those of the original classes.
    assert _shapes(du.unet_diffusers_to_ldm(dif_unet, model.unet)) == _shapes(ldm_unet)
    assert _shapes(du.controlnet_diffusers_to_ldm(dif_control, cn)) == _shapes(ldm_control)


def test_tiny_round_trips_are_bit_identical():
    torch.manual_seed(0)
    unet, control = _diffusers_models(TINY, "cpu")
    cn = TINY.controlnet()
    for model, to_ldm, to_dif, cfg in (
        (unet, du.unet_diffusers_to_ldm, du.unet_ldm_to_diffusers, TINY.unet),
        (control, du.controlnet_diffusers_to_ldm, du.controlnet_ldm_to_diffusers, cn),
    ):
        # diffusers -> LDM -> diffusers, with diffusers' own (random) initialisation
        dif = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        back = to_dif(to_ldm(dif, cfg), cfg)
        assert back.keys() == dif.keys()
        assert all(torch.equal(back[k], dif[k]) for k in dif)

        # LDM -> diffusers -> LDM with fresh random tensors; the diffusers side loads strictly
        ldm = {k: torch.randn_like(v) for k, v in to_ldm(dif, cfg).items()}
        converted = to_dif(ldm, cfg)
        model.load_state_dict(converted, strict=True)
        again = to_ldm({k: v.clone() for k, v in model.state_dict().items()}, cfg)
        assert again.keys() == ldm.keys()
        assert all(torch.equal(again[k], ldm[k]) for k in ldm)


# ---- (c) tiny preset: the map covers diffusers' models exactly -------------------------------------


def test_tiny_map_covers_diffusers_models():
    unet, control = _diffusers_models(TINY, "meta")
    assert {d for _, d in du.unet_key_pairs(TINY.unet)} == set(unet.state_dict())
    assert {d for _, d in du.controlnet_key_pairs(TINY.controlnet())} == set(control.state_dict())
    # no name used twice on either side
    for pairs in (list(du.unet_key_pairs(TINY.unet)), list(du.controlnet_key_pairs(TINY.controlnet()))):
        assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)


def test_tiny_maps_agree_with_diffusers_converter():
    unet, control = _diffusers_models(TINY, "meta")
    ldm = du.unet_diffusers_to_ldm(unet.state_dict(), TINY.unet)
    prefixed = {UNET_PREFIX + k: v for k, v in ldm.items()}
    theirs = single_file_utils.convert_ldm_unet_checkpoint(prefixed, duc.unet_config_to_diffusers(TINY.unet))
    assert _same_objects(du.unet_ldm_to_diffusers(ldm, TINY.unet), theirs)

    cn = TINY.controlnet()
    ldm = du.controlnet_diffusers_to_ldm(control.state_dict(), cn)
    theirs = single_file_utils.convert_controlnet_checkpoint(ldm, duc.controlnet_config_to_diffusers(cn))
    assert _same_objects(du.controlnet_ldm_to_diffusers(ldm, cn), theirs)


# ---- (d) config translation ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd21-v", "tiny"])
def test_config_round_trips(name):
    model = {"sd15": SD15, "sd21": SD21, "sd21-v": SD21_V, "tiny": TINY}[name]
    d = duc.unet_config_to_diffusers(model.unet)
    back = duc.unet_config_from_diffusers(d)
    assert back == _canonical(model.unet)
    assert duc.unet_config_from_diffusers(duc.unet_config_to_diffusers(back)) == back
    for pooling in (False, True):
        cn = model.controlnet(global_average_pooling=pooling)
        back_cn = duc.controlnet_config_from_diffusers(duc.controlnet_config_to_diffusers(cn))
        assert back_cn == dataclasses.replace(cn, unet=_canonical(cn.unet))


def test_config_dicts_are_complete_and_understood_by_diffusers():
    for model in PRESETS.values():
        unet, control = _diffusers_models(model, "meta")
        for built, ours in (
            (unet, duc.unet_config_to_diffusers(model.unet)),
            (control, duc.controlnet_config_to_diffusers(model.controlnet())),
        ):
            for key, value in ours.items():
                if key.startswith("_"):
                    continue
                assert key in built.config, key  # every key is a real constructor argument
                stored = built.config[key]
                assert (list(stored) if isinstance(stored, tuple) else stored) == value, key


@pytest.mark.parametrize("name", ["sd15", "sd21", "tiny"])
def test_diffusers_models_have_the_ldm_attention_heads(name):
    """diffusers' attention_head_dim is the head count: every transformer of the model built from
    our config has the heads (and head width) of the LDM one."""
    model = PRESETS[name]
    unet, control = _diffusers_models(model, "meta")
    for built in (unet, control):
        seen = 0
        for module_name, module in built.named_modules():
            if not module_name.endswith(("attn1", "attn2")):
                continue
            channels = module.to_q.out_features
            assert module.heads == model.unet.heads_for(channels), module_name
            assert channels // module.heads == channels // model.unet.heads_for(channels)
            seen += 1
        assert seen > 0
    if name == "sd21":
        assert duc.unet_config_to_diffusers(model.unet)["attention_head_dim"] == [5, 10, 20, 20]
    if name == "sd15":
        assert duc.unet_config_to_diffusers(model.unet)["attention_head_dim"] == 8


def _ldm_yaml(cfg: UNetConfig) -> dict:
    params = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "attention_resolutions": list(cfg.attention_resolutions),
        "num_res_blocks": cfg.num_res_blocks,
        "channel_mult": list(cfg.channel_mult),
        "transformer_depth": cfg.transformer_depth,
        "context_dim": cfg.context_dim,
        "use_linear_in_transformer": cfg.use_linear_in_transformer,
    }
    if cfg.num_heads is not None:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.num_head_channels
    return {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


@pytest.mark.parametrize("name", ["sd15", "sd21", "tiny"])
def test_config_agrees_with_diffusers_ldm_config_conversion(name):
    cfg = PRESETS[name].unet
    theirs = single_file_utils.create_unet_diffusers_config_from_ldm(_ldm_yaml(cfg), {}, image_size=512)
    ours = duc.unet_config_to_diffusers(cfg)
    for key, value in theirs.items():
        assert ours.get(key, value) == value, key


SD15_HUB_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_HUB_UNET = {
    **SD15_HUB_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD15_HUB_CONTROLNET = {
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}


def test_hub_style_configs_read_as_the_presets():
    assert duc.unet_config_from_diffusers(SD15_HUB_UNET) == SD15.unet
    assert duc.unet_config_from_diffusers(SD21_HUB_UNET) == SD21.unet
    assert duc.controlnet_config_from_diffusers(SD15_HUB_CONTROLNET) == SD15.controlnet()
    sd21_control = {**SD15_HUB_CONTROLNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024}
    sd21_control["use_linear_projection"] = True
    assert duc.controlnet_config_from_diffusers(sd21_control) == SD21.controlnet()
    # per-level lists that are uniform where they matter are accepted
    listed = {**SD15_HUB_UNET, "attention_head_dim": [8, 8, 8, 8], "layers_per_block": [2, 2, 2, 2]}
    assert duc.unet_config_from_diffusers(listed) == SD15.unet


@pytest.mark.parametrize(
    "change",
    [
        {"class_embed_type": "timestep"},
        {"addition_embed_type": "text_time"},
        {"resnet_time_scale_shift": "scale_shift"},
        {"conv_in_kernel": 1},
        {"flip_sin_to_cos": False},
        {"norm_num_groups": None},
        {"layers_per_block": [1, 2, 2, 2]},
        {"attention_head_dim": [5, 8, 20, 20]},
        {"down_block_types": ["DownBlock2D"] * 3 + ["CrossAttnDownBlock2D"]},
        {"up_block_types": ["CrossAttnUpBlock2D"] * 4},
        {"mid_block_type": "UNetMidBlock2D"},
    ],
)
def test_unsupported_diffusers_configs_are_refused(change):
    with pytest.raises(ValueError):
        duc.unet_config_from_diffusers({**SD15_HUB_UNET, **change})


def test_unsupported_controlnet_configs_are_refused():
    with pytest.raises(ValueError, match="conditioning_channel_order"):
        duc.controlnet_config_from_diffusers({**SD15_HUB_CONTROLNET, "controlnet_conditioning_channel_order": "bgr"})
    with pytest.raises(ValueError, match="at least 1 stage"):
        duc.controlnet_config_from_diffusers({**SD15_HUB_CONTROLNET, "conditioning_embedding_out_channels": []})


def test_a_three_stage_hint_encoder_maps_like_diffusers():
    """The world model's VAE downsamples 4x, so its hint encoder has three stages (two stride-2
    convs): six convs at input_hint_block.0..10, which diffusers builds from a three-width
    conditioning_embedding_out_channels."""
    cn = WORLD.controlnet()
    assert cn.hint_block_channels == (16, 32, 64) and cn.hint_downsample_factor == 4 == WORLD.vae.downsample_factor
    with torch.device("meta"):
        control = ControlNetModel.from_config(duc.controlnet_config_to_diffusers(cn))
    pairs = dict(du.controlnet_key_pairs(cn))
    assert set(pairs.values()) == set(control.state_dict())
    assert pairs["input_hint_block.10.weight"] == "controlnet_cond_embedding.conv_out.weight"
    assert pairs["input_hint_block.8.weight"] == "controlnet_cond_embedding.blocks.3.weight"
    back = duc.controlnet_config_from_diffusers(duc.controlnet_config_to_diffusers(cn), out_channels=8)
    assert back == dataclasses.replace(cn, unet=_canonical(cn.unet))


# ---- strictness and the projection reshape -------------------------------------------------------


def test_unknown_and_missing_keys_raise(ldm_keys):
    ldm = _meta_state(ldm_keys["v15"], UNET_PREFIX)
    extra = {**ldm, "label_emb.0.0.weight": torch.empty(1, device="meta")}
    with pytest.raises(ValueError, match=r"1 unknown keys \(label_emb.0.0.weight\)"):
        du.unet_ldm_to_diffusers(extra, SD15.unet)
    short = dict(ldm)
    for key in ("out.2.weight", "out.2.bias", "middle_block.1.proj_in.weight"):
        del short[key]
    with pytest.raises(ValueError, match="3 missing keys"):
        du.unet_ldm_to_diffusers(short, SD15.unet)
    # the SD 2.1 ControlNet is not an SD 1.5 one: the cross-attention widths differ, but names agree;
    # an SD 1.5 UNet given as a ControlNet has the decoder keys too many
    with pytest.raises(ValueError, match="unknown keys"):
        du.controlnet_ldm_to_diffusers(ldm, SD15.controlnet())
    dif = du.unet_ldm_to_diffusers(ldm, SD15.unet)
    with pytest.raises(ValueError, match="missing keys"):
        du.unet_diffusers_to_ldm({k: v for k, v in dif.items() if not k.startswith("up_blocks.0")}, SD15.unet)


def test_projection_weights_follow_the_config():
    """A file whose proj_in/proj_out are stored linear for a conv-proj model (or the reverse) is
    reshaped to what the config's model holds; everything else is passed through."""
    unet, _ = _diffusers_models(TINY, "meta")
    linear = unet.state_dict()
    assert linear["mid_block.attentions.0.proj_in.weight"].shape == (64, 64)
    conv_cfg = dataclasses.replace(TINY.unet, use_linear_in_transformer=False)
    ldm = du.unet_diffusers_to_ldm(linear, conv_cfg)
    assert ldm["middle_block.1.proj_in.weight"].shape == (64, 64, 1, 1)
    assert ldm["middle_block.1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert ldm["middle_block.0.in_layers.2.weight"] is linear["mid_block.resnets.0.conv1.weight"]
    back = du.unet_ldm_to_diffusers(ldm, TINY.unet)
    assert _shapes(back) == _shapes(linear)


def test_controlnet_pieces_are_named_as_documented():
    table = du.controlnet_key_map(SD15.controlnet())
    assert table["input_hint_block.0.weight"] == "controlnet_cond_embedding.conv_in.weight"
    assert table["input_hint_block.2.bias"] == "controlnet_cond_embedding.blocks.0.bias"
    assert table["input_hint_block.12.weight"] == "controlnet_cond_embedding.blocks.5.weight"
    assert table["input_hint_block.14.weight"] == "controlnet_cond_embedding.conv_out.weight"
    assert table["zero_convs.11.0.weight"] == "controlnet_down_blocks.11.weight"
    assert table["middle_block_out.0.bias"] == "controlnet_mid_block.bias"
    assert isinstance(SD15.controlnet(), ControlNetConfig)

"""SDXL: the base model's UNet, two text encoders, VAE and size conditioning (issue 22, points 1, 2, 5).

* Every key and shape of the real single file (``tests/data/sdxl_keys.json``, read off the original
  classes by ``tests/data/generate_sdxl_keys.py``), our models and both layouts at full size on the
  meta device, and diffusers' own single-file conversion functions against our key maps.
* A reduced SDXL (every code path of the real one: no attention at the first level, per-level
  transformer depths, the vector y, two encoders with the penultimate raw hidden states and the pooled
  projection) numerically against diffusers and transformers on identical random weights, and
  diffusers' ``from_single_file`` of our random LDM file equal, tensor for tensor, to the diffusers
  folder we write.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from controlnet.config import (
    PRESETS,
    SD15,
    SDXL,
    ControlNetConfig,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    preset_for,
)
from controlnet.formats import diffusers_text, diffusers_unet, diffusers_unet_config, diffusers_vae
from controlnet.formats.detect import base_config_from_shapes, check_compatible, detect_format, inspect_contents
from controlnet.formats.diffusers import read_pipeline_config, save_diffusers
from controlnet.formats.errors import CheckpointError
from controlnet.formats.ldm import CONDITIONER_PREFIX, UNET_PREFIX, VAE_PREFIX, ldm_state_dict, save_ldm, split_ldm
from controlnet.formats.tensors import read_state_dict
from controlnet.loading import load_base, load_strict, load_vae
from controlnet.models.conditioning import SizeConditioning, added_vector, size_vector
from controlnet.models.controlnet import ControlNet
from controlnet.models.stable_diffusion import StableDiffusion, build_empty
from controlnet.models.text import DualTextEncoder, with_padding
from controlnet.models.unet import UNet

from .helpers import random_module, randomize, relative_error

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-4  # max abs error / max abs reference, fp32

# A reduced SDXL with the real key patterns and code paths: three levels, none at the first with
# attention, 2 and 3 transformer blocks, 16-wide heads, GroupNorm(32), two text encoders (CLIP with
# QuickGELU, OpenCLIP with GELU, fused in_proj and a projection), the vector y of pooled + 6 x 256.
SMALL_TEXT = TextEncoderConfig(
    width=32, layers=3, heads=2, mlp_width=128, output_layer="penultimate", final_layer_norm=False
)
SMALL_TEXT_2 = TextEncoderConfig(
    arch="openclip",
    width=64,
    layers=3,
    heads=4,
    mlp_width=256,
    output_layer="penultimate",
    final_layer_norm=False,
    projection_dim=48,
)
SMALL = SDXL.replace(
    name="sdxl-small",
    unet=dataclasses.replace(
        SDXL.unet,
        model_channels=32,
        num_head_channels=16,
        transformer_depth=(0, 2, 3),
        context_dim=96,
        adm_in_channels=48 + 6 * 256,
    ),
    vae=VAEConfig(ch=32, scale_factor=0.13025),
    text=SMALL_TEXT,
    text_2=SMALL_TEXT_2,
    native_resolution=128,
)
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on Mars, highly detailed, 4k"]

# The config.json files of stabilityai/stable-diffusion-xl-base-1.0 (what users' folders hold).
HUB_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
_HUB_TEXT_COMMON = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "pad_token_id": 1,
    "vocab_size": 49408,
}
HUB_TEXT = {
    **_HUB_TEXT_COMMON,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
HUB_TEXT_2 = {
    **_HUB_TEXT_COMMON,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
HUB_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
HUB_SCHEDULER = {  # EulerDiscreteScheduler's; what our loader reads of it is the training schedule
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# configs/inference/sd_xl_base.yaml, as diffusers' single-file code reads it.
SGM_YAML = {
    "model": {
        "params": {
            "network_config": {
                "params": {
                    "adm_in_channels": 2816,
                    "num_classes": "sequential",
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4],
                    "num_head_channels": 64,
                    "use_linear_in_transformer": True,
                    "transformer_depth": [1, 2, 10],
                    "context_dim": 2048,
                }
            },
            "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
        }
    }
}


@pytest.fixture(scope="module")
def sdxl_keys() -> dict[str, list[int]]:
    return json.loads((DATA / "sdxl_keys.json").read_text())["sdxl_base"]


def _meta(keys: dict[str, list[int]], prefix: str = "") -> dict[str, torch.Tensor]:
    """Meta tensors (no storage) of the ``prefix`` keys, prefix removed."""
    return {
        k.removeprefix(prefix): torch.empty(shape, device="meta", dtype=torch.long if "position_ids" in k else None)
        for k, shape in keys.items()
        if k.startswith(prefix)
    }


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def _same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# --- the configuration -------------------------------------------------------------------------------


def test_the_sdxl_preset_is_the_original_configuration():
    unet = SDXL.unet
    assert (unet.model_channels, unet.channel_mult, unet.num_res_blocks) == (320, (1, 2, 4), 2)
    assert [unet.has_attention(level) for level in range(3)] == [False, True, True]
    assert [unet.transformer_depth_at(level) for level in (1, 2)] == [2, 10] and unet.middle_transformer_depth == 10
    assert (unet.context_dim, unet.adm_in_channels, unet.num_head_channels) == (2048, 2816, 64)
    assert SDXL.vae.scale_factor == 0.13025 and SDXL.native_resolution == 1024
    assert (SDXL.text.arch, SDXL.text.output_layer, SDXL.text.final_layer_norm) == ("clip", "penultimate", False)
    bigg = SDXL.text_2
    assert (bigg.arch, bigg.width, bigg.layers, bigg.heads, bigg.projection_dim) == ("openclip", 1280, 32, 20, 1280)
    assert (bigg.pad_token_id, SDXL.text.pad_token_id) == (0, 49407)
    assert PRESETS["sdxl"] is SDXL and preset_for(320, 2048, 4) is SDXL
    # sgm's yaml says [1, 2, 10], diffusers [1, 2, 10]: the same model, one canonical config.
    assert dataclasses.replace(unet, transformer_depth=[1, 2, 10]) == unet
    assert UNetConfig(transformer_depth=(1, 1, 1, 1)) == SD15.unet and SD15.unet.transformer_depth == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"transformer_depth": (2, 10)}, "one entry per level"),
        ({"transformer_depth": (1, 0, 10)}, "positive at every level with attention"),
        ({"adm_in_channels": 0}, "adm_in_channels must be positive"),
    ],
)
def test_invalid_unet_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SDXL.unet, **change)


def test_the_two_text_encoders_must_fit_the_unet():
    with pytest.raises(ValueError, match="context_dim 2048 is not the two text encoders' widths"):
        SDXL.replace(text=dataclasses.replace(SDXL.text, width=1024, heads=16))
    with pytest.raises(ValueError, match="adm_in_channels must be 2816"):
        SDXL.replace(unet=dataclasses.replace(SDXL.unet, adm_in_channels=2560))
    with pytest.raises(ValueError, match="needs text_2"):
        SDXL.replace(text_2=None)
    with pytest.raises(ValueError, match="needs text_2"):
        SDXL.replace(text_2=dataclasses.replace(SDXL.text_2, projection_dim=None))


# --- every key of the real file, at full size on the meta device ------------------------------------


def test_the_key_list_is_the_original_files(sdxl_keys):
    """2515 keys: the UNet 1680, the VAE 248 (SD's layout: equal to SD 1.5's), CLIP-L 196 +
    position_ids, OpenCLIP-bigG 390 (with text_projection and logit_scale)."""
    prefixes = {"model.diffusion_model.": 1680, "first_stage_model.": 248}
    prefixes |= {"conditioner.embedders.0.transformer.": 197, "conditioner.embedders.1.model.": 390}
    assert len(sdxl_keys) == sum(prefixes.values()) == 2515
    assert all(sum(k.startswith(p) for k in sdxl_keys) == n for p, n in prefixes.items())
    sd15 = json.loads((DATA / "ldm_keys.json").read_text())["v15"]
    assert {k: v for k, v in sd15.items() if k.startswith(VAE_PREFIX)} == _meta_shapes(sdxl_keys, VAE_PREFIX)


def _meta_shapes(keys: dict[str, list[int]], prefix: str) -> dict[str, list[int]]:
    return {k: v for k, v in keys.items() if k.startswith(prefix)}


def test_our_model_writes_every_key_and_shape_of_the_original_file(sdxl_keys):
    model = StableDiffusion(SDXL, empty=True)
    assert _shapes(ldm_state_dict(model)) == sdxl_keys


def test_the_original_file_loads_strictly_and_is_detected_as_sdxl(sdxl_keys, tmp_path):
    """The full-size load check: every tensor of the file goes into our models (meta tensors)."""
    parts = split_ldm(_meta(sdxl_keys))
    assert parts["control"] == {} and len(parts["text"]) == 196 + 390  # position_ids dropped
    config = base_config_from_shapes(parts, None, tmp_path / "sd_xl_base_1.0.safetensors")
    assert config is SDXL
    model = StableDiffusion(config, empty=True)
    load_strict(model.unet, parts["unet"], "UNet", "sdxl")
    load_strict(model.vae, parts["vae"], "VAE", "sdxl")
    load_strict(model.text_encoder, parts["text"], "text encoder", "sdxl")
    assert detect_format(dict.fromkeys(sdxl_keys)) == "ldm"


def _hub_models(device: str = "meta"):
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel.from_config(HUB_UNET)
        vae = diffusers.AutoencoderKL.from_config(HUB_VAE)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(HUB_TEXT))
        text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(HUB_TEXT_2))
    return unet, vae, text, text_2


def _file_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers model's state dict with the ``text_model.`` nesting the files have."""
    if any(k.startswith("text_model.") for k in state):
        return dict(state)
    return {k if k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}


def test_full_size_maps_give_diffusers_models_exactly(sdxl_keys):
    """Our LDM -> diffusers maps of the original file's keys give the state dicts of diffusers' and
    transformers' models built from the hub's config.json files: names and shapes."""
    unet, vae, text, text_2 = _hub_models()
    ours_unet = diffusers_unet.unet_ldm_to_diffusers(_meta(sdxl_keys, UNET_PREFIX), SDXL.unet)
    assert _shapes(ours_unet) == _shapes(unet.state_dict())
    ours_vae = diffusers_vae.vae_ldm_to_diffusers(_meta(sdxl_keys, VAE_PREFIX), SDXL.vae)
    assert _shapes(ours_vae) == _shapes(vae.state_dict())
    ours_text = diffusers_text.text_ldm_to_diffusers(_meta(sdxl_keys, "conditioner.embedders.0."), SDXL.text)
    assert _shapes(ours_text) == _shapes(_file_layout(text.state_dict()))
    ours_text_2 = diffusers_text.text_ldm_to_diffusers(_meta(sdxl_keys, "conditioner.embedders.1."), SDXL.text_2)
    assert _shapes(ours_text_2) == _shapes(_file_layout(text_2.state_dict()))


def test_full_size_maps_agree_with_diffusers_single_file_converters(sdxl_keys):
    """diffusers' own conversion of the original layout: which LDM tensor becomes which diffusers one
    (the very same tensor objects where neither side reshapes), at full size on meta tensors."""
    checkpoint = _meta(sdxl_keys)
    theirs = single_file_utils.convert_ldm_unet_checkpoint(
        checkpoint, diffusers_unet_config.unet_config_to_diffusers(SDXL.unet)
    )
    ours = diffusers_unet.unet_ldm_to_diffusers(_meta_like(checkpoint, UNET_PREFIX), SDXL.unet)
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)

    vae_config = diffusers_vae.vae_config_to_diffusers(SDXL.vae, sample_size=1024)
    theirs = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae_config)
    ours = diffusers_vae.vae_ldm_to_diffusers(_meta_like(checkpoint, VAE_PREFIX), SDXL.vae)
    assert _shapes(ours) == _shapes(theirs)

    theirs = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    ours = diffusers_text.text_ldm_to_diffusers(_meta_like(checkpoint, "conditioner.embedders.0."), SDXL.text)
    assert theirs.pop("text_model.embeddings.position_ids").shape == (1, 77)  # never a weight: ours drops it
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)

    _, _, _, text_2 = _hub_models()
    theirs = single_file_utils.convert_open_clip_checkpoint(text_2, checkpoint, prefix="conditioner.embedders.1.model.")
    ours = diffusers_text.text_ldm_to_diffusers(_meta_like(checkpoint, "conditioner.embedders.1."), SDXL.text_2)
    assert _shapes(ours) == _shapes(theirs)


def _meta_like(checkpoint: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The same tensor objects, ``prefix`` removed."""
    return {k.removeprefix(prefix): v for k, v in checkpoint.items() if k.startswith(prefix)}


def test_configs_agree_with_the_hub_and_with_diffusers_ldm_config_conversion():
    assert diffusers_unet_config.unet_config_from_diffusers(HUB_UNET) == SDXL.unet
    ours = diffusers_unet_config.unet_config_to_diffusers(SDXL.unet, sample_size=128)
    assert {k: ours[k] for k in ours if k in HUB_UNET and k != "upcast_attention"} == {
        k: HUB_UNET[k] for k in ours if k in HUB_UNET and k != "upcast_attention"
    }
    theirs = single_file_utils.create_unet_diffusers_config_from_ldm(SGM_YAML, {}, image_size=1024)
    for key, value in theirs.items():
        assert ours[key] == value, key
    assert diffusers_vae.vae_config_from_diffusers(HUB_VAE) == SDXL.vae
    assert diffusers_vae.vae_config_from_diffusers({**HUB_VAE, "force_upcast": False}) == SDXL.vae  # fp16-fix
    assert diffusers_text.text_config_from_diffusers(HUB_TEXT, penultimate_hidden_state=True) == SDXL.text
    assert diffusers_text.text_config_from_diffusers(HUB_TEXT_2, penultimate_hidden_state=True) == SDXL.text_2
    for text in (SDXL.text, SDXL.text_2):
        back = diffusers_text.text_config_from_diffusers(
            diffusers_text.text_config_to_diffusers(text), penultimate_hidden_state=True
        )
        assert back == text
    assert diffusers_text.text_config_to_diffusers(SDXL.text_2)["architectures"] == ["CLIPTextModelWithProjection"]


def test_a_hub_folder_reads_as_the_sdxl_preset(tmp_path):
    for sub, config in (
        ("unet", HUB_UNET),
        ("vae", HUB_VAE),
        ("text_encoder", HUB_TEXT),
        ("text_encoder_2", HUB_TEXT_2),
    ):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(HUB_SCHEDULER))
    assert read_pipeline_config(tmp_path) == SDXL
    (tmp_path / "text_encoder" / "config.json").write_text(
        json.dumps({**HUB_TEXT, "hidden_size": 1024, "num_attention_heads": 16})
    )
    with pytest.raises(CheckpointError, match=r"unusable diffusers config \(.*context_dim 2048") as caught:
        read_pipeline_config(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [
        {"addition_embed_type": "text_image"},
        {"addition_time_embed_dim": 128},
        {"addition_embed_type": None},
        {"transformer_layers_per_block": [[1], [2], [10]]},
        {"transformer_layers_per_block": [2, 10]},
    ],
)
def test_unsupported_sdxl_like_diffusers_configs_are_refused(change):
    with pytest.raises(ValueError):
        diffusers_unet_config.unet_config_from_diffusers({**HUB_UNET, **change})


# --- the reduced model against diffusers and transformers, on identical random weights ---------------


@pytest.fixture(scope="module")
def small() -> StableDiffusion:
    model = randomize(StableDiffusion(SMALL), seed=22).eval()
    # LayerNorm gains near 1 and biases small, as randomize gives; the text embeddings on their usual scale.
    return model


def _inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([981, 41])
    context = torch.randn(2, 77, SMALL.unet.context_dim, generator=generator)
    pooled = torch.randn(2, SMALL.text_2.projection_dim, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 32, 16, 896, 1152]])
    return x, t, context, pooled, time_ids


def _their_unet(unet: UNet) -> torch.nn.Module:
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(diffusers_unet_config.unet_config_to_diffusers(unet.config))
    theirs.load_state_dict(
        diffusers_unet.unet_ldm_to_diffusers(unet.state_dict(), unet.config), strict=True, assign=True
    )
    return theirs.eval()


@torch.no_grad()
def test_the_unet_matches_diffusers_with_pooled_text_and_time_ids(small):
    unet = small.unet
    x, t, context, pooled, time_ids = _inputs(seed=1)
    theirs = _their_unet(unet)(
        x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    ours = unet(x, t, context, y=added_vector(pooled, time_ids))
    error = relative_error(ours, theirs)
    print(f"SDXL-small UNet: relative max abs error {error:.1e}")
    assert error <= TOLERANCE
    # The vector matters: other sizes, another output.
    other = unet(x, t, context, y=added_vector(pooled, time_ids.flip(0)))
    assert relative_error(other, ours) > 1e-3


@torch.no_grad()
def test_an_sdxl_controlnet_matches_diffusers():
    """The ControlNet of an SDXL UNet reads y as the UNet does (``label_emb`` <-> ``add_embedding``)."""
    controlnet = random_module(lambda: ControlNet(SMALL.controlnet()), seed=5)
    assert "label_emb.0.0.weight" in controlnet.state_dict()
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel.from_config(
            diffusers_unet_config.controlnet_config_to_diffusers(controlnet.config)
        )
    theirs.load_state_dict(
        diffusers_unet.controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config), strict=True, assign=True
    )
    x, t, context, pooled, time_ids = _inputs(seed=2)
    hint = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    down, mid = theirs.eval()(
        x,
        t,
        encoder_hidden_states=context,
        controlnet_cond=hint,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )
    ours = controlnet(x, controlnet.encode_hint(hint), t, context, y=added_vector(pooled, time_ids))
    assert len(ours) == 10  # 9 input blocks and the middle: SDXL's three levels
    assert max(relative_error(a, b) for a, b in zip(ours, [*down, mid], strict=True)) <= TOLERANCE


def _transformers_text(text: TextEncoderConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' model of a text encoder with our weights (eager attention: an explicit softmax)."""
    config = transformers.CLIPTextConfig.from_dict(diffusers_text.text_config_to_diffusers(text))
    config._attn_implementation = "eager"
    cls = transformers.CLIPTextModelWithProjection if text.pooled else transformers.CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    weights = diffusers_text.text_ldm_to_diffusers(state, text)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    for module in model.modules():  # the one buffer, not in any state dict, was made on the meta device
        if hasattr(module, "position_ids"):
            module.position_ids = torch.arange(text.max_length).unsqueeze(0)
    return model.eval()


@torch.no_grad()
def test_the_text_encoders_match_transformers(small):
    encoder: DualTextEncoder = small.text_encoder
    tokens = encoder.tokenize(PROMPTS)
    assert tokens[0, 7:].eq(49407).all()  # CLIP-L's padding; the bigG reads zeros there
    assert with_padding(tokens, 0)[0, 7:].eq(0).all() and with_padding(tokens, 0)[0, 6] == 49407
    state = encoder.state_dict()
    first = {k.removeprefix("embedders.0."): v for k, v in state.items() if k.startswith("embedders.0.")}
    second = {k.removeprefix("embedders.1."): v for k, v in state.items() if k.startswith("embedders.1.")}
    theirs = _transformers_text(SMALL_TEXT, first)(tokens, output_hidden_states=True)
    theirs_2 = _transformers_text(SMALL_TEXT_2, second)(with_padding(tokens, 0), output_hidden_states=True)
    ours = encoder.encode(tokens)
    reference = torch.cat([theirs.hidden_states[-2], theirs_2.hidden_states[-2]], dim=-1)
    assert ours.context.shape == (2, 77, 96) and ours.pooled.shape == (2, 48)
    assert relative_error(ours.context, reference) <= TOLERANCE
    assert relative_error(ours.pooled, theirs_2.text_embeds) <= TOLERANCE
    assert torch.equal(encoder(tokens), ours.context)
    # The padding given does not matter: each encoder gets its own.
    assert torch.equal(encoder.encode(with_padding(tokens, 0)).context, ours.context)


@pytest.fixture(scope="module")
def small_files(small, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sdxl")
    return save_ldm(folder / "sdxl-small.safetensors", small), save_diffusers(folder / "pipeline", small)


@torch.no_grad()
def test_diffusers_pipeline_encodes_prompts_as_ours(small, small_files):
    """diffusers' StableDiffusionXLPipeline, loaded from the folder we write (tokenizers included),
    encodes prompts to our context and pooled embedding, and builds the time ids we build."""
    _, folder = small_files
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    ours = small.text_encoder.encode(small.text_encoder.tokenize(PROMPTS))
    assert relative_error(ours.context, context) <= TOLERANCE and relative_error(ours.pooled, pooled) <= TOLERANCE
    their_ids = pipe._get_add_time_ids(
        (768, 1024), (0, 0), (768, 1024), dtype=torch.float32, text_encoder_projection_dim=SMALL_TEXT_2.projection_dim
    )
    assert their_ids.tolist() == [list(SizeConditioning().time_ids(768, 1024))]


@torch.no_grad()
def test_the_vae_matches_diffusers_and_keeps_its_scale(small, small_files):
    vae = small.vae
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL.from_config(diffusers_vae.vae_config_to_diffusers(vae.config))
    theirs.load_state_dict(diffusers_vae.vae_ldm_to_diffusers(vae.state_dict(), vae.config), strict=True, assign=True)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert relative_error(vae.encode(images).mean, theirs.eval().encode(images).latent_dist.mean) <= TOLERANCE
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    assert relative_error(vae.decode(latents), theirs.decode(latents).sample) <= TOLERANCE
    _, folder = small_files
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.13025
    assert load_base(folder).vae.scale_factor == 0.13025


# --- single files and folders, both directions ---------------------------------------------------------


def test_the_ldm_file_round_trips_bit_identically(small, small_files):
    path, _ = small_files
    written, _ = read_state_dict(path)
    assert {k.split(".")[0] for k in written} == {"model", "first_stage_model", "conditioner"}
    assert torch.equal(
        written["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None]
    )
    assert "conditioner.embedders.1.model.text_projection" in written
    loaded = load_base(path)
    assert loaded.config == SMALL  # stored in the file's metadata, text_2 included
    _same_values(loaded.state_dict(), small.state_dict())
    assert inspect_contents(path).has_base and not inspect_contents(path).has_controlnet


def test_the_diffusers_folder_round_trips_and_is_a_real_sdxl_pipeline(small, small_files, tmp_path):
    _, folder = small_files
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (folder / sub).is_dir(), sub
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((folder / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    loaded = load_base(folder)
    assert loaded.config.replace(name=SMALL.name) == SMALL
    ours, theirs = small.state_dict(), loaded.state_dict()
    # logit_scale (open_clip's, never used) has no place in diffusers' layout: it comes back as zero.
    placeholder = "text_encoder.embedders.1.model.logit_scale"
    assert not theirs.pop(placeholder).any() and ours.pop(placeholder) is not None
    _same_values(theirs, ours)
    # diffusers -> ours -> diffusers: every file bit-identical.
    again = save_diffusers(tmp_path / "again", loaded)
    for sub, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
    ):
        _same_values(
            read_state_dict(again / sub / f"{name}.safetensors")[0],
            read_state_dict(folder / sub / f"{name}.safetensors")[0],
        )


def test_diffusers_own_conversion_of_our_single_file_equals_our_folder(small_files):
    """diffusers' StableDiffusionXLPipeline.from_single_file converts our random LDM file with its own
    code (the configs from our folder); every tensor equals what its from_pretrained reads from the
    folder we wrote."""
    path, folder = small_files
    converted = diffusers.StableDiffusionXLPipeline.from_single_file(path, config=str(folder), local_files_only=True)
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _same_values(getattr(converted, name).state_dict(), getattr(reference, name).state_dict())


def test_diffusers_converters_equal_ours_on_the_random_file(small_files):
    """The same with the converter functions themselves, tensor for tensor, on the file's tensors."""
    path, folder = small_files
    checkpoint, _ = read_state_dict(path)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    expected = read_state_dict(folder / "unet" / "diffusion_pytorch_model.safetensors")[0]
    _same_values(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config), expected)
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    expected = read_state_dict(folder / "vae" / "diffusion_pytorch_model.safetensors")[0]
    _same_values(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae_config), expected)
    clip = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    clip.pop("text_model.embeddings.position_ids")
    _same_values(clip, read_state_dict(folder / "text_encoder" / "model.safetensors")[0])
    text_2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig.from_dict(json.loads((folder / "text_encoder_2" / "config.json").read_text()))
    )
    bigg = single_file_utils.convert_open_clip_checkpoint(
        text_2, checkpoint, prefix=CONDITIONER_PREFIX + "embedders.1.model."
    )
    _same_values(bigg, read_state_dict(folder / "text_encoder_2" / "model.safetensors")[0])


# --- size conditioning -----------------------------------------------------------------------------------


def test_size_conditioning_defaults_and_changes():
    assert SizeConditioning().time_ids(1024, 768) == (1024, 768, 0, 0, 1024, 768)
    custom = SizeConditioning(original_size=(512, 512), crop_top_left=(16, 32), target_size=(2048, 1536))
    assert custom.time_ids(1024, 768) == (512, 512, 16, 32, 2048, 1536)
    assert SizeConditioning(original_size=[4096, 4096]).original_size == (4096, 4096)
    pooled = torch.randn(3, 48)
    y = size_vector(pooled, 1024, 768, custom)
    assert y.shape == (3, 48 + 6 * 256) and torch.equal(y[:, :48], pooled)
    assert torch.equal(y, added_vector(pooled, torch.tensor([[512.0, 512, 16, 32, 2048, 1536]] * 3)))
    # Each number gets its own 256 sinusoids, cosines first: a zero crop is cos(0) = 1, sin(0) = 0.
    crop_top = y[:, 48 + 2 * 256 : 48 + 3 * 256]
    assert torch.equal(size_vector(pooled, 64, 64)[:, 48 + 2 * 256 :][:, :128], torch.ones(3, 128))
    assert not torch.equal(crop_top[:, :128], torch.ones(3, 128))
    model = build_empty(lambda: StableDiffusion(SDXL))
    assert model.added_conditioning(torch.zeros(1, 1280), 1024, 1024).shape == (1, 2816)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"original_size": (0, 512)}, "original_size must be at least 1"),
        ({"crop_top_left": (-1, 0)}, "crop_top_left must be at least 0"),
        ({"target_size": (512,)}, "target_size must be two whole numbers"),
        ({"target_size": (512.5, 512)}, "two whole numbers"),
        ({"crop_top_left": None}, "two whole numbers"),
    ],
)
def test_bad_size_conditioning_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SizeConditioning(**kwargs)


def test_the_vector_y_is_required_exactly_for_sdxl():
    unet = build_empty(lambda: UNet(SMALL.unet)).to_empty(device="cpu")
    x, t, context, pooled, time_ids = _inputs(seed=6)
    with pytest.raises(ValueError, match=r"needs the vector y \[batch, 1584\]"):
        unet(x, t, context)
    with pytest.raises(ValueError, match=r"y must have shape \[2, 1584\]"):
        unet(x, t, context, y=pooled)
    sd_unet = build_empty(lambda: UNet(SD15.unet))
    with pytest.raises(ValueError, match="takes no vector y"):
        sd_unet(x.to("meta"), t.to("meta"), torch.empty(2, 77, 768, device="meta"), y=pooled.to("meta"))
    with pytest.raises(ValueError, match="no size conditioning"):
        build_empty(lambda: StableDiffusion(SD15)).added_conditioning(pooled, 512, 512)
    with pytest.raises(ValueError, match="time_ids must have shape"):
        added_vector(pooled, time_ids[:, :4])


# --- bad files and combinations --------------------------------------------------------------------------


def test_an_sdxl_file_missing_its_second_text_encoder_is_refused_in_one_line(small_files, tmp_path):
    path, _ = small_files
    state, metadata = read_state_dict(path)
    broken = {k: v.contiguous() for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(broken, str(tmp_path / "broken.safetensors"), metadata={"format": "pt", **metadata})
    with pytest.raises(
        CheckpointError, match=r"the text encoder weights do not fit the model; \d+ missing: embedders.1"
    ) as caught:
        load_base(tmp_path / "broken.safetensors")
    assert "\n" not in str(caught.value)
    no_label = {k: v.contiguous() for k, v in state.items() if ".label_emb." not in k}
    save_file(no_label, str(tmp_path / "no-label.safetensors"), metadata={"format": "pt", **metadata})
    with pytest.raises(CheckpointError, match=re.escape("4 missing: label_emb.0.0.weight")):
        load_base(tmp_path / "no-label.safetensors")


def test_an_sd15_controlnet_is_refused_for_an_sdxl_base():
    with pytest.raises(CheckpointError, match=r"made for SD 1.x but the base model is SDXL \(sdxl\)"):
        check_compatible(SD15.controlnet(), SDXL, "control_v11p_sd15_canny.pth")
    assert isinstance(SDXL.controlnet(), ControlNetConfig) and isinstance(SDXL, ModelConfig)


# --- a VAE alone: SDXL's fp16-fix VAE and the like -------------------------------------------------------


def test_a_vae_loads_alone_from_every_layout(small, small_files, tmp_path):
    vae = small.vae
    _, folder = small_files
    # a diffusers AutoencoderKL folder, as madebyollin/sdxl-vae-fp16-fix ships (force_upcast false)
    fp16_fix = tmp_path / "sdxl-vae-fp16-fix"
    fp16_fix.mkdir()
    config = {**json.loads((folder / "vae" / "config.json").read_text()), "force_upcast": False}
    (fp16_fix / "config.json").write_text(json.dumps(config))
    weights = read_state_dict(folder / "vae" / "diffusion_pytorch_model.safetensors")[0]
    save_file({k: v.contiguous() for k, v in weights.items()}, str(fp16_fix / "diffusion_pytorch_model.safetensors"))
    loaded = load_vae(fp16_fix)
    assert loaded.config == SMALL.vae
    _same_values(loaded.state_dict(), vae.state_dict())
    _same_values(load_vae(folder).state_dict(), vae.state_dict())  # a pipeline's vae/
    # single files: diffusers' layout, the LDM layout bare or under first_stage_model., a whole model
    single = tmp_path / "sdxl_vae.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(single))
    bare = tmp_path / "vae-ldm.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(bare))
    prefixed = tmp_path / "vae-prefixed.safetensors"
    save_file({VAE_PREFIX + k: v.contiguous() for k, v in vae.state_dict().items()}, str(prefixed))
    for path in (single, bare, prefixed, small_files[0]):
        loaded = load_vae(path, SMALL.vae)
        assert loaded.scale_factor == 0.13025
        _same_values(loaded.state_dict(), vae.state_dict())
    with pytest.raises(CheckpointError, match="the VAE weights do not fit the model") as caught:
        load_vae(bare)  # SD's full-size VAE config by default: these are the small one's
    assert "\n" not in str(caught.value)
    not_a_vae = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(1)}, str(not_a_vae))
    with pytest.raises(CheckpointError, match="not a VAE"):
        load_vae(not_a_vae)

"""SDXL's control models (issue 22, points 3-5): diffusers' SDXL ControlNets (full, -mid, -small),
xinsir's union model and its ProMax, Stability's Control-LoRA and TencentARC's SDXL T2I-Adapters.

* Every key and shape of the real files (``tests/data/sdxl_control_keys.json``, read off diffusers'
  models built from the hub's configs and off the Control-LoRA layout by
  ``tests/data/generate_sdxl_control_keys.py``) at full size on the meta device: detected as what
  they are, mapped and loaded strictly.
* A reduced SDXL (tests/test_sdxl.py's: the real key patterns and code paths) numerically against
  diffusers on identical random weights: the UNet with a ControlNet, -mid and -small, the union model
  with two conditions, a Control-LoRA against diffusers' own conversion of the file applied by hand
  to ``ControlNetModel.from_unet``, the XL adapter; and all of them as units of one guided denoiser.
* Bad combinations refused in one line.

Tolerance: max abs error <= 1e-4 of the reference's largest magnitude (fp32), as tests/test_sdxl.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from controlnet.config import SD15, SDXL, T2IAdapterConfig, UnionConfig
from controlnet.formats import diffusers_unet, diffusers_unet_config
from controlnet.formats.control_lora import control_lora_config, control_lora_weights
from controlnet.formats.detect import (
    check_compatible,
    controlnet_config_from_shapes,
    detect_format,
    diffusers_controlnet_config_from_shapes,
    inspect_contents,
)
from controlnet.formats.errors import CheckpointError
from controlnet.formats.t2i_adapter import (
    adapter_diffusers_to_original,
    adapter_original_to_diffusers,
    check_adapter_compatible,
    config_from_diffusers,
    config_from_diffusers_shapes,
    config_from_original,
    config_to_diffusers,
)
from controlnet.loading import load_adapter, load_controlnet, load_strict
from controlnet.models.conditioning import added_vector
from controlnet.models.controlnet import ControlNet, scale_residuals
from controlnet.models.controlnet_union import (
    UnionCondition,
    UnionControlNet,
    build_controlnet,
    control_type_id,
    inpaint_condition,
)
from controlnet.models.stable_diffusion import build_empty
from controlnet.models.t2i_adapter import build_adapter, scale_features
from controlnet.models.unet import MIDDLE, UNet, adapter_blocks
from controlnet.sampling.guidance import ActiveAdapter, ActiveControl, GuidedDenoiser

from .helpers import random_module, relative_error
from .test_sdxl import SMALL

diffusers = pytest.importorskip("diffusers")
state_dict_utils = pytest.importorskip("diffusers.utils.state_dict_utils")

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-4

# SDXL's two smaller ControlNets: fewer transformers than the base (tests/data/generate_sdxl_control_keys.py).
SDXL_MID_UNET = dataclasses.replace(SDXL.unet, attention_resolutions=(4,), transformer_depth=1)
SDXL_SMALL_UNET = dataclasses.replace(SDXL.unet, attention_resolutions=(), transformer_depth=0)
VARIANTS = {
    "controlnet_full": SDXL.controlnet(),
    "controlnet_mid": dataclasses.replace(SDXL.controlnet(), unet=SDXL_MID_UNET),
    "controlnet_small": dataclasses.replace(SDXL.controlnet(), unet=SDXL_SMALL_UNET),
    "union": dataclasses.replace(SDXL.controlnet(), union=UnionConfig(control_types=6)),
    "union_promax": dataclasses.replace(SDXL.controlnet(), union=UnionConfig(control_types=8)),
}
# The same variants at the reduced size, as diffusers configs.
REDUCED = diffusers_unet_config.controlnet_config_to_diffusers(SMALL.controlnet())
REDUCED_VARIANTS = {
    "mid": {
        **REDUCED,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "transformer_layers_per_block": [0, 0, 1],
    },
    "small": {**REDUCED, "down_block_types": ["DownBlock2D"] * 3, "transformer_layers_per_block": [0, 0, 0]},
}


@pytest.fixture(scope="module")
def keys() -> dict:
    return json.loads((DATA / "sdxl_control_keys.json").read_text())


def _meta(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _inputs(seed: int, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=generator)
    t = torch.tensor([981, 41][:batch])
    context = torch.randn(batch, 77, SMALL.unet.context_dim, generator=generator)
    pooled = torch.randn(batch, SMALL.text_2.projection_dim, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 32, 16, 896, 1152]][:batch])
    return x, t, context, pooled, time_ids


def _images(seed: int, count: int, channels: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, channels, 128, 128, generator=generator) for _ in range(count)]


def _their_controlnet(model: ControlNet, cls=None):
    config = diffusers_unet_config.controlnet_config_to_diffusers(model.config)
    cls = cls or (diffusers.ControlNetUnionModel if model.config.union else diffusers.ControlNetModel)
    with torch.device("meta"):
        theirs = cls.from_config(config)
    weights = diffusers_unet.controlnet_ldm_to_diffusers(model.state_dict(), model.config)
    theirs.load_state_dict(weights, strict=True, assign=True)
    return theirs.eval()


def _their_unet(unet: UNet):
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(diffusers_unet_config.unet_config_to_diffusers(unet.config))
    theirs.load_state_dict(
        diffusers_unet.unet_ldm_to_diffusers(unet.state_dict(), unet.config), strict=True, assign=True
    )
    return theirs.eval()


@pytest.fixture(scope="module")
def unet() -> UNet:
    return random_module(lambda: UNet(SMALL.unet), seed=31)


# --- every key of the real files, at full size on the meta device ----------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_hub_controlnets_are_read_and_loaded_strictly(keys, name, tmp_path):
    """diffusers' files of the full, -mid and -small SDXL ControlNets and of the union models: their
    config.json and their shapes give the same configuration, every tensor loads into our model."""
    expected = VARIANTS[name]
    file = _meta(keys[name])
    assert diffusers_controlnet_config_from_shapes(file, SDXL, f"{name}.safetensors") == expected
    assert diffusers_controlnet_config_from_shapes(file, None, f"{name}.safetensors") == expected
    assert diffusers_unet_config.controlnet_config_from_diffusers(keys["configs"][name]) == expected
    ours = diffusers_unet.controlnet_diffusers_to_ldm(file, expected)
    model = build_empty(lambda: build_controlnet(expected))
    assert isinstance(model, UnionControlNet) == name.startswith("union")
    load_strict(model, ours, "ControlNet", name)
    assert len(model.zero_convs) + 1 == 10  # residuals: 9 input blocks and the middle block
    check_compatible(expected, SDXL, name)
    with pytest.raises(CheckpointError, match=r"made for SDXL but the base model is SD 1.x \(sd15\)"):
        check_compatible(expected, SD15, name)
    # The same ControlNet in the LDM layout (the AUTOMATIC1111 extension's and ComfyUI's names):
    # detected from its keys alone (input_blocks.8.1.transformer_blocks.9 full, .0 mid, none small).
    assert controlnet_config_from_shapes(ours, f"{name}.safetensors") == expected


@pytest.mark.parametrize("name", ["adapter_xl_3ch", "adapter_xl_1ch"])
def test_the_hub_xl_adapters_are_read_and_loaded_strictly(keys, name):
    channels = 3 if name.endswith("3ch") else 1
    expected = T2IAdapterConfig(kind="full_xl", in_channels=channels, downscale_factor=16)
    file = _meta(keys[name])
    assert config_from_diffusers(keys["configs"][name], name) == expected
    assert config_from_diffusers_shapes(file, name) == expected
    assert config_from_diffusers_shapes(file, name, factor=SDXL.vae.downsample_factor) == expected
    original = adapter_diffusers_to_original(file, expected)  # TencentARC's Adapter_XL layout
    assert config_from_original(original, name) == expected
    assert adapter_original_to_diffusers(original, expected).keys() == file.keys()
    load_strict(build_empty(lambda: build_adapter(expected)), original, "T2I-Adapter", name)
    check_adapter_compatible(expected, SDXL, name)
    assert adapter_blocks(SDXL.unet, 4) == (3, 5, 8, MIDDLE)
    with pytest.raises(CheckpointError, match=r"do not fit the base model sd15's UNet levels and middle block"):
        check_adapter_compatible(expected, SD15, name)


def test_the_control_lora_layout_is_diffusers_conversions_and_loads_on_the_sdxl_unet(keys):
    """Stability's rank-128 file: 396 MB in float16, as published; every low-rank pair is the
    lora_A/lora_B of a Linear or Conv2d of diffusers' ControlNetModel after diffusers' own conversion,
    every other tensor one of its parameters; rebuilt on SDXL's UNet, every ControlNet weight is given."""
    file = _meta(keys["control_lora_rank128"])
    sizes = [v.numel() * 2 for k, v in file.items()]
    assert round(sum(sizes) / 1e6) == 396
    assert detect_format(file) == "control-lora"
    converted = state_dict_utils.convert_sai_sd_control_lora_state_dict_to_peft(dict(file))
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel.from_config(keys["configs"]["controlnet_full"])
    modules, params = dict(theirs.named_modules()), theirs.state_dict()
    for key in converted:
        if ".lora_" in key:
            module = modules[key.split(".lora_")[0]]
            assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)), key
        else:
            assert key in params, key
    assert sum(".lora_" in k for k in converted) == sum(k.endswith((".up", ".down")) for k in file)

    config = control_lora_config(file, SDXL.unet, "control-lora-canny-rank128.safetensors")
    assert config == SDXL.controlnet()
    with torch.device("meta"):
        model, base = ControlNet(config), UNet(SDXL.unet)
    weights = control_lora_weights(file, base.state_dict(), model.state_dict(), "control-lora")
    load_strict(model, weights, "ControlNet", "control-lora")


# --- the reduced SDXL against diffusers ----------------------------------------------------------------


@torch.no_grad()
def test_the_unet_with_a_controlnet_matches_diffusers(unet):
    """SDXL's UNet fed an SDXL ControlNet's residuals at a strength: diffusers' ControlNetModel and
    UNet2DConditionModel (down_block_additional_residuals, mid_block_additional_residual)."""
    controlnet = random_module(lambda: ControlNet(SMALL.controlnet()), seed=32)
    x, t, context, pooled, time_ids = _inputs(seed=33)
    (hint,) = _images(seed=34, count=1)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    down, mid = _their_controlnet(controlnet)(
        x, t, context, hint.expand(2, -1, -1, -1), conditioning_scale=0.6, added_cond_kwargs=added, return_dict=False
    )
    reference = _their_unet(unet)(
        x,
        t,
        context,
        added_cond_kwargs=added,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    y = added_vector(pooled, time_ids)
    residuals = scale_residuals(controlnet(x, controlnet.encode_hint(hint), t, context, y), [0.6] * 10)
    ours = unet(x, t, context, control=residuals, y=y)
    assert relative_error(ours, reference) <= TOLERANCE
    assert relative_error(unet(x, t, context, y=y), reference) > 1e-3  # the ControlNet matters


@pytest.mark.parametrize("name", list(REDUCED_VARIANTS))
@torch.no_grad()
def test_mid_and_small_controlnets_match_diffusers_and_load_from_their_files(name, tmp_path):
    config = diffusers_unet_config.controlnet_config_from_diffusers(REDUCED_VARIANTS[name])
    assert config.unet != SMALL.unet
    check_compatible(config, SMALL, name)
    ours = random_module(lambda: ControlNet(config), seed=35)
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel.from_config(REDUCED_VARIANTS[name])
    weights = diffusers_unet.controlnet_ldm_to_diffusers(ours.state_dict(), config)
    theirs.load_state_dict(weights, strict=True, assign=True)
    x, t, context, pooled, time_ids = _inputs(seed=36)
    (hint,) = _images(seed=37, count=1)
    down, mid = theirs.eval()(
        x,
        t,
        context,
        hint.expand(2, -1, -1, -1),
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )
    residuals = ours(x, ours.encode_hint(hint), t, context, added_vector(pooled, time_ids))
    assert max(relative_error(a, b) for a, b in zip(residuals, [*down, mid], strict=True)) <= TOLERANCE
    # A single diffusers-layout file (no config.json): its shapes say which variant it is.
    path = tmp_path / f"diffusers_xl_canny_{name}.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    loaded = load_controlnet(path, SMALL)
    assert loaded.config == config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def union() -> UnionControlNet:
    config = dataclasses.replace(SMALL.controlnet(), union=UnionConfig(control_types=8))
    return random_module(lambda: UnionControlNet(config), seed=38)


@torch.no_grad()
def test_the_union_model_with_two_conditions_matches_diffusers(union, unet):
    """Two conditions in one network, one pass, each with its weight: diffusers' ControlNetUnionModel
    with a conditioning_scale list, its residuals into the UNet."""
    x, t, context, pooled, time_ids = _inputs(seed=39)
    pose, edges = _images(seed=40, count=2)
    used = torch.zeros(2, 8)
    used[:, [0, 3]] = 1
    added = {"text_embeds": pooled, "time_ids": time_ids}
    down, mid = _their_controlnet(union)(
        x,
        t,
        context,
        [pose.expand(2, -1, -1, -1), edges.expand(2, -1, -1, -1)],
        control_type=used,
        control_type_idx=[0, 3],
        conditioning_scale=[0.7, 1.3],
        added_cond_kwargs=added,
        return_dict=False,
    )
    reference = _their_unet(unet)(
        x, t, context, added_cond_kwargs=added, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    hint = union.encode_conditions([UnionCondition(pose, "openpose", 0.7), UnionCondition(edges, "canny", 1.3)])
    y = added_vector(pooled, time_ids)
    residuals = union(x, hint, t, context, y)
    assert max(relative_error(a, b) for a, b in zip(residuals, [*down, mid], strict=True)) <= TOLERANCE
    assert relative_error(unet(x, t, context, control=residuals, y=y), reference) <= TOLERANCE
    # The types matter (the control-type embedding and task_embedding), and so does each image.
    swapped = union(
        x, union.encode_conditions([UnionCondition(pose, 1, 0.7), UnionCondition(edges, 3, 1.3)]), t, context, y
    )
    assert relative_error(swapped[-1], residuals[-1]) > 1e-3


@torch.no_grad()
def test_one_union_condition_is_diffusers_single_condition_model(union):
    """One condition: diffusers scales the residuals by conditioning_scale, here the unit's strength."""
    x, t, context, pooled, time_ids = _inputs(seed=41)
    (depth,) = _images(seed=42, count=1)
    used = torch.zeros(2, 8)
    used[:, 1] = 1
    down, mid = _their_controlnet(union)(
        x,
        t,
        context,
        [depth.expand(2, -1, -1, -1)],
        control_type=used,
        control_type_idx=[1],
        conditioning_scale=0.8,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )
    unit = ActiveControl(union, union.encode_hint(depth, "depth"), strength=0.8)
    residuals = unit.residuals(x, t, context, added_vector(pooled, time_ids))
    assert max(relative_error(a, b) for a, b in zip(residuals, [*down, mid], strict=True)) <= TOLERANCE


def test_union_files_and_folders_load_as_union_models(union, tmp_path):
    """xinsir's files: diffusers' layout, a config.json that says ControlNetModel with
    num_control_type (the ProMax's 8), or a single file told by its task_embedding."""
    weights = diffusers_unet.controlnet_ldm_to_diffusers(union.state_dict(), union.config)
    folder = tmp_path / "controlnet-union-sdxl-1.0"
    folder.mkdir()
    config = {**REDUCED, "num_control_type": 8}  # as xinsir's config_promax.json: no num_trans_* keys
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    single = tmp_path / "diffusion_pytorch_model_promax.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(single))
    assert inspect_contents(single).has_controlnet
    for path in (folder, single):
        loaded = load_controlnet(path, SMALL)
        assert isinstance(loaded, UnionControlNet) and loaded.config == union.config
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), union.state_dict().values(), strict=True)
        )


def _control_lora_file(path: Path, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random Control-LoRA of the reduced SDXL in Stability's layout (module docstring of
    formats/control_lora.py): low-rank pairs for the encoder's weights, full tensors for the rest."""
    trained = random_module(lambda: ControlNet(SMALL.controlnet()), seed=43)
    generator = torch.Generator().manual_seed(44)
    file = {"lora_controlnet": torch.tensor([])}
    for key, value in trained.state_dict().items():
        if key.startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block.")) and value.ndim >= 2:
            layer = key.removesuffix(".weight")
            file[f"{layer}.up"] = 0.1 * torch.randn(value.shape[0], rank, *[1] * (value.ndim - 2), generator=generator)
            file[f"{layer}.down"] = torch.randn(rank, *value.shape[1:], generator=generator) / value[0].numel() ** 0.5
        else:
            file[key] = value
    save_file(file, str(path))
    return file


@torch.no_grad()
def test_a_control_lora_matches_diffusers_conversion_applied_to_from_unet(unet, tmp_path):
    """The reference, independent of our code: diffusers' ControlNetModel.from_unet of the base, then
    diffusers' own conversion of the file (convert_sai_sd_control_lora_state_dict_to_peft), each
    lora_B @ lora_A added to its weight and each full tensor set, by hand."""
    path = tmp_path / "control-lora-canny-rank4.safetensors"
    file = _control_lora_file(path)
    ours = load_controlnet(path, SMALL, unet=unet)
    assert ours.config == SMALL.controlnet() and inspect_contents(path).has_controlnet

    reference = diffusers.ControlNetModel.from_unet(_their_unet(unet))
    converted = state_dict_utils.convert_sai_sd_control_lora_state_dict_to_peft(dict(file))
    state = reference.state_dict()
    for key, value in converted.items():
        if ".lora_A." in key:
            weight = key.replace(".lora_A.weight", ".weight")
            low_rank = converted[key.replace("lora_A", "lora_B")].flatten(1) @ value.flatten(1)
            state[weight] += low_rank.reshape(state[weight].shape)
        elif ".lora_B." not in key:
            state[key].copy_(value)
    x, t, context, pooled, time_ids = _inputs(seed=45)
    (hint,) = _images(seed=46, count=1)
    down, mid = reference.eval()(
        x,
        t,
        context,
        hint.expand(2, -1, -1, -1),
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )
    residuals = ours(x, ours.encode_hint(hint), t, context, added_vector(pooled, time_ids))
    assert max(relative_error(a, b) for a, b in zip(residuals, [*down, mid], strict=True)) <= TOLERANCE
    # The UNet's own weights stay its own: the ControlNet shares no tensor with it.
    pointers = {p.data_ptr() for p in unet.parameters()}
    assert not any(p.data_ptr() in pointers for p in ours.parameters())


@pytest.fixture(scope="module")
def xl_adapter():
    config = T2IAdapterConfig(kind="full_xl", channels=(32, 64, 128, 128), downscale_factor=16)
    return random_module(lambda: build_adapter(config), seed=47)


@torch.no_grad()
def test_the_xl_adapter_matches_diffusers_and_loads_from_both_layouts(xl_adapter, unet, tmp_path):
    """diffusers' T2IAdapter (full_adapter_xl) and UNet2DConditionModel's
    down_intrablock_additional_residuals: after input block 3 (the first downsampling: SDXL's first
    level has no cross-attention), 5 and 8, and on the middle block's output."""
    config = xl_adapter.config
    check_adapter_compatible(config, SMALL, "xl")
    weights = adapter_original_to_diffusers(xl_adapter.state_dict(), config)
    with torch.device("meta"):
        theirs = diffusers.T2IAdapter.from_config(config_to_diffusers(config))
    theirs.load_state_dict(weights, strict=True, assign=True)
    (image,) = _images(seed=48, count=1)
    features = xl_adapter(image)
    assert [list(f.shape) for f in features] == [[1, 32, 8, 8], [1, 64, 8, 8], [1, 128, 4, 4], [1, 128, 4, 4]]
    their_features = theirs.eval()(image)
    assert max(relative_error(a, b) for a, b in zip(features, their_features, strict=True)) <= TOLERANCE
    x, t, context, pooled, time_ids = _inputs(seed=49)
    reference = _their_unet(unet)(
        x,
        t,
        context,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        down_intrablock_additional_residuals=[0.8 * f.expand(2, -1, -1, -1) for f in their_features],
    ).sample
    y = added_vector(pooled, time_ids)
    ours = unet(x, t, context, adapter_features=scale_features(features, 0.8), y=y)
    assert relative_error(ours, reference) <= TOLERANCE
    assert relative_error(unet(x, t, context, y=y), reference) > 1e-3

    folder = tmp_path / "t2i-adapter-openpose-sdxl-1.0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_diffusers(config)))
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    tencentarc = tmp_path / "t2i-adapter_xl_openpose.safetensors"
    save_file(dict(xl_adapter.state_dict()), str(tencentarc))
    for path in (folder, tencentarc):
        loaded = load_adapter(path, SMALL)
        assert loaded.config == config
        assert all(
            torch.equal(a, b)
            for a, b in zip(loaded.state_dict().values(), xl_adapter.state_dict().values(), strict=True)
        )


@torch.no_grad()
def test_sdxl_units_together_in_the_guided_denoiser_match_diffusers(unet, union, xl_adapter):
    """A ControlNet at 0.6, the union model with two conditions and the XL adapter at 0.8, under
    classifier-free guidance (both sides batched, each with its own vector y): diffusers' models
    composed by hand, as its SDXL pipelines do (residuals summed, the adapter's on both sides)."""
    controlnet = random_module(lambda: ControlNet(SMALL.controlnet()), seed=50)
    hint, pose, edges, image = _images(seed=51, count=4)
    x, t, context, pooled, time_ids = _inputs(seed=52, batch=1)
    _, _, negative, negative_pooled, _ = _inputs(seed=53, batch=1)
    conditions = [UnionCondition(pose, "openpose", 0.7), UnionCondition(edges, "canny", 1.3)]
    units = [
        ActiveControl(controlnet, controlnet.encode_hint(hint), strength=0.6),
        ActiveControl(union, union.encode_conditions(conditions)),
    ]
    adapters = [ActiveAdapter(scale_features(xl_adapter(image), 0.8))]
    y, negative_y = added_vector(pooled, time_ids), added_vector(negative_pooled, time_ids)
    denoiser = GuidedDenoiser(unet, context, negative, 5.0, units, adapters=adapters, cond_y=y, uncond_y=negative_y)
    ours = denoiser(x, t)

    their_unet, their_controlnet, their_union = (
        _their_unet(unet),
        _their_controlnet(controlnet),
        _their_controlnet(union),
    )
    features = [0.8 * f for f in xl_adapter(image)]
    used = torch.zeros(1, 8)
    used[:, [0, 3]] = 1

    def side(text: torch.Tensor, text_pooled: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": text_pooled, "time_ids": time_ids}
        down, mid = their_controlnet(
            x, t, text, hint, conditioning_scale=0.6, added_cond_kwargs=added, return_dict=False
        )
        down_u, mid_u = their_union(
            x,
            t,
            text,
            [pose, edges],
            used,
            [0, 3],
            conditioning_scale=[0.7, 1.3],
            added_cond_kwargs=added,
            return_dict=False,
        )
        return their_unet(
            x,
            t,
            text,
            added_cond_kwargs=added,
            down_block_additional_residuals=[a + b for a, b in zip(down, down_u, strict=True)],
            mid_block_additional_residual=mid + mid_u,
            down_intrablock_additional_residuals=[f.clone() for f in features],
        ).sample

    uncond, cond = side(negative, negative_pooled), side(context, pooled)
    assert relative_error(ours, uncond + 5.0 * (cond - uncond)) <= TOLERANCE


@torch.no_grad()
def test_sdxl_units_keep_their_windows_and_modes(unet, union):
    """A union unit outside its window is not run; in "control" mode it acts on the conditional side
    only (the unconditional side is the plain UNet's)."""
    (depth,) = _images(seed=54, count=1)
    x, t, context, pooled, time_ids = _inputs(seed=55, batch=1)
    _, _, negative, negative_pooled, _ = _inputs(seed=56, batch=1)
    y, negative_y = added_vector(pooled, time_ids), added_vector(negative_pooled, time_ids)
    hint = union.encode_hint(depth, "depth")
    timesteps = torch.tensor([981.0, 41.0])

    def denoise(unit: ActiveControl, scale: float = 5.0) -> torch.Tensor:
        denoiser = GuidedDenoiser(
            unet, context, negative, scale, [unit], timesteps=timesteps, cond_y=y, uncond_y=negative_y
        )
        return denoiser(x, t[:1])

    plain = GuidedDenoiser(unet, context, negative, 5.0, [], cond_y=y, uncond_y=negative_y)(x, t[:1])
    assert torch.equal(denoise(ActiveControl(union, hint, start=0.5)), plain)  # step 0 of 2: outside
    assert not torch.equal(denoise(ActiveControl(union, hint)), plain)
    controlled = denoise(ActiveControl(union, hint, mode="control"))
    uncond = unet(x, t[:1], negative, y=negative_y)
    cond = unet(
        x, t[:1], context, control=ActiveControl(union, hint, mode="control").residuals(x, t[:1], context, y), y=y
    )
    assert relative_error(controlled, uncond + 5.0 * (cond - uncond)) <= 1e-5


def test_promax_inpainting_condition_and_type():
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(57))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    condition = inpaint_condition(image, mask)
    assert condition[..., 2:5, 3:7].eq(0).all() and torch.equal(condition * (1 - mask), image * (1 - mask))
    assert control_type_id("inpaint", 8) == control_type_id("repaint", 8) == 7
    assert control_type_id("tile", 8) == 6 and control_type_id("Canny", 6) == control_type_id("mlsd", 6) == 3


# --- bad combinations, one line each ---------------------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


def test_an_sdxl_controlnet_with_an_sd15_base_is_refused(keys, tmp_path):
    """diffusers' -mid file given with an SD 1.5 base: refused by its shapes before its weights load
    (the file holds just the tensors detection reads)."""
    shapes = keys["controlnet_mid"]
    read = [k for k in shapes if k.startswith(("conv_in.", "controlnet_cond_embedding.", "add_embedding.linear_1"))]
    read += [
        "mid_block.attentions.0.proj_in.weight",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    ]
    path = tmp_path / "diffusers_xl_canny_mid.safetensors"
    save_file({k: torch.zeros(shapes[k]) for k in read}, str(path))
    with pytest.raises(CheckpointError, match=r"made for SDXL but the base model is SD 1.x \(sd15\)") as error:
        load_controlnet(path, SD15)
    _one_line(error)


@pytest.mark.parametrize(
    ("control_type", "message"),
    [
        ("blur", r"unknown union control type 'blur'; this model takes: openpose 0"),
        (8, r"control type 8 is not one of this union model's 8"),
        (True, r"a union control type is a name or an id"),
        (None, r"needs the control type of its image"),
    ],
)
def test_a_union_model_refuses_an_unknown_control_type(union, control_type, message):
    (image,) = _images(seed=58, count=1)
    with pytest.raises(ValueError, match=message) as error:
        union.encode_hint(image, control_type)
    _one_line(error)


def test_the_first_union_model_has_no_tile_or_inpaint():
    with pytest.raises(
        ValueError, match=r"'tile' is not one of this union model's 6 \(tile and inpaint need the ProMax"
    ):
        control_type_id("tile", 6)


def test_a_control_lora_needs_its_sdxl_base(unet, tmp_path):
    path = tmp_path / "control-lora-canny-rank4.safetensors"
    _control_lora_file(path)
    with pytest.raises(
        CheckpointError, match=r"a Control-LoRA is rebuilt from its base model's UNet \(SDXL\)"
    ) as error:
        load_controlnet(path, SMALL)
    _one_line(error)
    with torch.device("meta"):
        sd15 = UNet(SD15.unet)
    with pytest.raises(CheckpointError, match=r"made for SDXL but the base model is SD 1.x") as error:
        load_controlnet(path, SD15, unet=sd15)
    _one_line(error)
    # A file whose low-rank halves do not make the base weight: named, in one line.
    file = dict(_control_lora_file(path))
    file["input_blocks.1.0.in_layers.2.down"] = file["input_blocks.1.0.in_layers.2.down"][:, :5].contiguous()
    save_file(file, str(path))
    with pytest.raises(CheckpointError, match=r"input_blocks\.1\.0\.in_layers\.2: up .* does not make") as error:
        load_controlnet(path, SMALL, unet=unet)
    _one_line(error)


def test_an_xl_adapter_with_an_sd15_base_and_an_sd_adapter_with_sdxl_are_refused(xl_adapter, tmp_path):
    path = tmp_path / "t2i-adapter_xl_canny.safetensors"
    save_file(dict(xl_adapter.state_dict()), str(path))
    sd15_like = SD15.replace(unet=dataclasses.replace(SD15.unet, model_channels=32, channel_mult=(1, 2, 4, 4)))
    with pytest.raises(
        CheckpointError, match=r"do not fit the base model sd15's UNet levels and middle block"
    ) as error:
        load_adapter(path, sd15_like)
    _one_line(error)
    sd_adapter = T2IAdapterConfig(channels=(32, 64, 128))
    assert check_adapter_compatible(sd_adapter, SMALL, "sd") is None  # three levels: SD's kind fits too
    with pytest.raises(CheckpointError, match=r"do not fit the base model sdxl's UNet levels"):
        check_adapter_compatible(T2IAdapterConfig(), SDXL, "t2iadapter_canny_sd15v2.pth")

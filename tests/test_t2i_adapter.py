"""T2I-Adapter: the full and light adapters against diffusers' ``T2IAdapter`` on identical random
weights, the UNet's ``adapter_features`` against diffusers' ``down_intrablock_additional_residuals``,
TencentARC's and diffusers' file layouts, and bad files.

Tolerance: max abs error <= 1e-4 of the reference's largest magnitude (fp32), as tests/test_parity_unet.py.
"""

from __future__ import annotations

import pytest
import torch

from controlnet.config import SD15, SHAPES, WORLD, T2IAdapterConfig, UNetConfig
from controlnet.formats.diffusers_unet import unet_ldm_to_diffusers
from controlnet.formats.diffusers_unet_config import unet_config_to_diffusers
from controlnet.formats.errors import CheckpointError
from controlnet.formats.t2i_adapter import adapter_original_to_diffusers, config_to_diffusers
from controlnet.formats.tensors import save_safetensors
from controlnet.loading import load_adapter
from controlnet.models.t2i_adapter import build_adapter, scale_features
from controlnet.models.unet import UNet, level_end_blocks
from controlnet.train.objectives import adapter_config_for

from .helpers import random_module, relative_error, three_level_unet

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4

# Three levels, attention on the first two only: diffusers builds CrossAttnDownBlock2D, CrossAttnDownBlock2D
# and a DownBlock2D without downsampler, the block kinds of SD 1.5 (whose adapter input the last one is).
SMALL_UNET = three_level_unet(num_res_blocks=2)
SMALL_FULL = T2IAdapterConfig(channels=(32, 64, 64), num_res_blocks=2)
SMALL_LIGHT = T2IAdapterConfig(kind="light", channels=(32, 64, 64), num_res_blocks=2)
CONFIGS = {
    "full": SMALL_FULL,
    "full-gray": T2IAdapterConfig(in_channels=1, channels=(32, 64, 64), num_res_blocks=2),
    "light": SMALL_LIGHT,
}


def _twin(config: T2IAdapterConfig, seed: int):
    """Our adapter with random weights, and diffusers' T2IAdapter sharing the same tensors."""
    ours = random_module(lambda: build_adapter(config), seed)
    with torch.device("meta"):
        theirs = diffusers.T2IAdapter.from_config(config_to_diffusers(config))
    theirs.load_state_dict(adapter_original_to_diffusers(ours.state_dict(), config), strict=True, assign=True)
    return ours, theirs.eval()


def _image(config: T2IAdapterConfig, size: int, seed: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.in_channels, size, size, generator=generator)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_adapter_features_match_diffusers(name):
    config = CONFIGS[name]
    ours, theirs = _twin(config, seed=1)
    image = _image(config, 64, seed=2)
    features, reference = ours(image), theirs(image)
    assert [tuple(f.shape) for f in features] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    errors = [relative_error(a, b) for a, b in zip(features, reference, strict=True)]
    print(f"{name}: features {max(errors):.1e} (relative max abs error)")
    assert max(errors) <= TOLERANCE, errors


def _adapted_unets(unet_config: UNetConfig, adapter_config: T2IAdapterConfig, seed: int):
    unet = random_module(lambda: UNet(unet_config), seed)
    with torch.device("meta"):
        their_unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(unet_config))
    their_unet.load_state_dict(unet_ldm_to_diffusers(unet.state_dict(), unet_config), strict=True, assign=True)
    adapter, their_adapter = _twin(adapter_config, seed + 1)
    return unet, their_unet.eval(), adapter, their_adapter


def _check_adapted_unet(unet, their_unet, adapter, their_adapter, image, latent_size, seed, label):
    generator = torch.Generator().manual_seed(seed)
    batch = image.shape[0]
    x = torch.randn(batch, 4, latent_size, latent_size, generator=generator)
    t = torch.tensor([981, 41][:batch])
    context = torch.randn(batch, 77, unet.config.context_dim, generator=generator)
    scale = 0.8
    features = scale_features(adapter(image), scale)
    their_features = [f * scale for f in their_adapter(image)]

    plain = unet(x, t, context)
    adapted = unet(x, t, context, adapter_features=features)
    reference = their_unet(
        x, t, encoder_hidden_states=context, down_intrablock_additional_residuals=their_features
    ).sample
    error = relative_error(adapted, reference)
    print(f"{label}: adapted UNet {error:.1e} (relative max abs error)")
    assert error <= TOLERANCE
    assert relative_error(adapted, plain) > 1e-2  # the adapter did something


@pytest.mark.parametrize("kind", ["full", "light"])
@torch.no_grad()
def test_adapted_unet_matches_diffusers_intrablock_residuals(kind):
    adapter_config = SMALL_FULL if kind == "full" else SMALL_LIGHT
    models = _adapted_unets(SMALL_UNET, adapter_config, seed=5)
    _check_adapted_unet(*models, _image(adapter_config, 64, seed=6), 8, seed=7, label=f"small {kind}")


@pytest.mark.slow
@torch.no_grad()
def test_sd15_adapted_unet_matches_diffusers():
    """Full size: SD 1.5's UNet and the released full adapter's architecture (a 1-channel canny one)."""
    adapter_config = T2IAdapterConfig(in_channels=1)
    models = _adapted_unets(SD15.unet, adapter_config, seed=8)
    _check_adapted_unet(*models, _image(adapter_config, 128, seed=9, batch=1), 16, seed=10, label="sd15 full")


@torch.no_grad()
def test_adapter_features_enter_after_each_levels_last_block():
    assert level_end_blocks(SD15.unet) == (2, 5, 8, 11)  # TencentARC's (id + 1) % 3 == 0
    unet = random_module(lambda: UNet(SMALL_UNET), seed=11)
    generator = torch.Generator().manual_seed(12)
    x, t = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500])
    context = torch.randn(1, 77, 64, generator=generator)
    zeros = [torch.zeros(1, c, 8 // 2**i, 8 // 2**i) for i, c in enumerate(SMALL_UNET.level_channels)]
    assert torch.equal(unet(x, t, context, adapter_features=zeros), unet(x, t, context))
    with pytest.raises(ValueError, match="expected 3 adapter features"):
        unet(x, t, context, adapter_features=zeros[:2])
    with pytest.raises(ValueError, match="does not fit input block 2"):
        unet(x, t, context, adapter_features=[torch.zeros(1, 32, 4, 4), *zeros[1:]])


# ---------------------------------------------------------------------------------------------
# Files


def _assert_same_adapter(loaded, reference, config):
    assert loaded.config == config
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())
    image = _image(config, 64, seed=3, batch=1)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(image), reference(image), strict=True))


@pytest.mark.parametrize(
    "config",
    [
        SMALL_FULL,
        T2IAdapterConfig(in_channels=1, channels=(32, 64, 64), num_res_blocks=2),
        SMALL_LIGHT,
        T2IAdapterConfig(kind="light", channels=(32, 64, 64), num_res_blocks=4),
        # The original's other options: 3x3 kernels, strided-conv downsampling, skep (widths kept).
        T2IAdapterConfig(channels=(32, 64, 64), num_res_blocks=2, kernel_size=3, conv_downsample=True),
        T2IAdapterConfig(channels=(32, 32), num_res_blocks=1, shortcut_conv=True, conv_downsample=True),
    ],
    ids=["full", "full-gray", "light", "light-4", "full-k3-conv", "full-skep"],
)
@pytest.mark.parametrize("prefix", ["", "adapter."])
def test_tencentarc_file_round_trip(tmp_path, config, prefix):
    adapter = random_module(lambda: build_adapter(config), seed=4)
    path = tmp_path / "t2iadapter_test_sd15v2.pth"
    torch.save({prefix + k: v for k, v in adapter.state_dict().items()}, path)
    _assert_same_adapter(load_adapter(path), adapter, config)


def test_released_full_adapter_keys():
    """The keys and shapes of TencentARC's SD 1.x full adapters (t2iadapter_canny_sd14v1.pth: 38 tensors,
    77M parameters, 1-channel input)."""
    with torch.device("meta"):
        adapter = build_adapter(T2IAdapterConfig(in_channels=1))
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert len(shapes) == 38
    assert shapes["conv_in.weight"] == (320, 64, 3, 3)
    assert shapes["body.0.block1.weight"] == (320, 320, 3, 3)
    assert shapes["body.0.block2.weight"] == (320, 320, 1, 1)
    assert shapes["body.2.in_conv.weight"] == (640, 320, 1, 1)
    assert shapes["body.4.in_conv.weight"] == (1280, 640, 1, 1)
    assert "body.6.in_conv.weight" not in shapes and "body.7.block2.bias" in shapes
    assert round(sum(v.numel() for v in adapter.state_dict().values()) / 1e6) == 77


@pytest.mark.parametrize("config", [SMALL_FULL, SMALL_LIGHT], ids=["full", "light"])
def test_diffusers_folder_and_file(tmp_path, config):
    adapter, theirs = _twin(config, seed=13)
    theirs.save_pretrained(tmp_path / "adapter")
    _assert_same_adapter(load_adapter(tmp_path / "adapter"), adapter, config)
    single = tmp_path / "adapter.safetensors"
    save_safetensors(theirs.state_dict(), single, {})
    _assert_same_adapter(load_adapter(single), adapter, config)


def test_a_4x_adapter_is_read_for_a_4x_base_and_refused_by_an_8x_one(tmp_path):
    """The file does not record its pixel unshuffle: its shapes suggest one (8 where the first conv
    reads 64 per image channel, else 4) and a base decides it (its VAE's downsampling)."""
    world = adapter_config_for(WORLD)
    assert world.downscale_factor == 4 and world.channels == WORLD.unet.level_channels
    adapter = random_module(lambda: build_adapter(world), seed=15)
    path = tmp_path / "world-canny-adapter.safetensors"
    save_safetensors(adapter.state_dict(), path, {})
    _assert_same_adapter(load_adapter(path), adapter, world)
    _assert_same_adapter(load_adapter(path, base=WORLD), adapter, world)
    with pytest.raises(CheckpointError, match="shrinks images 4x but the base model shapes's VAE 8x"):
        load_adapter(path, base=SHAPES.replace(unet=WORLD.unet))
    gray = T2IAdapterConfig(in_channels=1, channels=(32, 64, 64), num_res_blocks=2, downscale_factor=4)
    one_channel = tmp_path / "gray.pth"
    torch.save(random_module(lambda: build_adapter(gray), seed=16).state_dict(), one_channel)
    assert load_adapter(one_channel).config == gray  # 16 = 1 channel x 4 x 4: not an 8x file


def test_bad_adapter_files_one_line(tmp_path):
    def refused(path, match, **kwargs):
        with pytest.raises(CheckpointError, match=match) as error:
            load_adapter(path, **kwargs)
        assert "\n" not in str(error.value)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02not a checkpoint" * 10)
    refused(junk, "junk.pth")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    refused(text, "notes.safetensors")

    controlnet = tmp_path / "control_v11p_sd15_canny.safetensors"
    save_safetensors({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, controlnet, {})
    refused(controlnet, "a ControlNet or base model, not a T2I-Adapter")
    style = tmp_path / "t2iadapter_style_sd14v1.pth"
    torch.save({"style_embedding": torch.zeros(1, 8, 1024)}, style)
    refused(style, "style adapter")
    other = tmp_path / "other.safetensors"
    save_safetensors({"encoder.weight": torch.zeros(3, 3)}, other, {})
    refused(other, "not a T2I-Adapter")

    adapter = random_module(lambda: build_adapter(SMALL_FULL), seed=14)
    weights = adapter.state_dict()
    incomplete = tmp_path / "incomplete.pth"
    torch.save({k: v for k, v in weights.items() if k != "body.3.block2.bias"}, incomplete)
    refused(incomplete, r"1 missing: body\.3\.block2\.bias")
    nan = tmp_path / "nan.pth"
    torch.save({**weights, "conv_in.bias": torch.full_like(weights["conv_in.bias"], float("nan"))}, nan)
    refused(nan, "nan.pth")
    good = tmp_path / "good.pth"
    torch.save(weights, good)
    refused(good, "do not fit the base model", base=SD15)
    small_base = SD15.replace(name="small", unet=SMALL_UNET)
    assert load_adapter(good, base=small_base).config == SMALL_FULL

    # SDXL adapters (full_adapter_xl) are read (tests/test_sdxl_control.py); an unknown kind is not.
    other_kind = tmp_path / "other-kind"
    other_kind.mkdir()
    (other_kind / "config.json").write_text('{"_class_name": "T2IAdapter", "adapter_type": "style_adapter"}')
    refused(other_kind, "unknown adapter_type 'style_adapter'")


@torch.no_grad()
def test_adapter_and_controlnet_together_match_diffusers():
    """An adapter and a ControlNet in one UNet call: the adapter's features enter the encoder, the
    ControlNet's residuals the skips and the middle, as diffusers with both arguments."""
    from controlnet.formats.diffusers_unet import controlnet_ldm_to_diffusers
    from controlnet.formats.diffusers_unet_config import controlnet_config_to_diffusers
    from controlnet.models.controlnet import ControlNet

    unet, their_unet, adapter, their_adapter = _adapted_unets(SMALL_UNET, SMALL_FULL, seed=15)
    control_config = SD15.replace(unet=SMALL_UNET).controlnet()
    controlnet = random_module(lambda: ControlNet(control_config), seed=16)
    with torch.device("meta"):
        their_controlnet = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(control_config))
    their_controlnet.load_state_dict(
        controlnet_ldm_to_diffusers(controlnet.state_dict(), control_config), strict=True, assign=True
    )
    generator = torch.Generator().manual_seed(17)
    x, t = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([300])
    context = torch.randn(1, 77, 64, generator=generator)
    image = _image(SMALL_FULL, 64, seed=18, batch=1)
    residuals = controlnet(x, controlnet.encode_hint(image), t, context)
    ours = unet(x, t, context, control=residuals, adapter_features=adapter(image))
    down, mid = their_controlnet.eval()(x, t, encoder_hidden_states=context, controlnet_cond=image, return_dict=False)
    reference = their_unet(
        x,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        down_intrablock_additional_residuals=their_adapter(image),
    ).sample
    error = relative_error(ours, reference)
    print(f"adapter + ControlNet: UNet {error:.1e} (relative max abs error)")
    assert error <= TOLERANCE

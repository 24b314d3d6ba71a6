"""The UNet and ControlNet: checkpoint layout, the zero-convolution identity, control options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from controlnet.config import SD15, SD21, SD21_V, SHAPES, TINY, WORLD, ControlNetConfig, UNetConfig, preset
from controlnet.formats.detect import preset_from_shapes
from controlnet.formats.errors import CheckpointError
from controlnet.models.controlnet import ControlNet, scale_residuals, soft_control_scales
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.models.unet import UNet

from .helpers import randomize

KEYS = json.loads((Path(__file__).parent / "data" / "ldm_keys.json").read_text())


def _shapes(module: torch.nn.Module, prefix: str) -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(("version", "config"), [("v15", SD15), ("v21", SD21)])
def test_unet_and_controlnet_keys_equal_the_original_checkpoint_layout(version, config):
    with torch.device("meta"):
        unet, controlnet = UNet(config.unet), ControlNet(config.controlnet())
    reference = {k: v for k, v in KEYS[version].items() if k.startswith(("model.diffusion_model.", "control_model."))}
    ours = _shapes(unet, "model.diffusion_model.") | _shapes(controlnet, "control_model.")
    assert ours == reference
    assert sum(k.startswith("control_model.") for k in ours) == 340  # a 1.1 control-only file


def _tiny_inputs(batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([999, 1][:batch] + [500] * max(0, batch - 2))
    context = torch.randn(batch, 77, TINY.unet.context_dim, generator=generator)
    hint = torch.rand(batch, 3, 64, 64, generator=generator)
    return x, t, context, hint


@pytest.fixture(scope="module")
def tiny_unet() -> UNet:
    return randomize(UNet(TINY.unet), seed=1).eval()


@torch.no_grad()
def test_fresh_controlnet_leaves_the_unet_output_bit_identical(tiny_unet):
    x, t, context, hint = _tiny_inputs()
    controlnet = ControlNet.from_unet(tiny_unet).eval()
    residuals = controlnet(x, controlnet.encode_hint(hint), t, context)
    assert all(torch.count_nonzero(r) == 0 for r in residuals)
    plain = tiny_unet(x, t, context)
    assert torch.equal(tiny_unet(x, t, context, control=residuals), plain)

    with torch.no_grad():
        controlnet.zero_convs[3][0].weight.normal_(std=0.1)
    changed = tiny_unet(x, t, context, control=controlnet(x, controlnet.encode_hint(hint), t, context))
    assert not torch.allclose(changed, plain)


def test_from_unet_copies_the_encoder_and_zeroes_the_new_convolutions(tiny_unet):
    controlnet = ControlNet.from_unet(tiny_unet)
    unet_weights = tiny_unet.state_dict()
    for key, value in controlnet.state_dict().items():
        if key.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(value, unet_weights[key]), key
        elif key.startswith(("zero_convs.", "middle_block_out.")) or key.startswith("input_hint_block.14."):
            assert torch.count_nonzero(value) == 0, key
        else:
            assert key.startswith("input_hint_block.") and torch.count_nonzero(value) > 0, key
    # A copy, not a view: training the ControlNet must not touch the locked UNet.
    first = next(controlnet.input_blocks.parameters())
    assert first.data_ptr() != next(tiny_unet.input_blocks.parameters()).data_ptr()


def test_from_unet_refuses_a_config_for_another_unet(tiny_unet):
    with pytest.raises(ValueError, match="must equal the UNet"):
        ControlNet.from_unet(tiny_unet, ControlNetConfig(unet=SD15.unet))


@torch.no_grad()
def test_hint_encoder_brings_the_condition_to_latent_size(tiny_unet):
    controlnet = ControlNet.from_unet(tiny_unet)
    features = controlnet.encode_hint(torch.rand(1, 3, 64, 96))
    assert features.shape == (1, TINY.unet.model_channels, 8, 12)


@torch.no_grad()
def test_only_mid_control_injects_just_the_middle_residual(tiny_unet):
    x, t, context, _ = _tiny_inputs()
    shapes = [s.shape for s in _skip_shapes(tiny_unet, x, t, context)]
    generator = torch.Generator().manual_seed(3)
    residuals = [torch.randn(s, generator=generator) for s in shapes]
    mid_only = [torch.zeros_like(r) for r in residuals[:-1]] + [residuals[-1]]
    assert torch.equal(
        tiny_unet(x, t, context, control=residuals, only_mid_control=True),
        tiny_unet(x, t, context, control=mid_only),
    )
    assert not torch.equal(tiny_unet(x, t, context, control=residuals), tiny_unet(x, t, context, control=mid_only))


def _skip_shapes(unet: UNet, x, t, context) -> list[torch.Tensor]:
    emb = unet.time_embed(unet.time_features(t))
    outputs, h = [], x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        outputs.append(h)
    outputs.append(unet.middle_block(h, emb, context))
    return outputs


def test_residual_count_and_wrong_count_is_refused(tiny_unet):
    x, t, context, _ = _tiny_inputs()
    assert len(TINY.unet.encoder_block_channels()) + 1 == 5
    assert len(SD15.unet.encoder_block_channels()) + 1 == 13
    with pytest.raises(ValueError, match="expected 5 control residuals, got 2"):
        tiny_unet(x, t, context, control=[torch.zeros(1), torch.zeros(1)])


def test_control_scales_and_global_average_pooling():
    scales = soft_control_scales(1.0)
    assert len(scales) == 13 and scales[-1] == 1.0
    assert scales[0] == pytest.approx(0.825**12) and scales[0] == pytest.approx(0.0994, abs=1e-4)
    assert soft_control_scales(2.0)[5] == pytest.approx(2 * 0.825**7)

    residuals = [torch.full((1, 2, 3, 3), float(i)) + torch.arange(9.0).view(3, 3) for i in range(3)]
    scaled = scale_residuals(residuals, [0.5, 1.0, 2.0])
    assert torch.equal(scaled[0], residuals[0] * 0.5) and torch.equal(scaled[2], residuals[2] * 2.0)
    pooled = scale_residuals(residuals, [0.5, 1.0, 2.0], global_average_pooling=True)
    assert pooled[2].shape == (1, 2, 1, 1)
    assert torch.allclose(pooled[2], (residuals[2] * 2.0).mean(dim=(2, 3), keepdim=True))
    with pytest.raises(ValueError, match="one control scale per residual"):
        scale_residuals(residuals, [1.0])


@torch.no_grad()
def test_tiny_configuration_forward_passes_cost_under_a_gigaflop():
    """What keeps the suite quick, counted in floating-point operations rather than timed (timings
    fail on a busy machine): each tiny forward pass costs under 1 GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = StableDiffusion(TINY).eval()
    controlnet = ControlNet.from_unet(model.unet, TINY.controlnet()).eval()
    x, t, _, hint = _tiny_inputs()
    tokens = model.text_encoder.tokenize(["a red circle", ""])
    context = model.text_encoder(tokens)
    passes = {
        "text encoder": lambda: model.text_encoder(tokens),
        "controlnet + unet": lambda: model.unet(
            x, t, context, control=controlnet(x, controlnet.encode_hint(hint), t, context)
        ),
        "vae encode + decode": lambda: model.vae.decode(model.vae.encode(hint * 2 - 1).mode()),
    }
    for name, run in passes.items():
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        assert 0 < counter.get_total_flops() < 1e9, (name, counter.get_total_flops())


def test_presets_and_config_validation():
    assert preset("sd21-v").schedule.prediction == "v" and preset("sd15").text.arch == "clip"
    with pytest.raises(ValueError, match="unknown model preset 'sd3'; choose one of sd15, sd21, sd21-v, tiny"):
        preset("sd3")
    with pytest.raises(ValueError, match="exactly one of num_heads and num_head_channels"):
        UNetConfig(num_heads=8, num_head_channels=64)
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(model_channels=48)
    assert UNetConfig(attention_resolutions=(1, 2, 4)) == SD15.unet  # a set of factors, any order
    assert SD21_V.unet == SD21.unet


def test_detect_preset_from_shapes():
    for config in (SD15, SD21, TINY, SHAPES, WORLD):  # shapes and world differ only in latent channels
        with torch.device("meta"):
            unet = UNet(config.unet)
        assert preset_from_shapes(unet.state_dict(), "unet.safetensors").unet == config.unet
    with pytest.raises(CheckpointError, match=r"unet.safetensors: .*no input_blocks\.0\.0\.weight"):
        preset_from_shapes({}, "unet.safetensors")


def test_schedule_is_the_original_linear_schedule():
    betas = SD15.schedule.betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(
        betas.sqrt().diff(), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999, dtype=torch.float64)
    )


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, groups", [((2, 320, 16, 16), 32), ((1, 1280, 8, 8), 32), ((2, 96, 17, 9), 8)])
def test_bf16_group_norm_agrees_with_the_float32_round_trip(shape, groups, channels_last):
    """GroupNorm32 runs bf16 natively (no float32 copy of the activations): every element equals the
    original's float32 computation rounded to bf16, up to one bf16 rounding step."""
    from controlnet.models.layers import GroupNorm32

    generator = torch.Generator().manual_seed(0)
    norm = GroupNorm32(groups, shape[1])
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(shape[1], generator=generator))
        norm.bias.copy_(torch.randn(shape[1], generator=generator))
    x = (3 * torch.randn(shape, generator=generator) + 1).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = norm.to(torch.bfloat16)
    weight, bias = norm.weight.float(), norm.bias.float()
    expected = torch.nn.functional.group_norm(x.float(), groups, weight, bias, norm.eps).bfloat16()
    got = norm(x)
    assert got.dtype == torch.bfloat16
    one_step = expected.float().abs() * 2.0**-7 + 1e-30  # a bf16 has 8 significant bits
    assert ((got.float() - expected.float()).abs() <= one_step).all()
    assert (got != expected).float().mean() < 0.01  # and only a few elements differ at all

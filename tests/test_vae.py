"""The VAE: key names and shapes of the LDM checkpoint, parity with diffusers, and the diffusers key map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from controlnet.config import SD15, TINY, VAEConfig
from controlnet.formats.diffusers_vae import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_diffusers_to_ldm,
    vae_key_table,
    vae_ldm_to_diffusers,
)
from controlnet.models.vae import AutoencoderKL, DiagonalGaussian

from .helpers import random_module, relative_error

diffusers = pytest.importorskip("diffusers")

KEYS_FILE = Path(__file__).parent / "data" / "ldm_keys.json"
PREFIX = "first_stage_model."
SD_VAE = SD15.vae
TINY_VAE = TINY.vae
# Relative tolerance of the parity checks: max abs error / max abs reference output.
REL_TOL = 1e-4


def _random_vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    return random_module(lambda: AutoencoderKL(cfg), seed)


def _diffusers_twin(ours: AutoencoderKL) -> nn.Module:
    """diffusers' AutoencoderKL with our weights, loaded strictly through the key map."""
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(ours.config))
    theirs.load_state_dict(vae_ldm_to_diffusers(ours.state_dict(), ours.config), strict=True, assign=True)
    return theirs.eval()


def _diffusers_meta(cfg: VAEConfig) -> nn.Module:
    with torch.device("meta"):
        return diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(cfg))


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def sd_pair() -> tuple[AutoencoderKL, nn.Module]:
    ours = _random_vae(SD_VAE, seed=0)
    return ours, _diffusers_twin(ours)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return _random_vae(TINY_VAE, seed=1)


# --- (a) key names and shapes -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_state_dict_equals_ldm_checkpoint(version: str) -> None:
    reference = json.loads(KEYS_FILE.read_text())[version]
    expected = {k.removeprefix(PREFIX): shape for k, shape in reference.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = AutoencoderKL(SD_VAE)
    assert _shapes(model.state_dict()) == expected


def test_key_table_covers_our_state_dict() -> None:
    for cfg in (SD_VAE, TINY_VAE):
        with torch.device("meta"):
            model = AutoencoderKL(cfg)
        assert [p.ldm for p in vae_key_table(cfg)] == list(model.state_dict())


# --- (b) parity with diffusers at full SD size --------------------------------------------------


@pytest.mark.slow
def test_decode_matches_diffusers(sd_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, theirs = sd_pair
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.decode(latents)
        want = theirs.decode(latents).sample
    assert got.shape == (1, 3, 64, 64)
    err = relative_error(got, want)
    print(f"decode: max abs err / output scale = {err:.2e} (scale {want.abs().max().item():.3f})")
    assert err <= REL_TOL


@pytest.mark.slow
def test_encode_matches_diffusers(sd_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, theirs = sd_pair
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        got = ours.encode(images)
        want = theirs.encode(images).latent_dist
    assert got.mean.shape == (1, 4, 8, 8)
    for name, a, b in (
        ("mean", got.mean, want.mean),
        ("logvar", got.logvar, want.logvar),
        ("mode", got.mode(), want.mode()),
    ):
        err = relative_error(a, b)
        print(f"encode {name}: max abs err / output scale = {err:.2e}")
        assert err <= REL_TOL, name


@pytest.mark.slow
def test_channels_last_matches(sd_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, theirs = sd_pair
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = theirs.decode(latents).sample
        fast = ours.to(memory_format=torch.channels_last)
        got = fast.decode(latents.contiguous(memory_format=torch.channels_last))
        ours.to(memory_format=torch.contiguous_format)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got, want) <= REL_TOL


def test_tiny_matches_diffusers(tiny_vae: AutoencoderKL) -> None:
    # The tiny preset exercises norm_groups 8, one res block and a non-uniform ch_mult.
    theirs = _diffusers_twin(tiny_vae)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        got, want = tiny_vae.encode(images), theirs.encode(images).latent_dist
        assert relative_error(got.mean, want.mean) <= REL_TOL
        assert relative_error(got.logvar, want.logvar) <= REL_TOL
        assert relative_error(tiny_vae.decode(got.mean), theirs.decode(want.mean).sample) <= REL_TOL


# --- (c) the key map ----------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SD_VAE, TINY_VAE], ids=["sd", "tiny"])
def test_mapped_keys_equal_diffusers_state_dict(cfg: VAEConfig) -> None:
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    mapped = vae_ldm_to_diffusers(ours.state_dict(), cfg)
    assert _shapes(mapped) == _shapes(_diffusers_meta(cfg).state_dict())


def test_round_trips_are_bit_identical(sd_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, theirs = sd_pair
    ldm = ours.state_dict()
    back = vae_diffusers_to_ldm(vae_ldm_to_diffusers(ldm, SD_VAE), SD_VAE)
    assert list(back) == list(ldm)
    assert all(torch.equal(back[k], ldm[k]) and back[k].shape == ldm[k].shape for k in ldm)

    diff = theirs.state_dict()
    back = vae_ldm_to_diffusers(vae_diffusers_to_ldm(diff, SD_VAE), SD_VAE)
    assert set(back) == set(diff)
    assert all(torch.equal(back[k], diff[k]) and back[k].shape == diff[k].shape for k in diff)


def test_attention_weights_reshaped(sd_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, _ = sd_pair
    mapped = vae_ldm_to_diffusers(ours.state_dict(), SD_VAE)
    q = ours.encoder.mid.attn_1.q.weight
    assert q.shape == (512, 512, 1, 1)
    assert torch.equal(mapped["encoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])
    assert torch.equal(
        mapped["decoder.mid_block.attentions.0.to_out.0.weight"], ours.decoder.mid.attn_1.proj_out.weight[:, :, 0, 0]
    )


def test_legacy_diffusers_attention_names(tiny_vae: AutoencoderKL) -> None:
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    modern = vae_ldm_to_diffusers(tiny_vae.state_dict(), TINY_VAE)
    legacy = {}
    for key, tensor in modern.items():
        for new, old in legacy_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = tensor
    assert set(legacy) != set(modern)
    back = vae_diffusers_to_ldm(legacy, TINY_VAE)
    assert all(torch.equal(back[k], v) for k, v in tiny_vae.state_dict().items())


def test_unknown_and_missing_keys_raise(tiny_vae: AutoencoderKL) -> None:
    ldm = dict(tiny_vae.state_dict())
    ldm["encoder.extra.weight"] = torch.zeros(1)
    del ldm["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"1 unknown \(first: encoder\.extra\.weight\).*1 missing"):
        vae_ldm_to_diffusers(ldm, TINY_VAE)
    with pytest.raises(ValueError, match="missing"):
        vae_diffusers_to_ldm({}, TINY_VAE)
    # The SD layout has more levels' keys than the tiny one: a config mismatch is loud too.
    with pytest.raises(ValueError, match="unknown"):
        vae_ldm_to_diffusers(_random_vae(SD_VAE).state_dict(), VAEConfig(ch_mult=(1, 2, 4)))


@pytest.mark.parametrize("cfg", [SD_VAE, TINY_VAE], ids=["sd", "tiny"])
def test_config_round_trip(cfg: VAEConfig) -> None:
    d = vae_config_to_diffusers(cfg)
    assert json.loads(json.dumps(d)) == d
    assert vae_config_from_diffusers(d) == cfg
    built = _diffusers_meta(cfg).config
    assert list(built.block_out_channels) == [cfg.ch * m for m in cfg.ch_mult]
    assert built.layers_per_block == cfg.num_res_blocks
    assert built.norm_num_groups == cfg.norm_groups
    assert built.latent_channels == cfg.embed_dim
    assert built.scaling_factor == cfg.scale_factor


def test_config_rejects_what_we_do_not_implement() -> None:
    sd = vae_config_to_diffusers(SD_VAE)
    for change in (
        {"shift_factor": 0.1159},
        {"act_fn": "gelu"},
        {"up_block_types": ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]},
        {"_class_name": "AutoencoderTiny"},
        {"use_quant_conv": False},
    ):
        with pytest.raises(ValueError):
            vae_config_from_diffusers({**sd, **change})
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        vae_config_to_diffusers(VAEConfig(z_channels=4, embed_dim=8))


# --- (d) the tiny preset ------------------------------------------------------------------------


def test_tiny_encode_decode_shapes(tiny_vae: AutoencoderKL) -> None:
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        posterior = tiny_vae.encode(images)
        assert posterior.mean.shape == posterior.logvar.shape == posterior.std.shape == (1, 4, 8, 8)
        decoded = tiny_vae.decode(posterior.mode())
        assert decoded.shape == (1, 3, 64, 64)
        assert torch.isfinite(decoded).all()
        assert torch.equal(tiny_vae(images), decoded)
    assert tiny_vae.scale_factor == TINY_VAE.scale_factor == 0.18215
    assert tiny_vae.latent_channels == 4
    assert tiny_vae.downsample_factor == 8


# --- (e) the posterior --------------------------------------------------------------------------


def test_sample_is_reproducible(tiny_vae: AutoencoderKL) -> None:
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        posterior = tiny_vae.encode(images)
    a = posterior.sample(torch.Generator().manual_seed(42))
    b = posterior.sample(torch.Generator().manual_seed(42))
    c = posterior.sample(torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, posterior.mean + posterior.std * noise)
    assert torch.equal(posterior.mode(), posterior.mean)


def test_logvar_is_clamped() -> None:
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), 100.0), torch.full((1, 2, 2, 2), -100.0)], 1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar[:, :2].eq(20.0).all() and posterior.logvar[:, 2:].eq(-30.0).all()
    assert torch.isfinite(posterior.std).all() and (posterior.std > 0).all()

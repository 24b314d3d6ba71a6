"""TAESD, the tiny autoencoder (models/taesd.py, formats/taesd.py, loading.load_taesd), against
diffusers' ``AutoencoderTiny`` on identical random weights, in every layout its files come in.

The original files are written here from diffusers' weights by the rule of diffusers' own
conversion script (``convert_tiny_autoencoder_to_diffusers.py``): the encoder's ``N`` is
``encoder.layers.N``, the decoder's ``N`` is ``decoder.layers.{N - 1}``.

Tolerance: both run the same float32 operations in the same order (the same convolutions, the same
[-1, 1] <-> [0, 1] arithmetic), so encode, decode and the 8-bit round trip agree exactly
(``rtol=0, atol=0``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from controlnet.config import SD15, SDXL, WORLD
from controlnet.formats.errors import CheckpointError
from controlnet.formats.taesd import to_diffusers_layout
from controlnet.loading import load_taesd
from controlnet.models.taesd import TinyAutoencoder
from tests.helpers import randomize

diffusers = pytest.importorskip("diffusers")


def reference_model(seed: int, latent_channels: int = 4):
    """diffusers' AutoencoderTiny with seeded random weights (std 1/sqrt(fan_in), biases 0.1)."""
    model = diffusers.AutoencoderTiny(latent_channels=latent_channels)
    return randomize(model, seed).eval()


def original_parts(reference) -> tuple[dict, dict]:
    """The original files' state dicts, by diffusers' conversion rule."""
    encoder, decoder = {}, {}
    for key, value in reference.state_dict().items():
        part, _, index, rest = key.split(".", 3)
        if part == "encoder":
            encoder[f"{index}.{rest}"] = value.clone()
        else:
            decoder[f"{int(index) + 1}.{rest}"] = value.clone()
    return encoder, decoder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One random TAESD (and one SDXL-named one with other weights) in every layout."""
    root = tmp_path_factory.mktemp("taesd")
    reference = reference_model(0)
    encoder, decoder = original_parts(reference)
    torch.save(encoder, root / "taesd_encoder.pth")
    torch.save(decoder, root / "taesd_decoder.pth")
    save_file(encoder, root / "taesd_encoder.safetensors")
    save_file(decoder, root / "taesd_decoder.safetensors")
    reference.save_pretrained(root / "taesd")  # config.json + diffusion_pytorch_model.safetensors
    xl_encoder, xl_decoder = original_parts(reference_model(1))
    torch.save(xl_encoder, root / "taesdxl_encoder.pth")
    torch.save(xl_decoder, root / "taesdxl_decoder.pth")
    return root, reference


def one_line_error(*paths, **kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_taesd(*paths, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# ----------------------------------------------------------------------------------------------
# Layouts


def test_every_layout_loads_the_same_weights(files, tmp_path):
    root, reference = files
    pth = load_taesd(root / "taesd_encoder.pth", root / "taesd_decoder.pth")
    expected = pth.state_dict()
    assert len(expected) == len(reference.state_dict())  # every tensor of diffusers' model, no more
    # The whole model's own state dict, and diffusers' layout as one file.
    save_file(pth.state_dict(), tmp_path / "taesd_whole.safetensors")
    save_file(to_diffusers_layout(pth.state_dict()), tmp_path / "diffusers_layout.safetensors")
    for paths in [
        (root / "taesd_decoder.safetensors", root / "taesd_encoder.safetensors"),  # either order
        (root / "taesd",),
        (root / "taesd" / "diffusion_pytorch_model.safetensors",),
        (tmp_path / "taesd_whole.safetensors",),
        (tmp_path / "diffusers_layout.safetensors",),
    ]:
        loaded = load_taesd(*paths).state_dict()
        assert loaded.keys() == expected.keys(), paths
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), paths
    assert to_diffusers_layout(expected).keys() == reference.state_dict().keys()


def test_a_decoder_alone_decodes_and_says_what_encoding_needs(files):
    root, reference = files
    taesd = load_taesd(root / "taesd_decoder.pth")
    assert taesd.encoder is None and taesd.latent_channels == 4
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(taesd.decode(latents), reference.decode(latents).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"without its encoder \(taesd_encoder.pth\)"):
        taesd.encode(torch.zeros(1, 3, 64, 64))
    assert load_taesd(root / "taesd_encoder.pth").decoder is None


# ----------------------------------------------------------------------------------------------
# Against diffusers


@torch.no_grad()
def test_encode_decode_and_round_trip_equal_diffusers(files):
    root, reference = files
    taesd = load_taesd(root / "taesd_encoder.safetensors", root / "taesd_decoder.safetensors")
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 64, 48, generator=generator) * 2 - 1  # [-1, 1], as the VAE takes them
    latents = torch.randn(2, 4, 8, 6, generator=generator) * 2  # diffusion latents: TAESD's own scale

    ours = taesd.encode(images)
    assert ours.shape == (2, 4, 8, 6) and ours.abs().mean() > 0.1  # random weights that do something
    torch.testing.assert_close(ours, reference.encode(images).latents, rtol=0, atol=0)
    # A diffusers pipeline decodes latents / scaling_factor; TAESD's is 1: the latents as they are.
    assert taesd.scale_factor == reference.config.scaling_factor == 1.0
    decoded = taesd.decode(latents)
    assert decoded.shape == (2, 3, 64, 48) and decoded.std() > 0.1
    torch.testing.assert_close(
        decoded, reference.decode(latents / reference.config.scaling_factor).sample, rtol=0, atol=0
    )
    torch.testing.assert_close(taesd(images), reference(images).sample, rtol=0, atol=0)


def test_latent_storage_convention_is_the_originals():
    """latent_magnitude 3, latent_shift 0.5: [-3, 3] <-> [0, 1], clamped outside."""
    latents = torch.tensor([-4.0, -3.0, 0.0, 1.5, 3.0, 4.0])
    stored = TinyAutoencoder.scale_latents(latents)
    torch.testing.assert_close(stored, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(TinyAutoencoder.unscale_latents(stored[1:5]), latents[1:5])


def test_sdxl_and_16_channel_variants_load_and_are_checked_against_the_base(files, tmp_path):
    root, _ = files
    xl = load_taesd(root / "taesdxl_encoder.pth", root / "taesdxl_decoder.pth", base=SDXL)
    sd = load_taesd(root / "taesd_decoder.pth", base=SD15)
    assert not torch.equal(xl.decoder[1].weight, sd.decoder[1].weight)  # same layout, other weights
    assert load_taesd(root / "taesd", base=SD15, dtype=torch.bfloat16).decoder[1].weight.dtype == torch.bfloat16

    reference = reference_model(3, latent_channels=16)  # taesd3 / taef1
    reference.save_pretrained(tmp_path / "taef1")
    assert load_taesd(tmp_path / "taef1").latent_channels == 16
    assert "16-channel latents at 1/8 of the image's size; this base model's are 4-channel at 1/8" in one_line_error(
        tmp_path / "taef1", base=SD15
    )
    assert "are 8-channel at 1/4" in one_line_error(root / "taesd_decoder.pth", base=WORLD)


# ----------------------------------------------------------------------------------------------
# Wrong files: one line each, naming the file


def test_wrong_files_give_one_line_errors(files, tmp_path):
    root, reference = files
    encoder, decoder = original_parts(reference)

    vae = tmp_path / "vae.safetensors"  # the SD VAE's keys, not TAESD's
    save_file({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)}, vae)
    assert "vae.safetensors: not a TAESD file" in one_line_error(vae)

    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    one_line_error(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "empty" in one_line_error(empty)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((root / "taesd_decoder.safetensors").read_bytes()[:5000])
    assert "not a valid safetensors file" in one_line_error(truncated)

    damaged = dict(decoder)
    damaged["1.weight"] = damaged["1.weight"].clone()
    damaged["1.weight"][0, 0, 0, 0] = float("nan")
    save_file(damaged, tmp_path / "nan_decoder.safetensors")
    assert "NaN or infinite" in one_line_error(tmp_path / "nan_decoder.safetensors")

    partial = {k: v for k, v in decoder.items() if k != "4.conv.2.weight"}
    save_file(partial, tmp_path / "partial_decoder.safetensors")
    assert "1 missing: decoder.4.conv.2.weight" in one_line_error(tmp_path / "partial_decoder.safetensors")
    reshaped = dict(decoder)
    reshaped["4.conv.2.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(reshaped, tmp_path / "reshaped_decoder.safetensors")
    assert "with another shape: decoder.4.conv.2.weight" in one_line_error(tmp_path / "reshaped_decoder.safetensors")

    assert "a second TAESD decoder; the first came from taesd_decoder.pth (decoder)" in one_line_error(
        root / "taesd_decoder.pth", root / "taesd"
    )
    wide = {**encoder, "14.weight": encoder["14.weight"].repeat(4, 1, 1, 1), "14.bias": encoder["14.bias"].repeat(4)}
    save_file(wide, tmp_path / "taef1_encoder.safetensors")
    assert "the encoder makes 16-channel latents and the decoder reads 4-channel ones" in one_line_error(
        tmp_path / "taef1_encoder.safetensors", root / "taesd_decoder.pth"
    )


def test_wrong_folders_give_one_line_errors(files, tmp_path):
    root, _ = files
    config = json.loads((root / "taesd" / "config.json").read_text())
    cases = {
        "kl": ({**config, "_class_name": "AutoencoderKL"}, "a diffusers AutoencoderKL, not an AutoencoderTiny"),
        "blocks": ({**config, "num_decoder_blocks": [3, 3, 3, 3]}, "num_decoder_blocks is [3, 3, 3, 3]"),
        "scaled": ({**config, "scaling_factor": 0.18215}, "scaling_factor is 0.18215; TAESD's architecture has 1.0"),
        "channels": ({**config, "latent_channels": 16}, "config.json says 16 latent channels, its weights have 4"),
    }
    for name, (changed, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(changed))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(
            (root / "taesd" / "diffusion_pytorch_model.safetensors").read_bytes()
        )
        assert expected in one_line_error(folder), name
    (tmp_path / "bare").mkdir()
    assert "config.json: missing" in one_line_error(tmp_path / "bare")
    with pytest.raises(ValueError, match="needs a TAESD file or folder"):
        load_taesd()

"""TAESD through the pipeline and the interfaces: ``decoder="taesd"`` decodes the sampled latents
with TAESD as they are (no scale division), img2img still encodes with the VAE, the setting is
recorded, and a TAESD that is not loaded is a one-line refusal; ``--taesd`` / ``--decoder`` on the
command line and the JSON API's ``decoder`` with ``serve --taesd``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from controlnet.cli import main
from controlnet.formats.ldm import save_ldm
from controlnet.imaging.images import read_png_text
from controlnet.models.taesd import TinyAutoencoder
from controlnet.models.tiny import circle_edges, random_tiny_models
from controlnet.pipeline import ControlUnit, Pipeline

from .helpers import randomize

EDGES = circle_edges(64)
KW = {"steps": 2, "seed": 3, "output": "float", "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny base and a random TAESD decoder, saved as the original taesd_decoder file."""
    folder = tmp_path_factory.mktemp("taesd-models")
    model, controlnet = random_tiny_models(seed=0)
    taesd = randomize(TinyAutoencoder(4), seed=4)
    save_file({k: v.contiguous() for k, v in taesd.decoder.state_dict().items()}, folder / "taesd_decoder.safetensors")
    return {
        "base": save_ldm(folder / "tiny.safetensors", model),
        "control": save_ldm(folder / "control.safetensors", controlnet=controlnet),
        "taesd": folder / "taesd_decoder.safetensors",
    }


@pytest.fixture(scope="module")
def pipe(files) -> Pipeline:
    return Pipeline.from_files(files["base"], [files["control"]], dtype="float32", taesd=files["taesd"])


def test_decoder_taesd_decodes_the_sampled_latents_as_they_are(pipe, monkeypatch):
    seen = []
    decode = Pipeline.decode
    monkeypatch.setattr(Pipeline, "decode", lambda self, x, *a: seen.append(x.clone()) or decode(self, x, *a))
    vae = pipe.generate("a circle", [ControlUnit(EDGES)], **KW)
    fast = pipe.generate("a circle", [ControlUnit(EDGES)], decoder="taesd", **KW)
    assert torch.equal(seen[0], seen[1])  # the same latents, decoded two ways
    with torch.no_grad():
        expected = (pipe.taesd.decode(seen[1]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(fast.images[0], expected[0])
    assert not np.allclose(fast.images[0], vae.images[0], atol=1e-2)
    assert fast.settings["decoder"] == "taesd" and vae.settings["decoder"] == "vae"


def test_img2img_with_taesd_still_encodes_with_the_vae(pipe):
    calls = {"vae encoder": 0, "vae decoder": 0}
    hooks = [
        pipe.model.vae.encoder.register_forward_hook(lambda *_: calls.__setitem__("vae encoder", 1)),
        pipe.model.vae.decoder.register_forward_hook(lambda *_: calls.__setitem__("vae decoder", 1)),
    ]
    try:
        init = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
        pipe.generate("a circle", [ControlUnit(EDGES)], init_image=init, decoder="taesd", **KW)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"vae encoder": 1, "vae decoder": 0}


def test_taesd_without_a_loaded_one_is_a_one_line_refusal(files):
    model, controlnet = random_tiny_models(seed=0)
    bare = Pipeline(model, [controlnet], dtype="float32")
    with pytest.raises(ValueError, match=r"^decoder taesd needs a TAESD decoder") as error:
        bare.generate("a circle", steps=1, decoder="taesd")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="decoder must be one of vae, taesd"):
        bare.generate("a circle", steps=1, decoder="tiny")
    wide = TinyAutoencoder(16)
    with pytest.raises(ValueError, match="16-channel latents"):
        Pipeline(model, [controlnet], taesd=wide)


def test_the_command_line_takes_taesd_and_decoder(files, tmp_path, capsys):
    common = ["generate", "--base", str(files["base"]), "--prompt", "a cat", "--steps", "2", "--resolution", "64"]
    assert main([*common, "--taesd", str(files["taesd"]), "--decoder", "taesd", "--out", str(tmp_path)]) == 0
    record = json.loads(read_png_text(next(tmp_path.glob("*.png")))["controlnet"])
    assert record["decoder"] == "taesd"
    capsys.readouterr()
    assert main([*common, "--decoder", "taesd", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "decoder taesd needs a TAESD" in err and len(err.splitlines()) == 1
    assert main([*common, "--taesd", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "y")]) != 0


def test_the_json_api_takes_decoder_with_serve_taesd(files):
    from controlnet.serve.api import request_from_json
    from controlnet.serve.service import Limits, ModelEntry, ModelRegistry, RequestError, Service

    limits = Limits()
    entry = ModelEntry("tiny", files["base"], [])
    served = Service(ModelRegistry([entry], taesd=files["taesd"]), limits)
    bare = Service(ModelRegistry([entry]), limits)
    body = {"prompt": "a ring", "model": "tiny", "steps": 2, "seed": 4, "decoder": "taesd"}
    response = served.generate(request_from_json(body, limits))
    assert json.loads(response.image_texts[0]["controlnet"])["decoder"] == "taesd"
    with pytest.raises(RequestError, match="decoder taesd needs a TAESD"):
        bare.generate(request_from_json(body, limits))
    with pytest.raises(RequestError, match="decoder must be one of vae, taesd"):
        served.generate(request_from_json(body | {"decoder": "fast"}, limits))

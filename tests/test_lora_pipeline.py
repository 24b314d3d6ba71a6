"""LoRAs through Pipeline.generate and the command line: explicit FILE[:WEIGHT] entries and the
prompt's <lora:NAME:WEIGHT> tags found in a LoRA folder, merged once per distinct set and restored
exactly, recorded in the PNG; the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from controlnet.cli import main
from controlnet.config import TINY
from controlnet.formats.ldm import save_ldm
from controlnet.hashing import file_sha256, short_hash
from controlnet.imaging.images import load_image, read_png_text
from controlnet.lora import apply_loras, load_lora
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.models.tiny import random_tiny_models
from controlnet.pipeline import Pipeline

from .helpers import randomize

pytest.importorskip("diffusers")
from .test_lora import _their_text, _their_unet, write_kohya, write_peft

KW = {"steps": 2, "seed": 7, "output": "float", "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def pipe(folder) -> Pipeline:
    model, controlnet = random_tiny_models(seed=0)
    write_kohya(folder / "style.safetensors", _their_unet(model), _their_text(model), seed=5)
    (folder / "more").mkdir()
    write_peft(folder / "more" / "detail.safetensors", _their_unet(model), _their_text(model), seed=6)
    return Pipeline(model, [controlnet], dtype="float32", lora_dir=folder)


def _weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.model.state_dict().items()}


def test_a_generation_with_loras_is_the_model_with_them_merged(pipe, folder):
    plain_weights = _weights(pipe)
    style, detail = folder / "style.safetensors", folder / "more" / "detail.safetensors"
    with apply_loras(pipe.model, [(load_lora(style), 0.8), (load_lora(detail), 0.5)]):
        expected = pipe.generate("a circle", **KW).images[0]
    plain = pipe.generate("a circle", **KW).images[0]
    result = pipe.generate("a circle", loras=[f"{style}:0.8", (detail, 0.5)], **KW)
    assert np.array_equal(result.images[0], expected)
    assert not np.allclose(result.images[0], plain, atol=1e-3)
    assert result.settings["prompt"] == "a circle"
    assert result.settings["loras"] == [
        {"name": "style", "weight": 0.8, "hash": short_hash(file_sha256(style))},
        {"name": "detail", "weight": 0.5, "hash": short_hash(file_sha256(detail))},
    ]
    # No LoRA asked for: the weights are the original ones again, bit for bit.
    again = pipe.generate("a circle", **KW)
    assert "loras" not in again.settings and np.array_equal(again.images[0], plain)
    assert all(torch.equal(v, plain_weights[k]) for k, v in pipe.model.state_dict().items())


def test_prompt_tags_are_found_in_the_folder_and_not_encoded(pipe, folder):
    explicit = pipe.generate("a circle", loras=[f"{folder / 'style.safetensors'}:0.8"], **KW)
    tagged = pipe.generate("a <lora:style:0.8> circle", **KW)
    assert np.array_equal(tagged.images[0], explicit.images[0])
    assert tagged.settings["prompt"] == "a <lora:style:0.8> circle"
    assert tagged.settings["loras"][0]["name"] == "style"
    nested = pipe.generate("a circle <lora:detail>", **KW)  # subfolders too, weight 1
    assert nested.settings["loras"][0] | {"hash": ""} == {"name": "detail", "weight": 1.0, "hash": ""}


def test_the_same_set_stays_merged_and_files_are_read_once(pipe, folder, monkeypatch):
    calls = []
    import controlnet.pipeline as module

    real = module.apply_loras
    monkeypatch.setattr(module, "apply_loras", lambda *a: calls.append(1) or real(*a))
    pipe.generate("a circle", loras=[f"{folder / 'style.safetensors'}:0.3"], **KW)
    merged = pipe._merged
    pipe.generate("another <lora:style:0.3>", **KW)
    assert calls == [1] and pipe._merged is merged
    pipe.generate("a circle", loras=[f"{folder / 'style.safetensors'}:0.4"], **KW)
    assert calls == [1, 1] and pipe.loras[0][1] == 0.4
    assert len(pipe._lora_files) <= 2  # style and detail, each read once
    pipe.use_loras()  # back to none
    assert pipe.loras == ()


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_mistakes_are_one_line_errors(pipe, folder):
    model, controlnet = random_tiny_models(seed=0)
    no_folder = Pipeline(model, [controlnet], dtype="float32")
    with pytest.raises(ValueError, match=r"names LoRA 'style'.*no LoRA folder") as error:
        no_folder.generate("a <lora:style>", steps=1)
    _one_line(error)
    with pytest.raises(ValueError, match="no LoRA called 'absent'") as error:
        pipe.generate("a <lora:absent:1>", steps=1)
    _one_line(error)
    with pytest.raises(ValueError, match="no such file") as error:
        pipe.generate("a", loras=[str(folder / "nothing.safetensors")], steps=1)
    _one_line(error)
    for bad in ("style.safetensors", [("x", "heavy")], [3], [("x", float("nan"))]):
        with pytest.raises(ValueError) as error:
            pipe.generate("a", loras=bad, steps=1)
        _one_line(error)
    with pytest.raises(ValueError, match="a file name without folder") as error:
        pipe.generate("a <lora:../style>", steps=1)
    _one_line(error)
    low = Pipeline(model, [controlnet], dtype="float32", low_memory=True, lora_dir=folder)
    with pytest.raises(ValueError, match="not supported with low memory") as error:
        low.generate("a <lora:style>", steps=1)
    _one_line(error)
    assert pipe.loras == ()  # nothing was merged by the refused generations


def test_the_command_line_takes_lora_and_lora_dir(tmp_path, folder, capsys):
    model = randomize(StableDiffusion(TINY), seed=2)
    base = save_ldm(tmp_path / "base.safetensors", model)
    kohya = write_kohya(tmp_path / "mine.safetensors", _their_unet(model), _their_text(model), seed=5)
    out = tmp_path / "out"
    common = ["generate", "--base", str(base), "--steps", "2", "--resolution", "64", "--seed", "3"]
    assert main([*common, "--prompt", "a cat", "--lora", f"{kohya}:0.7", "--out", str(out)]) == 0
    record = json.loads(read_png_text(next(out.glob("*.png")))["controlnet"])
    assert record["loras"] == [{"name": "mine", "weight": 0.7, "hash": short_hash(file_sha256(kohya))}]
    parameters = read_png_text(next(out.glob("*.png")))["parameters"]
    assert f'Lora hashes: "mine: {record["loras"][0]["hash"]}"' in parameters
    tag = ["--prompt", "a cat <lora:mine:0.7>", "--lora-dir", str(tmp_path)]
    assert main([*common, *tag, "--out", str(tmp_path / "o2")]) == 0
    tagged = next((tmp_path / "o2").glob("*.png"))
    assert json.loads(read_png_text(tagged)["controlnet"])["loras"] == record["loras"]
    assert np.array_equal(load_image(tagged), load_image(next(out.glob("*.png"))))
    capsys.readouterr()
    assert main([*common, "--prompt", "a cat <lora:mine>"]) == 2
    assert "pass --lora-dir" in capsys.readouterr().err
    assert main([*common, "--prompt", "a cat", "--lora", str(tmp_path / "absent.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_server_finds_loras_by_name_in_its_folder_only(tmp_path, folder, pipe):  # pipe: writes the LoRAs
    from controlnet.serve.api import request_from_json
    from controlnet.serve.service import Limits, ModelEntry, ModelRegistry, RequestError, Service

    model, _ = random_tiny_models(seed=0)
    base = save_ldm(tmp_path / "tiny.safetensors", model)
    outside = write_kohya(tmp_path / "outside.safetensors", _their_unet(model), _their_text(model), seed=5)
    (folder / "link.safetensors").symlink_to(outside)
    try:
        limits = Limits()
        served = Service(ModelRegistry([ModelEntry("tiny", base, [])], lora_dir=folder), limits)
        bare = Service(ModelRegistry([ModelEntry("tiny", base, [])]), limits)

        def ask(service, **fields):
            body = {"prompt": "a ring", "model": "tiny", "steps": 2, "seed": 4, "guidance_scale": 3.0} | fields
            return service.generate(request_from_json(body, limits))

        by_field = ask(served, loras=["style:0.6"])
        by_tag = ask(served, prompt="a ring <lora:style:0.6>")
        assert by_field.images[0].tobytes() == by_tag.images[0].tobytes()
        plain = ask(served)
        assert plain.images[0].tobytes() != by_field.images[0].tobytes()
        record = json.loads(by_tag.image_texts[0]["controlnet"])
        assert record["loras"][0]["name"] == "style" and record["prompt"] == "a ring <lora:style:0.6>"
        mistakes = {
            "no LoRA called 'absent' on this server": {"loras": ["absent"]},
            "a file name without folder": {"loras": ["../style"]},
            "leads out of the server's LoRA folder": {"prompt": "a <lora:link>"},
            "loras must be a list, got str": {"loras": "style"},
        }
        for message, fields in mistakes.items():
            with pytest.raises(RequestError, match=message) as error:
                ask(served, **fields)
            assert str(folder) not in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(RequestError, match="this server offers no LoRAs"):
            ask(bare, prompt="a <lora:style>")
    finally:
        (folder / "link.safetensors").unlink()

"""The command line's generate and annotate: outputs, PNG metadata (seeds, settings, model hashes),
reproducibility, and one-line errors for every user mistake. Also the model hash cache."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet import __version__, shipped
from controlnet.annotators import run_annotator
from controlnet.cli import main
from controlnet.config import TINY
from controlnet.formats.diffusers import save_diffusers
from controlnet.formats.ldm import save_ldm
from controlnet.hashing import cache_path, cached_file_sha256, file_sha256, folder_sha256, model_sha256
from controlnet.imaging.images import load_image, read_png_text
from controlnet.models.controlnet import ControlNet
from controlnet.models.stable_diffusion import StableDiffusion

from .helpers import randomize, write_tiny_adapter

FAST = ["--steps", "2", "--resolution", "64"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the real ~/.cache: every test gets its own hash cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    model = randomize(StableDiffusion(TINY), seed=2)
    # A ControlNet for another base: its encoder copy has a different cross-attention width.
    other = TINY.replace(unet=dataclasses.replace(TINY.unet, context_dim=32))
    return {
        "base": save_ldm(folder / "base.safetensors", model),
        "control": save_ldm(folder / "control.safetensors", controlnet=randomize(ControlNet(TINY.controlnet()), 3)),
        "control2": save_ldm(folder / "control2.safetensors", controlnet=randomize(ControlNet(TINY.controlnet()), 4)),
        "foreign": save_ldm(folder / "foreign.safetensors", controlnet=ControlNet(other.controlnet())),
        "diffusers": save_diffusers(folder / "base-diffusers", model),
        # T2I-Adapters in TencentARC's layout: one for the tiny base, one of another family.
        "adapter": write_tiny_adapter(folder / "t2iadapter_tiny_sd15v2.pth", seed=5),
        "wide_adapter": write_tiny_adapter(folder / "t2iadapter_wide.pth", seed=6, channels=(64, 128)),
    }


def _square(path: Path, size: int = 64) -> Path:
    """A white square on black: Canny finds its outline."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    Image.fromarray(pixels).save(path)
    return path


def _strokes(path: Path, size: int = 64) -> Path:
    """Dark strokes on white, for the scribble annotator."""
    pixels = np.full((size, size, 3), 255, np.uint8)
    pixels[size // 2, :] = 0
    pixels[:, size // 3] = 0
    Image.fromarray(pixels).save(path)
    return path


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _metadata(path: Path) -> tuple[dict, str]:
    text = read_png_text(path)
    return json.loads(text["controlnet"]), text.get("parameters", "")


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


# -- generate: outputs and metadata -------------------------------------------------------------


def test_generate_writes_every_image_and_the_map_each_with_its_own_seed(tmp_path, capsys):
    image, out = _square(tmp_path / "square.png"), tmp_path / "out"
    argv = ["generate", "--prompt", "a box", "--image", str(image), "--out", str(out), "--seed", "7", *FAST]
    assert main([*argv, "--num-samples", "3"]) == 0
    captured = capsys.readouterr()
    assert f"using {shipped.NAME}" in captured.out  # the default model says what it is
    assert "sampling [" in captured.err and "2/2" in captured.err  # the progress bar
    assert _pngs(out) == ["7-control-0.png", "7.png", "8.png", "9.png"]

    for index, seed in enumerate((7, 8, 9)):
        record, parameters = _metadata(out / f"{seed}.png")
        assert record["seed"] == seed and record["batch_index"] == index and record["num_images"] == 3
        # The shipped model never saw the original app's added and negative prompts: both default to empty.
        assert (record["prompt"], record["added_prompt"], record["negative_prompt"]) == ("a box", "", "")
        assert (record["steps"], record["sampler"], record["guidance_scale"], record["eta"]) == (2, "ddim", 9.0, 0.0)
        assert (record["width"], record["height"], record["resolution"]) == (64, 64, 64)
        assert record["models"] == {
            "base": {"name": "shapes.safetensors", "sha256": file_sha256(shipped.base_path())},
            "controlnets": [{"name": "shapes-canny.safetensors", "sha256": file_sha256(shipped.canny_path())}],
        }
        assert record["version"] == __version__
        [control] = record["controls"]
        assert control["annotator"] == "canny" and control["image"] == "square.png"
        assert control["annotator_params"] == {"low_threshold": 100, "high_threshold": 200}
        assert control["image_sha256"] == file_sha256(image)
        assert (control["strength"], control["start"], control["end"], control["mode"]) == (1.0, 0.0, 1.0, "balanced")
        lines = parameters.split("\n")
        assert lines[0] == "a box"
        assert lines[1].startswith(f"Steps: 2, Sampler: ddim, CFG scale: 9, Seed: {seed}, Size: 64x64, ")
        assert 'ControlNet 0: "Module: canny, ' in lines[1] and f"Version: controlnet {__version__}" in lines[1]

    map_record, _ = _metadata(out / "7-control-0.png")
    assert map_record["seeds"] == [7, 8, 9] and "seed" not in map_record
    # The saved map is the canny annotator's output for the (already 64x64) image.
    expected = run_annotator("canny", load_image(image), None, low_threshold=100, high_threshold=200)
    assert np.array_equal(load_image(out / "7-control-0.png"), expected)


def test_the_same_seed_gives_the_same_pixels_and_nothing_is_overwritten(tmp_path):
    image, out = _square(tmp_path / "square.png"), tmp_path / "out"
    out.mkdir()
    (out / "5.png").write_bytes(b"keep me")  # an earlier result (or anything) under the name
    argv = ["generate", "--prompt", "a box", "--image", str(image), "--out", str(out), *FAST]
    assert main([*argv, "--seed", "5", "--num-samples", "2"]) == 0
    assert main([*argv, "--seed", "5", "--num-samples", "2"]) == 0
    assert (out / "5.png").read_bytes() == b"keep me"
    assert _pngs(out) == ["5-1.png", "5-2.png", "5-control-0-1.png", "5-control-0.png", "5.png", "6-1.png", "6.png"]
    assert np.array_equal(load_image(out / "5-1.png"), load_image(out / "5-2.png"))
    assert np.array_equal(load_image(out / "6.png"), load_image(out / "6-1.png"))
    assert not np.array_equal(load_image(out / "5-1.png"), load_image(out / "6.png"))
    # The seed in an image's metadata reproduces it alone: the noise depends on that seed only
    # (a batch of 1 rounds its float math differently from a batch of 2, hence the tolerance: a few
    # levels in a few pixels with the default bf16 on a CPU that has it).
    seed = _metadata(out / "6.png")[0]["seed"]
    assert main([*argv, "--seed", str(seed)]) == 0
    alone, batched = load_image(out / "6-2.png").astype(int), load_image(out / "6.png").astype(int)
    assert np.abs(alone - batched).max() <= 4 and np.abs(alone - batched).mean() < 0.25


def test_guess_mode_two_units_and_euler_a(tmp_path):
    square, strokes, out = _square(tmp_path / "square.png"), _strokes(tmp_path / "strokes.png"), tmp_path / "out"
    base = ["generate", "--prompt", "a box", "--image", str(square), "--out", str(out), *FAST]

    assert main([*base, "--seed", "1"]) == 0
    assert main([*base, "--seed", "1", "--guess-mode"]) == 0
    guess, _ = _metadata(out / "1-1.png")
    assert guess["controls"][0]["mode"] == "control"
    assert not np.array_equal(load_image(out / "1.png"), load_image(out / "1-1.png"))

    spec = f"image={strokes},annotator=scribble,strength=0.5,start=0.25,end=0.75,mode=prompt"
    assert main([*base, "--seed", "2", "--control", spec]) == 0
    assert {"2-control-0.png", "2-control-1.png", "2.png"} <= set(_pngs(out))
    record, parameters = _metadata(out / "2.png")
    first, second = record["controls"]
    assert first["annotator"] == "canny" and second["annotator"] == "scribble"
    assert (second["strength"], second["start"], second["end"], second["mode"]) == (0.5, 0.25, 0.75, "prompt")
    assert second["image"] == "strokes.png" and second["annotator_params"] == {"threshold": 127}  # its default
    assert 'ControlNet 1: "Module: scribble, ' in parameters and "Weight: 0.5" in parameters
    scribble_map = run_annotator("scribble", load_image(strokes), None)
    assert np.array_equal(load_image(out / "2-control-1.png"), scribble_map)

    # Annotator parameters: --annotator-param for --image's unit, KEY=VALUE items in a --control spec.
    spec = f"image={strokes},annotator=scribble,threshold=200"
    assert main([*base, "--seed", "4", "--annotator-param", "low_threshold=50", "--control", spec]) == 0
    first, second = _metadata(out / "4.png")[0]["controls"]
    assert first["annotator_params"] == {"low_threshold": 50, "high_threshold": 200}
    assert second["annotator_params"] == {"threshold": 200}
    assert np.array_equal(
        load_image(out / "4-control-1.png"), run_annotator("scribble", load_image(strokes), None, threshold=200)
    )

    assert main([*base, "--seed", "3", "--sampler", "euler_a"]) == 0
    record, parameters = _metadata(out / "3.png")
    assert record["sampler"] == "euler_a" and "Sampler: euler_a" in parameters


def test_model_files_are_named_with_their_sha256(models, tmp_path):
    image, out = _square(tmp_path / "square.png"), tmp_path / "out"
    argv = ["generate", "--prompt", "a box", "--image", str(image), "--out", str(out), *FAST]
    files = ["--base", str(models["base"]), "--controlnet", str(models["control"])]
    assert main([*argv, "--seed", "1", *files, "--controlnet", str(models["control2"]), "--control",
                 f"image={image},annotator=canny,controlnet=1"]) == 0  # fmt: skip
    record, parameters = _metadata(out / "1.png")
    base_sha, control_sha = file_sha256(models["base"]), file_sha256(models["control"])
    assert record["models"]["base"] == {"name": "base.safetensors", "sha256": base_sha}
    # A model of one's own gets the original app's added and negative prompts by default.
    assert record["added_prompt"] == "best quality, extremely detailed"
    assert record["negative_prompt"].startswith("longbody, lowres")
    lines = parameters.split("\n")
    assert lines[:2] == ["a box, best quality, extremely detailed", f"Negative prompt: {record['negative_prompt']}"]
    assert [m["name"] for m in record["models"]["controlnets"]] == ["control.safetensors", "control2.safetensors"]
    assert record["models"]["controlnets"][0]["sha256"] == control_sha
    assert f"Model hash: {base_sha[:10]}, Model: base," in parameters
    assert f"Model: control [{control_sha[:10]}]" in parameters
    assert f"Model: control2 [{file_sha256(models['control2'])[:10]}]" in parameters
    assert str(models["base"].resolve()) in json.loads(cache_path().read_text())  # hashed once, cached

    # A diffusers folder: one hash over its weights files' "path:sha256" lines (text only: no ControlNet).
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a box",
                "--out",
                str(out),
                *FAST,
                "--seed",
                "2",
                "--base",
                str(models["diffusers"]),
            ]
        )
        == 0
    )
    record, _ = _metadata(out / "2.png")
    folder = models["diffusers"]
    lines = sorted(f"{p.relative_to(folder).as_posix()}:{file_sha256(p)}\n" for p in folder.rglob("*.safetensors"))
    assert len(lines) == 3  # unet, vae, text_encoder
    assert record["models"]["base"]["sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert record["controls"] == [] and record["models"]["controlnets"] == []


def test_adapter_units_on_the_command_line(models, tmp_path):
    """--adapter PATH loads a T2I-Adapter; with no --controlnet the --image unit uses adapter 0, and a
    --control spec names one with adapter=N. The adapter changes the image, and the PNG names its file."""
    square, strokes, out = _square(tmp_path / "square.png"), _strokes(tmp_path / "strokes.png"), tmp_path / "out"
    base = ["generate", "--prompt", "a box", "--out", str(out), *FAST, "--base", str(models["base"])]
    adapter = ["--adapter", str(models["adapter"])]
    assert main([*base, *adapter, "--image", str(square), "--seed", "1"]) == 0
    assert main([*base, *adapter, "--image", str(square), "--seed", "1", "--strength", "0"]) == 0
    assert np.abs(load_image(out / "1.png").astype(int) - load_image(out / "1-1.png").astype(int)).max() > 8
    record, parameters = _metadata(out / "1.png")
    [control] = record["controls"]
    assert control["adapter"] == 0 and "controlnet" not in control and control["mode"] == "balanced"
    adapter_sha = file_sha256(models["adapter"])
    assert record["models"]["adapters"] == [{"name": "t2iadapter_tiny_sd15v2.pth", "sha256": adapter_sha}]
    assert record["models"]["controlnets"] == []
    assert f'ControlNet 0: "Module: canny, Model: t2iadapter_tiny_sd15v2 [{adapter_sha[:10]}], Weight: 1,' in parameters

    # Beside a ControlNet: --image uses ControlNet 0, the spec adapter 0; guess mode puts the
    # ControlNet unit in control mode and leaves the adapter unit acting on both sides (balanced).
    both = ["--controlnet", str(models["control"]), *adapter, "--image", str(square), "--guess-mode"]
    spec = f"image={strokes},annotator=scribble,adapter=0,strength=0.5,end=0.5"
    assert main([*base, *both, "--seed", "2", "--control", spec]) == 0
    assert main([*base, *both, "--seed", "2", "--control", spec.replace("strength=0.5", "strength=0")]) == 0
    assert not np.array_equal(load_image(out / "2.png"), load_image(out / "2-1.png"))
    record, parameters = _metadata(out / "2.png")
    first, second = record["controls"]
    assert (first["controlnet"], first["mode"]) == (0, "control") and "adapter" not in first
    assert (second["adapter"], second["mode"], second["strength"], second["end"]) == (0, "balanced", 0.5, 0.5)
    control_sha = file_sha256(models["control"])
    assert f'ControlNet 0: "Module: canny, Model: control [{control_sha[:10]}],' in parameters
    assert f'ControlNet 1: "Module: scribble, Model: t2iadapter_tiny_sd15v2 [{adapter_sha[:10]}],' in parameters
    assert "Control Mode: control" in parameters and "Control Mode: balanced" in parameters


# -- generate: user mistakes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--image", "{missing}"], 1, "cannot read"),
        (["--image", "{empty}"], 1, "is empty"),
        (["--image", "{corrupt}"], 1, "corrupt or truncated"),
        (["--image", "{text}"], 1, "is not an image"),
        (["--image", "{bomb}"], 1, "too large to decode safely"),
        (["--image", "{image}", "--steps", "0"], 2, "steps must be between 1 and 100, got 0"),
        (["--image", "{image}", "--steps", "101"], 2, "steps must be between 1 and 100, got 101"),
        (["--image", "{image}", "--num-samples", "13"], 2, "images must be between 1 and 12"),
        (["--image", "{image}", "--seed", "2147483648"], 2, "seed must be between -1 and 2147483647"),
        (["--image", "{image}", "--guidance", "0"], 2, "guidance scale must be between 0.1 and 30"),
        (["--image", "{image}", "--resolution", "100"], 2, "resolution must be a multiple of 64, got 100"),
        (["--image", "{image}", "--sampler", "plms"], 2, "sampler must be one of ddim, euler"),
        (["--image", "{image}", "--sampler", "euler_a", "--eta", "0.5"], 2, "applies to the ddim, tcd samplers only"),
        (["--image", "{image}", "--eta", "nan"], 2, "eta must be a number, got nan"),
        (["--image", "{image}", "--eta", "1.5"], 2, "eta must be between 0 and 1"),  # NaN latents above 1
        (["--image", "{image}", "--annotator", "hed2"], 2, "annotator must be one of canny, scribble"),
        (["--image", "{image}", "--annotator", "inpaint"], 2, "needs mask, which the command line cannot give"),
        (["--image", "{image}", "--strength", "2.5"], 2, "strength must be between 0 and 2, got 2.5"),
        (["--image", "{image}", "--start", "0.8", "--end", "0.2"], 2, "start (0.8) must not be after end (0.2)"),
        (
            ["--image", "{image}", "--low-threshold", "0"],
            2,
            "canny parameter 'low_threshold' must be in [1, 255], got 0",
        ),
        (["--image", "{image}", "--guess-mode", "--control-mode", "prompt"], 2, "--guess-mode means --control-mode"),
        (["--image", "{image}", "--device", "abacus"], 2, "--device 'abacus' is not a device"),
        (["--control", "{image}"], 2, "bad --control item"),
        (["--control", "image={image},weight=1"], 2, "bad --control item 'weight=1': not a unit field"),
        (["--control", "image={image},annotator=scribble,threshold=0"], 2, "'threshold' must be in [1, 255], got 0"),
        (["--image", "{image}", "--annotator-param", "high=3"], 2, "has no parameter 'high'; it takes low_threshold"),
        (["--annotator-param", "low_threshold=3"], 2, "--annotator-param is for the unit of --image"),
        (["--control", "annotator=canny"], 2, "needs image=PATH"),
        (["--control", "image={image},strength=high"], 2, "--control strength='high': not a number"),
        (
            ["--control", "image={image},controlnet=x"],
            2,
            "--control controlnet='x': not an index, and no shipped ControlNet is called 'x' (the shipped",
        ),
        (
            ["--control", "image={image},mode=loud"],
            2,
            "control mode must be one of balanced, prompt, control, got 'loud'",
        ),
        (["--control", "image={image},resize=stretch"], 2, "resize mode must be one of just_resize"),
        (["--control", "image={missing}"], 1, "cannot read"),
        (["--control", "image={image},controlnet=1"], 2, "controlnet=1, but only 1 ControlNet(s) are loaded"),
        (
            ["--image", "{image}", "--controlnet", "{control}"],
            2,
            "control.safetensors: a file of your own needs --base",
        ),
        (["--image", "{image}", "--base", "{missing}"], 1, "no such file"),
        (["--image", "{image}", "--base", "{base}"], 2, "no ControlNet: pass --controlnet PATH"),
        (
            ["--image", "{image}", "--base", "{base}", "--controlnet", "{foreign}"],
            1,
            "made for a model with context 32",
        ),
        (["--image", "{image}", "--base", "{control}"], 1, "holds a ControlNet only"),
        # T2I-Adapter units
        (
            ["--image", "{image}", "--adapter", "{adapter}"],
            2,
            "t2iadapter_tiny_sd15v2.pth: a file of your own needs --base",
        ),
        (["--control", "image={image},adapter=0"], 2, "adapter=0, but only 0 T2I-Adapter(s) are loaded"),
        (
            ["--base", "{base}", "--adapter", "{adapter}", "--control", "image={image},adapter=1"],
            2,
            "adapter=1, but only 1 T2I-Adapter(s) are loaded",
        ),
        (["--control", "image={image},adapter=-1"], 2, "T2I-Adapter index must be between 0 and 63, got -1"),
        (
            ["--control", "image={image},adapter=x"],
            2,
            "--control adapter='x': not an index, and no shipped T2I-Adapter",
        ),
        (
            ["--control", "image={image},controlnet=0,adapter=0"],
            2,
            "a unit uses one ControlNet (controlnet) or one T2I-Adapter (adapter), not both",
        ),
        (
            ["--base", "{base}", "--adapter", "{adapter}", "--control", "image={image},mode=control"],
            2,
            "a T2I-Adapter unit takes control mode 'balanced' only",
        ),
        (
            ["--base", "{base}", "--adapter", "{adapter}", "--image", "{image}", "--guess-mode"],
            2,
            "guess mode puts ControlNet units in control mode, and every unit here uses a T2I-Adapter",
        ),
        (
            ["--base", "{base}", "--adapter", "{adapter}", "--image", "{image}", "--control-mode", "prompt"],
            2,
            "--control-mode prompt sets the mode of ControlNet units",
        ),
        (
            ["--base", "{base}", "--adapter", "{missing}", "--image", "{image}"],
            2,
            "absent.png: no such file or folder, nor a shipped T2I-Adapter name",
        ),
        (
            ["--base", "{base}", "--adapter", "{control}", "--image", "{image}"],
            1,
            "a ControlNet or base model, not a T2I-Adapter",
        ),
        (
            ["--base", "{base}", "--adapter", "{wide_adapter}", "--image", "{image}"],
            1,
            "t2iadapter_wide.pth: this T2I-Adapter's feature widths [64, 128] do not fit",
        ),
        (["--image", "{image}", "--out", "{under_file}"], 1, "cannot write there"),
        (["--image", "{image}", "--out", "{file}"], 1, "cannot write there"),
    ],
)
def test_generate_mistakes_get_one_line_errors_and_a_nonzero_exit(models, tmp_path, capsys, extra, code, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "1.png").write_bytes(b"keep me")
    (tmp_path / "empty.png").write_bytes(b"")
    _square(tmp_path / "whole.png")
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "whole.png").read_bytes()[:-30])  # truncated
    (tmp_path / "text.png").write_text("not a picture\n")
    (tmp_path / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (tmp_path / "file").write_text("a regular file")
    paths = {
        "image": _square(tmp_path / "square.png"),
        "missing": tmp_path / "absent.png",
        "empty": tmp_path / "empty.png",
        "corrupt": tmp_path / "corrupt.png",
        "text": tmp_path / "text.png",
        "bomb": tmp_path / "bomb.png",
        "file": tmp_path / "file",
        "under_file": tmp_path / "file" / "out",  # its parent is a regular file (tests may run as root)
        **models,
    }
    argv = ["generate", "--prompt", "p", "--seed", "1", "--out", str(out), *FAST, *extra]
    if "--out" in extra:
        argv.remove(str(out))
        argv.remove("--out")
    assert main([a.format(**paths) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("controlnet generate: error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert _pngs(out) == ["1.png"] and (out / "1.png").read_bytes() == b"keep me"  # nothing written, nothing lost


# -- annotate ------------------------------------------------------------------------------------


def test_annotate_canny_equals_the_python_api(tmp_path, capsys):
    image = _square(tmp_path / "square.png", size=96)
    out = tmp_path / "edges.png"
    assert main(["annotate", "canny", str(image), str(out), "--resolution", "64"]) == 0
    assert "wrote" in capsys.readouterr().out
    expected = run_annotator("canny", load_image(image), 64)
    assert np.array_equal(load_image(out), expected)
    assert json.loads(read_png_text(out)["controlnet"])["params"] == {"low_threshold": 100, "high_threshold": 200}

    tuned = tmp_path / "edges-50.png"
    assert main(["annotate", "canny", str(image), str(tuned), "--resolution", "64", "--param", "low_threshold=50"]) == 0
    assert np.array_equal(load_image(tuned), run_annotator("canny", load_image(image), 64, low_threshold=50))
    assert main(["annotate", "canny", str(image), str(out), "--resolution", "64", "--overwrite"]) == 0


def test_annotate_typed_params_and_list(tmp_path, capsys):
    image = _square(tmp_path / "square.png")
    out = tmp_path / "mask.png"
    argv = ["annotate", "image_to_mask", str(image), str(out), "--resolution", "64"]
    assert main([*argv, "--param", "invert=true", "--param", "channel=red", "--param", "percentile=25"]) == 0
    expected = run_annotator("image_to_mask", load_image(image), 64, invert=True, channel="red", percentile=25.0)
    assert np.array_equal(load_image(out), expected)

    assert main(["annotate", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "canny: Canny edges" in listing and "low_threshold=100  (int 1..255)" in listing
    assert "invert=False  (true or false)" in listing and "needs mask (Python API only)" in listing


def _listed(listing: str, name: str) -> list[str]:
    """The lines `annotate --list` prints under annotator `name` (its weights and parameters)."""
    lines = listing.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
    return [line.strip() for line in itertools.takewhile(lambda line: line.startswith("    "), lines[start + 1 :])]


def test_annotate_list_says_which_weight_files_the_given_folder_has(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "annotators"
    folder.mkdir()
    (folder / "body_pose_model.pth").write_bytes(b"listed by name: not read")
    (folder / "facenet.safetensors").write_bytes(b"the .safetensors version counts")
    monkeypatch.setenv("CONTROLNET_ANNOTATORS", str(tmp_path / "elsewhere"))  # the option wins
    assert main(["annotate", "--list", "--annotators-dir", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0] == f"annotator weights are read from {folder}"
    source = "https://huggingface.co/lllyasviel/Annotators"
    assert _listed(listing, "openpose_hand") == [
        "weights body_pose_model.pth: present",
        f"weights hand_pose_model.pth: MISSING (get it from {source})",
    ]
    assert _listed(listing, "openpose_face") == ["weights body_pose_model.pth: present", "weights facenet.pth: present"]
    assert [line.split("  ")[0] for line in _listed(listing, "canny")] == ["low_threshold=100", "high_threshold=200"]


def test_annotate_reads_weights_from_the_annotators_dir_option(tmp_path, capsys, monkeypatch):
    """--annotators-dir over CONTROLNET_ANNOTATORS: with every missing file named in one line before
    anything is read; with the file there, the map the Python API makes from that folder."""
    from controlnet.annotators import Runtime

    from . import annotator_weights

    image, out = _square(tmp_path / "square.png", size=96), tmp_path / "out.png"
    empty, folder = tmp_path / "empty", tmp_path / "annotators"
    empty.mkdir(), folder.mkdir()
    monkeypatch.setenv("CONTROLNET_ANNOTATORS", str(empty))
    argv = ["annotate", "openpose_full", str(image), str(out), "--annotators-dir", str(folder)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"are not in {folder} (the folder set by --annotators-dir" in err
    assert all(f in err for f in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")), err
    assert not out.exists()

    annotator_weights.write(folder, annotator_weights.PIDINET)
    argv = ["annotate", "softedge_pidinet", str(image), str(out), "--resolution", "64", "--dtype", "float32"]
    assert main([*argv, "--annotators-dir", str(folder)]) == 0
    expected = run_annotator("softedge_pidinet", load_image(image), 64, runtime=Runtime(folder, "cpu", "float32"))
    assert np.array_equal(load_image(out), expected) and 0 < expected.mean() < 255
    assert main([*argv, "--overwrite"]) == 1  # without the option: the environment's empty folder
    err = capsys.readouterr().err
    assert f"table5_pidinet.pth (the PiDiNet soft-edge network (table 5, carv4)) is not in {empty} (" in err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["hed2", "{image}", "{out}"], 2, "unknown annotator 'hed2'"),
        (["canny", "{image}", "{out}", "--param", "low=50"], 2, "has no parameter 'low'; it takes low_threshold"),
        (["canny", "{image}", "{out}", "--param", "low_threshold"], 2, "bad --param 'low_threshold'"),
        (["canny", "{image}", "{out}", "--param", "low_threshold=abc"], 2, "must be a number, got 'abc'"),
        (["canny", "{image}", "{out}", "--param", "low_threshold=0"], 2, "must be in [1, 255], got 0"),
        (["canny", "{image}", "{out}", "--param", "low_threshold=50.5"], 2, "must be an integer"),
        (["image_to_mask", "{image}", "{out}", "--param", "invert=maybe"], 2, "must be true or false"),
        (["inpaint", "{image}", "{out}"], 2, "needs mask"),
        (["canny", "{image}"], 2, "needs NAME IN OUT"),
        (["canny", "{image}", "{existing}"], 2, "already exists; pass --overwrite"),
        (["canny", "{image}", "{image}"], 2, "would overwrite an input"),
        (["canny", "{image}", "{jpg}"], 2, "name it .png"),
        (["canny", "{image}", "{out}", "--resolution", "0"], 2, "--resolution must be between 64 and 8192"),
        (["canny", "{missing}", "{out}"], 1, "cannot read"),
        (["canny", "{image}", "{unwritable}"], 1, "cannot write"),
        (["canny", "{image}", "{out}", "--json", "{json}"], 2, "detects nothing to write as JSON"),
        (["canny", "{image}", "{out}", "--json", "{jpg}"], 2, "--json writes JSON; name it .json"),
        (["canny", "{image}", "{out}", "--device", "abacus"], 2, "--device 'abacus' is not a device"),
    ],
)
def test_annotate_mistakes_get_one_line_errors(tmp_path, capsys, argv, code, message):
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    (tmp_path / "file").write_text("a regular file")
    paths = {
        "image": _square(tmp_path / "square.png"),
        "out": tmp_path / "out.png",
        "existing": existing,
        "jpg": tmp_path / "out.jpg",
        "missing": tmp_path / "absent.png",
        "unwritable": tmp_path / "file" / "out.png",
        "json": tmp_path / "poses.json",
    }
    assert main(["annotate", *(a.format(**paths) for a in argv)]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("controlnet annotate: error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert existing.read_bytes() == b"keep me" and not (tmp_path / "out.png").exists()
    assert not (tmp_path / "poses.json").exists()


# -- a pose JSON wherever a control image goes ---------------------------------------------------

# One person in the A1111 pose editor's format, pixel coordinates on a 512x640 canvas.
_BODY = [256, 100, 256, 160, 200, 160, 180, 240, 170, 320, 312, 160, 332, 240, 342, 320, 220, 330]
_BODY += [215, 450, 210, 560, 292, 330, 297, 450, 302, 560, 245, 90, 267, 90, 230, 95, 282, 95]
POSE = {
    "people": [{"pose_keypoints_2d": [v for i in range(18) for v in (*_BODY[2 * i : 2 * i + 2], 1)]}],
    "canvas_width": 512,
    "canvas_height": 640,
}


def _pose_file(path: Path, pose: dict | None = None) -> Path:
    path.write_text(json.dumps(pose or POSE))
    return path


def test_annotate_draws_a_pose_json_and_writes_detected_poses_back(tmp_path, capsys):
    from controlnet.annotators.posejson import render_pose_json

    pose = _pose_file(tmp_path / "pose.json")
    out, again = tmp_path / "pose.png", tmp_path / "again.json"
    assert main(["annotate", "openpose_json", str(pose), str(out), "--json", str(again)]) == 0
    drawn = load_image(out)
    assert drawn.shape == (640, 512, 3) and np.array_equal(drawn, render_pose_json(pose))  # at its canvas size
    assert len(np.unique(drawn.reshape(-1, 3), axis=0)) > 18  # the 18 joint colours and the limbs' blends
    # The written poses draw the same map: a user can edit them and render them back.
    assert np.array_equal(render_pose_json(again), drawn)
    small = tmp_path / "small.png"
    assert main(["annotate", "openpose_json", str(pose), str(small), "--resolution", "256"]) == 0
    assert load_image(small).shape == (320, 256, 3)  # drawn at the size, strokes as wide as ever
    # CMU's --write_json records no canvas: --canvas gives it
    cmu = _pose_file(tmp_path / "cmu.json", {"version": 1.3, "people": POSE["people"]})
    assert main(["annotate", "openpose_json", str(cmu), str(tmp_path / "cmu.png")]) == 2
    assert "give the image size" in capsys.readouterr().err
    assert main(["annotate", "openpose_json", str(cmu), str(tmp_path / "cmu.png"), "--canvas", "512x640"]) == 0
    assert np.array_equal(load_image(tmp_path / "cmu.png"), drawn)


@pytest.mark.parametrize(
    ("pose", "message"),
    [
        ({"people": [{"pose_keypoints_2d": [1, 2]}], "canvas_width": 64, "canvas_height": 64}, "pose_keypoints_2d"),
        ({"people": [], "canvas_width": 0, "canvas_height": 64}, "canvas_width"),
        ({"canvas_width": 64, "canvas_height": 64}, "people"),
        ({"people": [{"pose_keypoints_2d": [float("nan")] * 54}], "canvas_width": 64, "canvas_height": 64}, "NaN"),
    ],
)
def test_a_bad_pose_json_is_one_line_and_nothing_is_written(tmp_path, capsys, pose, message):
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(pose))  # NaN as the JSON literal
    out = tmp_path / "out"
    for argv in (
        ["annotate", "openpose_json", str(path), str(tmp_path / "map.png")],
        ["generate", "--prompt", "a", "--image", str(path), "--out", str(out), *FAST],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "map.png").exists() and not out.exists()


def test_generate_takes_a_pose_json_as_a_control_image(tmp_path, capsys):
    from controlnet.annotators.posejson import render_pose_json

    pose, out = _pose_file(tmp_path / "pose.json"), tmp_path / "out"
    argv = ["generate", "--prompt", "a person", "--out", str(out), "--seed", "3", "--steps", "1"]
    assert main([*argv, "--image", str(pose), "--resolution", "128"]) == 0
    record, _ = _metadata(out / "3.png")
    [control] = record["controls"]
    assert control["image"] == "pose.json" and control["image_sha256"] == file_sha256(pose)
    assert control["annotator"] == "none"  # the drawn pose is the map
    # the same as the drawn pose given as a ready map
    drawn = tmp_path / "drawn.png"
    Image.fromarray(render_pose_json(pose)).save(drawn)
    assert (
        main(
            [*argv, "--image", str(drawn), "--annotator", "none", "--resolution", "128", "--out", str(tmp_path / "o2")]
        )
        == 0
    )
    assert np.array_equal(load_image(out / "3-control-0.png"), load_image(tmp_path / "o2" / "3-control-0.png"))
    assert np.array_equal(load_image(out / "3.png"), load_image(tmp_path / "o2" / "3.png"))
    # a --control unit, with the drawing's own parameters; another annotator on a pose is a mistake
    spec = f"image={pose},draw_body=false"
    assert main([*argv, "--control", spec, "--resolution", "128", "--out", str(tmp_path / "o3")]) == 0
    assert not load_image(tmp_path / "o3" / "3-control-0.png").any()  # nothing drawn but the (absent) hands and face
    assert main([*argv, "--image", str(pose), "--annotator", "scribble"]) == 2
    assert "annotator 'scribble' cannot run on it" in capsys.readouterr().err


# -- the model hash cache ------------------------------------------------------------------------


def test_file_sha256_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # several 1 MiB chunks
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == expected
    assert cached_file_sha256(path) == expected
    assert cache_path() == tmp_path / "cache" / "controlnet" / "hashes.json"
    entry = json.loads(cache_path().read_text())[str(path.resolve())]
    assert entry == {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns, "sha256": expected}

    def must_not_hash(_path):
        raise AssertionError("hashed again despite a valid cache entry")

    monkeypatch.setattr("controlnet.hashing.file_sha256", must_not_hash)
    assert cached_file_sha256(path) == expected
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    path.write_bytes(b"changed")  # new size and mtime: the entry is stale
    os.utime(path, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    assert cached_file_sha256(path) == hashlib.sha256(b"changed").hexdigest()


@pytest.mark.parametrize("garbage", [b"{not json", b"[1, 2]", b'{"x": {"size": "big"}}', b"\xff\xfe", b""])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, garbage):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"weights")
    cache_path().parent.mkdir(parents=True)
    cache_path().write_bytes(garbage)
    assert cached_file_sha256(path) == hashlib.sha256(b"weights").hexdigest()
    rewritten = json.loads(cache_path().read_text())
    assert list(rewritten) == [str(path.resolve())]
    assert not [p for p in cache_path().parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left


def test_an_unwritable_cache_never_fails_hashing(tmp_path, monkeypatch):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    path = tmp_path / "w.pt"
    path.write_bytes(b"w")
    assert model_sha256(path) == hashlib.sha256(b"w").hexdigest()


def test_folder_hash_combines_the_weights_files(tmp_path):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae")
    (folder / "unet" / "config.json").write_text("{}")  # configs are not weights
    (folder / "vae" / ".diffusion_pytorch_model.safetensors.tmp.safetensors").write_bytes(b"half-written")
    lines = [
        f"unet/diffusion_pytorch_model.safetensors:{hashlib.sha256(b'unet').hexdigest()}\n",
        f"vae/diffusion_pytorch_model.safetensors:{hashlib.sha256(b'vae').hexdigest()}\n",
    ]
    assert folder_sha256(folder) == model_sha256(folder) == hashlib.sha256("".join(lines).encode()).hexdigest()
    with pytest.raises(ValueError, match="no weights file"):
        folder_sha256(tmp_path / "cache")

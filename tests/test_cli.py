"""The command line: convert, info, transfer-control and demo, with their errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from controlnet import shipped
from controlnet.cli import main
from controlnet.config import TINY
from controlnet.formats.ldm import save_ldm
from controlnet.formats.tensors import read_state_dict
from controlnet.imaging.images import load_image
from controlnet.loading import load_controlnet
from controlnet.models.controlnet import ControlNet
from controlnet.models.stable_diffusion import StableDiffusion

from .helpers import randomize


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    model = randomize(StableDiffusion(TINY), seed=2)
    controlnet = randomize(ControlNet(TINY.controlnet()), seed=3)
    return {
        "full": save_ldm(folder / "full.safetensors", model, controlnet),
        "base": save_ldm(folder / "base.safetensors", model),
        "control": save_ldm(folder / "control.safetensors", controlnet=controlnet),
        "model": model,
        "controlnet": controlnet,
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_ldm_to_diffusers_and_back_is_bit_identical(tiny_files, tmp_path, capsys):
    assert main(["convert", str(tiny_files["full"]), str(tmp_path / "pipe"), "--to", "diffusers"]) == 0
    assert "base model + ControlNet" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "pipe"), str(tmp_path / "back.safetensors"), "--to", "ldm"]) == 0
    assert _same(read_state_dict(tiny_files["full"])[0], read_state_dict(tmp_path / "back.safetensors")[0])


def test_convert_a_controlnet_alone(tiny_files, tmp_path):
    assert main(["convert", str(tiny_files["control"]), str(tmp_path / "cn.safetensors"), "--to", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "cn.safetensors"), str(tmp_path / "cn-ldm.safetensors"), "--to", "ldm"]) == 0
    assert _same(load_controlnet(tmp_path / "cn-ldm.safetensors").state_dict(), tiny_files["controlnet"].state_dict())
    assert main(["convert", str(tiny_files["control"]), str(tmp_path / "cn-folder"), "--to", "diffusers"]) == 0
    assert (tmp_path / "cn-folder" / "config.json").is_file()


def test_info_says_what_a_file_holds(tiny_files, capsys):
    assert main(["info", str(tiny_files["full"])]) == 0
    out = capsys.readouterr().out
    assert "ldm" in out and "base model: tiny (eps-prediction)" in out and "ControlNet: 5 residuals" in out


def test_transfer_control_moves_a_controlnet_to_a_new_base(tiny_files, tmp_path):
    model = tiny_files["model"]
    tuned = StableDiffusion(TINY)
    tuned.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in tuned.unet.parameters():
            parameter.add_(0.25)
    new_base = save_ldm(tmp_path / "tuned.safetensors", tuned)
    out = tmp_path / "moved.safetensors"
    assert main(["transfer-control", str(tiny_files["control"]), str(tiny_files["base"]), str(new_base), str(out)]) == 0
    moved = load_controlnet(out).state_dict()
    original = tiny_files["controlnet"].state_dict()
    assert torch.allclose(
        moved["input_blocks.1.0.in_layers.2.weight"], original["input_blocks.1.0.in_layers.2.weight"] + 0.25
    )
    assert torch.equal(moved["zero_convs.0.0.weight"], original["zero_convs.0.0.weight"])


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["convert", "{missing}", "{out}", "--to", "ldm"], 1, "no such file"),
        (["convert", "{full}", "{full}", "--to", "ldm"], 2, "would overwrite an input"),
        (["convert", "{full}", "{existing}", "--to", "ldm"], 2, "already exists; pass --overwrite"),
        (["convert", "{evil}", "{out}", "--to", "ldm"], 1, "refused: this pickle would run code"),
        (["convert", "{full}", "{out_ckpt}", "--to", "ldm"], 1, "written as .safetensors only"),
        (["demo", "--steps", "0", "--out", "{out}"], 2, "--steps must be between 1 and 100"),
        (["serve", "--auth", "ada"], 2, "--auth must be USER:PASS, both non-empty"),
        (["serve", "--port", "0"], 2, "--port must be between 1 and 65535"),
        (["serve", "--models", "{missing}"], 2, "no such folder"),
        (["serve", "--controlnet", "{full}"], 2, "--controlnet needs --base"),
        (["serve", "--base", "{missing}"], 2, "no such file or folder"),
        (["serve", "--max-queue", "0"], 2, "--max-queue must be between 1"),
    ],
)
def test_user_mistakes_get_one_line_errors_and_a_nonzero_exit(tiny_files, tmp_path, capsys, argv, code, message):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": torch.zeros(1), "hook": _Evil()}, evil)
    paths = {
        "missing": tmp_path / "absent.ckpt",
        "out": tmp_path / "out",
        "out_ckpt": tmp_path / "out.ckpt",
        "full": tiny_files["full"],
        "existing": existing,
        "evil": evil,
    }
    assert main([a.format(**paths) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert existing.read_bytes() == b"keep me"  # nothing already written is lost


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "controlnet.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("controlnet ")


def test_demo_generates_from_every_shipped_example(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    examples = shipped.examples()
    assert shipped.NAME in out and len(examples) >= 3
    compositions = [e.name for e in examples if len(e.controls) > 1]
    names = [e.name for e in examples] + [f"{examples[0].name}-other-colours", f"{examples[0].name}-guess-mode"]
    names += [f"{name}-guess-mode" for name in compositions]
    for name in [*names, "overview"]:
        path = tmp_path / f"{name}.png"
        assert path.is_file() and str(path) in out
    assert load_image(tmp_path / f"{names[0]}.png").shape == (128, 128, 3)  # the model's native size
    assert f"{len(names)} images at 128x128, 2 DDIM steps" in out

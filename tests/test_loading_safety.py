"""Loading what users hand us, safely (issue 16): hostile pickles, compressed torch zips, junk files,
NaN weights, the shipped model re-saved as .pth; and writing: folders replaced whole, files made
with the umask's permissions."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from controlnet import shipped
from controlnet.annotators.weights import AnnotatorWeightsError, WeightFile, load_network
from controlnet.cli import main
from controlnet.config import PRESETS
from controlnet.files import atomic_file, atomic_folder, atomic_path
from controlnet.formats import diffusers
from controlnet.formats.detect import controlnet_config_from_shapes, inspect_contents, preset_from_shapes
from controlnet.formats.diffusers import save_diffusers
from controlnet.formats.errors import CheckpointError
from controlnet.formats.ldm import ldm_state_dict, save_ldm
from controlnet.formats.tensors import has_non_finite, read_state_dict
from controlnet.hashing import cached_file_sha256
from controlnet.loading import load_base, load_controlnet
from controlnet.models.controlnet import ControlNet
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.models.tiny import random_tiny_models
from controlnet.models.unet import UNet

LOADERS = (read_state_dict, inspect_contents, load_base, load_controlnet)


@pytest.fixture(scope="module")
def tiny() -> tuple[StableDiffusion, ControlNet]:
    return random_tiny_models(seed=3)


def _ldm(model: StableDiffusion | None = None, controlnet: ControlNet | None = None) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ldm_state_dict(model, controlnet).items()}


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _one_line_error(call, path: Path) -> str:
    """Run ``call(path)``: it must raise a CheckpointError of one line that names the file."""
    with pytest.raises(CheckpointError) as caught:
        call(path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert path.name in message, message
    return message


# --- 1. pickles that weights_only refuses ------------------------------------------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path, function=builtins.eval) -> None:
        self.marker, self.function = marker, function

    def __reduce__(self):
        return (self.function, (f"open({str(self.marker)!r}, 'w').close()",))


class _Custom:
    """A class of this module: unpickling it would import it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:  # what a plain pickle.load would run
        Path(state["marker"]).touch()


def _hand_made_torch_zip(path: Path, payload: object) -> None:
    """A zip laid out as torch.save's, whose data.pkl is any pickle we like."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


def _hostile(kind: str, path: Path, marker: Path) -> str:
    """Write a hostile checkpoint of ``kind`` to ``path``; return what its refusal must name."""
    weights = {"weight": torch.zeros(2)}
    if kind == "os.system in a torch zip":
        torch.save({"state_dict": weights, "hook": _System(marker)}, path)
        return "system"
    if kind == "a custom class":
        torch.save({"state_dict": weights, "hook": _Custom(marker)}, path)
        return "_Custom"
    if kind == "builtins.eval":
        torch.save({"state_dict": weights, "hook": _Eval(marker)}, path)
        return "builtins.eval"
    if kind == "builtins.exec":
        torch.save({"state_dict": weights, "hook": _Eval(marker, builtins.exec)}, path)
        return "builtins.exec"
    if kind == "a hand-made zip whose data.pkl is hostile":
        _hand_made_torch_zip(path, {"hook": _System(marker)})
        return "system"
    if kind == "the legacy (non-zip) torch.save format":
        torch.save({"state_dict": weights, "hook": _System(marker)}, path, _use_new_zipfile_serialization=False)
        return "system"
    if kind == "a raw pickle, protocol 2":
        path.write_bytes(pickle.dumps({"hook": _System(marker)}, protocol=2))
        return "system"
    if kind == "a raw pickle, protocol 5 (STACK_GLOBAL, memo)":
        path.write_bytes(pickle.dumps([_Eval(marker), _Eval(marker)], protocol=5))
        return "builtins.eval"
    raise AssertionError(kind)


HOSTILE = [
    "os.system in a torch zip",
    "a custom class",
    "builtins.eval",
    "builtins.exec",
    "a hand-made zip whose data.pkl is hostile",
    "the legacy (non-zip) torch.save format",
    "a raw pickle, protocol 2",
    "a raw pickle, protocol 5 (STACK_GLOBAL, memo)",
]


@pytest.mark.parametrize("suffix", [".ckpt", ".pth"])
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_refused_pickle_gets_our_one_line_message_and_nothing_runs(tmp_path, kind, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"hostile{suffix}"
    named = _hostile(kind, path, marker)
    for loader in LOADERS:
        message = _one_line_error(loader, path)
        assert "refused: this pickle would run code" in message and named in message, message
        assert "weights_only" not in message and "Prefer a .safetensors file" in message
    assert not marker.exists()


# Annotator weight files (annotators/weights.py) are read by the same loader: a hostile file under an
# annotator's name runs nothing and is refused in one line that also says which network was expected.
_ANNOTATOR_FILE = WeightFile("SomeNet.pth", "a test network", "https://example.org/weights", markers=("conv.weight",))


@pytest.mark.parametrize("kind", ["os.system in a torch zip", "builtins.eval", "a raw pickle, protocol 2"])
def test_a_hostile_annotator_file_runs_nothing_and_is_refused_in_one_line(tmp_path, kind):
    marker = tmp_path / "pwned"
    named = _hostile(kind, tmp_path / _ANNOTATOR_FILE.name, marker)
    with pytest.raises(AnnotatorWeightsError) as refused:
        load_network(_ANNOTATOR_FILE, tmp_path, lambda: torch.nn.Conv2d(1, 1, 1), "cpu", "float32")
    message = str(refused.value)
    assert "\n" not in message and "refused: this pickle would run code" in message and named in message
    assert "expected a test network" in message and not marker.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_annotator_file_with_nan_or_inf_weights_is_refused(tmp_path, value):
    tensors = {"conv.weight": torch.full((1, 1, 1, 1), value), "conv.bias": torch.zeros(1)}
    save_file(tensors, tmp_path / "SomeNet.safetensors")
    with pytest.raises(AnnotatorWeightsError, match=r"SomeNet\.safetensors.*(NaN|infinite)"):
        load_network(_ANNOTATOR_FILE, tmp_path, lambda: torch.nn.Sequential(), "cpu", "float32")


@pytest.mark.parametrize(
    "torch_text",
    [
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed",
        "Unsupported global: GLOBAL posix.system was not an allowed global by default.",
        "some future wording\n\nwith several lines; pass weights_only=False",
    ],
)
def test_the_refusal_does_not_depend_on_torch_wording(tmp_path, monkeypatch, torch_text):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    _hostile("os.system in a torch zip", path, marker)

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError(torch_text)

    monkeypatch.setattr(torch, "load", refuse)
    message = _one_line_error(read_state_dict, path)
    assert "refused: this pickle would run code (" in message and "system)" in message, message
    assert "weights_only" not in message


def test_a_refused_pickle_naming_nothing_unsafe_still_gets_our_message(tmp_path):
    # A torch zip whose data.pkl names no global at all, but uses an opcode torch's safe loader
    # refuses (PERSID, a text persistent id): refused, with the message for "not tensors only".
    torch.save({"a": torch.ones(2)}, tmp_path / "plain.pth")
    path = tmp_path / "odd.pth"
    with zipfile.ZipFile(tmp_path / "plain.pth") as source, zipfile.ZipFile(path, "w") as target:
        for entry in source.infolist():
            data = source.read(entry)
            target.writestr(entry, b"\x80\x02Pabc\n." if entry.filename.endswith("data.pkl") else data)
    message = _one_line_error(read_state_dict, path)
    assert f"{path}: refused: not a tensor-only checkpoint" in message and "nothing in it was executed" in message
    assert "weights_only" not in message


def test_a_torchscript_archive_is_refused_without_torch_advice(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    for loader in LOADERS:
        message = _one_line_error(loader, path)
        assert "TorchScript" in message and "weights_only" not in message


@pytest.mark.parametrize("kind", HOSTILE[:3] + HOSTILE[-2:])
def test_the_command_line_refuses_hostile_pickles_in_one_line(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.ckpt"
    _hostile(kind, path, marker)
    for argv in (["info", str(path)], ["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "ldm"]):
        assert main(argv) == 1
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and "refused" in err and "Traceback" not in err, err
        assert "weights_only" not in err + captured.out
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# --- 2. compressed entries in a torch zip ------------------------------------------------------------


def _recompress(source: Path, target: Path, method: int, only: str | None = None) -> None:
    """Rewrite a torch.save zip with its entries compressed (all, or only those containing ``only``)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for entry in original.infolist():
            compress = method if only is None or only in entry.filename else zipfile.ZIP_STORED
            copy.writestr(entry.filename, original.read(entry.filename), compress_type=compress)


def _incompressible_checkpoint(tiny) -> dict[str, torch.Tensor]:
    """A ControlNet file's tensors plus one of random bits: deflate makes that entry larger, the case
    where reading compressed bytes as weights succeeds silently."""
    _, controlnet = tiny
    tensors = _ldm(controlnet=controlnet)
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (64, 64), dtype=torch.int32, generator=generator)
    tensors["control_model.noise"] = bits.view(torch.float32).nan_to_num()
    return tensors


@pytest.mark.parametrize("only", [None, "data/"])
def test_deflated_torch_zip_entries_are_read_exactly(tiny, tmp_path, only):
    tensors = _incompressible_checkpoint(tiny)
    torch.save(tensors, tmp_path / "stored.pth")
    _recompress(tmp_path / "stored.pth", tmp_path / "deflated.pth", zipfile.ZIP_DEFLATED, only)
    with zipfile.ZipFile(tmp_path / "deflated.pth") as archive:
        assert any(e.compress_type == zipfile.ZIP_DEFLATED for e in archive.infolist())
    assert _same_tensors(read_state_dict(tmp_path / "deflated.pth")[0], tensors)
    del tensors["control_model.noise"]
    torch.save(tensors, tmp_path / "control.pth")
    _recompress(tmp_path / "control.pth", tmp_path / "control-deflated.pth", zipfile.ZIP_DEFLATED, only)
    _, controlnet = tiny
    assert _same_tensors(load_controlnet(tmp_path / "control-deflated.pth").state_dict(), controlnet.state_dict())


def test_a_zip_rewritten_with_stored_entries_still_loads(tiny, tmp_path):
    tensors = _incompressible_checkpoint(tiny)
    torch.save(tensors, tmp_path / "original.pth")
    _recompress(tmp_path / "original.pth", tmp_path / "restored.pth", zipfile.ZIP_STORED)  # unaligned entries
    assert _same_tensors(read_state_dict(tmp_path / "restored.pth")[0], tensors)


@pytest.mark.parametrize(("method", "named"), [(zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "LZMA")])
def test_zip_entries_compressed_otherwise_are_refused_by_name(tiny, tmp_path, method, named):
    torch.save(_incompressible_checkpoint(tiny), tmp_path / "stored.pth")
    _recompress(tmp_path / "stored.pth", tmp_path / "compressed.pth", method)
    for loader in LOADERS:
        message = _one_line_error(loader, tmp_path / "compressed.pth")
        assert f"compressed with {named}" in message and "stored or deflated" in message


# --- 3. presets recognised from shapes ----------------------------------------------------------------


def _resave_as_pth(source: Path, target: Path) -> Path:
    tensors, _metadata = read_state_dict(source)
    torch.save(tensors, target)  # a .pth has no metadata: the config must come from the shapes
    return target


needs_shipped = pytest.mark.skipif(bool(shipped.missing()), reason="the shipped weights are not installed")


@needs_shipped
def test_the_shipped_base_resaved_as_pth_is_recognised_and_identical(tmp_path):
    original = load_base(shipped.base_path())
    resaved = load_base(_resave_as_pth(shipped.base_path(), tmp_path / "shapes.pth"))
    assert resaved.config.name == "shapes" and resaved.config.native_resolution == 128
    # the whole config, the VAE's latent scale (which no weight holds) included: the preset's is the file's
    assert resaved.config == original.config
    assert _same_tensors(resaved.state_dict(), original.state_dict())
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, original.config.unet.context_dim, generator=generator)
    timesteps = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(resaved.unet(latents, timesteps, context), original.unet(latents, timesteps, context))
        assert torch.equal(resaved.vae.decode(latents), original.vae.decode(latents))


@needs_shipped
def test_the_shipped_controlnet_resaved_as_pth_is_recognised_and_identical(tmp_path):
    original = load_controlnet(shipped.canny_path())
    resaved = load_controlnet(_resave_as_pth(shipped.canny_path(), tmp_path / "shapes-canny.pth"))
    assert resaved.config == original.config
    assert _same_tensors(resaved.state_dict(), original.state_dict())
    base = load_base(shipped.base_path())
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    hint = torch.rand(1, 3, 128, 128, generator=generator)
    context = torch.randn(1, 77, base.config.unet.context_dim, generator=generator)
    with torch.no_grad():
        ours = resaved(latents, resaved.encode_hint(hint), torch.tensor([300]), context)
        theirs = original(latents, original.encode_hint(hint), torch.tensor([300]), context)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    # and as a single diffusers-layout file, which has no config at all
    single = save_diffusers(tmp_path / "shapes-canny-diffusers.safetensors", controlnet=original)
    assert _same_tensors(load_controlnet(single).state_dict(), original.state_dict())


def test_the_tiny_preset_resaved_as_pth_is_recognised(tiny, tmp_path):
    model, controlnet = tiny
    save_ldm(tmp_path / "full.safetensors", model, controlnet)
    path = _resave_as_pth(tmp_path / "full.safetensors", tmp_path / "full.pth")
    assert load_base(path).config == model.config
    assert _same_tensors(load_base(path).state_dict(), model.state_dict())
    assert load_controlnet(path).config == controlnet.config


def _distinct_presets():
    seen = {}
    for config in PRESETS.values():
        seen.setdefault(config.unet, config)  # sd21-v shares sd21's UNet: detected as sd21, named by the caller
    return list(seen.values())


@pytest.mark.parametrize("config", _distinct_presets(), ids=lambda c: c.name)
def test_every_preset_is_detected_from_its_shapes(config):
    with torch.device("meta"):
        unet = UNet(config.unet).state_dict()
        control = ControlNet(config.controlnet()).state_dict()
    assert preset_from_shapes(unet, "unet") is config
    assert controlnet_config_from_shapes(control, "control.pth") == config.controlnet()


def test_presets_are_told_apart_by_what_detection_reads():
    signatures = [(c.unet.model_channels, c.unet.context_dim, c.unet.in_channels) for c in _distinct_presets()]
    assert len(set(signatures)) == len(signatures), "two presets look alike to preset_from_shapes: extend it"


# --- 4. converting into an existing diffusers folder ------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory):
    model, controlnet = tiny
    folder = tmp_path_factory.mktemp("models")
    return {
        "full": save_ldm(folder / "full.safetensors", model, controlnet),
        "base": save_ldm(folder / "base.safetensors", model),
        "control": save_ldm(folder / "control.safetensors", controlnet=controlnet),
    }


@pytest.mark.parametrize(("first", "second"), [("full", "base"), ("control", "base"), ("full", "control")])
def test_convert_overwrite_replaces_a_diffusers_folder_whole(tiny_files, tmp_path, capsys, first, second):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(["convert", str(tiny_files[first]), str(out), "--to", "diffusers"]) == 0
    (out / "stale.txt").write_text("from another model")
    (out / "vae").mkdir(exist_ok=True)
    (out / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"old weights under another name")
    assert main(["convert", str(tiny_files[second]), str(out), "--to", "diffusers"]) == 2  # no --overwrite
    assert (out / "stale.txt").exists()
    assert main(["convert", str(tiny_files[second]), str(out), "--to", "diffusers", "--overwrite"]) == 0
    assert main(["convert", str(tiny_files[second]), str(fresh), "--to", "diffusers"]) == 0
    assert _tree(out) == _tree(fresh)  # exactly the new model's files, nothing of the old one
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    capsys.readouterr()


def test_a_failure_midway_leaves_the_old_folder_intact(tiny, tmp_path, monkeypatch):
    model, controlnet = tiny
    out = save_diffusers(tmp_path / "out", model, controlnet)
    before = _tree(out)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(diffusers, "write_hf_tokenizer_files", fail)
    other, _ = random_tiny_models(seed=9)  # other weights: a partial write would show
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(out, other)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_files_and_folders_in_the_wrong_place_are_refused(tiny, tiny_files, tmp_path, capsys):
    _, controlnet = tiny
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"keep me")
    a_folder = tmp_path / "a-folder.safetensors"
    a_folder.mkdir()
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("keep me too")
    run = tmp_path / "run"  # a training run's folder: a config.json, but no diffusers model
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"task": "controlnet", "learning_rate": 1e-05}')
    (run / "checkpoints" / "state.pt").write_bytes(b"weeks of training")
    cases = [
        (tiny_files["full"], a_file, "diffusers", "an existing file; a diffusers model is written as a folder"),
        (tiny_files["control"], a_file, "diffusers", "an existing file; a diffusers model is written as a folder"),
        (tiny_files["control"], a_folder, "diffusers", "an existing folder; a .safetensors file is written there"),
        (tiny_files["full"], a_folder, "ldm", "an existing folder; a .safetensors file is written there"),
        (tiny_files["full"], documents, "diffusers", "holds no diffusers model"),
        (tiny_files["full"], run, "diffusers", "holds no diffusers model"),
        (tiny_files["full"], tiny_files["full"].parent, "diffusers", "the output would overwrite an input"),
    ]
    for source, target, layout, message in cases:
        assert main(["convert", str(source), str(target), "--to", layout, "--overwrite"]) in (1, 2)
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert a_file.read_bytes() == b"keep me" and a_folder.is_dir() and not any(a_folder.iterdir())
    assert (documents / "thesis.txt").read_text() == "keep me too"
    assert (run / "checkpoints" / "state.pt").read_bytes() == b"weeks of training" and tiny_files["full"].is_file()
    # an empty folder is fine to fill
    empty = tmp_path / "empty"
    empty.mkdir()
    save_diffusers(empty, controlnet=controlnet)
    assert (empty / "config.json").is_file()


# --- 5. permissions follow the umask -------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o002], ids=["umask-022", "umask-002"])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_everything_written_gets_the_umasks_permissions(tiny, tmp_path, umask):
    model, controlnet = tiny
    save_ldm(tmp_path / "ldm.safetensors", model, controlnet)
    save_diffusers(tmp_path / "pipeline", model, controlnet)
    save_diffusers(tmp_path / "control-folder", controlnet=controlnet)
    save_diffusers(tmp_path / "control.safetensors", controlnet=controlnet)
    save_diffusers(tmp_path / "pipeline", model)  # a replaced folder too
    with atomic_file(tmp_path / "text.txt", "w", encoding="utf-8") as handle:
        handle.write("text")
    with atomic_path(tmp_path / "other.safetensors") as temporary:
        save_file({"x": torch.zeros(1)}, str(temporary))
    with atomic_folder(tmp_path / "folder") as folder:
        (folder / "inside.txt").write_text("inside")
    cache = tmp_path / "cache" / "hashes.json"
    cached_file_sha256(tmp_path / "ldm.safetensors", cache)
    modes = _modes(tmp_path)
    assert "cache/hashes.json" in modes and "pipeline/unet/diffusion_pytorch_model.safetensors" in modes
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask
    }
    assert wrong == {}


# --- 6. NaN and infinite weights -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_values_are_found_in_every_float_type(dtype):
    finfo = torch.finfo(dtype)
    legitimate = torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 4, 1.0], dtype=dtype)
    assert not has_non_finite(legitimate)  # extremes and subnormals are numbers
    for bad in (float("nan"), float("inf"), float("-inf")):
        for position in (0, 77, 199):
            tensor = torch.zeros(10, 20, dtype=dtype)
            tensor.view(-1)[position] = bad
            assert has_non_finite(tensor)
            assert has_non_finite(tensor.t())  # not contiguous


def _poisoned_base(model: StableDiffusion) -> dict[str, torch.Tensor]:
    tensors = _ldm(model)
    tensors["model.diffusion_model.out.2.weight"].view(-1)[3] = float("nan")
    tensors["first_stage_model.decoder.conv_out.weight"].view(-1)[0] = float("inf")
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"][-1] = float("-inf")
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_base_model_with_nan_or_inf_is_refused(tiny, tmp_path, dtype, suffix):
    model, _ = tiny
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _poisoned_base(model).items()}
    path = tmp_path / f"damaged{suffix}"
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save(tensors, path)
    message = _one_line_error(load_base, path)
    assert message.startswith(f"{path}: 3 tensors hold NaN or infinite values (first: "), message
    assert message.endswith("); the file is damaged"), message


def test_the_first_damaged_key_is_the_files_first(tiny, tmp_path):
    model, _ = tiny
    tensors = _ldm(model)
    tensors["model.diffusion_model.out.2.weight"].view(-1)[3] = float("nan")
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    assert str(_one_line_error(load_base, path)) == (
        f"{path}: 1 tensors hold NaN or infinite values (first: model.diffusion_model.out.2.weight); "
        "the file is damaged"
    )


def test_a_controlnet_with_nan_is_refused_in_every_layout(tiny, tmp_path):
    model, controlnet = tiny
    poisoned = ControlNet(controlnet.config)
    poisoned.load_state_dict(controlnet.state_dict())
    with torch.no_grad():
        poisoned.zero_convs[0][0].weight.view(-1)[0] = float("nan")
        poisoned.middle_block_out[0].bias[1] = float("inf")
    ldm = save_ldm(tmp_path / "control.safetensors", controlnet=poisoned)
    assert "2 tensors" in _one_line_error(load_controlnet, ldm)
    assert "(first: control_model." in _one_line_error(load_controlnet, ldm)
    bare = tmp_path / "bare.pth"
    torch.save(poisoned.state_dict(), bare)
    assert "(first: zero_convs.0.0.weight)" in _one_line_error(load_controlnet, bare)
    full = tmp_path / "full.safetensors"
    save_file({**_ldm(model), **{"control_model." + k: v for k, v in poisoned.state_dict().items()}}, str(full))
    assert "2 tensors" in _one_line_error(load_controlnet, full)
    load_base(full)  # the base part is sound: it still loads
    single = save_diffusers(tmp_path / "single.safetensors", controlnet=poisoned)
    assert "2 tensors" in _one_line_error(load_controlnet, single)
    folder = save_diffusers(tmp_path / "folder", controlnet=poisoned)
    message = _one_line_error(load_controlnet, folder)
    assert "diffusion_pytorch_model.safetensors: 2 tensors hold NaN or infinite values" in message


def test_a_diffusers_pipeline_with_nan_is_refused(tiny, tmp_path):
    model, _ = tiny
    folder = save_diffusers(tmp_path / "pipeline", model)
    weights_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors, _ = read_state_dict(weights_file)
    tensors["decoder.conv_out.bias"][0] = float("nan")
    save_file(tensors, str(weights_file))
    message = _one_line_error(load_base, folder)
    assert "vae/diffusion_pytorch_model.safetensors: 1 tensors hold NaN" in message


def test_legitimate_files_still_load(tiny, tmp_path):
    model, controlnet = tiny
    tensors = _ldm(model, controlnet)
    tensors["model.diffusion_model.out.2.weight"].view(-1)[0] = torch.finfo(torch.float16).max
    tensors["model.diffusion_model.out.2.weight"].view(-1)[1] = torch.finfo(torch.float16).tiny / 8
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
    load_base(path)
    load_controlnet(path)
    if not shipped.missing():  # the shipped weights are float16
        load_base(shipped.base_path())
        load_controlnet(shipped.canny_path())


# --- 7. junk given as a model file --------------------------------------------------------------------


def _zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _torch_zip_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3)}, buffer)
    return buffer.getvalue()


JUNK = {
    "text": b"edges of a bird\nsecond line\n",
    "text starting with e (KeyError: 101)": b"e",
    "random bytes": np.random.default_rng(0).bytes(4096),
    "zeros": bytes(64),
    "an empty zip": _zip_of({}),
    "a zip with no data.pkl": _zip_of({"archive/version": b"3\n", "archive/data/0": b"x" * 16}),
    "a truncated torch zip": _torch_zip_bytes()[:3000],
    "a torch zip missing its tail": _torch_zip_bytes()[:-30],
    "JSON": json.dumps({"model.diffusion_model.x": [1, 2]}).encode(),
    "a safetensors header whose data runs past the end": _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, bytes(8)
    ),
    "a safetensors header whose shape and size disagree": _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "a safetensors header with a huge length": struct.pack("<Q", 2**62) + b"{}",
    "a safetensors file with no tensors": _safetensors_bytes({}),
    "a pickled int": pickle.dumps(5, protocol=2),
    "a pickled list": pickle.dumps([1, 2], protocol=2),
}


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".pt", ".bin", ".safetensors"])
@pytest.mark.parametrize("junk", list(JUNK))
def test_junk_gives_a_one_line_checkpoint_error(tmp_path, junk, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(JUNK[junk])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing but our error either: no warning from torch's loader
        for loader in LOADERS:
            message = _one_line_error(loader, path)
            assert any(
                word in message
                for word in ("expected", "not a", "holds no", "refused", "damaged", "without data.pkl", "cannot tell")
            ), message


@pytest.mark.parametrize("junk", ["text starting with e (KeyError: 101)", "an empty zip", "a truncated torch zip"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_the_command_line_says_one_line_about_junk(tmp_path, capsys, junk, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(JUNK[junk])
    for argv in (["info", str(path)], ["convert", str(path), str(tmp_path / "out"), "--to", "diffusers"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and path.name in err, err
    assert not (tmp_path / "out").exists()


def _safetensors_with(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path = tmp_path / "lying.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_headers_that_lie_about_shapes_dtypes_or_config_are_refused(tiny, tmp_path):
    model, controlnet = tiny
    one_d = torch.zeros(4)
    cases = [
        ({"control_model.input_hint_block.0.weight": one_d, "control_model.input_blocks.0.0.weight": one_d}, None),
        ({"input_hint_block.0.weight": one_d, "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, None),
        ({"model.diffusion_model.input_blocks.0.0.weight": one_d}, None),
        ({"controlnet_cond_embedding.conv_in.weight": one_d}, None),
        ({"control_model.input_hint_block.0.weight": torch.zeros(0, 3, 3, 3)}, None),
        ({k: v.to(torch.int32) if "zero_convs" in k else v for k, v in _ldm(controlnet=controlnet).items()}, None),
        (_ldm(model), {"controlnet.config": "5"}),
        (_ldm(model), {"controlnet.config": "[1]"}),
        (_ldm(model), {"controlnet.config": json.dumps({"type": "ModelConfig", "name": "x", "unet": 5})}),
        (_ldm(controlnet=controlnet), {"controlnet.control_config": json.dumps({"type": "ControlNetConfig"})}),
    ]
    for tensors, metadata in cases:
        path = _safetensors_with(tmp_path, tensors, metadata)
        for loader in LOADERS:
            try:
                loader(path)
            except CheckpointError as error:
                assert "\n" not in str(error) and path.name in str(error), error
    path = _safetensors_with(tmp_path, cases[5][0])
    assert "not floating-point: zero_convs.0.0.weight (torch.int32)" in _one_line_error(load_controlnet, path)

"""Every command against user mistakes (issue 16): missing files, folders given as files, junk
files as models or images, outputs that cannot be written (a parent that is a file, a disk that
fills up), bad numbers (NaN, infinities, negative, huge) and bad devices. Each must end with one
line ``controlnet COMMAND: error: ...``, a non-zero exit status, no traceback, and nothing lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet.cli import main
from controlnet.datasets.synthetic import write_dataset
from controlnet.formats.ldm import save_ldm
from controlnet.models.tiny import random_tiny_models


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the real ~/.cache (model hashes)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny model files, a tiny dataset, an image, and the bad inputs the commands must survive."""
    folder = tmp_path_factory.mktemp("inputs")
    model, controlnet = random_tiny_models(seed=0)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    Image.fromarray(pixels).save(folder / "square.png")
    Image.fromarray(np.zeros((16, 128, 3), np.uint8)).save(folder / "wide.png")  # 8:1, beyond 4:1
    write_dataset(folder / "scenes", "scenes", 4, size=64, seed=0)
    (folder / "junk.ckpt").write_text("a text file, not a checkpoint\n")  # `KeyError: 101` once
    (folder / "junk.png").write_text("a text file, not an image\n")
    (folder / "file").write_text("a regular file")
    (folder / "empty-folder").mkdir()
    return {
        "base": save_ldm(folder / "base.safetensors", model=model),
        "control": save_ldm(folder / "control.safetensors", controlnet=controlnet),
        "data": folder / "scenes",
        "image": folder / "square.png",
        "wide": folder / "wide.png",
        "junk": folder / "junk.ckpt",
        "junk_image": folder / "junk.png",
        "file": folder / "file",
        "folder": folder / "empty-folder",
        "missing": folder / "absent.safetensors",
        # Its parent is a regular file: unwritable even for root (tests may run as root, where a
        # read-only folder stops nothing).
        "under_file": folder / "file" / "out",
    }


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``controlnet ARGV`` in this process: (exit status, stdout, stderr). An exception escaping
    main() is a traceback the user would have seen: it fails the test as it is."""
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(command: str, status: int, out: str, err: str, code: int | None, message: str) -> None:
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"controlnet {command}"), errors[0]
    assert message in errors[0], errors[0]
    assert status != 0 and (code is None or status == code), (status, errors[0])
    assert "Traceback" not in out + err


GENERATE = ["generate", "--prompt", "p", "--seed", "1", "--steps", "2", "--resolution", "64", "--out", "{out}"]
WITH_MODELS = ["--base", "{base}", "--controlnet", "{control}", "--image", "{image}"]
EVAL = ["eval", "--data", "{data}", "--out", "{out}", "--count", "1", "--images-per-condition", "1", "--steps", "1"]
EVAL_MODELS = ["--base", "{base}", "--controlnet", "{control}", "--resolution", "64"]
TRAIN = ["train", "--data", "{data}", "--base", "{base}", "--out", "{out}", "--max-steps", "1", "--batch-size", "1"]

# (arguments, exit status (None: any non-zero), a part of the message)
CASES = [
    # demo: bad devices, outputs and numbers are refused before the model loads
    (["demo", "--device", "meta", "--out", "{out}"], 2, "--device meta: this runs on cpu, cuda, cuda:N, mps only"),
    (["demo", "--device", "bogus", "--out", "{out}"], 2, "--device 'bogus' is not a device"),
    (["demo", "--device", "cuda:99", "--out", "{out}"], 2, "no such CUDA device here"),
    (["demo", "--out", "{under_file}"], 1, "is a file, not a folder"),
    (["demo", "--out", "{file}"], 1, "is a file, not a folder"),
    (["demo", "--steps", "0", "--out", "{out}"], 2, "--steps must be between 1 and 100"),
    (["demo", "--steps", "100000", "--out", "{out}"], 2, "--steps must be between 1 and 100"),
    (["demo", "--steps", "nan", "--out", "{out}"], 2, "invalid int value"),
    (["demo", "--prompt", "x" * 6000, "--out", "{out}"], 2, "the limit is 5,000"),
    # generate
    ([*GENERATE, *WITH_MODELS, "--eta", "1.5"], 2, "eta must be between 0 and 1"),
    ([*GENERATE, *WITH_MODELS, "--eta", "-0.1"], 2, "eta must be between 0 and 1"),
    ([*GENERATE, *WITH_MODELS, "--guidance", "nan"], 2, "guidance scale must be a number, got nan"),
    ([*GENERATE, *WITH_MODELS, "--guidance", "inf"], 2, "guidance scale must be a number, got inf"),
    ([*GENERATE, *WITH_MODELS, "--strength", "inf"], 2, "strength must be a number, got inf"),
    ([*GENERATE, *WITH_MODELS, "--start", "nan"], 2, "start must be a number, got nan"),
    ([*GENERATE, *WITH_MODELS, "--control", "image={image},strength=nan"], 2, "strength must be a number, got nan"),
    (
        [*GENERATE, *WITH_MODELS, "--init-image", "{image}", "--denoising-strength", "nan"],
        2,
        "denoising strength must be a number, got nan",
    ),
    (
        [*GENERATE, *WITH_MODELS, "--init-image", "{image}", "--denoising-strength", "0"],
        2,
        "denoising strength must be between 0.01 and 1, got 0.0",
    ),
    ([*GENERATE, *WITH_MODELS, "--mask", "{image}"], 2, "--mask needs --init-image"),
    ([*GENERATE, *WITH_MODELS, "--seed", "-2"], 2, "seed must be between -1 and 2147483647"),
    ([*GENERATE, *WITH_MODELS, "--num-samples", "1000000"], 2, "images must be between 1 and 12, got 1000000"),
    ([*GENERATE, *WITH_MODELS, "--resolution", "100000"], 2, "resolution must be between 64 and 2048, got 100000"),
    ([*GENERATE, *WITH_MODELS, "--device", "meta"], 2, "--device meta: this runs on cpu, cuda, cuda:N, mps only"),
    ([*GENERATE, *WITH_MODELS, "--device", "bogus"], 2, "--device 'bogus' is not a device"),
    ([*GENERATE, *WITH_MODELS, "--negative-prompt", "x" * 6000], 2, "--negative-prompt is 6,000 characters"),
    ([*GENERATE, *WITH_MODELS, "--added-prompt", "a\0b"], 2, "--added-prompt contains a NUL character"),
    ([*GENERATE, *WITH_MODELS, "--out", "{under_file}"], 1, "is a file, not a folder"),
    ([*GENERATE, *WITH_MODELS, "--out", "{file}"], 1, "is a file, not a folder"),
    ([*GENERATE, "--base", "{junk}", "--controlnet", "{control}", "--image", "{image}"], 1, "junk.ckpt"),
    ([*GENERATE, "--base", "{folder}", "--controlnet", "{control}", "--image", "{image}"], 1, "empty-folder"),
    ([*GENERATE, "--base", "{missing}", "--controlnet", "{control}", "--image", "{image}"], 1, "no such file"),
    ([*GENERATE, "--base", "{base}", "--controlnet", "{junk}", "--image", "{image}"], 1, "junk.ckpt"),
    ([*GENERATE, "--base", "{base}", "--controlnet", "{control}", "--image", "{folder}"], 1, "empty-folder"),
    ([*GENERATE, "--base", "{base}", "--controlnet", "{control}", "--image", "{junk_image}"], 1, "is not an image"),
    ([*GENERATE, "--base", "{base}", "--controlnet", "{control}", "--image", "{missing}"], 1, "cannot read"),
    ([*GENERATE, "--base", "{base}", "--controlnet", "{control}", "--image", "{wide}"], 1, "more than 4 times"),
    ([*GENERATE, *WITH_MODELS, "--init-image", "{junk_image}"], 1, "is not an image"),
    # annotate
    (["annotate", "canny", "{junk_image}", "{out}.png"], 1, "is not an image"),
    (["annotate", "canny", "{folder}", "{out}.png"], 1, "empty-folder"),
    (["annotate", "canny", "{missing}", "{out}.png"], 1, "absent.safetensors"),
    (["annotate", "canny", "{image}", "{under_file}.png"], 1, "cannot write"),
    (["annotate", "canny", "{image}", "{out}.png", "--param", "low_threshold=nan"], 2, "low_threshold"),
    (["annotate", "canny", "{image}", "{out}.png", "--param", "high_threshold=inf"], 2, "high_threshold"),
    (["annotate", "canny", "{image}", "{out}.png", "--resolution", "-64"], 2, "--resolution must be between"),
    (["annotate", "canny", "{image}", "{out}.png", "--resolution", "1000000"], 2, "--resolution must be between"),
    # convert
    (["convert", "{junk}", "{out}.safetensors", "--to", "ldm"], 1, "junk.ckpt"),
    (["convert", "{folder}", "{out}.safetensors", "--to", "ldm"], 1, "empty-folder"),
    (["convert", "{missing}", "{out}.safetensors", "--to", "ldm"], 1, "no such file"),
    (["convert", "{base}", "{under_file}.safetensors", "--to", "ldm"], 1, "is a file, not a folder"),
    (["convert", "{base}", "{under_file}", "--to", "diffusers"], 1, "is a file, not a folder"),
    # info
    (["info", "{junk}"], 1, "junk.ckpt"),
    (["info", "{folder}"], 1, "empty-folder"),
    (["info", "{missing}"], 1, "no such file"),
    (["info", "{file}"], 1, "unknown file type"),
    # transfer-control
    (["transfer-control", "{junk}", "{base}", "{base}", "{out}.safetensors"], 1, "junk.ckpt"),
    (["transfer-control", "{control}", "{folder}", "{base}", "{out}.safetensors"], 1, "empty-folder"),
    (["transfer-control", "{control}", "{base}", "{missing}", "{out}.safetensors"], 1, "no such file"),
    (["transfer-control", "{control}", "{base}", "{base}", "{under_file}.safetensors"], 1, "is a file, not"),
    # data
    (["data", "scenes", "--out", "{under_file}", "--count", "2"], 1, "cannot write"),
    (["data", "scenes", "--out", "{file}", "--count", "2"], 2, "exists and is not a folder"),
    (["data", "scenes", "--out", "{out}", "--count", "0"], 2, "--count must be between 1"),
    (["data", "scenes", "--out", "{out}", "--count", "nan"], 2, "invalid int value"),
    (["data", "scenes", "--out", "{out}", "--count", "2", "--size", "100000"], 2, "--size"),
    (["data", "scenes", "--out", "{out}", "--count", "2", "--seed", "-1"], 2, "--seed must be between 0"),
    # train: every option is checked before a model or the data is read
    ([*TRAIN, "--resolution", "100000"], 2, "between 64 and 2048 (the largest size controlnet generate takes)"),
    ([*TRAIN, "--resolution", "60"], 2, "--resolution must be a multiple of 64"),
    ([*TRAIN, "--resolution", "72"], 2, "--resolution must be a multiple of 64 (validation generates at it)"),
    ([*TRAIN, "--task", "vae", "--model-config", "tiny", "--resolution", "60"], 2, "must be a multiple of 8"),
    ([*TRAIN, "--device", "cuda:99"], 2, "no such CUDA device here"),
    ([*TRAIN, "--device", "meta"], 2, "--device meta: this runs on cpu, cuda, cuda:N only"),
    ([*TRAIN, "--device", "bogus"], 2, "--device 'bogus' is not a device"),
    ([*TRAIN, "--validation-count", "0"], 2, "--validation-count must be at least 1, got 0"),
    ([*TRAIN, "--validation-steps", "0"], 2, "--validation-steps must be between 1 and 100"),
    ([*TRAIN, "--learning-rate", "inf"], 2, "--learning-rate must be a finite number in (0, 1], got inf"),
    ([*TRAIN, "--learning-rate", "nan"], 2, "--learning-rate must be a finite number"),
    ([*TRAIN, "--learning-rate=-1e-5"], 2, "--learning-rate must be a finite number"),
    ([*TRAIN, "--unlock-decoder", "--decoder-learning-rate", "nan"], 2, "--decoder-learning-rate must be"),
    ([*TRAIN, "--decoder-learning-rate", "1e-6"], 2, "applies with --unlock-decoder only"),
    ([*TRAIN, "--max-grad-norm", "-1"], 2, "--max-grad-norm must be a finite number >= 0, got -1.0"),
    ([*TRAIN, "--max-grad-norm", "nan"], 2, "--max-grad-norm must be a finite number"),
    ([*TRAIN, "--ema-decay", "1"], 2, "--ema-decay must be a finite number in (0, 1)"),
    ([*TRAIN, "--ema-decay", "nan"], 2, "--ema-decay must be a finite number"),
    ([*TRAIN, "--proportion-empty-prompts", "nan"], 2, "--proportion-empty-prompts must be"),
    ([*TRAIN, "--kl-weight", "inf"], 2, "--kl-weight must be a finite number >= 0"),
    ([*TRAIN, "--gradient-loss-weight", "-1"], 2, "--gradient-loss-weight must be a finite number >= 0"),
    ([*TRAIN, "--max-bad-fraction", "2"], 2, "--max-bad-fraction must be a finite number in [0, 1]"),
    ([*TRAIN, "--log-every", "0"], 2, "--log-every must be at least 1"),
    ([*TRAIN, "--batch-size", "-1"], 2, "--batch-size must be at least 1"),
    ([*TRAIN, "--seed", "-1"], 2, "--seed must be at least 0"),
    ([*TRAIN, "--lr-warmup-steps", "-1"], 2, "--lr-warmup-steps must be at least 0"),
    ([*TRAIN, "--out", "{under_file}"], 1, "is a file, not a folder"),
    ([*TRAIN, "--out", "{file}"], 1, "is a file, not a folder"),
    (["train", "--data", "{missing}", "--base", "{base}", "--out", "{out}"], 2, "no such file or folder"),
    (["train", "--data", "{file}", "--base", "{base}", "--out", "{out}"], 1, "not a folder"),
    (["train", "--data", "{folder}", "--base", "{base}", "--out", "{out}"], 1, "no training data found"),
    (["train", "--data", "{data}", "--base", "{junk}", "--out", "{out}"], 1, "junk.ckpt"),
    (["train", "--data", "{data}", "--base", "{base}", "--controlnet", "{junk}", "--out", "{out}"], 1, "junk.ckpt"),
    ([*TRAIN, "--resume", "{folder}"], 1, "state.pt is missing"),
    ([*TRAIN, "--resume", "{missing}"], 1, "no such checkpoint folder"),
    # add-control
    (["add-control", "{junk}", "{out}.safetensors"], 1, "junk.ckpt"),
    (["add-control", "{folder}", "{out}.safetensors"], 1, "empty-folder"),
    (["add-control", "{missing}", "{out}.safetensors"], 1, "no such file"),
    (["add-control", "{base}", "{under_file}.safetensors"], 1, "is a file, not a folder"),
    # eval: the options are checked before the model loads, so NaN never reaches results.json
    ([*EVAL, *EVAL_MODELS, "--guidance", "nan"], 2, "guidance scale must be a number, got nan"),
    ([*EVAL, *EVAL_MODELS, "--guidance", "inf"], 2, "guidance scale must be a number, got inf"),
    ([*EVAL, *EVAL_MODELS, "--resolution", "100"], 2, "resolution must be a multiple of 64"),
    ([*EVAL, *EVAL_MODELS, "--seed", "-1"], 2, "seed must be between 0"),
    ([*EVAL, *EVAL_MODELS, "--steps", "100000"], 2, "steps must be between 1 and 100"),
    ([*EVAL, *EVAL_MODELS, "--images-per-condition", "1000"], 2, "images must be between 1 and 12, got 1000"),
    ([*EVAL, *EVAL_MODELS, "--low-threshold", "0"], 2, "canny parameter 'low_threshold' must be in [1, 255], got 0"),
    ([*EVAL, *EVAL_MODELS, "--sampler", "bogus"], 2, "sampler must be one of ddim"),
    ([*EVAL, *EVAL_MODELS, "--no-control"], 2, "contradicts --controlnet"),
    ([*EVAL, *EVAL_MODELS, "--out", "{under_file}"], 1, "is a file, not a folder"),
    ([*EVAL, "--base", "{junk}", "--controlnet", "{control}"], 1, "junk.ckpt"),
    ([*EVAL, "--base", "{base}", "--controlnet", "{missing}"], 2, "no such file or folder"),
    (["eval", "--data", "{file}", "--out", "{out}", *EVAL_MODELS], 1, "not a folder"),
    (["eval", "--data", "{folder}", "--out", "{out}", *EVAL_MODELS], 1, "no training data found"),
    ([*EVAL, "--ground-truth", "--no-control"], 2, "--ground-truth scores the data's own images"),
    # train-estimator
    (["train-estimator", "--task", "depth", "--data", "{missing}", "--out", "{out}"], 2, "no such folder"),
    (["train-estimator", "--task", "depth", "--data", "{folder}", "--out", "{out}"], 1, "no training data found"),
    (["train-estimator", "--task", "depth", "--data", "{data}", "--out", "{out}"], 1, "not a 'controlnet data world'"),
    (["train-estimator", "--task", "depth", "--data", "{data}", "--out", "{under_file}"], 1, "is a file, not a"),
    (["train-estimator", "--task", "depth", "--data", "{data}", "--out", "{out}", "--steps", "-1"], 2, "--steps must"),
    (["train-estimator", "--task", "normal", "--data", "{data}", "--out", "{out}"], 2, "invalid choice: 'normal'"),
    # serve: only the checks that fail before serving
    (["serve", "--port", "0"], 2, "--port must be between 1 and 65535"),
    (["serve", "--max-upload-mb", "nan"], 2, "--max-upload-mb must be between"),
    (["serve", "--max-pixels", "-1"], 2, "--max-pixels must be between"),
    (["serve", "--auth", "nocolon"], 2, "--auth must be USER:PASS"),
    (["serve", "--models", "{missing}"], 2, "no such folder"),
    (["serve", "--base", "{missing}"], 2, "no such file or folder"),
    (["serve", "--device", "meta"], 2, "--device meta: this runs on cpu, cuda, cuda:N, mps only"),
    (["serve", "--device", "cuda:7"], 2, "no such CUDA device here"),
    (["serve", "--keep-minutes", "nan"], 2, "--keep-minutes must be between"),
    (["serve", "--max-stored-mb", "0"], 2, "--max-stored-mb must be between"),
]


def _case_id(argv: list[str]) -> str:
    """The command and what differs from its usual arguments: 'train --resolution 100000'."""
    for prefix in ([*GENERATE, *WITH_MODELS], GENERATE, [*EVAL, *EVAL_MODELS], EVAL, TRAIN):
        if argv[: len(prefix)] == prefix:
            return " ".join([argv[0], *argv[len(prefix) :]])[:70]
    return " ".join(argv)[:70]


@pytest.mark.parametrize(("argv", "code", "message"), CASES, ids=[_case_id(case[0]) for case in CASES])
def test_every_command_refuses_a_mistake_in_one_line(files, tmp_path, capsys, argv, code, message):
    paths = {name: str(path) for name, path in files.items()}
    status, out, err = run([a.format(out=tmp_path / "out", **paths) for a in argv], capsys)
    assert_one_line_error(argv[0], status, out, err, code, message)
    assert not (tmp_path / "out.safetensors").exists()  # nothing half-written where the output was to go


# -- a disk that fills up while results are written ----------------------------------------------


@pytest.fixture
def disk_full(monkeypatch):
    """Every write that syncs its file (all the atomic writers) fails as on a full disk."""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a failed write left behind (the atomic writers' hidden names)."""
    return sorted(p.name for p in folder.rglob(".*"))


def test_generate_on_a_full_disk_leaves_no_half_file_and_keeps_earlier_results(files, tmp_path, capsys, disk_full):
    out = tmp_path / "out"
    out.mkdir()
    (out / "1.png").write_bytes(b"an earlier result")
    argv = [a.format(out=out, **{k: str(v) for k, v in files.items()}) for a in [*GENERATE, *WITH_MODELS]]
    status, stdout, err = run(argv, capsys)
    assert_one_line_error("generate", status, stdout, err, 1, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["1.png"]  # no claim, no temporary file, no half PNG
    assert (out / "1.png").read_bytes() == b"an earlier result"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 24 KB file system (tmpfs), so that writes themselves fail as the disk fills; skipped
    where mounting is not allowed (not root, or no tmpfs)."""
    import subprocess

    folder = tmp_path / "tiny-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_generate_on_a_really_full_disk_leaves_no_half_file_and_keeps_earlier_results(files, capsys, tiny_disk):
    earlier = tiny_disk / "1.png"
    earlier.write_bytes(b"an earlier result" * 500)  # 8.5 KB of the 24
    paths = {k: str(v) for k, v in files.items()}
    argv = [a.format(out=tiny_disk, **paths) for a in [*GENERATE, *WITH_MODELS, "--num-samples", "4"]]
    status, stdout, err = run(argv, capsys)
    assert_one_line_error("generate", status, stdout, err, 1, "No space left on device")
    assert earlier.read_bytes() == b"an earlier result" * 500
    assert _leftovers(tiny_disk) == []
    for png in tiny_disk.glob("*.png"):  # what was written before the disk filled is whole
        if png != earlier:
            assert png.read_bytes().startswith(b"\x89PNG") and png.read_bytes().endswith(b"IEND\xaeB`\x82")


def test_annotate_on_a_full_disk_keeps_the_file_it_was_to_replace(files, tmp_path, capsys, disk_full):
    target = tmp_path / "edges.png"
    target.write_bytes(b"an earlier result")
    status, out, err = run(["annotate", "canny", str(files["image"]), str(target), "--overwrite"], capsys)
    assert_one_line_error("annotate", status, out, err, 1, "No space left on device")
    assert target.read_bytes() == b"an earlier result" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_convert_and_add_control_on_a_full_disk_write_nothing(files, tmp_path, capsys, disk_full, layout):
    output = tmp_path / ("out.safetensors" if layout == "ldm" else "out")
    status, out, err = run(["convert", str(files["base"]), str(output), "--to", layout], capsys)
    assert_one_line_error("convert", status, out, err, 1, "No space left on device")
    status, out, err = run(["add-control", str(files["base"]), str(tmp_path / "control.safetensors")], capsys)
    assert_one_line_error("add-control", status, out, err, 1, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []


def test_data_on_a_full_disk_leaves_no_listing(tmp_path, capsys, disk_full):
    out = tmp_path / "scenes"
    status, stdout, err = run(["data", "scenes", "--out", str(out), "--count", "2"], capsys)
    assert_one_line_error("data", status, stdout, err, 1, "No space left on device")
    assert not (out / "prompt.json").exists() and _leftovers(out) == []  # not a dataset: written again next time


def test_eval_on_a_full_disk_keeps_the_earlier_results(files, tmp_path, capsys, disk_full):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier results\n")
    argv = [a.format(out=out, **{k: str(v) for k, v in files.items()}) for a in [*EVAL, *EVAL_MODELS]]
    status, stdout, err = run(argv, capsys)
    assert_one_line_error("eval", status, stdout, err, 1, "No space left on device")
    assert (out / "results.json").read_text() == "earlier results\n" and _leftovers(out) == []


def test_demo_on_a_full_disk_keeps_the_earlier_images(tmp_path, capsys, disk_full):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "scene-1.png").write_bytes(b"an earlier result")
    status, stdout, err = run(["demo", "--out", str(out), "--steps", "1", "--device", "cpu"], capsys)
    assert_one_line_error("demo", status, stdout, err, 1, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["scene-1.png"]
    assert (out / "scene-1.png").read_bytes() == b"an earlier result"


def test_eval_stops_on_nan_images_without_writing_results(files, tmp_path, capsys, monkeypatch):
    from controlnet.pipeline import Pipeline
    from controlnet.runtime import NonFiniteError

    def overflow(self, *args, **kwargs):
        raise NonFiniteError("the latents after sampling (UNet and ControlNets in float16) hold NaN or infinite values")

    monkeypatch.setattr(Pipeline, "generate", overflow)
    out = tmp_path / "out"
    argv = [a.format(out=out, **{k: str(v) for k, v in files.items()}) for a in [*EVAL, *EVAL_MODELS]]
    status, stdout, err = run(argv, capsys)
    assert_one_line_error("eval", status, stdout, err, 1, "hold NaN or infinite values")
    assert not (out / "results.json").exists() and not (out / "grid.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--out", "{locked}/demo", "--steps", "1"],
        [*GENERATE, *WITH_MODELS],
        [*EVAL, *EVAL_MODELS],
        [*TRAIN],
        ["convert", "{base}", "{locked}/out.safetensors", "--to", "ldm"],
        ["add-control", "{base}", "{locked}/control.safetensors"],
        ["data", "scenes", "--out", "{locked}/scenes", "--count", "2"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_read_only_output_folder_is_a_one_line_error(files, tmp_path, capsys, argv):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()
    except PermissionError:
        pass
    else:  # root (with CAP_DAC_OVERRIDE) writes anyway: the parent-is-a-file cases stand in
        locked.chmod(0o755)
        pytest.skip("read-only folders do not stop this user's writes")
    try:
        paths = {k: str(v) for k, v in files.items()}
        status, out, err = run([a.format(out=locked / "out", locked=locked, **paths) for a in argv], capsys)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(argv[0], status, out, err, 1, "Permission denied")
    assert list(locked.iterdir()) == []

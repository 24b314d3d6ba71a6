"""The names the README shows keep working, at their new places and at the earlier ones (thin
re-exports), and the README's Python examples run as written (on the tiny configuration)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("controlnet.images", "controlnet.imaging.images", ["load_image", "save_png", "HWC3", "ImageError"]),
        ("controlnet.controlnet", "controlnet.models.controlnet", ["ControlNet", "scale_residuals"]),
        ("controlnet.model", "controlnet.models.stable_diffusion", ["StableDiffusion", "build_empty"]),
        ("controlnet.checkpoints", "controlnet.loading", ["load_base", "load_controlnet"]),
        ("controlnet.checkpoints", "controlnet.formats.diffusers", ["save_diffusers"]),
    ],
)
def test_earlier_import_paths_give_the_same_objects(old, new, names):
    import importlib

    before, after = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(before, name) is getattr(after, name), name


def test_the_readmes_tiny_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tiny = next(block for block in blocks if "TINY" in block)
    namespace: dict = {}
    exec(compile(tiny, "README.md", "exec"), namespace)
    assert namespace["controlnet"].config.unet == namespace["model"].config.unet


def test_the_readmes_first_python_example_runs_on_the_shipped_model():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    first = next(block for block in blocks if "Pipeline.default()" in block)
    namespace: dict = {}
    exec(compile(first, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert len(result.images) == 2 and result.images[0].shape == (128, 128, 3)
    assert result.settings["seed"] == 7 and result.seeds == [7, 8]

"""T2I-Adapter units in `controlnet serve`: the JSON API (a unit's ``adapter`` index, the models
listing), one-line 400s, adapters found in a models folder, the page's per-unit model menu, and
``serve --adapter``. (A module of its own: one web UI per process, and test_server.py keeps its
shipped-model page open for the whole module.)"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from controlnet import shipped
from controlnet.formats.ldm import save_ldm
from controlnet.hashing import file_sha256
from controlnet.models.tiny import random_tiny_models
from controlnet.serve.service import Limits, ModelEntry, ModelRegistry, RequestError, Service, discover_models

from .helpers import write_tiny_adapter

pytest.importorskip("gradio")
from fastapi.testclient import TestClient

from controlnet.serve.app import build_app

EDGES = shipped.examples()[0].control


def _edges() -> str:
    return base64.b64encode(EDGES.read_bytes()).decode()


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict:
    """A tiny base with a ControlNet and a T2I-Adapter (TencentARC's layout), and an adapter of
    another family."""
    folder = tmp_path_factory.mktemp("adapter-models")
    model, controlnet = random_tiny_models(seed=1)
    return {
        "base": save_ldm(folder / "tiny.safetensors", model),
        "control": save_ldm(folder / "tiny-control.safetensors", controlnet=controlnet),
        "adapter": write_tiny_adapter(folder / "t2iadapter_tiny.pth", seed=3),
        "wide": write_tiny_adapter(tmp_path_factory.mktemp("x") / "t2iadapter_wide.pth", seed=4, channels=(64, 128)),
    }


@pytest.fixture(scope="module")
def adapter_client(adapter_files) -> Iterator[TestClient]:
    files = adapter_files
    entry = ModelEntry("tiny", files["base"], [files["control"]], adapters=[files["adapter"]])
    with TestClient(build_app(Service(ModelRegistry([entry]), Limits()))) as client:
        yield client


def _tiny_unit(**fields) -> dict:
    return {"image": _edges(), "annotator": "none"} | fields


def _generate(client: TestClient, *units: dict, **fields) -> dict:
    body = {"prompt": "a ring", "model": "tiny", "steps": 2, "seed": 4, "units": list(units)} | fields
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_api_runs_adapter_units_and_names_their_file(adapter_client, adapter_files):
    models = adapter_client.get("/api/models").json()["control_models"]
    assert models == {
        "tiny": {
            "controlnets": ["tiny-control.safetensors"],
            "adapters": ["t2iadapter_tiny.pth"],
            "controlnet_names": [None],  # not shipped files: chosen by index only
            "adapter_names": [None],
        }
    }
    result = _generate(adapter_client, _tiny_unit(adapter=0))
    off = _generate(adapter_client, _tiny_unit(adapter=0, strength=0))

    def pixels(answer: dict) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB")).astype(int)

    assert np.abs(pixels(result) - pixels(off)).max() > 8  # the adapter acted
    [control] = result["settings"]["controls"]
    assert control["adapter"] == 0 and "controlnet" not in control
    sha = file_sha256(adapter_files["adapter"])
    assert result["settings"]["models"]["adapters"] == [{"name": "t2iadapter_tiny.pth", "sha256": sha}]
    text = Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).text["parameters"]
    assert f'ControlNet 0: "Module: none, Model: t2iadapter_tiny [{sha[:10]}],' in text

    # With a ControlNet unit and guess mode: the ControlNet unit in control mode, the adapter's balanced.
    mixed = _generate(adapter_client, _tiny_unit(), _tiny_unit(adapter=0, end=0.5), guess_mode=True)
    first, second = mixed["settings"]["controls"]
    assert (first["controlnet"], first["mode"]) == (0, "control") and "adapter" not in first
    assert (second["adapter"], second["mode"]) == (0, "balanced") and "controlnet" not in second


@pytest.mark.parametrize(
    ("units", "fields", "message"),
    [
        ([{"adapter": 1}], {}, "control unit 0: T2I-Adapter 1 does not exist (the model has 1)"),
        ([{"adapter": 0, "controlnet": 0}], {}, "one ControlNet (controlnet) or one T2I-Adapter (adapter), not both"),
        ([{"adapter": 0, "mode": "control"}], {}, "a T2I-Adapter unit takes control mode 'balanced' only"),
        ([{"adapter": 1.5}], {}, "control unit 0: T2I-Adapter index must be a whole number, got 1.5"),
        ([{"adapter": "first"}], {}, "control unit 0: adapter: no shipped T2I-Adapter is called 'first'"),
        ([{"adapter": -1}], {}, "T2I-Adapter index must be between 0 and 63, got -1"),
        ([{"adapter": 0}, {"adapter": 0}], {"guess_mode": True}, "every unit here uses a T2I-Adapter"),
    ],
)
def test_bad_adapter_units_are_one_line_400s(adapter_client, units, fields, message):
    body = {"prompt": "x", "model": "tiny", "steps": 1, "units": [_tiny_unit(**unit) for unit in units]} | fields
    response = adapter_client.post("/api/generate", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error


def test_a_models_folder_offers_the_adapters_that_fit(adapter_files, tmp_path):
    """Adapters found in --models DIR go with every base; one of another family is left out when
    the base loads, and the listing then says what a unit's index means."""
    for name in ("base", "control", "adapter", "wide"):
        (tmp_path / adapter_files[name].name).write_bytes(adapter_files[name].read_bytes())
    entries = discover_models(tmp_path, include_shipped=False)
    assert [e.name for e in entries] == ["tiny.safetensors"]
    assert [p.name for p in entries[0].adapters] == ["t2iadapter_tiny.pth", "t2iadapter_wide.pth"]
    registry = ModelRegistry(entries)
    pipe, records = registry.pipeline("tiny.safetensors")
    assert len(pipe.adapters) == 1 and [r["name"] for r in records["adapters"]] == ["t2iadapter_tiny.pth"]
    assert registry.control_models("tiny.safetensors")["adapters"] == ["t2iadapter_tiny.pth"]


def test_the_page_offers_adapters_in_each_units_model_menu(adapter_client, tmp_path):
    from controlnet.serve import ui

    menus = [c["props"] for c in adapter_client.get("/config").json()["components"]
             if str(c["props"].get("elem_id", "")).endswith("_model")]  # fmt: skip
    assert len(menus) == ui.UNITS
    expected = [
        ["ControlNet: tiny-control.safetensors", "controlnet:0"],
        ["T2I-Adapter: t2iadapter_tiny.pth", "adapter:0"],
    ]
    assert all(menu["choices"] == expected and menu["value"] == "controlnet:0" for menu in menus)
    # The menu's value becomes the unit's model.
    path = tmp_path / "edges.png"
    path.write_bytes(EDGES.read_bytes())
    values = dict.fromkeys(ui._slot_names(), False) | {"number0": 100.0, "number1": 200.0}
    unit = ui._unit(path, "canny", values, True, 512, Limits(), **ui.chosen_model("adapter:0"))
    assert (unit.adapter, unit.controlnet) == (0, None)
    assert ui.chosen_model(None) == {}
    with pytest.raises(RequestError, match="unknown unit model 'lora:0'"):
        ui.chosen_model("lora:0")


def test_serve_takes_adapters_for_its_base(adapter_files, capsys):
    from controlnet.cli import main

    assert main(["serve", "--adapter", str(adapter_files["adapter"])]) == 2
    assert "--adapter needs --base" in capsys.readouterr().err
    # An adapter that does not fit the base: the server loads its model before serving, so it does
    # not start, and says why in one line. (Another process: this one has its page open.)
    argv = ["serve", "--base", str(adapter_files["base"]), "--adapter", str(adapter_files["wide"]), "--port", "1"]
    done = subprocess.run([sys.executable, "-m", "controlnet", *argv], capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "t2iadapter_wide.pth: this T2I-Adapter's feature widths [64, 128] do not fit" in errors[0]

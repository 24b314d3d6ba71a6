"""The shipped ControlNets and T2I-Adapters chosen by name (shipped.py's registry): the resolver,
`controlnet generate` (--controlnet NAME, a unit's controlnet=NAME), `controlnet train`, the
Python API and the JSON API. Several names are tested on a registry of tiny random models in a
weights folder of the test's own (the package's folder is never written)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet import shipped
from controlnet.annotators import ANNOTATORS
from controlnet.cli import main
from controlnet.formats.ldm import save_ldm
from controlnet.imaging.images import load_image, read_png_text
from controlnet.models.tiny import circle_edges, random_tiny_models
from controlnet.pipeline import ControlUnit, Pipeline

from .helpers import write_tiny_adapter

FAST = ["--steps", "2", "--resolution", "64"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the real ~/.cache (the model hash cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    """A weights folder like the world model's: a tiny base, two ControlNets, a T2I-Adapter."""
    folder = tmp_path_factory.mktemp("weights")
    model, canny = random_tiny_models(seed=1)
    save_ldm(folder / "tiny.safetensors", model)
    save_ldm(folder / "tiny-canny.safetensors", controlnet=canny)
    save_ldm(folder / "tiny-depth.safetensors", controlnet=random_tiny_models(seed=2)[1])
    write_tiny_adapter(folder / "tiny-canny-adapter.pth", seed=3)
    return folder


@pytest.fixture
def tiny_registry(tiny_files, monkeypatch) -> Path:
    """The shipped registry replaced by the tiny models: canny and depth ControlNets, a canny adapter."""
    model = shipped.ShippedModel(
        "tiny (a test's registry)",
        "tiny.safetensors",
        (
            shipped.Control("canny", "tiny-canny.safetensors", "controlnet", "Canny edges, white on black", "canny"),
            shipped.Control("depth", "tiny-depth.safetensors", "controlnet", "inverse depth, near bright", None),
            shipped.Control("canny", "tiny-canny-adapter.pth", "adapter", "Canny edges, white on black", "canny"),
        ),
    )
    monkeypatch.setattr(shipped, "MODEL", model)
    monkeypatch.setattr(shipped, "weights_folder", lambda: tiny_files)
    return tiny_files


def _edges(folder: Path) -> Path:
    path = folder / "edges.png"
    Image.fromarray(circle_edges(64)).save(path)
    return path


def _record(path: Path) -> dict:
    return json.loads(read_png_text(path)["controlnet"])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- the registry and the resolver ------------------------------------------------------------


@pytest.mark.parametrize("model", [shipped.SHAPES, shipped.WORLD], ids=["shapes", "world"])
def test_each_registry_names_its_controls_once_per_kind_with_real_annotators(model):
    for kind in shipped.KINDS:
        names = [c.name for c in model.controls if c.kind == kind]
        assert len(names) == len(set(names)), names
    files = [c.file for c in model.controls]
    assert len(files) == len(set(files)) and model.base not in files
    for control in model.controls:
        assert control.kind in shipped.KINDS and control.description and "\n" not in control.description
        assert control.annotator is None or control.annotator in ANNOTATORS


def test_the_installed_registry_has_canny_and_every_file_it_names():
    assert "canny" in shipped.names() and shipped.path("canny") == shipped.canny_path()
    assert shipped.missing() == []


def test_the_readme_lists_the_shipped_names():
    """The README's table of shipped names is the registry's (it changes with the registry)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("**Shipped ControlNets by name.**")[1].split("\n\n")[1]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    kinds = {"controlnet": "ControlNet", "adapter": "T2I-Adapter"}
    expected = [[c.name, kinds[c.kind], c.description, c.annotator or "(none fits)"] for c in shipped.MODEL.controls]
    assert rows == expected


def test_a_path_beats_a_name_and_a_name_gives_the_shipped_file(tmp_path, monkeypatch):
    assert shipped.resolve("canny") == shipped.canny_path()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "canny").write_bytes(b"a file of one's own, named like a shipped model")
    assert shipped.resolve("canny") == Path("canny")
    assert shipped.resolve(tmp_path) == tmp_path  # a folder (diffusers) too


def test_an_unknown_name_is_one_line_naming_it_and_the_shipped_names(tiny_registry, monkeypatch):
    def refusal(value: str, kind: str) -> str:
        with pytest.raises(ValueError) as refused:
            shipped.resolve(value, kind)
        return str(refused.value)

    names = "(the shipped ControlNets: canny, depth)"
    assert refusal("cany", "controlnet") == f"cany: no such file or folder, nor a shipped ControlNet name {names}"
    assert refusal("depth", "adapter").endswith("nor a shipped T2I-Adapter name (the shipped T2I-Adapters: canny)")
    without_adapters = [c for c in shipped.MODEL.controls if c.kind == "controlnet"]
    monkeypatch.setattr(
        shipped, "MODEL", shipped.ShippedModel("no adapters", "tiny.safetensors", tuple(without_adapters))
    )
    assert refusal("canny", "adapter").endswith(
        "nor a shipped T2I-Adapter name (no T2I-Adapter ships with the package)"
    )


def test_a_name_is_found_among_files_however_their_path_is_written(tiny_registry, monkeypatch):
    monkeypatch.chdir(tiny_registry)
    files = [Path("tiny-depth.safetensors"), tiny_registry / "tiny-canny.safetensors"]
    assert shipped.find("canny", "controlnet", files) == 1 and shipped.find("depth", "controlnet", files) == 0
    assert shipped.find("canny", "adapter", files) is None  # shipped, but not among them
    with pytest.raises(ValueError) as refused:
        shipped.find("pose", "controlnet", files)
    assert str(refused.value) == "no shipped ControlNet is called 'pose' (the shipped ControlNets: canny, depth)"
    assert shipped.missing() == [] and shipped.base_path() == tiny_registry / "tiny.safetensors"


# -- controlnet generate ------------------------------------------------------------------------


def test_generate_by_name_gives_the_image_of_the_explicit_shipped_files(tmp_path, capsys):
    """--controlnet canny without --base is the shipped base with the shipped file, as is a unit's
    controlnet=canny; the same pixels as naming both files."""
    image, out = shipped.examples()[0].control, tmp_path / "out"
    argv = ["generate", "--prompt", "a red circle", "--out", str(out), "--seed", "3", *FAST]
    files = ["--base", str(shipped.base_path()), "--controlnet", str(shipped.canny_path())]
    prompts = ["--added-prompt", "", "--negative-prompt", ""]  # the shipped model's defaults, as without --base
    assert main([*argv, *files, *prompts, "--image", str(image)]) == 0  # 3.png
    assert main([*argv, "--controlnet", "canny", "--image", str(image)]) == 0  # 3-1.png
    assert main([*argv, "--control", f"image={image},annotator=canny,controlnet=canny"]) == 0  # 3-2.png
    assert main([*argv, "--controlnet", "canny", "--image", str(image), "--strength", "0"]) == 0  # 3-3.png
    assert capsys.readouterr().out.count(f"using {shipped.NAME}") == 3
    explicit = load_image(out / "3.png")
    assert np.array_equal(explicit, load_image(out / "3-1.png"))
    assert np.array_equal(explicit, load_image(out / "3-2.png"))
    assert not np.array_equal(explicit, load_image(out / "3-3.png"))  # the ControlNet acts
    assert [m["name"] for m in _record(out / "3-1.png")["models"]["controlnets"]] == [shipped.canny_path().name]
    # Without --controlnet every shipped ControlNet loads, in registry order: the unit's index is canny's.
    assert _record(out / "3-2.png")["controls"][0]["controlnet"] == shipped.names().index("canny")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--controlnet", "cany"],
            "--controlnet cany: no such file or folder, nor a shipped ControlNet name (the shipped ControlNets: "
            "canny, depth)",
        ),
        (
            ["--control", "image={image},controlnet=pose"],
            "--control controlnet='pose': not an index, and no shipped ControlNet is called 'pose' (the shipped "
            "ControlNets: canny, depth)",
        ),
        (
            ["--adapter", "depth"],
            "--adapter depth: no such file or folder, nor a shipped T2I-Adapter name (the shipped T2I-Adapters: canny)",
        ),
        (
            ["--controlnet", "{image}"],
            "edges.png: a file of your own needs --base (the base model it was trained for); without --base, name "
            "a shipped one (canny, depth)",
        ),
    ],
)
def test_generate_refuses_unknown_names_in_one_line(tiny_registry, tmp_path, capsys, extra, message):
    image = _edges(tmp_path)
    argv = ["generate", "--prompt", "p", "--out", str(tmp_path / "out"), *FAST, "--image", str(image)]
    assert main([*argv, *(a.format(image=image) for a in extra)]) == 2
    err = _error(capsys)
    assert err.startswith("controlnet generate: error: ") and err.endswith(message), err
    assert not (tmp_path / "out").exists()  # refused before anything is loaded or written


def test_units_name_shipped_models_which_load_once_after_the_given_ones(tiny_registry, tmp_path):
    """Indices refer to the --controlnet list; a name already there is that index, any other is
    loaded once after the list, however many units name it."""
    edges, out = _edges(tmp_path), tmp_path / "out"
    argv = ["generate", "--prompt", "a ring", "--out", str(out), *FAST, "--image", str(edges)]
    spec = f"image={edges},annotator=none"
    units = ["--control", f"{spec},controlnet=canny", "--control", f"{spec},controlnet=canny"]
    assert main([*argv, "--seed", "1", "--controlnet", "depth", *units, "--control", f"{spec},controlnet=0"]) == 0
    record = _record(out / "1.png")
    assert [m["name"] for m in record["models"]["controlnets"]] == ["tiny-depth.safetensors", "tiny-canny.safetensors"]
    assert [unit["controlnet"] for unit in record["controls"]] == [0, 1, 1, 0]
    # Naming both by name, with no --controlnet: every shipped one is loaded, in registry order.
    assert main([*argv, "--seed", "2", "--control", f"{spec},controlnet=depth"]) == 0
    record = _record(out / "2.png")
    assert [m["name"] for m in record["models"]["controlnets"]] == ["tiny-canny.safetensors", "tiny-depth.safetensors"]
    assert [m["name"] for m in record["models"]["adapters"]] == ["tiny-canny-adapter.pth"]
    assert [unit["controlnet"] for unit in record["controls"]] == [0, 1]
    # The same pixels as the files named with --base, the depth unit by index.
    files = ["--base", str(tiny_registry / "tiny.safetensors"), "--added-prompt", "", "--negative-prompt", ""]
    files += ["--controlnet", str(tiny_registry / "tiny-canny.safetensors")]
    files += ["--controlnet", str(tiny_registry / "tiny-depth.safetensors")]
    assert main([*argv, "--seed", "2", *files, "--control", f"{spec},controlnet=1"]) == 0
    assert np.array_equal(load_image(out / "2.png"), load_image(out / "2-1.png"))


def test_an_index_never_reaches_a_model_that_a_name_appended(tiny_registry, tmp_path, capsys):
    edges = _edges(tmp_path)
    spec = f"image={edges},annotator=none"
    argv = ["generate", "--prompt", "p", "--out", str(tmp_path / "out"), *FAST, "--controlnet", "depth"]
    assert main([*argv, "--control", f"{spec},controlnet=canny", "--control", f"{spec},controlnet=1"]) == 2
    assert "controlnet=1, but only 1 ControlNet(s) are loaded" in _error(capsys)
    base = ["generate", "--prompt", "p", "--out", str(tmp_path / "out"), *FAST]
    base += ["--base", str(tiny_registry / "tiny.safetensors"), "--image", str(edges)]
    assert main([*base, "--control", f"{spec},controlnet=canny"]) == 2  # --image's unit: ControlNet 0 of none
    assert "names no model by name, and no --controlnet (or --adapter) is given" in _error(capsys)


def test_adapters_are_named_like_controlnets(tiny_registry, tmp_path):
    edges, out = _edges(tmp_path), tmp_path / "out"
    argv = ["generate", "--prompt", "a ring", "--out", str(out), *FAST, "--seed", "1"]
    assert main([*argv, "--adapter", "canny", "--image", str(edges), "--annotator", "none"]) == 0
    record = _record(out / "1.png")
    assert record["models"]["controlnets"] == [] and record["controls"][0]["adapter"] == 0
    assert main([*argv, "--controlnet", "depth", "--control", f"image={edges},annotator=none,adapter=canny"]) == 0
    record = _record(out / "1-1.png")
    assert [m["name"] for m in record["models"]["adapters"]] == ["tiny-canny-adapter.pth"]
    assert record["controls"][0]["adapter"] == 0


# -- controlnet train ---------------------------------------------------------------------------


def test_train_starts_from_a_shipped_controlnet_by_name(tiny_registry, tmp_path, monkeypatch, capsys):
    import controlnet.train

    started = []
    monkeypatch.setattr(controlnet.train, "train", lambda config, log: started.append(config))
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--controlnet"]
    assert main([*argv, "depth"]) == 0
    [config] = started
    assert Path(config.controlnet) == tiny_registry / "tiny-depth.safetensors"
    assert Path(config.base) == tiny_registry / "tiny.safetensors"  # a shipped name implies the shipped base
    assert main([*argv, "pose"]) == 2
    expected = "--controlnet pose: no such file or folder, nor a shipped ControlNet name (the shipped ControlNets: "
    assert _error(capsys).endswith(expected + "canny, depth)")


# -- the Python API -----------------------------------------------------------------------------


def test_the_default_pipeline_holds_every_shipped_model_in_registry_order(tiny_registry):
    pipe = Pipeline.default(dtype="float32")
    assert (len(pipe.controlnets), len(pipe.adapters)) == (2, 1)
    assert (pipe.controlnet_index("canny"), pipe.controlnet_index("depth"), pipe.adapter_index("canny")) == (0, 1, 0)
    edges = circle_edges(64)
    by_name = pipe.generate("a ring", [ControlUnit(edges, controlnet=pipe.controlnet_index("depth"))], steps=1, seed=1)
    by_index = pipe.generate("a ring", [ControlUnit(edges, controlnet=1)], steps=1, seed=1)
    assert np.array_equal(by_name.images[0], by_index.images[0])
    with pytest.raises(ValueError, match="no shipped ControlNet is called 'pose'"):
        pipe.controlnet_index("pose")
    only_depth = Pipeline.from_files(tiny_registry / "tiny.safetensors", [shipped.path("depth")], dtype="float32")
    assert only_depth.controlnet_index("depth") == 0
    with pytest.raises(ValueError, match="did not load the shipped ControlNet 'canny' \\(it holds tiny-depth"):
        only_depth.controlnet_index("canny")


def test_the_demo_builds_each_examples_units_by_name_with_strength_and_window(tiny_registry, tmp_path, monkeypatch):
    """Every demo image is the image of the units its example names, built by hand: a ControlNet, the
    adapter, and a composition of two ControlNets with a strength and a window; guess mode runs on the
    composition with an empty prompt and "control" mode."""
    from controlnet.cli.demo import SEED, run_demo

    folder = tmp_path / "examples"
    folder.mkdir()
    edges, ring = circle_edges(64), np.roll(circle_edges(64), 9, axis=1)
    Image.fromarray(edges).save(folder / "edges.png")
    Image.fromarray(ring).save(folder / "ring.png")
    composed = [
        {"model": "canny", "image": "edges.png"},
        {"model": "depth", "image": "ring.png", "strength": 0.6, "end": 0.5},
    ]
    listing = [
        {"name": "one", "prompt": "a ring", "other_prompt": "a blue ring", "controls": [composed[0]]},
        {"name": "adapted", "prompt": "a ring", "controls": [{**composed[0], "kind": "adapter"}]},
        {"name": "both", "prompt": "two rings", "controls": composed},
    ]
    (folder / "examples.json").write_text(json.dumps(listing))
    monkeypatch.setattr(shipped, "examples_folder", lambda: folder)
    written = run_demo(tmp_path / "out", steps=2, device="cpu", dtype="float32")
    assert [p.stem for p in written] == [
        "one", "adapted", "both", "one-other-colours", "one-guess-mode", "both-guess-mode", "overview"
    ]  # fmt: skip

    pipe = Pipeline.default("cpu", "float32")

    def by_hand(prompt: str, *units: ControlUnit) -> np.ndarray:
        return pipe.generate(prompt, list(units), seed=SEED, steps=2, guidance_scale=7.5).images[0]

    canny, depth = ControlUnit(edges, controlnet=0), ControlUnit(ring, controlnet=1, strength=0.6, end=0.5)
    assert np.array_equal(load_image(written[0]), by_hand("a ring", canny))
    assert np.array_equal(load_image(written[1]), by_hand("a ring", ControlUnit(edges, adapter=0)))
    assert np.array_equal(load_image(written[2]), by_hand("two rings", canny, depth))
    assert np.array_equal(load_image(written[3]), by_hand("a blue ring", canny))
    guessed = [
        ControlUnit(edges, controlnet=0, mode="control"),
        ControlUnit(ring, controlnet=1, strength=0.6, end=0.5, mode="control"),
    ]
    assert np.array_equal(load_image(written[5]), by_hand("", *guessed))
    assert not np.array_equal(load_image(written[5]), by_hand("", canny, depth))  # the mode acts


# -- the JSON API and the page's menu -----------------------------------------------------------


@pytest.fixture
def api(tiny_registry) -> Iterator:
    """The JSON API alone (no page) over the shipped model and a model holding one of its files."""
    pytest.importorskip("gradio")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from controlnet.serve.api import add_json_api
    from controlnet.serve.service import Limits, ModelEntry, ModelRegistry, Service, discover_models

    other = ModelEntry("other", tiny_registry / "tiny.safetensors", [shipped.path("canny")])
    app = FastAPI()
    add_json_api(app, Service(ModelRegistry([*discover_models(None), other]), Limits()), None)
    with TestClient(app) as client:
        yield client


def _unit(**fields) -> dict:
    png = io.BytesIO()
    Image.fromarray(circle_edges(64)).save(png, format="PNG")
    return {"image": base64.b64encode(png.getvalue()).decode(), "annotator": "none"} | fields


def _generate(client, *units: dict, model: str = "shipped") -> dict:
    body = {"prompt": "a ring", "model": model, "steps": 1, "seed": 2, "resolution": 64, "units": list(units)}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_json_api_takes_and_lists_shipped_names(api):
    models = api.get("/api/models").json()["control_models"]
    assert models["shipped"] == {
        "controlnets": ["tiny-canny.safetensors", "tiny-depth.safetensors"],
        "adapters": ["tiny-canny-adapter.pth"],
        "controlnet_names": ["canny", "depth"],
        "adapter_names": ["canny"],
    }
    by_name = _generate(api, _unit(controlnet="depth"), _unit(adapter="canny"))
    by_index = _generate(api, _unit(controlnet=1), _unit(adapter=0))
    assert by_name["images"] == by_index["images"]
    assert [(u.get("controlnet"), u.get("adapter")) for u in by_name["settings"]["controls"]] == [(1, None), (None, 0)]
    assert _generate(api, _unit(controlnet="canny"), model="other")["settings"]["controls"][0]["controlnet"] == 0


@pytest.mark.parametrize(
    ("unit", "model", "message"),
    [
        (
            {"controlnet": "pose"},
            "shipped",
            "control unit 0: controlnet: no shipped ControlNet is called 'pose' (the shipped ControlNets: canny, "
            "depth)",
        ),
        (
            {"adapter": "depth"},
            "shipped",
            "control unit 0: adapter: no shipped T2I-Adapter is called 'depth' (the shipped T2I-Adapters: canny)",
        ),
        (
            {"controlnet": "depth"},
            "other",
            "control unit 0: model 'other' has no shipped ControlNet 'depth' (its ControlNets: tiny-canny.safetensors)",
        ),
        (
            {"controlnet": "depth", "adapter": "canny"},
            "shipped",
            "control unit 0: a unit uses one ControlNet (controlnet) or one T2I-Adapter (adapter), not both; got "
            "controlnet 1 and adapter 0",
        ),
    ],
)
def test_bad_names_in_the_json_api_are_one_line_400s(api, unit, model, message):
    body = {"prompt": "x", "model": model, "steps": 1, "units": [_unit(**unit)]}
    response = api.post("/api/generate", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == message


def test_the_pages_unit_menu_shows_shipped_names(tiny_registry):
    pytest.importorskip("gradio")
    from controlnet.serve.ui import unit_model_choices

    models = {
        "controlnets": ["tiny-canny.safetensors", "mine.safetensors"],
        "adapters": ["t2iadapter.pth"],
        "controlnet_names": ["canny", None],
        "adapter_names": [None],
    }
    assert unit_model_choices(models) == [
        ("ControlNet: canny (Canny edges, white on black)", "controlnet:0"),
        ("ControlNet: mine.safetensors", "controlnet:1"),
        ("T2I-Adapter: t2iadapter.pth", "adapter:0"),
    ]


# -- eval ----------------------------------------------------------------------------------------


class _Loaded(Exception):
    """Raised in place of loading models: what eval would load is all these tests need."""


@pytest.mark.parametrize(
    ("folder", "named", "expected"),
    [
        ("depth", [], ["tiny-depth.safetensors"]),  # the world's depth maps: the shipped depth ControlNet
        ("", [], ["tiny-canny.safetensors"]),  # the world's canny maps (its root folder): the canny one
        ("depth", ["--controlnet", "canny"], ["tiny-canny.safetensors"]),  # a name given is that one
    ],
)
def test_eval_takes_shipped_names_and_defaults_to_the_datas_condition(
    tiny_registry, tmp_path, monkeypatch, folder, named, expected
):
    from controlnet.datasets.world import write_world
    from controlnet.pipeline import Pipeline

    write_world(tmp_path / "world", count=2, size=64, seed=1)
    loaded = []

    def record(base, controlnets, *args, **kwargs):
        loaded.append((Path(base).name, [Path(c).name for c in controlnets]))
        raise _Loaded

    monkeypatch.setattr(Pipeline, "from_files", record)
    with pytest.raises(_Loaded):
        main(["eval", "--data", str(tmp_path / "world" / folder), "--out", str(tmp_path / "out"), *named])
    assert loaded == [("tiny.safetensors", expected)]

"""Every generation setting is defined once (settings.py) and every interface obeys that definition:
for each setting, the values at its limits and the values just past them, the pipeline (the Python
API), the JSON API and the command line accept the same values and refuse the same values with the
same message. The page's widgets take their ranges and defaults from it too."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlnet import shipped
from controlnet.annotators import ANNOTATORS, Runtime
from controlnet.cli import main
from controlnet.models.tiny import circle_edges, random_tiny_models
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.settings import GENERATION, MAX_SEED, UNIT, UNIT_MODELS, Setting, SettingError

pytest.importorskip("gradio")
from fastapi.testclient import TestClient

from controlnet.serve.app import build_app
from controlnet.serve.service import Limits, ModelRegistry, Service, discover_models

from .helpers import write_tiny_adapter

ACCEPTED = "accepted"
EDGES = shipped.examples()[0].control


class Validated(Exception):
    """Raised by a stub at the first step after an interface's checks: the values were accepted."""


def _stop(*args, **kwargs):
    raise Validated


def values(setting: Setting) -> Iterator[tuple[object, bool]]:
    """(value, allowed) pairs at and just past the setting's limits."""
    if setting.allowed():
        # image_to_mask and inpaint need a mask; a network annotator needs its weight file, which the
        # folder decides, not the setting (test_a_missing_weight_file_is_named_by_every_interface).
        choices = [c for c in setting.allowed() if c not in ("image_to_mask", "inpaint") and not _needs_weights(c)]
        yield from ((choice, True) for choice in choices)
        yield "bogus", False
    elif setting.type is bool:
        yield True, True
        yield 1, False
    else:
        step = setting.multiple_of or (1 if setting.type is int else 0.01)
        yield setting.minimum, True
        yield setting.maximum, True
        yield setting.minimum - step, False
        yield setting.maximum + step, False
        yield math.nan, False
        if setting.multiple_of:
            yield setting.minimum + 1, False


def _needs_weights(choice) -> bool:
    return choice in ANNOTATORS and bool(ANNOTATORS[choice].weights)


CASES = [("generation", name, value, allowed) for name, s in GENERATION.items() for value, allowed in values(s)]
CASES += [("unit", name, value, allowed) for name, s in UNIT.items() for value, allowed in values(s)]


def _outcome(run) -> str | None:
    """ACCEPTED, or the refusal's message without the name of the unit (the command line names a
    unit by its image file, the APIs by its index); None where the interface does not take it."""
    try:
        message = run()
    except Validated:
        return ACCEPTED
    if message is None:
        return None
    return message.split("control unit ", 1)[-1].split(": ", 1)[-1] if "control unit" in message else message


# -- the three interfaces ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Pipeline:
    from controlnet.loading import load_adapter

    model, controlnet = random_tiny_models(seed=0)
    adapter = load_adapter(write_tiny_adapter(tmp_path_factory.mktemp("adapter") / "adapter.pth"))
    return Pipeline(model, [controlnet], dtype="float32", adapters=[adapter])


def loaded_models_limit(name: str, value) -> bool:
    """A ControlNet or adapter index the setting allows but that the one loaded (index 0) lacks:
    the model's limit, not the setting's."""
    return name in UNIT_MODELS and value not in (0, -1) and setting_allows(UNIT[name], value)


def through_pipeline(pipe: Pipeline, monkeypatch, kind: str, name: str, value) -> str | None:
    if name in ("guess_mode", "pixel_perfect", "annotator_resolution"):
        return None  # not arguments of the Python API (guess mode is a unit's mode there)
    if loaded_models_limit(name, value):
        return None
    monkeypatch.setattr(Pipeline, "output_size", _stop)  # the first step after the checks
    unit = {name: value} if kind == "unit" else {}
    settings = {name: value} if kind == "generation" else {}
    try:
        pipe.generate("a circle", [ControlUnit(circle_edges(64), **unit)], **settings)
    except ValueError as error:
        return str(error)
    raise AssertionError("the pipeline neither refused nor reached its first step")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # The server's own cap on the resolution (Limits.max_resolution, an operator's choice) set to
    # the setting's, so that only the setting decides here.
    limits = Limits(max_resolution=int(GENERATION["resolution"].maximum))
    with TestClient(build_app(Service(ModelRegistry(discover_models(None)), limits))) as client:
        yield client


def through_json_api(client: TestClient, monkeypatch, kind: str, name: str, value) -> str:
    reached = []

    def stop(*args, **kwargs):  # the server answers its exceptions (a 500): remember it was reached
        reached.append(True)
        raise Validated

    monkeypatch.setattr(ModelRegistry, "pipeline", stop)  # loading the model comes after the checks
    unit = {"image": base64.b64encode(EDGES.read_bytes()).decode(), "annotator": "none"}
    body = {"prompt": "a circle", "units": [unit | ({name: value} if kind == "unit" else {})]}
    body |= {name: value} if kind == "generation" else {}
    response = client.post("/api/generate", content=json.dumps(body), headers={"content-type": "application/json"})
    if reached:
        raise Validated
    assert response.status_code == 400, response.text
    return response.json()["error"]


def through_command_line(tmp_path: Path, capsys, monkeypatch, kind: str, name: str, value) -> str | None:
    setting = (GENERATION if kind == "generation" else UNIT)[name]
    if name in ("pixel_perfect", "annotator_resolution") or (setting.type is bool and value is not True):
        return None  # not options of the command line (a flag is on or off)
    if setting.type is int and isinstance(value, float):
        return None  # argparse refuses what is not an integer, before any setting is checked
    if loaded_models_limit(name, value):
        return None  # checked against the one ControlNet and adapter given, before loading
    monkeypatch.setattr(Pipeline, "from_files", _stop)  # loading the model comes after the checks
    argv = ["generate", "--prompt", "a circle", "--out", str(tmp_path)]
    if name == "adapter":  # an adapter file to name (never read: loading is stopped)
        argv += ["--base", str(EDGES), "--adapter", str(EDGES)]
    if kind == "generation":
        argv += [setting.option] if setting.type is bool else [setting.option, str(value)]
        argv += ["--image", str(EDGES), "--annotator", "none"]
    else:  # a --control spec: KEY=VALUE items, the resize mode's key is "resize"
        parts = {"image": EDGES, "annotator": "none", "resize" if name == "resize_mode" else name: value}
        argv += ["--control", ",".join(f"{key}={item}" for key, item in parts.items())]
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, (status, err)
    return err.split("error: ", 1)[1]


@pytest.mark.parametrize(("kind", "name", "value", "allowed"), CASES, ids=[f"{c[1]}={c[2]}" for c in CASES])
def test_the_pipeline_the_json_api_and_the_command_line_agree(
    pipe, client, tmp_path, capsys, monkeypatch, kind, name, value, allowed
):
    outcomes = {
        "pipeline": _outcome(lambda: through_pipeline(pipe, monkeypatch, kind, name, value)),
        "JSON API": _outcome(lambda: through_json_api(client, monkeypatch, kind, name, value)),
        "command line": _outcome(lambda: through_command_line(tmp_path, capsys, monkeypatch, kind, name, value)),
    }
    outcomes = {where: outcome for where, outcome in outcomes.items() if outcome is not None}
    assert outcomes  # some values only one interface can express (a JSON 1 for a flag)
    expected = ACCEPTED if allowed else _refusal(kind, name, value)
    assert set(outcomes.values()) == {expected}, outcomes


def setting_allows(setting: Setting, value) -> bool:
    try:
        setting.check(value)
    except SettingError:
        return False
    return True


def _refusal(kind: str, name: str, value) -> str:
    setting = (GENERATION if kind == "generation" else UNIT)[name]
    with pytest.raises(SettingError) as refused:
        setting.check(value)
    return str(refused.value)


def test_every_setting_says_what_it_means_and_what_it_allows():
    for setting in (*GENERATION.values(), *UNIT.values()):
        assert setting.help and setting.describe()
        if setting.default is not None and not callable(setting.choices):
            assert setting.check(setting.default) == setting.default  # the default is allowed
    assert GENERATION["seed"].maximum == MAX_SEED


def test_huge_numbers_and_long_values_are_refused_in_one_short_line():
    """A Python int past ~1e308 overflows math.isfinite: it is refused as out of range instead; a
    value quoted in a message is cut short (a request may send megabytes)."""
    for setting in (GENERATION["steps"], GENERATION["guidance_scale"], UNIT["strength"]):
        for value in (10**400, -(10**400)):
            with pytest.raises(SettingError, match=f"^{setting.title} must be between .* got -?1000000"):
                setting.check(value)
    with pytest.raises(SettingError, match=r"^sampler must be one of .* got 'xxxx.*\(1,000,002 characters\)$"):
        GENERATION["sampler"].check("x" * 1_000_000)
    with pytest.raises(SettingError, match=r"^unit 2: weight must be between 0 and 2, got 3$"):
        UNIT["strength"].check(3, "unit 2", name="weight")  # an API's own name for the setting


def test_the_page_takes_its_ranges_and_defaults_from_the_settings(client):
    components = {c["props"].get("label"): c["props"] for c in client.get("/config").json()["components"]}
    for label, setting in [("Steps", GENERATION["steps"]), ("Guidance Scale", GENERATION["guidance_scale"]),
                           ("Images", GENERATION["num_images"]), ("Control Strength", UNIT["strength"]),
                           ("Denoising strength", GENERATION["denoising_strength"])]:  # fmt: skip
        props = components[label]
        assert (props["minimum"], props["maximum"], props["value"]) == (
            setting.minimum,
            setting.maximum,
            setting.default,
        )
    assert components["Sampler"]["choices"] == [[c, c] for c in GENERATION["sampler"].allowed()]


def test_the_command_lines_help_names_each_range_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for setting in (GENERATION["steps"], GENERATION["guidance_scale"], UNIT["strength"]):
        assert f"{setting.option} " in text and f"({setting.describe()}; default {setting.default})" in text


def test_a_missing_weight_file_is_named_by_every_interface(pipe, client, tmp_path, capsys, monkeypatch):
    """A network annotator whose file is not in the folder: the pipeline, the JSON API and the command
    line each refuse before any model runs, naming the file (the server says where to get it too)."""
    name = next((n for n in sorted(ANNOTATORS) if _needs_weights(n)), None)
    if name is None:
        pytest.skip("no network annotator is registered")
    weight = ANNOTATORS[name].weights[0]
    monkeypatch.setenv("CONTROLNET_ANNOTATORS", str(tmp_path / "empty"))  # the server and the command
    monkeypatch.setattr(pipe, "annotators", Runtime(tmp_path / "empty"))  # a pipeline's is fixed when made
    with pytest.raises(ValueError) as refused:
        pipe.generate("a circle", [ControlUnit(circle_edges(64), annotator=name)], steps=1)
    assert str(refused.value).startswith(weight.name) and str(tmp_path / "empty") in str(refused.value)
    assert weight.source in str(refused.value)
    error = through_json_api(client, monkeypatch, "unit", "annotator", name)
    assert f"needs {weight.name}" in error and weight.source in error
    monkeypatch.setattr(Pipeline, "from_files", _stop)
    argv = ["generate", "--prompt", "a", "--out", str(tmp_path), "--image", str(EDGES), "--annotator", name]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and weight.name in err and str(tmp_path / "empty") in err


def test_a_unit_names_one_controlnet_or_one_adapter():
    """settings.py's rule for the model of a unit, which every interface follows: an adapter when
    named, else the named ControlNet, else ControlNet 0 (adapter 0 with no ControlNet loaded); both
    named, or an adapter unit in a control mode, refused in one line."""
    from controlnet.settings import check_guess_mode, check_unit, unit_mode, unit_model

    assert unit_model(None, None, controlnets=2, adapters=1) == ("controlnet", 0)
    assert unit_model(None, None, controlnets=0, adapters=1) == ("adapter", 0)
    assert unit_model(None, None, controlnets=0, adapters=0) == ("controlnet", 0)  # "does not exist"
    assert unit_model(1, None, controlnets=2, adapters=0) == ("controlnet", 1)
    assert unit_model(None, 1, controlnets=2, adapters=2) == ("adapter", 1)
    check_unit({"controlnet": None, "adapter": 3, "mode": "balanced"})  # None: not named
    refusals = [
        ({"controlnet": 0, "adapter": 0}, "control unit: a unit uses one ControlNet (controlnet) or one T2I-Adapter"),
        ({"adapter": 0, "mode": "control"}, "a T2I-Adapter unit takes control mode 'balanced' only"),
        ({"adapter": 64}, "T2I-Adapter index must be between 0 and 63, got 64"),
    ]
    for values, message in refusals:
        with pytest.raises(SettingError) as refused:
            check_unit(values)
        assert message in str(refused.value) and "\n" not in str(refused.value)
    # Guess mode: ControlNet units in control mode, adapter units as they are; refused where it
    # would change nothing (every unit an adapter unit).
    assert unit_mode("balanced", True, adapter=False) == "control"
    assert unit_mode("balanced", True, adapter=True) == "balanced"
    check_guess_mode(True, [True, False])
    check_guess_mode(True, [])
    with pytest.raises(SettingError, match="every unit here uses a T2I-Adapter"):
        check_guess_mode(True, [True, True])

"""The service behind `controlnet serve` and its JSON API: checks with one-line errors, limits, the
queue, cancellation, authentication and the model folder. (The page itself: test_webui_browser.py.)"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from controlnet import shipped
from controlnet.formats.ldm import save_ldm
from controlnet.models.tiny import random_tiny_models
from controlnet.serve.api import request_from_json
from controlnet.serve.service import (
    SHIPPED,
    Cancelled,
    GenerateRequest,
    Limits,
    ModelRegistry,
    QueueFull,
    RequestError,
    Service,
    UnitRequest,
    discover_models,
)

pytest.importorskip("gradio")
from fastapi import FastAPI
from fastapi.testclient import TestClient

from controlnet.serve.api import add_json_api
from controlnet.serve.app import build_app


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


EDGES = shipped.examples()[0].control


@pytest.fixture(scope="module")
def service() -> Service:
    return Service(ModelRegistry(discover_models(None)), Limits(max_queue=2))


@pytest.fixture(scope="module")
def client(service) -> Iterator[TestClient]:
    with TestClient(build_app(service)) as client:
        yield client


def _edges() -> str:
    return base64.b64encode(EDGES.read_bytes()).decode()


def test_the_api_generates_pngs_that_carry_their_settings(client):
    body = {"prompt": shipped.examples()[0].prompt, "steps": 4, "num_images": 2, "seed": 11,
            "units": [{"image": _edges(), "annotator": "none"}]}  # fmt: skip
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["seeds"] == [11, 12] and len(result["images"]) == 2 and len(result["control_maps"]) == 1
    png = io.BytesIO(base64.b64decode(result["images"][1]))
    image = Image.open(png)
    assert image.size == (128, 128)  # the shipped model's native size
    assert "Seed: 12" in image.text["parameters"] and '"steps": 4' in image.text["controlnet"]
    assert result["settings"]["model"] == SHIPPED and result["settings"]["added_prompt"] == ""


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"steps": 4}, 400, '"prompt" is required'),
        ({"prompt": " "}, 400, "give a prompt or a control image (or both)"),  # the AUTOMATIC1111 API allows it
        ({"prompt": "x", "colour": "red"}, 400, "unknown field(s): colour"),
        ({"prompt": "x", "steps": "many"}, 400, "steps must be a number"),
        ({"prompt": "x", "steps": 0}, 400, "steps must be between 1 and 100, got 0"),
        ({"prompt": "x", "steps": 10**400}, 400, "steps must be between 1 and 100, got 1000000"),  # no OverflowError
        ({"prompt": "x", "guidance_scale": 10**400}, 400, "guidance scale must be between 0.1 and 30, got 100000"),
        ({"prompt": "x", "units": [{"image": "EDGES", "end": 10**400}]}, 400, "end must be between 0 and 1"),
        ({"prompt": "x", "num_images": 13}, 400, "images must be between 1 and 12"),
        ({"prompt": "x", "guidance_scale": 31}, 400, "guidance scale must be between 0.1 and 30"),
        ({"prompt": "x", "resolution": 100}, 400, "resolution must be a multiple of 64"),
        ({"prompt": "x", "sampler": "magic"}, 400, "sampler must be one of ddim"),
        ({"prompt": "x", "model": "sd15"}, 400, "unknown model 'sd15'; choose one of shipped"),
        ({"prompt": "x", "units": [{"image": "@@@"}]}, 400, "units[0].image is not valid base64"),
        ({"prompt": "x", "units": [{"image": base64.b64encode(b"not an image").decode()}]}, 400, "not an image"),
        ({"prompt": "x", "units": [{"image": "EDGES", "strength": 3}]}, 400, "strength must be between 0 and 2"),
        (
            {"prompt": "x", "units": [{"image": "EDGES", "start": 0.8, "end": 0.2}]},
            400,
            "control unit 0: start (0.8) must not be after end (0.2)",
        ),
        (
            {"prompt": "x", "units": [{"image": "EDGES", "annotator": "hed"}]},
            400,
            "control unit 0: annotator must be one of canny",
        ),
        ({"prompt": "x", "units": [{"image": "EDGES", "controlnet": 1}]}, 400, "ControlNet 1 does not exist"),
        ({"prompt": "x", "mask": "EDGES"}, 400, "inpainting needs an init image"),
    ],
)
def test_bad_requests_get_one_line_errors_and_the_server_goes_on(client, body, status, message):
    body = dict(body)
    for unit in body.get("units", []):
        unit["image"] = _edges() if unit["image"] == "EDGES" else unit["image"]
    if body.get("mask") == "EDGES":
        body["mask"] = _edges()
    response = client.post("/api/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error
    assert client.get("/api/models").json()["models"] == [SHIPPED]  # still serving


def test_not_json_and_oversized_bodies_and_images_are_refused(client, service):
    response = client.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "the body is not JSON" in response.json()["error"]
    huge = b"x" * (8 * service.limits.max_upload_bytes + 1)
    response = client.post("/api/generate", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413
    # An image whose header claims more pixels than the limit is refused before decoding.
    big = _png(np.zeros((64, 64, 3), np.uint8))
    small_limits = Limits(max_pixels=32 * 32)
    with pytest.raises(RequestError, match="over the limit of 1024"):
        request_from_json({"prompt": "x", "units": [{"image": big}]}, small_limits)
    with pytest.raises(RequestError, match="over the upload limit"):
        request_from_json({"prompt": "x", "units": [{"image": big}]}, Limits(max_upload_bytes=10))


def test_a_full_queue_refuses_cleanly_and_one_job_runs_per_model(service):
    started, release = threading.Event(), threading.Event()
    running = []

    def slow(done: int, total: int) -> None:
        running.append(threading.current_thread().name)
        started.set()
        release.wait(timeout=60)

    request = GenerateRequest("a red circle on a white background", steps=2, seed=1)
    first = threading.Thread(target=service.generate, args=(request,), kwargs={"progress": slow}, name="first")
    first.start()
    assert started.wait(timeout=120)
    second = threading.Thread(target=service.generate, args=(request,), name="second")
    second.start()  # waits for the model's lock: the queue now holds 2, its limit
    for _ in range(100):
        if service.queue.length == 2:
            break
        threading.Event().wait(0.05)
    assert service.queue.length == 2
    with pytest.raises(QueueFull, match="the server is busy"):
        service.generate(request)
    release.set()
    first.join(timeout=120)
    second.join(timeout=120)
    assert service.queue.length == 0 and set(running) == {"first"}
    assert service.generate(request).seeds == [1]  # serving again


def test_cancel_stops_between_steps_and_the_next_job_runs(service):
    steps_seen = []

    def progress(done: int, total: int) -> None:
        steps_seen.append(done)

    request = GenerateRequest("a blue square on a yellow background", steps=20, seed=3)
    with pytest.raises(Cancelled, match="stopped after 3 of 20 steps"):
        service.generate(request, progress=progress, cancelled=lambda: len(steps_seen) >= 3)
    assert len(steps_seen) == 3 and service.queue.length == 0
    assert service.generate(GenerateRequest("a blue square", steps=2, seed=3)).seeds == [3]


def test_the_preview_and_a_unit_without_pixel_perfect(service):
    edges = np.asarray(Image.open(EDGES).convert("RGB"))
    unit = UnitRequest(edges, annotator="canny", pixel_perfect=False, annotator_resolution=256)
    preview = service.annotate(unit, 128)
    assert preview.shape == (256, 256, 3) and preview.dtype == np.uint8
    response = service.generate(GenerateRequest("a red ring", [unit], steps=2, seed=5))
    assert response.images[0].shape == (128, 128, 3)


def test_an_annotator_without_its_weights_is_a_one_line_400_before_any_model_loads(tmp_path, monkeypatch):
    """The JSON API and the preview (which the page and /controlnet/detect use) name the missing file
    and where the administrator gets it, not the server's folder."""
    registry = ModelRegistry(discover_models(None), annotators_dir=tmp_path / "annotators")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a request that had to be refused")

    service = Service(registry)
    unit = {"image": _edges(), "annotator": "softedge_hed"}
    monkeypatch.setattr(ModelRegistry, "pipeline", no_model)
    app = FastAPI()  # the JSON API alone: the module's client holds this process's one web page
    add_json_api(app, service, None)
    with TestClient(app) as client:
        response = client.post("/api/generate", json={"prompt": "x", "steps": 1, "units": [unit]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "the softedge_hed annotator needs ControlNetHED.pth, which this server does not have" in error
    assert "https://huggingface.co/lllyasviel/Annotators" in error and "\n" not in error
    assert str(tmp_path) not in error
    edges = np.asarray(Image.open(EDGES).convert("RGB"))
    with pytest.raises(RequestError) as refused:
        service.annotate(UnitRequest(edges, annotator="softedge_hed"), 128)
    assert "needs ControlNetHED.pth" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(RequestError) as refused:  # every missing file named at once, not the first
        service.annotate(UnitRequest(edges, annotator="openpose_full"), 128)
    needs = "needs body_pose_model.pth, hand_pose_model.pth and facenet.pth, which this server does not have"
    assert needs in str(refused.value) and "get them from" in str(refused.value), refused.value


def test_only_models_inside_the_folder_are_offered(tmp_path):
    model, controlnet = random_tiny_models()
    save_ldm(tmp_path / "tiny.safetensors", model)
    save_ldm(tmp_path / "tiny-control.safetensors", controlnet=controlnet)
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    entries = discover_models(tmp_path)
    assert [e.name for e in entries] == [SHIPPED, "tiny.safetensors"]
    assert entries[1].controlnets == [tmp_path / "tiny-control.safetensors"]
    registry = ModelRegistry(entries)
    with pytest.raises(RequestError, match=r"unknown model '\.\./etc/passwd'"):
        registry.pipeline("../etc/passwd")
    pipe, records = registry.pipeline("tiny.safetensors")
    assert len(pipe.controlnets) == 1 and records["base"]["name"] == "tiny.safetensors"


def test_every_annotator_in_the_page_menu_fits_its_parameter_controls():
    from controlnet.annotators import ANNOTATORS
    from controlnet.serve import ui

    offered = ui.annotator_choices()
    assert "canny" in offered and "inpaint" not in offered  # inpaint needs a mask as well
    for name in offered:
        shown = ui.slot_settings(name)  # raises if the annotator has more parameters of a kind than slots
        visible = {s["label"] for s in shown.values() if s["visible"]}
        assert visible == {p.name.replace("_", " ") for p in ANNOTATORS[name].params}, name
        for param in ANNOTATORS[name].params:
            settings = shown[ui.param_slots(name)[param.name]]
            assert settings["value"] == param.default
            if param.kind in ("int", "float"):  # a slider needs both ends
                assert settings["minimum"] == param.minimum is not None and settings["maximum"] == param.maximum


def test_the_page_reads_an_annotators_parameters_back_from_its_controls(tmp_path):
    from controlnet.serve import ui

    path = tmp_path / "edges.png"
    path.write_bytes(EDGES.read_bytes())
    values = dict.fromkeys(ui._slot_names(), False) | {"number0": 50.0, "number1": 150.0}  # sliders give floats
    unit = ui._unit(path, "canny", values, True, 512, Limits())
    assert unit.annotator_params == {"low_threshold": 50, "high_threshold": 150}
    assert type(unit.annotator_params["low_threshold"]) is int
    with pytest.raises(RequestError, match="unknown annotator 'nope'"):
        ui._unit(path, "nope", values, True, 512, Limits())


_POSE = {
    "people": [
        {"pose_keypoints_2d": [c for x, y in [(32, 12), (32, 24), (22, 24), (20, 38)] for c in (x, y, 1)] + [0] * 42}
    ],
    "canvas_width": 64,
    "canvas_height": 64,
}


def test_a_unit_image_may_be_openpose_json(client):
    """An OpenPose JSON object in place of a unit's image: drawn as the openpose models were trained
    and used as the map (the detected map the answer returns is that drawing)."""
    from controlnet.annotators.posejson import render_pose_json
    from controlnet.imaging.resize import resize_image

    body = {"prompt": "a person", "steps": 1, "seed": 2, "units": [{"image": _POSE}]}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    [detected] = response.json()["control_maps"]
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(detected))).convert("RGB"))
    expected = resize_image(render_pose_json(json.dumps(_POSE)), 128)  # the 64 px canvas at the model's 128
    assert expected.any() and np.array_equal(drawn, expected)
    assert response.json()["settings"]["controls"][0]["annotator"] == "none"


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ({"image": {"people": []}}, "units[0].image (OpenPose JSON) has no canvas_width and canvas_height"),
        ({"image": _POSE | {"canvas_width": 100000}}, "units[0].image (OpenPose JSON)"),
        ({"image": _POSE | {"canvas_width": 4096, "canvas_height": 4096}}, "over the limit of 1048576 pixels"),
        (
            {"image": _POSE, "annotator": "canny"},
            "annotator 'canny' cannot run on it",
        ),
        ({"image": [_POSE, _POSE]}, "holds a list of 2 poses"),
    ],
)
def test_bad_openpose_json_units_are_400s(unit, message):
    with pytest.raises(RequestError) as refused:
        request_from_json({"prompt": "x", "units": [unit]}, Limits(max_pixels=1024 * 1024))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_model_without_adapters_refuses_an_adapter_unit(client):
    unit = {"image": _edges(), "annotator": "none", "adapter": 0}
    response = client.post("/api/generate", json={"prompt": "x", "steps": 1, "units": [unit]})
    assert response.status_code == 400
    assert response.json()["error"] == "control unit 0: T2I-Adapter 0 does not exist (the model has 0)"
    assert client.get("/api/models").json()["control_models"][SHIPPED] == {
        "controlnets": ["shapes-canny.safetensors"],
        "adapters": [],
        "controlnet_names": ["canny"],  # a unit may say "controlnet": "canny"
        "adapter_names": [],
    }

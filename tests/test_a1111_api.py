"""The AUTOMATIC1111 API of `controlnet serve` (serve/a1111.py, a1111_routes.py), driven by the real
client people use, webuiapi, against a server started here with a password, a models folder and
small limits: the listings, txt2img with two ControlNet units, img2img inpainting, detect, the
options' model switch, progress and interrupt, the older spellings, and the refusals. And Gradio's
own client against the page's API on the same server."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import pickle
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnet import shipped
from controlnet.formats.ldm import save_ldm
from controlnet.models.tiny import random_tiny_models
from controlnet.serve import a1111
from controlnet.serve.service import Limits, ModelRegistry, RequestError, Service, discover_models

from .helpers import serve_in_background

pytest.importorskip("gradio")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

AUTH = ("ada", "secret")
EXAMPLE = shipped.examples()[0]
MAX_PIXELS = 256 * 256


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    """A server with the shipped model and a tiny one from a models folder, a password, limits small
    enough to test, and an empty folder of annotator weights (whatever ~/.cache holds)."""
    folder = tmp_path_factory.mktemp("a1111")
    models = folder / "models"
    models.mkdir()
    model, controlnet = random_tiny_models(seed=1)
    save_ldm(models / "tiny.safetensors", model)
    save_ldm(models / "tiny-control.safetensors", controlnet=controlnet)
    arguments = ["--auth", ":".join(AUTH), "--models", str(models), "--max-pixels", str(MAX_PIXELS)]
    arguments += ["--annotators-dir", str(folder / "annotators")]
    limits = ["--max-upload-mb", "1", "--max-queue", "1"]  # one job at a time: a second is refused
    with serve_in_background(folder, *arguments, *limits) as (address, _process):
        yield address


@pytest.fixture(scope="module")
def api(url) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username=AUTH[0], password=AUTH[1])


@pytest.fixture(scope="module")
def session() -> requests.Session:
    session = requests.Session()
    session.auth = AUTH
    return session


def _scene() -> Image.Image:
    """A picture of coloured shapes, as the shipped model was trained on (for canny to find edges)."""
    image = Image.new("RGB", (128, 128), (40, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((14, 20, 64, 70), fill=(220, 30, 30))
    draw.rectangle((70, 60, 116, 106), fill=(240, 220, 40))
    return image


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _edges_b64() -> str:
    return base64.b64encode(EXAMPLE.control.read_bytes()).decode()


def test_the_client_finds_the_extension_and_the_listings(api, session, url):
    assert api.has_controlnet  # webuiapi looks for the extension's "controlnet m2m" script
    assert [title.split(" [")[0] for title in api.util_get_model_names()] == ["shipped", "tiny.safetensors"]
    assert set(api.util_get_sampler_names()) == {"DPM++ 2M", "Euler a", "Euler", "DDIM", "UniPC", "LCM"}
    assert api.controlnet_version() == 3
    models = api.controlnet_model_list()
    assert models[0].startswith("shapes-canny [") and models[1].startswith("tiny-control [")
    modules = api.controlnet_module_list()
    assert modules[0] == "none" and {"canny", "depth", "hed", "tile_resample"} <= set(modules)  # its names
    aliased = session.get(f"{url}/controlnet/module_list", params={"alias_names": "true"}).json()
    assert {"depth_midas", "softedge_hed"} <= set(aliased["module_list"])  # its labels, which are ours
    assert aliased["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 64},
        {"name": "low_threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "high_threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    assert session.get(f"{url}/controlnet/settings").json() == {"control_net_unit_count": 3}
    options = api.get_options()
    assert options["sd_model_checkpoint"] == api.util_get_model_names()[0] and options["samples_format"] == "png"


def test_txt2img_with_two_controlnet_units(api):
    """A canny unit on a picture and an invert unit on a black-on-white drawing, both on the shipped
    Canny ControlNet: the images, then the two detected maps; info as clients read it."""
    drawing = Image.fromarray(255 - _array(Image.open(EXAMPLE.control)))
    units = [
        webuiapi.ControlNetUnit(
            image=_scene(), module="canny", model="canny", threshold_a=100, threshold_b=200, pixel_perfect=True
        ),
        webuiapi.ControlNetUnit(
            image=drawing, module="invert", model="shapes-canny", weight=0.6, control_mode=1, pixel_perfect=True
        ),
    ]
    common = {"prompt": EXAMPLE.prompt, "seed": 21, "steps": 6, "width": 128, "height": 128, "batch_size": 2,
              "sampler_name": "DPM++ 2M"}  # fmt: skip
    result = api.txt2img(**common, controlnet_units=units)
    generated, maps = result.images[:2], result.images[2:]
    assert len(maps) == 2 and all(image.size == (128, 128) for image in result.images)
    info = result.info
    assert info["seed"] == 21 and info["all_seeds"] == [21, 22] and (info["width"], info["height"]) == (128, 128)
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("DPM++ 2M", 6, 7.0)
    assert info["infotexts"] == [image.info["parameters"] for image in generated]  # our PNGs' text
    assert "Seed: 22" in info["infotexts"][1] and 'ControlNet 1: "Module: invert' in info["infotexts"][0]
    # the web UI's spellings (the PNG's JSON record keeps ours)
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7" in info["infotexts"][0]
    assert "Control Mode: My prompt is more important" in info["infotexts"][0]
    assert "Resize Mode: Resize and Fill" in info["infotexts"][0]  # webuiapi's default
    assert '"mode": "prompt"' in generated[0].info["controlnet"]
    canny = _array(maps[0])
    assert set(np.unique(canny)) == {0, 255}  # the picture's edges
    assert np.array_equal(_array(maps[1]), _array(Image.open(EXAMPLE.control)))  # the drawing inverted back
    plain = api.txt2img(**common)  # webuiapi now sends no units
    assert len(plain.images) == 2 and plain.info["all_seeds"] == [21, 22]
    assert not np.array_equal(_array(plain.images[0]), _array(generated[0]))  # the units changed the image


def test_img2img_inpaints_the_masked_area_only(api):
    """A unit without an image uses the init image (the extension's rule); outside the mask the
    picture is kept pixel for pixel."""
    init = _scene()
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((32, 32, 95, 95), fill=255)
    unit = webuiapi.ControlNetUnit(module="canny", model="canny", threshold_a=100, threshold_b=200)
    result = api.img2img(images=[init], mask_image=mask, prompt="a red circle on a blue background", seed=4,
                         steps=8, denoising_strength=0.9, width=128, height=128, controlnet_units=[unit])  # fmt: skip
    assert len(result.images) == 2 and result.info["denoising_strength"] == 0.9
    out, before, painted = _array(result.images[0]), _array(init), np.asarray(mask) > 0
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out[~painted], before[~painted]) and not np.array_equal(out[painted], before[painted])
    assert "Denoising strength: 0.9" in result.info["infotexts"][0]


def test_detect_takes_both_names_of_its_images(api, session, url):
    from controlnet.annotators import run_annotator

    found = api.controlnet_detect([_scene()], module="canny", threshold_a=100, threshold_b=200)  # controlnet_images
    assert found.info == "Success" and found.images[0].size == (512, 512)  # processor_res 512
    body = {"controlnet_module": "canny", "controlnet_input_images": [_b64(_scene())],
            "controlnet_processor_res": 128, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200}  # fmt: skip
    response = session.post(f"{url}/controlnet/detect", json=body)
    assert response.status_code == 200, response.text
    detected = _array(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
    expected = run_annotator("canny", _array(_scene()), None, low_threshold=100, high_threshold=200)
    assert np.array_equal(detected, expected)


def test_options_switch_the_model_among_those_served(api, session, url):
    try:
        api.util_set_model("tiny.safetensors")
        assert api.util_get_current_model().startswith("tiny.safetensors [")
        result = api.txt2img(prompt="a red circle", seed=2, steps=2, width=64, height=64)
        assert result.info["sd_model_name"] == "tiny" and result.images[0].size == (64, 64)
        refused = session.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_base_1.0"})
        assert refused.status_code == 422 and "not a served model; choose one of shipped [" in refused.json()["detail"]
        assert api.util_get_current_model().startswith("tiny.safetensors [")
    finally:
        api.set_options({"sd_model_checkpoint": "shipped"})
    assert api.util_get_current_model().startswith("shipped [")
    once = api.txt2img(prompt="a red circle", seed=2, steps=2, width=64, height=64,
                       override_settings={"sd_model_checkpoint": "tiny.safetensors"})  # fmt: skip
    assert once.info["sd_model_name"] == "tiny" and api.util_get_current_model().startswith("shipped [")


@contextlib.contextmanager
def _served_here(service: Service) -> Iterator[str]:
    """The app (with the password) served by uvicorn in a thread of this process, so that a test
    can hold a job at a step; its URL."""
    import uvicorn

    from controlnet.serve.app import build_app

    from .helpers import _free_port

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service, AUTH), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.mark.parametrize("stop", ["interrupt", "skip"])
def test_progress_during_a_generation_and_interrupt(monkeypatch, stop):
    """The job is held at its second step (a gate in its progress callback), whatever the speed of
    the machine: progress reports it, the queue (--max-queue 1) refuses another, interrupt (or
    skip: a job is one batch here) stops it at the next step."""
    from controlnet.serve import a1111_routes

    at_step, release = threading.Event(), threading.Event()
    advance = a1111_routes.Job.advance

    def gated(job, done: int, total: int) -> None:
        advance(job, done, total)
        if done == 2:
            at_step.set()
            release.wait(timeout=120)

    monkeypatch.setattr(a1111_routes.Job, "advance", gated)
    with _served_here(Service(ModelRegistry(discover_models(None)), Limits(max_queue=1))) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), username=AUTH[0], password=AUTH[1])
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = api.txt2img(prompt="a blue square", seed=1, steps=10, width=128, height=128,
                                                sampler_name="DDIM")  # fmt: skip
            except RuntimeError as error:
                outcome["error"] = error.args

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert at_step.wait(timeout=120), outcome
            seen = api.get_progress()
            assert seen["progress"] == 0.2 and seen["state"]["job_count"] == 1 and seen["state"]["job"] == "txt2img"
            assert (seen["state"]["sampling_step"], seen["state"]["sampling_steps"]) == (2, 10)
            assert abs(time.mktime(time.strptime(seen["state"]["job_timestamp"], "%Y%m%d%H%M%S")) - time.time()) < 120
            busy = requests.post(f"{url}{TXT}", json={"prompt": "x", "steps": 1}, auth=AUTH)
            assert busy.status_code == 503 and "the server is busy" in busy.json()["detail"]  # the same queue
            assert getattr(api, stop)() == {}
            stopping = api.get_progress()["state"]
            assert (stopping["interrupted"], stopping["skipped"]) == (stop == "interrupt", stop == "skip")
        finally:
            release.set()
            thread.join(timeout=120)
        status, text = outcome["error"]
        assert status == 409 and json.loads(text)["detail"] == "interrupted: stopped after 3 of 10 steps"
        idle = api.get_progress()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
        assert len(api.txt2img(prompt="a blue square", seed=1, steps=3, width=128, height=128).images) == 1


def test_a_waiting_job_and_an_idle_server_have_a_real_job_timestamp():
    from controlnet.serve.a1111_routes import Progress

    progress = Progress()
    assert progress.state()["state"]["job_timestamp"] == "0"  # the web UI's before any job
    with progress.track("txt2img") as job:  # waiting for its model: not started
        assert not job.started and progress.state()["state"]["job_timestamp"] == time.strftime(
            "%Y%m%d%H%M%S", time.localtime(job.queued)
        )
    assert progress.state()["state"]["job_timestamp"] == job.timestamp  # idle: the last job's


def test_older_spellings_and_a_unit_without_enabled(session, url):
    """Integers for the modes, the old field names, a data: prefix, the script key in lower case;
    a unit that does not say "enabled": true is not used (the extension's default since v1.1.448)."""
    units = [
        {"enabled": True, "input_image": "data:image/png;base64," + _edges_b64(), "module": "none",
         "model": "shapes-canny [00000000]", "resize_mode": 0, "control_mode": [2], "guidance": 0.5,
         "lowvram": True, "threshold_a": -1, "processor_res": -1},
        {"image": _edges_b64(), "module": "canny", "model": "canny"},
    ]  # fmt: skip
    body = {"prompt": EXAMPLE.prompt, "steps": 2, "seed": 3, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": units}, "Refiner": {"args": [False]}}}  # fmt: skip
    response = session.post(f"{url}/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["images"]) == 2 and not answer["images"][0].startswith("data:")  # raw base64, 1 map
    text = json.loads(answer["info"])["infotexts"][0]
    assert "Resize Mode: Just Resize" in text and "Control Mode: ControlNet is more important" in text
    assert "Guidance End: 0.5" in text and "Sampler: Euler, CFG scale" in text
    assert "ControlNet 1" not in text and answer["parameters"]["prompt"] == EXAMPLE.prompt


def _decoded(b64: str) -> np.ndarray:
    return _array(Image.open(io.BytesIO(base64.b64decode(b64))))


def _generate(session, url, body: dict, path: str = "/sdapi/v1/txt2img") -> dict:
    response = session.post(f"{url}{path}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _two_colours(width: int = 128, height: int = 64) -> Image.Image:
    """Red above blue: one edge across the middle; fitted before annotating, the padding (the
    median of the borders, a third colour) would add two more."""
    image = Image.new("RGB", (width, height), (40, 60, 200))
    ImageDraw.Draw(image).rectangle((0, 0, width - 1, height // 2 - 1), fill=(220, 30, 30))
    return image


@pytest.mark.parametrize("pixel_perfect", [True, False])
def test_a_unit_is_annotated_before_its_map_is_fitted(session, url, pixel_perfect):
    """As the extension: canny sees the 128x64 picture, then its map is padded to 128x128
    ("Resize and Fill"): the only edge is the picture's own, across the middle."""
    unit = _unit(image=_b64(_two_colours()), module="canny", resize_mode="Resize and Fill", pixel_perfect=pixel_perfect,
                 processor_res=128)  # fmt: skip
    body = {"prompt": "x", "steps": 1, "seed": 1, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
    edges = _decoded(_generate(session, url, body)["images"][1])
    rows = np.flatnonzero(edges.max(axis=(1, 2)))
    assert edges.shape == (128, 128, 3) and rows.size and rows.min() >= 56 and rows.max() <= 72, rows


def test_a_prompt_only_image_may_have_any_size(session, url):
    answer = _generate(session, url, {"prompt": "a red circle", "steps": 1, "seed": 1, "width": 192, "height": 128})
    info = json.loads(answer["info"])
    assert _decoded(answer["images"][0]).shape == (128, 192, 3) and (info["width"], info["height"]) == (192, 128)
    assert "Size: 192x128" in info["infotexts"][0]


def test_an_empty_prompt_alone_makes_unconditional_images(session, url):
    """webuiapi's default prompt is "": the web UI then generates without guidance from a prompt."""
    answer = _generate(session, url, {"prompt": "", "steps": 1, "seed": 1, "width": 64, "height": 64})
    assert len(answer["images"]) == 1 and json.loads(answer["info"])["prompt"] == ""
    assert len(_generate(session, url, {"steps": 1, "seed": 1, "width": 64, "height": 64})["images"]) == 1


def test_every_units_map_is_fitted_to_width_and_height_with_its_resize_mode(session, url):
    """A 128x128 map in a 192x128 txt2img, under each resize mode (one unit each): the map as
    imaging.resize.fit_to makes it, and the images at 192x128."""
    from controlnet.imaging.resize import fit_to

    square = _array(Image.open(EXAMPLE.control))
    modes = {"Just Resize": "just_resize", "Crop and Resize": "crop_and_resize", "Resize and Fill": "resize_and_fill"}
    units = [_unit(resize_mode=name, pixel_perfect=True) for name in modes]
    body = {"prompt": EXAMPLE.prompt, "steps": 1, "seed": 1, "width": 192, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": units}}}  # fmt: skip
    images = [_decoded(png) for png in _generate(session, url, body)["images"]]
    assert images[0].shape == (128, 192, 3) and len(images) == 4
    for mode, control_map in zip(modes.values(), images[1:], strict=True):
        assert np.array_equal(control_map, fit_to(square, 192, 128, mode)), mode


@pytest.mark.parametrize(("resize_mode", "mode"), [(0, "just_resize"), (1, "crop_and_resize"), (2, "resize_and_fill")])
def test_img2img_fits_its_init_image_with_its_resize_mode(session, url, resize_mode, mode):
    """A 128x128 init image in a 192x128 img2img: with an empty mask nothing is repainted, so the
    answer is the init image exactly as fitted."""
    from controlnet.imaging.resize import fit_to

    body = {"prompt": "x", "steps": 2, "seed": 1, "width": 192, "height": 128, "denoising_strength": 0.5,
            "init_images": [_b64(_scene())], "mask": _b64(Image.new("L", (128, 128), 0)),
            "resize_mode": resize_mode}  # fmt: skip
    image = _decoded(_generate(session, url, body, "/sdapi/v1/img2img")["images"][0])
    assert np.array_equal(image, fit_to(_array(_scene()), 192, 128, mode))


def _soft_scene() -> Image.Image:
    """Shapes of several low contrasts: canny's thresholds decide which of their edges it keeps."""
    image = Image.new("RGB", (128, 128), (100, 100, 100))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 60, 60), fill=(112, 112, 112))
    draw.rectangle((70, 20, 118, 60), fill=(130, 130, 130))
    draw.polygon([(20, 118), (64, 70), (108, 118)], fill=(160, 160, 160))
    return image


# (threshold_a, threshold_b) -> canny's (low_threshold, high_threshold): -1, or a value outside the
# slider's range (1..255), is the module's default, as the extension's bound_check_params.
THRESHOLDS = [((50, 150), (50, 150)), ((-1, -1), (100, 200)), ((0, 300), (100, 200)), ((50, -1), (50, 200))]


def _canny(low: int, high: int) -> np.ndarray:
    from controlnet.annotators import run_annotator

    return run_annotator("canny", _array(_soft_scene()), None, low_threshold=low, high_threshold=high)


def test_thresholds_set_the_modules_sliders_in_detect(session, url):
    assert not np.array_equal(_canny(50, 150), _canny(100, 200))  # the picture tells them apart
    for (a, b), expected in THRESHOLDS:
        body = {"controlnet_module": "canny", "controlnet_input_images": [_b64(_soft_scene())],
                "controlnet_processor_res": 128, "controlnet_threshold_a": a, "controlnet_threshold_b": b}  # fmt: skip
        answer = _generate(session, url, body, "/controlnet/detect")
        assert np.array_equal(_decoded(answer["images"][0]), _canny(*expected)), (a, b)


def test_thresholds_set_the_modules_sliders_in_a_txt2img_unit(session, url):
    units = [_unit(image=_b64(_soft_scene()), module="canny", threshold_a=a, threshold_b=b, pixel_perfect=True)
             for (a, b), _ in THRESHOLDS[:3]]  # fmt: skip
    body = {"prompt": "x", "steps": 1, "seed": 1, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": units}}}  # fmt: skip
    maps = [_decoded(png) for png in _generate(session, url, body)["images"][1:]]
    assert [np.array_equal(m, _canny(*expected)) for m, (_, expected) in zip(maps, THRESHOLDS, strict=False)] == [
        True, True, True
    ]  # fmt: skip


def _square_mask(size: int = 128) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((32, 32, 95, 95), fill=255)
    return mask


def test_the_inpaint_module_reads_a_units_mask_in_every_spelling(session, url):
    """{image, mask}, [image, mask] and the old mask_image: the inpaint hint is the image with the
    masked pixels at -1, which the returned map shows black."""
    picture, mask = _b64(_scene()), _b64(_square_mask())
    units = [
        _unit(image={"image": picture, "mask": mask}, module="inpaint_global_harmonious"),
        _unit(image=[picture, mask], module="inpaint"),
        _unit(image=picture, mask_image=mask, module="inpaint"),
    ]
    body = {"prompt": "x", "steps": 1, "seed": 1, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": units}}}  # fmt: skip
    maps = [_decoded(png) for png in _generate(session, url, body)["images"][1:]]
    scene = _array(_scene())
    for hint in maps:
        assert (hint[40:88, 40:88] == 0).all() and np.array_equal(hint[:16], scene[:16])


def test_a_drawn_mask_of_another_module_is_the_units_map(session, url):
    """As the extension (its canvas's sketch): a non-inpaint unit's mask with something drawn on
    it is the map, module none; a blank mask changes nothing (canny runs on the image)."""
    from controlnet.annotators import run_annotator

    drawing = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(drawing).line((10, 100, 110, 20), fill=255, width=5)
    units = [
        _unit(image={"image": _b64(_scene()), "mask": _b64(drawing)}, module="canny", pixel_perfect=True),
        _unit(image=[_b64(_scene()), _b64(Image.new("L", (128, 128), 3))], module="canny", pixel_perfect=True),
    ]
    body = {"prompt": "x", "steps": 1, "seed": 1, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": units}}}  # fmt: skip
    answer = _generate(session, url, body)
    drawn, blank = (_decoded(png) for png in answer["images"][1:])
    assert np.array_equal(drawn, np.repeat(np.asarray(drawing)[:, :, None], 3, axis=2))
    assert np.array_equal(blank, run_annotator("canny", _array(_scene()), None))
    assert 'ControlNet 0: "Module: none' in json.loads(answer["info"])["infotexts"][0]


def test_units_not_enabled_do_not_count_toward_the_three(session, url):
    units = [_unit(enabled=False), _unit(), {"module": "canny"}, _unit(), _unit(enabled="no")]  # 2 used
    body = {"prompt": EXAMPLE.prompt, "steps": 1, "seed": 1, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": units}}}  # fmt: skip
    assert len(_generate(session, url, body)["images"]) == 3  # the image and two maps


def test_detected_maps_are_left_out_when_asked(session, url):
    body = {"prompt": EXAMPLE.prompt, "steps": 1, "seed": 1, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": [_unit(save_detected_map=False), _unit()]}}}  # fmt: skip
    assert len(_generate(session, url, body)["images"]) == 2  # the image and the second unit's map
    try:
        assert session.post(f"{url}/sdapi/v1/options", json={"control_net_no_detectmap": True}).status_code == 200
        assert session.get(f"{url}/sdapi/v1/options").json()["control_net_no_detectmap"] is True
        assert len(_generate(session, url, body)["images"]) == 1
    finally:
        session.post(f"{url}/sdapi/v1/options", json={"control_net_no_detectmap": False})
    assert len(_generate(session, url, body)["images"]) == 2


def test_send_images_false_answers_no_images(session, url):
    body = {"prompt": EXAMPLE.prompt, "steps": 1, "seed": 5, "width": 128, "height": 128, "send_images": "false",
            "save_images": True, "alwayson_scripts": {"controlnet": {"args": [_unit()]}}}  # fmt: skip
    answer = _generate(session, url, body)
    assert answer["images"] == [] and json.loads(answer["info"])["all_seeds"] == [5]  # nor the detected map
    refused = session.post(f"{url}{TXT}", json=body | {"save_images": "maybe"})
    assert refused.status_code == 422 and "save_images must be true or false" in refused.json()["detail"]


@pytest.mark.parametrize("invert", [0, 1])
def test_img2img_mask_invert_and_include_init_images(session, url, invert):
    """inpainting_mask_invert=1 repaints the black area instead of the white one; the answer's
    parameters echo the init image and mask only with include_init_images."""
    init, mask = _b64(_scene()), _b64(_square_mask())
    body = {"prompt": "a red circle", "steps": 4, "seed": 4, "width": 128, "height": 128, "denoising_strength": 1.0,
            "init_images": [init], "mask": mask, "inpainting_mask_invert": invert,
            "include_init_images": bool(invert)}  # fmt: skip
    answer = _generate(session, url, body, "/sdapi/v1/img2img")
    out, before, white = _decoded(answer["images"][0]), _array(_scene()), np.asarray(_square_mask()) > 0
    kept = white if invert else ~white
    assert np.array_equal(out[kept], before[kept]) and not np.array_equal(out[~kept], before[~kept])
    echoed = answer["parameters"]
    assert (echoed["init_images"], echoed["mask"]) == (([init], mask) if invert else (None, None))


def test_detect_reads_the_inpaint_modules_masks(session, url):
    body = {"controlnet_module": "inpaint", "controlnet_input_images": [_b64(_scene())],
            "controlnet_masks": [_b64(_square_mask())], "controlnet_processor_res": 128}  # fmt: skip
    hint = _decoded(_generate(session, url, body, "/controlnet/detect")["images"][0])
    assert (hint[40:88, 40:88] == 0).all() and np.array_equal(hint[:16], _array(_scene())[:16])
    del body["controlnet_masks"]
    refused = session.post(f"{url}/controlnet/detect", json=body)
    assert refused.status_code == 422 and "the inpaint module needs controlnet_masks[0]" in refused.json()["detail"]


def test_the_schedulers_are_listed(session, url):
    listed = session.get(f"{url}/sdapi/v1/schedulers").json()
    assert [s["name"] for s in listed] == ["automatic", "uniform", "karras"]
    assert listed[2] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                         "need_inner_model": False}  # fmt: skip


def test_a_server_path_is_never_read_as_an_image(session, url, tmp_path):
    """A string naming a real picture on the server is not an image: the extension would open it."""
    picture = tmp_path / "picture.png"
    _scene().save(picture)
    for name in (str(picture), "picture.png", f"file://{picture}"):
        init = session.post(f"{url}/sdapi/v1/img2img", json={"prompt": "x", "steps": 1, "init_images": [name]})
        assert init.status_code == 422 and "init_images[0] is not valid base64" in init.json()["detail"], init.text
        detect = session.post(f"{url}/controlnet/detect", json={"controlnet_module": "canny",
                                                                 "controlnet_input_images": [name]})  # fmt: skip
        assert detect.status_code == 422 and "is not valid base64" in detect.json()["detail"], detect.text


def _unit(**fields) -> dict:
    return {"enabled": True, "image": _edges_b64(), "module": "none", "model": "canny"} | fields


def _pickle(marker: Path) -> str:
    class Opens:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return base64.b64encode(pickle.dumps(Opens())).decode()


TXT = "/sdapi/v1/txt2img"
REFUSALS = [
    (TXT, {"sampler_name": "Magic"}, "unknown sampler 'Magic'; this server has 'DPM++ 2M', 'Euler a'"),
    (TXT, {"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}, "takes scheduler automatic, karras, uniform"),
    (TXT, {"width": 100}, "width must be a multiple of 64"),
    (TXT, {"steps": 0}, "steps must be between 1 and 100, got 0"),
    (TXT, {"cfg_scale": 31}, "cfg_scale must be between 0.1 and 30"),
    (TXT, {"batch_size": 8, "n_iter": 2}, "batch_size x n_iter must be between 1 and 12 images"),
    (TXT, {"steps": 10**400}, "steps must be between 1 and 100, got 1000000"),  # no OverflowError
    (TXT, {"cfg_scale": -(10**400)}, "cfg_scale must be between 0.1 and 30, got -1000000"),
    (TXT, {"seed": 10**400}, "seed must be between -1 and 2147483647, got 1000000"),
    (TXT, {"seed": 2**32 - 1}, "seed must be between -1 and 2147483647, got 4294967295"),  # the web UI's most
    (TXT, {"batch_size": 10**400}, "batch_size x n_iter must be between 1 and 12 images"),
    (TXT, {"n_iter": 1.5}, "n_iter must be a whole number, got 1.5"),
    (TXT, {"enable_hr": True}, "enable_hr: hires fix is not supported"),
    (TXT, {"override_settings": {"sd_model_checkpoint": "nope"}}, "'nope' is not a served model"),
    (TXT, {"units": [_unit(image="/etc/passwd")]}, "ControlNet unit 0: image is not valid base64"),
    (TXT, {"units": [_unit(module="magic")]}, "ControlNet unit 0: unknown module 'magic'"),
    (TXT, {"units": [_unit(model="sd15_depth")]}, "model 'sd15_depth' is not one of this model's ControlNets"),
    (TXT, {"units": [_unit(model="None")]}, "ControlNet unit 0: no ControlNet model selected"),
    (TXT, {"units": [_unit(weight=3)]}, "ControlNet unit 0: weight must be between 0 and 2, got 3"),
    (TXT, {"units": [_unit(guidance_start=0.8, guidance_end=0.2)]}, "guidance_start (0.8) must not be after"),
    (TXT, {"units": [_unit(control_mode="Loud")]}, "control_mode must be one of 'Balanced'"),
    (TXT, {"units": [_unit(enabled="maybe")]}, "ControlNet unit 0: enabled must be true or false (or 1, 0"),
    (TXT, {"units": [_unit(pixel_perfect=[True])]}, "ControlNet unit 0: pixel_perfect must be true or false"),
    (TXT, {"units": [_unit(image="")]}, "ControlNet unit 0 is enabled but has no image"),
    (TXT, {"units": [_unit()] * 4}, "4 enabled ControlNet units; at most 3 here"),
    (TXT, {"units": [_unit(image=_b64(Image.new("RGB", (300, 300))))]}, "is 300x300 pixels, over the limit of 65536"),
    ("/sdapi/v1/img2img", {}, "init_images must be a list with one base64 image"),
    ("/controlnet/detect", {"controlnet_module": "canny"}, "no image selected"),
    ("/controlnet/detect", {"controlnet_module": "magic", "controlnet_images": ["x"]}, "unknown module 'magic'"),
    (
        "/controlnet/detect",
        {"controlnet_module": "softedge_hed", "controlnet_input_images": [_b64(_scene())]},
        "the softedge_hed annotator needs ControlNetHED.pth, which this server does not have (its administrator "
        "can get it from https://huggingface.co/lllyasviel/Annotators)",
    ),
    (TXT, {"units": [_unit(module="mlsd")]}, "the mlsd annotator needs mlsd_large_512_fp32.pth, which this server"),
]


@pytest.mark.parametrize(("path", "fields", "message"), REFUSALS)
def test_bad_requests_get_one_line_422s_and_the_server_goes_on(session, url, path, fields, message):
    fields = dict(fields)
    body = {"prompt": "x", "steps": 1, "width": 128, "height": 128} if path != "/controlnet/detect" else {}
    if "units" in fields:
        body["alwayson_scripts"] = {"ControlNet": {"args": fields.pop("units")}}
    response = session.post(f"{url}{path}", json=body | fields)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail and "Traceback" not in detail
    assert session.get(f"{url}/controlnet/version").json() == {"version": 3}


def test_nothing_a_request_carries_is_unpickled_and_the_other_refusals(session, url, tmp_path):
    marker = tmp_path / "unpickled"
    body = {
        "prompt": "x",
        "steps": 1,
        "alwayson_scripts": {"controlnet": {"args": [_unit(ipadapter_input=[_pickle(marker)])]}},
    }
    response = session.post(f"{url}{TXT}", json=body)
    assert response.status_code == 422 and "ipadapter_input is not supported" in response.json()["detail"]
    assert not marker.exists()
    assert requests.get(f"{url}/sdapi/v1/sd-models").status_code == 401  # the password guards this API too
    assert requests.post(f"{url}{TXT}", json={"prompt": "x"}, auth=("ada", "wrong")).status_code == 401
    not_json = session.post(f"{url}{TXT}", data=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and "the body is not JSON" in not_json.json()["detail"]
    digits = b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}"  # json.loads: a plain ValueError
    too_long = session.post(f"{url}{TXT}", data=digits, headers={"content-type": "application/json"})
    assert (
        too_long.status_code == 422
        and "not JSON this server reads: Exceeds the limit (4300 digits)" in (too_long.json()["detail"])
    )
    assert session.get(f"{url}/sdapi/v1/cmd-flags").status_code == 404  # what the server does not have
    huge = session.post(f"{url}{TXT}", data=b"x" * (8 * 2**20 + 1), headers={"content-type": "application/json"})
    assert huge.status_code == 413  # 8 x --max-upload-mb, as for the JSON API


def test_query_values_are_read_after_the_password_in_one_line(session, url):
    for route, name in (("module_list", "alias_names"), ("model_list", "update")):
        assert requests.get(f"{url}/controlnet/{route}", params={name: "maybe"}).status_code == 401
        for value in ("maybe", ""):
            refused = session.get(f"{url}/controlnet/{route}", params={name: value})
            detail = refused.json()["detail"]
            assert refused.status_code == 422 and isinstance(detail, str) and detail.startswith(f"{name} must be true")
    assert (
        "depth_midas" in session.get(f"{url}/controlnet/module_list", params={"alias_names": "1"}).json()["module_list"]
    )
    assert session.get(f"{url}/controlnet/model_list", params={"update": "false"}).json()["model_list"]


def _docs_example(needle: str) -> str:
    """The Python block of docs/webui.md that holds ``needle``."""
    text = (Path(__file__).parents[1] / "docs" / "webui.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if needle in b]
    return block


def test_the_docs_webuiapi_example_runs(url, tmp_path, monkeypatch, capsys):
    port = url.rsplit(":", 1)[1]
    code = _docs_example("webuiapi.WebUIApi(")
    code = code.replace("port=7860)", f"port={port}, username={AUTH[0]!r}, password={AUTH[1]!r})")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/webui.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'shipped [" in printed and "'shapes-canny [" in printed and "[1, 2]\nTrue\n" in printed
    assert sorted(p.name for p in tmp_path.glob("a1111-*.png")) == ["a1111-1.png", "a1111-2.png", "a1111-edges.png"]
    assert "Seed: 2" in Image.open(tmp_path / "a1111-2.png").text["parameters"]


def test_gradio_client_runs_the_page_generate_endpoint(url, tmp_path):
    """Gradio's own client against the page's API, logged in: the docs' example. With a password
    the endpoint is left out of the API description, so its inputs come from the page's config."""
    code = _docs_example("gradio_client").replace("http://127.0.0.1:7860/", f"{url}/")
    code = code.replace('auth=("ada", "secret"))', f'auth=("ada", "secret"), download_files={str(tmp_path)!r})')
    names: dict = {}
    exec(compile(code, "docs/webui.md", "exec"), names)
    gallery, files, info = names["gallery"], names["files"], names["info"]
    assert [item["caption"] for item in gallery] == ["detected map 0", "seed 1"] and len(files) == 2
    image = Image.open(gallery[1]["image"])
    assert image.size == (128, 128) and "Seed: 1" in image.text["parameters"]
    assert info.startswith("seeds 1 · 128x128 · 20 steps · model shipped")


@pytest.mark.parametrize(
    ("name", "scheduler", "ours"),
    [
        ("DPM++ 2M", "automatic", "dpmpp_2m_karras"),  # the web UI's default schedule for it
        ("DPM++ 2M", "Uniform", "dpmpp_2m"),
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # the name before v1.9
        ("Euler a", "automatic", "euler_a"),
        ("k_euler", None, "euler"),
        ("DDIM", None, "ddim"),
        ("UniPC", "", "unipc"),
        (None, None, "euler"),  # the API's sampler_index default
        ("dpmpp_2m_karras", None, "dpmpp_2m_karras"),  # our own names
    ],
)
def test_sampler_names_map_to_ours(name, scheduler, ours):
    assert a1111.sampler(name, scheduler)[0] == ours
    assert a1111.sampler(ours)[1] in {s.name for s in a1111.SAMPLERS}  # ours, named as the web UI names it


def test_a_units_model_is_found_as_the_extension_finds_it(tmp_path):
    files = {"controlnet": [tmp_path / "control_v11p_sd15_canny.pth", tmp_path / "control_v11f1p_sd15_depth.pth"],
             "adapter": [tmp_path / "t2iadapter_depth_sd15v2.pth"]}  # fmt: skip
    for path in (*files["controlnet"], *files["adapter"]):
        path.write_bytes(b"\0" * 100)
    found = [
        a1111.control_model(value, files, "unit")
        for value in ("control_v11p_sd15_canny [12345678]", "CONTROL_V11F1P_SD15_DEPTH", "v11f1p", "depth")
    ]
    # "depth": the shortest name that holds it, as the extension's find_closest_lora_model_name
    canny, depth = files["controlnet"]
    assert found == [
        {"controlnet": canny},
        {"controlnet": depth},
        {"controlnet": depth},
        {"adapter": files["adapter"][0]},
    ]
    with pytest.raises(RequestError, match="'openpose' is not one of this model's ControlNets"):
        a1111.control_model("openpose", files, "unit")


@contextlib.contextmanager
def _in_process(service: Service | None = None) -> Iterator:
    """The app in this process (to watch or stub its insides), in a TestClient."""
    from fastapi.testclient import TestClient

    from controlnet.serve.app import build_app

    with TestClient(build_app(service or Service(ModelRegistry(discover_models(None))))) as client:
        yield client


def test_models_load_in_the_queue_holding_their_lock_and_never_for_a_bad_body(monkeypatch):
    """A model loads as a job does (in a queue slot, holding its lock): for a generation, and for
    the options' model switch; a bad body is refused before anything loads."""
    service = Service(ModelRegistry(discover_models(None)), Limits(max_queue=2))
    loads, original = [], ModelRegistry.pipeline

    def pipeline(registry, name):
        loads.append((name, service.queue.length, registry.lock(name).locked()))
        return original(registry, name)

    monkeypatch.setattr(ModelRegistry, "pipeline", pipeline)
    with _in_process(service) as client:
        loads.clear()  # the page, built with the app, has loaded the first model for its sizes
        bad = client.post(
            TXT, json={"prompt": "x", "steps": 0, "alwayson_scripts": {"controlnet": {"args": [_unit()]}}}
        )
        assert bad.status_code == 422 and loads == []
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shipped"}).status_code == 200
        assert loads == [("shipped", 1, True)]
        answer = client.post(
            TXT, json={"prompt": "x", "steps": 1, "alwayson_scripts": {"controlnet": {"args": [_unit()]}}}
        )
        assert answer.status_code == 200, answer.text
    assert loads[1:] and all(queued == 1 and locked for _, queued, locked in loads)


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_a_server_fault_is_a_one_line_500_and_logged(monkeypatch, capsys, error):
    """A fault of the server's own (here a listing that fails) is a one-line JSON 500 naming no
    path, its traceback in the server's log; the server goes on serving. Only a RequestError is
    the client's to fix (422): a ValueError from inside the server is not."""

    def broken(alias_names=False):
        raise error("disk on fire at /srv/secret/models")

    monkeypatch.setattr(a1111, "module_list", broken)
    with _in_process() as client:
        response = client.get("/controlnet/module_list")
        assert response.status_code == 500, response.text
        detail = response.json()["detail"]
        assert detail == "the server failed to answer this request (its log says why)"
        assert client.get("/controlnet/version").json() == {"version": 3}
    log = capsys.readouterr().err
    assert "Traceback" in log and "disk on fire" in log


def test_a_units_model_is_the_file_it_names_whatever_the_model_loads(tmp_path):
    """The file a unit names is found among those the model loaded, not by an index into the
    listing read before it loaded: here a listed file that does not fit the base is left out when
    the model loads, which would shift the index of the next."""
    from controlnet.serve.service import ModelEntry

    unfit = tmp_path / "aaa-unfit.safetensors"
    save_ldm(unfit, controlnet=random_tiny_models(seed=1)[1])  # a ControlNet for another base
    entry = ModelEntry("served", shipped.base_path(), [unfit, shipped.canny_path()])
    service = Service(ModelRegistry([entry]))
    listed = service.registry.control_files("served")  # before loading: both files
    assert [path.name for path in listed["controlnet"]] == ["aaa-unfit.safetensors", "shapes-canny.safetensors"]
    body = {"prompt": EXAMPLE.prompt, "steps": 1, "seed": 1, "width": 128, "height": 128,
            "alwayson_scripts": {"controlnet": {"args": [_unit(model="shapes-canny")]}}}  # fmt: skip
    translated = a1111.generation(body, False, "served", listed, service.limits)
    response = service.generate(translated.request)
    assert response.settings["controls"][0]["controlnet"] == 0  # the canny file, the one the model loaded
    assert "shapes-canny [" in response.image_texts[0]["parameters"]
    body["alwayson_scripts"]["controlnet"]["args"] = [_unit(model="aaa-unfit")]
    translated = a1111.generation(body, False, "served", listed, service.limits)
    with pytest.raises(RequestError, match=r"control unit 0: model 'served' did not load aaa-unfit\.safetensors"):
        service.generate(translated.request)


def test_unit_defaults_ranges_and_modes_come_from_the_settings(monkeypatch):
    """settings.py is the one definition: the unit's defaults, the modes' order (the old integers),
    processor_res's range and step, and the unit count."""
    import dataclasses

    from controlnet import settings

    changed = {"strength": 0.5, "start": 0.1, "end": 0.9, "mode": "prompt", "resize_mode": "just_resize"}
    for name, default in changed.items():
        monkeypatch.setitem(settings.UNIT, name, dataclasses.replace(settings.UNIT[name], default=default))
    resolution = dataclasses.replace(settings.UNIT["annotator_resolution"], default=256, multiple_of=32)
    monkeypatch.setitem(settings.UNIT, "annotator_resolution", resolution)
    monkeypatch.setitem(
        settings.UNIT, "mode", dataclasses.replace(settings.UNIT["mode"], choices=("control", "prompt"))
    )
    files = {"controlnet": [shipped.canny_path()], "adapter": []}
    unit, _ = a1111.control_unit(_unit(), "unit", files, Limits(), a1111.UnitImages(None, None))
    assert [getattr(unit, name) for name in changed] == list(changed.values())
    assert a1111.processor_res(100, "unit") == 96 and a1111.processor_res(-1, "unit") == 256
    unit, _ = a1111.control_unit(_unit(control_mode=0), "unit", files, Limits(), a1111.UnitImages(None, None))
    assert unit.mode == "control"  # the first of the setting's choices
    assert settings.UNIT_COUNT == 3
    with pytest.raises(RequestError, match=r"4 enabled ControlNet units; at most 3 here"):
        a1111.script_args({"alwayson_scripts": {"controlnet": {"args": [_unit()] * 4}}})


def test_the_api_is_written_in_functions_of_at_most_50_lines():
    """Helpers under ~50 lines (the design notes): the routes come in groups, their work and state in a class."""
    import ast

    import controlnet.serve.a1111_routes as routes

    for module in (a1111, routes):
        tree = ast.parse(Path(module.__file__).read_text())
        long = [
            (node.name, node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50
        ]
        assert long == [], module.__name__


def test_thresholds_set_only_the_sliders_listed_and_are_ignored_without():
    assert a1111.slider_params("canny", (50, -1), "unit") == {"low_threshold": 50}
    assert a1111.slider_params("mlsd_lsd", (0.5, 7), "unit") == {"thr_d": 0.5}  # one slider
    assert a1111.slider_params("invert", (5, 7), "unit") == {}  # none: ignored, as module_list shows
    assert [s["name"] for s in a1111.module_detail("invert")["sliders"]] == ["Resolution"]


@pytest.mark.parametrize(
    ("value", "used"),
    [(True, True), (1, True), ("true", True), ("Yes", True), ("on", True), ("t", True), (1.0, True),
     (False, False), (0, False), ("false", False), ("NO", False), ("off", False), (None, False)],
)  # fmt: skip
def test_flags_are_read_as_the_extensions_pydantic_unit_reads_them(value, used):
    files, nothing = {"controlnet": [shipped.canny_path()], "adapter": []}, a1111.UnitImages(None, None)
    made = a1111.control_unit(_unit(enabled=value), "unit", files, Limits(), nothing)
    assert (made is not None) == used
    if used:
        unit, save = a1111.control_unit(_unit(enabled=value, pixel_perfect=value, save_detected_map="0"), "unit",
                                        files, Limits(), nothing)  # fmt: skip
        assert unit.pixel_perfect is True and save is False


def test_each_model_is_hashed_once_however_many_ask_at_first(monkeypatch, tmp_path):
    """Concurrent first listings wait for one hash per model; ControlNet titles (read by every unit
    of every request) are kept while their file is unchanged."""
    import os

    from controlnet.serve.a1111_routes import A1111Api

    hashed: list[str] = []
    title = a1111.checkpoint_title

    def slow_title(name, base):
        hashed.append(name)
        time.sleep(0.2)
        return title(name, base)

    monkeypatch.setattr(a1111, "checkpoint_title", slow_title)
    state = A1111Api(Service(ModelRegistry(discover_models(None))))
    threads = [threading.Thread(target=state.checkpoints) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert hashed == ["shipped"] and state.current_options()["sd_model_checkpoint"].startswith("shipped [")

    reads: list[Path] = []
    read = a1111.old_model_hash
    monkeypatch.setattr(a1111, "old_model_hash", lambda path: reads.append(path) or read(path))
    control = tmp_path / "control_v11p_sd15_canny.pth"
    control.write_bytes(bytes(range(256)) * 5000)
    files = {"controlnet": [control], "adapter": []}
    for _ in range(3):
        a1111.control_model("control_v11p_sd15_canny [00000000]", files, "unit")
    assert reads == [control]
    stat = control.stat()
    os.utime(control, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # the file changed: read again
    assert a1111.model_title(control).startswith("control_v11p_sd15_canny [") and reads == [control, control]

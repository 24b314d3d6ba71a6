"""The web UI in a real browser: Playwright drives Debian's headless Chromium against `controlnet serve`
on the shipped model. Load the page, upload a control image, preview its map, generate, and find the
detected map and the requested number of images in the gallery (a screenshot is saved); reuse the
last seed; cancel a long generation; paint an inpainting mask; log in with --auth, pick a model
from a --models folder and a T2I-Adapter in a unit's model menu."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet import shipped

from .helpers import serve_in_background, write_tiny_adapter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (make test installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    # an empty annotators folder: the network annotators' weights are missing, whatever this machine has
    with serve_in_background(folder, "--annotators-dir", str(folder / "annotators")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.set_default_timeout(120_000)  # a busy 2-core machine renders slowly
    page.goto(url, wait_until="load")
    return page


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def run(page, count: int, info_contains: str = "seeds", timeout: float = 120) -> list[np.ndarray]:
    """Click Run; once the PNG list has changed (each file name carries a counter), the gallery shows
    ``count`` pictures and the info line says ``info_contains``, return the gallery's pictures."""
    files, gallery, info = page.locator("#files"), page.locator("#gallery img"), page.locator("#info")
    before = files.inner_text()
    page.locator("#run").click()
    deadline = time.monotonic() + timeout
    while files.inner_text() == before or gallery.count() < count or info_contains not in info.inner_text():
        assert time.monotonic() < deadline, f"no result: {info.inner_text()!r}"
        page.wait_for_timeout(250)
    assert gallery.count() == count, info.inner_text()
    pictures = []
    for i in range(count):
        response = page.request.get(gallery.nth(i).get_attribute("src"))
        assert response.ok
        pictures.append(np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB")))
    return pictures


def shown_seeds(page) -> list[int]:
    match = re.search(r"seeds ([\d, ]+)", page.locator("#info").inner_text())
    assert match, page.locator("#info").inner_text()
    return [int(s) for s in match.group(1).split(",")]


def test_upload_preview_generate_and_gallery(server, browser, tmp_path):
    example = shipped.examples()[0]
    page = open_page(browser, server)
    page.locator("#run").click()  # nothing to go on: a one-line error in the page, no traceback
    page.get_by_text("give a prompt or a control image (or both)").first.wait_for()
    page.locator("#prompt textarea").fill(example.prompt)
    page.locator("#unit0_image input[type=file]").set_input_files(str(example.scene))  # Canny finds its edges
    page.locator("#unit0_preview").click()
    page.locator("#unit0_map img").wait_for()  # the annotator's preview
    set_number(page, "num_images", 2)
    pictures = run(page, 3)  # the detected map and the 2 images asked for
    assert pictures[0].shape == pictures[1].shape == (128, 128, 3)
    assert len(set(shown_seeds(page))) == 2
    screenshot = Path(os.environ.get("WEBUI_SCREENSHOT", tmp_path / "webui.png"))
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    page.close()


def pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_a_units_annotator_shows_its_parameters_and_missing_weights(server, browser):
    page = open_page(browser, server)
    number0 = page.locator("#unit0_number0")
    assert "low threshold" in number0.inner_text() and page.locator("#unit0_number1").is_visible()  # canny's
    pick(page, "unit0_annotator", "scribble")
    # scribble has one parameter: its label replaces canny's and the second slot hides
    page.wait_for_function("!document.querySelector('#unit0_number0').innerText.includes('low threshold')")
    page.locator("#unit0_number1").wait_for(state="hidden")
    assert "threshold" in number0.inner_text()
    page.locator("#unit0_image input[type=file]").set_input_files(str(shipped.examples()[0].scene))
    page.locator("#unit0_preview").click()
    page.locator("#unit0_map img").wait_for()  # the scribble map
    # a network annotator whose weight file this server lacks: the menu and the unit say so, and its
    # preview is a one-line message naming the file, not a trace
    pick(page, "unit0_annotator", "mlsd (weights missing)")
    page.get_by_text("mlsd cannot run on this server").wait_for()
    assert "mlsd_large_512_fp32.pth" in page.locator("#unit0_weights").inner_text()
    page.wait_for_function("document.querySelector('#unit0_number0').innerText.includes('thr v')")
    page.locator("#unit0_preview").click()
    page.get_by_text("needs mlsd_large_512_fp32.pth, which this server does not have").first.wait_for()
    assert page.get_by_text("Traceback").count() == 0
    page.close()


def test_a_pose_json_uploaded_to_a_unit_is_drawn_as_its_map(server, browser, tmp_path):
    from controlnet.annotators.posejson import render_pose_json

    pose = {
        "people": [{"pose_keypoints_2d": [v for x, y in [(64, 30), (64, 60), (40, 60), (30, 95)] for v in (x, y, 1)]}],
        "canvas_width": 128,
        "canvas_height": 128,
    }
    pose["people"][0]["pose_keypoints_2d"] += [0] * 42
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(pose))
    page = open_page(browser, server)
    page.locator("#unit0_pose input[type=file]").set_input_files(str(path))
    page.locator("#unit0_preview").click()
    page.locator("#unit0_map img").wait_for()
    response = page.request.get(page.locator("#unit0_map img").get_attribute("src"))
    drawn = np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))
    assert drawn.any() and (drawn.reshape(-1, 3).max(axis=1) > 0).mean() < 0.2  # a skeleton on black
    page.locator("#prompt textarea").fill("a person")
    (detected, _) = run(page, 2)  # the drawn map and the image: the pose drove the unit, canny was not run
    np.testing.assert_array_equal(detected, render_pose_json(path))  # its 128 px canvas is the output size
    page.close()
    bad = tmp_path / "bad.json"
    bad.write_text('{"people": []}')
    page = open_page(browser, server)
    page.locator("#unit0_pose input[type=file]").set_input_files(str(bad))
    page.locator("#unit0_preview").click()
    page.get_by_text("the pose JSON has no canvas_width and canvas_height").first.wait_for()
    page.close()


def test_reuse_last_seed_repeats_the_image(server, browser):
    page = open_page(browser, server)
    page.locator("#prompt textarea").fill("a red square on a green background")
    (first,) = run(page, 1)  # seed -1: a random one
    (seed,) = shown_seeds(page)
    page.locator("#reuse_seed").click()
    page.wait_for_function(f"document.querySelector('#seed input').value === '{seed}'")
    (again,) = run(page, 1)
    assert shown_seeds(page) == [seed]
    np.testing.assert_array_equal(again, first)
    page.close()


def test_cancel_stops_a_long_generation_between_steps(server, browser):
    page = open_page(browser, server)
    page.locator("#prompt textarea").fill("a blue circle")
    set_number(page, "steps", 100)
    set_number(page, "resolution", 768)  # about a second a step here: minutes for the whole run
    set_number(page, "num_images", 4)
    page.locator("#run").click()
    page.get_by_text("sampling").first.wait_for()  # the progress bar
    started = time.monotonic()
    page.locator("#cancel").click()
    stopped = page.get_by_text(re.compile(r"stopped after \d+ of 100 steps")).first
    stopped.wait_for()
    assert time.monotonic() - started < 60
    done = int(re.search(r"after (\d+) of", stopped.inner_text()).group(1))
    assert done < 100
    assert page.locator("#gallery img").count() == 0
    page.close()


def test_inpaint_repaints_only_the_painted_area(server, browser):
    example = shipped.examples()[1]
    picture = np.asarray(Image.open(example.scene).convert("RGB"))
    page = open_page(browser, server)
    page.locator("#prompt textarea").fill(example.other_prompt)
    page.locator("#unit0_enabled input").uncheck()
    page.get_by_text("img2img and inpainting").click()
    page.locator("#inpaint input").check()
    page.locator("#run").click()  # inpainting without a picture: said so in the page
    page.get_by_text("there is no init image").first.wait_for()
    # Through the file chooser, as a user does: the click waits until the editor takes input (setting
    # the hidden <input> directly could land before the editor listens, and nothing would load).
    dropzone = page.locator("#init_image").get_by_text("Upload an image")
    with page.expect_file_chooser() as chooser:
        dropzone.click()
    chooser.value.set_files(str(example.scene))
    dropzone.wait_for(state="detached")
    page.locator("#run").click()  # a picture but nothing painted on it
    page.get_by_text("nothing is painted").first.wait_for()

    page.locator("#init_image button[title=Brush]").click()
    box = page.locator("#init_image canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 30, y - 30)
    page.mouse.down()
    for i in range(1, 21):  # a diagonal stroke through the middle of the picture
        page.mouse.move(x - 30 + 3 * i, y - 30 + 3 * i, steps=2)
    page.mouse.up()
    (result,) = run(page, 1, info_contains="inpainted")
    area = float(re.search(r"inpainted (\d+)%", page.locator("#info").inner_text()).group(1)) / 100
    assert 0.02 < area < 0.6
    changed = (np.abs(result.astype(int) - picture.astype(int)).max(axis=-1) > 8).mean()
    assert 0.005 < changed <= area + 0.02  # repainted inside the stroke, the rest kept
    corners = np.concatenate([result[:12, :12], result[-12:, -12:]])
    np.testing.assert_array_equal(corners, np.concatenate([picture[:12, :12], picture[-12:, -12:]]))
    page.close()


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """`--auth` and a `--models` folder holding a copy of the shipped model, a T2I-Adapter for it
    (random weights) and a file that is not a model."""
    from controlnet.config import SHAPES

    models = tmp_path_factory.mktemp("models")
    shutil.copy(shipped.base_path(), models / "copy.safetensors")
    shutil.copy(shipped.canny_path(), models / "copy-canny.safetensors")
    write_tiny_adapter(models / "t2iadapter_shapes.pth", seed=1, channels=SHAPES.unet.level_channels)
    (models / "broken.safetensors").write_bytes(b"not a model")
    folder = tmp_path_factory.mktemp("guarded")
    with serve_in_background(folder, "--auth", "alice:secret", "--models", str(models)) as (url, _):
        yield url


def test_login_then_pick_a_model_from_the_folder(guarded_server, browser):
    page = open_page(browser, guarded_server)
    assert "copy.safetensors" not in page.content()  # nothing about the models before logging in
    page.get_by_label("username").fill("alice")
    page.get_by_label("password").fill("wrong")
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Incorrect Credentials").wait_for()
    page.get_by_label("username").fill("alice")
    page.get_by_label("password").fill("secret")
    page.get_by_role("button", name="Login").click()

    # The shipped model's unit menu: each shipped ControlNet and adapter by name and the maps it reads.
    page.locator("#unit0_model input").click()
    options = page.get_by_role("option")
    options.first.wait_for()
    names = [options.nth(i).inner_text().split("\n")[-1] for i in range(options.count())]
    labels = {"controlnet": "ControlNet", "adapter": "T2I-Adapter"}
    shipped_models = [*shipped.controls("controlnet"), *shipped.controls("adapter")]
    assert names == [f"{labels[c.kind]}: {c.name} ({c.description})" for c in shipped_models]
    page.keyboard.press("Escape")
    page.get_by_role("option").first.wait_for(state="detached")  # closed, or the next menu's list would hold both

    page.locator("#model input").click()
    options = page.get_by_role("option")
    options.first.wait_for()
    names = [options.nth(i).inner_text().split("\n")[-1] for i in range(options.count())]
    assert names == ["shipped", "copy.safetensors"]  # the broken file is not offered
    page.get_by_role("option", name="copy.safetensors").click()
    page.locator("#prompt textarea").fill("a yellow triangle on a purple background")
    run(page, 1, info_contains="model copy.safetensors")

    # The folder's model offers its ControlNet and the adapter in each unit's model menu.
    page.locator("#unit0_model input").click()
    options = page.get_by_role("option")
    options.first.wait_for()
    names = [options.nth(i).inner_text().split("\n")[-1] for i in range(options.count())]
    assert names == ["ControlNet: copy-canny.safetensors", "T2I-Adapter: t2iadapter_shapes.pth"]
    page.get_by_role("option", name="T2I-Adapter: t2iadapter_shapes.pth").click()
    page.locator("#unit0_image input[type=file]").set_input_files(str(shipped.examples()[0].control))
    page.locator("#unit0_annotator input").click()
    page.get_by_role("option", name="none", exact=True).click()
    run(page, 2, info_contains="model copy.safetensors")
    image = page.request.get(page.locator("#gallery img").nth(1).get_attribute("src"))
    parameters = Image.open(io.BytesIO(image.body())).text["parameters"]
    assert 'ControlNet 0: "Module: none, Model: t2iadapter_shapes [' in parameters
    page.close()

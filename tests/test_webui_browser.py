"""The web UI in a real browser: Playwright drives Debian's headless Chromium against `controlnet serve`
on the shipped model: load the page, upload a control image, preview its map, generate, and find the
detected map and the requested number of images in the gallery. A screenshot is saved."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from controlnet import shipped

from .helpers import serve_in_background

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (make test installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_in_background(tmp_path_factory.mktemp("serve")) as (url, _):
        yield url


def test_upload_preview_generate_and_gallery(server, tmp_path):
    example = shipped.examples()[0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(120_000)  # a busy 2-core machine renders slowly
        page.goto(server, wait_until="load")
        page.locator("#run").click()  # nothing to go on: a one-line error in the page, no traceback
        page.get_by_text("give a prompt or a control image (or both)").first.wait_for()
        page.locator("#prompt textarea").fill(example.prompt)
        page.locator("#unit0_image input[type=file]").set_input_files(str(example.scene))  # Canny finds its edges
        page.locator("#unit0_preview").click()
        page.locator("#unit0_map img").wait_for()  # the annotator's preview
        images = page.locator("#num_images input[type=number]")
        images.fill("2")
        images.press("Enter")
        page.locator("#run").click()
        gallery = page.locator("#gallery img")
        deadline = time.monotonic() + 120
        while gallery.count() < 3 and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        assert gallery.count() == 3  # the detected map and the 2 images asked for
        assert "seeds" in page.locator("#info").inner_text()
        screenshot = Path(os.environ.get("WEBUI_SCREENSHOT", tmp_path / "webui.png"))
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000
        browser.close()

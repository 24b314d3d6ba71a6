"""`controlnet serve` against an attacker (docs/security.md): no input of the page can make the server
read, copy, serve or fetch a file that was not uploaded through it, with or without a password,
through any of the three independent layers alone; the server answers only its own routes, bounds
every request (bodies while they stream, uploads from their header, prompts, output sizes), answers
every bad request with a one-line JSON error and no server path, keeps nothing for the JSON API,
bounds and removes what the page keeps, and offers only the files inside --models."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet import shipped
from controlnet.formats.ldm import save_ldm
from controlnet.models.tiny import random_tiny_models
from controlnet.serve.files import Retention, ServerFiles
from controlnet.serve.service import (
    SHIPPED,
    Limits,
    ModelEntry,
    ModelRegistry,
    ModelUnavailable,
    Service,
    discover_models,
)

pytest.importorskip("gradio")
from fastapi.testclient import TestClient

from controlnet.serve import security
from controlnet.serve.app import build_app

from .helpers import _free_port

EDGES = shipped.examples()[0].control
SECRET = "controlnet-secret-3f9a1c"  # what the secret files hold: it must never come back


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> dict[str, Path]:
    """Files the server must never read: text and a real PNG, outside its folder but in the system's
    temporary folder (which Gradio allows by default), and a model's weights."""
    folder = Path(tempfile.mkdtemp(prefix="secret-"))
    text = folder / "secret.txt"
    text.write_text(SECRET)
    picture = folder / "secret.png"
    image = np.zeros((64, 64, 3), np.uint8)
    picture.write_bytes(_png_bytes(image) + SECRET.encode())  # a valid PNG carrying the secret after its end
    yield {"text": text, "picture": picture, "weights": shipped.canny_path()}
    for path in (text, picture):
        path.unlink()
    folder.rmdir()


@pytest.fixture(scope="module")
def service() -> Service:
    return Service(ModelRegistry(discover_models(None)), Limits(max_queue=4))


@contextmanager
def serving(service: Service, auth=None, retention=None) -> Iterator[tuple[TestClient, object]]:
    """The app in a TestClient (its lifespan runs: the folder goes at the end), logged in if ``auth``."""
    app = build_app(service, auth, retention)
    with TestClient(app) as client:
        if auth is not None:
            response = client.post("/login", data={"username": auth[0], "password": auth[1]})
            assert response.status_code == 200, response.text
        yield client, app


def _page_app(app):
    """The app behind RequestGuard, and the Gradio page (to take a layer away)."""
    inner = app.app
    mounted = next(route.app for route in inner.routes if hasattr(getattr(route, "app", None), "get_blocks"))
    return inner, mounted.get_blocks()


def run_event(client: TestClient, fn_index: int, data: list, session: str = "s1") -> tuple[int, list[dict]]:
    """Run one event of the page as the browser does (queue/join, then its event stream): the join's
    status and the stream's messages."""
    join = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session})
    if join.status_code != 200:
        return join.status_code, [join.json()]
    messages = []
    with client.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                messages.append(message)
                if message.get("msg") in ("process_completed", "close_stream"):
                    break
    return join.status_code, messages


def _events(client: TestClient) -> tuple[dict, list[tuple[int, list[int]]]]:
    config = client.get("/config").json()
    components = {c["id"]: c for c in config["components"]}
    events = [(i, d["inputs"]) for i, d in enumerate(config["dependencies"]) if d["inputs"]]
    return components, events


def _defaults(components: dict, inputs: list[int]) -> list:
    return [components[i]["props"].get("value") for i in inputs]


def _file(path: str, stream: bool = False) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, **({"is_stream": True} if stream else {})}


def _attacks(secrets: dict[str, Path]) -> list[str]:
    picture = secrets["picture"]
    return [
        str(picture),  # absolute, in the temporary folder
        os.path.relpath(picture),  # relative to the server's working directory
        str(picture.parent / ".." / picture.parent.name / picture.name),
        str(secrets["weights"]),
        "/etc/passwd",
        "http://127.0.0.1:9/secret.png",  # never fetched
    ]


def _editor_attack(path: str, stream: bool = False) -> dict:
    file = _file(path, stream)
    return {"background": file, "layers": [file], "composite": file, "id": None}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_nothing_leaked(
    client: TestClient, files: ServerFiles, messages: list, secrets: dict[str, Path], sent: str = ""
) -> None:
    # An error may quote what the client sent (Gradio's "Value: ... is not in the list of choices"):
    # that tells the client nothing; a path the server resolved or read would.
    text = json.dumps(messages).replace(json.dumps(sent)[1:-1], "<sent>") if sent else json.dumps(messages)
    for path in (*secrets.values(), Path.cwd()):
        assert str(path) not in text, f"a server path in an answer: {text[:500]}"
    assert SECRET not in text
    # A finished job names its results' files (Gradio's file objects carry their path); an error names none.
    errors = json.dumps([message for message in messages if message.get("success") is not True])
    assert str(files.root) not in errors, errors[:500]
    forbidden = {_digest(path) for path in (*secrets.values(), Path("/etc/passwd"))}
    for path in files.root.rglob("*"):
        if path.is_file():
            assert _digest(path) not in forbidden and SECRET.encode() not in path.read_bytes(), f"{path} is a copy"
    for secret in secrets.values():
        assert client.get(f"/gradio_api/file={secret}").status_code in (403, 404)


LAYERS = ["all", "Gradio's check alone", "the block guards alone"]


@pytest.mark.parametrize("layers", LAYERS)
def test_no_input_of_any_event_reads_a_server_file(service, secrets, layers):
    """Every input of every event (not only the file inputs: Gradio copies a file object given to
    any component), every way of naming a file; each layer alone is enough."""
    gradio_default = Path(tempfile.gettempdir()) / "gradio"
    before = set(gradio_default.rglob("*")) if gradio_default.exists() else set()
    with serving(service) as (client, app):
        files = app.files
        if layers != "all":
            app._checked_event = app._limited  # RequestGuard passes events on unread
            page = _page_app(app)[1]
            if layers == "the block guards alone":
                page.has_launched = False
            else:  # every block's own methods again: no guard of ours on any of them
                for block in page.blocks.values():
                    for method in ("move_resource_to_block_cache", "async_move_resource_to_block_cache",
                                   "preprocess", "convert_and_format_image"):  # fmt: skip
                        vars(block).pop(method, None)
        components, events = _events(client)
        assert len(events) >= 5  # generate (button and Enter), previews, model change, reuse seed
        tried = 0
        for fn_index, inputs in events:
            for position, component in enumerate(inputs):
                # is_stream: Gradio reads such a file where it is, without copying it to its cache.
                for path, stream in [(path, stream) for path in _attacks(secrets) for stream in (False, True)]:
                    data = _defaults(components, inputs)
                    kind = components[component]["type"]
                    data[position] = _editor_attack(path, stream) if kind == "imageeditor" else _file(path, stream)
                    status, messages = run_event(client, fn_index, data)
                    tried += 1
                    if layers == "all":
                        assert status == 400, messages
                        assert messages[0]["error"] == "a request may name only files uploaded through this page"
                    elif kind in ("image", "imageeditor"):
                        assert messages[-1].get("success") is False, messages
                        if layers == "the block guards alone":
                            error = messages[-1]["output"]["error"]
                            assert error == "that file was not uploaded through this page; upload it again"
                    # Other inputs may take the object as a value (a textbox makes it a string): what
                    # matters is that no file was read, copied or fetched.
                    _assert_nothing_leaked(client, files, messages, secrets, sent=path)
        assert tried > 600
    after = set(gradio_default.rglob("*")) if gradio_default.exists() else set()
    assert after == before  # Gradio's shared default folder is never used


def test_with_a_password_a_logged_in_user_reads_no_server_file_either(service, secrets):
    with serving(service, auth=("ada", "secret")) as (client, app):
        components, events = _events(client)
        generate = next((i, inputs) for i, inputs in events if len(inputs) > 20)
        for path in _attacks(secrets):
            for position in range(len(generate[1])):
                data = _defaults(components, generate[1])
                data[position] = _file(path)
                status, messages = run_event(client, generate[0], data)
                assert status == 400
                _assert_nothing_leaked(client, app.files, messages, secrets, sent=path)
        client.cookies.clear()  # logged out: nothing at all
        assert client.get("/gradio_api/file=/etc/passwd").status_code in (401, 403, 404)
        assert client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0}).status_code in (401, 403)


def test_the_component_guard_refuses_urls_and_outside_paths_on_its_own(service, secrets, tmp_path):
    files = ServerFiles(parent=tmp_path)
    try:
        inside = files.gradio / "upload.png"
        inside.write_bytes(EDGES.read_bytes())
        security._check_source(files, str(inside))  # no error
        for path in [*_attacks(secrets), str(files.gradio / ".." / ".." / "x"), "file:///etc/passwd"]:
            with pytest.raises(Exception, match="not uploaded through this page") as refused:
                security._check_source(files, path)
            assert path not in str(refused.value)
        link = files.gradio / "link.png"
        link.symlink_to(secrets["picture"])
        with pytest.raises(Exception, match="not uploaded through this page"):
            security._check_source(files, str(link))  # a link inside that leads out
    finally:
        files.close()


# -- routes and files ------------------------------------------------------------------------------


def test_only_the_pages_routes_answer_and_files_come_only_from_the_servers_folder(service, secrets):
    with serving(service) as (client, app):
        refused = [
            "/gradio_api/file=/etc/passwd",
            f"/gradio_api/file={secrets['text']}",
            f"/gradio_api/file={app.files.gradio}/../../{secrets['text'].parent.name}/secret.txt",
            "/gradio_api/file=http://127.0.0.1:9/x",
            "/gradio_api/file/etc/passwd",
            "/gradio_api/proxy=http://127.0.0.1:9/x",
            "/gradio_api/stream/abc/playlist.m3u8",
            "/gradio_api/run-history/records",
            "/gradio_api/vibe-code",
            "/gradio_api/profiling/traces",
            "/monitoring",
            "/docs",
            "/openapi.json",
        ]
        for url in refused:
            response = client.get(url)
            assert response.status_code == 404, url
            assert set(response.json()) == {"error"}
        assert client.post("/gradio_api/process_recording").status_code == 404
        assert client.get("/").status_code == 200 and client.get("/config").status_code == 200
        # What the page stores is served: generate through Gradio's API, then download the image.
        upload = client.post("/gradio_api/upload", files={"files": ("edges.png", EDGES.read_bytes(), "image/png")})
        assert upload.status_code == 200, upload.text
        uploaded = upload.json()[0]
        assert app.files.contains(uploaded)
        components, events = _events(client)
        fn_index, inputs = next((i, inputs) for i, inputs in events if len(inputs) > 20)
        data = _defaults(components, inputs)
        by_id = {component: position for position, component in enumerate(inputs)}
        image_id = next(c for c in inputs if components[c]["props"].get("elem_id") == "unit0_image")
        prompt_id = next(c for c in inputs if components[c]["props"].get("elem_id") == "prompt")
        steps_id = next(c for c in inputs if components[c]["props"].get("elem_id") == "steps")
        data[by_id[image_id]] = _file(uploaded)
        data[by_id[prompt_id]] = "a red circle on a blue background"
        data[by_id[steps_id]] = 2
        status, messages = run_event(client, fn_index, data)
        assert status == 200 and messages[-1]["success"], messages[-1]
        urls = [item["image"]["url"] for item in messages[-1]["output"]["data"][0]]
        assert len(urls) == 2  # the detected map and the image
        for url in urls:
            path = url.split("/gradio_api/file=", 1)[1]
            assert app.files.contains(path)
            response = client.get(f"/gradio_api/file={path}")
            assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


# -- bounded requests -------------------------------------------------------------------------------


class _Body:
    """An ASGI receive that yields ``chunks`` pieces of ``size`` bytes and counts what was taken."""

    def __init__(self, chunks: int, size: int) -> None:
        self.chunks, self.size, self.taken = chunks, size, 0

    async def __call__(self):
        self.taken += 1
        more = self.taken < self.chunks
        return {"type": "http.request", "body": b"x" * self.size, "more_body": more}


def _guard_run(path: str, body: _Body, headers=()) -> tuple[int, bool]:
    """Drive RequestGuard in front of an app that reads its whole body: (status sent, app finished)."""
    import anyio

    sent, finished = [], []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("the client went away")  # as Starlette's ClientDisconnect
            if not message.get("more_body"):
                break
        finished.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    files = ServerFiles()
    try:
        guard = security.RequestGuard(app, files, max_body=10 * 2**20)
        scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
        anyio.run(guard, scope, body, send)
    finally:
        files.close()
    return sent[0], bool(finished)


@pytest.mark.parametrize("path", ["/api/generate", "/gradio_api/queue/join", "/gradio_api/upload"])
def test_a_chunked_body_is_refused_while_it_streams(path):
    body = _Body(chunks=400, size=2**20)  # 400 MB with no length announced
    status, finished = _guard_run(path, body)
    assert status == 413 and not finished
    assert body.taken <= 11  # stopped just past the 10 MB limit: the rest is never read
    ok = _Body(chunks=5, size=2**20)
    assert _guard_run(path, ok) == (200, True) and ok.taken == 5


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    body = _Body(chunks=1, size=10)
    status, finished = _guard_run("/api/generate", body, [(b"content-length", str(400 * 2**20).encode())])
    assert status == 413 and body.taken == 0 and not finished


def test_page_uploads_are_checked_for_pixels_before_any_decoding(monkeypatch):
    small = Service(ModelRegistry(discover_models(None)), Limits(max_pixels=32 * 32))
    decoded = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im.size) or original_load(im))
    with serving(small) as (client, _app):
        upload = client.post("/gradio_api/upload", files={"files": ("big.png", EDGES.read_bytes(), "image/png")})
        uploaded = upload.json()[0]
        components, events = _events(client)
        fn_index, inputs = next((i, inputs) for i, inputs in events if len(inputs) > 20)
        for elem_id, value in [("unit0_image", _file(uploaded)), ("init_image", _editor_attack(uploaded))]:
            data = _defaults(components, inputs)
            position = next(p for p, c in enumerate(inputs) if components[c]["props"].get("elem_id") == elem_id)
            data[position] = value
            decoded.clear()
            _status, messages = run_event(client, fn_index, data)
            assert "128x128 pixels, over the limit of 1024" in messages[-1]["output"]["error"], messages[-1]
            assert (128, 128) not in decoded  # refused from the header


def test_the_inpaint_editor_blobs_are_bounded(service):
    with serving(service) as (client, app):
        _inner, page = _page_app(app)
        editor = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "init_image")

        def send(content: bytes, **fields: str):
            form = {"session_hash": "s1", "component_id": str(editor._id), "fn_name": "accept_blobs", **fields}
            return client.post(
                "/gradio_api/component_server", data=form, files={"files": ("layer.png", content, "image/png")}
            )

        refused = [
            (
                EDGES.read_bytes(),
                {"id": "edit", "type": "layer", "index": "1000000000"},
                "layer index must be null or below",
            ),
            (b"not an image", {"id": "edit", "type": "layer", "index": "0"}, "not an image"),
            (EDGES.read_bytes(), {"id": "edit", "index": "0"}, "needs an id and a type"),
            (EDGES.read_bytes(), {"type": "layer", "index": "0"}, "needs an id and a type"),
        ]
        for content, fields, message in refused:
            response = send(content, **fields)
            assert response.status_code == 400 and message in response.json()["detail"], response.text
        assert editor.blob_storage == {}
        for i in range(security.MAX_PENDING_EDITS + 10):
            response = send(EDGES.read_bytes(), id=f"edit{i}", type="background", index="null")
            assert response.status_code == 200, response.text
        assert len(editor.blob_storage) == security.MAX_PENDING_EDITS


# -- the JSON API -----------------------------------------------------------------------------------


def _edges_b64() -> str:
    return base64.b64encode(EDGES.read_bytes()).decode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"prompt": "caf\xe9"}', "the body is not UTF-8"),
        (b'{"prompt": "x", "steps": NaN}', "steps must be a number"),
        (b'{"prompt": "x", "guidance_scale": NaN}', "guidance scale must be a number, got nan"),
        (b'{"prompt": "x", "guidance_scale": Infinity}', "guidance scale must be a number, got inf"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'"just a string"', "must be a JSON object"),
        (json.dumps({"prompt": "a\u0000b"}).encode(), "the prompt contains a NUL character"),
        (json.dumps({"prompt": "a\ud800b"}).encode(), "lone surrogate"),
        (json.dumps({"prompt": "x", "negative_prompt": "n" * 4 * 2**20}).encode(), "the negative prompt is 4,194,304"),
        (json.dumps({"prompt": " ".join(["red"] * 700)}).encode(), "700 tokens long; the limit is 600"),
        (json.dumps({"prompt": "x", "eta": 1.5}).encode(), "eta must be between 0 and 1"),
        (json.dumps({"prompt": "x", "seed": 10**400}).encode(), "seed must be between -1 and 2147483647, got 1000"),
        (b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}", "not JSON this server reads: Exceeds the limit (4300"),
    ],
)
def test_bad_bodies_get_a_400_with_one_line(service, body, message, monkeypatch):
    from controlnet.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "generate", lambda *a, **k: pytest.fail("a bad request reached the model"))
    with serving(service) as (client, _app):
        response = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error and len(error) < 300


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_a_server_fault_is_a_one_line_500_and_logged(service, monkeypatch, capsys, error):
    """A fault of the server's own (a bug, the machine failing) is a one-line JSON 500 naming no
    path, its traceback in the server's log; the server goes on serving. Only a RequestError is
    the client's to fix (400)."""

    def broken(*args, **kwargs):
        raise error("disk on fire at /srv/secret/models")

    monkeypatch.setattr(Service, "generate", broken)
    with serving(service) as (client, _app):
        response = client.post("/api/generate", json={"prompt": "x"})
        assert response.status_code == 500, response.text
        assert response.json() == {"error": "the server failed to answer this request (its log says why)"}
        assert client.get("/api/models").status_code == 200
    log = capsys.readouterr().err
    assert "Traceback" in log and "disk on fire" in log


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ({"annotator": "canny", "annotator_params": {"low_threshold": "abc"}}, "'low_threshold' must be an integer"),
        ({"annotator": "canny", "annotator_params": {"low_threshold": [1]}}, "'low_threshold' must be an integer"),
        ({"annotator": "canny", "annotator_params": {"low_threshold": 1e309}}, "'low_threshold' must be an integer"),
        ({"annotator": "canny", "annotator_params": {"colour": 1}}, "has no parameter 'colour'"),
        ({"annotator": "shuffle", "annotator_params": {"seed": True}}, "must be an integer"),
        ({"strength": float("nan")}, "control unit 0: strength must be a number, got nan"),
    ],
)
def test_wrongly_typed_unit_values_get_a_400(service, unit, message):
    body = {"prompt": "x", "units": [{"image": _edges_b64(), **unit}]}
    with serving(service) as (client, _app):
        response = client.post("/api/generate", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400 and message in response.json()["error"], response.text


@pytest.mark.parametrize(("height", "width"), [(1, 64), (4096, 1), (100, 500)])
def test_a_thin_control_image_is_refused_not_blown_up(service, height, width):
    thin = base64.b64encode(_png_bytes(np.full((height, width, 3), 255, np.uint8))).decode()
    body = {"prompt": "x", "units": [{"image": thin, "annotator": "none"}]}
    with serving(service) as (client, _app):
        response = client.post("/api/generate", json=body)
    assert response.status_code == 400 and "more than 4 times its short side" in response.json()["error"]


def test_the_api_keeps_nothing_on_disk(service):
    with serving(service) as (client, app):
        body = {"prompt": "a red circle", "steps": 2, "units": [{"image": _edges_b64(), "annotator": "canny"}]}
        response = client.post("/api/generate", json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1 and len(response.json()["control_maps"]) == 1
        assert [p for p in app.files.root.rglob("*") if p.is_file()] == []


def test_a_full_disk_is_a_one_line_error_on_the_page_and_the_server_goes_on(service, monkeypatch):
    import controlnet.imaging.images

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with serving(service) as (client, _app):
        components, events = _events(client)
        fn_index, inputs = next((i, inputs) for i, inputs in events if len(inputs) > 20)
        data = _defaults(components, inputs)
        prompt = next(p for p, c in enumerate(inputs) if components[c]["props"].get("elem_id") == "prompt")
        steps = next(p for p, c in enumerate(inputs) if components[c]["props"].get("elem_id") == "steps")
        data[prompt], data[steps] = "a red circle", 1
        with monkeypatch.context() as patch:
            patch.setattr(controlnet.imaging.images, "atomic_file", full)
            _status, messages = run_event(client, fn_index, data)
        assert (
            messages[-1]["output"]["error"] == "the server's disk is full: it cannot store the images; try again later"
        )
        _status, messages = run_event(client, fn_index, data)
        assert messages[-1]["success"]  # serving again


# -- what the server keeps --------------------------------------------------------------------------


def test_the_folder_is_bounded_by_count_bytes_and_age(tmp_path):
    files = ServerFiles(Retention(max_files=3, max_bytes=250, max_age_s=60), parent=tmp_path)
    base = time.time() - 10_000  # the files' times; pruning is told the time
    try:
        paths = []
        for i in range(5):
            path = files.gradio / f"upload{i}" / "x.png"
            path.parent.mkdir()
            path.write_bytes(b"x" * 50)
            for made in (path, path.parent):
                os.utime(made, (base + i, base + i))
            paths.append(path)
        assert files.prune(now=base + 10) == 2  # count: the two oldest go
        assert [p.exists() for p in paths] == [False, False, True, True, True]
        big = files.results / "big.png"
        big.write_bytes(b"x" * 200)
        os.utime(big, (base + 11, base + 11))
        assert files.prune(now=base + 12) == 2  # bytes: 350 > 250, the oldest go until 250 or less
        assert [p.exists() for p in paths] == [False, False, False, False, True] and big.exists()
        assert files.prune(now=base + 11 + 61) == 2 and not big.exists()  # age: both are over a minute old
        # The emptied upload folders go a minute after they last changed; the results folder stays.
        files.prune(now=time.time() + 61)
        assert files.results.is_dir() and not any(files.gradio.glob("upload*"))
    finally:
        files.close()
    assert not files.root.exists()


def test_the_folder_is_private_and_goes_when_the_server_stops(service):
    with serving(service) as (client, app):
        root = app.files.root
        assert oct(root.stat().st_mode & 0o777) == "0o700"
        assert os.environ["GRADIO_TEMP_DIR"] == str(app.files.gradio)
        client.post("/gradio_api/upload", files={"files": ("edges.png", EDGES.read_bytes(), "image/png")})
        assert any(p.is_file() for p in root.rglob("*"))
    assert not root.exists()
    with serving(service) as (_client, second):  # a later app in the process writes only into its own
        assert second.files.root != root
    assert not root.exists() and not second.files.root.exists()


def _serve_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("controlnet-serve-*")}


def test_a_start_that_fails_leaves_nothing_behind(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    before = _serve_folders()
    service = Service(ModelRegistry([ModelEntry("broken.safetensors", broken, [])]))
    with pytest.raises(ModelUnavailable, match=r"model 'broken\.safetensors' cannot be loaded") as refused:
        build_app(service)
    assert str(tmp_path) not in str(refused.value) and str(tmp_path) in refused.value.detail
    assert _serve_folders() == before


def _serve_command(*arguments: str, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TMPDIR": str(tmp)}
    command = [sys.executable, "-m", "controlnet", "serve", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def test_serve_with_a_broken_model_or_a_busy_port_fails_in_one_line_and_leaves_nothing(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    result = _serve_command("--base", str(broken), "--port", str(_free_port()), tmp=scratch)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("controlnet serve: error: cannot load model")
    assert list(scratch.iterdir()) == []
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = _serve_command("--port", str(busy.getsockname()[1]), tmp=scratch)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert list(scratch.iterdir()) == []


# -- the models folder ------------------------------------------------------------------------------


def test_links_that_lead_out_of_the_models_folder_are_not_offered(tmp_path):
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    model, controlnet = random_tiny_models()
    save_ldm(outside / "elsewhere.safetensors", model)
    save_ldm(models / "inside.safetensors", model)
    save_ldm(models / "inside-control.safetensors", controlnet=controlnet)
    (models / "escape.safetensors").symlink_to(outside / "elsewhere.safetensors")
    (models / "alias.safetensors").symlink_to(models / "inside.safetensors")  # a link that stays inside
    folder = models / "pipeline"
    folder.mkdir()
    (folder / "unet").symlink_to(outside, target_is_directory=True)
    names = [entry.name for entry in discover_models(models)]
    assert names == [SHIPPED, "alias.safetensors", "inside.safetensors"]
    # A file replaced by a link after the server started is refused when it is loaded.
    entries = discover_models(models)
    registry = ModelRegistry(entries)
    (models / "inside.safetensors").unlink()
    (models / "inside.safetensors").symlink_to(outside / "elsewhere.safetensors")
    with pytest.raises(ModelUnavailable, match=r"model 'inside\.safetensors' cannot be loaded") as refused:
        registry.pipeline("inside.safetensors")
    assert "leads out of the models folder" in refused.value.detail
    assert str(outside) not in str(refused.value)


def test_a_model_that_will_not_load_is_a_503_without_paths(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    entries = [*discover_models(None), ModelEntry("broken.safetensors", broken, [])]
    service = Service(ModelRegistry(entries))
    with serving(service) as (client, _app):
        response = client.post("/api/generate", json={"prompt": "x", "model": "broken.safetensors", "steps": 1})
    assert response.status_code == 503
    assert response.json() == {
        "error": "model 'broken.safetensors' cannot be loaded on this server (the server's log says why)"
    }


def test_an_app_built_but_never_served_leaves_nothing_at_exit(tmp_path):
    program = (
        "from controlnet.serve.service import ModelRegistry, Service, discover_models\n"
        "from controlnet.serve.app import build_app\n"
        "app = build_app(Service(ModelRegistry(discover_models(None))))\n"
        "print(app.files.root)\n"
    )
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == tmp_path and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("elem", ["prompt", "negative_prompt", "added_prompt"])
def test_the_page_bounds_its_prompts_too(service, elem, monkeypatch):
    from controlnet.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "generate", lambda *a, **k: pytest.fail("a bad request reached the model"))
    with serving(service) as (client, _app):
        components, events = _events(client)
        fn_index, inputs = next((i, inputs) for i, inputs in events if len(inputs) > 20)
        data = _defaults(components, inputs)
        labels = {"prompt": "Prompt", "negative_prompt": "Negative Prompt", "added_prompt": "Added Prompt"}
        position = next(p for p, c in enumerate(inputs) if components[c]["props"].get("label") == labels[elem])
        data[position] = "a red circle, " * 1000
        _status, messages = run_event(client, fn_index, data)
    error = messages[-1]["output"]["error"]
    assert "14,000 characters long; the limit is 5,000" in error and elem.replace("_", " ") in error


def test_basic_auth_protects_the_api(service):
    with serving(service, auth=("ada", "sécret")) as (client, _app):
        assert client.get("/api/models").status_code == 401
        assert client.get("/api/models", auth=("ada", "wrong")).status_code == 401
        assert client.get("/api/models", auth=("ädä", "x")).status_code == 401  # not a 500
        headers = {"authorization": "Basic " + base64.b64encode("ada:sécret".encode()).decode()}
        assert client.get("/api/models", headers=headers).json()["models"] == [SHIPPED]
        assert client.get("/api/models", headers={"authorization": "Basic %%%"}).status_code == 401


def test_one_web_ui_per_process_and_gradios_settings_are_given_back(service):
    before = {name: os.environ.get(name) for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")}
    with serving(service) as (_client, app):
        assert os.environ["GRADIO_TEMP_DIR"] == str(app.files.gradio)
        with pytest.raises(RuntimeError, match="another web UI is running in this process"):
            build_app(service)
    assert {name: os.environ.get(name) for name in before} == before
    with serving(service):  # the first has stopped: a new one may run
        pass


def test_the_component_server_answers_only_the_editors_function(service):
    with serving(service) as (client, app):
        _inner, page = _page_app(app)
        editor = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "init_image")
        image = {"files": ("b.png", EDGES.read_bytes(), "image/png")}
        form = {"session_hash": "s1", "component_id": str(editor._id), "fn_name": "accept_blobs", "id": "e"}
        cases = [
            ({**form, "component_id": "99999"}, image, "no such component function"),
            ({**form, "fn_name": "preprocess"}, image, "no such component function"),
            ({key: value for key, value in form.items() if key != "fn_name"}, image, "no such component function"),
            ({**form, "type": "layer"}, image, "the layer index must be null or below"),  # no index
            ({**form, "type": "layer", "index": "²"}, image, "the layer index must be null or below"),
            ({**form, "type": "background", "index": "null"}, [image["files"]] * 2, "send one editor image"),
        ]
        for fields, files, message in cases:
            files = [("files", file) for file in files] if isinstance(files, list) else files
            response = client.post("/gradio_api/component_server", data=fields, files=files)
            assert response.status_code == 400 and message in response.text, response.text
        for body in ({"component_id": editor._id, "fn_name": "accept_blobs", "session_hash": "s", "data": {}}, [1]):
            response = client.post("/gradio_api/component_server", json=body)
            assert response.status_code == 400, response.text

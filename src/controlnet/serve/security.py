"""What keeps the web UI from reading, serving or fetching what it should not (docs/security.md).

Gradio takes files by path: a request may name any path as the value of any input, and Gradio
copies what it names into its cache, then serves the copy at ``/gradio_api/file=...``. It refuses
paths that were not uploaded through it only on a page it believes launched
(``processing_utils._check_allowed`` in Gradio 6), and ``gr.mount_gradio_app``, which this server
uses, never says so; and it downloads a URL given as any input. Three independent layers close
that hole, each enough on its own for paths, the first and the last for URLs too:

1. :class:`RequestGuard`, in front of the whole app, refuses (400) a request to run an event that
   names a file outside the server's folder (files.py), or a URL, before Gradio sees it.
   It also answers only the routes the page and the HTTP APIs use, serves files only from the
   server's folder, and counts request bodies while they stream, refusing one past the limit
   (413) before it is buffered.
2. :func:`confine_page` marks the page launched, so Gradio's own check runs for every input ...
3. ... and makes every block of the page take files only from the server's folder, never by URL.

Besides, the page's image inputs (:func:`guard_image`, :func:`guard_image_editor`) read an image's
size from its header before anything decodes it.

This module imports Gradio: import it only where the web UI is built.
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import gradio as gr
from fastapi import HTTPException
from gradio.components.base import server
from gradio.data_classes import FileData

from ..imaging.images import ImageError, image_size
from .files import ServerFiles
from .service import Limits

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_EDITOR_LAYERS = 4  # the inpaint editor draws on one layer; a request may not ask for more
MAX_PENDING_EDITS = 64  # edits sent ahead of a run (Gradio keeps them in memory until then)


def confine_page(page: gr.Blocks, files: ServerFiles) -> None:
    """Have Gradio check, for every input of every request, that a file it names was uploaded
    through this page (the check Gradio runs only once ``launch()`` set ``has_launched``; it
    never looks at URLs), and have every block of the page take files only from ``files``, never
    by URL (Gradio would download a URL given as any input)."""
    page.has_launched = True
    for block in page.blocks.values():
        _guard_sources(block, files)


# -- the page's file inputs -----------------------------------------------------------------------
#
# The checks are put on the component objects the page builds, not on subclasses: Gradio's
# component metaclass writes a .pyi stub beside the module of every Component subclass, which a
# package must not do to its own folder when it is imported.


def guard_image(component: gr.Image, files: ServerFiles, limits: Limits) -> None:
    """A ``gr.Image`` input that reads only files inside ``files`` (also those Gradio does not copy:
    a file object marked ``is_stream`` skips the cache) and checks an image's pixels from its
    header before Gradio decodes it."""
    preprocess = component.preprocess

    def checked_preprocess(payload):
        if payload is not None and payload.path is not None:
            _check_source(files, payload.path)
            _check_image(payload.path, "image", limits)
        return preprocess(payload)

    component.preprocess = checked_preprocess


def guard_file(component: gr.File, files: ServerFiles) -> None:
    """A ``gr.File`` input (the units' pose JSON) that reads only files inside ``files``, also those
    marked ``is_stream``; its size and content are checked where it is read (service.draw_pose)."""
    preprocess = component.preprocess

    def checked_preprocess(payload):
        if payload is not None:
            _check_source(files, getattr(payload, "path", None))
        return preprocess(payload)

    component.preprocess = checked_preprocess


def guard_image_editor(component: gr.ImageEditor, files: ServerFiles, limits: Limits) -> None:
    """A ``gr.ImageEditor`` input with its layers bounded and every image checked before it is
    decoded, whether it arrives as an upload (from ``files`` only) or as bytes sent ahead of the
    run (``accept_blobs``: Gradio would extend its list of layers to any index a client names,
    and keeps every such edit in memory until a run uses it)."""
    preprocess, convert, accept_blobs = (
        component.preprocess,
        component.convert_and_format_image,
        component.accept_blobs,
    )
    max_pending = 8 * limits.max_upload_bytes  # bytes of edits waiting, as much as one request may carry

    def checked_preprocess(payload):
        if payload is not None and len(payload.layers) > MAX_EDITOR_LAYERS:
            raise gr.Error(f"the editor sent {len(payload.layers)} layers; at most {MAX_EDITOR_LAYERS} are allowed")
        return preprocess(payload)

    def checked_convert(file, flatten_on_white: bool = False):
        if isinstance(file, FileData):
            _check_source(files, file.path)
            _check_image(file.path, "init image", limits)
        elif file is not None:
            _check_image(bytes(file), "init image", limits)
        return convert(file, flatten_on_white)

    pending = threading.Lock()

    @server  # Gradio calls only functions marked so through /component_server
    def checked_accept_blobs(data):
        # Called from a plain route, not from the queue: a refusal is an HTTP 400 with its detail.
        fields, sent = getattr(data, "data", None), getattr(data, "files", None)
        if not isinstance(fields, dict) or not isinstance(sent, list) or len(sent) != 1:
            raise HTTPException(400, "send one editor image as multipart form data")
        if fields.get("type") not in ("background", "layer", "composite") or not isinstance(fields.get("id"), str):
            raise HTTPException(400, "an editor image needs an id and a type: background, layer or composite")
        index = fields.get("index", "")
        if index != "null" and not (str(index).isdecimal() and int(index) < MAX_EDITOR_LAYERS):
            raise HTTPException(400, f"the layer index must be null or below {MAX_EDITOR_LAYERS}")
        image = bytes(sent[0][1])
        try:
            image_size(image, max_pixels=limits.max_pixels)
        except ImageError as error:
            raise HTTPException(400, f"the init image: {error}") from None
        with pending:  # the oldest edits go first, to stay within MAX_PENDING_EDITS and the bytes
            storage = component.blob_storage
            while storage and (len(storage) >= MAX_PENDING_EDITS or _bytes(storage) + len(image) > max_pending):
                storage.pop(next(iter(storage)), None)
            return accept_blobs(data)

    component.preprocess = checked_preprocess
    component.convert_and_format_image = checked_convert
    component.accept_blobs = checked_accept_blobs


def _bytes(storage: dict) -> int:
    """The bytes of the editor images Gradio keeps waiting (each edit: background, layers, composite)."""
    return sum(
        len(image or b"") for edit in storage.values() for image in (edit.background, *edit.layers, edit.composite)
    )


def server_functions(page: gr.Blocks) -> frozenset[tuple[str, str]]:
    """(component id, function name) of every function a client may call on ``page`` through
    ``/component_server`` (Gradio's ``@server`` functions: here, the editor's ``accept_blobs``)."""
    return frozenset(
        (str(block_id), name)
        for block_id, block in page.blocks.items()
        for name in dir(block)
        if not name.startswith("__") and getattr(getattr(block, name, None), "_is_server_fn", False)
    )


def _guard_sources(component: gr.blocks.Block, files: ServerFiles) -> None:
    """Every file a request names for ``component`` passes ``_check_source`` before Gradio copies
    (or downloads) it into its cache."""
    move, async_move = component.move_resource_to_block_cache, component.async_move_resource_to_block_cache

    def checked_move(url_or_file_path):
        _check_source(files, url_or_file_path)
        return move(url_or_file_path)

    async def checked_async_move(url_or_file_path):
        _check_source(files, url_or_file_path)
        return await async_move(url_or_file_path)

    component.move_resource_to_block_cache = checked_move
    component.async_move_resource_to_block_cache = checked_async_move


def _check_source(files: ServerFiles, path: str | None) -> None:
    if path is None:
        return
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)) or not files.contains(path):
        # No path in the message: the client named it, and its resolution would tell the server's layout.
        raise gr.Error("that file was not uploaded through this page; upload it again", print_exception=False)


def _check_image(source: str | bytes, what: str, limits: Limits) -> None:
    try:
        image_size(source, max_pixels=limits.max_pixels)
    except ImageError as error:
        message = str(error) if isinstance(source, bytes) else str(error).replace(str(source), "the image")
        raise gr.Error(f"the {what}: {message}", print_exception=False) from None


# -- in front of the app ---------------------------------------------------------------------------

# The routes the page (with its login), the JSON API and the AUTOMATIC1111 API use; every other
# route Gradio has (its URL proxy, file streaming, run history, recordings, monitoring, ...)
# answers 404 here.
_ROUTES = re.compile(
    r"^/(|config/?|theme\.css|robots\.txt|favicon\.ico|manifest\.json|pwa_icon(/\d+)?|login/?|logout"
    r"|(assets|static|svelte)/.+"
    r"|api/(generate|models)"
    r"|sdapi/v1/(txt2img|img2img|sd-models|samplers|schedulers|options|progress|interrupt|skip|scripts)"
    r"|controlnet/(version|model_list|module_list|settings|detect)"
    r"|gradio_api/(info/?|app_id/?|heartbeat/[^/]+|queue/(join|data|status)|cancel|reset/?|upload|upload_progress"
    r"|component_server/?|startup-events|run/[^/]+/?|call/[^/]+(/[^/]+)?|file=.+))$"
)
_FILE_ROUTE = "/gradio_api/file="
# The routes that run an event with the inputs in a JSON body: every file they name is checked.
_EVENT_ROUTES = re.compile(r"^/gradio_api/(queue/join|run/[^/]+|call/[^/]+|component_server)/?$")


class RequestGuard:
    """ASGI middleware: the route list above, files only from ``files``, request bodies of at most
    ``max_body`` bytes counted as they arrive (a chunked body has no length to check first), and
    the folder pruned before each upload."""

    def __init__(
        self, app: Callable, files: ServerFiles, max_body: int, functions: frozenset[tuple[str, str]] = frozenset()
    ) -> None:
        """``functions``: the (component id, function name) pairs ``/component_server`` may call."""
        self.app, self.files, self.max_body, self.functions = app, files, max_body, functions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not _ROUTES.match(path):
            await _json(send, 404, "not found")
            return
        if path.startswith(_FILE_ROUTE) and not self.files.contains(path[len(_FILE_ROUTE) :]):
            await _json(send, 404, "no such file")
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await _json(send, 413, f"the request is over {self.max_body / 2**20:g} MB")
            return
        if path == "/gradio_api/upload":
            self.files.prune()  # room for what arrives, within the folder's bounds
        if scope["method"] == "POST" and _EVENT_ROUTES.match(path):
            await self._checked_event(scope, receive, send)
        else:
            await self._limited(scope, receive, send)

    async def _checked_event(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the (bounded) body, refuse it if it names a file outside the folder, else hand the
        same bytes on to the app."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                await _json(send, 413, f"the request is over {self.max_body / 2**20:g} MB")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replay = _replay(body, receive)
        if scope["path"].startswith("/gradio_api/component_server"):
            target = await _component_server_target(scope, body)
            if target not in self.functions:  # Gradio answers an unknown or missing one with a 500
                await _json(send, 400, "no such component function")
                return
            await self.app(scope, replay, send)
            return
        try:
            named = list(_named_paths(json.loads(body)))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or absurdly nested: Gradio refuses it
            named = []
        if any(not self.files.contains(path) for path in named):
            await _json(send, 400, "a request may name only files uploaded through this page")
            return
        await self.app(scope, replay, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        received, refused, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    refused = True  # the app sees the client go; the client gets the 413
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:  # the app's own failure: its error handling has answered
                raise
        if refused and not started:
            await _json(send, 413, f"the request is over {self.max_body / 2**20:g} MB")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app ``body`` (already read), then whatever the client sends next."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()  # after the body: only the client's disconnect
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _component_server_target(scope: Scope, body: bytes) -> tuple[str, str] | None:
    """(component id, function name) of a ``/component_server`` request, JSON or multipart; None
    when it names none or cannot be read."""
    from starlette.requests import Request

    try:
        if Request(scope).headers.get("content-type", "").startswith("multipart/form-data"):
            async with Request(scope, _replay(body, _disconnected)).form() as form:
                fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        else:
            fields = json.loads(body)
    except (ValueError, RecursionError, KeyError, AssertionError, HTTPException):
        return None
    if not isinstance(fields, dict):
        return None
    component, function = fields.get("component_id"), fields.get("fn_name")
    return (str(component), function) if isinstance(function, str) and component is not None else None


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


def _named_paths(value: Any):
    """Every ``"path"`` string in a JSON value: how Gradio's file objects name their file."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str):
            yield value["path"]
        for item in value.values():
            yield from _named_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _named_paths(item)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _json(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# The folder Gradio's process-wide settings point at, while its server runs.
_GRADIO_FOLDER: weakref.ref[ServerFiles] | None = None
_GRADIO_VARIABLES = ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")


def gradio_folder_environment(files: ServerFiles) -> None:
    """Point Gradio's upload area and cache at the server's folder until the folder is closed.

    Gradio reads them from the process environment, when the page is built and at each request,
    and a few of its modules once, when they are first imported (those are pointed at the folder
    too). These are process-wide: a second web UI in the same process would take them from the
    first, whose users' uploads would then be refused, so it is refused instead (RuntimeError)."""
    import gradio.route_utils
    import gradio.routes

    global _GRADIO_FOLDER
    current = _GRADIO_FOLDER() if _GRADIO_FOLDER is not None else None
    if current is not None and current is not files and not current.closed:
        raise RuntimeError(
            "another web UI is running in this process (Gradio keeps its upload folder per process): stop it first"
        )
    modules = (gradio.route_utils, gradio.routes)
    saved = ({name: os.environ.get(name) for name in _GRADIO_VARIABLES}, [m.DEFAULT_TEMP_DIR for m in modules])
    os.environ["GRADIO_TEMP_DIR"] = str(files.gradio)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(files.gradio / "examples")
    for module in modules:
        module.DEFAULT_TEMP_DIR = str(files.gradio)
    _GRADIO_FOLDER = weakref.ref(files)

    def restore() -> None:
        variables, constants = saved
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, value in zip(modules, constants, strict=True):
            module.DEFAULT_TEMP_DIR = value

    files.on_close(restore)

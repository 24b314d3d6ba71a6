"""The JSON API: ``POST /api/generate`` takes JSON (images as base64 PNG/JPEG) and answers JSON with
the PNGs in base64, keeping nothing on disk; ``GET /api/models`` lists the models, each one's
ControlNets and T2I-Adapters (what a unit's ``controlnet`` and ``adapter`` index) with the shipped
ones' names (which a unit may give instead of the index), and the queue.

Errors are one line of JSON, ``{"error": ...}``, with status 400 (a bad request: the message names
the field and what is allowed), 401 (no or wrong password), 503 (queue full, or a model that will
not load), 507 (the server's disk is full) or 500 (the server's fault: its log says why); RequestGuard
adds 404 and 413 (security.py). `answer` gives both JSON APIs these answers.
"""

# No `from __future__ import annotations` here: FastAPI reads the annotations of the handlers
# (fastapi.Request) at run time, from classes imported inside ``add_json_api``.
import base64
import binascii
import errno
import json
import secrets
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from ..settings import GENERATION, UNIT
from .service import (
    Cancelled,
    GenerateRequest,
    GenerateResponse,
    Limits,
    ModelUnavailable,
    QueueFull,
    RequestError,
    Service,
    UnitRequest,
    check_guided,
    draw_pose,
    pose_type,
    read_upload,
)


def add_json_api(app, service: Service, auth: tuple[str, str] | None) -> None:
    """The JSON API's two routes on the FastAPI ``app``; with ``auth``, HTTP basic auth in front."""
    from fastapi import Request

    def models(_body: None) -> dict:
        registry = service.registry
        return {
            "models": registry.names,
            "control_models": {name: registry.control_models(name) for name in registry.names},
            "queue": service.queue.length,
            "max_queue": service.queue.max_length,
        }

    def generate(body: Any) -> dict:
        return response_to_json(service.generate(request_from_json(body, service.limits)))

    @app.get("/api/models")
    async def list_models(request: Request):
        return await answer(request, models, auth, with_body=False, bad_request=400, key="error")

    @app.post("/api/generate")
    async def generate_images(request: Request):
        return await answer(request, generate, auth, with_body=True, bad_request=400, key="error")


async def answer(
    request, work: Callable[[Any], Any], auth: tuple[str, str] | None, *, with_body: bool, bad_request: int, key: str
):
    """One route of the JSON APIs (this one, and the AUTOMATIC1111 API's): with ``auth``, HTTP basic
    auth first; then ``work`` on the JSON body (``with_body``; else None) in a worker thread, so that
    the server answers other requests meanwhile. Every failure is one line of JSON, ``{key:
    message}``: ``bad_request`` (the API's status for a bad request) for a RequestError, the one
    error that is the client's to fix; 401 without the password; 409 for a job cancelled; 503 when
    the queue is full or a model will not load; 507 when the disk is full; 500 for anything else,
    the server's fault, its traceback in the server's log."""
    import anyio
    from fastapi.responses import JSONResponse

    def fail(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({key: message}, status_code=status, headers=headers)

    if not authorised(request.headers.get("authorization", ""), auth):
        return fail(401, "this server needs a user name and password (HTTP basic auth)", {"WWW-Authenticate": "Basic"})
    try:
        body = parse_json(await request.body()) if with_body else None  # RequestGuard has bounded it
        return await anyio.to_thread.run_sync(work, body)
    except RequestError as bad:
        return fail(bad_request, " ".join(str(bad).split()))
    except Cancelled as stopped:
        return fail(409, f"interrupted: {stopped}")
    except QueueFull as busy:
        return fail(503, str(busy))
    except ModelUnavailable as broken:
        print(f"controlnet serve: {broken.detail}", file=sys.stderr)
        return fail(503, str(broken))
    except OSError as failed:  # the APIs write no file: the machine itself is failing (memory, disk)
        status = 507 if failed.errno in (errno.ENOSPC, errno.EDQUOT) else 500
        return fail(status, f"the server could not run the job ({failed.strerror or 'system error'})")
    except Exception:  # a fault of the server's: logged, and one line for the client
        return fail(500, server_fault())


def parse_json(body: bytes) -> Any:
    """A request's JSON body; RequestError, one line, for one that is not UTF-8 JSON this server
    reads (nested too deeply, or an integer past Python's 4300 digits: json's plain ValueError)."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise RequestError("the body is not UTF-8 text (JSON must be UTF-8)") from None
    except json.JSONDecodeError as bad:
        raise RequestError(f"the body is not JSON: {bad.msg} at character {bad.pos}") from None
    except ValueError as bad:
        raise RequestError(f"the body is not JSON this server reads: {' '.join(str(bad).split())}") from None
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None


def server_fault() -> str:
    """Log the exception being handled (a bug, or the machine failing) with its traceback, for the
    server's operator, and say it in one line for the client: never the traceback or a path."""
    print("controlnet serve: a request failed:", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    return "the server failed to answer this request (its log says why)"


def authorised(header: str, auth: tuple[str, str] | None) -> bool:
    """Whether an ``Authorization`` header carries ``auth`` (HTTP basic); always, without ``auth``."""
    if auth is None:
        return True
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).partition(b":")
    except (binascii.Error, ValueError):
        return False
    # Bytes: compare_digest refuses str with characters beyond ASCII (a TypeError, a 500). Both
    # are compared whatever the first gives, so the time taken tells nothing.
    expected_user, expected_password = (part.encode("utf-8") for part in auth)
    return secrets.compare_digest(user, expected_user) & secrets.compare_digest(password, expected_password)


def decode_image(data: Any, what: str, limits: Limits) -> np.ndarray:
    """A base64 image from a JSON request, through the same checks as an upload, in memory."""
    if not isinstance(data, str):
        raise RequestError(f"{what} must be a base64-encoded PNG or JPEG string")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    if len(text) > limits.max_upload_bytes * 4 // 3 + 4:
        raise RequestError(f"{what} is over the upload limit of {limits.max_upload_bytes / 2**20:g} MB")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None
    return read_upload(raw, limits, what)


# The fields a request may have and the JSON type of those that are not settings: the settings
# (settings.py) are checked by settings.check, with the same messages as everywhere.
_REQUEST_FIELDS = {
    "prompt": str,
    "model": str,
    "negative_prompt": str,
    "added_prompt": str,
    "loras": list,
} | dict.fromkeys(GENERATION)
_UNIT_FIELDS = {"annotator_params": dict} | dict.fromkeys(UNIT)


def _typed(name: str, value: Any, kind: type | None) -> Any:
    if kind is None:  # a setting: settings.check says what is wrong with it
        return value
    if not isinstance(value, kind):
        what = {str: "text", list: "a list"}.get(kind, "an object")
        raise RequestError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def request_from_json(body: Any, limits: Limits) -> GenerateRequest:
    """A GenerateRequest from the API's JSON body; RequestError names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = set(body) - set(_REQUEST_FIELDS) - {"units", "init_image", "mask"}
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "prompt" not in body:
        raise RequestError('"prompt" is required (it may be empty)')
    fields = {k: _typed(k, v, _REQUEST_FIELDS[k]) for k, v in body.items() if k in _REQUEST_FIELDS}
    units = []
    raw_units = body.get("units", [])
    if not isinstance(raw_units, list):
        raise RequestError('"units" must be a list of control units')
    for i, item in enumerate(raw_units):
        if not isinstance(item, dict) or "image" not in item:
            raise RequestError(f"units[{i}] must be an object with an image")
        bad = set(item) - set(_UNIT_FIELDS) - {"image"}
        if bad:
            raise RequestError(f"units[{i}]: unknown field(s): {', '.join(sorted(bad))}")
        values = {k: _typed(f"units[{i}].{k}", v, _UNIT_FIELDS[k]) for k, v in item.items() if k != "image"}
        if isinstance(item["image"], (dict, list)):  # OpenPose JSON: the pose is drawn into the unit's map
            where = f"units[{i}].image (OpenPose JSON)"
            image = draw_pose(
                item["image"], where, values.get("annotator", "none"), values.get("annotator_params"), limits
            )
            values |= {"annotator": "none", "annotator_params": {}, "control_type": pose_type(values)}
        else:
            image = decode_image(item["image"], f"units[{i}].image", limits)
        units.append(UnitRequest(image, **values))
    for key in ("init_image", "mask"):
        if body.get(key) is not None:
            fields[key] = decode_image(body[key], key, limits)
    request = GenerateRequest(units=units, **fields)
    check_guided(request)
    return request


def response_to_json(response: GenerateResponse) -> dict:
    """The JSON answer: PNGs (with their settings as PNG text) in base64, encoded in memory."""

    def encoded(pngs: list[bytes]) -> list[str]:
        return [base64.b64encode(png).decode("ascii") for png in pngs]

    return {
        "images": encoded(response.image_pngs()),
        "control_maps": encoded(response.map_pngs()),
        "seeds": response.seeds,
        "settings": response.settings,
    }

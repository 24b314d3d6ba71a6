"""``controlnet serve``: a Gradio web UI and a JSON API over one generation service (server.py).

The page has the original canny app's options with its defaults and ranges (REFERENCE.md section 5)
and what AUTOMATIC1111's extension adds: several control units (tabs) each with its own image,
annotator (with a preview), strength, start/end, control mode, resize mode and pixel perfect; a
sampler; img2img and inpainting (paint the mask on the image); the seed with "reuse last seed"; a
progress bar and a cancel button that stops between steps; a gallery of the detected maps and the
images, whose PNGs download with their settings embedded.

HTTP: ``POST /api/generate`` takes JSON (images as base64 PNG/JPEG) and answers JSON with the PNGs
in base64, keeping nothing on disk; Gradio's own client API (``/gradio_api/...``) works as well.
Errors are one-line JSON ``{"error": ...}`` with status 400 (bad request), 401 (no or wrong
password), 404, 413 (too large), 503 (queue full, or a model that will not load) or 507 (the
server's disk is full).

What the page uploads and shows lives in one folder the server owns, bounds and removes
(server_files.py); web_security.py keeps every request to it (docs/security.md).
"""

# No `from __future__ import annotations` here: Gradio and FastAPI read the annotations of the
# handlers (gr.Request, fastapi.Request) at run time, from classes imported inside the builders.
import base64
import binascii
import contextlib
import errno
import json
import secrets
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..sampling.prompts import MAX_PROMPT_CHARACTERS
from .files import Retention, ServerFiles
from .service import (
    CONTROL_MODES,
    RESIZE_MODES,
    Cancelled,
    GenerateRequest,
    GenerateResponse,
    Limits,
    ModelRegistry,
    ModelUnavailable,
    QueueFull,
    RequestError,
    Service,
    UnitRequest,
    default_prompts,
    read_upload,
)

UNITS = 3  # control unit tabs
ANNOTATOR_CHOICES = ("canny", "scribble", "invert", "shuffle", "color_shuffle", "grey", "tile", "none")


# -- the JSON API -------------------------------------------------------------------------------


def _decode_image(data: Any, what: str, limits: Limits) -> np.ndarray:
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


_REQUEST_FIELDS = {
    "prompt": str,
    "model": str,
    "negative_prompt": str,
    "added_prompt": str,
    "num_images": int,
    "steps": int,
    "guidance_scale": float,
    "eta": float,
    "seed": int,
    "sampler": str,
    "resolution": int,
    "guess_mode": bool,
    "denoising_strength": float,
}
_UNIT_FIELDS = {
    "annotator": str,
    "annotator_params": dict,
    "strength": float,
    "start": float,
    "end": float,
    "mode": str,
    "resize_mode": str,
    "pixel_perfect": bool,
    "annotator_resolution": int,
    "controlnet": int,
}


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{name} must be {'a number' if kind in (int, float) else 'a ' + kind.__name__}")
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
        units.append(UnitRequest(_decode_image(item["image"], f"units[{i}].image", limits), **values))
    for key in ("init_image", "mask"):
        if body.get(key) is not None:
            fields[key] = _decode_image(body[key], key, limits)
    return GenerateRequest(units=units, **fields)


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


def store_response(response: GenerateResponse, files: ServerFiles) -> tuple[list[Path], list[Path]]:
    """The page's copy of a result: (detected maps, images) as PNG files in the server's folder,
    where Gradio serves them from, after pruning the folder to its bounds."""
    from ..imaging.images import save_png

    files.prune()
    folder = files.results / time.strftime("%Y-%m-%d")
    folder.mkdir(exist_ok=True)
    stem = f"{time.strftime('%H%M%S')}-{secrets.token_hex(4)}"
    maps = [
        save_png(folder / f"{stem}-control-{i}.png", image, text)
        for i, (image, text) in enumerate(zip(response.control_maps, response.map_texts, strict=True))
    ]
    images = [
        save_png(folder / f"{stem}-{seed}.png", image, text)
        for image, text, seed in zip(response.images, response.image_texts, response.seeds, strict=True)
    ]
    return maps, images


def _storage_message(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the server's disk is full: it cannot store the images; try again later"
    return f"the server cannot store the images ({error.strerror or 'write error'})"


# -- the page -----------------------------------------------------------------------------------


class _Cancellations:
    """One flag per browser session: the cancel button sets it, the running job checks it between steps."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            flag = self._flags[session] = threading.Event()
        return flag

    def cancel(self, session: str) -> None:
        with self._lock:
            if session in self._flags:
                self._flags[session].set()


def build_ui(service: Service, files: ServerFiles, document_api: bool = True):
    """The Gradio Blocks of the page; what it uploads and shows lives in ``files``.
    ``document_api=False`` keeps the generate endpoint callable but out of the API description,
    which Gradio embeds even in its login page: with a password, the model names stay private
    until one logs in."""
    import gradio as gr

    from .security import guard_image_editor

    limits = service.limits
    models = service.registry.names
    cancellations = _Cancellations()
    first = models[0]
    added, negative = default_prompts(first)
    native = service.native_resolution(first)

    with gr.Blocks(title="ControlNet") as page:
        gr.Markdown("## ControlNet: control Stable Diffusion with edges, scribbles and more")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(models, value=first, label="Model", elem_id="model")
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARACTERS, elem_id="prompt")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    cancel = gr.Button("Cancel", elem_id="cancel")
                unit_inputs = []
                with gr.Tabs():
                    for i in range(UNITS):
                        with gr.Tab(f"ControlNet unit {i}"):
                            unit_inputs.append(_unit_controls(gr, i, service, files, native))
                with gr.Accordion("Options", open=True):
                    num_images = gr.Slider(1, 12, value=1, step=1, label="Images", elem_id="num_images")
                    resolution = gr.Slider(
                        64, limits.max_resolution, value=native, step=64, label="Image Resolution", elem_id="resolution"
                    )
                    guess_mode = gr.Checkbox(False, label="Guess Mode")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0.1, 30.0, value=9.0, step=0.1, label="Guidance Scale")
                    sampler = gr.Dropdown(_samplers(), value="ddim", label="Sampler")
                    with gr.Row():
                        seed = gr.Number(
                            -1, label="Seed (-1: random)", precision=0, minimum=-1, maximum=2**31 - 1, elem_id="seed"
                        )
                        reuse = gr.Button("Reuse last seed", size="sm", elem_id="reuse_seed")
                    eta = gr.Number(0.0, label="eta (DDIM)", minimum=0.0, maximum=1.0)
                    added_prompt = gr.Textbox(added, label="Added Prompt", max_length=MAX_PROMPT_CHARACTERS)
                    negative_prompt = gr.Textbox(negative, label="Negative Prompt", max_length=MAX_PROMPT_CHARACTERS)
                with gr.Accordion("img2img and inpainting", open=False):
                    init_image = gr.ImageEditor(
                        type="numpy",
                        label="Init image (paint the area to repaint for inpainting)",
                        layers=False,
                        elem_id="init_image",
                    )
                    guard_image_editor(init_image, files, limits)
                    denoising = gr.Slider(0.01, 1.0, value=0.75, step=0.01, label="Denoising strength")
                    inpaint = gr.Checkbox(False, label="Inpaint the painted area only", elem_id="inpaint")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Output", columns=2, format="png", elem_id="gallery", height="auto")
                downloads = gr.Files(label="PNGs with their settings", elem_id="files")
                info = gr.Markdown(elem_id="info")
                last_seed = gr.State(-1)

        def generate(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 -- Gradio's idiom
            session = request.session_hash or "anonymous"
            flag = cancellations.start(session)
            try:
                job = _request_from_page(data, service, unit_inputs, fields)
                response = service.generate(
                    job, progress=lambda done, total: progress((done, total), desc="sampling"), cancelled=flag.is_set
                )
                map_files, image_files = store_response(response, files)
            except ModelUnavailable as error:
                print(f"controlnet serve: {error.detail}", file=sys.stderr)
                raise gr.Error(str(error), print_exception=False) from None
            except (RequestError, QueueFull) as error:
                raise gr.Error(str(error), print_exception=False) from None
            except Cancelled as stopped:
                raise gr.Error(str(stopped), title="Cancelled", print_exception=False) from None
            except OSError as error:  # writing the PNGs: the server's disk, not the user's request
                raise gr.Error(_storage_message(error), print_exception=False) from None
            shown = [(str(p), f"detected map {i}") for i, p in enumerate(map_files)]
            shown += [(str(p), f"seed {s}") for p, s in zip(image_files, response.seeds, strict=True)]
            text = f"seeds {', '.join(map(str, response.seeds))} · {response.settings['width']}x" + (
                f"{response.settings['height']} · {response.settings['steps']} steps · model {job.model}"
            )
            if "inpaint_area" in response.settings:
                text += f" · inpainted {response.settings['inpaint_area']:.0%} of the picture"
            paths = [str(p) for p in (*map_files, *image_files)]
            return {gallery: shown, downloads: paths, info: text, last_seed: response.seeds[0]}

        fields = {  # the page's inputs by name (the units' are in unit_inputs)
            "model": model,
            "prompt": prompt,
            "num_images": num_images,
            "resolution": resolution,
            "guess_mode": guess_mode,
            "steps": steps,
            "guidance": guidance,
            "sampler": sampler,
            "seed": seed,
            "eta": eta,
            "added_prompt": added_prompt,
            "negative_prompt": negative_prompt,
            "init_image": init_image,
            "denoising": denoising,
            "inpaint": inpaint,
        }
        inputs = set(fields.values()) | {c for unit in unit_inputs for c in unit.values() if c is not None}
        run.click(
            generate,
            inputs=inputs,
            outputs=[gallery, downloads, info, last_seed],
            api_name="generate",
            api_visibility="public" if document_api else "undocumented",
            concurrency_limit=None,  # the service queues: one job per model at a time
        )
        prompt.submit(generate, inputs=inputs, outputs=[gallery, downloads, info, last_seed], api_name=False)

        def stop(request: gr.Request) -> None:
            cancellations.cancel(request.session_hash or "anonymous")

        cancel.click(stop, inputs=None, outputs=None, api_name=False, queue=False)
        reuse.click(lambda value: value, inputs=last_seed, outputs=seed, api_name=False, queue=False)

        def model_changed(name: str):
            added, negative = default_prompts(name)
            try:
                size = service.native_resolution(name)
            except ModelUnavailable as error:  # say so (no path), keep serving
                print(f"controlnet serve: {error.detail}", file=sys.stderr)
                raise gr.Error(str(error), print_exception=False) from None
            except RequestError as error:
                raise gr.Error(str(error), print_exception=False) from None
            return gr.update(value=size), added, negative

        model.change(model_changed, inputs=model, outputs=[resolution, added_prompt, negative_prompt], api_name=False)
    return page


def _unit_controls(gr, index: int, service: Service, files: ServerFiles, native: int) -> dict:
    """One control unit's tab: image, annotator with preview, and its settings."""
    from .security import guard_image

    enabled = gr.Checkbox(index == 0, label="Enable", elem_id=f"unit{index}_enabled")
    image = gr.Image(
        type="filepath", label="Control image", sources=["upload", "clipboard"], elem_id=f"unit{index}_image"
    )
    guard_image(image, files, service.limits)
    annotator = gr.Dropdown(list(ANNOTATOR_CHOICES), value="canny", label="Annotator")
    with gr.Row():
        low = gr.Slider(1, 255, value=100, step=1, label="Canny low threshold")
        high = gr.Slider(1, 255, value=200, step=1, label="Canny high threshold")
    preview_button = gr.Button("Preview annotator result", size="sm", elem_id=f"unit{index}_preview")
    preview = gr.Image(label="Detected map", interactive=False, elem_id=f"unit{index}_map")
    strength = gr.Slider(0.0, 2.0, value=1.0, step=0.01, label="Control Strength")
    with gr.Row():
        start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting control step")
        end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending control step")
    mode = gr.Radio(list(CONTROL_MODES), value="balanced", label="Control mode")
    resize_mode = gr.Radio(list(RESIZE_MODES), value="crop_and_resize", label="Resize mode")
    with gr.Row():
        pixel_perfect = gr.Checkbox(True, label="Pixel perfect")
        annotator_resolution = gr.Slider(64, 2048, value=512, step=64, label="Annotator resolution")
    controls = {
        "enabled": enabled,
        "image": image,
        "annotator": annotator,
        "low": low,
        "high": high,
        "strength": strength,
        "start": start,
        "end": end,
        "mode": mode,
        "resize_mode": resize_mode,
        "pixel_perfect": pixel_perfect,
        "annotator_resolution": annotator_resolution,
    }

    def show_map(path, name, low_value, high_value, perfect, resolution):
        if not path:
            raise gr.Error("upload a control image first", print_exception=False)
        try:
            unit = _unit(path, name, low_value, high_value, perfect, resolution, service.limits)
            return service.annotate(unit, native)
        except RequestError as error:
            raise gr.Error(str(error), print_exception=False) from None

    preview_button.click(
        show_map,
        inputs=[image, annotator, low, high, pixel_perfect, annotator_resolution],
        outputs=preview,
        api_name=False,
    )
    return controls


def _unit(path, annotator, low, high, pixel_perfect, resolution, limits: Limits, **settings) -> UnitRequest:
    params = {"low_threshold": int(low), "high_threshold": int(high)} if annotator == "canny" else {}
    return UnitRequest(
        read_upload(path, limits, "control image"),
        annotator=annotator,
        annotator_params=params,
        pixel_perfect=bool(pixel_perfect),
        annotator_resolution=int(resolution),
        **settings,
    )


def _request_from_page(data: dict, service: Service, unit_inputs: list[dict], fields: dict) -> GenerateRequest:
    value = {name: data[component] for name, component in fields.items()}
    units = []
    for controls in unit_inputs:
        if not data[controls["enabled"]] or not data[controls["image"]]:
            continue
        units.append(
            _unit(
                data[controls["image"]],
                data[controls["annotator"]],
                data[controls["low"]],
                data[controls["high"]],
                data[controls["pixel_perfect"]],
                data[controls["annotator_resolution"]],
                service.limits,
                strength=float(data[controls["strength"]]),
                start=float(data[controls["start"]]),
                end=float(data[controls["end"]]),
                mode=data[controls["mode"]],
                resize_mode=data[controls["resize_mode"]],
            )
        )
    init_image, mask = None, None
    editor = value["init_image"]
    has_picture = editor is not None and editor.get("background") is not None
    if value["inpaint"] and not has_picture:
        raise RequestError("inpainting is on but there is no init image: upload one and paint the area to repaint")
    if has_picture:
        init_image = np.asarray(editor["background"])[..., :3].astype(np.uint8)
        if value["inpaint"]:
            layers = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
            painted = np.zeros(init_image.shape[:2], bool)
            for layer in layers:
                painted |= (layer[..., 3] > 0) if layer.shape[-1] == 4 else (layer.max(axis=-1) > 0)
            if not painted.any():
                raise RequestError("inpainting is on but nothing is painted: paint the area to repaint")
            mask = np.where(painted, 255, 0).astype(np.uint8)
    return GenerateRequest(
        prompt=value["prompt"] or "",
        units=units,
        model=value["model"],
        negative_prompt=value["negative_prompt"],
        added_prompt=value["added_prompt"],
        num_images=int(value["num_images"]),
        steps=int(value["steps"]),
        guidance_scale=float(value["guidance"]),
        eta=float(value["eta"] or 0.0),
        seed=int(value["seed"] if value["seed"] is not None else -1),
        sampler=value["sampler"],
        resolution=int(value["resolution"]),
        guess_mode=bool(value["guess_mode"]),
        init_image=init_image,
        mask=mask,
        denoising_strength=float(value["denoising"]),
    )


def _samplers() -> list[str]:
    from ..sampling.samplers import SAMPLERS

    return list(SAMPLERS)


# -- the server ---------------------------------------------------------------------------------


def build_app(service: Service, auth: tuple[str, str] | None = None, retention: Retention | None = None):
    """The ASGI app: the JSON API at /api, the page at /, behind web_security.RequestGuard.

    It owns a new private folder (server_files.ServerFiles, ``app.files``) for what the page uploads
    and shows, bounded by ``retention``; the folder goes when the app shuts down (its lifespan), or
    at once if building the app fails."""
    files = ServerFiles(retention)
    try:
        return _build_app(service, auth, files)
    except BaseException:
        files.close()
        raise


def _build_app(service: Service, auth: tuple[str, str] | None, files: ServerFiles):
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from .security import RequestGuard, confine_page, gradio_folder_environment, server_functions

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            files.close()

    gradio_folder_environment(files)  # before the page is built: its components read it
    app = FastAPI(title="controlnet", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def authorised(request: Request) -> bool:
        if auth is None:
            return True
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # Bytes: compare_digest refuses str with characters beyond ASCII (a TypeError, a 500).
        expected_user, expected_password = (part.encode("utf-8") for part in auth)
        return secrets.compare_digest(user, expected_user) & secrets.compare_digest(password, expected_password)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/api/models")
    def list_models(request: Request):
        if not authorised(request):
            return error(401, "this server needs a user name and password (HTTP basic auth)")
        return {"models": service.registry.names, "queue": service.queue.length, "max_queue": service.queue.max_length}

    @app.post("/api/generate")
    async def generate(request: Request):
        import anyio

        if not authorised(request):
            return error(401, "this server needs a user name and password (HTTP basic auth)")
        body = await request.body()  # RequestGuard has bounded it while it streamed
        try:
            job = request_from_json(json.loads(body), service.limits)
            response = await anyio.to_thread.run_sync(service.generate, job)
            return response_to_json(response)
        except UnicodeDecodeError:
            return error(400, "the body is not UTF-8 text (JSON must be UTF-8)")
        except json.JSONDecodeError as bad:
            return error(400, f"the body is not JSON: {bad.msg} at character {bad.pos}")
        except RecursionError:
            return error(400, "the body is nested too deeply")
        except RequestError as bad:
            return error(400, str(bad))
        except QueueFull as busy:
            return error(503, str(busy))
        except ModelUnavailable as broken:
            print(f"controlnet serve: {broken.detail}", file=sys.stderr)
            return error(503, str(broken))
        except OSError as failed:  # the API writes no file: the machine itself is failing (memory, disk)
            status = 507 if failed.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            return error(status, f"the server could not run the job ({failed.strerror or 'system error'})")

    page = build_ui(service, files, document_api=auth is None)
    page.queue(max_size=service.limits.max_queue, default_concurrency_limit=None)
    mb = f"{service.limits.max_upload_bytes / 2**20:g}mb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # show_error=False: an exception that is not a gr.Error (a bug, or Gradio's own refusal,
        # which names paths) reaches the browser as "Error" only; ours are all gr.Error.
        gr.mount_gradio_app(
            app, page, path="/", auth=auth, max_file_size=mb, show_error=False, run_history=False, footer_links=[]
        )
    confine_page(page, files)
    return RequestGuard(app, files, service.limits.max_body_bytes, server_functions(page))


def serve(
    models_folder: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    limits: Limits | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    base: Path | None = None,
    controlnets: list[Path] | None = None,
    retention: Retention | None = None,
) -> None:
    """Run the server until interrupted; its folder is removed when it stops, however it stops."""
    import uvicorn

    from .service import ModelEntry, discover_models

    entries = discover_models(models_folder, include_shipped=base is None)
    if base is not None:
        entries.insert(0, ModelEntry(base.name, base, list(controlnets or [])))
    service = Service(ModelRegistry(entries, device, dtype), limits)
    app = build_app(service, auth, retention)
    print(f"controlnet serve: http://{host}:{port}/  (models: {', '.join(service.registry.names)})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:  # also when uvicorn cannot bind the port (it exits before the app's lifespan)
        app.files.close()

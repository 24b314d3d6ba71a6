"""The web page: the original canny app's options with its defaults and ranges, and what the
AUTOMATIC1111 extension adds: several control units (tabs) each with its own image, annotator (with
a preview), strength, start/end, control mode, resize mode and pixel perfect; a sampler; img2img and
inpainting (paint the mask on the image); the seed with "reuse last seed"; a progress bar and a
cancel button that stops between steps; a gallery of the detected maps and the images, whose PNGs
download with their settings embedded. What it uploads and shows lives in the server's own folder
(files.py), guarded by security.py.
"""

# No `from __future__ import annotations` here: Gradio reads the annotations of the handlers
# (gr.Request) at run time, from classes imported inside the builders.
import errno
import secrets
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..sampling.prompts import MAX_PROMPT_CHARACTERS
from .files import ServerFiles
from .service import (
    CONTROL_MODES,
    RESIZE_MODES,
    Cancelled,
    GenerateRequest,
    GenerateResponse,
    Limits,
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

"""The web page: the original canny app's options with its defaults and ranges, and what the
AUTOMATIC1111 extension adds: several control units (tabs) each with its own image, model (one of
the served model's ControlNets or T2I-Adapters), annotator (with a preview), strength, start/end,
control mode, resize mode and pixel perfect; a sampler; img2img and
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

from .. import shipped
from ..sampling.prompts import MAX_PROMPT_CHARACTERS
from ..settings import GENERATION, UNIT, UNIT_COUNT, Setting
from .files import ServerFiles
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
    default_prompts,
    draw_pose,
    pose_type,
    read_upload,
)

UNITS = UNIT_COUNT  # control unit tabs
# Each unit shows its annotator's parameters in a fixed set of controls, relabelled and re-ranged
# when another annotator is picked (as the AUTOMATIC1111 extension does): numbers as sliders,
# switches as checkboxes, choices as a dropdown. tests/test_server.py checks every annotator fits.
PARAM_SLOTS = {"number": 4, "flag": 2, "choice": 1}
_SLOT_KIND = {"int": "number", "float": "number", "bool": "flag", "str": "choice"}


def annotator_choices() -> list[str]:
    """The annotators a unit's menu offers: those that need nothing but the image (image_to_mask and
    inpaint need a mask as well; openpose_json reads a JSON file, which the API takes instead)."""
    from ..annotators import ANNOTATORS

    return [name for name, a in ANNOTATORS.items() if not a.inputs and a.from_file is None]


def param_slots(annotator_name: str) -> dict[str, str]:
    """Which page control shows each parameter of the annotator: {"low_threshold": "number0", ...}."""
    from ..annotators import get_annotator

    taken = dict.fromkeys(PARAM_SLOTS, 0)
    slots = {}
    for param in get_annotator(annotator_name).params:
        kind = _SLOT_KIND[param.kind]
        slots[param.name] = f"{kind}{taken[kind]}"
        taken[kind] += 1
    return slots


def _slot_names() -> list[str]:
    return [f"{kind}{i}" for kind, count in PARAM_SLOTS.items() for i in range(count)]


def unit_model_choices(models: dict[str, list]) -> list[tuple[str, str]]:
    """A unit's model menu, (label, value) pairs: the served model's ControlNets, then its
    T2I-Adapters (``models`` as ModelRegistry.control_models gives them), in index order; the
    first is what a unit naming no model uses (settings.unit_model). A shipped model is labelled
    by its name and the maps it reads, any other by its file name."""
    choices = []
    for kind, label in (("controlnet", "ControlNet"), ("adapter", "T2I-Adapter")):
        files, names = models[f"{kind}s"], models[f"{kind}_names"]
        for i, (file, name) in enumerate(zip(files, names, strict=True)):
            shown = file if name is None else f"{name} ({shipped.control(name, kind).description})"
            choices.append((f"{label}: {shown}", f"{kind}:{i}"))
    return choices


def chosen_model(value: str | None) -> dict[str, int]:
    """A unit's model menu value as the unit's field: {"controlnet": i} or {"adapter": i}; {} when
    the menu is empty (a model without ControlNets or adapters: the service says so)."""
    if not value:
        return {}
    kind, _, index = str(value).partition(":")
    if kind not in ("controlnet", "adapter") or not index.isdigit():
        raise RequestError(f"unknown unit model {value!r}; pick one in the unit's ControlNet / T2I-Adapter menu")
    return {kind: int(index)}


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


def _slider(gr, setting: Setting, label: str, step: float, maximum: float | None = None, value=None, **kwargs):
    """A slider over a setting's range (settings.py), at its default unless ``value`` is given."""
    value = setting.default if value is None else value
    return gr.Slider(setting.minimum, maximum or setting.maximum, value=value, step=step, label=label, **kwargs)


def build_ui(service: Service, files: ServerFiles, document_api: bool = True):
    """The Gradio Blocks of the page; what it uploads and shows lives in ``files``.
    ``document_api=False`` keeps the generate endpoint callable but out of the API description,
    which Gradio embeds even in its login page: with a password, the model names stay private
    until one logs in."""
    import gradio as gr

    first = service.registry.names[0]
    native = service.native_resolution(first)
    with gr.Blocks(title="ControlNet") as page:
        gr.Markdown("## ControlNet: control Stable Diffusion with edges, scribbles and more")
        with gr.Row():
            with gr.Column(scale=1):
                inputs = _top(gr, service.registry.names, first)
                with gr.Tabs():
                    choices = unit_model_choices(service.registry.control_models(first))
                    units = [_unit_tab(gr, i, service, files, native, choices) for i in range(UNITS)]
                inputs |= _options(gr, service, first, native)
                inputs |= _img2img(gr, files, service.limits)
            with gr.Column(scale=1):
                outputs = _outputs(gr)
        _wire(gr, inputs, units, outputs, service, files, document_api)
    return page


def _top(gr, models: list[str], first: str) -> dict:
    """The model picker, the prompt, Run and Cancel."""
    model = gr.Dropdown(models, value=first, label="Model", elem_id="model")
    prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARACTERS, elem_id="prompt")
    with gr.Row():
        run = gr.Button("Run", variant="primary", elem_id="run")
        cancel = gr.Button("Cancel", elem_id="cancel")
    return {"model": model, "prompt": prompt, "run": run, "cancel": cancel}


def _options(gr, service: Service, first: str, native: int) -> dict:
    """The original canny app's options: ranges and defaults from settings.GENERATION."""
    added, negative = default_prompts(first)
    with gr.Accordion("Options", open=True):
        options = {
            "num_images": _slider(gr, GENERATION["num_images"], "Images", 1, elem_id="num_images"),
            "resolution": _slider(
                gr,
                GENERATION["resolution"],
                "Image Resolution",
                GENERATION["resolution"].multiple_of,
                maximum=service.resolution_limit(first),  # this server's limit for the model
                value=native,
                elem_id="resolution",
            ),
            "guess_mode": gr.Checkbox(GENERATION["guess_mode"].default, label="Guess Mode"),
            "steps": _slider(gr, GENERATION["steps"], "Steps", 1, elem_id="steps"),
            "guidance_scale": _slider(gr, GENERATION["guidance_scale"], "Guidance Scale", 0.1),
            "sampler": gr.Dropdown(
                list(GENERATION["sampler"].allowed()), value=GENERATION["sampler"].default, label="Sampler"
            ),
            # TAESD only where the server loaded one (serve --taesd); the setting's choices otherwise.
            "decoder": gr.Radio(
                list(GENERATION["decoder"].allowed()) if service.registry.taesd else [GENERATION["decoder"].default],
                value=GENERATION["decoder"].default,
                label="Decoder (taesd: fast, a little less detail)",
            ),
        }
        seed = GENERATION["seed"]
        with gr.Row():
            options["seed"] = gr.Number(
                seed.default, label="Seed (-1: random)", precision=0, minimum=seed.minimum, maximum=seed.maximum,
                elem_id="seed",
            )  # fmt: skip
            options["reuse"] = gr.Button("Reuse last seed", size="sm", elem_id="reuse_seed")
        eta = GENERATION["eta"]
        options["eta"] = gr.Number(
            eta.default, label="eta (DDIM's eta / TCD's gamma; empty: the sampler's own)", minimum=eta.minimum,
            maximum=eta.maximum,
        )  # fmt: skip
        options["added_prompt"] = gr.Textbox(added, label="Added Prompt", max_length=MAX_PROMPT_CHARACTERS)
        options["negative_prompt"] = gr.Textbox(negative, label="Negative Prompt", max_length=MAX_PROMPT_CHARACTERS)
    return options


def _img2img(gr, files: ServerFiles, limits: Limits) -> dict:
    """The init image (the mask painted on it) and the denoising strength."""
    from .security import guard_image_editor

    with gr.Accordion("img2img and inpainting", open=False):
        init_image = gr.ImageEditor(
            type="numpy",
            label="Init image (paint the area to repaint for inpainting)",
            layers=False,
            elem_id="init_image",
        )
        guard_image_editor(init_image, files, limits)
        denoising = _slider(gr, GENERATION["denoising_strength"], "Denoising strength", 0.01)
        inpaint = gr.Checkbox(False, label="Inpaint the painted area only", elem_id="inpaint")
    return {"init_image": init_image, "denoising_strength": denoising, "inpaint": inpaint}


def _outputs(gr) -> dict:
    return {
        "gallery": gr.Gallery(label="Output", columns=2, format="png", elem_id="gallery", height="auto"),
        "downloads": gr.Files(label="PNGs with their settings", elem_id="files"),
        "info": gr.Markdown(elem_id="info"),
        "last_seed": gr.State(-1),
    }


def _wire(gr, inputs: dict, units: list[dict], outputs: dict, service: Service, files: ServerFiles, document_api):
    """The page's events: Run (and Enter in the prompt), Cancel, Reuse last seed, a model change."""
    cancellations = _Cancellations()
    fields = {name: component for name, component in inputs.items() if name not in ("run", "cancel", "reuse")}
    shown = [outputs[name] for name in ("gallery", "downloads", "info", "last_seed")]

    def generate(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 -- Gradio's idiom
        flag = cancellations.start(request.session_hash or "anonymous")
        try:
            job = _request_from_page(data, service, units, fields)
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
        return dict(zip(shown, _shown(job, response, map_files, image_files), strict=True))

    everything = set(fields.values()) | {c for unit in units for n, c in unit.items() if n != "weights"}
    inputs["run"].click(
        generate,
        inputs=everything,
        outputs=shown,
        api_name="generate",
        api_visibility="public" if document_api else "undocumented",
        concurrency_limit=None,  # the service queues: one job per model at a time
    )
    inputs["prompt"].submit(generate, inputs=everything, outputs=shown, api_name=False)

    def stop(request: gr.Request) -> None:
        cancellations.cancel(request.session_hash or "anonymous")

    inputs["cancel"].click(stop, inputs=None, outputs=None, api_name=False, queue=False)
    inputs["reuse"].click(lambda value: value, inputs=outputs["last_seed"], outputs=inputs["seed"], api_name=False,
                          queue=False)  # fmt: skip

    def model_changed(name: str):
        added, negative = default_prompts(name)
        try:
            size = service.native_resolution(name)
            choices = unit_model_choices(service.registry.control_models(name))
        except ModelUnavailable as error:  # say so (no path), keep serving
            print(f"controlnet serve: {error.detail}", file=sys.stderr)
            raise gr.Error(str(error), print_exception=False) from None
        except RequestError as error:
            raise gr.Error(str(error), print_exception=False) from None
        menu = gr.update(choices=choices, value=choices[0][1] if choices else None)
        resolution = gr.update(value=size, maximum=service.limits.resolution_limit(size))
        return resolution, added, negative, *([menu] * len(units))

    changed = [inputs["resolution"], inputs["added_prompt"], inputs["negative_prompt"]]
    changed += [unit["model"] for unit in units]
    inputs["model"].change(model_changed, inputs=inputs["model"], outputs=changed, api_name=False)


def _shown(job: GenerateRequest, response: GenerateResponse, map_files: list[Path], image_files: list[Path]):
    """What the page shows of a result: the gallery, the PNG list, the line under it, the seed."""
    gallery = [(str(p), f"detected map {i}") for i, p in enumerate(map_files)]
    gallery += [(str(p), f"seed {s}") for p, s in zip(image_files, response.seeds, strict=True)]
    settings = response.settings
    text = f"seeds {', '.join(map(str, response.seeds))} · {settings['width']}x{settings['height']} · "
    text += f"{settings['steps']} steps · model {job.model}"
    if "inpaint_area" in settings:
        text += f" · inpainted {settings['inpaint_area']:.0%} of the picture"
    return gallery, [str(p) for p in (*map_files, *image_files)], text, response.seeds[0]


def _unit_tab(gr, index: int, service: Service, files: ServerFiles, native: int, models: list) -> dict:
    """One control unit's tab: image, model (``models``: the menu's choices), annotator with
    preview, and its settings (settings.UNIT)."""
    with gr.Tab(f"ControlNet unit {index}"):
        controls = _unit_controls(gr, index, service, files, models)
    preview_button = controls.pop("preview_button")
    preview = controls.pop("preview")

    slots = _slot_names()

    def show_map(path, pose, name, perfect, resolution, *values):
        if not path and not pose:
            raise gr.Error("upload a control image (or a pose JSON) first", print_exception=False)
        try:
            params = dict(zip(slots, values, strict=True))
            unit = _unit(path, name, params, perfect, resolution, service.limits, pose=pose)
            return service.annotate(unit, native)
        except RequestError as error:
            raise gr.Error(str(error), print_exception=False) from None

    names = ("image", "pose", "annotator", "pixel_perfect", "annotator_resolution", *slots)
    preview_button.click(show_map, inputs=[controls[n] for n in names], outputs=preview, api_name=False)

    def annotator_changed(name):
        return _param_updates(gr, name, service.annotators.folder)

    controls["annotator"].change(
        annotator_changed, inputs=controls["annotator"], outputs=[controls[n] for n in ("weights", *slots)],
        api_name=False, queue=False,
    )  # fmt: skip
    return controls


def _unit_controls(gr, index: int, service: Service, files: ServerFiles, models: list) -> dict:
    from .security import guard_file, guard_image

    folder = service.annotators.folder
    enabled = gr.Checkbox(index == 0, label="Enable", elem_id=f"unit{index}_enabled")
    image = gr.Image(
        type="filepath", label="Control image", sources=["upload", "clipboard"], elem_id=f"unit{index}_image"
    )
    guard_image(image, files, service.limits)
    pose = gr.File(
        label="or a pose: OpenPose JSON (the pose editor's file), drawn as the openpose models saw it",
        file_types=[".json"],
        type="filepath",
        height=80,
        elem_id=f"unit{index}_pose",
    )
    guard_file(pose, files)
    model = gr.Dropdown(
        models,
        value=models[0][1] if models else None,
        label="ControlNet / T2I-Adapter",
        info="T2I-Adapters have no control mode: leave it balanced",
        elem_id=f"unit{index}_model",
    )
    default = UNIT["annotator"].default
    choices = [_menu_entry(name, folder) for name in annotator_choices()]
    annotator = gr.Dropdown(choices, value=default, label="Annotator", elem_id=f"unit{index}_annotator")
    weights = gr.Markdown(_weights_note(default, folder), elem_id=f"unit{index}_weights")
    shown = slot_settings(default)
    slots = {}
    with gr.Row():
        for i in range(PARAM_SLOTS["number"]):
            slots[f"number{i}"] = gr.Slider(**shown[f"number{i}"], elem_id=f"unit{index}_number{i}")
    with gr.Row():
        for i in range(PARAM_SLOTS["flag"]):
            slots[f"flag{i}"] = gr.Checkbox(**shown[f"flag{i}"], elem_id=f"unit{index}_flag{i}")
        for i in range(PARAM_SLOTS["choice"]):
            slots[f"choice{i}"] = gr.Dropdown(**shown[f"choice{i}"], elem_id=f"unit{index}_choice{i}")
    preview_button = gr.Button("Preview annotator result", size="sm", elem_id=f"unit{index}_preview")
    preview = gr.Image(label="Detected map", interactive=False, elem_id=f"unit{index}_map")
    strength = _slider(gr, UNIT["strength"], "Control Strength", 0.01)
    with gr.Row():
        start = _slider(gr, UNIT["start"], "Starting control step", 0.01)
        end = _slider(gr, UNIT["end"], "Ending control step", 0.01)
    mode = gr.Radio(list(UNIT["mode"].allowed()), value=UNIT["mode"].default, label="Control mode")
    control_type = gr.Dropdown(
        list(UNIT["control_type"].allowed()),
        value=UNIT["control_type"].default,
        label="Union control type",
        info="for a union ControlNet (xinsir's): what the map is; auto: the annotator's",
        elem_id=f"unit{index}_control_type",
    )
    resize = gr.Radio(list(UNIT["resize_mode"].allowed()), value=UNIT["resize_mode"].default, label="Resize mode")
    with gr.Row():
        pixel_perfect = gr.Checkbox(UNIT["pixel_perfect"].default, label="Pixel perfect")
        resolution = _slider(gr, UNIT["annotator_resolution"], "Annotator resolution", 64)
    return {
        "enabled": enabled,
        "image": image,
        "pose": pose,
        "model": model,
        "annotator": annotator,
        "weights": weights,
        **slots,
        "preview_button": preview_button,
        "preview": preview,
        "strength": strength,
        "start": start,
        "end": end,
        "mode": mode,
        "control_type": control_type,
        "resize_mode": resize,
        "pixel_perfect": pixel_perfect,
        "annotator_resolution": resolution,
    }


def _menu_entry(name: str, folder: Path) -> tuple[str, str]:
    """The menu's (label, value) for an annotator: its name, marked when its weights are missing."""
    from ..annotators import get_annotator

    return (f"{name} (weights missing)" if get_annotator(name).missing(folder) else name), name


def _weights_note(name: str, folder: Path) -> str:
    """The line under the menu: which weight files the annotator reads, and where to get the missing."""
    from ..annotators import get_annotator

    annotator = get_annotator(name)
    missing = annotator.missing(folder)
    if missing:
        wanted = "; ".join(f"`{w.name}` (from {w.source})" for w in missing)
        return f"**{name} cannot run on this server:** it needs {wanted} in the server's annotators folder."
    if annotator.weights:
        return f"{name} reads " + ", ".join(f"`{w.name}`" for w in annotator.weights) + "."
    return ""


def slot_settings(annotator_name: str) -> dict[str, dict]:
    """Each page control's settings for the annotator: label, range, value, choices and visibility
    (the keyword arguments of its Gradio component, or of an update to it)."""
    from ..annotators import get_annotator

    params = {p.name: p for p in get_annotator(annotator_name).params}
    shown = {name: {"label": " ", "visible": False} for name in _slot_names()}
    for name, slot in param_slots(annotator_name).items():
        param = params[name]
        settings = {"label": name.replace("_", " "), "value": param.default, "visible": True, "info": param.help}
        if param.kind in ("int", "float"):
            step = 1 if param.kind == "int" else _step(param.maximum - param.minimum)
            settings |= {"minimum": param.minimum, "maximum": param.maximum, "step": step}
        elif param.kind == "str":
            settings |= {"choices": list(param.choices)}
        shown[slot] = settings
    for slot, settings in shown.items():  # a hidden slider or menu still needs a valid range
        if not settings["visible"] and slot.startswith("number"):
            settings |= {"minimum": 0, "maximum": 1, "value": 0, "step": 1}
        if not settings["visible"] and slot.startswith("choice"):
            settings |= {"choices": [""], "value": ""}
    return shown


def _step(span: float) -> float:
    """A slider step of about a hundredth of the range, rounded to a power of ten."""
    return float(10 ** np.floor(np.log10(span / 100))) if span > 0 else 1.0


def _param_updates(gr, name: str, folder: Path) -> list:
    """The updates when a unit's annotator changes: its weights note, then each slot."""
    shown = slot_settings(name)
    return [gr.update(value=_weights_note(name, folder)), *(gr.update(**shown[slot]) for slot in _slot_names())]


def _unit(
    path, annotator: str, values: dict, pixel_perfect, resolution, limits: Limits, pose=None, **settings
) -> UnitRequest:
    """A unit from the page: the annotator's parameters read back from the slots that show them
    (Gradio gives floats for integer sliders; the annotator's own check refuses what is out of range).
    A pose JSON, when one is uploaded, is the unit's map: drawn, and the annotator not run."""
    from ..annotators import get_annotator

    if pose:
        image = draw_pose(pose, "the pose JSON", "none", None, limits)
        settings["control_type"] = pose_type(settings)
        return UnitRequest(
            image, annotator="none", pixel_perfect=bool(pixel_perfect), annotator_resolution=int(resolution), **settings
        )
    try:
        params = {p.name: p for p in get_annotator(annotator).params}
    except ValueError as error:
        raise RequestError(str(error)) from None
    given = {}
    for name, slot in param_slots(annotator).items():
        value = values[slot]
        if params[name].kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        given[name] = value
    return UnitRequest(
        read_upload(path, limits, "control image"),
        annotator=annotator,
        annotator_params=given,
        pixel_perfect=bool(pixel_perfect),
        annotator_resolution=int(resolution),
        **settings,
    )


def _request_from_page(data: dict, service: Service, unit_inputs: list[dict], fields: dict) -> GenerateRequest:
    value = {name: data[component] for name, component in fields.items()}
    units = []
    for controls in unit_inputs:
        if not data[controls["enabled"]] or not (data[controls["image"]] or data[controls["pose"]]):
            continue
        units.append(
            _unit(
                data[controls["image"]],
                data[controls["annotator"]],
                {slot: data[controls[slot]] for slot in _slot_names()},
                data[controls["pixel_perfect"]],
                data[controls["annotator_resolution"]],
                service.limits,
                data[controls["pose"]],
                **{
                    name: data[controls[name]]
                    for name in ("strength", "start", "end", "mode", "resize_mode", "control_type")
                },
                **chosen_model(data[controls["model"]]),
            )
        )
    init_image, mask = _init_and_mask(value["init_image"], value["inpaint"])
    numbers = {name: value[name] for name in ("num_images", "steps", "seed", "resolution")}
    request = GenerateRequest(
        prompt=value["prompt"] or "",
        units=units,
        model=value["model"],
        negative_prompt=value["negative_prompt"],
        added_prompt=value["added_prompt"],
        # Gradio gives floats for integer sliders and None for an emptied number box.
        **{name: GENERATION[name].default if v is None else int(v) for name, v in numbers.items()},
        guidance_scale=float(value["guidance_scale"]),
        eta=None if value["eta"] is None else float(value["eta"]),
        sampler=value["sampler"],
        decoder=value["decoder"],
        guess_mode=bool(value["guess_mode"]),
        init_image=init_image,
        mask=mask,
        denoising_strength=float(value["denoising_strength"]),
    )
    check_guided(request)
    return request


def _init_and_mask(editor: dict | None, inpaint: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The editor's picture as the init image, and with ``inpaint`` the painted area as the mask."""
    has_picture = editor is not None and editor.get("background") is not None
    if inpaint and not has_picture:
        raise RequestError("inpainting is on but there is no init image: upload one and paint the area to repaint")
    if not has_picture:
        return None, None
    init_image = np.asarray(editor["background"])[..., :3].astype(np.uint8)
    if not inpaint:
        return init_image, None
    painted = np.zeros(init_image.shape[:2], bool)
    for layer in (np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None):
        painted |= (layer[..., 3] > 0) if layer.shape[-1] == 4 else (layer.max(axis=-1) > 0)
    if not painted.any():
        raise RequestError("inpainting is on but nothing is painted: paint the area to repaint")
    return init_image, np.where(painted, 255, 0).astype(np.uint8)

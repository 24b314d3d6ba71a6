"""The AUTOMATIC1111 API's routes: the web UI's ``/sdapi/v1/*`` and the ControlNet extension's
``/controlnet/*``, translated by a1111.py onto the service, on the same app, password
(``--auth``: HTTP basic), limits (security.RequestGuard) and queue as the JSON API.

Errors are one line of JSON, ``{"detail": "..."}``: 422 for a request this server does not take
(the status the web UI and FastAPI give a bad field), 401 without the password, 409 for a job
stopped by ``POST /sdapi/v1/interrupt``, 503 when the queue is full or a model will not load, 507
when the server's disk is full, 500 for the server's own fault (api.answer; RequestGuard adds 404
and 413).
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time.
import base64
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..imaging.images import encode_png
from ..settings import UNIT_COUNT
from . import a1111, api
from .service import RequestError, Service


@dataclass
class Job:
    """A generation this API runs: where its sampling is, and its interrupt flag."""

    kind: str  # "txt2img" or "img2img", as the web UI's state.job
    queued: float = field(default_factory=time.time)  # when it was asked for
    started: float = 0.0  # when it began sampling (0: still waiting for its model)
    step: int = 0
    steps: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    skipped: bool = False  # stopped by /skip rather than /interrupt

    def advance(self, done: int, total: int) -> None:
        """The service's progress callback: called once holding the model, then after each step."""
        self.started = self.started or time.time()
        self.step, self.steps = done, total

    @property
    def timestamp(self) -> str:
        """The web UI's job_timestamp: when it started, or, still waiting, when it was asked for."""
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.started or self.queued))


class Progress:
    """The web UI's shared job state, for ``/progress`` and ``/interrupt``: the jobs this API has
    queued or running (the page's and the JSON API's have their own progress and cancel)."""

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._last_timestamp = "0"  # the last job's, as the web UI keeps it ("0" before any)

    @contextmanager
    def track(self, kind: str) -> Iterator[Job]:
        job = Job(kind)
        with self._lock:
            self._jobs.append(job)
        try:
            yield job
        finally:
            with self._lock:
                self._jobs.remove(job)
                self._last_timestamp = job.timestamp

    def interrupt(self, skip: bool = False) -> None:
        """As the web UI's interrupt: the jobs sampling now stop (here between two steps); those
        still waiting run as usual. ``skip`` (the web UI's skip, which goes on with a job's next
        batch): the same here, where a job is one batch."""
        with self._lock:
            for job in self._jobs:
                if job.started:
                    job.skipped = job.skipped or skip
                    job.cancel.set()

    def state(self) -> dict[str, Any]:
        """``GET /sdapi/v1/progress``: idle is progress 0 and job_count 0 (what clients wait for)."""
        with self._lock:
            jobs = list(self._jobs)
        job = next((j for j in jobs if j.started), jobs[0] if jobs else None)
        fraction = job.step / job.steps if job is not None and job.steps else 0.0
        elapsed = time.time() - job.started if job is not None and job.started else 0.0
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,  # the web UI's estimate
            "state": {
                "skipped": bool(job and job.skipped),
                "interrupted": bool(job and job.cancel.is_set() and not job.skipped),
                "stopping_generation": False,
                "job": job.kind if job else "",
                "job_count": len(jobs),
                "job_timestamp": job.timestamp if job else self._last_timestamp,
                "job_no": 0,
                "sampling_step": job.step if job else 0,
                "sampling_steps": job.steps if job else 0,
            },
            "current_image": None,
            "textinfo": None,
        }


@dataclass
class Options:
    """The web UI options this server has: the model A1111 requests use, and whether detected maps
    are appended to the images (the extension's control_net_no_detectmap)."""

    model: str
    detect_maps: bool = True


class A1111Api:
    """What this API's routes do, and its state on one server: the options (the model its requests
    use, whether detected maps are returned), its jobs (progress, interrupt) and the served models'
    sd-models entries (each hashed once, when first asked)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.progress = Progress()
        self.options = Options(service.registry.names[0])
        self._listings: dict[str, dict] = {}
        self._hashing = threading.Lock()

    def listing(self, name: str) -> dict:
        """The served model ``name`` as ``/sdapi/v1/sd-models`` lists it. Its SHA-256 is computed
        once: requests that come while it is, wait for it rather than each hashing the file."""
        with self._hashing:
            if name not in self._listings:
                self._listings[name] = a1111.checkpoint_title(name, self.service.registry.entry(name).base)
            return self._listings[name]

    def checkpoints(self) -> list[dict]:
        return [self.listing(name) for name in self.service.registry.names]

    def current_options(self) -> dict:
        current = self.listing(self.options.model)
        return {
            "sd_model_checkpoint": current["title"],
            "sd_checkpoint_hash": current["sha256"],
            "samples_format": "png",
            "control_net_unit_count": UNIT_COUNT,
            "control_net_no_detectmap": not self.options.detect_maps,
        }

    def set_options(self, body: Any) -> None:
        """``POST /sdapi/v1/options``: the options this server has; any other is taken and changes
        nothing. A model is loaded now, as the web UI does, and as a job: in the queue."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object of options")
        if body.get("control_net_no_detectmap") is not None:
            self.options.detect_maps = not a1111.boolean(body["control_net_no_detectmap"], "control_net_no_detectmap")
        if body.get("sd_model_checkpoint") is not None:
            name = a1111.find_checkpoint(body["sd_model_checkpoint"], self.checkpoints(), self.service.registry.names)
            self.service.load(name)
            self.options.model = name

    def model(self, body: Any) -> str:
        """The model a request uses: its override_settings' sd_model_checkpoint, else the current
        one (the served models are hashed only when a request names one)."""
        overrides = body.get("override_settings") if isinstance(body, dict) else None
        if overrides in (None, {}):
            return self.options.model
        if not isinstance(overrides, dict):
            raise RequestError("override_settings must be an object of options")
        wanted = overrides.get("sd_model_checkpoint")
        if wanted is None:
            return self.options.model
        return a1111.find_checkpoint(wanted, self.checkpoints(), self.service.registry.names)

    def generate(self, body: Any, img2img: bool) -> dict:
        """txt2img or img2img. The whole body is checked before the model loads, which
        service.generate does in its queue slot, holding the model's lock."""
        model = self.model(body)
        files = self.service.registry.control_files(model)
        translated = a1111.generation(body, img2img, model, files, self.service.limits)
        with self.progress.track("img2img" if img2img else "txt2img") as job:
            response = self.service.generate(translated.request, progress=job.advance, cancelled=job.cancel.is_set)
        return a1111.generation_response(body, translated, response, self.options.detect_maps)

    def control_models(self) -> dict:
        """``/controlnet/model_list``: every served model's ControlNets and T2I-Adapters, each once."""
        titles: dict[str, str] = {}
        for name in self.service.registry.names:
            for paths in self.service.registry.control_files(name).values():
                titles.update({path.name: a1111.model_title(path) for path in paths if path.name not in titles})
        return {"model_list": list(titles.values())}

    def detect(self, body: Any) -> dict:
        """``/controlnet/detect``: annotators can be heavy, so they wait their turn like a job."""
        units = a1111.detect_units(body, self.service.limits)
        with self.service.queue.slot():
            maps = [self.service.annotate(unit, unit.annotator_resolution) for unit in units]
        return {"info": "Success", "images": [base64.b64encode(encode_png(m)).decode("ascii") for m in maps]}


def add_a1111_api(app, service: Service, auth: tuple[str, str] | None) -> None:
    """The A1111 routes on the FastAPI ``app``; with ``auth``, HTTP basic auth in front."""
    state = A1111Api(service)

    def answer(request, work: Callable[[Any], Any], with_body: bool = False):
        return api.answer(request, work, auth, with_body=with_body, bad_request=422, key="detail")

    _add_listing_routes(app, state, answer)
    _add_job_routes(app, state, answer)
    _add_controlnet_routes(app, state, answer)


def _add_listing_routes(app, state: A1111Api, answer: Callable) -> None:
    """The web UI's lists and options."""
    from fastapi import Request

    @app.get("/sdapi/v1/sd-models")
    async def sd_models(request: Request):
        return await answer(request, lambda _: state.checkpoints())

    @app.get("/sdapi/v1/samplers")
    async def samplers(request: Request):
        return await answer(request, lambda _: a1111.sampler_list())

    @app.get("/sdapi/v1/schedulers")
    async def schedulers(request: Request):
        return await answer(request, lambda _: a1111.scheduler_list())

    @app.get("/sdapi/v1/scripts")
    async def scripts(request: Request):
        # "controlnet m2m" is the extension's script that clients look for (webuiapi's
        # has_controlnet); without it webuiapi would re-send one call's units with the next.
        names = ["controlnet", "controlnet m2m"]
        return await answer(request, lambda _: {"txt2img": names, "img2img": names})

    @app.get("/sdapi/v1/options")
    async def get_options(request: Request):
        return await answer(request, lambda _: state.current_options())

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        return await answer(request, state.set_options, with_body=True)


def _add_job_routes(app, state: A1111Api, answer: Callable) -> None:
    """Generation, its progress and its interruption."""
    from fastapi import Request

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await answer(request, lambda body: state.generate(body, img2img=False), with_body=True)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await answer(request, lambda body: state.generate(body, img2img=True), with_body=True)

    @app.get("/sdapi/v1/progress")
    async def get_progress(request: Request):
        return await answer(request, lambda _: state.progress.state())

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request):
        def stop(_):
            state.progress.interrupt()
            return {}

        return await answer(request, stop)

    @app.post("/sdapi/v1/skip")
    async def skip(request: Request):
        def stop(_):
            state.progress.interrupt(skip=True)
            return {}

        return await answer(request, stop)


def _add_controlnet_routes(app, state: A1111Api, answer: Callable) -> None:
    """The extension's own routes (its scripts/api.py)."""
    from fastapi import Request

    @app.get("/controlnet/version")
    async def version(request: Request):
        return await answer(request, lambda _: {"version": a1111.API_VERSION})

    @app.get("/controlnet/settings")
    async def settings(request: Request):
        return await answer(request, lambda _: {"control_net_unit_count": UNIT_COUNT})

    # Their query values are read here, after the password, with this API's one-line errors.
    @app.get("/controlnet/model_list")
    async def model_list(request: Request):
        def listed(_):
            a1111.boolean(request.query_params.get("update", "true"), "update")  # always current here
            return state.control_models()

        return await answer(request, listed)

    @app.get("/controlnet/module_list")
    async def module_list(request: Request):
        def listed(_):
            return a1111.module_list(a1111.boolean(request.query_params.get("alias_names", "false"), "alias_names"))

        return await answer(request, listed)

    @app.post("/controlnet/detect")
    async def detect(request: Request):
        return await answer(request, state.detect, with_body=True)

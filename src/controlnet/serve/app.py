"""The server of ``controlnet serve``: the page (ui.py), the JSON API (api.py) and the
AUTOMATIC1111 API (a1111_routes.py) in one ASGI app behind security.RequestGuard, with its own
folder (files.py), run by uvicorn.
"""

import contextlib
import warnings
from pathlib import Path

from .a1111_routes import add_a1111_api
from .api import add_json_api
from .files import Retention, ServerFiles
from .service import Limits, ModelRegistry, Service
from .ui import build_ui


def build_app(service: Service, auth: tuple[str, str] | None = None, retention: Retention | None = None):
    """The ASGI app: the JSON API at /api, the AUTOMATIC1111 API at /sdapi/v1 and /controlnet, the
    page at /, behind security.RequestGuard.

    It owns a new private folder (files.ServerFiles, ``app.files``) for what the page uploads
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
    from fastapi import FastAPI

    from .security import RequestGuard, confine_page, gradio_folder_environment, server_functions

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            files.close()

    gradio_folder_environment(files)  # before the page is built: its components read it
    app = FastAPI(title="controlnet", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    add_json_api(app, service, auth)
    add_a1111_api(app, service, auth)
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
    annotators_dir: Path | None = None,
    adapters: list[Path] | None = None,
    lora_dir: Path | None = None,
    taesd: Path | None = None,
) -> None:
    """Run the server until interrupted; its folder is removed when it stops, however it stops.
    ``base`` is served with ``controlnets`` and ``adapters`` (T2I-Adapters) as named; LoRAs are
    found by name in ``lora_dir`` only; ``taesd`` (a TAESD file or folder) is loaded with every model."""
    import uvicorn

    from .service import ModelEntry, discover_models

    entries = discover_models(models_folder, include_shipped=base is None)
    if base is not None:
        entries.insert(0, ModelEntry(base.name, base, list(controlnets or []), adapters=list(adapters or [])))
    registry = ModelRegistry(entries, device, dtype, annotators_dir=annotators_dir, lora_dir=lora_dir, taesd=taesd)
    service = Service(registry, limits)
    app = build_app(service, auth, retention)
    print(f"controlnet serve: http://{host}:{port}/  (models: {', '.join(service.registry.names)})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:  # also when uvicorn cannot bind the port (it exits before the app's lifespan)
        app.files.close()

"""``controlnet serve``: the web UI, the JSON API and the AUTOMATIC1111 API (serve/), with its
limits checked first."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .. import shipped
from .common import CommandError, UsageError, add_annotators_dir, check_device, check_range, control_files


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    s = commands.add_parser(
        "serve",
        help="the web UI, a JSON API and the AUTOMATIC1111 API (Gradio), on 127.0.0.1:7860 by default",
        description="Serve the web UI, the JSON API (POST /api/generate) and the AUTOMATIC1111 web UI's API with "
        "the ControlNet extension's units (/sdapi/v1/txt2img, /controlnet/detect, ...; docs/webui.md), all behind "
        "--auth and the same limits. The shipped model by default, with "
        "every shipped ControlNet and T2I-Adapter, which a unit may name (controlnet: 'canny'); "
        "--models DIR offers the base models, ControlNets and T2I-Adapters found in DIR (and nothing outside it).",
    )
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from other machines")
    s.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    s.add_argument("--models", type=Path, help="a folder of model files to offer in the model picker")
    s.add_argument(
        "--base", type=Path, help="serve this base model (with --controlnet, --adapter) instead of the shipped one"
    )
    s.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH|NAME",
        help=f"ControlNet file for --base, or a shipped one's name ({', '.join(shipped.names()) or 'none'}); "
        "repeatable",
    )
    s.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH|NAME",
        help="T2I-Adapter file or diffusers folder for --base, or a shipped one's name "
        f"({', '.join(shipped.names('adapter')) or 'none'}); repeatable: a unit picks it as adapter N",
    )
    s.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, mps")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest uploaded image (default 10 MB)")
    s.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest uploaded image in pixels")
    s.add_argument("--max-queue", type=int, default=8, help="jobs waiting or running before refusing (default 8)")
    s.add_argument(
        "--keep-minutes",
        type=float,
        default=60.0,
        help="how long the page's uploads and results stay downloadable (default 60); all go when the server stops",
    )
    s.add_argument(
        "--max-stored-mb", type=float, default=2048.0, help="disk for the page's uploads and results (default 2048)"
    )
    add_annotators_dir(s)
    s.add_argument(
        "--lora-dir",
        type=Path,
        help="a folder of LoRA files, offered by name: <lora:NAME:WEIGHT> in prompts and the JSON API's loras "
        "(nothing outside it)",
    )
    s.add_argument(
        "--taesd",
        type=Path,
        metavar="PATH",
        help="TAESD's decoder file (taesd_decoder.pth) or a diffusers AutoencoderTiny folder: the decoder choice "
        "taesd, for fast final decodes",
    )
    return {"serve": cmd_serve}


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401 -- only to say clearly that the extra is missing
    except ImportError:
        raise UsageError("controlnet serve needs Gradio: pip install 'controlnet[ui]'") from None
    from ..runtime import default_device

    check_range("--port", args.port, 1, 65535)
    check_range("--max-upload-mb", args.max_upload_mb, 0.01, 1024)
    check_range("--max-pixels", args.max_pixels, 64 * 64, 2**31)
    check_range("--max-queue", args.max_queue, 1, 10_000)
    check_range("--keep-minutes", args.keep_minutes, 1, 7 * 24 * 60)
    check_range("--max-stored-mb", args.max_stored_mb, 1, 2**20)
    auth = None
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not colon or not user or not password:
            raise UsageError("--auth must be USER:PASS, both non-empty")
        auth = (user, password)
    if args.models is not None and not args.models.is_dir():
        raise UsageError(f"--models {args.models}: no such folder")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir}: no such folder")
    if args.taesd is not None and not args.taesd.exists():
        raise UsageError(f"--taesd {args.taesd}: no such file or folder")
    # Without --base the shipped model is served with every shipped ControlNet and adapter already.
    if args.controlnet and args.base is None:
        raise UsageError("--controlnet needs --base (the base model it was trained for)")
    if args.adapter and args.base is None:
        raise UsageError("--adapter needs --base (the base model it was trained for)")
    if args.base is not None and not args.base.exists():
        raise UsageError(f"{args.base}: no such file or folder")
    controlnets, adapters = control_files(args.controlnet, "controlnet"), control_files(args.adapter, "adapter")
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen:
        where = "with --auth" if auth else "WITHOUT a password (add --auth USER:PASS)"
        print(f"warning: --listen serves on every network interface, {where}", file=sys.stderr)
    from ..serve.app import serve
    from ..serve.files import Retention
    from ..serve.service import Limits, ModelUnavailable

    device = str(default_device()) if args.device == "auto" else args.device
    check_device(device)
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_queue)
    retention = Retention(max_bytes=int(args.max_stored_mb * 2**20), max_age_s=args.keep_minutes * 60)
    try:
        serve(
            args.models,
            host,
            args.port,
            auth,
            limits,
            device,
            args.dtype,
            args.base,
            controlnets,
            retention,
            args.annotators_dir,
            adapters,
            args.lora_dir,
            args.taesd,
        )
    except ModelUnavailable as error:  # the first model is loaded before serving
        raise CommandError(error.detail) from None

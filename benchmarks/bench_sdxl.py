"""SDXL + one ControlNet at 1024x1024 in bf16, ours against diffusers: seconds per step, peak memory.

A whole guided generation on each side, on the very same random weights in SDXL 1.0's real layouts
(the ``sdxl`` preset: the 2.6B-parameter UNet, both text encoders, the VAE) and one full SDXL
ControlNet (diffusers' controlnet-canny-sdxl-1.0 layout, 1.25B parameters): text encoding of a
prompt and a negative prompt, the hint, ``--warmup`` + ``--steps`` DDIM steps with classifier-free
guidance (scale 5, batch 2), the VAE decode. The first ``--warmup`` steps are not timed (first
calls, a compile); s/step is the median of the others, read off each pipeline's step callback.

  ours             ``Pipeline.from_files`` of the single file (``sd_xl_base_1.0.safetensors``'s layout)
                   and the ControlNet's diffusers-layout file, bf16, channels_last (its defaults here)
  ours-low-memory  the same with ``low_memory=True`` (UNet and ControlNet streamed block by block)
  diffusers        ``StableDiffusionXLControlNetPipeline.from_pretrained`` of the diffusers folders,
                   ``torch_dtype=bfloat16``, UNet, ControlNet and VAE channels_last: its best eager
                   CPU settings (the ratios are against this peer)
  ours-compiled, diffusers-compiled   (``--compile``) the same plus ``torch.compile`` with
                   inductor's freezing (``Pipeline.compile()``; ``.compile(dynamic=False)`` of
                   diffusers' UNet and ControlNet): each compiled graph holds a second copy of the
                   weights; the first two steps are warm-up (compiling)

Every peer runs in its own process, one after the other, never two at once: its peak memory
(``/proc/self/status`` VmHWM, the resident-set high-water mark) is its own. "load peak" is the
process's peak while it built its pipeline (reading the files); "run peak" the peak over the
generation alone (VmHWM reset after building); "peak" the larger, the process's whole peak.

The weights are random (no real SDXL weights here), made once from fixed seeds in bf16 and cached in
``--cache-dir`` (default ~/.cache/controlnet-bench/sdxl/<config>): the base as one LDM single file
and as a diffusers pipeline folder, the ControlNet as a diffusers-layout single file (what
lllyasviel's ``diffusers_xl_*_full.safetensors`` are) and as a diffusers folder: about 19 GB at full
size, written in a few minutes the first time. Both sides read the same bits.

    python benchmarks/bench_sdxl.py [--size 1024] [--steps 2] [--warmup 1] [--peers ours,diffusers,...]
                                    [--compile] [--cache-dir DIR] [--malloc fixed|default] [--force] [--plan]
    python benchmarks/bench_sdxl.py --dry-run    # the whole path on a reduced SDXL at 256 px: 30 s of CPU

``--dry-run`` (``--tiny``): a reduced SDXL configuration (the reduced model of tests/test_sdxl.py:
every code path of the real one) at 256x256 unless ``--size`` says otherwise; its figures mean
nothing, it checks that the script runs. A peer whose expected peak does not fit in the memory
available is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from controlnet.config import SDXL, ModelConfig, TextEncoderConfig, VAEConfig

GUIDANCE_SCALE = 5.0  # diffusers' SDXL default
PEERS = {
    "ours": "ours: Pipeline bf16 + channels_last",
    "ours-low-memory": "ours: Pipeline bf16 + channels_last, low_memory=True",
    "diffusers": "diffusers: bf16 + channels_last",
    "ours-compiled": "ours: Pipeline bf16 + channels_last + compile (freezing)",
    "diffusers-compiled": "diffusers: bf16 + channels_last + compile (freezing)",
}
DEFAULT_PEERS = ("ours", "ours-low-memory", "diffusers")
REFERENCE = "diffusers"
WEIGHTS_VERSION = 1  # bump when the way the cached weights are made changes: they are made again
MARGIN_GIB = 1.0  # memory left free when deciding whether a peer fits

# A reduced SDXL for --dry-run: every code path of the real model (three levels, no attention at the
# first, transformer depths 2 and 3, the vector y, both text encoders) in a few million parameters,
# as tests/test_sdxl.py's SMALL.
TINY = SDXL.replace(
    name="sdxl-tiny",
    unet=dataclasses.replace(
        SDXL.unet,
        model_channels=32,
        num_head_channels=16,
        transformer_depth=(0, 2, 3),
        context_dim=96,
        adm_in_channels=48 + 6 * 256,
    ),
    vae=VAEConfig(ch=32, scale_factor=0.13025),
    text=TextEncoderConfig(
        width=32, layers=3, heads=2, mlp_width=128, output_layer="penultimate", final_layer_norm=False
    ),
    text_2=TextEncoderConfig(
        arch="openclip",
        width=64,
        layers=3,
        heads=4,
        mlp_width=256,
        output_layer="penultimate",
        final_layer_norm=False,
        projection_dim=48,
    ),
    native_resolution=256,
)


# -- the weights, made once ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Files:
    folder: Path

    @property
    def base_file(self) -> Path:  # our single file: sd_xl_base_1.0.safetensors's layout
        return self.folder / "sd_xl_base.safetensors"

    @property
    def controlnet_file(self) -> Path:  # diffusers' layout in one file, as diffusers_xl_canny_full.safetensors
        return self.folder / "controlnet_xl_full.safetensors"

    @property
    def base_folder(self) -> Path:
        return self.folder / "diffusers-base"

    @property
    def controlnet_folder(self) -> Path:
        return self.folder / "diffusers-controlnet"

    @property
    def marker(self) -> Path:
        return self.folder / "complete.json"


def weights_record(config: ModelConfig) -> dict:
    return {"config": config.name, "dtype": "bfloat16", "seeds": common.SEEDS, "version": WEIGHTS_VERSION}


def weights_ready(files: Files, config: ModelConfig) -> bool:
    try:
        return json.loads(files.marker.read_text()) == weights_record(config)
    except (OSError, ValueError):
        return False


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A meta-device module made real in bf16 and filled from ``seed`` (common.randomize)."""
    return common.randomize(module.to(torch.bfloat16).to_empty(device="cpu"), seed)


def make_weights(files: Files, config: ModelConfig) -> None:
    """The random base model and ControlNet in bf16, written in both layouts; the marker last.
    One model in memory at a time (the base: 6.9 GB at full size)."""
    from controlnet.formats.diffusers import save_diffusers
    from controlnet.formats.ldm import save_ldm
    from controlnet.models.controlnet import ControlNet
    from controlnet.models.stable_diffusion import StableDiffusion, build_empty

    files.marker.unlink(missing_ok=True)
    files.folder.mkdir(parents=True, exist_ok=True)
    model = StableDiffusion(config, empty=True)
    for name in ("unet", "vae", "text_encoder"):
        setattr(model, name, _random(getattr(model, name), common.SEEDS[name]))
    save_ldm(files.base_file, model)
    save_diffusers(files.base_folder, model)
    del model
    controlnet = _random(build_empty(lambda: ControlNet(config.controlnet())), common.SEEDS["controlnet"])
    save_diffusers(files.controlnet_file, controlnet=controlnet)
    save_diffusers(files.controlnet_folder, controlnet=controlnet)
    files.marker.write_text(json.dumps(weights_record(config)))


# -- what to expect --------------------------------------------------------------------------------


def parameter_bytes(config: ModelConfig) -> dict[str, int]:
    """bf16 bytes of each model (counted on the meta device)."""
    from controlnet.models.controlnet import ControlNet
    from controlnet.models.stable_diffusion import StableDiffusion, build_empty

    model = StableDiffusion(config, empty=True)
    parts = {name: getattr(model, name) for name in ("unet", "text_encoder", "vae")}
    parts["controlnet"] = build_empty(lambda: ControlNet(config.controlnet()))
    return {name: 2 * sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


@torch.no_grad()
def count_flops(config: ModelConfig, size: int) -> dict[str, float]:
    """FLOPs of one guided step (ControlNet + UNet on batch 2) and of the VAE decode at ``size``,
    counted with torch.utils.flop_counter on the meta device (no memory, no arithmetic; attention
    as the math path's matrix products)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from controlnet.models.controlnet import ControlNet
    from controlnet.models.stable_diffusion import StableDiffusion, build_empty

    model = StableDiffusion(config, empty=True).to(torch.bfloat16)
    controlnet = build_empty(lambda: ControlNet(config.controlnet())).to(torch.bfloat16)
    unet, latent = config.unet, size // config.vae.downsample_factor
    dtype = torch.bfloat16
    with torch.device("meta"):
        x = torch.zeros(2, unet.in_channels, latent, latent, dtype=dtype)
        t = torch.zeros(2)
        context = torch.zeros(2, config.text.max_length, unet.context_dim, dtype=dtype)
        y = torch.zeros(2, unet.adm_in_channels, dtype=dtype)
        hint = torch.zeros(1, 3, size, size, dtype=dtype)
        z = torch.zeros(1, config.vae.z_channels, latent, latent, dtype=dtype)
        features = controlnet.encode_hint(hint).expand(2, -1, -1, -1)  # once per generation: not a step's
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
            residuals = controlnet(x, features, t, context, y)
            model.unet(x, t, context, control=residuals, y=y)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as decode:
            model.vae.decode(z)
    return {"step": step.get_total_flops(), "decode": decode.get_total_flops()}


def expected_gib(peer: str, sizes: dict[str, int], size: int) -> dict[str, float]:
    """A peer's process at its peak, roughly: the libraries, the weights, the activations.

    Activations at 1024 px are mostly the VAE decode's (256 channels at full resolution: 0.5 GiB a
    tensor in bf16, a few alive at once); a guided step's are a few hundred MiB. In low-memory mode
    the build still reads every weight before parking it (the load peak); the run holds at most the
    text encoders (parked whole) or one block of the UNet and ControlNet. Compiled graphs with
    freezing hold a second copy of the UNet's and ControlNet's weights, and inductor's compile
    workers run beside. diffusers' from_pretrained without accelerate holds a component's weights
    twice while it loads it (the UNet's: the largest)."""
    weights = sum(sizes.values()) / common.GiB
    activations = 0.3 + 2.7 * (size / 1024) ** 2
    libraries = 1.0 if peer.startswith("diffusers") else 0.7
    load = libraries + weights
    if peer.startswith("diffusers") and importlib.util.find_spec("accelerate") is None:
        load += sizes["unet"] / common.GiB  # the file's tensors beside the model's, one component at a time
    if peer == "ours-low-memory":
        largest = max(sizes["text_encoder"], sizes["vae"]) / common.GiB
        run = libraries + largest + 0.1 * weights + activations
    elif peer.endswith("compiled"):
        run = libraries + weights + (sizes["unet"] + sizes["controlnet"]) / common.GiB + activations + 1.5
    else:
        run = libraries + weights + activations
    return {"load": load, "run": run, "peak": max(load, run)}


# -- one peer, in its own process ------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(line.split()[1]) * 1024
    return values


def _phases(start: float, marks: list[float], end: float, warmup: int) -> dict:
    """Timings from the step-end marks: the steps after the warm-up ones, before the first step
    (text, hint; the first step's own time taken as the median timed step's), the decode."""
    durations = np.diff([start, *marks])
    timed = [float(d) for d in durations[warmup:]]
    step = float(np.median(timed))
    return {
        "total_s": end - start,
        "steps_s": timed,
        "step_s": step,
        "warmup_s": [float(d) for d in durations[:warmup]],
        "before_s": max(0.0, float(durations[0]) - step),
        "decode_s": end - marks[-1],
    }


class OursPeer:
    def __init__(self, files: Files, low_memory: bool, compile: bool) -> None:
        from controlnet.pipeline import Pipeline

        self.pipe = Pipeline.from_files(
            files.base_file, [files.controlnet_file], dtype=torch.bfloat16, low_memory=low_memory
        )
        self.compiled = compile
        if compile:
            self.pipe.compile()

    def describe(self) -> str:
        pipe = self.pipe
        mode = ", low memory" if pipe.placement.low_memory else ""
        compiled = "compiled (freezing)" if self.compiled else "eager"
        dtype = str(pipe.dtype).removeprefix("torch.")
        return f"{pipe.model.config.name}, {dtype}, channels_last {pipe.channels_last}, {compiled}{mode}"

    def generate(self, size: int, steps: int, progress) -> np.ndarray:
        from controlnet.pipeline import ControlUnit

        result = self.pipe.generate(
            common.PROMPT,
            [ControlUnit(common.control_image(size))],
            negative_prompt=common.NEGATIVE_PROMPT,
            steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            eta=0.0,
            sampler="ddim",
            resolution=size,
            latents=common.initial_latents(size),
            output="float",
            progress=lambda done, total: progress(),
        )
        return np.asarray(result.images[0], np.float32)


class DiffusersPeer:
    def __init__(self, files: Files, compile: bool) -> None:
        import diffusers
        import transformers

        for library in (diffusers, transformers):  # its loading notes and progress bars
            library.utils.logging.set_verbosity_error()
            library.utils.logging.disable_progress_bar()
        # Without accelerate, from_pretrained builds each model (uninitialised, in bf16) and copies the
        # file's tensors into it: a component's weights are twice in memory while it loads.
        self.accelerate = importlib.util.find_spec("accelerate") is not None
        dtype = torch.bfloat16
        controlnet = diffusers.ControlNetModel.from_pretrained(files.controlnet_folder, dtype=dtype)
        self.pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
            files.base_folder, controlnet=controlnet, dtype=dtype, add_watermarker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        for module in (self.pipe.unet, self.pipe.controlnet, self.pipe.vae):
            module.to(memory_format=torch.channels_last)
        self.compiled = compile
        if compile:  # as bench_image.py's (b) and Pipeline.compile
            for module in (self.pipe.unet, self.pipe.controlnet):
                module.compile(dynamic=False, options={"freezing": True})

    def describe(self) -> str:
        scheduler = type(self.pipe.scheduler).__name__
        compiled = "compiled (freezing)" if self.compiled else "eager"
        loading = "with" if self.accelerate else "without"
        return (
            f"{type(self.pipe).__name__}.from_pretrained ({loading} accelerate), bfloat16, channels_last, "
            f"{scheduler}, {compiled}"
        )

    def generate(self, size: int, steps: int, progress) -> np.ndarray:
        from PIL import Image

        def on_step_end(pipe, step, timestep, tensors):
            progress()
            return {}

        output = self.pipe(
            prompt=common.PROMPT,
            negative_prompt=common.NEGATIVE_PROMPT,
            image=Image.fromarray(common.control_image(size)),
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            eta=0.0,
            latents=common.initial_latents(size).to(torch.bfloat16),
            output_type="np",
            height=size,
            width=size,
            callback_on_step_end=on_step_end,
        )
        return np.asarray(output.images[0], np.float32)


def run_peer(args: argparse.Namespace) -> None:
    """The child process: build one peer, run one generation, write what it measured to --result."""
    import warnings

    from controlnet.runtime import keep_freed_memory

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. its note that torchvision is absent
    if args.malloc == "fixed":  # every peer's process alike, as the other benchmarks' workers
        keep_freed_memory()
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    common.set_compile_cache()
    peer, files = args.child, Files(Path(args.weights))
    compiled = peer.endswith("compiled")
    warmup = max(args.warmup, 2) if compiled else args.warmup

    def say(text: str) -> None:
        print(f"  [{peer}] {text}", flush=True)

    start = time.perf_counter()
    if peer.startswith("ours"):
        target = OursPeer(files, low_memory=peer == "ours-low-memory", compile=compiled)
    else:
        target = DiffusersPeer(files, compile=compiled)
    build_s = time.perf_counter() - start
    common.release_free_memory()
    built = _status()
    say(f"built in {build_s:.1f} s ({target.describe()}); resident {built['VmRSS'] / common.GiB:.2f} GiB")
    reset = common.reset_peak_memory()  # False where the kernel refuses: the run peak is then the whole process's

    marks: list[float] = []

    def progress() -> None:
        marks.append(time.perf_counter())
        say(f"step {len(marks)}/{warmup + args.steps}: {marks[-1] - (marks[-2] if len(marks) > 1 else start):.1f} s")

    with torch.no_grad():
        start = time.perf_counter()
        image = target.generate(args.size, warmup + args.steps, progress)
        end = time.perf_counter()
    after = _status()
    result = {
        "peer": peer,
        "describe": target.describe(),
        "threads": torch.get_num_threads(),
        "build_s": build_s,
        "load_peak": built["VmHWM"],
        "run_peak": after["VmHWM"],
        "peak": max(built["VmHWM"], after["VmHWM"]),
        "rss_after": after,
        "peak_reset": reset,
        "warmup": warmup,
        **_phases(start, marks, end, warmup),
    }
    np.save(Path(args.result).with_suffix(".npy"), image)
    Path(args.result).write_text(json.dumps(result))
    say(f"{args.steps} timed steps: {result['step_s']:.2f} s/step; run peak {after['VmHWM'] / common.GiB:.2f} GiB")


# -- the parent: plan, run each peer alone, report ------------------------------------------------


def lscpu_model() -> str:
    """lscpu's "Model name" (the CPU); /proc/cpuinfo's where lscpu is absent."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in output.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return common.cpu_line().split(" (")[0]


def machine_description() -> str:
    import diffusers

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / common.GiB
    return (
        f"{lscpu_model()}; {common.cpu_line().split(' (', 1)[1].rsplit(')', 1)[0]}; {os.cpu_count()} CPUs, "
        f"{total:.1f} GiB; torch {torch.__version__}, diffusers {diffusers.__version__}"
    )


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, help="image size in pixels (default 1024; dry run: 256)")
    parser.add_argument("--steps", type=int, default=2, help="timed DDIM steps (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1; compiled: at least 2)")
    parser.add_argument("--peers", help=f"which of {','.join(PEERS)} (default: {','.join(DEFAULT_PEERS)})")
    parser.add_argument("--compile", action="store_true", help="also ours-compiled and diffusers-compiled")
    parser.add_argument(
        "--dry-run", "--tiny", dest="tiny", action="store_true", help="a reduced SDXL at 256 px: checks the script"
    )
    parser.add_argument(
        "--cache-dir", help="where the random weights are kept (default ~/.cache/controlnet-bench/sdxl)"
    )
    parser.add_argument(
        "--malloc", choices=("fixed", "default"), default="fixed", help="glibc malloc kept (keep_freed_memory)"
    )
    parser.add_argument("--plan", action="store_true", help="print the expected time and memory, then stop")
    parser.add_argument("--force", action="store_true", help="run peers whose expected peak exceeds the memory free")
    parser.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--make-weights", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (256 if args.tiny else 1024)
    if args.size % 64:
        parser.error(f"--size must be a multiple of 64 (got {args.size})")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    peers = args.peers.split(",") if args.peers else list(DEFAULT_PEERS)
    if args.compile:
        peers += [p for p in ("ours-compiled", "diffusers-compiled") if p not in peers]
    args.peers = [p.strip() for p in peers if p.strip()]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}: choose from {','.join(PEERS)}")
    args.config = TINY if args.tiny else SDXL
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "controlnet-bench" / "sdxl"
    cache = Path(args.cache_dir) if args.cache_dir else default
    args.files = Files(cache.expanduser() / args.config.name)
    return args


def _child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--size", str(args.size), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--malloc", args.malloc, "--weights", str(args.files.folder)]
    return command + (["--tiny"] if args.tiny else []) + list(extra)


def ensure_weights(args: argparse.Namespace, sizes: dict[str, int]) -> None:
    files, config = args.files, args.config
    if weights_ready(files, config):
        print(f"weights: cached in {files.folder}")
        return
    disk = 2 * sum(sizes.values()) / common.GiB
    files.folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(files.folder).free / common.GiB
    print(f"weights: making them once in {files.folder} ({disk:.1f} GiB of files, {free:.0f} GiB free)", flush=True)
    if disk + 1 > free:
        sys.exit(f"bench_sdxl: not enough disk for the weights ({disk:.1f} GiB needed, {free:.1f} GiB free)")
    started = time.perf_counter()
    subprocess.run(_child_command(args, "--make-weights"), check=True)  # its memory goes back when it ends
    print(f"weights: made in {time.perf_counter() - started:.0f} s", flush=True)


def plan(args: argparse.Namespace, sizes: dict[str, int], flops: dict[str, float], tflops: float) -> list[str]:
    """Print what to expect; return the peers that fit in memory."""
    config, size = args.config, args.size
    print(
        f"model: {config.name}: UNet {sizes['unet'] / 1e9:.2f} GB, ControlNet {sizes['controlnet'] / 1e9:.2f} GB, "
        f"text encoders {sizes['text_encoder'] / 1e9:.2f} GB, VAE {sizes['vae'] / 1e9:.2f} GB in bf16 "
        f"({sum(sizes.values()) / common.GiB:.1f} GiB)"
    )
    # 55%: what our eager bf16 step reaches of the matmul probe with SD 1.5 (docs/benchmarks.md).
    rate = 0.55 * tflops * 1e12
    step_s, decode_s = flops["step"] / rate, flops["decode"] / rate
    steps = args.warmup + args.steps
    print(
        f"work: {flops['step'] / 1e12:.2f} TFLOP per guided step (ControlNet + UNet, batch 2), VAE decode "
        f"{flops['decode'] / 1e12:.2f} TFLOP; bf16 matmul probe {tflops:.2f} TFLOP/s -> about {step_s:.1f} s a "
        f"step and {steps * step_s + decode_s:.0f} s of generation per peer (plus loading; compiling: minutes)"
    )
    available = common.memory_available() / common.GiB
    print(f"memory: {available:.1f} GiB available; each peer alone in its own process, one after the other:")
    chosen = []
    for peer in args.peers:
        gib = expected_gib(peer, sizes, size)
        fits = gib["peak"] + MARGIN_GIB <= available
        note = "" if fits else (" (over the memory available: --force runs it)" if not args.force else " (forced)")
        print(
            f"  {peer:<19} expected peak about {gib['peak']:5.1f} GiB "
            f"(load {gib['load']:.1f}, run {gib['run']:.1f}){note}"
        )
        if fits or args.force:
            chosen.append(peer)
    if "ours-low-memory" in chosen:
        print(
            f"  (ours-low-memory parks {sum(sizes.values()) / common.GiB:.1f} GiB of weights "
            f"in {tempfile.gettempdir()})"
        )
    return chosen


def run_all(args: argparse.Namespace, peers: list[str]) -> tuple[dict, dict, dict]:
    results, images, errors = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-sdxl-") as folder:
        for peer in peers:
            path = Path(folder) / f"{peer}.json"
            print(f"{peer}: {PEERS[peer]}", flush=True)
            started = time.perf_counter()
            done = subprocess.run(_child_command(args, "--child", peer, "--result", str(path)))
            if done.returncode != 0 or not path.exists():
                why = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
                errors[peer] = f"exit status {done.returncode}{why}"
                print(f"  [{peer}] failed: {errors[peer]}", flush=True)
                continue
            results[peer] = json.loads(path.read_text())
            images[peer] = np.load(path.with_suffix(".npy"))
            print(f"  [{peer}] process done in {time.perf_counter() - started:.0f} s", flush=True)
    return results, images, errors


def report(args: argparse.Namespace, results: dict, images: dict, errors: dict, flops: dict) -> None:
    size = args.size
    print()
    print(
        f"== {args.config.name} + one full ControlNet, {size}x{size}, bf16, guidance {GUIDANCE_SCALE:g}, "
        f"{args.steps} timed DDIM steps after {args.warmup} (compiled: 2) =="
    )
    print(f"machine: {machine_description()}")
    header = ["peer", "s/step", "x diffusers", "TFLOP/s", "peak GiB", "peak x diffusers", "load peak", "run peak"]
    header += ["text+hint s", "decode s", "total s", "build s", "max |diff| vs ours"]
    reference = results.get(REFERENCE)
    ours_image = images.get("ours")
    rows = []
    for peer in args.peers:
        record = results.get(peer)
        if record is None:
            rows.append([peer, errors.get(peer, "skipped"), *[""] * (len(header) - 2)])
            continue
        step_ratio = f"{record['step_s'] / reference['step_s']:.2f}" if reference else "-"
        peak_ratio = f"{record['peak'] / reference['peak']:.2f}" if reference else "-"
        diff = "-" if ours_image is None else f"{np.abs(images[peer] - ours_image).max():.1e}"
        rows.append(
            [
                peer,
                f"{record['step_s']:.2f}",
                step_ratio,
                f"{flops['step'] / record['step_s'] / 1e12:.3f}",
                f"{record['peak'] / common.GiB:.2f}",
                peak_ratio,
                f"{record['load_peak'] / common.GiB:.2f}",
                f"{record['run_peak'] / common.GiB:.2f}" + ("" if record["peak_reset"] else " (not reset)"),
                f"{record['before_s']:.2f}",
                f"{record['decode_s']:.2f}",
                f"{record['total_s']:.1f}",
                f"{record['build_s']:.1f}",
                diff,
            ]
        )
    print(common.format_table(header, rows))
    for peer in args.peers:
        record = results.get(peer)
        if record is not None:
            after = record["rss_after"]
            steps = ", ".join(f"{s:.2f}" for s in record["steps_s"])
            print(
                f"  {peer}: {record['describe']}; {record['threads']} threads; timed steps {steps} s; after the run "
                f"RssAnon {after['RssAnon'] / common.GiB:.2f} GiB, RssFile {after['RssFile'] / common.GiB:.2f} GiB"
            )
    print(
        textwrap.fill(
            " ".join(
                [
                    "s/step: median of the timed steps (ControlNet + UNet on batch 2, guidance, the sampler's update;",
                    "diffusers' ControlNet embeds the hint inside every step, ours once).",
                    "x diffusers: over the diffusers peer (bf16 + channels_last, eager).",
                    "TFLOP/s: the step's FLOPs (counted on our models) over s/step.",
                    "peak: the process's VmHWM (resident-set high-water mark), the larger of load peak (building the",
                    "pipeline from the files) and run peak (the generation: text, hint, steps, decode).",
                    "text+hint: before the first step (the first step's time taken as the median's).",
                    "max |diff|: of the [0, 1] images against ours (bf16 on both sides: kernels round differently).",
                ]
            ),
            width=110,
        )
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.make_weights:
        make_weights(Files(Path(args.weights)), args.config)
        return
    if args.child:
        run_peer(args)
        return
    started = time.perf_counter()
    print(f"bench_sdxl: {common.cpu_line()}; {common.machine_line()}")
    sizes = parameter_bytes(args.config)
    flops = count_flops(args.config, args.size)
    tflops = common.matmul_tflops(torch.bfloat16, n=2048, repeats=3)
    peers = plan(args, sizes, flops, tflops)
    if args.plan:
        return
    ensure_weights(args, sizes)
    results, images, errors = run_all(args, peers)
    for peer in args.peers:
        if peer not in peers:
            errors[peer] = "skipped: expected peak over the memory available"
    report(args, results, images, errors, flops)
    print(f"\n{common.machine_line()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

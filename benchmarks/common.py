"""Shared pieces of the speed benchmarks (bench_step.py, bench_image.py).

- The very same random SD 1.5-size weights in both stacks: ours are filled from fixed seeds (one
  generator per model, parameters in order, as tests/helpers.py ``randomize``), in the wanted dtype
  directly (never a whole fp32 copy next to a bf16 one); diffusers' models are built on the meta
  device and take our tensors through the key maps of ``controlnet.formats`` (``assign=True``:
  shared, not copied). Every process builds them from the seeds, so every process has the same bits.
- ``Worker``: one variant in its own spawned process, driven by method calls over a pipe, so that
  its peak memory (``/proc/self/status`` VmHWM, reset with ``/proc/self/clear_refs``) is its own and
  several variants can be timed alternately.
- The bf16 / fp32 matmul probes (TFLOP/s), timing helpers, the inductor cache folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlnet.runtime import keep_freed_memory

GiB = 2**30
SEEDS = {"unet": 1, "vae": 2, "text_encoder": 3, "controlnet": 4}
GUIDANCE_SCALE = 9.0
TIMESTEP = 501  # one of DDIM's 20 "leading" timesteps (1 + 50k), mid-way
PROMPT = "a bird on a branch, best quality, extremely detailed"
NEGATIVE_PROMPT = "lowres, bad anatomy, worst quality"
# Per image sample at 512x512 (docs/reference.md, "The cost of a step"): the fallback when FLOPs are not measured.
REFERENCE_TFLOP_512 = {"unet": 0.68, "controlnet": 0.23}


# -- the environment -------------------------------------------------------------------------------


def set_compile_cache() -> str:
    """Keep inductor's compiled artefacts between runs (its FX graph and AOT caches are on by
    default; they live in /tmp unless told otherwise). Returns the folder."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "controlnet-bench" / "inductor"
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default))


def cpu_line() -> str:
    """The CPU model and its matrix extensions (AMX tiles, AVX-512 bf16), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    extensions = [f for f in ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f") if f in flags]
    return f"{model} ({', '.join(extensions) or 'no AVX-512'}), {os.cpu_count()} CPUs"


def machine_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    available = memory_available() / GiB
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load}, {available:.1f} GiB available"
    )


def memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def memory() -> dict[str, int]:
    """This process's resident memory now (rss) and its peak (hwm), in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line[2:5].lower()] = int(line.split()[1]) * 1024
    return values


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps freed small blocks), so that a
    process's RSS is what it holds, whatever it freed while building."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_usage() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def reset_peak_memory() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- timing ----------------------------------------------------------------------------------------


def matmul_tflops(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best of ``repeats`` n^3 matmuls, in TFLOP/s: what this machine's GEMM reaches right now."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    a @ b  # warm-up (thread pool, oneDNN kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (as the parity tests)."""
    reference = reference.float()
    return ((value.float() - reference).abs().max() / reference.abs().max()).item()


# -- the same random weights in both stacks -------------------------------------------------------


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from a seeded generator, as tests/helpers.py: weights with std
    1/sqrt(fan_in) (activations stay O(1) through the deep network), norm scales near 1, small
    biases. The noise is drawn in fp32 and rounded into the parameter's dtype, one tensor at a time."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return module.eval()


def _random(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A meta-device module made real in ``dtype`` (memory not touched until filled) and filled."""
    return randomize(module.to(dtype).to_empty(device="cpu"), seed)


def build_ours(dtype: torch.dtype = torch.float32, whole: bool = True):
    """Our SD 1.5 (UNet; with ``whole`` also the VAE and text encoder, else those stay on the meta
    device) and one ControlNet, with the benchmark's random weights in ``dtype``."""
    from controlnet.config import SD15
    from controlnet.models.controlnet import ControlNet
    from controlnet.models.stable_diffusion import StableDiffusion, build_empty

    model = StableDiffusion(SD15, empty=True)
    for name in ("unet", "vae", "text_encoder") if whole else ("unet",):
        setattr(model, name, _random(getattr(model, name), dtype, SEEDS[name]))
    controlnet = _random(build_empty(lambda: ControlNet(SD15.controlnet())), dtype, SEEDS["controlnet"])
    return model.eval(), controlnet


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs a torch.compile'd graph (``module.compile()`` or a wrapper)."""
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


def drop_to_meta(module: torch.nn.Module) -> torch.nn.Module:
    """Free a module's memory (its tensors move to the meta device)."""
    return module.to("meta")


def _assign(empty: torch.nn.Module, weights: dict) -> torch.nn.Module:
    empty.load_state_dict(weights, strict=True, assign=True)
    return empty.eval()


def diffusers_unet_and_controlnet(unet, controlnet):
    """diffusers' UNet2DConditionModel and ControlNetModel sharing our modules' tensors."""
    import diffusers

    from controlnet.formats.diffusers_unet import controlnet_ldm_to_diffusers, unet_ldm_to_diffusers
    from controlnet.formats.diffusers_unet_config import controlnet_config_to_diffusers, unet_config_to_diffusers

    with torch.device("meta"):
        their_unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(unet.config))
        their_controlnet = diffusers.ControlNetModel.from_config(controlnet_config_to_diffusers(controlnet.config))
    their_unet = _assign(their_unet, unet_ldm_to_diffusers(unet.state_dict(), unet.config))
    weights = controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config)
    their_controlnet = _assign(their_controlnet, weights)
    return their_unet, their_controlnet


def diffusers_pipeline(model, controlnet):
    """diffusers' StableDiffusionControlNetPipeline on our models' weights, with DDIMScheduler set to
    the original's semantics (as tests/test_pipeline_parity.py)."""
    import diffusers
    import transformers

    from controlnet.formats.diffusers_text import text_config_to_diffusers, text_ldm_to_diffusers
    from controlnet.formats.diffusers_tokenizer import write_hf_tokenizer_files
    from controlnet.formats.diffusers_vae import vae_config_to_diffusers, vae_ldm_to_diffusers

    config = model.config
    unet, their_controlnet = diffusers_unet_and_controlnet(model.unet, controlnet)
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(config.vae))
    vae = _assign(vae, vae_ldm_to_diffusers(model.vae.state_dict(), config.vae))
    # Not on meta: CLIPTextModel's position_ids buffer must be real.
    dtype = next(model.text_encoder.parameters()).dtype
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config_to_diffusers(config.text)))
    weights = text_ldm_to_diffusers(model.text_encoder.state_dict(), config.text)
    own_keys = text_encoder.state_dict().keys()
    weights = {k if k in own_keys else k.removeprefix("text_model."): v for k, v in weights.items()}
    text_encoder.load_state_dict(weights, strict=True)
    text_encoder = text_encoder.to(dtype).eval()
    folder = write_hf_tokenizer_files(tempfile.mkdtemp(prefix="bench-tokenizer-"), config.text.pad_token_id)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
    )
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder),
        unet=unet,
        controlnet=their_controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- inputs ----------------------------------------------------------------------------------------


def control_image(size: int) -> np.ndarray:
    """A deterministic edge map [size, size, 3] uint8: rings and a grid of lines, as canny's."""
    ys, xs = np.mgrid[:size, :size]
    edges = np.zeros((size, size), bool)
    for radius in (0.15, 0.3, 0.42):
        edges |= np.abs(np.hypot(ys - size / 2, xs - size / 2) - radius * size) < 1.5
    edges |= (ys % (size // 8) < 2) & (xs < size // 3)
    edges |= (xs % (size // 6) < 2) & (ys > 2 * size // 3)
    return np.repeat(edges[:, :, None], 3, axis=2).astype(np.uint8) * 255


def step_inputs(size: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """latents [1, 4, size/8, size/8], text context [2, 77, 768] (cond, uncond), control image."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    return latents, context, control_image(size)


def initial_latents(size: int, seed: int = 11) -> torch.Tensor:
    return torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))


# -- one variant per process -----------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


def _serve(connection, factory: Callable[..., Any], args: tuple) -> None:
    # Every variant's process alike, ours and its peer's: otherwise a step's page faults depend on the
    # process's history and differ from one process to another running the same code.
    if os.environ.get("BENCH_MALLOC", "fixed") == "fixed":
        keep_freed_memory()
    # Dynamo's note on diffusers' lru_cache-wrapped version checks, printed once per graph: noise here.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. its note that torchvision is absent
    try:
        target = factory(*args)
        release_free_memory()
        connection.send(("ok", memory()))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        return
    while True:
        method, method_args = connection.recv()
        if method == "close":
            return
        try:
            result = memory() if method == "memory" else getattr(target, method)(*method_args)
            connection.send(("ok", result))
        except BaseException:
            connection.send(("error", traceback.format_exc()))


class Worker:
    """``factory(*args)`` built in a spawned process; ``call(name, ...)`` runs its method there.

    ``call("memory")`` gives the process's RSS and peak. The constructor waits for the build and
    keeps the memory it reported in ``built_memory``.
    """

    def __init__(self, name: str, factory: Callable[..., Any], *args: Any) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        # Not a daemon: inductor's compile workers are child processes.
        self.process = context.Process(target=_serve, args=(child, factory, args), name=f"bench-{name}")
        self.process.start()
        child.close()
        self.built_memory = self._receive("build")

    def _receive(self, what: str) -> Any:
        try:
            status, value = self.connection.recv()
        except (EOFError, ConnectionError):
            self.process.join(5)
            raise WorkerError(
                f"{self.name}: the worker process died during {what} (exit code {self.process.exitcode}; "
                "out of memory?)"
            ) from None
        if status == "error":
            raise WorkerError(f"{self.name}: {what} failed:\n{value}")
        return value

    def call(self, method: str, *args: Any) -> Any:
        self.send(method, *args)
        return self.receive(method)

    def send(self, method: str, *args: Any) -> None:
        """Start ``method`` in the worker and return at once (``receive`` gets its result): several
        workers can then work at the same time."""
        self.connection.send((method, args))

    def receive(self, method: str) -> Any:
        return self._receive(method)

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.connection.send(("close", ()))
            self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.connection.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain text table: the first ``left`` columns aligned left, the others right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])

"""Where the models run and in which precision: the one place that decides device, dtype and
memory layout.

The defaults follow what each machine does fastest with the same images:

- CUDA: float16 (the dtype of the released checkpoints and of the original apps), channels_last.
- Apple MPS: float16.
- A CPU whose oneDNN runs bf16 natively (AVX-512 BF16 or AMX): bfloat16 weights and activations
  with channels_last convolutions: about twice the speed of float32 (docs/benchmarks.md), with
  outputs within the tolerance stated there. The sampler's own arithmetic (the latents between
  steps, guidance) stays in float32 whatever the model dtype (see ``GuidedDenoiser``).
- Any other CPU: float32 (bf16 there is emulated and slower).
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """cuda when torch sees a GPU, else mps on Apple silicon, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name: str, kinds: tuple[str, ...] = ("cpu", "cuda", "mps")) -> torch.device:
    """The device ``name`` if it is one of ``kinds`` and this machine has it; else ValueError in one
    line. torch also names devices that hold no data (meta) or that this package does not run on
    (xla, ipu, ...), which would fail later with a traceback; its own errors list every device type
    it knows, or are assertions."""
    allowed = ", ".join("cuda, cuda:N" if kind == "cuda" else kind for kind in kinds)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use {allowed}") from None
    if device.type not in kinds:
        raise ValueError(f"--device {name}: this runs on {allowed} only")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} found)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (oneDNN's own test: AVX-512 BF16 or
    AMX). Where it does not, bf16 is converted to float32 around every product: slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The fastest dtype of ``device`` that keeps the images (see the module docstring)."""
    kind = torch.device(device).type
    if kind in ("cuda", "mps"):
        return torch.float16
    if kind == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None`` or "auto": the device's default; else one of DTYPES' names (or a torch dtype)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name DTYPES gives ``dtype`` ("float32", "bfloat16", "float16")."""
    return next(name for name, known in DTYPES.items() if known == dtype)


def use_channels_last(device: str | torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's and cuDNN's fastest convolutions read and write NHWC; only float32 on a CPU keeps
    the default layout (oneDNN's float32 convolutions gain nothing from it here)."""
    return not (torch.device(device).type == "cpu" and dtype == torch.float32)


def prepare(module: nn.Module, device: str | torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """``module`` on ``device`` in ``dtype``, in inference mode, its 4-D weights in the layout asked for."""
    module = module.to(device, dtype).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


class NonFiniteError(ValueError):
    """A computation produced NaN or infinite values; the message says which one, so that a
    result is never a silent black image (or a NaN score, or a NaN checkpoint)."""


def check_finite(values: torch.Tensor | np.ndarray, what: str) -> None:
    """Raise NonFiniteError naming ``what`` when ``values`` hold a NaN or an infinity."""
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not bool(finite):
        raise NonFiniteError(
            f"{what} hold NaN or infinite values: the weights or the settings overflow; "
            "float32 (--dtype float32) avoids the overflows of float16"
        )


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep what is freed for reuse; for a
    process that runs one job (a training run, a batch of images), called once at its start.

    By default glibc maps each block above a threshold (which moves with the process's history, up
    to 32 MiB) afresh from the kernel and unmaps it when freed, and trims its heap. A model's steps
    allocate and free the same large tensors (activations, weight gradients, oneDNN's reordered
    weights) at every step, which then come back as fresh pages: 300,000-600,000 page faults per
    SD 1.5-size ControlNet training step at 256 px, batch 2. Measured on 2 cores: 4.7 -> 3.9 s a
    bf16 step, and 23.8 -> 3.9 s while the kernel had to reclaim its page cache to hand out those
    pages; the peak memory went from 8.59 to 8.73 GiB. The process keeps its peak memory until it
    ends (its next step would reach it again anyway). The benchmarks fix the allocator this way for
    every side they time. Returns False where the C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False

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

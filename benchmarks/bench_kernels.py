"""controlnet.models.kernels against PyTorch's own kernels, layer by layer, on the shapes of SD 1.5.

For each layer shape of a 256 px training step at batch 2 (the attention and feed-forward linear
layers of each UNet level, the 3x3 convolutions of the 4x4 level and the stride-2 one that reaches
it), and each dtype: the median time of the forward alone (no autograd), of the forward and the
input gradient (a frozen layer in the backward pass: the locked UNet's decoder) and of the forward
and the full backward (input, weight and bias gradients: the ControlNet's layers), with
``controlnet.models.kernels`` ("ours") and inside ``kernels.disabled()`` (PyTorch: MKL's sgemm for float32
linear layers, oneDNN's convolution), and the largest difference between the two outputs relative
to the largest output. The kernels do not apply to bfloat16 linear layers (PyTorch runs them
through oneDNN already): those rows are absent.

    python benchmarks/bench_kernels.py [--dtypes float32,bfloat16] [--repeats 7]

Figures (AMD EPYC Zen 4, 2 cores, avx512_bf16, torch 2.13; in docs/training.md): float32 linear
layers 0.9-2.0x forward, 1.2-1.7x forward + input gradient, 1.1-1.4x forward + full backward; the
4x4 convolutions 1.0-1.6x forward and 1.3-2.1x forward + full backward in float32, 1.4-1.9x in
bfloat16. A whole 256 px training step (the same process with and without them, alternately):
float32 1.09-1.11x, bfloat16 1.03x.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from controlnet.models import kernels
from controlnet.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

BATCH = 2
TOKENS = 77  # the text context's length: the cross-attention keys and values
# (level, spatial size, channels) of SD 1.5 at 256 px: latents 32x32
LEVELS = ((1, 32, 320), (2, 16, 640), (3, 8, 1280), (4, 4, 1280))


def linear_shapes() -> list[tuple[str, int, int, int]]:
    """(name, rows, in, out) of the transformer blocks' linear layers at each level."""
    shapes = []
    for level, size, channels in LEVELS[:3]:  # the 4x4 level has no attention in SD 1.5
        rows = BATCH * size * size
        shapes += [
            (f"L{level} q/k/v/out {channels}->{channels}", rows, channels, channels),
            (f"L{level} cross k/v 768->{channels}", BATCH * TOKENS, 768, channels),
            (f"L{level} GEGLU {channels}->{8 * channels}", rows, channels, 8 * channels),
            (f"L{level} FF out {4 * channels}->{channels}", rows, 4 * channels, channels),
        ]
    return shapes


def conv_shapes() -> list[tuple[str, int, int, int, int]]:
    """(name, in channels, out channels, input size, stride) of the 3x3 convolutions that
    ``kernels.Conv2d`` takes over (output 4x4)."""
    return [
        ("down 8x8 -> 4x4, stride 2", 1280, 1280, 8, 2),
        ("4x4 1280->1280", 1280, 1280, 4, 1),
        ("4x4 2560->1280 (decoder)", 2560, 1280, 4, 1),
    ]


def median_ms(function: Callable[[], object], repeats: int) -> float:
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * common.median(times)


def measure(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Forward, input-gradient and full-backward times of ``module`` on ``x``, ours and PyTorch's."""
    out = module(x)
    grad = torch.randn_like(out)
    parameters = list(module.parameters())

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    def input_gradient() -> tuple:
        module.requires_grad_(False)
        try:
            return torch.autograd.grad(module(x), (x,), grad)
        finally:
            module.requires_grad_(True)

    def full_backward() -> tuple:
        return torch.autograd.grad(module(x), (x, *parameters), grad)

    figures: dict[str, float] = {}
    for side in ("ours", "torch"):
        context = kernels.disabled() if side == "torch" else contextlib.nullcontext()
        with context:
            figures[f"{side} forward"] = median_ms(forward, repeats)
            figures[f"{side} input grad"] = median_ms(input_gradient, repeats)
            figures[f"{side} backward"] = median_ms(full_backward, repeats)
            with torch.no_grad():
                figures[f"{side} out"] = module(x)
    theirs = figures.pop("torch out")
    figures["error"] = float((figures.pop("ours out") - theirs).abs().max() / theirs.abs().max())
    return figures


def row(name: str, dtype: str, figures: dict[str, float]) -> list[str]:
    cells = [name, dtype]
    for kind in ("forward", "input grad", "backward"):
        ours, theirs = figures[f"ours {kind}"], figures[f"torch {kind}"]
        cells.append(f"{theirs:.2f} / {ours:.2f} = {theirs / ours:.2f}x")
    cells.append(f"{figures['error']:.1e}")
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per figure (the median is shown)")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in ("float32", "bfloat16") for d in dtypes):
        parser.error("--dtypes: float32 and/or bfloat16")
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"bench_kernels: {common.cpu_line()}; {common.machine_line()}")
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        if dtype == torch.float32:
            for name, rows_, fan_in, fan_out in linear_shapes():
                module = kernels.Linear(fan_in, fan_out).to(dtype)
                x = torch.randn(rows_, fan_in, dtype=dtype, requires_grad=True)
                rows.append(row(f"linear {name}", dtype_name, measure(module, x, args.repeats)))
                print(f"  {rows[-1][0]} {dtype_name}: done", flush=True)
        for name, fan_in, fan_out, size, stride in conv_shapes():
            module = kernels.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1).to(dtype)
            x = torch.randn(BATCH, fan_in, size, size, dtype=dtype, requires_grad=True)
            rows.append(row(f"conv3x3 {name}", dtype_name, measure(module, x, args.repeats)))
            print(f"  {rows[-1][0]} {dtype_name}: done", flush=True)
    print()
    header = ["layer", "dtype", "forward ms: torch / ours", "+ input grad ms", "+ full backward ms", "max diff"]
    print(common.format_table(header, rows))
    print(
        "\nforward: no autograd; + input grad: forward and backward, the layer's weights frozen (the locked"
        " decoder's layers); + full backward: forward and backward with input, weight and bias gradients"
        " (the ControlNet's). max diff: the largest"
        " difference between the two forwards' outputs over the largest output."
    )
    print(f"\n{common.machine_line()}")


if __name__ == "__main__":
    main()

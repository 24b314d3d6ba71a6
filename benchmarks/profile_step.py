"""Where a guided step's time goes: ops grouped by kind, with their share and TFLOP/s.

Our guided step (ControlNet + UNet on batch 2, as bench_step.py's), SD 1.5-size random weights,
run under torch.profiler (self CPU time of every aten op) and torch.utils.flop_counter (FLOPs of
every aten op). Ops are grouped (convolution, linear, attention, normalisation, the rest) and each
group's share of the step and achieved TFLOP/s are printed next to a bf16 matmul measured in the
same process. The slowest single ops are listed too. Usage:

    python benchmarks/profile_step.py [--size 512] [--dtype bfloat16] [--layout channels_last|contiguous]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from controlnet.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

GROUPS = (  # (group, substrings of aten op names), first match wins
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("linear", ("addmm", "aten::mm", "aten.mm", "bmm", "linear")),
    ("normalisation", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("copies / layout", ("copy_", "clone", "contiguous", "_to_copy", "cat", "empty", "as_strided")),
)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(key in name for key in keys):
            return group
    return "elementwise / other"


def build_step(size: int, dtype: torch.dtype, channels_last: bool):
    from controlnet.pipeline import ControlUnit, Pipeline
    from controlnet.sampling.guidance import GuidedDenoiser

    model, controlnet = common.build_ours(dtype)
    pipe = Pipeline(model, [controlnet], dtype=dtype, channels_last=channels_last)
    latents, context, image = common.step_inputs(size)
    active = pipe.activate(ControlUnit(image), image)
    context = context.to(dtype)
    denoiser = GuidedDenoiser(
        pipe.model.unet,
        cond=context[0:1],
        uncond=context[1:2],
        guidance_scale=common.GUIDANCE_SCALE,
        controls=[active],
        timesteps=None,  # one evaluation: the unit acts
    )
    x = latents.to(dtype)
    t = torch.full((1,), float(common.TIMESTEP))
    return lambda: denoiser(x, t)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--layout", default="channels_last", choices=("channels_last", "contiguous"))
    parser.add_argument("--top", type=int, default=12, help="slowest single ops to list")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    keep_freed_memory()
    peak = common.matmul_tflops(torch.bfloat16)
    step = build_step(args.size, dtype, args.layout == "channels_last")
    step()  # warm-up: oneDNN primitives, thread pool
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = common.median(times)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops: dict[str, float] = defaultdict(float)
    for op, count in counter.get_flop_counts()["Global"].items():
        flops[group_of(str(op))] += count
    # The fused CPU attention kernel has no FLOP formula: count attention as the math path's
    # matrix products (what the kernel computes), the difference of the two totals.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    math_counter = FlopCounterMode(display=False)
    with math_counter, sdpa_kernel(SDPBackend.MATH):
        step()
    flops["attention"] += math_counter.get_total_flops() - counter.get_total_flops()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    seconds: dict[str, float] = defaultdict(float)
    by_op = []
    for event in profile.key_averages():
        if not event.key.startswith("aten::"):
            continue
        self_s = event.self_cpu_time_total / 1e6
        seconds[group_of(event.key)] += self_s
        by_op.append((self_s, event.key, event.count))
    total = sum(seconds.values())

    print(f"profile_step: {common.cpu_line()}; {common.machine_line()}")
    print(
        f"guided step (ControlNet + UNet, batch 2), {args.size}x{args.size}, {args.dtype}, {args.layout}: "
        f"median {median:.2f} s of 3 ({', '.join(f'{t:.2f}' for t in times)}); "
        f"{sum(flops.values()) / 1e12:.3f} TFLOP; bf16 matmul here: {peak:.2f} TFLOP/s"
    )
    print(f"profiled step: {total:.2f} s of aten self time (the profiler adds a little)\n")
    rows = []
    for group in sorted(seconds, key=seconds.get, reverse=True):
        rate = flops[group] / seconds[group] / 1e12 if flops[group] and seconds[group] else 0.0
        rows.append(
            [
                group,
                f"{seconds[group]:.3f}",
                f"{100 * seconds[group] / total:.0f}%",
                f"{flops[group] / 1e12:.3f}" if flops[group] else "-",
                f"{rate:.2f}" if rate else "-",
                f"{100 * rate / peak:.0f}%" if rate else "-",
            ]
        )
    header = ["ops", "s", "share", "TFLOP", "TFLOP/s", "of bf16 matmul"]
    print(common.format_table(header, rows))
    print(f"\nslowest ops (self time): top {args.top}")
    for self_s, name, count in sorted(by_op, reverse=True)[: args.top]:
        print(f"  {name:50s} {self_s:7.3f} s  {100 * self_s / total:4.1f}%  {count:5d} calls")


if __name__ == "__main__":
    main()

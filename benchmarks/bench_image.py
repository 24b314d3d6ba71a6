"""A whole image, ours against diffusers: SD 1.5 + one ControlNet, 20 DDIM steps at 512x512.

Text encoding (prompt and negative prompt), the control hint, 20 guided steps (scale 9) and the VAE
decode, on the same random weights (bench_step.py's) and the same initial latents:

  (a) diffusers' StableDiffusionControlNetPipeline + DDIMScheduler (as the original's DDIM), fp32
  (b) the same in bf16, channels_last UNet / ControlNet / VAE, torch.compile of UNet and ControlNet
  (c) ours: ``Pipeline(model, [controlnet]).generate(...)`` at the defaults
  (d) ours: ``bench_step.ours_fastest(model, controlnet).generate(...)``

Each variant runs in its own process and first makes a warm-up image (2 steps, compiling, where
compiled; else 1 step; its time is reported). The compiled ones are built and warmed up side by
side where memory allows (compiling is mostly one thread), then each is timed while the others
wait; the others run one after another. The images are compared
with (c)'s (max abs difference in [0, 1]). Usage:

    python benchmarks/bench_image.py [--quick] [--sizes 512] [--steps 20] [--variants b,c,d] [--repeats N]
                                     [--no-compile] [--no-freezing] [--malloc fixed|default] [--sequential]

``--quick``: 256x256, 4 steps, no torch.compile. (a) is left out by default: fp32 diffusers takes
as long as (c) at fp32 without telling more than bench_step.py's (a) does; name it to run it.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bench_step import ours_fastest

# Compiled variants warm up with a two-step image (compiling), eager ones with one step.
WARMUP_STEPS = 2
MARGIN_GIB = 1.5  # memory left free when deciding which variants warm up side by side
LABELS = {
    "a": "diffusers fp32",
    "b": "diffusers bf16 + channels_last{compile}",
    "c": "ours default",
    "d": "ours fastest",
}


def _phases(start: float, marks: list[float], end: float) -> dict:
    """Phases of a generation from the step-end times: before the loop (text, hint), the steps,
    the decode. The first step's time is taken as the median step's."""
    steps = np.diff([start, *marks])
    median = float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0])
    return {
        "total_s": end - start,
        "step_s": median,
        "steps_s": float(steps.sum()),
        "before_s": max(0.0, float(steps[0]) - median),
        "decode_s": end - marks[-1],
    }


class OursImage:
    def __init__(self, variant: str, compile: bool, freezing: bool) -> None:
        from controlnet.pipeline import Pipeline
        from controlnet.runtime import default_dtype

        if variant == "c":  # the weights in the dtype our default picks on this machine
            model, controlnet = common.build_ours(default_dtype("cpu"))
            self.pipe = Pipeline(model, [controlnet])
        else:
            model, controlnet = common.build_ours(torch.bfloat16)
            self.pipe = ours_fastest(model, controlnet, compile=compile, freezing=freezing)

    def describe(self) -> dict:
        compiled = any(common.is_compiled(m) for m in (self.pipe.model.unet, *self.pipe.controlnets))
        dtype = str(self.pipe.dtype).removeprefix("torch.")
        return {"text": f"Pipeline dtype {dtype}, UNet {'compiled' if compiled else 'eager'}", "compiled": compiled}

    @torch.no_grad()
    def generate(self, size: int, steps: int, keep: bool = True) -> dict:
        from controlnet.pipeline import ControlUnit

        image = common.control_image(size)
        marks: list[float] = []
        sys_before, _ = common.cpu_usage()
        start = time.perf_counter()
        result = self.pipe.generate(
            common.PROMPT,
            [ControlUnit(image)],
            negative_prompt=common.NEGATIVE_PROMPT,
            steps=steps,
            guidance_scale=common.GUIDANCE_SCALE,
            eta=0.0,
            sampler="ddim",
            resolution=size,
            latents=common.initial_latents(size),
            output="float",
            progress=lambda step, total: marks.append(time.perf_counter()),
        )
        info = _phases(start, marks, time.perf_counter())
        info["sys_s"] = common.cpu_usage()[0] - sys_before
        if keep:
            info["image"] = np.asarray(result.images[0], np.float32)
        common.reset_peak_memory()
        return info


class DiffusersImage:
    def __init__(self, variant: str, compile: bool, freezing: bool) -> None:
        best = variant == "b"
        self.dtype = torch.bfloat16 if best else torch.float32
        self.compiled = best and compile
        model, controlnet = common.build_ours(self.dtype)
        self.pipe = common.diffusers_pipeline(model, controlnet)
        del model, controlnet
        if best:
            for module in (self.pipe.unet, self.pipe.controlnet, self.pipe.vae):
                module.to(memory_format=torch.channels_last)
            if compile:  # as ours_fastest
                from torch._inductor import config as inductor_config

                inductor_config.freezing = freezing
                self.pipe.unet.compile(dynamic=False)
                self.pipe.controlnet.compile(dynamic=False)

    def describe(self) -> dict:
        scheduler = type(self.pipe.scheduler).__name__
        dtype = str(self.dtype).removeprefix("torch.")
        return {"text": f"{dtype}, {scheduler}, {'compiled' if self.compiled else 'eager'}", "compiled": self.compiled}

    @torch.no_grad()
    def generate(self, size: int, steps: int, keep: bool = True) -> dict:
        from PIL import Image

        image = Image.fromarray(common.control_image(size))
        marks: list[float] = []

        def on_step_end(pipe, step, timestep, tensors):
            marks.append(time.perf_counter())
            return {}

        sys_before, _ = common.cpu_usage()
        start = time.perf_counter()
        output = self.pipe(
            prompt=common.PROMPT,
            negative_prompt=common.NEGATIVE_PROMPT,
            image=image,
            num_inference_steps=steps,
            guidance_scale=common.GUIDANCE_SCALE,
            eta=0.0,
            latents=common.initial_latents(size).to(self.dtype),
            output_type="np",
            height=size,
            width=size,
            callback_on_step_end=on_step_end,
        )
        info = _phases(start, marks, time.perf_counter())
        info["sys_s"] = common.cpu_usage()[0] - sys_before
        if keep:
            info["image"] = np.asarray(output.images[0], np.float32)
        common.reset_peak_memory()
        return info


def make_worker(variant: str, compile: bool, freezing: bool) -> common.Worker:
    factory = OursImage if variant in ("c", "d") else DiffusersImage
    return common.Worker(variant, factory, variant, compile, freezing)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256, 4 steps, no torch.compile")
    parser.add_argument("--sizes", help="image sizes (default 512; quick: 256)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 20; quick: 4)")
    parser.add_argument("--variants", default="b,c,d", help="which of a,b,c,d (default: b,c,d)")
    parser.add_argument("--repeats", type=int, default=1, help="timed images per variant (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="(b) and (d) without torch.compile")
    parser.add_argument("--no-freezing", action="store_true", help="compile without inductor's freezing")
    parser.add_argument(
        "--malloc", choices=("fixed", "default"), default="fixed", help="glibc malloc kept (keep_freed_memory)"
    )
    parser.add_argument("--sequential", action="store_true", help="one variant's process at a time")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("256" if args.quick else "512")).split(",")]
    args.steps = args.steps or (4 if args.quick else 20)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in LABELS]
    if unknown or any(s % 64 for s in args.sizes):
        parser.error(f"variants are a,b,c,d (got {unknown}); sizes must be multiples of 64")
    args.compile = not (args.no_compile or args.quick)
    args.freezing = args.compile and not args.no_freezing
    return args


def label(variant: str, args: argparse.Namespace) -> str:
    compiled = (" + compile (freezing)" if args.freezing else " + compile") if args.compile else ""
    return f"({variant}) " + LABELS[variant].format(compile=compiled)


def need_gib(variant: str, compile: bool) -> float:
    """A variant's process at its peak at 512, roughly (measured: fp32 5.7 GiB; bf16 compiled with
    freezing 5.7 (diffusers) and 7.9 (ours, two graphs)), plus inductor's compile workers."""
    if variant in ("a", "c"):
        return 6.2
    return 8.5 if compile else 3.6


def plan_groups(args: argparse.Namespace) -> list[list[str]]:
    """Compiled variants warm up (compile) side by side where memory allows; the rest one by one."""
    compiled = [v for v in args.variants if v in ("b", "d") and args.compile]
    available = common.memory_available() / common.GiB - MARGIN_GIB
    together = not args.sequential and len(compiled) > 1 and sum(need_gib(v, True) for v in compiled) <= available
    groups, seen = [], set()
    for variant in args.variants:
        if variant in seen:
            continue
        group = compiled if together and variant in compiled else [variant]
        groups.append(group)
        seen.update(group)
    return groups


def run_group(args: argparse.Namespace, group: list[str], results: dict, errors: dict) -> None:
    """The group's processes are built and warmed up together (compiling is mostly one thread: two
    compile in about the time of one), then each times its images while the others wait."""

    def guarded(variant: str, action) -> None:
        if variant in errors:
            return
        try:
            action()
        except common.WorkerError as error:
            errors[variant] = str(error)
            print(f"  ({variant}) failed: {str(error).splitlines()[0]}", flush=True)

    workers: dict[str, common.Worker] = {}
    descriptions: dict[str, dict] = {}

    def build(variant: str) -> None:
        worker, build_s = common.timed(lambda: make_worker(variant, args.compile, args.freezing))
        workers[variant] = worker
        descriptions[variant] = worker.call("describe")
        results[variant] = {}
        print(f"  ({variant}) built in {build_s:.0f} s: {descriptions[variant]['text']}", flush=True)

    def warm_steps(variant: str) -> int:
        return WARMUP_STEPS if descriptions[variant]["compiled"] else 1

    def send_warm_up(variant: str, size: int) -> None:
        workers[variant].send("generate", size, warm_steps(variant), False)

    def receive_warm_up(variant: str, size: int) -> None:
        seconds = workers[variant].receive("generate")["total_s"]
        results[variant][size] = {"describe": descriptions[variant]["text"], "warmup_s": seconds}
        compiling = " (compiling)" if descriptions[variant]["compiled"] else ""
        what = f"{warm_steps(variant)}-step warm-up image{compiling}"
        print(f"  ({variant}) {size}x{size}: {what} {seconds:.0f} s", flush=True)

    def timed_images(variant: str, size: int) -> None:
        worker = workers[variant]
        runs = [worker.call("generate", size, args.steps) for _ in range(args.repeats)]
        record = results[variant][size]
        record.update(runs[-1], totals=[r["total_s"] for r in runs], memory=worker.call("memory"))
        print(f"  ({variant}) {size}x{size}: {args.steps} steps in {record['total_s']:.1f} s", flush=True)

    try:
        for variant in group:
            guarded(variant, lambda v=variant: build(v))
        for size in args.sizes:
            for action in (send_warm_up, receive_warm_up, timed_images):
                for variant in list(workers):
                    guarded(variant, lambda a=action, v=variant, s=size: a(v, s))
    finally:
        for worker in workers.values():
            worker.close()


def report(args: argparse.Namespace, results: dict, errors: dict) -> None:
    for size in args.sizes:
        print()
        guidance = f"guidance {common.GUIDANCE_SCALE:g}"
        print(f"== whole image, {size}x{size}, {args.steps} DDIM steps, one ControlNet, {guidance} ==")
        header = ["variant", "total s", "x (b)", "text+hint s", "per step s", "decode s", "sys s", "warm-up s"]
        header.append("peak GiB")
        header.append("max |diff| vs (c)")
        best = results.get("b", {}).get(size)
        reference = results.get("c", {}).get(size, {}).get("image")
        rows = []
        for variant in args.variants:
            record = results.get(variant, {}).get(size)
            if record is None or "totals" not in record:
                rows.append([label(variant, args), "failed" if variant in errors else "-", *[""] * (len(header) - 2)])
                continue
            total = float(np.median(record["totals"]))
            ratio = f"{total / float(np.median(best['totals'])):.2f}" if best and "totals" in best else "-"
            diff = "-" if reference is None else f"{np.abs(record['image'] - reference).max():.1e}"
            rows.append(
                [
                    label(variant, args),
                    f"{total:.1f}",
                    ratio,
                    f"{record['before_s']:.2f}",
                    f"{record['step_s']:.2f}",
                    f"{record['decode_s']:.2f}",
                    f"{record['sys_s']:.1f}",
                    f"{record['warmup_s']:.0f}",
                    f"{record['memory']['hwm'] / common.GiB:.2f}",
                    diff,
                ]
            )
        print(common.format_table(header, rows))
        for variant in args.variants:
            record = results.get(variant, {}).get(size)
            if record is not None:
                print(f"  ({variant}) {record['describe']}")
    print()
    print(
        textwrap.fill(
            " ".join(
                [
                    "total: the whole call (text encoding, hint, sampling, VAE decode, conversion to an array).",
                    "x (b): over diffusers' best.",
                    "text+hint: before the first step (the first step's time taken as the median step's).",
                    "sys s: system CPU time of the whole image (mostly page faults: memory from the kernel).",
                    f"warm-up: a {WARMUP_STEPS}-step image first (compiled; eager: 1 step).",
                    "peak GiB: the process's VmHWM over the timed image.",
                    "diff: max abs difference of the [0, 1] images vs (c)'s.",
                ]
            ),
            width=110,
        )
    )
    for variant, message in errors.items():
        print(f"\n({variant}) failed:\n{message}")


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    cache = common.set_compile_cache()
    os.environ["BENCH_MALLOC"] = args.malloc  # read by the worker processes
    started = time.perf_counter()
    print(f"bench_image: {common.cpu_line()}; {common.machine_line()}")
    print(
        f"variants {','.join(args.variants)}, sizes {args.sizes}, {args.steps} steps, compile {args.compile}, "
        f"malloc {args.malloc}"
    )
    print(f"inductor cache {cache}")
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for group in plan_groups(args):
        if len(group) > 1:
            print(f"  {', '.join(group)}: built and warmed up side by side, then timed one after the other")
        run_group(args, group, results, errors)
    report(args, results, errors)
    print(f"\n{common.machine_line()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""A whole image, ours against diffusers: SD 1.5 + one ControlNet, 20 DDIM steps at 512x512.

Text encoding (prompt and negative prompt), the control hint, 20 guided steps (scale 9) and the VAE
decode, on the same random weights (bench_step.py's) and the same initial latents:

  (a) diffusers' StableDiffusionControlNetPipeline + DDIMScheduler (as the original's DDIM), fp32
  (b) the same in bf16, channels_last UNet / ControlNet / VAE, torch.compile of UNet and ControlNet
  (c) ours: ``Pipeline(model, [controlnet]).generate(...)`` at the defaults
  (d) ours: ``bench_step.ours_fastest(model, controlnet).generate(...)``

Each variant runs in its own process, one after another (their peaks do not add up), and first
makes a warm-up image (2 steps, compiling, where compiled; else 1 step; its time is reported). The images are compared
with (c)'s (max abs difference in [0, 1]). Usage:

    python benchmarks/bench_image.py [--quick] [--sizes 512] [--steps 20] [--variants b,c,d] [--no-compile]

``--quick``: 256x256, 4 steps, no torch.compile. (a) is left out by default: fp32 diffusers takes
as long as (c) at fp32 without telling more than bench_step.py's (a) does; name it to run it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bench_step import ours_fastest

# Compiled variants warm up with two steps: a compiled module may compile twice (ours: TimestepEmbedding
# caches its frequencies in an attribute on the first call, a dynamo guard that fails on the second).
WARMUP_STEPS = 2
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

        if variant == "c":
            model, controlnet = common.build_ours(torch.float32)
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
    parser.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)  # always one at a time
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


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """{size: record} for one variant, in its own process."""
    worker, build_s = common.timed(lambda: make_worker(variant, args.compile, args.freezing))
    records = {}
    with worker:
        description = worker.call("describe")
        print(f"  ({variant}) built in {build_s:.0f} s: {description['text']}", flush=True)
        for size in args.sizes:
            record = {"describe": description["text"]}
            warm_steps = WARMUP_STEPS if description["compiled"] else 1
            warm = worker.call("generate", size, warm_steps, False)
            record["warmup_s"] = warm["total_s"]
            what = f"{warm_steps}-step warm-up image" + (" (compiling)" if description["compiled"] else "")
            print(f"  ({variant}) {size}x{size}: {what} {warm['total_s']:.0f} s", flush=True)
            runs = [worker.call("generate", size, args.steps) for _ in range(args.repeats)]
            record.update(runs[-1])
            record["totals"] = [r["total_s"] for r in runs]
            record["memory"] = worker.call("memory")
            records[size] = record
            print(f"  ({variant}) {size}x{size}: {args.steps} steps in {record['total_s']:.1f} s", flush=True)
    return records


def report(args: argparse.Namespace, results: dict, errors: dict) -> None:
    for size in args.sizes:
        print()
        guidance = f"guidance {common.GUIDANCE_SCALE:g}"
        print(f"== whole image, {size}x{size}, {args.steps} DDIM steps, one ControlNet, {guidance} ==")
        header = ["variant", "total s", "x (b)", "text+hint s", "per step s", "decode s", "warm-up s", "peak GiB"]
        header.append("max |diff| vs (c)")
        best = results.get("b", {}).get(size)
        reference = results.get("c", {}).get(size, {}).get("image")
        rows = []
        for variant in args.variants:
            record = results.get(variant, {}).get(size)
            if record is None:
                rows.append([label(variant, args), "failed" if variant in errors else "-", *[""] * 7])
                continue
            total = float(np.median(record["totals"]))
            ratio = f"{total / float(np.median(best['totals'])):.2f}" if best else "-"
            diff = "-" if reference is None else f"{np.abs(record['image'] - reference).max():.1e}"
            rows.append(
                [
                    label(variant, args),
                    f"{total:.1f}",
                    ratio,
                    f"{record['before_s']:.2f}",
                    f"{record['step_s']:.2f}",
                    f"{record['decode_s']:.2f}",
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
        "total: the whole call (text encoding, hint, sampling, VAE decode, conversion to an array); x (b): over\n"
        "diffusers' best. text+hint: before the first step (the first step's time taken as the median step's).\n"
        f"warm-up: a {WARMUP_STEPS}-step image first (compiled; eager: 1 step). peak GiB: the process VmHWM over the\n"
        "timed image (reset after building/warm-up). diff: max abs difference of the [0, 1] images vs (c)'s."
    )
    for variant, message in errors.items():
        print(f"\n({variant}) failed:\n{message}")


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    cache = common.set_compile_cache()
    started = time.perf_counter()
    print(f"bench_image: {common.cpu_line()}; {common.machine_line()}")
    print(f"variants {','.join(args.variants)}, sizes {args.sizes}, {args.steps} steps, compile {args.compile}")
    print(f"inductor cache {cache}")
    results, errors = {}, {}
    for variant in args.variants:
        try:
            results[variant] = run_variant(args, variant)
        except common.WorkerError as error:
            errors[variant] = str(error)
            print(f"  ({variant}) failed: {str(error).splitlines()[0]}", flush=True)
    report(args, results, errors)
    print(f"\n{common.machine_line()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

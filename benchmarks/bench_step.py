"""One guided sampling step, ours against diffusers, on the same random SD 1.5 + ControlNet weights.

A guided step: the ControlNet on batch 2 (uncond + cond latents, a 77-token context each, timestep
501) and the UNet on batch 2 with its 13 residuals, then classifier-free guidance (scale 9). The
control hint is an edge map at the image size. Ours: the hint features are computed once per
generation (``encode_hint``), outside the step, as ``Pipeline.generate`` does; diffusers'
ControlNetModel embeds the hint inside every call (on batch 2): that is in its time (the notes under
the table give its cost, small). The sampler's own update is in neither.

  (a) diffusers fp32, eager
  (b) diffusers bf16 + channels_last + torch.compile (static shapes, inductor freezing): its best
  (c) ours at the defaults: ``Pipeline(model, [controlnet])``
  (d) ours at the fastest settings: ``ours_fastest(model, controlnet)`` below (the same compile)

Each (variant, size) runs in a fresh process: its peak memory is its own and holds no other size's
graphs. Variants are grouped by the memory available: all four side by side where they fit (about
27 GiB at 512), else (b) with (d), then (a) with (c). A group's processes warm up (compile) side by
side, then are timed alternately, round by round. Outputs are compared with ours in fp32 (a
reference process, which also counts the FLOPs with torch.utils.flop_counter).

    python benchmarks/bench_step.py [--quick] [--sizes 512,256] [--variants a,b,c,d] [--repeats N]
                                    [--no-compile] [--no-freezing] [--sequential] [--flops measured|reference]
                                    [--malloc fixed|default]

``--malloc fixed`` (the default) pins glibc malloc's thresholds in every variant's process alike
(``controlnet.runtime.keep_freed_memory``): otherwise a step's system time (page faults) depends on the process's
history and differs from one variant's process to another's for the same code.

``--quick``: 256x256 only, no torch.compile, 2 timed rounds (a smoke run). Compiled artefacts are
cached in $TORCHINDUCTOR_CACHE_DIR (default ~/.cache/controlnet-bench/inductor), but with freezing
inductor caches little: every run compiles.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

LABELS = {
    "a": "diffusers fp32",
    "b": "diffusers bf16 + channels_last{compile}",
    "c": "ours default",
    "d": "ours fastest",
}
OURS = ("c", "d")
BEST_DIFFUSERS = "b"
PAIRS = (("b", "d"), ("a", "c"))  # the groups that alternate when all four do not fit in memory
# Calls before timing: a compiled module compiles on its first call; the next ones settle the heap.
WARMUP_CALLS = {False: 1, True: 3}
MARGIN_GIB = 1.5  # memory left free when deciding which variants run side by side


def need_gib(variant: str, size: int, compile: bool) -> float:
    """A variant's process at its peak, roughly, as measured with SD 1.5 + ControlNet: fp32 eager
    5.5 GiB at 512, 5.2 at 256; bf16 eager 3.2 and 3.1; compiled with freezing, each compiled graph
    holds its own copy of the weights (diffusers 5.3 GiB at 256, ours 7.5: two graphs), plus
    inductor's compile workers."""
    scale = (size / 512) ** 2
    if variant in ("a", "c"):  # fp32 eager ((c): whatever the default is, fp32 is the worst case)
        return 4.6 + 0.9 * scale + 0.4
    if compile:
        return 3 * 2.3 + 0.5 * scale + 1.0
    return 2.3 + 0.5 * scale + 0.4


def ours_fastest(model, controlnet, compile: bool = True, freezing: bool = True):
    """Our fastest CPU set-up: the defaults on a CPU with native bf16 (bf16 weights and activations,
    channels_last convolutions) and ``Pipeline.compile`` (static shapes, inductor's freezing: the
    weights become constants of the graph, prepacked for oneDNN). ``freezing=False`` compiles
    without it (a global setting: left as it is). Returns a ``Pipeline``; ``model`` and
    ``controlnet`` are converted in place."""
    from controlnet.pipeline import Pipeline

    pipe = Pipeline(model, [controlnet], dtype=torch.bfloat16, channels_last=True)
    if compile and freezing:
        pipe.compile()
    elif compile:
        for module in (pipe.model.unet, *pipe.controlnets):
            module.compile(dynamic=False)
    return pipe


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layout(weight: torch.Tensor) -> str:
    if weight.is_contiguous():
        return "contiguous"
    return "channels_last" if weight.is_contiguous(memory_format=torch.channels_last) else "strided"


class _Timed:
    def timed_step(self) -> dict:
        """One timed step with its system CPU time and minor page faults."""
        sys_before, faults_before = common.cpu_usage()
        seconds = self.step()
        sys_after, faults_after = common.cpu_usage()
        return {"s": seconds, "sys": sys_after - sys_before, "faults": faults_after - faults_before}

    def warm_up(self) -> list[float]:
        """The calls before timing; the peak memory is reset before the last, so that it is a step's
        (after compiling) and the heap is grown back before the timed steps."""
        calls = WARMUP_CALLS[self.compiled]
        times = [self.step() for _ in range(calls - 1)]
        common.reset_peak_memory()
        return [*times, self.step()]


class OursStep(_Timed):
    """Our guided step through the pipeline's own pieces: ``Pipeline.activate`` (the hint features,
    once) and ``GuidedDenoiser`` (ControlNet + UNet on [uncond; cond], guidance)."""

    def __init__(self, mode: str, compile: bool = True, freezing: bool = True) -> None:
        from controlnet.pipeline import Pipeline
        from controlnet.runtime import default_dtype

        self.mode = mode
        if mode == "reference":
            model, controlnet = common.build_ours(torch.float32)
            self.pipe = Pipeline(model, [controlnet], dtype=torch.float32)
        elif mode == "default":  # the weights in the dtype our default picks on this machine
            model, controlnet = common.build_ours(default_dtype("cpu"))
            self.pipe = Pipeline(model, [controlnet])
        elif mode == "fastest":
            model, controlnet = common.build_ours(torch.bfloat16)
            self.pipe = ours_fastest(model, controlnet, compile=compile, freezing=freezing)
        else:
            raise ValueError(mode)
        del model, controlnet
        # The step needs neither the VAE nor the text encoder: free them, as diffusers' side has none.
        self.pipe.model.vae = common.drop_to_meta(self.pipe.model.vae)
        self.pipe.model.text_encoder = common.drop_to_meta(self.pipe.model.text_encoder)
        self.compiled = any(common.is_compiled(m) for m in (self.pipe.model.unet, *self.pipe.controlnets))

    def describe(self) -> str:
        unet = self.pipe.model.unet
        weight = next(p for p in unet.parameters() if p.ndim == 4)
        compiled = "compiled" if common.is_compiled(unet) else "eager"
        return f"{_dtype_name(self.pipe.dtype)}, {_layout(weight)} conv weights, {compiled}, device {self.pipe.device}"

    @torch.no_grad()
    def prepare(self, size: int) -> dict:
        from controlnet.pipeline import ControlUnit
        from controlnet.sampling.guidance import GuidedDenoiser

        latents, context, image = common.step_inputs(size)
        pipe = self.pipe
        self.hint = image
        active = pipe.activate(ControlUnit(image), image)
        context = context.to(pipe.device, pipe.dtype)
        self.denoiser = GuidedDenoiser(
            pipe.model.unet,
            cond=context[0:1],
            uncond=context[1:2],
            guidance_scale=common.GUIDANCE_SCALE,
            controls=[active],
            timesteps=None,  # one evaluation: the unit acts
        )
        self.x = latents.to(pipe.device, pipe.dtype)
        self.t = torch.full((1,), float(common.TIMESTEP), device=pipe.device)
        info = {"describe": self.describe()}
        if self.mode == "reference":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            from torch.utils.flop_counter import FlopCounterMode

            # The math attention decomposes into counted matmuls (the fused CPU kernel is not counted).
            with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
                self.out, info["seconds"] = common.timed(lambda: self.denoiser(self.x, self.t))
            counts = counter.get_flop_counts()
            info["flops"] = counter.get_total_flops()
            info["by_module"] = {
                name: sum(ops.values()) for name, ops in counts.items() if name in ("UNet", "ControlNet")
            }
            return info
        warmups = self.warm_up()
        info["first_s"], info["warmup_s"] = warmups[0], warmups
        return info

    @torch.no_grad()
    def hint_seconds(self) -> float:
        """Our hint embedding (once per generation): ``Pipeline.activate``."""
        from controlnet.pipeline import ControlUnit

        return common.timed(lambda: self.pipe.activate(ControlUnit(self.hint), self.hint))[1]

    @torch.no_grad()
    def step(self) -> float:
        start = time.perf_counter()
        self.out = self.denoiser(self.x, self.t)
        return time.perf_counter() - start

    def output(self) -> torch.Tensor:
        return self.out.float().contiguous()


class DiffusersStep(_Timed):
    """diffusers' guided step as its StableDiffusionControlNetPipeline's loop makes it (the same
    calls and arguments, so compiled graphs are shared with bench_image.py through the cache)."""

    def __init__(self, best: bool, compile: bool = True, freezing: bool = True) -> None:
        self.dtype = torch.bfloat16 if best else torch.float32
        model, controlnet = common.build_ours(self.dtype, whole=False)
        self.unet, self.controlnet = common.diffusers_unet_and_controlnet(model.unet, controlnet)
        del model, controlnet
        self.compiled = best and compile
        if best:
            for module in (self.unet, self.controlnet):
                module.to(memory_format=torch.channels_last)
                if compile:  # as ours_fastest
                    from torch._inductor import config as inductor_config

                    inductor_config.freezing = freezing
                    module.compile(dynamic=False)

    def describe(self) -> str:
        compiled = "compiled" if self.compiled else "eager"
        processor = type(next(iter(self.unet.attn_processors.values()))).__name__
        return f"{_dtype_name(self.dtype)}, {_layout(self.unet.conv_in.weight)} conv weights, {compiled}, {processor}"

    @torch.no_grad()
    def prepare(self, size: int) -> dict:
        latents, context, image = common.step_inputs(size)
        self.latents = latents.to(self.dtype)
        self.embeddings = torch.cat([context[1:2], context[0:1]]).to(self.dtype)  # [uncond; cond], as diffusers
        hint = torch.from_numpy(image.copy()).float().div(255.0).permute(2, 0, 1)[None]
        self.image = torch.cat([hint, hint]).to(self.dtype)  # the pipeline repeats it for guidance
        self.t = torch.tensor(common.TIMESTEP)
        warmups = self.warm_up()
        return {"first_s": warmups[0], "warmup_s": warmups, "describe": self.describe()}

    @torch.no_grad()
    def hint_seconds(self) -> float:
        """diffusers' hint embedding, a part of every ControlNetModel call (here eager)."""
        embedding = self.controlnet.controlnet_cond_embedding
        return common.timed(lambda: embedding(self.image))[1]

    @torch.no_grad()
    def step(self) -> float:
        start = time.perf_counter()
        model_input = torch.cat([self.latents] * 2)
        down, mid = self.controlnet(
            model_input,
            self.t,
            encoder_hidden_states=self.embeddings,
            controlnet_cond=self.image,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
        )
        noise = self.unet(
            model_input,
            self.t,
            encoder_hidden_states=self.embeddings,
            timestep_cond=None,
            cross_attention_kwargs=None,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            added_cond_kwargs=None,
            return_dict=False,
        )[0]
        uncond, cond = noise.chunk(2)
        self.out = uncond + common.GUIDANCE_SCALE * (cond - uncond)
        return time.perf_counter() - start

    def output(self) -> torch.Tensor:
        return self.out.float().contiguous()


def make_worker(variant: str, compile: bool, freezing: bool) -> common.Worker:
    if variant in OURS:
        return common.Worker(variant, OursStep, "default" if variant == "c" else "fastest", compile, freezing)
    return common.Worker(variant, DiffusersStep, variant == BEST_DIFFUSERS, compile, freezing)


# -- the run ---------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256 only, no torch.compile, 2 rounds")
    parser.add_argument("--sizes", help="image sizes, e.g. 512,256 (default: 512,256; quick: 256)")
    parser.add_argument("--variants", default="a,b,c,d", help="which of a,b,c,d (default: all)")
    parser.add_argument("--repeats", type=int, help="timed rounds per size (default: 3 at 512, 5 below; quick: 2)")
    parser.add_argument("--no-compile", action="store_true", help="(b) and (d) without torch.compile")
    parser.add_argument("--no-freezing", action="store_true", help="compile without inductor's freezing")
    parser.add_argument("--sequential", action="store_true", help="one variant's process at a time (no rounds)")
    parser.add_argument("--flops", choices=("measured", "reference"), default="measured")
    parser.add_argument(
        "--malloc", choices=("fixed", "default"), default="fixed", help="glibc malloc kept (keep_freed_memory)"
    )
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("256" if args.quick else "512,256")).split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in LABELS]
    if unknown or any(s % 64 for s in args.sizes):
        parser.error(f"variants are a,b,c,d (got {unknown}); sizes must be multiples of 64")
    args.compile = not (args.no_compile or args.quick)
    args.freezing = args.compile and not args.no_freezing
    return args


def repeats_for(args: argparse.Namespace, size: int) -> int:
    if args.repeats:
        return args.repeats
    return 2 if args.quick else 3 if size >= 512 else 5


def reference_flops(size: int) -> float:
    return 2 * sum(common.REFERENCE_TFLOP_512.values()) * 1e12 * (size / 512) ** 2


def run_reference(sizes: list[int]) -> dict[int, dict]:
    """Our fp32 output (the yardstick of every variant's difference) and the counted FLOPs."""
    results = {}
    with common.Worker("reference", OursStep, "reference") as worker:
        for size in sizes:
            info = worker.call("prepare", size)
            info["output"] = worker.call("output")
            results[size] = info
            print(
                f"  reference {size}x{size}: ours fp32 in {info['seconds']:.1f} s (counting FLOPs), "
                f"{info['flops'] / 1e12:.3f} TFLOP",
                flush=True,
            )
    return results


def plan_groups(args: argparse.Namespace, size: int) -> list[list[str]]:
    """The variants that run side by side (timed round by round), group after group: all of them
    if the memory available now holds them, else the pairs (b, d) and (a, c), else one by one."""
    if args.sequential:
        return [[v] for v in args.variants]
    available = common.memory_available() / common.GiB - MARGIN_GIB

    def fits(group: list[str]) -> bool:
        return sum(need_gib(v, size, args.compile) for v in group) <= available

    if fits(args.variants):
        return [list(args.variants)]
    groups = []
    for pair in PAIRS:
        group = [v for v in pair if v in args.variants]
        groups.extend([group] if fits(group) else [[v] for v in group])
    return [g for g in groups if g]


def run_variants(args: argparse.Namespace) -> tuple[dict, dict]:
    """{variant: {size: record}} and {variant: error message}. Every (variant, size) gets a fresh
    process, so that a size's peak memory holds no other size's graphs or buffers."""
    results: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    errors: dict[str, str] = {}

    def guarded(variant: str, action) -> bool:
        if variant in errors:
            return False
        try:
            action()
        except common.WorkerError as error:
            errors[variant] = str(error)
            print(f"  ({variant}) failed: {str(error).splitlines()[0]}", flush=True)
            return False
        return True

    def start(variant: str, size: int, workers: dict) -> None:
        def build() -> None:
            worker, seconds = common.timed(lambda: make_worker(variant, args.compile, args.freezing))
            workers[variant] = worker
            results[variant][size] = {"times": [], "steps": [], "build_s": seconds, "built": worker.built_memory}
            gib = worker.built_memory["rss"] / common.GiB
            print(f"  ({variant}) {size}x{size}: built in {seconds:.0f} s ({gib:.1f} GiB)", flush=True)

        guarded(variant, build)

    def warm_up(workers: dict, size: int) -> None:
        """The group's warm-ups (compiling, mostly single-threaded) side by side: less wall time."""
        for variant, worker in workers.items():
            guarded(variant, lambda w=worker: w.send("prepare", size))
        for variant, worker in workers.items():

            def receive(w=worker, v=variant) -> None:
                info = w.receive("prepare")
                results[v][size].update(info)
                calls = " + ".join(f"{c:.1f}" for c in info["warmup_s"])
                print(f"  ({v}) {size}x{size}: warmed up ({calls} s)", flush=True)

            guarded(variant, receive)

    def finish(variant: str, worker: common.Worker, record: dict) -> None:
        def collect() -> None:
            record["memory"] = worker.call("memory")
            record["output"] = worker.call("output")

        guarded(variant, collect)

    for size in args.sizes:
        groups = plan_groups(args, size)
        plan = "; then ".join(("alternating " if len(g) > 1 else "") + ",".join(g) for g in groups)
        print(f"  {size}x{size}: {plan}", flush=True)
        for group in groups:
            workers: dict[str, common.Worker] = {}
            try:
                for variant in group:
                    start(variant, size, workers)
                warm_up(workers, size)
                for variant, worker in workers.items():
                    if size in results[variant]:
                        guarded(
                            variant, lambda w=worker, r=results[variant][size]: r.update(hint_s=w.call("hint_seconds"))
                        )
                for round_index in range(repeats_for(args, size)):
                    done = []
                    for variant, worker in workers.items():
                        record = results[variant].get(size)
                        if record is not None and guarded(
                            variant, lambda w=worker, r=record: r["steps"].append(w.call("timed_step"))
                        ):
                            record["times"].append(record["steps"][-1]["s"])
                            done.append(f"({variant}) {record['times'][-1]:.2f} s")
                    print(f"  {size}x{size} round {round_index + 1}: {', '.join(done)}", flush=True)
                for variant, worker in workers.items():
                    if size in results[variant]:
                        finish(variant, worker, results[variant][size])
            finally:
                for worker in workers.values():
                    worker.close()
    return results, errors


def label(variant: str, args: argparse.Namespace) -> str:
    compiled = (" + compile (freezing)" if args.freezing else " + compile") if args.compile else ""
    return f"({variant}) " + LABELS[variant].format(compile=compiled)


def report(args, reference, results, errors, probes) -> None:
    bf16_peak = max(p["bf16"] for p in probes)
    fp32_peak = max(p["fp32"] for p in probes)
    print()
    print("bf16 matmul 4096^3: " + ", ".join(f"{p['bf16']:.2f}" for p in probes) + " TFLOP/s (start, end)")
    print("fp32 matmul 4096^3: " + ", ".join(f"{p['fp32']:.2f}" for p in probes) + " TFLOP/s (start, end)")
    for size in args.sizes:
        ref = reference[size]
        measured = ref["flops"]
        estimated = reference_flops(size)
        flops = measured if args.flops == "measured" else estimated
        parts = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in ref["by_module"].items())
        print()
        print(f"== guided step, {size}x{size} (batch 2: ControlNet + UNet + guidance) ==")
        print(
            f"FLOPs used: {flops / 1e12:.3f} TFLOP ({args.flops}); counted on ours fp32: {measured / 1e12:.3f} "
            f"({parts}); docs/reference.md estimate {estimated / 1e12:.3f}"
        )
        header = ["variant", "median s", "min s", "runs", "x (b)", "TFLOP/s", "% bf16 mm", "sys s", "faults"]
        header += ["peak GiB", "warm-up s"]
        header.append("rel diff vs ours fp32")
        rows = []
        best = results.get(BEST_DIFFUSERS, {}).get(size, {}).get("times")
        best_median = common.median(best) if best else None
        for variant in args.variants:
            record = results[variant].get(size, {})
            times = record.get("times") or []
            if not times:
                rows.append([label(variant, args), "failed" if variant in errors else "-", *[""] * (len(header) - 2)])
                continue
            med = common.median(times)
            tflops = flops / med / 1e12
            ratio = f"{med / best_median:.2f}" if best_median else "-"
            peak = record.get("memory", {}).get("hwm", 0) / common.GiB
            diff = common.relative_error(record["output"], ref["output"]) if "output" in record else float("nan")
            rows.append(
                [
                    label(variant, args),
                    f"{med:.3f}",
                    f"{min(times):.3f}",
                    str(len(times)),
                    ratio,
                    f"{tflops:.3f}",
                    f"{100 * tflops / bf16_peak:.0f}%",
                    f"{common.median([x['sys'] for x in record['steps']]):.2f}",
                    f"{common.median([x['faults'] for x in record['steps']]) / 1000:.0f}k",
                    f"{peak:.2f}",
                    f"{sum(record['warmup_s']):.1f}",
                    f"{diff:.1e}",
                ]
            )
        print(common.format_table(header, rows))
        for variant in args.variants:
            record = results[variant].get(size, {})
            if "describe" in record:
                hint = record.get("hint_s", float("nan"))
                where = "once, outside the step" if variant in OURS else "inside every step call, batch 2"
                calls = record.get("warmup_s", [])
                warm = f"; warm-up calls {' + '.join(f'{c:.1f}' for c in calls)} s" if len(calls) > 1 else ""
                print(f"  ({variant}) {record['describe']}; hint embedding {hint * 1000:.0f} ms ({where}){warm}")
    print()
    print(
        textwrap.fill(
            " ".join(
                [
                    "x (b): time over diffusers' best (b) (below 1: faster).",
                    "TFLOP/s: FLOPs used / median.",
                    f"% bf16 mm: of the best bf16 matmul ({bf16_peak:.2f} TFLOP/s; fp32 {fp32_peak:.2f}).",
                    "sys s, faults: system CPU time and minor page faults per step (memory from the kernel).",
                    "peak GiB: the process's VmHWM over the last warm-up call and the timed steps.",
                    f"warm-up s: the calls before timing (compiled: {WARMUP_CALLS[True]}, compiling included;",
                    f"eager: {WARMUP_CALLS[False]}); a group's variants warm up side by side (their times overlap).",
                    "rel diff: max |out - ref| / max |ref| of the guided output, ref = ours fp32 (math attention).",
                    "Hint embedding: timed alone, after every warm-up.",
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
    print(f"bench_step: {common.cpu_line()}; {common.machine_line()}")
    print(f"variants {','.join(args.variants)}, sizes {args.sizes}, compile {args.compile}, malloc {args.malloc}")
    print(f"inductor cache {cache}")
    probes = [{"bf16": common.matmul_tflops(torch.bfloat16), "fp32": common.matmul_tflops(torch.float32)}]
    reference = run_reference(args.sizes)
    results, errors = run_variants(args)
    probes.append({"bf16": common.matmul_tflops(torch.bfloat16), "fp32": common.matmul_tflops(torch.float32)})
    report(args, reference, results, errors, probes)
    print(f"\n{common.machine_line()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

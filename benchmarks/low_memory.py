"""Peak memory of a generation with and without the low-memory mode, SD 1.5 + one ControlNet.

Each mode runs in a fresh process: random SD 1.5-size weights built directly in the dtype (the
benchmarks' seeds), a ``Pipeline`` (normal or ``low_memory=True``), then one generation: text
encoding, the hint, guided DDIM steps and the VAE decode at 512x512 by default. The peak is the
process's resident-set high-water mark (VmHWM) over the generation alone (reset after building:
how the weights were made is not the mode's business), and the resident memory before it. Usage:

    python benchmarks/low_memory.py [--size 512] [--steps 2] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def run_one(low_memory: bool, size: int, steps: int, dtype_name: str) -> None:
    import torch

    from controlnet.pipeline import ControlUnit, Pipeline

    dtype = getattr(torch, dtype_name)
    model, controlnet = common.build_ours(dtype)
    pipe = Pipeline(model, [controlnet], dtype=dtype, low_memory=low_memory)
    del model, controlnet
    common.release_free_memory()
    before = common.memory()["rss"]
    common.reset_peak_memory()
    edges = common.control_image(size)
    start = time.perf_counter()
    pipe.generate("a bird", [ControlUnit(edges)], steps=steps, seed=0, resolution=size)
    seconds = time.perf_counter() - start
    print(f"{common.memory()['hwm'] / 2**20:.0f} {before / 2**20:.0f} {seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--child", choices=("normal", "low"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(args.child == "low", args.size, args.steps, args.dtype)
        return
    results = {}
    for mode in ("normal", "low"):
        command = [sys.executable, __file__, "--child", mode, "--size", str(args.size), "--dtype", args.dtype]
        command += ["--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
        results[mode] = [float(value) for value in output[-3:]]
    print(f"SD 1.5 + ControlNet, {args.size}x{args.size}, {args.dtype}, {args.steps} guided DDIM steps + VAE decode")
    print(f"{common.cpu_line()}; {common.machine_line()}")
    for mode, label in (("normal", "normal:    "), ("low", "low memory:")):
        peak, before, seconds = results[mode]
        print(f"  {label} peak {peak:6.0f} MiB (resident before: {before:5.0f} MiB)   {seconds:6.1f} s")
    saving = 1 - results["low"][0] / results["normal"][0]
    print(f"  saving: {100 * saving:.0f}% of the peak; time x{results['low'][2] / results['normal'][2]:.2f}")


if __name__ == "__main__":
    main()

"""Peak memory of a generation with and without the low-memory mode, SD 1.5 + one ControlNet.

Each mode runs in a fresh process (peak RSS is per process): random SD 1.5-size weights, one
guided DDIM step (the step count does not change the peak) and the VAE decode, at 512x512 by
default. Prints the peaks and the saving. Usage:

    python benchmarks/low_memory.py [--size 512] [--dtype float32]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def run_one(low_memory: bool, size: int, dtype: str) -> None:
    import numpy as np
    import torch

    from controlnet.config import SD15
    from controlnet.controlnet import ControlNet
    from controlnet.model import StableDiffusion
    from controlnet.pipeline import ControlUnit, Pipeline

    torch.manual_seed(0)
    model = StableDiffusion(SD15, empty=True)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(model, name).to_empty(device="cpu")
        for parameter in module.parameters():  # small random weights; the values do not matter here
            parameter.data.normal_(std=0.02)
        setattr(model, name, module)
    controlnet = ControlNet(SD15.controlnet()).to_empty(device="cpu")
    for parameter in controlnet.parameters():
        parameter.data.normal_(std=0.02)
    pipe = Pipeline(model, [controlnet], dtype=getattr(torch, dtype), low_memory=low_memory)
    del model, controlnet
    edges = np.zeros((size, size, 3), np.uint8)
    edges[size // 4 : size // 4 + 4] = 255
    start = time.perf_counter()
    pipe.generate("a bird", [ControlUnit(edges)], steps=1, seed=0, resolution=size)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{peak_mib:.0f} {seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--child", choices=("normal", "low"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(args.child == "low", args.size, args.dtype)
        return
    results = {}
    for mode in ("normal", "low"):
        command = [sys.executable, __file__, "--child", mode, "--size", str(args.size), "--dtype", args.dtype]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
        results[mode] = (float(output[0]), float(output[1]))
    (normal, normal_s), (low, low_s) = results["normal"], results["low"]
    print(f"SD 1.5 + ControlNet, {args.size}x{args.size}, {args.dtype}, 1 guided step + VAE decode")
    print(f"  normal:     peak {normal:8.0f} MiB   {normal_s:6.1f} s")
    print(f"  low memory: peak {low:8.0f} MiB   {low_s:6.1f} s")
    print(f"  saving: {100 * (1 - low / normal):.0f}% of the peak")


if __name__ == "__main__":
    main()

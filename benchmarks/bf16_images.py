"""How far our bf16 default moves a decoded image from float32: the same generation (weights, seed,
prompt, control, sampler) in both dtypes, compared pixel by pixel.

SD 1.5-size random weights (the benchmarks' seeds) by default, or any model files. Prints the max
and mean absolute difference in 8-bit levels, the share of pixels that moved by more than 2 levels,
and the PSNR; ``--out`` writes fp32 | bf16 | 10x difference side by side. Usage:

    python benchmarks/bf16_images.py [--size 256] [--steps 20] [--out diff.png]
                                     [--base BASE --controlnet CN --image control.png --prompt "..."]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def generate(dtype: torch.dtype, args: argparse.Namespace) -> np.ndarray:
    from controlnet.imaging.images import load_image
    from controlnet.pipeline import ControlUnit, Pipeline

    if args.base:
        pipe = Pipeline.from_files(args.base, [args.controlnet], dtype=dtype)
        image = load_image(args.image)
        annotator = args.annotator
    else:
        model, controlnet = common.build_ours(dtype)
        pipe = Pipeline(model, [controlnet], dtype=dtype)
        image, annotator = common.control_image(args.size), "none"
    result = pipe.generate(
        args.prompt, [ControlUnit(image, annotator=annotator)], seed=1, steps=args.steps, resolution=args.size
    )
    return result.images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--base")
    parser.add_argument("--controlnet")
    parser.add_argument("--image")
    parser.add_argument("--annotator", default="canny")
    parser.add_argument("--prompt", default=common.PROMPT)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    full = generate(torch.float32, args).astype(np.int16)
    half = generate(torch.bfloat16, args).astype(np.int16)
    diff = np.abs(full - half)
    mse = float(((full - half) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    what = args.base or "SD 1.5-size random weights"
    print(f"{what}, {args.size}x{args.size}, {args.steps} DDIM steps, seed 1: bf16 against float32")
    print(
        f"  max |diff| {diff.max()} levels, mean {diff.mean():.2f}, "
        f"pixels moved > 2 levels {100 * (diff.max(axis=2) > 2).mean():.1f}%, PSNR {psnr:.1f} dB"
    )
    if args.out:
        from PIL import Image

        amplified = np.clip(diff * 10, 0, 255)
        row = np.concatenate([full, half, amplified], axis=1).astype(np.uint8)
        Image.fromarray(row).save(args.out)
        print(f"  fp32 | bf16 | 10x difference: {args.out}")


if __name__ == "__main__":
    main()

"""``controlnet demo``: the whole model stack end to end on the tiny configuration.

Until the project's own trained model ships, the demo uses seeded random weights: the pictures are
noise, but every stage runs for real (tokenizer, text encoder, hint encoder, ControlNet, controlled
UNet, DDIM with classifier-free guidance, VAE decode) and both file layouts are written and read back.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import load_base, load_controlnet, save_diffusers, save_ldm
from .config import TINY
from .controlnet import ControlNet
from .model import StableDiffusion
from .pipeline import ControlUnit, Pipeline


def circle_edges(size: int) -> np.ndarray:
    """A white circle outline on black, [size, size, 3] uint8: a stand-in Canny map."""
    ys, xs = np.mgrid[:size, :size]
    radius = np.hypot(ys - size / 2, xs - size / 2)
    ring = np.abs(radius - size / 3) < 1.0
    return np.repeat((ring * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _wake_zero_layers(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give small random weights to every zero-initialised layer: untrained, they would hide the
    paths they close (a fresh UNet's output conv is zero, so it would predict zero noise)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("weight") and parameter.ndim > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def random_tiny_models(seed: int = 0) -> tuple[StableDiffusion, ControlNet]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = StableDiffusion(TINY).eval()
    controlnet = ControlNet.from_unet(model.unet, model.config.controlnet()).eval()
    _wake_zero_layers(model, generator)
    _wake_zero_layers(controlnet, generator)
    return model, controlnet


def generate(
    model: StableDiffusion, controlnet: ControlNet, prompt: str, control: np.ndarray, steps: int
) -> np.ndarray:
    """One image [H, W, 3] uint8 following ``prompt`` and the control map (DDIM, guidance 9, seed 0)."""
    pipe = Pipeline(model, [controlnet])
    result = pipe.generate(prompt, [ControlUnit(control)], steps=steps, seed=0, resolution=control.shape[0])
    return result.images[0]


def run_demo(out: Path, prompt: str, steps: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    print("controlnet demo: tiny configuration with seeded random weights (no trained model ships yet),")
    print("so the image is noise; what it shows is every stage of the stack running end to end.")
    model, controlnet = random_tiny_models()
    size = model.config.native_resolution
    control = circle_edges(size)

    ldm_file = save_ldm(out / "tiny-with-control.safetensors", model, controlnet)
    diffusers_folder = save_diffusers(out / "tiny-diffusers", model, controlnet)
    reloaded = [
        (load_base(ldm_file), load_controlnet(ldm_file)),
        (load_base(diffusers_folder), load_controlnet(diffusers_folder)),
    ]
    print(f"wrote and read back {ldm_file} (LDM layout) and {diffusers_folder}/ (diffusers layout)")

    start = time.perf_counter()
    image = generate(model, controlnet, prompt, control, steps)
    seconds = time.perf_counter() - start
    for again_model, again_control in reloaded:
        if not np.array_equal(generate(again_model, again_control, prompt, control, steps), image):
            raise RuntimeError("a reloaded model gave a different image: the file round trip is broken")
    fresh = ControlNet.from_unet(
        model.unet, model.config.controlnet()
    ).eval()  # zero convs at zero: exactly the plain UNet
    uncontrolled = generate(model, fresh, prompt, control, steps)
    changed = float(np.mean(uncontrolled != image))

    paths = [out / "control.png", out / "sample.png"]
    Image.fromarray(control).save(paths[0])
    Image.fromarray(image).save(paths[1])
    print(f"{steps} guided DDIM steps at {size}x{size}: {seconds:.2f} s; both reloaded copies give the same image")
    print(f"the ControlNet changed {changed:.0%} of the pixels against a fresh one (zero convs at zero = plain UNet)")
    for path in paths:
        print(f"  {path}")
    return paths

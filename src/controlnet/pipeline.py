"""Text-to-image (and image-to-image, inpainting) generation with ControlNet units.

Load once, call many times::

    pipe = Pipeline.from_files("v1-5-pruned-emaonly.safetensors", ["control_v11p_sd15_canny.pth"])
    result = pipe.generate("a cat", [ControlUnit(image, annotator="canny")], seed=1)

The loop is written out in :meth:`Pipeline.generate`: encode the prompt, prepare each unit's hint
(once), draw the initial latents (one generator per image: seed + i), sample, decode.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .annotators import run_annotator
from .checkpoints import check_compatible, load_base, load_controlnet
from .controlnet import ControlNet
from .guidance import ActiveControl, ControlMode, GuidedDenoiser
from .images import HWC3, fit_to, resize_image
from .model import StableDiffusion
from .prompts import encode_prompts
from .samplers import make_plan, sample

MAX_SEED = 2**31 - 1
MAX_IMAGES = 12


@dataclass
class ControlUnit:
    """One ControlNet acting on the generation (an AUTOMATIC1111-style control unit)."""

    image: np.ndarray  # the input image, RGB uint8 [H, W, 3] (or a ready control map for annotator "none")
    annotator: str = "none"  # what extracts the control map from the image (canny, scribble, ...)
    annotator_params: dict = field(default_factory=dict)  # e.g. {"low_threshold": 100, "high_threshold": 200}
    controlnet: int = 0  # index of the pipeline's ControlNet this unit uses
    strength: float = 1.0  # control strength, 0..2
    start: float = 0.0  # fraction of the steps at which the unit starts acting
    end: float = 1.0  # ... and stops
    mode: str = "balanced"  # balanced | prompt | control (see guidance.ControlMode)
    resize_mode: str = "crop_and_resize"  # just_resize | crop_and_resize | resize_and_fill
    scales: list[float] | None = None  # advanced: one multiplier per residual, replacing strength and mode's


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # uint8 [H, W, 3], or float32 in [0, 1] when asked for
    control_maps: list[np.ndarray]  # the detected map of each unit, uint8 [H, W, 3]
    seeds: list[int]  # the seed of each image (seed + i)
    settings: dict  # everything needed to reproduce the result


class Pipeline:
    """A base model with its ControlNets, on one device and dtype."""

    def __init__(
        self,
        model: StableDiffusion,
        controlnets: Sequence[ControlNet] = (),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for i, controlnet in enumerate(controlnets):
            check_compatible(controlnet.config, model.config, f"ControlNet {i}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.controlnets = [c.to(self.device, dtype).eval() for c in controlnets]

    @classmethod
    def from_files(
        cls,
        base: str | os.PathLike,
        controlnets: Sequence[str | os.PathLike] = (),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        prediction: str | None = None,
    ) -> Pipeline:
        model = load_base(base, prediction=prediction)
        return cls(model, [load_controlnet(path, model.config) for path in controlnets], device, dtype)

    # -- the steps of a generation, each small enough to read -----------------------------------

    def output_size(self, controls: Sequence[ControlUnit], resolution: int | None) -> tuple[int, int]:
        """(height, width): the first control image resized as the original app does
        (short side = resolution, each side rounded to a multiple of 64)."""
        resolution = resolution or self.model.config.native_resolution
        if not controls:
            return resolution, resolution
        height, width = resize_image(HWC3(controls[0].image), resolution).shape[:2]
        return height, width

    def control_map(self, unit: ControlUnit, height: int, width: int) -> np.ndarray:
        """The unit's control map at the output size: fit the image, then run its annotator."""
        fitted = fit_to(HWC3(unit.image), width, height, unit.resize_mode)
        return run_annotator(unit.annotator, fitted, None, **unit.annotator_params)

    def hint_tensor(self, control_map: np.ndarray, count: int) -> torch.Tensor:
        """[count, 3, H, W] in [0, 1] (inpaint maps keep their -1 for masked pixels)."""
        if control_map.dtype == np.uint8:
            hint = torch.from_numpy(control_map.copy()).float() / 255.0
        else:
            hint = torch.from_numpy(control_map.astype(np.float32))
        hint = hint.permute(2, 0, 1)[None].to(self.device, self.dtype)
        return hint.expand(count, -1, -1, -1)

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """One generator per image, so image i depends only on seed + i, whatever the batch size."""
        factor = self.model.vae.downsample_factor
        shape = (1, self.model.config.unet.in_channels, height // factor, width // factor)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.cat(noise).to(self.device, self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], [B, 3, H, W] float32."""
        images = self.model.vae.decode(latents / self.model.vae.scale_factor)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- the loop ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        controls: Sequence[ControlUnit] = (),
        *,
        negative_prompt: str = "",
        added_prompt: str = "",
        num_images: int = 1,
        seed: int | None = None,
        steps: int = 20,
        guidance_scale: float = 9.0,
        eta: float = 0.0,
        sampler: str = "ddim",
        resolution: int | None = None,
        latents: torch.Tensor | None = None,
        output: str = "uint8",
        progress: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images for ``prompt`` following ``controls``."""
        self._check_arguments(controls, num_images, seed, steps, guidance_scale, output)
        seed = random.randint(0, MAX_SEED) if seed is None or seed < 0 else seed
        seeds = [seed + i for i in range(num_images)]
        height, width = self.output_size(controls, resolution)

        full_prompt = f"{prompt}, {added_prompt}" if added_prompt else prompt
        context = encode_prompts(self.model.text_encoder, [full_prompt, negative_prompt]).to(self.dtype)
        cond = context[0:1].expand(num_images, -1, -1)
        uncond = context[1:2].expand(num_images, -1, -1)

        control_maps = [self.control_map(unit, height, width) for unit in controls]
        active = [
            ActiveControl(
                controlnet=self.controlnets[unit.controlnet],
                hint_features=self.controlnets[unit.controlnet].encode_hint(self.hint_tensor(cmap, 1)),
                strength=unit.strength,
                start=unit.start,
                end=unit.end,
                mode=ControlMode.parse(unit.mode),
                scales=unit.scales,
            )
            for unit, cmap in zip(controls, control_maps, strict=True)
        ]

        plan = make_plan(sampler, self.model.config.schedule, steps, eta=eta)
        denoiser = GuidedDenoiser(self.model.unet, cond, uncond, guidance_scale, active, plan.total_steps)
        x = self.initial_noise(seeds, height, width) if latents is None else latents.to(self.device, self.dtype)
        generators = [torch.Generator().manual_seed(s) for s in seeds]

        def on_step(step: int, total: int) -> None:
            denoiser.step = step
            if progress is not None:
                progress(step, total)

        x = sample(denoiser, x, plan, generator=generators, callback=on_step)
        images = self.decode(x).permute(0, 2, 3, 1).cpu().numpy()
        if output == "uint8":
            images = (images * 255.0).round().astype(np.uint8)
        settings = self._settings(locals())
        return GenerationResult(list(images), control_maps, seeds, settings)

    def _check_arguments(self, controls, num_images, seed, steps, guidance_scale, output) -> None:
        if not 1 <= num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be between 1 and {MAX_IMAGES}, got {num_images}")
        if seed is not None and seed > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED} (or -1 for a random one), got {seed}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if guidance_scale <= 0:
            raise ValueError(f"guidance scale must be positive, got {guidance_scale}")
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        for unit in controls:
            if not 0 <= unit.controlnet < len(self.controlnets):
                raise ValueError(
                    f"control unit uses ControlNet {unit.controlnet}, but {len(self.controlnets)} are loaded"
                )

    def _settings(self, scope: dict) -> dict:
        names = ("prompt", "negative_prompt", "added_prompt", "seed", "steps", "guidance_scale", "eta", "sampler")
        settings = {name: scope[name] for name in names}
        settings.update(width=scope["width"], height=scope["height"], model=self.model.config.name)
        settings["controls"] = [
            {k: v for k, v in dataclasses.asdict(unit).items() if k != "image"} for unit in scope["controls"]
        ]
        return settings

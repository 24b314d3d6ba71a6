"""Text-to-image (and image-to-image, inpainting) generation with ControlNet units.

Load once, call many times::

    pipe = Pipeline.from_files("v1-5-pruned-emaonly.safetensors", ["control_v11p_sd15_canny.pth"])
    result = pipe.generate("a cat", [ControlUnit(image, annotator="canny")], seed=1)

The loop is written out in :meth:`Pipeline.generate`: encode the prompt, prepare each unit's hint
(once), draw the initial latents (one generator per image: seed + i), sample, decode.

T2I-Adapters are held beside the ControlNets and chosen per unit the same way::

    pipe = Pipeline.from_files("v1-5.safetensors", adapters=["t2iadapter_canny_sd15v2.pth"])
    result = pipe.generate("a cat", [ControlUnit(edges, adapter=0, strength=0.8, end=0.5)])

An adapter unit is an ordinary `ControlUnit` whose ``adapter`` names a loaded adapter (its
``controlnet`` is then unused): one unit type, so annotators, resize modes, strength, windows, the
settings' checks and the PNG record are shared with ControlNet units, and an interface that offers
units offers adapters by one more field. What differs is how a unit acts (`Pipeline.activate_adapter`):
its features are computed once per generation from the control map, times the strength, and added
to both sides of guidance at the steps inside the unit's window; several adapters sum their features.
TencentARC's ``cond_tau`` (the adapter acts on the first ``cond_tau`` of the steps) is ``start=0,
end=cond_tau``: step ``i`` of ``N`` acts when ``i < int(N * end)``, diffusers' rule for the SDXL
adapter pipeline's ``adapter_conditioning_factor``; TencentARC's own code rounds the other way
(``i < N - int(N * (1 - cond_tau))``), one step more when ``N * cond_tau`` is not a whole number.
Adapters take no control mode but ``balanced`` and no per-residual ``scales``.

SDXL (docs/sdxl.md) goes through the same `generate`: its two text encoders give each prompt a
context and a pooled embedding, which with the size conditioning (``size_conditioning``; by default
original = target = the output size, crop (0, 0)) is the vector y the UNet and every ControlNet read,
on both sides of guidance. An empty negative prompt is zeros, context and pooled alike (diffusers'
SDXL pipelines with their default ``force_zeros_for_empty_prompt``, which SDXL base's model_index.json
keeps), where SD 1.x/2.x encode the empty text. A union ControlNet (xinsir's) is chosen per unit like
any other; each unit's control type is its ``control_type``, or by default the one its annotator
makes (`UNION_TYPES`). Units of one union ControlNet with the same window and mode are one network
call with several conditions, each weighted by its unit's strength, as xinsir's model is meant to
be used (diffusers' union pipeline with a ``controlnet_conditioning_scale`` list); a union unit alone
is diffusers' single-condition call, its strength scaling the residuals.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import __version__
from .annotators import Runtime, annotators_folder, get_annotator, run_annotator
from .annotators.filters import rgb_to_grey
from .formats.detect import check_compatible
from .formats.t2i_adapter import check_adapter_compatible
from .hashing import file_sha256, short_hash
from .imaging.images import HWC3
from .imaging.resize import fit_to, pixel_perfect_resolution, resize_image
from .loading import load_adapter, load_base, load_controlnet, load_taesd
from .lora import AppliedLoras, Lora, apply_loras, find_lora, load_lora, prompt_loras
from .models.conditioning import SizeConditioning
from .models.controlnet import ControlNet
from .models.controlnet_union import UnionCondition, UnionControlNet, control_type_id
from .models.placement import LOW_MEMORY_ATTENTION_SLICE, Placement, set_attention_slicing
from .models.stable_diffusion import StableDiffusion
from .models.t2i_adapter import T2IAdapter, scale_features
from .models.taesd import TinyAutoencoder
from .runtime import check_finite, dtype_name, parse_dtype, prepare, use_channels_last
from .sampling.guidance import ActiveAdapter, ActiveControl, ControlMode, GuidedDenoiser
from .sampling.prompts import check_prompts, encode_prompts, encode_prompts_pooled, full_prompt
from .sampling.samplers import Plan, get_sampler, make_plan, sample
from .settings import (
    AUTO_UNION_TYPE,
    GENERATION,
    MAX_SEED,
    UNIT,
    check_generation,
    check_loras,
    check_output_size,
    check_unit,
)

# The latents between steps and the sampler's arithmetic: float32 whatever the models' dtype (a
# bf16 latent would lose 8 bits at every step's update; the models' inputs are cast per call).
SAMPLING_DTYPE = torch.float32
# Names of settings.py's limits, for the code that imports them from here.
MAX_IMAGES = int(GENERATION["num_images"].maximum)
GUIDANCE_RANGE = (GENERATION["guidance_scale"].minimum, GENERATION["guidance_scale"].maximum)
RESOLUTION_RANGE = (int(GENERATION["resolution"].minimum), int(GENERATION["resolution"].maximum))

# The union control type (models/controlnet_union.CONTROL_TYPES) of each annotator's map, for a
# union ControlNet unit whose control_type is "auto": the pairs of xinsir's README, the AUTOMATIC1111
# extension's and ComfyUI's union nodes. Annotators not listed (none, shuffle, grey, threshold, ...)
# make no one type: such a unit names its control_type.
UNION_TYPES: dict[str, str] = {
    "canny": "canny",
    "mlsd": "mlsd",
    "mlsd_lsd": "mlsd",
    **dict.fromkeys(("lineart_standard", "lineart_realistic", "lineart_coarse"), "lineart"),
    "lineart_anime": "anime_lineart",
    **dict.fromkeys(("softedge_hed", "softedge_hedsafe"), "hed"),
    **dict.fromkeys(("softedge_pidinet", "softedge_pidisafe"), "pidi"),
    **dict.fromkeys(("scribble", "scribble_hed", "scribble_pidinet"), "scribble"),
    **dict.fromkeys(
        ("openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_json"),
        "openpose",
    ),
    **dict.fromkeys(
        ("depth_midas", "depth_anything_v2", "depth_anything_v2_vitb", "depth_anything_v2_vits", "depth_from_file"),
        "depth",
    ),
    **dict.fromkeys(("normal_midas", "normal_bae"), "normal"),
    "seg_from_labels": "segment",
    "tile": "tile",
    "inpaint": "inpaint",
}


@dataclass
class ControlUnit:
    """One ControlNet, or one T2I-Adapter, acting on the generation (an AUTOMATIC1111-style
    control unit)."""

    image: np.ndarray  # the input image, RGB uint8 [H, W, 3] (or a ready control map for annotator "none")
    # In Python the image is a ready control map unless an annotator is named (the command line and
    # the page run settings.UNIT["annotator"].default, canny, on photos).
    annotator: str = "none"
    annotator_params: dict = field(default_factory=dict)  # e.g. {"low_threshold": 100, "high_threshold": 200}
    # The rest as settings.UNIT defines them (defaults, ranges, meaning).
    controlnet: int = UNIT["controlnet"].default
    strength: float = UNIT["strength"].default
    start: float = UNIT["start"].default
    end: float = UNIT["end"].default
    mode: str = UNIT["mode"].default
    resize_mode: str = UNIT["resize_mode"].default
    scales: list[float] | None = None  # advanced: one multiplier per residual, replacing strength and mode's
    # A T2I-Adapter unit: the index of a loaded adapter (Pipeline's ``adapters``); ``controlnet`` is
    # then unused. None: a ControlNet unit.
    adapter: int | None = None
    # A union ControlNet's control type for this map (a name of models/controlnet_union.CONTROL_TYPES:
    # "openpose", "depth", "canny", ...); "auto": the annotator's (UNION_TYPES). Other models ignore it.
    control_type: str = UNIT["control_type"].default


class EncodedPrompts(NamedTuple):
    """The prompt's and the negative prompt's encodings, [1, T, width] each, and for SDXL their
    vector y, [1, adm_in_channels] each (None for SD 1.x/2.x). Without guidance (a scale of at
    most 1) the negative side is None."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    cond_y: torch.Tensor | None = None
    uncond_y: torch.Tensor | None = None


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # uint8 [H, W, 3], or float32 in [0, 1] when asked for
    control_maps: list[np.ndarray]  # the detected map of each unit, uint8 [H, W, 3]
    seeds: list[int]  # the seed of each image (seed + i)
    settings: dict  # everything needed to reproduce the result


class Pipeline:
    """A base model with its ControlNets and T2I-Adapters, on one device and dtype."""

    def __init__(
        self,
        model: StableDiffusion,
        controlnets: Sequence[ControlNet] = (),
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        low_memory: bool = False,
        channels_last: bool | None = None,
        annotators_dir: str | os.PathLike | None = None,
        adapters: Sequence[T2IAdapter] = (),
        lora_dir: str | os.PathLike | None = None,
        taesd: TinyAutoencoder | None = None,
    ) -> None:
        """``taesd``: the tiny autoencoder (models/taesd.py) for ``decoder="taesd"`` and previews;
        its latents must be the base's. ``lora_dir``: the folder where a prompt's ``<lora:NAME:WEIGHT>`` tags are found
        (lora.find_lora); None: such tags are refused. ``dtype``: None (or "auto") takes the
        device's fastest (runtime.default_dtype: bfloat16 on a CPU with native bf16, float16 on a
        GPU, else float32). ``channels_last``: None follows the device and dtype
        (runtime.use_channels_last). ``low_memory``: keep on the device only
        the models of the current stage and slice attention (see placement.py); slower, with a
        lower peak of memory. ``annotators_dir``: where network annotators read their weights
        (annotators/weights.py: default $CONTROLNET_ANNOTATORS, else ~/.cache/controlnet/annotators);
        they run on this pipeline's device, in its dtype. ``adapters``: T2I-Adapters, chosen by a
        unit's ``adapter`` index (their widths must fit the base's UNet levels)."""
        for i, controlnet in enumerate(controlnets):
            check_compatible(controlnet.config, model.config, f"ControlNet {i}")
        for i, adapter in enumerate(adapters):
            check_adapter_compatible(adapter.config, model.config, f"T2I-Adapter {i}")
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.channels_last = use_channels_last(self.device, self.dtype) if channels_last is None else channels_last
        self.annotators = Runtime(annotators_folder(annotators_dir), str(self.device), dtype_name(self.dtype))
        home = torch.device("cpu") if low_memory else self.device
        self.model = prepare(model, home, self.dtype, self.channels_last)
        self.controlnets = [prepare(c, home, self.dtype, self.channels_last) for c in controlnets]
        self.adapters = [prepare(a, home, self.dtype, self.channels_last) for a in adapters]
        if taesd is not None and taesd.latent_channels != model.config.unet.in_channels:
            raise ValueError(
                f"this TAESD makes {taesd.latent_channels}-channel latents, the base model "
                f"{model.config.name} {model.config.unet.in_channels}: give the TAESD of its family"
            )
        self.taesd = None if taesd is None else prepare(taesd, home, self.dtype, self.channels_last)
        self.placement = Placement(self.device, low_memory, channels_last=self.channels_last)
        self.lora_dir = None if lora_dir is None else Path(lora_dir)
        # LoRAs read once (file -> its stat, the Lora, its short hash), and the set merged now.
        self._lora_files: dict[Path, tuple[tuple[int, int], Lora, str]] = {}
        self._merged: AppliedLoras | None = None
        self._merged_key: tuple = ()
        self._compiled = False
        # The files the ControlNets and adapters came from, in index order (from_files sets them):
        # how `controlnet_index` finds a shipped model by name. Empty for models built in memory.
        self.files: dict[str, list[Path]] = {"controlnet": [], "adapter": []}
        if low_memory:
            denoisers = (self.model.unet, *self.controlnets)
            for module in (*denoisers, self.model.vae, self.model.text_encoder):
                set_attention_slicing(module, LOW_MEMORY_ATTENTION_SLICE)
                if self.device.type == "cpu" and module in denoisers:
                    self.placement.stream(module)  # every step needs them: block by block
                else:
                    self.placement.park(module)
            for adapter in self.adapters:  # run once per generation
                self.placement.park(adapter)
            if self.taesd is not None:
                self.placement.park(self.taesd)

    @classmethod
    def from_files(
        cls,
        base: str | os.PathLike,
        controlnets: Sequence[str | os.PathLike] = (),
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        prediction: str | None = None,
        low_memory: bool = False,
        annotators_dir: str | os.PathLike | None = None,
        adapters: Sequence[str | os.PathLike] = (),
        lora_dir: str | os.PathLike | None = None,
        taesd: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> Pipeline:
        """``controlnets``: ControlNet files or folders (loading.load_controlnet: SDXL's full, -mid
        and -small, xinsir's union models, Stability's Control-LoRA, rebuilt here on the base's
        UNet); ``adapters``: T2I-Adapter files or folders (loading.load_adapter). One made for
        another family than the base's (an SD 1.5 ControlNet for SDXL, ...) is refused in one line
        naming both. ``taesd``: TAESD's decoder file (with its encoder file, as a list), or a
        diffusers ``AutoencoderTiny`` folder (loading.load_taesd), checked against the base."""
        dtype = parse_dtype(dtype, device)
        model = load_base(base, prediction=prediction, dtype=dtype)
        if taesd is not None:
            paths = [taesd] if isinstance(taesd, (str, os.PathLike)) else list(taesd)
            taesd = load_taesd(*paths, base=model.config, dtype=dtype)
        loaded = [load_controlnet(path, model.config, unet=model.unet, dtype=dtype) for path in controlnets]
        loaded_adapters = [load_adapter(path, model.config, dtype=dtype) for path in adapters]
        pipe = cls(
            model,
            loaded,
            device,
            dtype,
            low_memory,
            annotators_dir=annotators_dir,
            adapters=loaded_adapters,
            lora_dir=lora_dir,
            taesd=taesd,
        )
        pipe.files = {"controlnet": [Path(p) for p in controlnets], "adapter": [Path(p) for p in adapters]}
        return pipe

    @classmethod
    def default(
        cls, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None, low_memory: bool = False
    ) -> Pipeline:
        """The model used when no files are named: the shipped base model with every shipped
        ControlNet and T2I-Adapter, in the registry's order (shipped.py, docs/model-card.md). A unit
        picks one by index, or by name with `controlnet_index` / `adapter_index`::

            pipe = Pipeline.default()
            unit = ControlUnit(edges, controlnet=pipe.controlnet_index("canny"))
        """
        from . import shipped

        absent = shipped.missing()
        if absent:
            raise FileNotFoundError(f"the shipped model file {absent[0]} is missing: reinstall the package")
        controlnets, adapters = shipped.paths("controlnet"), shipped.paths("adapter")
        return cls.from_files(shipped.base_path(), controlnets, device, dtype, low_memory=low_memory, adapters=adapters)

    def controlnet_index(self, name: str) -> int:
        """The index of the shipped ControlNet called ``name`` (shipped.names(): "canny", ...)
        among this pipeline's, for a unit's ``controlnet``. ValueError, one line, for a name that
        is not shipped or a ControlNet this pipeline did not load."""
        return self._shipped_index(name, "controlnet")

    def adapter_index(self, name: str) -> int:
        """The index of the shipped T2I-Adapter called ``name`` among this pipeline's, for a unit's
        ``adapter``; ValueError as `controlnet_index`."""
        return self._shipped_index(name, "adapter")

    def _shipped_index(self, name: str, kind: str) -> int:
        from . import shipped

        index = shipped.find(name, kind, self.files[kind])
        if index is None:
            held = ", ".join(p.name for p in self.files[kind]) or "none from files"
            raise ValueError(f"this pipeline did not load the shipped {shipped.KINDS[kind]} {name!r} (it holds {held})")
        return index

    def compile(self) -> None:
        """``torch.compile`` the UNet and the ControlNets, for many generations at one size.

        Static shapes (a new image size compiles again) and, on a CPU, inductor's freezing: the
        weights become constants of the graph, prepacked for oneDNN (without it compiling gains
        nothing on a CPU). Freezing is asked for these modules only (torch.compile's options), not
        set process-wide. The first generation at a size takes a minute or two longer; later steps
        are about 10% faster (docs/benchmarks.md). Compiled graphs keep their own copy of the
        weights: more memory.
        """
        options = {"freezing": True} if self.device.type == "cpu" else None
        for module in (self.model.unet, *self.controlnets):
            module.compile(dynamic=False, options=options)
        self._compiled = True

    # -- LoRAs ---------------------------------------------------------------------------------

    def use_loras(self, prompt: str = "", loras: Sequence = ()) -> tuple[str, list[dict]]:
        """Merge the LoRAs a generation asks for, and return its prompt without its tags and the
        record of each LoRA (name, weight, short hash of its file).

        ``loras``: "FILE[:WEIGHT]" texts or (FILE, WEIGHT) pairs (settings.check_loras); then the
        prompt's ``<lora:NAME:WEIGHT>`` tags, found in ``lora_dir``. Files are read once and kept;
        the set stays merged across generations that ask for the same set (same files, weights and
        order), and a different set restores the weights exactly before merging (lora.py). Every
        file is read and checked before the model changes. Refused in low-memory mode: its parked
        and streamed weights are copied to the device per use, so a merge would have to follow
        every copy; and after `compile` (its frozen graphs keep the weights they were compiled
        with): merge first, as the command line does."""
        entries = [(Path(file), weight) for file, weight in check_loras(loras)]
        cleaned, tags = prompt_loras(prompt)
        if tags and self.lora_dir is None:
            raise ValueError(f"the prompt names LoRA {tags[0][0]!r} (<lora:...>) but no LoRA folder is set (lora_dir)")
        entries += [(find_lora(name, self.lora_dir), weight) for name, weight in tags]
        if entries and self.placement.low_memory:
            raise ValueError("LoRAs are not supported with low memory (its parked weights are copied per use)")
        loaded = [(self._read_lora(path), weight) for path, weight in entries]
        key = tuple((path.resolve(), weight) for path, weight in entries)
        if key != self._merged_key:
            if self._compiled:
                raise ValueError("the models were compiled with their weights frozen: choose LoRAs before compile()")
            if self._merged is not None:
                self._merged.restore()
            self._merged, self._merged_key = None, ()
            if loaded:
                self._merged = apply_loras(self.model, [(lora, weight) for (_, lora, _), weight in loaded])
            self._merged_key = key
        records = [{"name": lora.name, "weight": weight, "hash": digest} for (_, lora, digest), weight in loaded]
        return cleaned, records

    def _read_lora(self, path: Path) -> tuple[tuple[int, int], Lora, str]:
        """A LoRA file, read once (again if it changed since: its size or time)."""
        try:
            stat = path.stat()
        except OSError:
            raise ValueError(f"LoRA {path}: no such file") from None
        resolved, version = path.resolve(), (stat.st_mtime_ns, stat.st_size)
        cached = self._lora_files.get(resolved)
        if cached is None or cached[0] != version:
            cached = (version, load_lora(path), short_hash(file_sha256(path)))
            self._lora_files[resolved] = cached
        return cached

    @property
    def loras(self) -> tuple:
        """The LoRAs merged now, as (Lora, weight) pairs."""
        return () if self._merged is None else self._merged.loras

    # -- the steps of a generation, each small enough to read -----------------------------------

    def output_size(
        self,
        controls: Sequence[ControlUnit],
        resolution: int,
        init_image: np.ndarray | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> tuple[int, int]:
        """(height, width): the ``width`` x ``height`` named (a side not named is ``resolution``);
        else the init image's, else the first control image's, resized as the original app does
        (short side = resolution, each side rounded to a multiple of 64)."""
        if width is not None or height is not None:
            height, width = height or resolution, width or resolution
            check_output_size(width, height)
            return height, width
        reference = init_image if init_image is not None else controls[0].image if controls else None
        if reference is None:
            return resolution, resolution
        height, width = resize_image(HWC3(reference), resolution).shape[:2]
        return height, width

    def control_map(
        self,
        unit: ControlUnit,
        height: int,
        width: int,
        resolution: int,
        mask: np.ndarray | None,
        named_size: bool = False,
    ) -> np.ndarray:
        """The unit's control map at the output size.

        By default: fit the image, then run its annotator. An image whose ``resize_image`` size is
        the output size is resized exactly as the original app does (stretched to the 64-rounded
        size); others are fitted with the unit's resize mode.

        With ``named_size`` (the output's width and height named, whatever the images' shapes), as
        the AUTOMATIC1111 extension: the annotator runs on the image at the pixel-perfect resolution
        for the unit's resize mode, then its map is fitted to the output, so that the annotator
        never sees the crop or the padding. The inpaint hint, made pixel by pixel from the image and
        the mask, is made from both fitted (its masked pixels stay exactly -1).

        The inpaint annotator gets the generation's mask (fitted the same way) unless given its own.
        """
        image = HWC3(unit.image)
        how = get_annotator(unit.annotator).resize  # label images: nearest, never blended
        params = dict(unit.annotator_params)
        if unit.annotator == "inpaint" and "mask" not in params:
            if mask is None:
                raise ValueError("the inpaint annotator needs a mask: pass mask= to generate()")
            params["mask"] = fit_to(mask, width, height, unit.resize_mode, "nearest")
        elif unit.annotator == "inpaint" and named_size:  # its own mask, fitted as its image is
            params["mask"] = fit_to(_mask_uint8(params["mask"]), width, height, unit.resize_mode, "nearest")
        if named_size and unit.annotator not in ("none", "inpaint"):
            scale = max(pixel_perfect_resolution(image.shape[:2], width, height, unit.resize_mode), 64)
            image = run_annotator(
                unit.annotator, resize_image(image, scale, how), None, runtime=self.annotators, **params
            )
            return fit_to(image, width, height, unit.resize_mode, how)
        fitted = None if named_size else resize_image(image, resolution, how)
        if fitted is None or fitted.shape[:2] != (height, width):
            fitted = fit_to(image, width, height, unit.resize_mode, how)
        return run_annotator(unit.annotator, fitted, None, runtime=self.annotators, **params)

    def hint_tensor(self, control_map: np.ndarray) -> torch.Tensor:
        """[1, 3, H, W] in [0, 1] (inpaint maps keep their -1 for masked pixels)."""
        if control_map.dtype == np.uint8:
            hint = torch.from_numpy(control_map.copy()).float() / 255.0
        else:
            hint = torch.from_numpy(control_map.astype(np.float32))
        return hint.permute(2, 0, 1)[None].to(self.device, self.dtype)

    def adapter_input(self, control_map: np.ndarray, channels: int) -> torch.Tensor:
        """[1, channels, H, W] in [0, 1]: the control map as a T2I-Adapter reads it. A 1-channel
        adapter (sketch, canny) gets the map's BT.601 luma (cv2's ``RGB2GRAY``): on the grey maps
        the annotators make, exactly what diffusers' examples feed it (a PIL ``convert("L")`` image)
        and TencentARC's scripts (the first channel); on a coloured map PIL's luma differs by at most
        one level on about 0.1% of colours."""
        if channels == 1 and control_map.dtype == np.uint8:
            control_map = rgb_to_grey(control_map)[:, :, None]
        elif channels == 1:
            control_map = control_map[:, :, :1]
        hint = self.hint_tensor(control_map)
        if hint.shape[1] != channels:
            raise ValueError(f"this T2I-Adapter reads {channels}-channel images, the control map has {hint.shape[1]}")
        return hint

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """One generator per image, so image i depends only on seed + i, whatever the batch size."""
        factor = self.model.vae.downsample_factor
        shape = (1, self.model.config.unet.in_channels, height // factor, width // factor)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.cat(noise).to(self.device, SAMPLING_DTYPE)

    @torch.no_grad()
    def encode_init(self, image: np.ndarray, seeds: Sequence[int]) -> torch.Tensor:
        """img2img: the init image [H, W, 3] uint8 -> scaled latents, one VAE sample per image seed."""
        pixels = torch.from_numpy(image.copy()).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]
        posterior = self.model.vae.encode(pixels.to(self.device, self.dtype))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        latents = torch.cat([posterior.sample(generator=g) for g in generators])
        return latents.to(SAMPLING_DTYPE) * self.model.vae.scale_factor

    def latent_mask(self, mask: np.ndarray) -> torch.Tensor:
        """[1, 1, h, w] in [0, 1] (1 = repaint): the pixel mask averaged over each latent cell."""
        pixels = torch.from_numpy(mask[:, :, 0].astype(np.float32) / 255.0)[None, None]
        factor = self.model.vae.downsample_factor
        cells = torch.nn.functional.avg_pool2d(pixels, factor)
        return cells.to(self.device, SAMPLING_DTYPE)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decoder: str = "vae") -> np.ndarray:
        """Latents -> images [B, H, W, 3] float32 in [0, 1], by the VAE or by TAESD (whose latents
        are the diffusion model's as they are: no scale division)."""
        if decoder == "taesd":
            images = self.taesd.decode(latents.to(self.dtype))
        else:
            images = self.model.vae.decode((latents / self.model.vae.scale_factor).to(self.dtype))
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def _check_decoder(self, decoder: str) -> None:
        """decoder="taesd" needs a TAESD with its decoder (a model-dependent check, as a unit's
        ControlNet index; the setting itself is checked with the others)."""
        if decoder == "taesd" and (self.taesd is None or self.taesd.decoder is None):
            raise ValueError(
                "decoder taesd needs a TAESD decoder: load one (from_files(..., taesd=PATH), --taesd PATH)"
            )

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
        eta: float | None = None,
        sampler: str = "ddim",
        resolution: int | None = None,
        width: int | None = None,
        height: int | None = None,
        init_image: np.ndarray | None = None,
        denoising_strength: float = 0.75,
        mask: np.ndarray | None = None,
        latents: torch.Tensor | None = None,
        output: str = "uint8",
        progress: Callable[[int, int], None] | None = None,
        size_conditioning: SizeConditioning | None = None,
        loras: Sequence = (),
        decoder: str = "vae",
    ) -> GenerationResult:
        """Generate ``num_images`` images for ``prompt`` following ``controls``.

        The output's short side is ``resolution`` (default: the model's native size), its shape the
        init image's, else the first control image's, else square; or ``width`` x ``height`` when
        named (settings.OUTPUT_SIZE; a side not named is ``resolution``), every image fitted to it
        with its resize mode (`control_map`).

        img2img: ``init_image`` (RGB uint8) is encoded and noised to ``denoising_strength`` (the
        last ``int(steps * strength)`` steps run). Inpainting: also a ``mask`` (uint8 or bool,
        white/true = repaint): after every step the latents outside the mask are replaced by the
        init latents at the same noise level, and the decoded image keeps the init pixels there.

        ``guidance_scale`` at most 1 runs the conditional side alone (diffusers' rule): one UNet
        batch of ``num_images``, the negative prompt not encoded. ``eta``: DDIM's eta or TCD's gamma
        (None: the sampler's own, DDIM 0, TCD 0.3); the record keeps the value used.

        ``decoder``: "vae" (the model's VAE) or "taesd" (the pipeline's TAESD, much faster; img2img
        still encodes with the VAE).

        ``loras``: "FILE[:WEIGHT]" texts or (FILE, WEIGHT) pairs, merged with the prompt's
        ``<lora:NAME:WEIGHT>`` tags (found in ``lora_dir``) before anything is encoded
        (`use_loras`); the tags are not encoded, the record keeps the prompt as given and each
        LoRA's name, weight and hash.

        SDXL: ``size_conditioning`` (models/conditioning.py) sets the original size, the crop's
        top-left corner and the target size the model is told, on both sides of guidance; by default
        original = target = the output size, crop (0, 0). Models without it refuse it.
        """
        # Every setting, checked here once (settings.py), and later the PNG record's start.
        job = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "added_prompt": added_prompt,
            "seed": -1 if seed is None else seed,
            "num_images": num_images,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "eta": eta,
            "sampler": sampler,
            "resolution": resolution,
            "decoder": decoder,
        }
        self._check_arguments(job, controls, output, denoising_strength, init_image, mask)
        self._check_size_conditioning(size_conditioning)
        check_output_size(width, height)
        seed = random.randint(0, MAX_SEED) if seed is None or seed < 0 else seed
        seeds = [seed + i for i in range(num_images)]
        resolution = resolution or self.model.config.native_resolution
        named_size = width is not None or height is not None
        height, width = self.output_size(controls, resolution, init_image, width, height)
        self._check_decoder(decoder)
        prompt_text, lora_records = self.use_loras(prompt, loras)
        if lora_records:
            job["loras"] = lora_records
        init = None if init_image is None else fit_to(HWC3(init_image), width, height)
        mask = None if mask is None else fit_to(HWC3(_mask_uint8(mask)), width, height, interpolation="nearest")

        with self.placement.use(self.model.text_encoder):
            text = self.encode_text(
                full_prompt(prompt_text, added_prompt),
                negative_prompt if guidance_scale > 1 else None,
                height,
                width,
                size_conditioning,
            )
        control_maps = [self.control_map(unit, height, width, resolution, mask, named_size) for unit in controls]
        init_latents = None
        if init is not None:
            with self.placement.use(self.model.vae):
                init_latents = self.encode_init(init, seeds)

        plan = make_plan(sampler, self.model.config.schedule, steps, eta=eta)
        job["eta"] = (get_sampler(sampler).eta or 0.0) if eta is None else eta  # the one used
        if init_latents is not None:
            plan = plan.from_strength(denoising_strength)
        noise = self.initial_noise(seeds, height, width) if latents is None else latents
        noise = noise.to(self.device, SAMPLING_DTYPE)
        used = list(dict.fromkeys(self.adapters[u.adapter] for u in controls if u.adapter is not None))
        with self.placement.use(*used):  # once per generation
            adapters = [
                self.activate_adapter(u, m)
                for u, m in zip(controls, control_maps, strict=True)
                if u.adapter is not None
            ]
        with self.placement.use(self.model.unet, *self.controlnets):
            active = self.activate_controls(controls, control_maps)
            denoiser = GuidedDenoiser(
                self.model.unet,
                cond=text.cond.expand(num_images, -1, -1),
                uncond=None if text.uncond is None else text.uncond.expand(num_images, -1, -1),
                guidance_scale=guidance_scale,
                controls=active,
                timesteps=plan.timesteps,
                adapters=adapters,
                cond_y=None if text.cond_y is None else text.cond_y.expand(num_images, -1),
                uncond_y=None if text.uncond_y is None else text.uncond_y.expand(num_images, -1),
            )
            blend = None if mask is None else self.inpaint_blend(plan, mask, init_latents, noise)
            x = sample(
                denoiser,
                noise,
                plan,
                init=init_latents,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
                callback=progress,
                after_step=blend,
            )
        check_finite(x, f"the latents after sampling (UNet and ControlNets in {_dtype_name(self.dtype)})")
        decoding = self.taesd if decoder == "taesd" else self.model.vae
        with self.placement.use(decoding):
            images = self.decode(x, decoder)
        by = "TAESD" if decoder == "taesd" else "the VAE"
        check_finite(images, f"the images decoded by {by} (in {_dtype_name(self.dtype)})")
        images = _finish(images, init, mask, output)
        job |= {"seed": seed, "resolution": resolution, "width": int(width), "height": int(height)}
        if self.reads_vector:  # what SDXL was told about the picture's size
            ids = (size_conditioning or SizeConditioning()).time_ids(height, width)
            job["size_conditioning"] = {
                "original_size": list(ids[0:2]),
                "crop_top_left": list(ids[2:4]),
                "target_size": list(ids[4:6]),
            }
        record = self._record(job, controls, denoising_strength if init is not None else None, mask)
        return GenerationResult(list(images), control_maps, seeds, record)

    @property
    def reads_vector(self) -> bool:
        """Whether the base model reads SDXL's vector y (pooled text and size conditioning)."""
        return self.model.config.unet.adm_in_channels is not None

    @torch.no_grad()
    def encode_text(
        self, prompt: str, negative_prompt: str | None, height: int, width: int, size: SizeConditioning | None = None
    ) -> EncodedPrompts:
        """The prompt (with its added prompt) and the negative prompt encoded once, in the models'
        dtype; for SDXL with the vector y of each for a ``height`` x ``width`` output. A
        ``negative_prompt`` of None (no guidance) is not encoded: its side is None.

        SDXL's empty negative prompt is zeros (context and pooled), as diffusers' SDXL pipelines make
        it with ``force_zeros_for_empty_prompt``, their default and SDXL base's setting, rather than the
        encoding of the empty text (what SD 1.x/2.x use, and SDXL with a negative prompt)."""
        encoder = self.model.text_encoder
        if negative_prompt is None:
            if not self.reads_vector:
                return EncodedPrompts(encode_prompts(encoder, [prompt]).to(self.dtype), None)
            context, pooled = encode_prompts_pooled(encoder, [prompt])
            y = self.model.added_conditioning(pooled, height, width, size)
            return EncodedPrompts(context.to(self.dtype), None, y.to(self.dtype), None)
        if not self.reads_vector:
            context = encode_prompts(encoder, [prompt, negative_prompt]).to(self.dtype)
            return EncodedPrompts(context[0:1], context[1:2])
        if negative_prompt:
            context, pooled = encode_prompts_pooled(encoder, [prompt, negative_prompt])
        else:
            context, pooled = encode_prompts_pooled(encoder, [prompt])
            context, pooled = (
                torch.cat([context, torch.zeros_like(context)]),
                torch.cat([pooled, torch.zeros_like(pooled)]),
            )
        y = self.model.added_conditioning(pooled, height, width, size)
        context, y = context.to(self.dtype), y.to(self.dtype)
        return EncodedPrompts(context[0:1], context[1:2], y[0:1], y[1:2])

    def _check_size_conditioning(self, size: SizeConditioning | None) -> None:
        if size is None:
            return
        if not isinstance(size, SizeConditioning):
            raise ValueError(f"size_conditioning must be a SizeConditioning, got {type(size).__name__}")
        if not self.reads_vector:
            config = self.model.config
            raise ValueError(
                f"size conditioning is SDXL's; the base model {config.name} ({config.unet.family}) takes none"
            )

    def _record(self, job: dict, controls: Sequence[ControlUnit], denoising_strength, mask) -> dict:
        """The record a PNG carries (metadata.py): the job's settings and what the pipeline adds;
        the interfaces add what only they know (file hashes, the device, the served name)."""
        record = job | {
            "model": self.model.config.name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "img2img": denoising_strength is not None,
            "inpaint": mask is not None,
            "controls": [_unit_record(u, self.union_type(u)) for u in controls],
            "version": __version__,
        }
        if denoising_strength is not None:
            record["denoising_strength"] = denoising_strength
        if mask is not None:  # the share of the picture repainted
            record["inpaint_area"] = round(float((mask[:, :, 0] > 127).mean()), 4)
        return record

    def activate_controls(self, controls: Sequence[ControlUnit], control_maps: Sequence[np.ndarray]) -> list:
        """The ControlNet units ready for sampling (`ActiveControl`), their hints computed once.

        The units of one union ControlNet with the same window and mode (and no per-residual
        scales) become one: one network call with a condition per unit, weighted by the unit's
        strength, the residuals unscaled (`activate_union`)."""
        active: list[ActiveControl | tuple] = []
        groups: dict[tuple, list[tuple[ControlUnit, np.ndarray]]] = {}
        for unit, control_map in zip(controls, control_maps, strict=True):
            if unit.adapter is not None:
                continue
            if not self.is_union(unit.controlnet) or unit.scales is not None:
                active.append(self.activate(unit, control_map))
                continue
            key = (unit.controlnet, unit.start, unit.end, ControlMode.parse(unit.mode))
            if key not in groups:
                groups[key] = []
                active.append(key)  # its place among the units: residuals are summed in unit order
            groups[key].append((unit, control_map))
        return [self.activate_union(groups[a]) if isinstance(a, tuple) else a for a in active]

    def activate_union(self, members: Sequence[tuple[ControlUnit, np.ndarray]]) -> ActiveControl:
        """Union units sharing one network, window and mode, as one unit: one condition alone is
        diffusers' single-condition model (weight 1 inside, the unit's strength on the residuals);
        several are weighted inside the network by their strengths (diffusers' list of
        conditioning scales), the residuals unscaled. An inpaint map's masked pixels (-1) become
        black: ProMax's condition (models/controlnet_union.inpaint_condition)."""
        first = members[0][0]
        controlnet = self.controlnets[first.controlnet]
        alone = len(members) == 1
        conditions = [
            UnionCondition(
                self.hint_tensor(cmap).clamp(min=0.0), self.union_type(unit), 1.0 if alone else unit.strength
            )
            for unit, cmap in members
        ]
        return ActiveControl(
            controlnet=controlnet,
            hint_features=controlnet.encode_conditions(conditions),
            strength=first.strength if alone else 1.0,
            start=first.start,
            end=first.end,
            mode=ControlMode.parse(first.mode),
        )

    def is_union(self, controlnet: int) -> bool:
        """Whether the ControlNet of index ``controlnet`` is a union model (xinsir's)."""
        return isinstance(self.controlnets[controlnet], UnionControlNet)

    def union_type(self, unit: ControlUnit) -> str | None:
        """The union control type of a unit of a union ControlNet (`union_type_of`); None for any
        other unit."""
        if unit.adapter is not None or not self.is_union(unit.controlnet):
            return None
        return union_type_of(unit.control_type, unit.annotator, unit.controlnet)

    def activate(self, unit: ControlUnit, control_map: np.ndarray) -> ActiveControl:
        """The unit ready for sampling: its hint features computed once, here."""
        controlnet = self.controlnets[unit.controlnet]
        return ActiveControl(
            controlnet=controlnet,
            hint_features=controlnet.encode_hint(self.hint_tensor(control_map)),
            strength=unit.strength,
            start=unit.start,
            end=unit.end,
            mode=ControlMode.parse(unit.mode),
            scales=unit.scales,
        )

    def activate_adapter(self, unit: ControlUnit, control_map: np.ndarray) -> ActiveAdapter:
        """The adapter unit ready for sampling: its features, computed once here, times its strength."""
        adapter = self.adapters[unit.adapter]
        features = adapter(self.adapter_input(control_map, adapter.config.in_channels))
        return ActiveAdapter(scale_features(features, unit.strength), start=unit.start, end=unit.end)

    def inpaint_blend(
        self, plan: Plan, mask: np.ndarray, init_latents: torch.Tensor, noise: torch.Tensor
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """After each step, the latents outside the mask become the init image's at the noise
        level the step reached."""
        keep = 1.0 - self.latent_mask(mask)

        def blend(x: torch.Tensor, step: int) -> torch.Tensor:
            return x * (1.0 - keep) + plan.noise(init_latents, noise, step + 1) * keep

        return blend

    def _check_arguments(
        self, job: dict, controls: Sequence[ControlUnit], output: str, denoising_strength: float, init_image, mask
    ) -> None:
        """The settings as settings.py defines them, then what it does not know: the output kind,
        the units' ControlNet and adapter indices and scales, a mask without an init image."""
        check_prompts(job["prompt"], job["added_prompt"], job["negative_prompt"])
        check_generation(
            {name: job[name] for name in GENERATION if name in job} | {"denoising_strength": denoising_strength}
        )
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        if mask is not None and init_image is None:
            raise ValueError("a mask needs an init image to inpaint")
        for i, unit in enumerate(controls):
            names = ("strength", "start", "end", "mode", "resize_mode", "control_type")
            values = {name: getattr(unit, name) for name in names}
            # The model it names, as settings.check_unit reads it: an adapter unit whose controlnet
            # is not the default names both, which is refused.
            named = {"controlnet": unit.controlnet, "adapter": unit.adapter}
            if unit.adapter is not None and unit.controlnet == UNIT["controlnet"].default:
                del named["controlnet"]
            check_unit(values | named | {"annotator": unit.annotator}, f"control unit {i}")
            if unit.adapter is not None:
                self._check_adapter_unit(unit, f"control unit {i}")
            elif unit.controlnet >= len(self.controlnets):
                raise ValueError(
                    f"control unit {i}: ControlNet {unit.controlnet} does not exist ({len(self.controlnets)} loaded)"
                )
            else:
                self._check_union_type(unit, f"control unit {i}")
            if unit.scales is not None and not all(math.isfinite(scale) for scale in unit.scales):
                raise ValueError(f"control unit {i}: scales must be finite numbers, got {unit.scales}")

    def _check_adapter_unit(self, unit: ControlUnit, where: str) -> None:
        """What settings.check_unit cannot know: the adapter is loaded, and no per-residual scales."""
        if unit.adapter >= len(self.adapters):
            raise ValueError(f"{where}: T2I-Adapter {unit.adapter} does not exist ({len(self.adapters)} loaded)")
        if unit.scales is not None:
            raise ValueError(f"{where}: a T2I-Adapter unit takes no per-residual scales (its strength scales it)")

    def _check_union_type(self, unit: ControlUnit, where: str) -> None:
        """A union ControlNet's unit has a control type its model takes. Other units ignore theirs,
        as the AUTOMATIC1111 extension and ComfyUI do (an interface may set it for every unit: a
        pose drawn from JSON is an openpose map, whatever model reads it)."""
        if not self.is_union(unit.controlnet):
            return
        try:
            control_type_id(self.union_type(unit), self.controlnets[unit.controlnet].config.union.control_types)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def union_type_of(control_type: str, annotator: str, controlnet: int) -> str:
    """A union ControlNet unit's control type: its own (``control_type``), or with "auto" its
    annotator's (`UNION_TYPES`). ValueError, one line, when neither says one."""
    if control_type != AUTO_UNION_TYPE:
        return control_type
    if annotator not in UNION_TYPES:
        raise ValueError(
            f"ControlNet {controlnet} is a union model, and annotator {annotator!r} does not say which of its "
            "control types the map is: name the unit's control_type (openpose, depth, canny, ...)"
        )
    return UNION_TYPES[annotator]


def _unit_record(unit: ControlUnit, union_type: str | None = None) -> dict:
    """A unit's settings as the record keeps them: all but the image; an adapter unit's names its
    ``adapter`` and no ControlNet, a ControlNet unit's as before adapters existed; a union
    ControlNet unit's its control type as used (``union_type``), any other unit's none."""
    record = {k: v for k, v in dataclasses.asdict(unit).items() if k != "image"}
    del record["adapter" if record["adapter"] is None else "controlnet"]
    if union_type is None:
        del record["control_type"]
    else:
        record["control_type"] = union_type
    return record


def _finish(images: np.ndarray, init: np.ndarray | None, mask: np.ndarray | None, output: str) -> np.ndarray:
    """The decoded images [B, H, W, 3] in [0, 1] as returned: the init image's own pixels outside an
    inpainting mask, exactly; uint8 as the original makes it ((x * 127.5 + 127.5).clip(0, 255) then
    a truncating cast) unless floats were asked for."""
    if mask is not None:
        repaint = mask[:, :, :1].astype(np.float32) / 255.0
        images = images * repaint + (init.astype(np.float32) / 255.0) * (1.0 - repaint)
    return (images * 255.0).clip(0, 255).astype(np.uint8) if output == "uint8" else images


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mask_uint8(mask: np.ndarray) -> np.ndarray:
    """A mask as uint8 0/255 (H, W): bool, uint8 (> 127 = repaint) or float in [0, 1] (> 0.5)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[:, :, 0]
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask must be a non-empty (H, W) or (H, W, C) array, got shape {mask.shape}")
    threshold = 127 if mask.dtype == np.uint8 else 0.5
    return np.where(mask > threshold, 255, 0).astype(np.uint8)


def viewable_map(control_map: np.ndarray) -> np.ndarray:
    """A control map as a uint8 picture: the inpaint hint (float, -1 = masked) shows its masked
    pixels black."""
    if control_map.dtype == np.uint8:
        return control_map
    return (np.clip(control_map, 0.0, 1.0) * 255.0).round().astype(np.uint8)

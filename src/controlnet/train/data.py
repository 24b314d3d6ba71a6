"""The training data: its order, the randomness of each sample, the frozen parts' outputs
computed once (the cache), and the draws a diffusion objective's batch is made of."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..files import atomic_file
from ..sampling.prompts import encode_prompts
from .config import TrainingError

if TYPE_CHECKING:
    from ..models.stable_diffusion import StableDiffusion
    from .distributed import Distributed

# ---------------------------------------------------------------------------------------------
# The order of the data and the randomness of each sample


class DataStream:
    """Position ``p`` of the data stream is sample ``order(p // n)[p % n]``: every epoch a fresh
    permutation seeded by (seed, epoch). Optimizer step ``s`` consumes positions
    ``[s * G, (s + 1) * G)`` with ``G`` = batch size x processes x accumulation; micro-step ``m`` of
    process ``r`` takes ``B`` of them. The layout of processes does not change which samples a
    step sees, nor their random draws (``sample_generator``)."""

    def __init__(self, size: int, seed: int, batch_size: int, world_size: int, accumulation: int) -> None:
        self.size, self.seed = size, seed
        self.batch_size, self.world_size, self.accumulation = batch_size, world_size, accumulation
        self._epoch, self._order = -1, np.arange(0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._order

    def positions(self, step: int, micro: int, rank: int) -> range:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.batch_size
        return range(start, start + self.batch_size)

    def index(self, position: int) -> int:
        return int(self.order(position // self.size)[position % self.size])


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of every random draw of the sample at ``position``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % (2**63))


# ---------------------------------------------------------------------------------------------
# The frozen parts, computed once


class FrozenCache:
    """The VAE posterior (mean, std) of every training image and the text encoding of every distinct
    prompt (and of the empty prompt), kept in ``folder``. Valid for one dataset, resolution and set
    of frozen weights: a fingerprint of those names the files, so a change makes a new cache."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.path = folder / f"frozen-{fingerprint}.pt"
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.prompt_index: dict[str, int] = {}
        self.text: torch.Tensor | None = None

    def ready(self) -> bool:
        return self.path.exists()

    @torch.no_grad()
    def build(
        self,
        dataset,
        vae: nn.Module | None,
        text_encoder: nn.Module | None,
        batch_size: int,
        device: torch.device,
        report: Callable[[str], None],
    ) -> None:
        """Encode every sample (``vae``) and every distinct prompt (``text_encoder``); write atomically."""
        state: dict[str, object] = {}
        if vae is not None:
            means, stds = [], []
            started = time.perf_counter()
            for first in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
                images = torch.stack([item["image"] for item in items]).to(device)
                posterior = vae.encode(images)
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                if time.perf_counter() - started > 10:
                    report(f"caching latents: {first + len(items)}/{len(dataset)}")
                    started = time.perf_counter()
            state["mean"], state["std"] = torch.cat(means), torch.cat(stds)
        if text_encoder is not None:
            prompts = sorted({dataset.prompt(i) for i in range(len(dataset))} | {""})
            encoded = [
                encode_prompts(text_encoder, prompts[i : i + 64]).float().cpu() for i in range(0, len(prompts), 64)
            ]
            state["prompts"], state["text"] = prompts, torch.cat(encoded)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as handle:
            torch.save(state, handle)

    def load(self) -> None:
        state = torch.load(self.path, weights_only=True)
        self.mean, self.std = state.get("mean"), state.get("std")
        if "prompts" in state:
            self.prompt_index = {p: i for i, p in enumerate(state["prompts"])}
            self.text = state["text"]

    def latents(self, index: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean.shape[1:], generator=generator)
        return self.mean[index] + self.std[index] * noise

    def encoding(self, prompt: str) -> torch.Tensor:
        return self.text[self.prompt_index[prompt]]


def dataset_fingerprint(dataset, resolution: int, *weights: nn.Module | None) -> str:
    """A short hash of what the cache depends on: the samples, the resolution, the frozen weights."""
    digest = hashlib.sha256(f"{resolution}:{len(dataset)}".encode())
    digest.update(dataset.fingerprint().encode())
    for module in weights:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            values = tensor.detach()
            # The first 1024 values and the sum of magnitudes: no float32 copy of a whole model.
            digest.update(values.flatten()[:1024].float().cpu().numpy().tobytes())
            digest.update(str(float(values.abs().sum(dtype=torch.float64))).encode())
    return digest.hexdigest()[:16]


def load_training_data(folder: str, resolution: int, max_bad_fraction: float):
    """The dataset in ``folder`` (either layout, ``datasets.folders``) at ``resolution``;
    TrainingError naming what is wrong otherwise."""
    from ..datasets.folders import DatasetError, load_dataset

    try:
        return load_dataset(folder, resolution, max_bad_fraction=max_bad_fraction)
    except DatasetError as error:
        raise TrainingError(str(error)) from None


def prepare_cache(
    dataset,
    resolution: int,
    encoders: tuple[nn.Module, nn.Module | None] | None,
    folder: Path,
    dist: Distributed,
    log: Callable[[str], None],
) -> FrozenCache | None:
    """The cache of the frozen ``encoders`` (the VAE, and the text encoder or None) over
    ``dataset`` in ``folder``: built by the first process if it is not there yet, then loaded by
    every process; None without ``encoders``. Call it while the encoders are in float32 (before
    they are cast to a mixed-precision dtype)."""
    if encoders is None:
        return None
    vae, text = encoders
    fingerprint = dataset_fingerprint(dataset, resolution, vae, text)
    cache = FrozenCache(folder, fingerprint)
    if dist.is_main and not cache.ready():
        log(f"caching the frozen parts' outputs for {len(dataset)} samples in {cache.path}")
        vae.eval()
        cache.build(dataset, vae, text, 16, dist.device, log)
    dist.barrier()
    cache.load()
    return cache


# ---------------------------------------------------------------------------------------------
# The draws of a batch


def diffusion_batch(
    model: StableDiffusion,
    items: Sequence[dict],
    generators: Sequence[torch.Generator],
    proportion_empty_prompts: float,
    cache: FrozenCache | None,
) -> dict:
    """What the diffusion loss needs of ``items`` (samples of the data): for each, from its own
    generator and in this order, a timestep, the noise, whether its prompt is dropped and a sample
    of its VAE posterior (from the cache; without one, the posterior samples are drawn after all
    the rest); the latents scaled by the VAE's factor. The batch's ``prompts`` are the prompts
    kept (dropped ones empty)."""
    shape = latent_shape(model, items)
    timesteps, noises, latents, prompts = [], [], [], []
    for item, generator in zip(items, generators, strict=True):
        timesteps.append(int(torch.randint(0, model.config.schedule.num_timesteps, (1,), generator=generator)))
        noises.append(torch.randn(shape, generator=generator))
        drop = torch.rand((), generator=generator).item() < proportion_empty_prompts
        prompts.append("" if drop else item["prompt"])
        if cache is not None:
            latents.append(cache.latents(item["index"], generator))
    batch: dict = {"timesteps": torch.tensor(timesteps), "noise": torch.stack(noises), "prompts": prompts}
    if cache is None:
        with torch.no_grad():
            vae_weight = next(model.vae.parameters())
            images = torch.stack([item["image"] for item in items]).to(vae_weight.device, vae_weight.dtype)
            posterior = model.vae.encode(images)
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(vae_weight.device)
            batch["latents"] = posterior.mean.float() + posterior.std.float() * noise
    else:
        batch["latents"] = torch.stack(latents)
    batch["latents"] = batch["latents"] * model.vae.scale_factor
    return batch


def latent_shape(model: StableDiffusion, items: Sequence[dict]) -> tuple[int, int, int]:
    """(channels, height, width) of the latents of the samples' images."""
    height, width = items[0]["image"].shape[-2:]
    factor = model.vae.downsample_factor
    return model.config.unet.in_channels, height // factor, width // factor

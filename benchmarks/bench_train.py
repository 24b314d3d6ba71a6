"""One ControlNet training step, ours against diffusers' train_controlnet.py, on the same SD 1.5 weights.

Both sides train a ControlNet (initialised from the UNet's encoder, zero convolutions at zero) on a
frozen SD 1.5-size base with seeded random weights (``common.SEEDS``, as the other benchmarks), at
the same resolution, batch size and precision, on the same samples of a small synthetic fill50k
dataset, with the same optimiser (AdamW, lr 1e-5, weight decay 1e-2, gradient norm clipped at 1),
half of the prompts dropped. A step is everything a training loop does per batch: read and
preprocess the images, the frozen encoders (VAE, text), ControlNet + UNet forward and backward,
clipping, the optimiser step.

- diffusers: the loop body of ``examples/controlnet/train_controlnet.py`` (``DiffusersTraining``
  below, the script's calls in its order). accelerate is not installed, so what it adds is done
  here as it does it: under ``--mixed_precision bf16`` the VAE, UNet and text encoder are cast to
  bf16 and the ControlNet stays fp32 with its forward under ``torch.autocast("cpu", bf16)`` and its
  outputs cast back to fp32 (accelerate's ``prepare``). The images are read and preprocessed in the
  step, as its DataLoader does with ``--dataloader_num_workers 0`` (the default): Resize, CenterCrop,
  ToTensor, Normalize (torchvision is not installed: the same arithmetic with PIL and torch), and the
  captions are tokenized by transformers' CLIPTokenizer. Its data order and random draws (timesteps,
  noise, posterior samples, dropped prompts) are taken from ours (``DataStream``,
  ``sample_generator``; the same calls otherwise), so both sides see the same batches and their
  losses can be compared: the "loss 1" column (first step) agrees to bf16 rounding.
- ours: ``controlnet.train.Trainer`` built from a ``TrainConfig`` (the base written once as an
  LDM ``.safetensors`` file, the dataset as a fill50k folder), timed through ``Trainer.train_step()``,
  with ``cache=True`` (the default: VAE posteriors and text encodings computed once per dataset,
  before training; the time it takes is reported apart) and ``cache=False``.

``--dtypes bf16,fp32``: bf16 is ``mixed_precision="bf16"`` / ``--mixed_precision bf16``, fp32 is
``"no"``. Every variant runs in its own process (``common.Worker``), one after another (two
cores), so that its peak memory (VmHWM, reset before the last warm-up step) is its own; two such
processes do not fit in memory side by side. With ``--rounds 2`` (the default) every variant runs
twice, round after round, in a fresh process each time, and its figures pool both: the same step
differs by up to 10-15% from one process to the next (the optimiser's memory-bound step most).
Other processes on the two cores slow a step many times over: before each variant the benchmark
waits (up to ``--wait-quiet`` seconds) for the CPUs to be idle, and times again a step during
which others took 5% of the CPUs or more ("others %" and "retimed" in the table).

    python benchmarks/bench_train.py [--quick] [--resolution 256] [--batch-size 2] [--steps 3]
                                     [--warmup 2] [--rounds 2] [--dtypes bf16,fp32]
                                     [--variants diffusers,cache,no-cache] [--samples 16]
                                     [--wait-quiet 300] [--cache-dir DIR]

Defaults: 7-14 minutes on 2 cores (Zen 5 - Zen 4). ``--quick``: 128x128, batch 1, one round of 2
warm-up + 2 timed steps, bf16 only (a smoke run, 1-2 minutes once the base file exists). The random
base (SD 1.5 in fp32, 4.3 GB) and the dataset are written once into ``--cache-dir`` (default
~/.cache/controlnet-bench/train) and reused.

Figures (the defaults: 256x256, batch 2, 2 rounds of 2 warm-up + 3 timed steps; AMD EPYC Zen 4, 2 cores,
avx512_bf16, torch 2.13, diffusers 0.42.1; 14 minutes), median step, samples/s, x diffusers, peak GiB:

    diffusers train_controlnet.py, bf16   6.73 s  0.297  1.00   9.2   (data + frozen VAE/text 1.60 s)
    ours, cache on (default), bf16        4.13 s  0.485  1.63   8.8
    ours, cache off, bf16                 5.60 s  0.357  1.20   8.7
    diffusers train_controlnet.py, fp32  10.50 s  0.191  1.00  11.4   (data + frozen VAE/text 2.88 s)
    ours, cache on (default), fp32        6.84 s  0.292  1.53  10.6
    ours, cache off, fp32                10.30 s  0.194  1.02  10.2

The cache took 29 s for the 16 samples (1.8 s a sample) and pays back within 1-2.5 epochs, whatever
the dataset's size. Ours gains the frozen encoders diffusers runs every step (the cache), a fused
AdamW (0.5-0.7 -> 0.15-0.2 s), in bf16 the frozen base kept in bf16, and ``controlnet.models.kernels``
(oneDNN's matmul for fp32 linear layers, im2col + matmul for the 4x4 level's convolutions:
1.09-1.11x on the fp32 step, 1.03x on bf16). Without those kernels the same day gave 1.52x / 1.43x.
docs/training.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SEED = 0
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
PROPORTION_EMPTY_PROMPTS = 0.5
CONTENDED = 0.05  # a step is "contended" when other processes took this share of the CPUs
MIXED = {"bf16": "bf16", "fp32": "no"}  # --dtypes name -> mixed_precision
VARIANTS = {
    "diffusers": "diffusers train_controlnet.py",
    "cache": "ours, cache on (default)",
    "no-cache": "ours, cache off",
}


def default_cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "controlnet-bench" / "train"


# -- the shared inputs: a random SD 1.5 file and a dataset -----------------------------------------


def write_random_base(path: str) -> dict:
    """SD 1.5 (UNet, VAE, text encoder) with the benchmarks' seeded random weights, in fp32, as one
    LDM file (written under a temporary name and renamed)."""
    from controlnet.checkpoints import save_ldm
    from controlnet.config import SD15
    from controlnet.models.stable_diffusion import StableDiffusion

    model = StableDiffusion(SD15, empty=True)
    for name in ("unet", "vae", "text_encoder"):
        setattr(model, name, common._random(getattr(model, name), torch.float32, common.SEEDS[name]))
    final = Path(path)
    temporary = final.with_name(f".{final.stem}.tmp-{os.getpid()}.safetensors")
    save_ldm(temporary, model=model)
    os.replace(temporary, final)
    return {"bytes": final.stat().st_size}


class _Writer:
    """A worker whose only job is ``write_random_base`` (its memory goes with its process)."""

    def write(self, path: str) -> dict:
        return write_random_base(path)


def ensure_inputs(cache_dir: Path, resolution: int, samples: int) -> tuple[Path, Path]:
    """The base file and the dataset folder, made if absent."""
    from controlnet.datasets.synthetic import write_dataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    seeds = "-".join(str(common.SEEDS[n]) for n in ("unet", "vae", "text_encoder"))
    base = cache_dir / f"sd15-random-{seeds}-fp32.safetensors"
    if not base.exists():
        print(f"  writing the random SD 1.5 base to {base} (once)", flush=True)
        with common.Worker("writer", _Writer) as worker:
            _, seconds = common.timed(lambda: worker.call("write", str(base)))
        print(f"  written in {seconds:.0f} s", flush=True)
    data = cache_dir / f"fill50k-{resolution}-{samples}"
    if not (data / "prompt.json").exists():
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(data, "fill50k", samples, size=resolution, seed=SEED)
    return base, data


# -- the timing common to both sides ---------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU seconds all processes have run (not idle, not waiting), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_cpu_seconds() -> float:
    """This process's CPU seconds (all its threads), from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_until_quiet(limit_s: float, threshold: float = 0.1, window_s: float = 5.0) -> float:
    """Wait (up to ``limit_s``) until other processes use under ``threshold`` of the CPUs over
    ``window_s``; returns their share over the last window."""
    deadline = time.perf_counter() + limit_s
    while True:
        busy, ours = machine_cpu_seconds(), process_cpu_seconds()
        time.sleep(window_s)
        share = ((machine_cpu_seconds() - busy) - (process_cpu_seconds() - ours)) / (window_s * (os.cpu_count() or 1))
        if share < threshold or time.perf_counter() >= deadline:
            return share


class _Timed:
    """Step timing with the optimiser step timed apart (its pre/post hooks) and the batch (data and
    frozen encoders) timed by the subclass into ``self.batch_s``."""

    optimizer: torch.optim.Optimizer

    def _hook_optimizer(self) -> None:
        self.optimizer_s = 0.0
        self._optimizer_start = 0.0

        def before(*_: object) -> None:
            self._optimizer_start = time.perf_counter()

        def after(*_: object) -> None:
            self.optimizer_s += time.perf_counter() - self._optimizer_start

        self.optimizer.register_step_pre_hook(before)
        self.optimizer.register_step_post_hook(after)

    def run_step(self) -> float:
        raise NotImplementedError

    def timed_step(self) -> dict:
        """One step; ``others`` is the share of the machine's CPU time that other processes took
        meanwhile (0 on an idle machine; on two cores, anything else running slows a step many
        times over: OpenMP's threads wait on each other)."""
        self.batch_s = self.optimizer_s = 0.0
        busy, ours = machine_cpu_seconds(), process_cpu_seconds()
        start = time.perf_counter()
        loss = self.run_step()
        seconds = time.perf_counter() - start
        others = (machine_cpu_seconds() - busy) - (process_cpu_seconds() - ours)
        return {
            "s": seconds,
            "batch_s": self.batch_s,
            "optimizer_s": self.optimizer_s,
            "loss": loss,
            "others": max(0.0, others) / (seconds * (os.cpu_count() or 1)),
        }

    def warm_up(self, calls: int) -> list[dict]:
        """``calls`` steps before timing; the peak memory is reset before the last one. Two: the first
        allocates the optimiser's state (and diffusers' gradients, kept by ``zero_grad(set_to_none=
        False)``), the second grows the heap to a step's needs over them."""
        steps = [self.timed_step() for _ in range(calls - 1)]
        common.reset_peak_memory()
        return [*steps, self.timed_step()]


# -- ours ------------------------------------------------------------------------------------------


class OursTraining(_Timed):
    """Our ``Trainer`` as ``controlnet train`` builds it; the cache build (``FrozenCache.build``) and
    the dataset fingerprint are timed as they happen."""

    def __init__(self, base: str, data: str, out: str, resolution: int, batch_size: int, mixed: str, cache: bool):
        from controlnet import train
        from controlnet.train import data

        self.setup: dict[str, float] = {}
        for owner, name, key in (
            (data.FrozenCache, "build", "cache_build_s"),
            (data, "dataset_fingerprint", "fingerprint_s"),
        ):
            setattr(owner, name, self._timing(getattr(owner, name), key))
        config = train.TrainConfig(
            data=data,
            out=out,
            base=base,
            batch_size=batch_size,
            resolution=resolution,
            mixed_precision=mixed,
            cache=cache,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM,
            proportion_empty_prompts=PROPORTION_EMPTY_PROMPTS,
            seed=SEED,
            max_steps=10**6,
            progress=False,
        )
        self.trainer = train.Trainer(config, log=lambda message: None)
        self.optimizer = self.trainer.optimizer
        self._hook_optimizer()
        make_batch = self.trainer.batch

        def timed_batch(positions: range) -> dict:  # train_step calls self.batch(...)
            start = time.perf_counter()
            batch = make_batch(positions)
            self.batch_s += time.perf_counter() - start
            return batch

        self.trainer.batch = timed_batch
        self.batch_s = 0.0

    def _timing(self, function, key: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.setup[key] = self.setup.get(key, 0.0) + time.perf_counter() - start
            return result

        return timed

    def prepare(self, warmup: int) -> dict:
        return {"warmup": self.warm_up(warmup), "setup": self.setup, "samples": len(self.trainer.dataset)}

    def run_step(self) -> float:
        return self.trainer.train_step()


# -- diffusers' train_controlnet.py ----------------------------------------------------------------


def _fp32_outputs(value):
    """accelerate's ``convert_outputs_to_fp32``: half-precision tensors in the outputs to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, tuple | list):
        return type(value)(_fp32_outputs(v) for v in value)
    return value


def _autocast_forward(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """What ``accelerator.prepare(controlnet)`` does to the model's forward under mixed precision."""
    forward = module.forward

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            output = forward(*args, **kwargs)
        return _fp32_outputs(output)

    module.forward = wrapped


class DiffusersTraining(_Timed):
    """The set-up and loop body of diffusers' ``examples/controlnet/train_controlnet.py`` (defaults
    but for the learning rate and the proportion of empty prompts, set as ours)."""

    def __init__(self, base: str, data: str, resolution: int, batch_size: int, mixed: str) -> None:
        import diffusers
        import transformers  # noqa: F401  (imported before timing)
        from diffusers.optimization import get_scheduler

        # Its note that a model cast with .to() keeps no module in fp32 (there is none to keep).
        diffusers.utils.logging.set_verbosity_error()

        from controlnet.checkpoints import load_base
        from controlnet.models.controlnet import ControlNet
        from controlnet.train.data import DataStream

        # The very same initial weights as ours: Trainer seeds torch, loads the base and makes the
        # ControlNet from its UNet (the hint encoder's fresh initialisation comes from that seed);
        # diffusers' models then take those tensors through our key maps.
        torch.manual_seed(SEED)
        model = load_base(base)
        controlnet = ControlNet.from_unet(model.unet, model.config.controlnet())
        pipe = common.diffusers_pipeline(model, controlnet)
        del model, controlnet
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.unet, self.controlnet = pipe.unet, pipe.controlnet
        del pipe
        # SD 1.5's scheduler_config.json (what DDPMScheduler.from_pretrained reads).
        self.noise_scheduler = diffusers.DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            prediction_type="epsilon",
            clip_sample=False,
            steps_offset=1,
        )
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.controlnet.requires_grad_(True)
        self.controlnet.train()
        assert next(self.controlnet.parameters()).dtype == torch.float32
        self.optimizer = torch.optim.AdamW(
            self.controlnet.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8
        )
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.weight_dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
        if mixed == "bf16":  # accelerator.prepare(controlnet, ...)
            _autocast_forward(self.controlnet, torch.bfloat16)
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(dtype=self.weight_dtype)
        self._hook_optimizer()
        records = [json.loads(line) for line in (Path(data) / "prompt.json").read_text().splitlines() if line]
        self.records = [
            {"image": Path(data) / r["target"], "conditioning_image": Path(data) / r["source"], "text": r["prompt"]}
            for r in records
        ]
        self.resolution, self.batch_size = resolution, batch_size
        self.stream = DataStream(len(self.records), SEED, batch_size, 1, 1)
        self.step_index = 0
        self.batch_s = 0.0

    # make_train_dataset's transforms (torchvision's Resize(bilinear), CenterCrop, ToTensor, Normalize)
    def _to_tensor(self, path: Path) -> torch.Tensor:
        from PIL import Image

        image = Image.open(path).convert("RGB")
        scale = self.resolution / min(image.size)
        if image.size != (self.resolution, self.resolution):
            size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
            left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
            image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255.0)

    def prepare(self, warmup: int) -> dict:
        return {"warmup": self.warm_up(warmup), "setup": {}, "samples": len(self.records)}

    def run_step(self) -> float:
        from controlnet.train.data import sample_generator

        start = time.perf_counter()
        positions = self.stream.positions(self.step_index, 0, 0)
        examples = [self.records[self.stream.index(p)] for p in positions]
        # The draws of each sample, from our per-sample generators in our order (timestep, noise,
        # prompt drop, posterior sample): the script draws the same with randint / randn_like /
        # random.random / latent_dist.sample().
        generators = [sample_generator(SEED, p) for p in positions]
        latent_shape = (4, self.resolution // 8, self.resolution // 8)
        timesteps, noises, captions = [], [], []
        for example, generator in zip(examples, generators, strict=True):
            timesteps.append(int(torch.randint(0, 1000, (1,), generator=generator)))
            noises.append(torch.randn(latent_shape, generator=generator))
            drop = torch.rand((), generator=generator).item() < PROPORTION_EMPTY_PROMPTS
            captions.append("" if drop else example["text"])
        # preprocess_train + collate_fn
        pixel_values = torch.stack([self._to_tensor(e["image"]).sub(0.5).div(0.5) for e in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        conditioning_pixel_values = torch.stack([self._to_tensor(e["conditioning_image"]) for e in examples])
        conditioning_pixel_values = conditioning_pixel_values.to(memory_format=torch.contiguous_format).float()
        tokenizer = self.tokenizer
        input_ids = tokenizer(
            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids

        # The loop body.
        weight_dtype = self.weight_dtype
        latents = self.vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample(generator=generators)
        latents = latents * self.vae.config.scaling_factor
        noise = torch.stack(noises).to(latents.dtype)  # torch.randn_like(latents)
        timesteps = torch.tensor(timesteps).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(input_ids)[0]
        self.batch_s += time.perf_counter() - start
        controlnet_image = conditioning_pixel_values.to(dtype=weight_dtype)
        down_block_res_samples, mid_block_res_sample = self.controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_image,
            return_dict=False,
        )
        model_pred = self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=[sample.to(dtype=weight_dtype) for sample in down_block_res_samples],
            mid_block_additional_residual=mid_block_res_sample.to(dtype=weight_dtype),
        ).sample
        target = noise
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)  # args.set_grads_to_none defaults to False
        self.step_index += 1
        return loss.detach().item()


# -- the run ---------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128x128, batch 1, 1 warm-up + 2 steps, bf16 only")
    parser.add_argument("--resolution", type=int, help="image size (default 256; quick 128)")
    parser.add_argument("--batch-size", type=int, help="samples per step (default 2; quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps per variant and round (default 3; quick 2)")
    parser.add_argument("--warmup", type=int, help="steps before timing, in each process (default 2)")
    parser.add_argument("--rounds", type=int, help="processes per variant, one a round (default 2; quick 1)")
    parser.add_argument("--dtypes", help="bf16 and/or fp32 (default bf16,fp32; quick bf16)")
    parser.add_argument("--variants", default="diffusers,cache,no-cache", help="which of diffusers,cache,no-cache")
    parser.add_argument("--samples", type=int, help="dataset size (default 16; quick 4)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        help="before each variant, wait up to this many seconds for other processes to leave the CPUs idle "
        "(0: do not wait; default 300, quick 60)",
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="the base file and dataset")
    args = parser.parse_args(argv)
    quick = args.quick
    args.resolution = args.resolution or (128 if quick else 256)
    args.batch_size = args.batch_size or (1 if quick else 2)
    args.steps = args.steps or (2 if quick else 3)
    args.warmup = args.warmup or 2
    args.rounds = args.rounds or (1 if quick else 2)
    args.samples = args.samples or (4 if quick else 16)
    if args.wait_quiet is None:
        args.wait_quiet = 60 if quick else 300
    args.dtypes = [d.strip() for d in (args.dtypes or ("bf16" if quick else "bf16,fp32")).split(",") if d.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(d not in MIXED for d in args.dtypes) or any(v not in VARIANTS for v in args.variants):
        parser.error("--dtypes: bf16,fp32; --variants: diffusers,cache,no-cache")
    if args.resolution % 64 or args.resolution < 64:
        parser.error("--resolution must be a multiple of 64")
    if args.samples < args.batch_size:
        parser.error("--samples must be at least --batch-size")
    return args


def make_worker(variant: str, dtype: str, args, base: Path, data: Path, folder: Path) -> common.Worker:
    name = f"{variant} {dtype}"
    mixed = MIXED[dtype]
    if variant == "diffusers":
        return common.Worker(name, DiffusersTraining, str(base), str(data), args.resolution, args.batch_size, mixed)
    cache = variant == "cache"
    return common.Worker(
        name, OursTraining, str(base), str(data), str(folder), args.resolution, args.batch_size, mixed, cache
    )


def run_variant(variant: str, dtype: str, args, base: Path, data: Path, folder: Path) -> dict:
    """One process of ``variant``: build, warm up, time; ``folder`` is its fresh run folder (a
    cached variant builds its cache there)."""
    if args.wait_quiet:
        share = wait_until_quiet(args.wait_quiet)
        if share >= 0.1:
            print(f"  other processes still use {share:.0%} of the CPUs: timings will suffer", flush=True)
    worker, build_s = common.timed(lambda: make_worker(variant, dtype, args, base, data, folder))
    with worker:
        record: dict = {"build_s": build_s, "built": worker.built_memory}
        gib = worker.built_memory["rss"] / common.GiB
        print(f"  {variant} {dtype}: built in {build_s:.0f} s ({gib:.1f} GiB)", flush=True)
        info = worker.call("prepare", args.warmup)
        record.update(info)
        warm = " + ".join(f"{s['s']:.1f}" for s in info["warmup"])
        print(f"  {variant} {dtype}: warmed up ({warm} s), loss {info['warmup'][0]['loss']:.5f}", flush=True)
        # A step during which other processes took a share of the CPUs is timed again once they are
        # gone (up to --steps more times); if too few clean steps come, the contended ones count too.
        steps, contended = [], []
        while len(steps) < args.steps and len(contended) < args.steps:
            step = worker.call("timed_step")
            (steps if step["others"] < CONTENDED else contended).append(step)
            if step["others"] >= CONTENDED and args.wait_quiet:
                wait_until_quiet(args.wait_quiet)
        record["steps"] = steps if len(steps) >= max(1, args.steps // 2) else steps + contended
        record["contended"] = len(contended)
        shown = ", ".join(
            f"{s['s']:.2f}" + (" (busy machine)" if s["others"] >= CONTENDED else "") for s in steps + contended
        )
        print(f"  {variant} {dtype}: {shown} s", flush=True)
        record["memory"] = worker.call("memory")
    return record


def merge(records: list[dict]) -> dict:
    """A variant's processes (one a round) as one record: their timed steps together, the largest
    peak, the median set-up times; the first process's warm-up (the same first step in each)."""
    setup_keys = {k for r in records for k in r["setup"]}
    return {
        "steps": [s for r in records for s in r["steps"]],
        "contended": sum(r["contended"] for r in records),
        "memory": {"hwm": max(r["memory"]["hwm"] for r in records)},
        "build_s": common.median([r["build_s"] for r in records]),
        "setup": {k: common.median([r["setup"][k] for r in records if k in r["setup"]]) for k in setup_keys},
        "warmup": records[0]["warmup"],
        "samples": records[0]["samples"],
        "processes": len(records),
    }


def _median_s(record: dict) -> float:
    return common.median([s["s"] for s in record["steps"]])


def label(variant: str, dtype: str) -> str:
    return f"{VARIANTS[variant]}, {dtype}"


def report(args, results: dict, errors: dict) -> None:
    batch = args.batch_size
    print()
    print(
        f"== ControlNet training step, SD 1.5 size, {args.resolution}x{args.resolution}, batch {batch}, "
        f"{args.rounds} x ({args.warmup} warm-up + {args.steps} timed steps) =="
    )
    header = ["variant", "median s", "min s", "samples/s", "x diffusers", "data+frozen s", "optim s", "peak GiB"]
    header += ["start s", "loss 1", "others %", "retimed"]
    rows = []
    for dtype in args.dtypes:
        theirs = results.get(("diffusers", dtype))
        their_median = common.median([s["s"] for s in theirs["steps"]]) if theirs else None
        for variant in args.variants:
            record = results.get((variant, dtype))
            if record is None:
                failed = "failed" if (variant, dtype) in errors else "-"
                rows.append([label(variant, dtype), failed, *[""] * (len(header) - 2)])
                continue
            times = [s["s"] for s in record["steps"]]
            med = common.median(times)
            ratio = f"{their_median / med:.2f}" if their_median else "-"
            rows.append(
                [
                    label(variant, dtype),
                    f"{med:.2f}",
                    f"{min(times):.2f}",
                    f"{batch / med:.3f}",
                    ratio,
                    f"{common.median([s['batch_s'] for s in record['steps']]):.2f}",
                    f"{common.median([s['optimizer_s'] for s in record['steps']]):.2f}",
                    f"{record['memory']['hwm'] / common.GiB:.2f}",
                    f"{record['build_s']:.0f}",
                    f"{record['warmup'][0]['loss']:.5f}",
                    f"{100 * max(s['others'] for s in record['steps']):.0f}",
                    str(record["contended"]),
                ]
            )
    print(common.format_table(header, rows))
    for dtype in args.dtypes:
        cached, uncached = results.get(("cache", dtype)), results.get(("no-cache", dtype))
        if not cached:
            continue
        setup = cached["setup"]
        build = setup.get("cache_build_s", float("nan"))
        line = (
            f"  cache, {dtype}: built once in {build:.1f} s for {cached['samples']} samples "
            f"({build / cached['samples']:.2f} s a sample; fingerprint {setup.get('fingerprint_s', 0.0):.1f} s), "
            "in 'start s'"
        )
        if uncached:
            saved = _median_s(uncached) - _median_s(cached)
            if saved > 0:
                steps = build / saved
                line += (
                    f"; saves {saved:.2f} s a step: paid back after {steps:.1f} steps "
                    f"({steps * batch / cached['samples']:.2f} epochs, whatever the dataset's size)"
                )
            else:
                line += f"; saves nothing per step here ({saved:+.2f} s)"
        print(line)
    print()
    print(
        textwrap.fill(
            " ".join(
                [
                    "median s, min s: one optimiser step (data, frozen encoders, forward, backward, clipping, AdamW).",
                    "samples/s: batch / median.",
                    "x diffusers: its median over this row's (above 1: ours faster), same precision.",
                    "data+frozen s: reading and preprocessing the batch and the frozen VAE and text encoder",
                    "(ours: Trainer.batch; with the cache, a look-up).",
                    "optim s: AdamW's step. peak GiB: the process's VmHWM over the last warm-up step and the timed",
                    "steps. start s: the process's set-up (loading, converting; ours cached: the cache build too).",
                    "loss 1: the first step's loss (same batch, same draws, same weights on both sides).",
                    "Each variant ran alone in its own process(es), one after another;",
                    "with several rounds, the figures pool its processes (peak: the largest).",
                    "others %: the largest share of the CPUs that other processes took during a counted step;",
                    f"retimed: steps timed again because others took {100 * CONTENDED:.0f}% or more.",
                ]
            ),
            width=110,
        )
    )
    for (variant, dtype), message in errors.items():
        print(f"\n{variant} {dtype} failed:\n{message}")


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    started = time.perf_counter()
    print(f"bench_train: {common.cpu_line()}; {common.machine_line()}")
    print(
        f"resolution {args.resolution}, batch {args.batch_size}, dtypes {','.join(args.dtypes)}, "
        f"variants {','.join(args.variants)}, {args.rounds} round(s) of {args.warmup} warm-up + {args.steps} "
        f"timed steps, {args.samples} samples"
    )
    base, data = ensure_inputs(args.cache_dir, args.resolution, args.samples)
    results: dict = {}
    errors: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=args.cache_dir) as out:
        for round_index in range(args.rounds):
            if args.rounds > 1:
                print(f"  round {round_index + 1} of {args.rounds}", flush=True)
            for dtype in args.dtypes:
                for variant in args.variants:
                    if (variant, dtype) in errors:
                        continue
                    folder = Path(out) / f"{variant}-{dtype}-{round_index}"
                    try:
                        record = run_variant(variant, dtype, args, base, data, folder)
                    except common.WorkerError as error:
                        errors[variant, dtype] = str(error)
                        print(f"  {variant} {dtype} failed: {str(error).splitlines()[0]}", flush=True)
                        continue
                    results.setdefault((variant, dtype), []).append(record)
    merged = {key: merge(records) for key, records in results.items() if (key not in errors)}
    report(args, merged, errors)
    print(f"\n{common.machine_line()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

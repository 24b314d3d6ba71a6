"""The run: ``Trainer`` and ``train``."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoints import load_base, load_controlnet, save_ldm
from ..config import ModelConfig
from ..files import NotWritable, atomic_file, writable_folder
from ..models.controlnet import ControlNet
from ..models.stable_diffusion import StableDiffusion
from ..runtime import NonFiniteError
from ..sampling.prompts import encode_prompts
from .checkpoints import (
    checkpoint_dirs,
    find_resume_point,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from .config import VALIDATION_ROWS, TrainConfig, TrainingError
from .data import DataStream, FrozenCache, dataset_fingerprint, sample_generator
from .distributed import init_distributed, is_sharded, shard_controlnet_objective, shard_like, whole
from .objectives import BaseObjective, ControlNetObjective, Objective, VAEObjective
from .optim import EMA, all_finite, gradient_norm, lr_multiplier, set_gradient_checkpointing

# ---------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run: build everything from the config, then ``run()``."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print) -> None:
        config.check()
        self.config = config
        self.out = Path(config.out)
        try:  # before anything slow: a typo in --out costs no waiting
            writable_folder(self.out, "--out")
        except NotWritable as error:
            raise TrainingError(str(error)) from None
        self.dist = init_distributed(config.device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda message: None)
        torch.manual_seed(config.seed)
        self.model, self.objective = self._build_models()
        self.resolution = config.resolution or self.model.config.native_resolution
        self.dataset = self._load_dataset()
        self.stream = DataStream(
            len(self.dataset), config.seed, config.batch_size, self.dist.world_size, config.gradient_accumulation
        )
        self.objective.to(self.device)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(self.objective, True)
        self.fsdp = self.dist.world_size > 1 and config.strategy == "fsdp"
        if self.fsdp:
            shard_controlnet_objective(self.objective)
        # fused: one kernel over all the tensors instead of a loop over ~340 of them (3x faster here)
        self.optimizer = torch.optim.AdamW(
            self.objective.parameter_groups(config), weight_decay=config.weight_decay, betas=(0.9, 0.999), fused=True
        )
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema = EMA(self.trainable, config.ema_decay) if config.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.engine: nn.Module = self.objective
        if self.dist.world_size > 1 and not self.fsdp:
            self.engine = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.cache = self._prepare_cache()  # in float32, before the frozen parts are cast
        self._cast_frozen()
        self.step = 0
        self.metrics_path = self.out / "metrics.csv"
        self._stop = False
        self._base_validation_images: list | None = None
        self.tensorboard = self._tensorboard()

    def _tensorboard(self):
        """A TensorBoard writer in ``<out>/tensorboard`` when the tensorboard package is installed
        (``pip install tensorboard``); the CSV logs and PNG curves are written either way."""
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard is not installed: logging to metrics.csv and PNG curves only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- building ------------------------------------------------------------------------------

    def _build_models(self) -> tuple[StableDiffusion, Objective]:
        config = self.config
        if config.task == "controlnet":
            model = load_base(config.base)
            if config.controlnet:
                controlnet = load_controlnet(config.controlnet, model.config)
            else:
                controlnet = ControlNet.from_unet(model.unet, model.config.controlnet())
                if config.control_init == "gaussian":
                    controlnet.gaussian_init_(torch.Generator().manual_seed(config.seed))
            return model, ControlNetObjective(model.float(), controlnet.float(), config)
        from ..config import preset

        try:
            model_config: ModelConfig = preset(config.model_config)
        except (KeyError, ValueError) as error:
            raise TrainingError(f"--model-config: {error}") from None
        if config.task == "vae":
            model = StableDiffusion(model_config)
            return model, VAEObjective(model, config)
        trained = load_base(config.base)  # the VAE's file (a model saved by the vae task)
        scale = trained.config.vae.scale_factor  # calibrated by the vae task
        if dataclasses.replace(trained.config.vae, scale_factor=scale) != dataclasses.replace(
            model_config.vae, scale_factor=scale
        ):
            raise TrainingError(f"{config.base}: its VAE is not the one of --model-config {config.model_config}")
        model = StableDiffusion(model_config.replace(vae=trained.config.vae))
        model.vae.load_state_dict(trained.vae.state_dict())
        return model, BaseObjective(model, config)

    def _load_dataset(self):
        from ..datasets.folders import DatasetError, load_dataset

        try:
            return load_dataset(self.config.data, self.resolution, max_bad_fraction=self.config.max_bad_fraction)
        except DatasetError as error:
            raise TrainingError(str(error)) from None

    def _cast_frozen(self) -> None:
        """Under mixed precision, the frozen parts of the controlnet task live in the autocast dtype
        (as diffusers' script keeps them): autocast would otherwise cast their float32 weights again
        at every use (frozen weights are not in its cache), and they take half the memory. An
        unlocked decoder keeps the UNet in float32 (its master weights)."""
        if self.config.task != "controlnet" or self.config.mixed_precision == "no":
            return
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        frozen = [self.model.vae, self.model.text_encoder]
        if not self.config.unlock_decoder:
            frozen.append(self.model.unet)
        for module in frozen:
            module.to(dtype)

    def _prepare_cache(self) -> FrozenCache | None:
        config = self.config
        if not config.cache or config.task == "vae":
            return None
        vae = self.model.vae
        text = self.model.text_encoder if config.task == "controlnet" else None
        fingerprint = dataset_fingerprint(self.dataset, self.resolution, vae, text)
        cache = FrozenCache(self.out / "cache", fingerprint)
        if self.dist.is_main and not cache.ready():
            self.log(f"caching the frozen parts' outputs for {len(self.dataset)} samples in {cache.path}")
            vae.eval()
            cache.build(self.dataset, vae, text, 16, self.device, self.log)
        self.dist.barrier()
        cache.load()
        return cache

    # -- batches -------------------------------------------------------------------------------

    def batch(self, positions: range) -> dict:
        """The samples at ``positions`` of the data stream, with their random draws."""
        config, model = self.config, self.model
        items, generators = [], []
        for position in positions:
            items.append(self.dataset[self.stream.index(position)])
            generators.append(sample_generator(config.seed, position))
        factor = model.vae.downsample_factor
        latent_shape = (model.config.unet.in_channels, self.resolution // factor, self.resolution // factor)
        batch: dict = {}
        if config.task == "vae":
            batch["image"] = torch.stack([item["image"] for item in items])
            batch["posterior_noise"] = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
            return self._to_device(batch)
        timesteps, noises, latents, prompts = [], [], [], []
        for item, generator in zip(items, generators, strict=True):
            timesteps.append(int(torch.randint(0, model.config.schedule.num_timesteps, (1,), generator=generator)))
            noises.append(torch.randn(latent_shape, generator=generator))
            drop = torch.rand((), generator=generator).item() < config.proportion_empty_prompts
            prompts.append("" if drop else item["prompt"])
            if self.cache is not None:
                latents.append(self.cache.latents(item["index"], generator))
        batch["timesteps"] = torch.tensor(timesteps)
        batch["noise"] = torch.stack(noises)
        batch["prompts"] = prompts
        if self.cache is None:
            with torch.no_grad():
                vae_dtype = next(model.vae.parameters()).dtype
                images = torch.stack([item["image"] for item in items]).to(self.device, vae_dtype)
                posterior = model.vae.encode(images)
                noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device)
                batch["latents"] = posterior.mean.float() + posterior.std.float() * noise
        else:
            batch["latents"] = torch.stack(latents)
        batch["latents"] = batch["latents"] * model.vae.scale_factor
        if config.task == "controlnet":
            batch["hint"] = torch.stack([item["hint"] for item in items])
            if self.cache is not None:
                batch["context"] = torch.stack([self.cache.encoding(p) for p in prompts])
            else:
                with torch.no_grad():
                    batch["context"] = encode_prompts(model.text_encoder, prompts).float()
        else:
            batch["tokens"] = model.text_encoder.tokenize(prompts)
        return self._to_device(batch)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _autocast(self):
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one optimizer step --------------------------------------------------------------------

    def train_step(self) -> float:
        """Accumulate the gradients of this step's micro-batches, clip, update; the mean loss."""
        config = self.config
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * lr_multiplier(self.step, config)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.gradient_accumulation):
            batch = self.batch(self.stream.positions(self.step, micro, self.dist.rank))
            last = micro == config.gradient_accumulation - 1
            sync = contextlib.nullcontext()
            if self.fsdp:  # reduce-scatter the gradients on the last micro-step only
                self.objective.set_requires_gradient_sync(last)
            elif not last and self.dist.world_size > 1:
                sync = self.engine.no_sync()
            with sync:
                with self._autocast():
                    loss = self.engine(batch) / config.gradient_accumulation
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.item()
        # The loss and the gradients are checked before the update, so that the weights stay those
        # of the last good step. Every process reaches the same verdict (the loss is averaged over
        # them, the gradient norm is global, and ``any`` combines them): all stop at the same step.
        mean = self.dist.mean(total)
        if not math.isfinite(mean):
            raise self._diverged(f"the loss is {mean}")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # The norm clipping computes anyway, so the check costs no extra pass over the gradients.
        if config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        else:
            norm = gradient_norm(self.trainable)
        if is_sharded(norm):
            norm = norm.full_tensor()
        norm = float(norm)
        # fp16's scaler skips a step whose gradients overflowed (and lowers its scale): expected there.
        if self.scaler is None and self.dist.any(not math.isfinite(norm)):
            raise self._diverged(f"the gradient norm is {norm} (the loss was {mean:.4g})")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # The weights are not checked here: a pass over them costs about 0.5 s a step at SD 1.5's
        # size. AdamW's step from finite gradients with a learning rate <= 1 is finite; should a
        # weight still become NaN, the next step's loss shows it, and every checkpoint and export
        # checks the weights before writing them.
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return mean

    def _diverged(self, what: str) -> TrainingError:
        """The one-line error that stops a run whose numbers stopped being finite: the step, what
        went wrong, the likely causes, and what is left to resume from."""
        config = self.config
        causes = [f"the learning rate (--learning-rate {config.learning_rate:g}) is too high"]
        if config.mixed_precision != "no":
            causes.append(f"--mixed-precision {config.mixed_precision} overflowed (try --mixed-precision no)")
        saved = checkpoint_dirs(self.out)
        kept = f"the newest checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        return TrainingError(
            f"step {self.step + 1}: {what}: training diverged; likely {' or '.join(causes)}. "
            f"Stopped without saving anything of this step; {kept}"
        )

    # -- state ---------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole, on the CPU (a collective under FSDP: all processes call it)."""
        return {name: whole(p) for name, p in self.objective.named_parameters() if p.requires_grad}

    def state(self) -> dict:
        """Everything a resumed run needs (a collective under FSDP; whole on the first process)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optimizer = get_optimizer_state_dict(self.objective, self.optimizer, options=options)
        else:
            optimizer = self.optimizer.state_dict()
        ema = None
        if self.ema is not None:
            ema = {"decay": self.ema.decay, "shadow": [whole(t) for t in self.ema.shadow]}
        return {
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "trainable": self.trainable_state(),
            "optimizer": optimizer,
            "ema": ema,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(),
        }

    def load_state(self, folder: Path, state: dict | None = None) -> None:
        """Continue from the checkpoint in ``folder`` (``state``: its contents, when already read
        by ``read_checkpoint``)."""
        if state is None:
            state = read_checkpoint(folder)
        parameters = {name: p for name, p in self.objective.named_parameters() if p.requires_grad}
        missing = set(parameters) - set(state["trainable"])
        if missing:
            raise TrainingError(
                f"{folder}: the checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
            )
        for name, parameter in parameters.items():  # a checkpoint of another model (another --base)
            saved = tuple(state["trainable"][name].shape)
            if saved != tuple(parameter.shape):  # a sharded parameter's shape is the whole one
                raise TrainingError(
                    f"{folder}: the checkpoint's {name} is {list(saved)}, this run's {list(parameter.shape)}: "
                    "it was trained for another model"
                )
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(shard_like(state["trainable"][name], parameter))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.objective, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.shadow = [
                shard_like(t, p).float() for t, p in zip(state["ema"]["shadow"], self.ema.parameters, strict=True)
            ]
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> Path | None:
        state = self.state()  # every process takes part in gathering it
        path, error = None, None
        if self.dist.is_main:
            try:
                path = save_checkpoint(self.out, self.step, state, self.config.keep_checkpoints)
                self.log(f"checkpoint: {path}")
            except TrainingError as failure:  # disk full: the others must not wait for it forever
                error = failure
        if self.dist.any(error is not None):  # also the barrier: the checkpoint is complete for all
            raise error or TrainingError(f"step {self.step}: the main process could not write the checkpoint")
        return path

    # -- logging -------------------------------------------------------------------------------

    def _record(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        new = not self.metrics_path.exists()
        with open(self.metrics_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _request_stop(self, signum, frame) -> None:
        if self._stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True
        self.log("stopping: the checkpoint is written after this step (press Ctrl-C again to abort)")

    # -- validation ----------------------------------------------------------------------------

    def validation_samples(self) -> list[dict]:
        """The first ``validation_count`` samples of the data: fixed prompts and control images."""
        count = min(self.config.validation_count, len(self.dataset))
        return [self.dataset[i] for i in range(count)]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Generate from the validation samples with fixed seeds; write a grid, log the scores and
        redraw the curves. Runs on the main process only (the others wait)."""
        scores: dict[str, float] = {}
        error: TrainingError | None = None
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            trainable = self.trainable_state()  # every process takes part in gathering it
        if self.dist.is_main:
            try:
                scores = self._validate_on_main(trainable)
            except (NonFiniteError, OSError) as failure:  # NaN images, or a disk full
                reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else failure
                error = TrainingError(f"validation at step {self.step}: {reason}")
        self.objective.train()
        self.model.vae.eval()
        self._cast_frozen()  # the validation pipeline ran the base in float32
        if self.dist.any(error is not None):  # also the barrier: the others wait for the main process
            raise error or TrainingError(f"validation at step {self.step} failed on the main process")
        return scores

    def _validate_on_main(self, trainable: dict[str, torch.Tensor]) -> dict[str, float]:
        scores, grid = self._validation_images(trainable)
        folder = self.out / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / f"step-{self.step:08d}.png") as handle:
            grid.save(handle, format="PNG")
        if self.tensorboard is not None:
            for name, value in scores.items():
                self.tensorboard.add_scalar(f"validation/{name}", value, self.step)
            self.tensorboard.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
        self._record_validation({"step": self.step, **{k: f"{v:.4f}" for k, v in scores.items()}})
        self.draw_curves()
        self.log(f"validation at step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores

    def _validation_images(self, trainable: dict[str, torch.Tensor]):
        from ..evaluation import edge_f1
        from ..imaging.charts import image_grid
        from ..pipeline import ControlUnit, Pipeline

        samples = self.validation_samples()
        hints = [(item["hint"].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for item in samples]
        targets = [((item["image"].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy() for item in samples]
        task = self.config.task
        if task == "vae":
            images = torch.stack([item["image"] for item in samples]).to(self.device)
            decoded = self.model.vae(images).float()
            rebuilt = [((x.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().cpu().numpy() for x in decoded]
            error = float(
                np.mean([np.abs(a.astype(float) - b).mean() / 255 for a, b in zip(rebuilt, targets, strict=True)])
            )
            return {"reconstruction_l1": error}, image_grid([targets, rebuilt], ["data", "VAE"])
        controlnets = [self.objective.plain_controlnet(trainable)] if task == "controlnet" else []
        pipe = Pipeline(self.model, controlnets, device=self.device, dtype=torch.float32, channels_last=False)
        rows, labels, f1s, f1s_empty = [hints, targets], list(VALIDATION_ROWS[:2]), [], []
        prompts = [item["prompt"] for item in samples]
        for label, use_prompt in ((VALIDATION_ROWS[2], True), (VALIDATION_ROWS[3], False)):
            row = []
            for i, (hint, prompt) in enumerate(zip(hints, prompts, strict=True)):
                units = [ControlUnit(hint)] if controlnets else []
                text = prompt if use_prompt else ""
                result = pipe.generate(
                    text,
                    units,
                    seed=i,
                    steps=self.config.validation_steps,
                    guidance_scale=7.5 if use_prompt else 1.0,
                    resolution=self.resolution,
                )
                row.append(result.images[0])
                if controlnets:
                    (f1s if use_prompt else f1s_empty).append(edge_f1(result.images[0], hint).f1)
            rows.append(row)
            labels.append(label)
            if not controlnets:
                break  # a base model without a prompt says little
        scores = {"edge_f1": float(np.mean(f1s)), "edge_f1_no_prompt": float(np.mean(f1s_empty))} if f1s else {}
        if controlnets:  # how far the control moves the locked model's images (0 at step 0 with zero convs)
            base_images = self._base_images(pipe, prompts)
            scores["base_distance"] = float(
                np.mean([_pixel_l1(a, b) for a, b in zip(rows[2], base_images, strict=True)])
            )
        if not controlnets:  # how far the base's images are from their data image (colours mostly)
            scores["pixel_l1"] = float(np.mean([_pixel_l1(a, b) for a, b in zip(rows[2], targets, strict=True)]))
        return scores, image_grid(rows, labels)

    def _base_images(self, pipe, prompts: list[str]) -> list:
        """The frozen base's images for the validation prompts and seeds, without control (made once)."""
        if self._base_validation_images is None:
            self._base_validation_images = [
                pipe.generate(
                    prompt,
                    [],
                    seed=i,
                    steps=self.config.validation_steps,
                    guidance_scale=7.5,  # as the validation's "prompt" row
                    resolution=self.resolution,
                ).images[0]
                for i, prompt in enumerate(prompts)
            ]
        return self._base_validation_images

    def _record_validation(self, row: dict) -> None:
        path = self.out / "validation.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def draw_curves(self) -> None:
        """loss.png (training loss) and validation.png (the validation scores) from the CSV logs."""
        from ..imaging.charts import line_chart

        losses = _read_csv(self.metrics_path)
        if losses:
            points = [(float(r["step"]), float(r["loss"])) for r in losses]
            line_chart(self.out / "loss.png", {"training loss": points}, "training loss", "step", "loss", log_y=True)
        scores = _read_csv(self.out / "validation.csv")
        if scores:
            names = [k for k in scores[0] if k != "step"]
            series = {name: [(float(r["step"]), float(r[name])) for r in scores if r.get(name)] for name in names}
            line_chart(self.out / "validation.png", series, "validation", "step", "score")

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> list[Path]:
        """Train to ``max_steps`` (resuming if asked), checkpointing and validating on the way; export."""
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        found = find_resume_point(self.out, config.resume, self.log)
        if found is not None:
            resume, state, damaged = found
            self.load_state(resume, state)
            del state
            self.log(f"resumed from {resume} at step {self.step}")
            self.dist.barrier()  # every process has read its checkpoint before any folder moves
            if self.dist.is_main:
                for folder in damaged:  # kept for inspection, no longer taken for a checkpoint
                    self.log(f"the damaged checkpoint {folder.name} is kept as {set_aside(folder)}")
            if self.dist.is_main:  # the steps after the checkpoint are trained again: log them once
                for path in (self.metrics_path, self.out / "validation.csv"):
                    _truncate_csv(path, self.step)
        elif self.dist.is_main:
            with atomic_file(self.out / "config.json", "w", encoding="utf-8") as handle:
                handle.write(config.to_json() + "\n")
            self.metrics_path.unlink(missing_ok=True)
        previous = signal.signal(signal.SIGINT, self._request_stop) if self._main_thread() else None
        try:
            self._loop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self._stop:
            self.save()
            self.log(f"stopped at step {self.step}; continue with --resume latest")
            return []
        if self.step % config.checkpoint_every:
            self.save()
        if not config.validate_every or self.step % config.validate_every:
            self.validate()
        paths = []
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            trainable = self.trainable_state()
            if self.dist.is_main and isinstance(self.objective, VAEObjective):
                count = min(len(self.dataset), 256)
                images = [
                    torch.stack([self.dataset[i]["image"] for i in range(j, min(j + 16, count))]).to(self.device)
                    for j in range(0, count, 16)
                ]
                factor = self.objective.calibrate(images)
                self.log(f"VAE latent scale factor: {factor} (1 / std of the latents of {count} images)")
        if not all_finite(trainable.values()):  # whole on every process: they all stop here
            raise TrainingError(f"step {self.step}: the weights to export are not all finite; nothing exported")
        if self.dist.is_main:
            paths = self.objective.export(self.out, trainable)
            for path in paths:
                self.log(f"exported: {path}")
        self.dist.barrier()
        return paths

    @staticmethod
    def _main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()

    def _loop(self) -> None:
        config = self.config
        started, first_step = time.perf_counter(), self.step
        window: list[float] = []
        if config.validate_every and self.step == 0:  # the starting point of the validation curves
            self.validate()
        while self.step < config.max_steps:
            # A Ctrl-C reaches the processes at different moments: they agree before each step.
            self._stop = self.dist.any(self._stop)
            if self._stop:
                break
            loss = self.train_step()
            window.append(loss)
            done = self.step - first_step
            elapsed = time.perf_counter() - started
            rate = done / elapsed if elapsed > 0 else 0.0
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                mean = sum(window) / len(window)
                window.clear()
                lr = self.optimizer.param_groups[0]["lr"]
                samples = rate * self.stream.global_batch
                self._record(
                    {"step": self.step, "loss": f"{mean:.6f}", "lr": f"{lr:.3e}", "samples_per_s": f"{samples:.2f}"}
                )
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar("train/loss", mean, self.step)
                    self.tensorboard.add_scalar("train/lr", lr, self.step)
                if config.progress:
                    eta = (config.max_steps - self.step) / rate if rate > 0 else float("nan")
                    self.log(
                        f"step {self.step}/{config.max_steps}  loss {mean:.4f}  lr {lr:.2e}  "
                        f"{rate:.2f} steps/s ({samples:.1f} samples/s)  ETA {_duration(eta)}"
                    )
            if config.validate_every and self.step % config.validate_every == 0:
                self.validate()
            if self.step % config.checkpoint_every == 0:
                self.save()


def _pixel_l1(a, b) -> float:
    """Mean absolute difference of two images, as a fraction of the 0-255 range."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean() / 255)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _truncate_csv(path: Path, last_step: int) -> None:
    rows = _read_csv(path)
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if _row_step(r) is not None and _row_step(r) <= last_step)


def _row_step(row: dict) -> int | None:
    """A log row's step, or None for a row a killed run left half-written."""
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: TrainConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Run a training from a config (the function behind ``controlnet train``)."""
    trainer = Trainer(config, log)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()


def add_control(base: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A new ControlNet for ``base`` (the original ``tool_add_control``): the encoder copied from the
    base UNet, the hint encoder freshly initialised, the zero convolutions at zero; written as a
    1.1-style control-only ``.safetensors``."""
    model = load_base(base)
    controlnet = ControlNet.from_unet(model.unet, model.config.controlnet())
    return save_ldm(out, controlnet=controlnet)

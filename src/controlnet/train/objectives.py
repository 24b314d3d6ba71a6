"""What trains: one ``Objective`` per task, owning everything that differs between the tasks.

An objective builds its model (loads or makes it, chooses what trains), assembles its batches from
the samples and their random draws, computes its loss, says which frozen parts the cache may hold
and which to keep in the mixed-precision dtype, makes its validation images and scores, and
exports what it trained. The loop (``loop.Trainer``) is the same for all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, T2IAdapterConfig, preset
from ..formats.diffusers import save_adapter_folder, save_diffusers
from ..formats.ldm import save_ldm
from ..formats.t2i_adapter import save_adapter_file
from ..loading import load_base, load_controlnet
from ..models.controlnet import ControlNet
from ..models.stable_diffusion import StableDiffusion
from ..models.t2i_adapter import T2IAdapter, build_adapter
from ..sampling.parametrisation import noised, target
from ..sampling.prompts import encode_prompts
from .config import VALIDATION_ROWS, TrainConfig, TrainingError
from .data import FrozenCache, diffusion_batch, latent_shape
from .distributed import is_sharded
from .validation import (
    ValidationSet,
    base_images,
    edge_f1s,
    generate_row,
    grid,
    mean_pixel_l1,
    to_uint8,
    validation_pipeline,
)


def diffusion_loss(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
) -> torch.Tensor:
    """The latent diffusion loss (Ho et al. 2020, eq. 14, in latent space as Rombach et al. 2022):
    noise the latents to ``timesteps`` and regress the noise (or v): sampling/parametrisation.py."""
    alpha = alphas_cumprod[timesteps].to(latents.dtype)[:, None, None, None]
    sqrt_alpha, sqrt_one_minus_alpha = alpha.sqrt(), (1 - alpha).sqrt()
    output = denoise(noised(latents, noise, sqrt_alpha, sqrt_one_minus_alpha), timesteps)
    expected = target(prediction, latents, noise, sqrt_alpha, sqrt_one_minus_alpha)
    return F.mse_loss(output.float(), expected.float())


class Objective(nn.Module):
    """What a task trains (``model``: the whole model, trained in part or in full) and everything
    about it that is particular to the task; the methods that do nothing here are what most tasks
    do not need."""

    model: StableDiffusion

    @classmethod
    def build(cls, config: TrainConfig) -> Objective:
        """The objective with its model, loaded or made as ``config`` says (torch is seeded)."""
        raise NotImplementedError

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        """The optimiser's parameter groups: what trains, at which learning rate."""
        raise NotImplementedError

    def batch(self, items: Sequence[dict], generators: Sequence[torch.Generator], cache: FrozenCache | None) -> dict:
        """The batch of ``items`` (samples of the data), each with its own ``generator`` for all of
        its random draws (on the CPU; the loop moves the tensors to the device)."""
        raise NotImplementedError

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> torch.Tensor:  # DistributedDataParallel calls forward
        return self.loss(batch)

    def cached_encoders(self) -> tuple[nn.Module, nn.Module | None] | None:
        """The frozen encoders whose outputs the cache holds: the VAE and the text encoder (or None
        when it trains); None when the VAE trains (nothing to cache)."""
        return None

    def cast_frozen(self, dtype: torch.dtype | None) -> None:
        """Keep the frozen parts in the mixed-precision ``dtype`` (None: float32 training)."""

    def back_to_training(self, dtype: torch.dtype | None) -> None:
        """After a validation: train mode again (the VAE in eval mode, which changes nothing: it has
        no dropout), the frozen parts in the mixed-precision ``dtype`` again (the validation
        pipeline ran them in float32)."""
        self.train()
        self.model.vae.eval()
        self.cast_frozen(dtype)

    def shard(self) -> None:
        """Shard the trainable modules over the processes (FSDP)."""
        raise TrainingError("--strategy fsdp shards the ControlNet: it is for the controlnet task")

    def validation_images(
        self, validation: ValidationSet, trainable: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], object]:
        """The scores and the grid image of a validation; ``trainable`` as for ``export``."""
        raise NotImplementedError

    def before_export(self, dataset, device: torch.device, log: Callable[[str], None]) -> None:
        """Anything to settle before the export (on the first process, with the weights exported)."""

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        """Write the trained model(s) to ``out``; ``trainable``: every trainable tensor, whole
        (gathered from the processes' shards under FSDP), by parameter name."""
        raise NotImplementedError


class DiffusionObjective(Objective):
    """What the two diffusion tasks share: the noise schedule, the loss, the prompt drop."""

    def __init__(self, model: StableDiffusion, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.proportion_empty_prompts = config.proportion_empty_prompts
        self.register_buffer("alphas_cumprod", model.config.schedule.alphas_cumprod().float(), persistent=False)
        self.prediction = model.config.schedule.prediction

    def noise_loss(self, batch: dict, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return diffusion_loss(
            denoise, batch["latents"], batch["noise"], batch["timesteps"], self.alphas_cumprod, self.prediction
        )


def control_batch(
    model: StableDiffusion,
    items: Sequence[dict],
    generators: Sequence[torch.Generator],
    proportion_empty_prompts: float,
    cache: FrozenCache | None,
) -> dict:
    """The batch of the tasks that learn a control on a frozen base (ControlNet, T2I-Adapter): the
    diffusion draws, the control images (``hint``) and the prompts' encodings (``context``)."""
    batch = diffusion_batch(model, items, generators, proportion_empty_prompts, cache)
    batch["hint"] = torch.stack([item["hint"] for item in items])
    if cache is not None:
        batch["context"] = torch.stack([cache.encoding(p) for p in batch["prompts"]])
    else:
        with torch.no_grad():
            batch["context"] = encode_prompts(model.text_encoder, batch["prompts"]).float()
    return batch


def control_validation(pipe, validation: ValidationSet, adapter: bool) -> tuple[dict[str, float], object]:
    """A control's validation (ControlNet 0 or adapter 0 of ``pipe``): images with the prompts and
    with none; the edge F1 of each row against the control maps, and ``base_distance``: how far the
    control moves the locked model's images (exactly 0 at step 0 with zero convolutions)."""
    with_prompt = generate_row(pipe, validation, use_prompt=True, control=True, adapter=adapter)
    without = generate_row(pipe, validation, use_prompt=False, control=True, adapter=adapter)
    scores = {
        "edge_f1": float(np.mean(edge_f1s(with_prompt, validation.hints))),
        "edge_f1_no_prompt": float(np.mean(edge_f1s(without, validation.hints))),
        "base_distance": mean_pixel_l1(with_prompt, base_images(pipe, validation)),
    }
    return scores, grid([validation.hints, validation.targets, with_prompt, without], VALIDATION_ROWS)


class ControlNetObjective(DiffusionObjective):
    """The frozen base with its trainable ControlNet (the paper's section 3.3): the loss is the noise
    prediction of the locked UNet with the ControlNet's residuals added. With ``unlock_decoder``
    (the original's ``sd_locked=False``) the UNet's decoder trains too, at its own learning rate."""

    def __init__(self, model: StableDiffusion, controlnet: ControlNet, config: TrainConfig) -> None:
        super().__init__(model.requires_grad_(False), config)
        self.controlnet = controlnet.requires_grad_(True).train()
        self.only_mid_control = config.only_mid_control
        self.unlock_decoder = config.unlock_decoder
        if config.unlock_decoder:  # sd_locked=False: the decoder half of the UNet learns too
            for part in (model.unet.output_blocks, model.unet.out):
                part.requires_grad_(True).train()

    @classmethod
    def build(cls, config: TrainConfig) -> ControlNetObjective:
        """The base from ``--base``; the ControlNet from ``--controlnet``, or a new one from the
        base UNet's encoder (zero convolutions at zero, or Gaussian: the paper's ablation)."""
        model = load_base(config.base)
        if config.controlnet:
            controlnet = load_controlnet(config.controlnet, model.config)
        else:
            controlnet = ControlNet.from_unet(model.unet, model.config.controlnet())
            if config.control_init == "gaussian":
                controlnet.gaussian_init_(torch.Generator().manual_seed(config.seed))
        return cls(model.float(), controlnet.float(), config)

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        groups = [{"params": list(self.controlnet.parameters()), "lr": config.learning_rate}]
        if config.unlock_decoder:
            decoder = [*self.model.unet.output_blocks.parameters(), *self.model.unet.out.parameters()]
            lr = config.decoder_learning_rate or config.learning_rate / 10
            groups.append({"params": decoder, "lr": lr})
        return groups

    def batch(self, items: Sequence[dict], generators: Sequence[torch.Generator], cache: FrozenCache | None) -> dict:
        return control_batch(self.model, items, generators, self.proportion_empty_prompts, cache)

    def loss(self, batch: dict) -> torch.Tensor:
        context, hint = batch["context"], batch["hint"]

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            residuals = self.controlnet(noisy, self.controlnet.encode_hint(hint), t, context)
            return self.model.unet(noisy, t, context, control=residuals, only_mid_control=self.only_mid_control)

        return self.noise_loss(batch, denoise)

    def cached_encoders(self) -> tuple[nn.Module, nn.Module | None]:
        return self.model.vae, self.model.text_encoder

    def cast_frozen(self, dtype: torch.dtype | None) -> None:
        """Under mixed precision the frozen parts live in the autocast dtype (as diffusers' script
        keeps them): autocast would otherwise cast their float32 weights again at every use (frozen
        weights are not in its cache), and they take half the memory. An unlocked decoder keeps the
        UNet in float32 (its master weights)."""
        if dtype is None:
            return
        frozen = [self.model.vae, self.model.text_encoder]
        if not self.unlock_decoder:
            frozen.append(self.model.unet)
        for module in frozen:
            module.to(dtype)

    def shard(self) -> None:
        """FSDP (PyTorch's ``fully_shard``): each large block of the ControlNet is its own shard
        group, gathered for its forward and backward only; the objective is the root (so the hint
        encoder, called before the ControlNet's forward, is gathered too). The frozen base is not
        sharded: every process keeps it whole, as with DDP."""
        from torch.distributed.fsdp import fully_shard

        controlnet = self.controlnet
        for block in (*controlnet.input_blocks, controlnet.middle_block, controlnet.input_hint_block):
            fully_shard(block)
        fully_shard(controlnet)
        frozen = {p for p in self.parameters() if not p.requires_grad}
        fully_shard(self, ignored_params=frozen)

    def validation_images(
        self, validation: ValidationSet, trainable: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], object]:
        """Generated with their prompts and with none; the edge F1 of each row against the control
        maps, and ``base_distance``: how far the control moves the locked model's images (exactly 0
        at step 0 with zero convolutions)."""
        pipe = validation_pipeline(self.model, [self.plain_controlnet(trainable)], validation.device)
        return control_validation(pipe, validation, adapter=False)

    def plain_controlnet(self, trainable: dict[str, torch.Tensor]) -> ControlNet:
        """A stand-alone float32 ControlNet holding the trained weights (not sharded, not wrapped)."""
        controlnet = ControlNet(self.controlnet.config)
        prefix = "controlnet."
        controlnet.load_state_dict({k.removeprefix(prefix): v for k, v in trainable.items() if k.startswith(prefix)})
        return controlnet.float().eval()

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        """The ControlNet as a 1.1-style control-only file and as a diffusers ControlNet folder."""
        controlnet = self.plain_controlnet(trainable)
        paths = [save_ldm(out / "controlnet.safetensors", controlnet=controlnet)]
        paths.append(save_diffusers(out / "controlnet-diffusers", controlnet=controlnet))
        if self.unlock_decoder:  # the decoder changed: the base model goes with it
            model = StableDiffusion(self.model.config, empty=True)
            unet = {k: v for k, v in self.model.unet.state_dict().items() if not is_sharded(v)}
            unet.update({k.removeprefix("model.unet."): v for k, v in trainable.items() if k.startswith("model.unet.")})
            model.unet.load_state_dict(unet, assign=True)
            model.vae, model.text_encoder = self.model.vae, self.model.text_encoder
            paths.append(save_ldm(out / "base-unlocked.safetensors", model=model))
        return paths


def cubic_timesteps(uniform: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """T2I-Adapter's non-uniform timestep sampling (Mou et al. 2023, section 3.3): t = (1 - u^3) T
    for u uniform in [0, 1), so most draws land on the early, noisy steps, where the layout of the
    image is decided and where a condition can still steer it. ``uniform``: integer draws in
    [0, T), as the other tasks use directly."""
    u = uniform.double() / num_timesteps
    return ((1 - u**3) * num_timesteps).long().clamp(0, num_timesteps - 1)


def adapter_config_for(base: ModelConfig, in_channels: int = 3) -> T2IAdapterConfig:
    """A full T2I-Adapter that fits ``base``: one feature map per UNet level at its width, the
    condition image pixel-unshuffled to the latent size (TencentARC's SD 1.x adapters at any size)."""
    return T2IAdapterConfig(
        in_channels=in_channels, channels=base.unet.level_channels, downscale_factor=base.vae.downsample_factor
    )


class AdapterObjective(DiffusionObjective):
    """A T2I-Adapter (Mou et al. 2023) on the frozen base: the loss is the noise prediction of the
    locked UNet with the adapter's features added to its encoder, the features of the control
    image made once per sample (nothing else trains). Timesteps are drawn as the paper does
    (`cubic_timesteps`); the rest (prompt drop, data, schedule) is the ControlNet task's, so the
    two compare under the same budget and seed (docs/experiments.md)."""

    def __init__(self, model: StableDiffusion, adapter: T2IAdapter, config: TrainConfig) -> None:
        super().__init__(model.requires_grad_(False), config)
        self.adapter = adapter.requires_grad_(True).train()

    @classmethod
    def build(cls, config: TrainConfig) -> AdapterObjective:
        """The base from ``--base``; a new full adapter of its UNet's widths (reading RGB maps)."""
        model = load_base(config.base)
        adapter = build_adapter(adapter_config_for(model.config))
        return cls(model.float(), adapter.float(), config)

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        return [{"params": list(self.adapter.parameters()), "lr": config.learning_rate}]

    def batch(self, items: Sequence[dict], generators: Sequence[torch.Generator], cache: FrozenCache | None) -> dict:
        """As the ControlNet task's batch, with the timesteps redrawn on the cubic schedule."""
        batch = control_batch(self.model, items, generators, self.proportion_empty_prompts, cache)
        batch["timesteps"] = cubic_timesteps(batch["timesteps"], self.model.config.schedule.num_timesteps)
        return batch

    def loss(self, batch: dict) -> torch.Tensor:
        context, features = batch["context"], self.adapter(batch["hint"])

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.unet(noisy, t, context, adapter_features=features)

        return self.noise_loss(batch, denoise)

    def cached_encoders(self) -> tuple[nn.Module, nn.Module | None]:
        return self.model.vae, self.model.text_encoder

    def cast_frozen(self, dtype: torch.dtype | None) -> None:
        """The whole base is frozen: it lives in the autocast dtype (as the ControlNet task's)."""
        if dtype is not None:
            self.model.to(dtype)

    def validation_images(
        self, validation: ValidationSet, trainable: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], object]:
        """As the ControlNet task's: with the prompts and with none, the edge F1 of each row and how
        far the adapter moves the locked model's images."""
        pipe = validation_pipeline(self.model, [], validation.device, adapters=[self.plain_adapter(trainable)])
        return control_validation(pipe, validation, adapter=True)

    def plain_adapter(self, trainable: dict[str, torch.Tensor]) -> T2IAdapter:
        """A stand-alone float32 adapter holding the trained weights."""
        adapter = build_adapter(self.adapter.config)
        prefix = "adapter."
        adapter.load_state_dict({k.removeprefix(prefix): v for k, v in trainable.items() if k.startswith(prefix)})
        return adapter.float().eval()

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        """The adapter in TencentARC's key layout (what ``load_adapter`` and the A1111 extension read
        from ``t2iadapter_*.pth``), as safetensors, and as a diffusers ``T2IAdapter`` folder."""
        adapter = self.plain_adapter(trainable)
        paths = [
            save_adapter_file(out / "adapter.safetensors", adapter.state_dict()),
            save_adapter_folder(out / "adapter-diffusers", adapter.state_dict(), adapter.config),
        ]
        return paths


class BaseObjective(DiffusionObjective):
    """A UNet and its text encoder from scratch on a frozen VAE's latents (the same loss)."""

    def __init__(self, model: StableDiffusion, config: TrainConfig) -> None:
        super().__init__(model, config)
        model.vae.requires_grad_(False).eval()
        model.unet.requires_grad_(True).train()
        model.text_encoder.requires_grad_(True).train()

    @classmethod
    def build(cls, config: TrainConfig) -> BaseObjective:
        """A new model of the ``--model-config`` preset with the trained VAE of ``--base`` (its
        latent scale factor calibrated by the vae task)."""
        model_config = _preset(config)
        trained = load_base(config.base)  # the VAE's file (a model saved by the vae task)
        scale = trained.config.vae.scale_factor
        if dataclasses.replace(trained.config.vae, scale_factor=scale) != dataclasses.replace(
            model_config.vae, scale_factor=scale
        ):
            raise TrainingError(f"{config.base}: its VAE is not the one of --model-config {config.model_config}")
        model = StableDiffusion(model_config.replace(vae=trained.config.vae))
        model.vae.load_state_dict(trained.vae.state_dict())
        return cls(model, config)

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        params = [*self.model.unet.parameters(), *self.model.text_encoder.parameters()]
        return [{"params": params, "lr": config.learning_rate}]

    def batch(self, items: Sequence[dict], generators: Sequence[torch.Generator], cache: FrozenCache | None) -> dict:
        """The diffusion draws and the prompts' tokens (the text encoder trains)."""
        batch = diffusion_batch(self.model, items, generators, self.proportion_empty_prompts, cache)
        batch["tokens"] = self.model.text_encoder.tokenize(batch["prompts"])
        return batch

    def loss(self, batch: dict) -> torch.Tensor:
        context = self.model.text_encoder(batch["tokens"])

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.unet(noisy, t, context)

        return self.noise_loss(batch, denoise)

    def cached_encoders(self) -> tuple[nn.Module, nn.Module | None]:
        return self.model.vae, None

    def validation_images(
        self, validation: ValidationSet, trainable: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], object]:
        """Generated with the prompts; ``pixel_l1``: how far they are from their data images
        (colours mostly). No row without a prompt: a base model without one says little."""
        pipe = validation_pipeline(self.model, [], validation.device)
        images = generate_row(pipe, validation, use_prompt=True, control=False)
        scores = {"pixel_l1": mean_pixel_l1(images, validation.targets)}
        return scores, grid([validation.hints, validation.targets, images], VALIDATION_ROWS[:3])

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        model = copy.deepcopy(self.model).float().eval()  # never sharded: the whole model is here
        return [save_ldm(out / "base.safetensors", model=model)]


def image_gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the finite differences (along width and height) of two image batches."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017), the one SD's VAE was trained against (taming
    transformers' ``NLayerDiscriminator``: 4x4 convolutions, three halvings, one logit per 70x70
    pixel patch), narrower, with GroupNorm for its BatchNorm (no running statistics to keep in
    step between the real and the generated batch)."""

    def __init__(self, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            wider = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, wider, 4, stride, 1), nn.GroupNorm(8, wider), nn.LeakyReLU(0.2)]
            width = wider
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class VAEObjective(Objective):
    """The autoencoder: reconstruction (L1 + L2) through a posterior sample, plus
    ``gradient_loss_weight`` x L1 between the horizontal and vertical differences of the images,
    plus ``kl_weight`` x KL, and with ``adversarial_weight`` a PatchGAN term.

    SD's VAE gets sharp edges from a perceptual and an adversarial loss (Rombach et al. 2022); a
    pixel loss alone blurs them, and blurred edges cost a Canny ControlNet its edge F1. The gradient
    term is a cheap stand-in that penalises exactly that; the adversarial term is the original's.
    """

    def __init__(self, model: StableDiffusion, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.vae = model.vae.requires_grad_(True).train()
        self.kl_weight = config.kl_weight
        self.gradient_loss_weight = config.gradient_loss_weight
        self.adversarial_weight = config.adversarial_weight
        self.crop_size = config.crop_size
        self.discriminator = PatchDiscriminator() if config.adversarial_weight else None

    @classmethod
    def build(cls, config: TrainConfig) -> VAEObjective:
        """A new model of the ``--model-config`` preset, whose VAE trains."""
        return cls(StableDiffusion(_preset(config)), config)

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        groups = [{"params": list(self.vae.parameters()), "lr": config.learning_rate}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "lr": config.learning_rate})
        return groups

    def batch(self, items: Sequence[dict], generators: Sequence[torch.Generator], cache: FrozenCache | None) -> dict:
        """The images (or a random crop of each, ``--crop-size``) and the noise of their posterior
        samples, both drawn from each sample's own generator."""
        images = [item["image"] for item in items]
        if self.crop_size is not None:
            images = [random_crop(image, self.crop_size, g) for image, g in zip(images, generators, strict=True)]
        shape = latent_shape(self.model, [{"image": images[0]}])
        return {
            "image": torch.stack(images),
            "posterior_noise": torch.stack([torch.randn(shape, generator=g) for g in generators]),
        }

    def loss(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        posterior = self.vae.encode(images)
        latents = posterior.mean + posterior.std * batch["posterior_noise"].to(posterior.mean.dtype)
        reconstruction = self.vae.decode(latents).float()
        rec = (reconstruction - images).abs().mean() + F.mse_loss(reconstruction, images)
        if self.gradient_loss_weight:
            rec = rec + self.gradient_loss_weight * image_gradient_l1(reconstruction, images)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        loss = rec + self.kl_weight * kl
        if self.discriminator is not None:
            loss = loss + self.adversarial_loss(rec, reconstruction, images)
        return loss

    def adversarial_loss(self, rec: torch.Tensor, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Both players' hinge losses in one term, so that one optimiser step updates both (the loop
        has one optimiser): the generator's term sees the discriminator through detached weights (its
        gradient reaches the VAE only), the discriminator's sees the reconstruction detached (its
        gradient reaches the discriminator only). The generator's term is weighted as in SD's VAE
        training (Esser et al. 2021, eq. 7): the ratio of the gradient norms of the reconstruction
        and adversarial losses at the decoder's last layer, times ``adversarial_weight``."""
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        generator = -torch.func.functional_call(self.discriminator, frozen, (fake,)).float().mean()
        last = self.vae.decoder.conv_out.weight
        (rec_grad,) = torch.autograd.grad(rec, last, retain_graph=True)
        (adv_grad,) = torch.autograd.grad(generator, last, retain_graph=True)
        balance = (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        on_real, on_fake = self.discriminator(real).float(), self.discriminator(fake.detach()).float()
        discriminator = F.relu(1.0 - on_real).mean() + F.relu(1.0 + on_fake).mean()
        return self.adversarial_weight * balance * generator + 0.5 * discriminator

    def validation_images(
        self, validation: ValidationSet, trainable: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], object]:
        """The samples' images through the VAE; ``reconstruction_l1``: their distance to the data."""
        images = torch.stack([item["image"] for item in validation.samples]).to(validation.device)
        rebuilt = [to_uint8(x) for x in self.model.vae(images).float()]
        scores = {"reconstruction_l1": mean_pixel_l1(rebuilt, validation.targets)}
        return scores, grid([validation.targets, rebuilt], ["data", "VAE"])

    def before_export(self, dataset, device: torch.device, log: Callable[[str], None]) -> None:
        """Calibrate the latent scale factor on (up to) the first 256 images of the data."""
        count = min(len(dataset), 256)
        images = [
            torch.stack([dataset[i]["image"] for i in range(j, min(j + 16, count))]).to(device)
            for j in range(0, count, 16)
        ]
        factor = self.calibrate(images)
        log(f"VAE latent scale factor: {factor} (1 / std of the latents of {count} images)")

    @torch.no_grad()
    def calibrate(self, images: Sequence[torch.Tensor]) -> float:
        """Set the VAE's ``scale_factor`` to 1 / (standard deviation of its latents over ``images``),
        so that the diffusion model sees unit-variance latents (SD's 0.18215 was found the same
        way for its VAE, Rombach et al. 2022, appendix G). Returns the factor."""
        self.vae.eval()
        latents = torch.cat([self.vae.encode(batch).mean.float() for batch in images])
        std = latents.std().item()
        if not (math.isfinite(std) and std > 0):  # NaN latents, or a VAE that maps every image to one point
            raise TrainingError(f"the trained VAE's latents have standard deviation {std}: no scale factor can be set")
        factor = float(f"{1.0 / std:.5g}")
        vae_config = dataclasses.replace(self.model.config.vae, scale_factor=factor)
        self.model.config = self.model.config.replace(vae=vae_config)
        self.vae.config = vae_config
        self.vae.train()
        return factor

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        model = copy.deepcopy(self.model).float().eval()
        return [save_ldm(out / "vae.safetensors", model=model)]


OBJECTIVES: dict[str, type[Objective]] = {
    "controlnet": ControlNetObjective,
    "adapter": AdapterObjective,
    "base": BaseObjective,
    "vae": VAEObjective,
}


def build_objective(config: TrainConfig) -> Objective:
    """The objective of ``config.task`` (one of ``config.TASKS``), built from ``config``."""
    return OBJECTIVES[config.task].build(config)


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size`` x ``size`` crop of ``image`` [C, H, W] at an offset drawn from ``generator``."""
    height, width = image.shape[-2:]
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    return image[..., top : top + size, left : left + size]


def _preset(config: TrainConfig) -> ModelConfig:
    try:
        return preset(config.model_config)
    except (KeyError, ValueError) as error:
        raise TrainingError(f"--model-config: {error}") from None

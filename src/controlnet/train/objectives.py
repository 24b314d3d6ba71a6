"""What trains: one objective per task (its trainable modules, its loss, its exports)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import save_diffusers, save_ldm
from ..models.controlnet import ControlNet
from ..models.stable_diffusion import StableDiffusion
from .config import TrainConfig, TrainingError
from .distributed import is_sharded

# ---------------------------------------------------------------------------------------------
# What trains: one objective per task


def diffusion_loss(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
) -> torch.Tensor:
    """The latent diffusion loss (Ho et al. 2020, eq. 14, in latent space as Rombach et al. 2022):
    noise the latents to ``timesteps`` and regress the noise (or v, Salimans & Ho 2022)."""
    alpha = alphas_cumprod[timesteps].to(latents.dtype)[:, None, None, None]
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    target = noise if prediction == "eps" else alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    output = denoise(noisy, timesteps)
    return F.mse_loss(output.float(), target.float())


class Objective(nn.Module):
    """What a task trains: ``trainable`` modules, their ``loss`` on a batch, and what to export."""

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        raise NotImplementedError

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        """Write the trained model(s) to ``out``; ``trainable``: every trainable tensor, whole
        (gathered from the processes' shards under FSDP), by parameter name."""
        raise NotImplementedError


class ControlNetObjective(Objective):
    """The frozen base with its trainable ControlNet (see the module docstring)."""

    def __init__(self, model: StableDiffusion, controlnet: ControlNet, config: TrainConfig) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.controlnet = controlnet.requires_grad_(True).train()
        self.only_mid_control = config.only_mid_control
        self.unlock_decoder = config.unlock_decoder
        if config.unlock_decoder:  # sd_locked=False: the decoder half of the UNet learns too
            for part in (model.unet.output_blocks, model.unet.out):
                part.requires_grad_(True).train()
        self.register_buffer("alphas_cumprod", model.config.schedule.alphas_cumprod().float(), persistent=False)
        self.prediction = model.config.schedule.prediction

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        groups = [{"params": list(self.controlnet.parameters()), "lr": config.learning_rate}]
        if config.unlock_decoder:
            decoder = [*self.model.unet.output_blocks.parameters(), *self.model.unet.out.parameters()]
            lr = config.decoder_learning_rate or config.learning_rate / 10
            groups.append({"params": decoder, "lr": lr})
        return groups

    def loss(self, batch: dict) -> torch.Tensor:
        context, hint = batch["context"], batch["hint"]

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            residuals = self.controlnet(noisy, self.controlnet.encode_hint(hint), t, context)
            return self.model.unet(noisy, t, context, control=residuals, only_mid_control=self.only_mid_control)

        return diffusion_loss(
            denoise, batch["latents"], batch["noise"], batch["timesteps"], self.alphas_cumprod, self.prediction
        )

    def forward(self, batch: dict) -> torch.Tensor:  # DistributedDataParallel calls forward
        return self.loss(batch)

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


class BaseObjective(Objective):
    """A UNet and its text encoder from scratch on a frozen VAE's latents."""

    def __init__(self, model: StableDiffusion, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        model.vae.requires_grad_(False).eval()
        model.unet.requires_grad_(True).train()
        model.text_encoder.requires_grad_(True).train()
        self.register_buffer("alphas_cumprod", model.config.schedule.alphas_cumprod().float(), persistent=False)
        self.prediction = model.config.schedule.prediction

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        params = [*self.model.unet.parameters(), *self.model.text_encoder.parameters()]
        return [{"params": params, "lr": config.learning_rate}]

    def loss(self, batch: dict) -> torch.Tensor:
        context = self.model.text_encoder(batch["tokens"])

        def denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.unet(noisy, t, context)

        return diffusion_loss(
            denoise, batch["latents"], batch["noise"], batch["timesteps"], self.alphas_cumprod, self.prediction
        )

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(batch)

    def export(self, out: Path, trainable: dict[str, torch.Tensor]) -> list[Path]:
        model = copy.deepcopy(self.model).float().eval()  # never sharded: the whole model is here
        return [save_ldm(out / "base.safetensors", model=model)]


def image_gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the finite differences (along width and height) of two image batches."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


class VAEObjective(Objective):
    """The autoencoder: reconstruction (L1 + L2) through a posterior sample, plus
    ``gradient_loss_weight`` x L1 between the horizontal and vertical differences of the images,
    plus ``kl_weight`` x KL.

    SD's VAE gets sharp edges from a perceptual and an adversarial loss (Rombach et al. 2022); a
    pixel loss alone blurs them, and blurred edges cost a Canny ControlNet its edge F1. The gradient
    term is a cheap stand-in that penalises exactly that.
    """

    def __init__(self, model: StableDiffusion, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.vae = model.vae.requires_grad_(True).train()
        self.kl_weight = config.kl_weight
        self.gradient_loss_weight = config.gradient_loss_weight

    def parameter_groups(self, config: TrainConfig) -> list[dict]:
        return [{"params": list(self.vae.parameters()), "lr": config.learning_rate}]

    def loss(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        posterior = self.vae.encode(images)
        latents = posterior.mean + posterior.std * batch["posterior_noise"].to(posterior.mean.dtype)
        reconstruction = self.vae.decode(latents).float()
        rec = (reconstruction - images).abs().mean() + F.mse_loss(reconstruction, images)
        if self.gradient_loss_weight:
            rec = rec + self.gradient_loss_weight * image_gradient_l1(reconstruction, images)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        return rec + self.kl_weight * kl

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(batch)

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

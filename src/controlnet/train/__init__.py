"""Training: a ControlNet on a frozen base model, and small base models from scratch.

One loop (``train``) serves three tasks, each an ``Objective`` (what trains and its loss):

- ``controlnet``: the paper's setting (section 3.3). The base model is locked; the ControlNet
  (initialised from the base UNet's encoder, zero convolutions at zero) learns to predict the noise
  together with the frozen UNet: ``|| eps - eps_theta(z_t, t, c_text, c_hint) ||^2``. Half of the
  prompts are replaced by the empty string (section 3.3: it makes the ControlNet read the
  condition itself). With ``unlock_decoder`` (the original's ``sd_locked=False``) the UNet's
  decoder and output layers train too, at their own learning rate.
- ``base``: a UNet and its text encoder from scratch, on a trained VAE's latents (the same loss).
- ``vae``: the autoencoder from scratch: L1 + L2 reconstruction and a small KL term (no
  adversarial or perceptual loss: the small models this is for do not need them).

The frozen parts cost nothing twice: with ``cache`` (the default) the VAE posterior of every
training image and the text encoding of every distinct prompt are computed once and kept in
``<out>/cache``; each step then samples the latents from the cached posterior.

Determinism and resuming: every random draw of a sample (its timestep, noise, prompt drop,
posterior sample) comes from a generator seeded with (seed, the sample's position in the data
stream), and the data order from (seed, epoch). A run is therefore a function of its seed whatever
the number of processes, and resuming needs nothing but the step counter and the saved states.
Checkpoints are directories written under a temporary name and renamed, so one is either complete
or absent.

Many processes: launch with ``torchrun --nproc-per-node N -m controlnet train ...`` (or any
launcher that sets RANK / WORLD_SIZE / MASTER_ADDR); the trainable module is wrapped in
DistributedDataParallel (gloo on CPUs, nccl on GPUs) and every process takes its slice of each
global batch. Multi-node training is torchrun's ``--nnodes`` / ``--rdzv-endpoint``.
"""

from .config import TrainConfig, TrainingError
from .loop import Trainer, add_control, train

__all__ = ["TrainConfig", "Trainer", "TrainingError", "add_control", "train"]

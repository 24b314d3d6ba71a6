"""``controlnet train``: a ControlNet on a frozen base, or small base models from scratch (train/)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .common import UsageError


def register(commands) -> dict[str, Callable[[argparse.Namespace], None]]:
    t = commands.add_parser(
        "train",
        help="train a ControlNet on a frozen base (or a small base model from scratch)",
        description="Train a ControlNet on a frozen base model (task controlnet), or a small VAE (task vae) "
        "or UNet + text encoder (task base) from scratch. Run with torchrun for several processes: "
        "torchrun --nproc-per-node N -m controlnet train ...",
    )
    t.add_argument("--data", required=True, help="a fill50k-layout folder (prompt.json) or a diffusers one")
    t.add_argument("--out", required=True, help="the run's folder: checkpoints, logs, validation, exports")
    t.add_argument("--base", help="the base model (controlnet task); the trained VAE's file (base task)")
    t.add_argument("--task", default="controlnet", choices=("controlnet", "base", "vae"))
    t.add_argument("--model-config", help="base/vae tasks: the preset to build from scratch (e.g. tiny)")
    t.add_argument("--controlnet", help="controlnet task: start from this ControlNet, not the base's encoder")
    t.add_argument(
        "--control-init",
        default="zero",
        choices=("zero", "gaussian"),
        help="a new ControlNet's zero convolutions: zero (the paper) or gaussian (its ablation)",
    )
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=4, help="per process and micro-step (default 4)")
    t.add_argument("--gradient-accumulation", type=int, default=1)
    t.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    t.add_argument("--unlock-decoder", action="store_true", help="also train the UNet decoder (sd_locked=False)")
    t.add_argument("--decoder-learning-rate", type=float, help="with --unlock-decoder (default: lr / 10)")
    t.add_argument("--proportion-empty-prompts", type=float, default=0.5, help="prompt drop rate (default 0.5)")
    t.add_argument("--only-mid-control", action="store_true")
    t.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--ema-decay", type=float, help="keep an EMA of the weights (e.g. 0.999); exported")
    t.add_argument("--lr-schedule", default="constant", choices=("constant", "linear", "cosine"))
    t.add_argument("--lr-warmup-steps", type=int, default=0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--keep-checkpoints", type=int, default=3)
    t.add_argument("--validate-every", type=int, default=0, help="steps between validations (0: at the end)")
    t.add_argument("--validation-count", type=int, default=4)
    t.add_argument("--validation-steps", type=int, default=20)
    t.add_argument("--resume", help="'latest' or a checkpoint folder")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resolution", type=int, help="training image size (default: the model's native size)")
    t.add_argument("--no-cache", action="store_true", help="encode latents and prompts at every step")
    t.add_argument("--kl-weight", type=float, default=1e-6, help="vae task: weight of the KL term")
    t.add_argument(
        "--gradient-loss-weight", type=float, default=1.0, help="vae task: weight of the image-gradient L1 term"
    )
    t.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop if more samples are unreadable")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--device", default="cpu", help="cpu or cuda (torchrun: each process its local GPU)")
    t.add_argument(
        "--strategy",
        default="ddp",
        choices=("ddp", "fsdp"),
        help="several processes: replicate or shard the ControlNet",
    )
    return {"train": cmd_train}


def cmd_train(args: argparse.Namespace) -> None:
    from ..train import TrainConfig, TrainingError, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        base=args.base,
        task=args.task,
        model_config=args.model_config,
        controlnet=args.controlnet,
        control_init=args.control_init,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        learning_rate=args.learning_rate,
        unlock_decoder=args.unlock_decoder,
        decoder_learning_rate=args.decoder_learning_rate,
        proportion_empty_prompts=args.proportion_empty_prompts,
        only_mid_control=args.only_mid_control,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        ema_decay=args.ema_decay,
        lr_schedule=args.lr_schedule,
        lr_warmup_steps=args.lr_warmup_steps,
        max_grad_norm=None if args.max_grad_norm == 0 else args.max_grad_norm,  # 0: no clipping
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        validation_count=args.validation_count,
        validation_steps=args.validation_steps,
        resume=args.resume,
        seed=args.seed,
        resolution=args.resolution,
        cache=not args.no_cache,
        max_bad_fraction=args.max_bad_fraction,
        kl_weight=args.kl_weight,
        gradient_loss_weight=args.gradient_loss_weight,
        log_every=args.log_every,
        device=args.device,
        strategy=args.strategy,
    )
    try:
        config.check()  # every option, before a model or the data is read
    except TrainingError as error:
        raise UsageError(str(error)) from None
    for name in ("data", "base", "controlnet"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise UsageError(f"--{name} {value}: no such file or folder")
    train(config, log=lambda message: print(message, flush=True))

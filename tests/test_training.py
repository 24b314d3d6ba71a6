"""Training: the loss goes down, the paper's details hold (prompt drop, zero convolutions), runs
resume exactly, exports load, and two processes equal one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from controlnet.checkpoints import load_controlnet, save_ldm
from controlnet.datasets.synthetic import write_dataset
from controlnet.models.controlnet import ControlNet
from controlnet.models.tiny import random_tiny_models
from controlnet.train import TrainConfig, Trainer, TrainingError
from controlnet.train.checkpoints import checkpoint_dirs
from controlnet.train.data import DataStream
from controlnet.train.optim import lr_multiplier


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base model file and 16 synthetic scenes at 64 px."""
    folder = tmp_path_factory.mktemp("training")
    model, _ = random_tiny_models(seed=0)
    base = save_ldm(folder / "base.safetensors", model=model)
    data = folder / "scenes"
    write_dataset(data, "scenes", 16, size=64, seed=0)
    return base, data


def config(setup, out: Path, **changes) -> TrainConfig:
    base, data = setup
    settings = dict(
        data=str(data),
        out=str(out),
        base=str(base),
        max_steps=4,
        batch_size=2,
        learning_rate=1e-4,
        checkpoint_every=100,
        validation_count=2,
        validation_steps=2,
        progress=False,
        log_every=1,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.objective.named_parameters() if p.requires_grad}


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path, learning_rate=2e-3, max_steps=25, batch_size=4), log=lambda m: None)
    probe = trainer.batch(range(1000, 1016))  # positions no step reaches: fixed samples and draws
    with torch.no_grad():
        before = trainer.objective.loss(probe).item()
    for _ in range(25):
        trainer.train_step()
    with torch.no_grad():
        after = trainer.objective.loss(probe).item()
    assert after < 0.8 * before, (before, after)


def test_the_prompt_drop_rate_is_what_was_asked(setup, tmp_path):
    for rate in (0.0, 0.5, 1.0):
        trainer = Trainer(config(setup, tmp_path / str(rate), proportion_empty_prompts=rate), log=lambda m: None)
        prompts = [p for start in range(0, 600, 50) for p in trainer.batch(range(start, start + 50))["prompts"]]
        dropped = sum(p == "" for p in prompts) / len(prompts)
        assert abs(dropped - rate) < 0.06, (rate, dropped)


def test_zero_convolutions_leave_the_output_unchanged_yet_get_gradients_at_step_zero(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path), log=lambda m: None)
    objective = trainer.objective
    batch = trainer.batch(range(4))
    alpha = objective.alphas_cumprod[batch["timesteps"]][:, None, None, None]
    noisy = alpha.sqrt() * batch["latents"] + (1 - alpha).sqrt() * batch["noise"]
    with torch.no_grad():
        plain = objective.model.unet(noisy, batch["timesteps"], batch["context"])
        residuals = objective.controlnet(
            noisy, objective.controlnet.encode_hint(batch["hint"]), batch["timesteps"], batch["context"]
        )
        controlled = objective.model.unet(noisy, batch["timesteps"], batch["context"], control=residuals)
    assert torch.equal(plain, controlled)  # bit for bit: every residual is exactly zero
    objective.loss(batch).backward()
    zero_convs = [*objective.controlnet.zero_convs, objective.controlnet.middle_block_out]
    assert all(z[0].weight.grad is not None and z[0].weight.grad.abs().sum() > 0 for z in zero_convs)
    # ... while the copy's own layers get none yet: their path to the output runs through zeros.
    assert objective.controlnet.input_blocks[1][0].in_layers[2].weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in objective.model.parameters())  # the base is locked


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(setup, tmp_path):
    settings = dict(max_steps=6, checkpoint_every=2, keep_checkpoints=2, lr_schedule="cosine", lr_warmup_steps=2)
    whole = Trainer(config(setup, tmp_path / "whole", **settings), log=lambda m: None)
    whole.run()

    first = Trainer(config(setup, tmp_path / "parts", **settings), log=lambda m: None)
    step = first.train_step

    def train_step_then_interrupt():  # Ctrl-C during step 3: the step finishes, a checkpoint is saved
        loss = step()
        if first.step == 3:
            first._request_stop(signal.SIGINT, None)
        return loss

    first.train_step = train_step_then_interrupt
    assert first.run() == []
    assert [p.name for p in checkpoint_dirs(tmp_path / "parts")] == ["step-00000002", "step-00000003"]
    second = Trainer(config(setup, tmp_path / "parts", resume="latest", **settings), log=lambda m: None)
    second.run()
    assert second.step == 6
    expected, got = trainable(whole), trainable(second)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # Checkpoints kept: the last two; the logs hold each step once.
    assert [p.name for p in checkpoint_dirs(tmp_path / "parts")] == ["step-00000004", "step-00000006"]
    steps = [line.split(",")[0] for line in (tmp_path / "parts" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5", "6"]


def test_gaussian_init_replaces_every_zero_layer_and_moves_the_base_from_step_zero(setup, tmp_path):
    zero = Trainer(config(setup, tmp_path / "zero"), log=lambda m: None).objective.controlnet
    gaussian_run = Trainer(config(setup, tmp_path / "gaussian", control_init="gaussian"), log=lambda m: None)
    gaussian = gaussian_run.objective.controlnet
    assert len(gaussian.zero_initialised_convs()) == len(gaussian.zero_convs) + 2
    for before, after in zip(zero.zero_initialised_convs(), gaussian.zero_initialised_convs(), strict=True):
        assert not before.weight.any() and not after.bias.any()
        fan_in = after.in_channels * after.kernel_size[0] * after.kernel_size[1]
        assert abs(after.weight.std().item() * fan_in**0.5 - 1.0) < 0.2  # N(0, 1 / fan_in)
    fresh = ("zero_convs.", "middle_block_out.", "input_hint_block.14.")
    for (name, a), b in zip(zero.state_dict().items(), gaussian.state_dict().values(), strict=True):
        assert name.startswith(fresh) or torch.equal(a, b), name  # nothing else changed
    again = Trainer(config(setup, tmp_path / "again", control_init="gaussian"), log=lambda m: None)
    pairs = zip(gaussian.parameters(), again.objective.controlnet.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # seeded: the same draw again
    # From the first step the ControlNet changes the locked model's images (the paper's objection).
    scores = gaussian_run.validate()
    assert scores["base_distance"] > 0.01


def test_the_vae_loss_penalises_blurred_edges():
    from controlnet.train.objectives import image_gradient_l1

    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0
    blurred = edge.clone()
    blurred[..., 7], blurred[..., 8] = 0.25, 0.75
    assert image_gradient_l1(edge, edge) == 0
    # A uniform shift with the blur's mean pixel error (2 columns x 0.25 of 16): only the blur is penalised.
    shifted = edge + 0.5 / 16
    assert torch.isclose((shifted - edge).abs().mean(), (blurred - edge).abs().mean())
    assert image_gradient_l1(edge, shifted) == 0 and image_gradient_l1(edge, blurred) > 0.01


def test_the_run_exports_a_control_only_file_and_a_diffusers_folder_and_validates(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path, max_steps=2, validate_every=1, ema_decay=0.9), log=lambda m: None)
    paths = trainer.run()
    names = sorted(p.name for p in paths)
    assert names == ["controlnet-diffusers", "controlnet.safetensors"]
    model, _ = random_tiny_models(seed=0)
    loaded = load_controlnet(tmp_path / "controlnet.safetensors", model.config)
    # The export is the EMA's weights.
    ema = dict(zip([n for n, p in trainer.objective.controlnet.named_parameters()], trainer.ema.shadow, strict=True))
    assert all(torch.equal(loaded.state_dict()[name], ema[name]) for name in ema)
    load_controlnet(tmp_path / "controlnet-diffusers", model.config)
    grids = sorted(p.name for p in (tmp_path / "validation").iterdir())
    assert grids == ["step-00000000.png", "step-00000001.png", "step-00000002.png"]  # step 0: the starting point
    lines = (tmp_path / "validation.csv").read_text().splitlines()
    assert lines[0] == "step,edge_f1,edge_f1_no_prompt,base_distance"
    assert lines[1].startswith("0,") and lines[1].endswith(",0.0000")  # zero convs: exactly the base's images
    assert (tmp_path / "loss.png").exists() and (tmp_path / "validation.png").exists()


def test_the_adapter_task_learns_and_exports_files_both_loaders_read(setup, tmp_path):
    """A T2I-Adapter on the frozen base: only the adapter trains, the loss falls, and the export in
    TencentARC's layout and the diffusers folder load to the trained weights (diffusers' own
    T2IAdapter reads the folder to the same features)."""
    from diffusers import T2IAdapter as DiffusersAdapter

    from controlnet.loading import load_adapter

    trainer = Trainer(config(setup, tmp_path, task="adapter", learning_rate=2e-3, max_steps=20), log=lambda m: None)
    assert all(name.startswith("adapter.") for name in trainable(trainer))
    probe = trainer.batch(range(1000, 1008))
    with torch.no_grad():
        before = trainer.objective.loss(probe).item()
    paths = trainer.run()
    with torch.no_grad():
        after = trainer.objective.loss(probe).item()
    assert after < before, (before, after)
    assert sorted(p.name for p in paths) == ["adapter-diffusers", "adapter.safetensors"]
    model, _ = random_tiny_models(seed=0)
    trained = {n.removeprefix("adapter."): t for n, t in trainable(trainer).items()}
    for path in paths:
        loaded = load_adapter(path, model.config)
        assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in trained.items())
    hint = torch.rand(1, 3, 64, 64)
    ours = load_adapter(paths[0], model.config)(hint)
    theirs = DiffusersAdapter.from_pretrained(tmp_path / "adapter-diffusers")(hint)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, theirs, strict=True))


def test_convert_and_info_take_adapters_in_both_layouts(tmp_path, capsys):
    """`controlnet convert` writes an adapter in float16 in TencentARC's layout and as a diffusers
    folder, each loading to the same rounded weights; `info` says what the file holds."""
    from controlnet.cli import main
    from controlnet.formats.t2i_adapter import save_adapter_file
    from controlnet.loading import load_adapter
    from controlnet.models.t2i_adapter import build_adapter
    from controlnet.train.objectives import adapter_config_for

    model, _ = random_tiny_models(seed=0)
    torch.manual_seed(0)
    adapter = build_adapter(adapter_config_for(model.config))
    source = save_adapter_file(tmp_path / "adapter.safetensors", adapter.state_dict())
    main(["convert", str(source), str(tmp_path / "half.safetensors"), "--to", "ldm", "--dtype", "fp16"])
    main(["convert", str(tmp_path / "half.safetensors"), str(tmp_path / "half-diffusers"), "--to", "diffusers"])
    expected = {k: v.half() for k, v in adapter.state_dict().items()}
    for written in (tmp_path / "half.safetensors", tmp_path / "half-diffusers"):
        loaded = load_adapter(written, model.config, dtype=torch.float16).state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    capsys.readouterr()
    main(["info", str(tmp_path / "half-diffusers")])
    assert "T2I-Adapter: full, 3-channel images, feature widths [32, 64]" in capsys.readouterr().out


def test_adapter_timesteps_follow_the_papers_cubic_schedule():
    from controlnet.train.objectives import cubic_timesteps

    uniform = torch.arange(1000)
    cubic = cubic_timesteps(uniform, 1000)
    assert cubic.min() >= 0 and cubic.max() == 999 and cubic[0] == 999
    assert cubic.float().mean().item() == pytest.approx(750, abs=2)  # E[1 - u^3] = 3/4: the noisy end
    assert (cubic >= 500).float().mean().item() == pytest.approx(0.5 ** (1 / 3), abs=0.01)  # P(u^3 <= 1/2)


def test_mixed_precision_checkpointing_accumulation_and_unlocked_decoder_train(setup, tmp_path):
    trainer = Trainer(
        config(
            setup,
            tmp_path,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            gradient_accumulation=2,
            unlock_decoder=True,
            max_steps=1,
        ),
        log=lambda m: None,
    )
    before = trainable(trainer)
    assert any(name.startswith("model.unet.output_blocks") for name in before)
    assert not any(name.startswith("model.unet.input_blocks") for name in before)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4, 1e-5]
    loss = trainer.train_step()
    assert loss > 0 and all(not torch.equal(before[n], p) for n, p in trainable(trainer).items() if "zero_convs" in n)


def test_gradient_checkpointing_gives_the_same_gradients(setup, tmp_path):
    grads = []
    for enabled in (False, True):
        trainer = Trainer(config(setup, tmp_path / str(enabled), gradient_checkpointing=enabled), log=lambda m: None)
        trainer.objective.loss(trainer.batch(range(2))).backward()
        grads.append([p.grad.clone() for p in trainer.objective.controlnet.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_data_stream_layout_does_not_change_what_a_step_sees():
    one = DataStream(10, seed=3, batch_size=4, world_size=1, accumulation=1)
    two = DataStream(10, seed=3, batch_size=2, world_size=2, accumulation=1)
    for step in range(5):
        mine = list(one.positions(step, 0, 0))
        theirs = [*two.positions(step, 0, 0), *two.positions(step, 0, 1)]
        assert mine == theirs
    epoch = [one.index(p) for p in range(10)]
    assert sorted(epoch) == list(range(10)) and epoch != [one.index(p) for p in range(10, 20)]


def test_learning_rate_schedule():
    settings = dict(data="d", out="o", base="b", max_steps=10, lr_warmup_steps=2)
    constant = TrainConfig(**settings)
    assert [lr_multiplier(s, constant) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cosine = TrainConfig(**settings, lr_schedule="cosine")
    assert lr_multiplier(2, cosine) == 1.0 and lr_multiplier(10, cosine) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": "magic"}, "unknown task"),
        ({"max_steps": 0}, "--max-steps must be at least 1"),
        ({"proportion_empty_prompts": 1.5}, "--proportion-empty-prompts"),
        ({"mixed_precision": "fp16"}, "needs a GPU"),
        ({"resolution": 60}, "--resolution must be a multiple of 64 .validation generates at it. between 64 and 2048"),
        ({"resolution": 72}, "--resolution must be a multiple of 64"),  # sizes differ at validation, after the run
        ({"resolution": 60, "task": "vae", "model_config": "tiny"}, "--resolution must be a multiple of 8"),
        ({"resolution": 100_000}, "between 64 and 2048 .the largest size controlnet generate takes."),
        ({"validation_count": 0}, "--validation-count must be at least 1, got 0"),
        ({"learning_rate": float("inf")}, r"--learning-rate must be a finite number in \(0, 1\], got inf"),
        ({"max_grad_norm": -1.0}, "--max-grad-norm must be a finite number >= 0, got -1.0"),
        ({"device": "meta"}, "--device meta: this runs on cpu, cuda, cuda:N only"),
        ({"base": None}, "needs --base"),
        ({"control_init": "uniform"}, "--control-init must be one of zero, gaussian"),
        ({"control_init": "gaussian", "controlnet": "x.safetensors"}, "applies to a new ControlNet"),
        ({"gradient_loss_weight": -1.0}, "--gradient-loss-weight must be a finite number >= 0, got -1.0"),
        ({"task": "adapter", "base": None}, "the adapter task needs --base"),
        ({"task": "adapter", "unlock_decoder": True}, "apply to the controlnet task"),
        ({"crop_size": 32}, "--crop-size applies to the vae task"),
        ({"task": "vae", "model_config": "tiny", "crop_size": 36}, "--crop-size must be a multiple of 8"),
        ({"task": "vae", "model_config": "tiny", "crop_size": 72}, "at most the training resolution 64, got 72"),
        ({"task": "vae", "model_config": "tiny", "crop_size": 4}, "--crop-size must be at least 8"),
    ],
)
def test_bad_settings_are_refused_in_one_line(setup, tmp_path, changes, message):
    with pytest.raises(TrainingError, match=message):
        Trainer(config(setup, tmp_path, **changes), log=lambda m: None)


def _cli(*arguments: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "controlnet", *arguments]
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, **kwargs)


def _train_args(setup, out: Path, *extra: str) -> list[str]:
    base, data = setup
    common = ["--data", str(data), "--base", str(base), "--out", str(out), "--learning-rate", "1e-4"]
    return ["train", *common, "--validation-steps", "2", "--validation-count", "1", *extra]


def test_a_run_killed_at_any_moment_resumes_and_matches(setup, tmp_path):
    """kill -9 while training: every checkpoint left is complete; --resume latest finishes the run
    with the same weights as an uninterrupted one."""
    args = ["--max-steps", "8", "--batch-size", "2", "--checkpoint-every", "1", "--keep-checkpoints", "3"]
    whole = _cli(*_train_args(setup, tmp_path / "whole", *args), stdout=subprocess.DEVNULL)
    killed = _cli(*_train_args(setup, tmp_path / "killed", *args), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name >= "step-00000003" for p in checkpoint_dirs(tmp_path / "killed")):
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait() == 0
    for folder in checkpoint_dirs(tmp_path / "killed"):
        torch.load(folder / "state.pt", weights_only=True)  # complete and readable
    resumed = _cli(*_train_args(setup, tmp_path / "killed", *args, "--resume", "latest"), stdout=subprocess.DEVNULL)
    assert resumed.wait() == 0
    model, _ = random_tiny_models(seed=0)
    a = load_controlnet(tmp_path / "whole" / "controlnet.safetensors", model.config).state_dict()
    b = load_controlnet(tmp_path / "killed" / "controlnet.safetensors", model.config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy, port", [("ddp", 29533), ("fsdp", 29534)])
def test_two_processes_equal_one_with_the_same_global_batch(setup, tmp_path, strategy, port):
    """torchrun with 2 CPU processes (gloo), batch 2 each, against 1 process with batch 4: DDP
    (replicas) and FSDP (the ControlNet sharded); checkpoints and EMA gathered from the shards."""
    args = ["--max-steps", "3", "--checkpoint-every", "2", "--ema-decay", "0.5"]
    one = _cli(*_train_args(setup, tmp_path / "one", *args, "--batch-size", "4"), stdout=subprocess.DEVNULL)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    two_args = _train_args(setup, tmp_path / "two", *args, "--batch-size", "2", "--strategy", strategy)
    two = subprocess.Popen(
        [*torchrun, "-m", "controlnet", *two_args],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.wait() == 0 and two.wait() == 0
    model, _ = random_tiny_models(seed=0)
    start = ControlNet.from_unet(model.unet, model.config.controlnet()).state_dict()
    a = load_controlnet(tmp_path / "one" / "controlnet.safetensors", model.config).state_dict()
    b = load_controlnet(tmp_path / "two" / "controlnet.safetensors", model.config).state_dict()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)  # what 3 steps of training changed
    differ = max((a[k] - b[k]).abs().max().item() for k in a)
    # Rounding only (batches of 2 vs 4, the all-reduce's order, then Adam): measured 4e-4 of the
    # movement, as between batch 4 and batch 2 x accumulation 2 in one process. Different samples
    # or draws per step would differ by about the movement itself.
    assert moved > 1e-5 and differ < 5e-3 * moved
    # Resuming the 2-process run from its step-2 checkpoint (gathered, then scattered back to the
    # shards) gives its step-3 weights again.
    first = b
    resume = ["--resume", str(tmp_path / "two" / "checkpoints" / "step-00000002")]
    again = subprocess.Popen([*torchrun, "-m", "controlnet", *two_args, *resume], stdout=subprocess.DEVNULL)
    assert again.wait() == 0
    b = load_controlnet(tmp_path / "two" / "controlnet.safetensors", model.config).state_dict()
    assert max((first[k] - b[k]).abs().max().item() for k in a) < 1e-6 * moved


def test_the_train_command_takes_its_flags_defaults_and_help_from_the_config_fields(capsys, monkeypatch):
    import argparse
    import dataclasses

    from controlnet.cli import train as train_command

    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())

    def parse(*extra: str) -> TrainConfig:
        return train_command.config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o", *extra]))

    assert parse() == TrainConfig(data="d", out="o")  # every default is the field's
    flags = ["--no-cache", "--max-grad-norm", "0", "--unlock-decoder", "--task", "vae", "--ema-decay", "0.99"]
    expected = dict(cache=False, max_grad_norm=None, unlock_decoder=True, task="vae", ema_decay=0.99)
    assert parse(*flags) == TrainConfig(data="d", out="o", **expected)  # --max-grad-norm 0: no clipping
    with pytest.raises(SystemExit):
        parse("--mixed-precision", "fp32")  # the field's choices
    monkeypatch.setenv("COLUMNS", "1000")  # no help text broken over lines
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in dataclasses.fields(TrainConfig):  # each option: its flag, its value's name, its help
        flag = spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")
        described = re.search(rf"{re.escape(flag)}(?: \S+)? {re.escape(spec.metadata['help'])}", text)
        assert (described is not None) == spec.metadata["cli"], flag
    assert "--max-steps MAX_STEPS optimiser steps to train for (default: 1000)" in text
    assert "--weight-decay" not in text and "--progress" not in text  # settings of the Python API only


def test_train_and_add_control_commands_report_mistakes_in_one_line(setup, tmp_path, capsys):
    from controlnet.cli import main

    base, data = setup
    out = ["--out", str(tmp_path / "o"), "--base", str(base)]
    assert main(["train", "--data", str(tmp_path / "nope"), *out]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["train", "--data", str(data), *out, "--max-steps", "0"]) == 2  # a bad option, as argparse's
    assert capsys.readouterr().err.strip().endswith("--max-steps must be at least 1, got 0")
    assert main(["train", "--data", str(tmp_path), *out]) == 1
    assert "prompt.json" in capsys.readouterr().err  # not a dataset folder
    out = tmp_path / "control.safetensors"
    assert main(["add-control", str(base), str(out)]) == 0
    model, _ = random_tiny_models(seed=0)
    controlnet = load_controlnet(out, model.config)
    assert all(not p.any() for p in controlnet.zero_convs.parameters())
    assert main(["add-control", str(base), str(out)]) == 2  # nothing overwritten without --overwrite


@pytest.mark.parametrize("task", ["vae", "base"])
def test_small_base_models_train_from_scratch(setup, tmp_path, task):
    """The same command trains the VAE, then the UNet with its text encoder, of a preset."""
    base = setup[0]  # for the base task: the file whose VAE is used (a trained one in practice)
    settings = dict(task=task, model_config="tiny", learning_rate=5e-3, max_steps=40, batch_size=4)
    trainer = Trainer(config(setup, tmp_path, **settings), log=lambda m: None)
    probe = trainer.batch(range(1000, 1008))
    with torch.no_grad():
        before = trainer.objective.loss(probe).item()
    for _ in range(40):
        trainer.train_step()
    with torch.no_grad():
        after = trainer.objective.loss(probe).item()
    assert after < 0.75 * before, (before, after)
    (path,) = trainer.objective.export(tmp_path, trainer.trainable_state())
    from controlnet.checkpoints import load_base

    model = load_base(path)
    assert model.config.unet == trainer.model.config.unet
    if task == "base":  # the VAE came from --base, untouched
        assert torch.equal(model.vae.encoder.conv_in.weight, load_base(base).vae.encoder.conv_in.weight)


def test_the_adversarial_term_trains_each_player_on_its_own_loss_in_one_step(setup, tmp_path):
    """--adversarial-weight: one backward pass gives the discriminator the gradient of its hinge
    loss alone (the generator's term reaches it through detached weights) and the reconstruction
    the gradient of the balanced generator term alone (the discriminator's sees it detached)."""
    settings = dict(task="vae", model_config="tiny", adversarial_weight=0.5, max_steps=2, batch_size=2)
    trainer = Trainer(config(setup, tmp_path, **settings), log=lambda m: None)
    objective = trainer.objective
    discriminator = list(objective.discriminator.parameters())
    assert {id(p) for p in discriminator} <= {id(p) for p in trainer.trainable}  # one optimiser, both players
    real = trainer.batch(range(2))["image"]
    fake = objective.model.vae(real).float()
    rec = (fake - real).abs().mean()
    total = objective.adversarial_loss(rec, fake, real)
    to_discriminator = torch.autograd.grad(total, discriminator, retain_graph=True)
    hinge = 0.5 * (
        F.relu(1 - objective.discriminator(real)).mean() + F.relu(1 + objective.discriminator(fake.detach())).mean()
    )
    expected = torch.autograd.grad(hinge, discriminator)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(to_discriminator, expected, strict=True))
    (to_fake,) = torch.autograd.grad(total, fake, retain_graph=True)
    last = objective.vae.decoder.conv_out.weight
    generator = -objective.discriminator(fake).mean()
    balance = torch.autograd.grad(rec, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(generator, last, retain_graph=True)[0].norm() + 1e-4
    )
    (expected_fake,) = torch.autograd.grad(0.5 * balance.detach() * generator, fake)
    assert to_fake.abs().sum() > 0 and torch.allclose(to_fake, expected_fake, atol=1e-6)
    before = [p.detach().clone() for p in discriminator]
    trainer.train_step()
    assert all(not torch.equal(a, b) for a, b in zip(before, discriminator, strict=True))
    with pytest.raises(TrainingError, match="--adversarial-weight applies to the vae task"):
        Trainer(config(setup, tmp_path / "other", adversarial_weight=0.5), log=lambda m: None)


def test_the_vae_task_trains_on_random_crops_drawn_from_each_sample(setup, tmp_path):
    """--crop-size: each image of a batch is a crop of its sample at an offset of the sample's own
    draws (the same batch again is the same crops), with posterior noise of the crop's latent size."""
    settings = dict(task="vae", model_config="tiny", crop_size=32, max_steps=2, batch_size=3)
    trainer = Trainer(config(setup, tmp_path, **settings), log=lambda m: None)
    batch = trainer.batch(range(3))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["posterior_noise"].shape == (3, 4, 4, 4)
    assert torch.equal(trainer.batch(range(3))["image"], batch["image"])
    corners = []
    for position, crop in enumerate(batch["image"]):
        whole = trainer.dataset[trainer.stream.index(position)]["image"]
        offsets = {
            (top, left)
            for top in range(33)
            for left in range(33)
            if torch.equal(whole[:, top : top + 32, left : left + 32], crop)
        }
        assert offsets, f"sample {position}'s crop is not a window of its image"
        corners.append((0, 0) in offsets)
    assert not all(corners)  # the offsets are drawn, not always the corner
    trainer.train_step()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(setup, tmp_path):
    args = ["--max-steps", "100000", "--batch-size", "1", "--checkpoint-every", "1000", "--log-every", "1"]
    run = _cli(*_train_args(setup, tmp_path, *args), stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.csv").exists():  # training has started
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0
    (saved,) = checkpoint_dirs(tmp_path)
    step = int(saved.name.removeprefix("step-"))
    assert step >= 1 and f"stopped at step {step}; continue with --resume latest" in output


def test_the_vae_task_calibrates_the_latent_scale_and_the_base_task_takes_it(setup, tmp_path):
    from controlnet.checkpoints import load_base

    vae_run = config(setup, tmp_path / "vae", task="vae", model_config="tiny", max_steps=2, learning_rate=1e-3)
    Trainer(vae_run, log=lambda m: None).run()
    vae = load_base(tmp_path / "vae" / "vae.safetensors")
    images = torch.stack([Trainer(vae_run, log=lambda m: None).dataset[i]["image"] for i in range(16)])
    with torch.no_grad():
        std = vae.vae.encode(images).mean.std().item()
    assert vae.config.vae.scale_factor == pytest.approx(1 / std, rel=0.05)  # unit-variance latents
    base_run = config(
        setup, tmp_path / "base", task="base", model_config="tiny", base=str(tmp_path / "vae" / "vae.safetensors")
    )
    trainer = Trainer(base_run, log=lambda m: None)
    assert trainer.model.vae.scale_factor == vae.config.vae.scale_factor


@pytest.mark.parametrize("cache", [True, False])
def test_bf16_keeps_the_frozen_base_in_bf16_through_steps_and_validation(setup, tmp_path, cache):
    trainer = Trainer(
        config(setup, tmp_path, mixed_precision="bf16", cache=cache, max_steps=2, validate_every=1),
        log=lambda m: None,
    )
    trainer.run()
    model = trainer.model
    assert {p.dtype for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.objective.controlnet.parameters()} == {torch.float32}  # master weights
    assert trainer.step == 2 and (tmp_path / "validation" / "step-00000002.png").exists()


# -- numbers that stop being finite (issue 16) -----------------------------------------------------


def test_a_nan_loss_stops_the_run_in_one_line_and_keeps_the_good_checkpoints(setup, tmp_path, capsys, monkeypatch):
    """Step 3's loss is NaN (as a learning rate far too high gives): the run stops there, names the
    step and the likely cause, saves nothing of that step, exports nothing; step 2 stays the newest
    checkpoint, intact."""
    from controlnet.cli import main
    from controlnet.train.checkpoints import read_checkpoint
    from controlnet.train.objectives import ControlNetObjective

    real_loss, calls = ControlNetObjective.loss, []

    def loss(self, batch):
        calls.append(1)
        value = real_loss(self, batch)
        return value * float("nan") if len(calls) >= 3 else value

    monkeypatch.setattr(ControlNetObjective, "loss", loss)
    out = tmp_path / "run"
    args = _train_args(setup, out, "--max-steps", "5", "--batch-size", "2", "--checkpoint-every", "1")
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("controlnet train: error: step 3: the loss is nan"), err
    assert "--learning-rate 0.0001" in err and str(checkpoint_dirs(out)[-1]) in err
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000001", "step-00000002"]
    assert read_checkpoint(checkpoint_dirs(out)[-1])["step"] == 2
    assert not (out / "controlnet.safetensors").exists() and not (out / "controlnet-diffusers").exists()


def test_nan_gradients_stop_before_the_update(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path), log=lambda m: None)
    trainer.train_step()
    before = trainable(trainer)
    weight = trainer.objective.controlnet.zero_convs[0][0].weight
    weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    with pytest.raises(TrainingError, match=r"^step 2: the gradient norm is nan \(the loss was [0-9.]+\): training"):
        trainer.train_step()
    after = trainable(trainer)
    assert trainer.step == 1 and all(torch.equal(before[n], after[n]) for n in before)  # not updated


def test_nan_gradients_are_found_without_clipping_too(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path, max_grad_norm=None), log=lambda m: None)
    weight = trainer.objective.controlnet.zero_convs[0][0].weight
    weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(TrainingError, match="step 1: the gradient norm is inf"):
        trainer.train_step()


def test_non_finite_weights_stop_the_run_and_are_never_checkpointed(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path), log=lambda m: None)
    step = trainer.optimizer.step

    def step_then_overflow(*args, **kwargs):
        result = step(*args, **kwargs)
        with torch.no_grad():
            trainer.trainable[0].view(-1)[0] = float("inf")
        return result

    trainer.optimizer.step = step_then_overflow
    trainer.train_step()  # not checked at every step (a pass over the weights): at saving, and by the next loss
    with pytest.raises(TrainingError, match="step 1: the weights hold NaN or infinite values; no checkpoint written"):
        trainer.save()
    assert checkpoint_dirs(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".*"))
    trainer.config.max_steps = 1  # the run ends here: its final checkpoint is refused, nothing exported
    with pytest.raises(TrainingError, match="step 1: the weights hold NaN or infinite values; no checkpoint written"):
        trainer.run()
    assert checkpoint_dirs(tmp_path) == [] and not (tmp_path / "controlnet.safetensors").exists()
    trainer.optimizer.step = step
    with pytest.raises(TrainingError, match="step 2: the loss is nan"):
        trainer.train_step()


# -- resuming past a damaged checkpoint (issue 16) -------------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints(setup, tmp_path_factory) -> Path:
    """A run of 3 steps with a checkpoint at each (copied by the tests that damage them)."""
    out = tmp_path_factory.mktemp("three-checkpoints")
    Trainer(config(setup, out, max_steps=3, checkpoint_every=1, keep_checkpoints=5), log=lambda m: None).run()
    return out


def _truncate(folder: Path) -> None:
    state = folder / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _delete(folder: Path) -> None:
    (folder / "state.pt").unlink()


def _overwrite(folder: Path) -> None:  # same size, other bytes: only the hash tells
    state = folder / "state.pt"
    state.write_bytes(os.urandom(state.stat().st_size))


def _garble_manifest(folder: Path) -> None:
    (folder / "checkpoint.json").write_text("{")


def _truncate_old_style(folder: Path) -> None:  # written before manifests: loading tells
    (folder / "checkpoint.json").unlink()
    _truncate(folder)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate, "were written (truncated or overwritten)"),
        (_delete, "state.pt is missing"),
        (_overwrite, "differs from what was written (SHA-256 mismatch)"),
        (_garble_manifest, "its manifest checkpoint.json is unreadable"),
        (_truncate_old_style, "state.pt cannot be read"),
    ],
)
def test_resume_passes_over_a_damaged_latest_checkpoint(setup, three_checkpoints, tmp_path, damage, reason):
    from controlnet.train.checkpoints import read_checkpoint

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    latest = out / "checkpoints" / "step-00000003"
    damage(latest)
    messages: list[str] = []
    settings = dict(max_steps=4, checkpoint_every=1, keep_checkpoints=5, resume="latest")
    trainer = Trainer(config(setup, out, **settings), log=messages.append)
    trainer.run()
    warnings = [m for m in messages if "damaged" in m and "passed over" in m]
    assert len(warnings) == 1 and f"{latest}: " in warnings[0] and reason in warnings[0], messages
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in messages
    assert trainer.step == 4
    # The damaged one is kept aside, no longer a checkpoint; step 3 is trained again, to the same weights.
    assert (out / "checkpoints" / "damaged-step-00000003").is_dir()
    assert [p.name for p in checkpoint_dirs(out)] == [f"step-0000000{i}" for i in (1, 2, 3, 4)]
    again = read_checkpoint(out / "checkpoints" / "step-00000003")["trainable"]
    original = read_checkpoint(three_checkpoints / "checkpoints" / "step-00000003")["trainable"]
    assert all(torch.equal(again[name], original[name]) for name in original)


def test_the_train_command_reports_a_truncated_checkpoint_in_one_line_and_resumes(
    setup, three_checkpoints, tmp_path, capsys
):
    from controlnet.cli import main

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    _truncate(out / "checkpoints" / "step-00000003")
    args = _train_args(setup, out, "--max-steps", "4", "--batch-size", "2", "--checkpoint-every", "1")
    assert main([*args, "--resume", "latest"]) == 0
    output = capsys.readouterr()
    reports = [line for line in output.out.splitlines() if "damaged" in line]
    assert len(reports) == 2 and "step-00000003" in reports[0] and "truncated" in reports[0], reports
    assert "resumed from" in output.out and "step-00000002 at step 2" in output.out
    assert "Traceback" not in output.err and (out / "controlnet.safetensors").exists()


def test_resume_with_no_intact_checkpoint_is_a_one_line_error(setup, three_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    for folder in checkpoint_dirs(out):
        _truncate(folder)
    trainer = Trainer(config(setup, out, max_steps=4, resume="latest"), log=lambda m: None)
    with pytest.raises(TrainingError, match=r"no intact checkpoint in .*step-00000003.*step-00000001") as error:
        trainer.run()
    assert "\n" not in str(error.value)
    assert len(checkpoint_dirs(out)) == 3 and not list((out / "checkpoints").glob("damaged-*"))  # nothing moved
    named = config(setup, out, max_steps=4, resume=str(out / "checkpoints" / "step-00000002"))
    expected = r"step-00000002: cannot resume from it: state.pt is .* \(truncated or overwritten\)$"
    with pytest.raises(TrainingError, match=expected):
        Trainer(named, log=lambda m: None).run()


def test_a_checkpoint_that_cannot_be_written_leaves_the_earlier_ones(setup, three_checkpoints, tmp_path, monkeypatch):
    import errno

    from controlnet.train.checkpoints import read_checkpoint

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    trainer = Trainer(config(setup, out, max_steps=4, checkpoint_every=1, resume="latest"), log=lambda m: None)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(TrainingError, match=r"cannot write the checkpoint .*step-00000004 \(No space left on device\)"):
        trainer.run()
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000001", "step-00000002", "step-00000003"]
    assert not list((out / "checkpoints").glob(".*"))  # no half-written checkpoint left
    assert all(read_checkpoint(folder) for folder in checkpoint_dirs(out))


def test_a_run_killed_between_the_renames_of_a_resave_gets_its_checkpoint_back(setup, three_checkpoints, tmp_path):
    """Resaving step N moves the old step-N aside, then renames the new one in: killed in between,
    step N is missing and only the hidden copy holds it. The next run puts it back."""
    from controlnet.train.checkpoints import read_checkpoint, recover_checkpoints

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    folder = out / "checkpoints"
    os.replace(folder / "step-00000003", folder / ".step-00000003.old-4242")
    (folder / ".step-00000002.old-4242").mkdir()  # a leftover beside an intact step 2: removed
    (folder / ".step-00000004.tmp-4242").mkdir()  # half-written: removed
    recover_checkpoints(out)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000001", "step-00000002", "step-00000003"]
    assert not list(folder.glob(".*")) and read_checkpoint(folder / "step-00000003")["step"] == 3


def test_resuming_from_a_checkpoint_of_another_model_is_a_one_line_error(setup, three_checkpoints, tmp_path):
    """Another --base (another shape) used to fail deep in copy_ with a traceback."""
    folder = tmp_path / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    state = torch.load(three_checkpoints / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    name = next(iter(state["trainable"]))
    state["trainable"][name] = torch.zeros(3, 3)
    torch.save(state, folder / "state.pt")  # without a manifest: as checkpoints written before them
    trainer = Trainer(config(setup, tmp_path, max_steps=3, resume=str(folder)), log=lambda m: None)
    with pytest.raises(TrainingError, match=rf"{name} is \[3, 3\], this run's .*: it was trained for another model"):
        trainer.run()

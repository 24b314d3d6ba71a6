"""Reading and writing checkpoints (controlnet.loading, controlnet.formats): every format, round trips,
safety, and errors users can act on."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from controlnet.config import SD15, SD21, TINY, WORLD, ModelConfig
from controlnet.formats.detect import base_config_from_shapes, detect_format, inspect_contents
from controlnet.formats.diffusers import save_diffusers
from controlnet.formats.diffusers_text import text_ldm_to_diffusers
from controlnet.formats.diffusers_unet import controlnet_ldm_to_diffusers
from controlnet.formats.errors import CheckpointError
from controlnet.formats.ldm import ldm_state_dict, save_ldm, split_ldm
from controlnet.formats.tensors import read_state_dict
from controlnet.loading import load_base, load_controlnet, load_strict, transfer_control
from controlnet.models.controlnet import ControlNet
from controlnet.models.stable_diffusion import StableDiffusion

from .helpers import randomize

KEYS = json.loads((Path(__file__).parent / "data" / "ldm_keys.json").read_text())
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_mean_coef1")


@pytest.fixture(scope="module")
def tiny() -> tuple[StableDiffusion, ControlNet]:
    model = randomize(StableDiffusion(TINY), seed=5).eval()
    controlnet = randomize(ControlNet(TINY.controlnet()), seed=6).eval()
    return model, controlnet


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _tiny_ldm(model: StableDiffusion, controlnet: ControlNet | None = None) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ldm_state_dict(model, controlnet).items()}


# --- full-size layouts --------------------------------------------------------------------------


def _random_tensors(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            tensors[key] = torch.arange(shape[-1])[None]
        else:
            tensors[key] = (
                torch.randn(shape, generator=generator)
                if len(shape) < 2
                else torch.empty(shape).normal_(generator=generator)
            )
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v15", "v21"])
def test_every_original_key_loads_and_the_ldm_round_trip_is_bit_identical(version, tmp_path):
    """All of ldm_keys.json goes into our models and comes back out unchanged (v21 lacks a text encoder)."""
    config: ModelConfig = SD15 if version == "v15" else SD21
    original = _random_tensors(KEYS[version], seed=1)
    parts = split_ldm(original)
    model = StableDiffusion(config, empty=True)
    load_strict(model.unet, parts["unet"], "UNet", version)
    load_strict(model.vae, parts["vae"], "VAE", version)
    if version == "v15":
        load_strict(model.text_encoder, parts["text"], "text encoder", version)
    controlnet = load_controlnet_from_parts(parts["control"], config)
    written = ldm_state_dict(model, controlnet)
    if version == "v21":
        written = {k: v for k, v in written.items() if not k.startswith("cond_stage_model.")}
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)


def load_controlnet_from_parts(control: dict[str, torch.Tensor], config: ModelConfig) -> ControlNet:
    from controlnet.models.stable_diffusion import build_empty

    controlnet = build_empty(lambda: ControlNet(config.controlnet()))
    load_strict(controlnet, control, "ControlNet", "test")
    return controlnet


# --- LDM files ----------------------------------------------------------------------------------


def test_safetensors_ldm_file_round_trip_keeps_every_bit(tiny, tmp_path):
    model, controlnet = tiny
    path = save_ldm(tmp_path / "full.safetensors", model, controlnet)
    _assert_same_weights(load_base(path).unet, model.unet)
    _assert_same_weights(load_base(path).vae, model.vae)
    _assert_same_weights(load_base(path).text_encoder, model.text_encoder)
    _assert_same_weights(load_controlnet(path), controlnet)
    written, _ = read_state_dict(path)
    assert written.keys() == ldm_state_dict(model, controlnet).keys()
    assert torch.equal(
        written["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None]
    )
    assert inspect_contents(path).has_base and inspect_contents(path).has_controlnet


@pytest.mark.parametrize("wrapped", [True, False])
@pytest.mark.parametrize("position_ids", [True, False])
def test_pickled_ckpt_with_wrapper_ema_schedule_and_optional_position_ids(tiny, tmp_path, wrapped, position_ids):
    model, _ = tiny
    state_dict = _tiny_ldm(model)
    if not position_ids:
        del state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    for name in SCHEDULE_BUFFERS:
        state_dict[name] = torch.rand(1000, dtype=torch.float32)
    for key, value in model.unet.state_dict().items():  # model_ema.* names drop the dots
        state_dict["model_ema." + ("diffusion_model." + key).replace(".", "")] = value + 1
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    state_dict["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    payload = {"state_dict": state_dict, "global_step": 840000, "epoch": 5} if wrapped else state_dict
    path = tmp_path / "model.ckpt"
    torch.save(payload, path)

    loaded = load_base(path)
    _assert_same_weights(loaded.unet, model.unet)
    _assert_same_weights(loaded.text_encoder, model.text_encoder)
    ema = load_base(path, use_ema=True).unet.state_dict()
    assert all(torch.equal(ema[k], v + 1) for k, v in model.unet.state_dict().items())


def test_controlnet_10_full_file_11_control_only_and_bare_files(tiny, tmp_path):
    model, controlnet = tiny
    full = tmp_path / "control_sd15_canny.pth"
    torch.save({"state_dict": _tiny_ldm(model, controlnet)}, full)
    control_only = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save({"control_model." + k: v.clone() for k, v in controlnet.state_dict().items()}, control_only)
    bare = tmp_path / "bare_control.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(bare))

    assert [detect_format(read_state_dict(p)[0]) for p in (full, control_only, bare)] == [
        "ldm",
        "ldm-control",
        "ldm-control-bare",
    ]
    for path in (full, control_only, bare):
        _assert_same_weights(load_controlnet(path, model.config), controlnet)
    _assert_same_weights(load_base(full).unet, model.unet)  # 1.0 files: the UNet comes from the file
    with pytest.raises(CheckpointError, match="holds a ControlNet only"):
        load_base(control_only)


def test_shuffle_controlnet_pools_by_name_and_by_stored_config(tiny, tmp_path):
    _, controlnet = tiny
    path = tmp_path / "control_v11e_sd15_shuffle.pth"
    torch.save({"control_model." + k: v for k, v in controlnet.state_dict().items()}, path)
    assert load_controlnet(path).config.global_average_pooling
    assert not load_controlnet(path, global_average_pooling=False).config.global_average_pooling
    pooled = load_controlnet(path)
    saved = save_ldm(tmp_path / "renamed.safetensors", controlnet=pooled)
    assert load_controlnet(saved).config.global_average_pooling  # kept in the file's metadata


# --- diffusers ------------------------------------------------------------------------------------


def test_diffusers_folder_round_trip_and_ldm_equivalence(tiny, tmp_path):
    model, controlnet = tiny
    folder = save_diffusers(tmp_path / "pipeline", model, controlnet)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "controlnet"):
        assert (folder / sub).is_dir(), sub
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    again = load_base(folder)
    assert again.config.unet == model.config.unet and again.config.schedule == model.config.schedule
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(again, name), getattr(model, name))
    _assert_same_weights(load_controlnet(folder), controlnet)
    _assert_same_weights(load_controlnet(folder / "controlnet"), controlnet)

    # diffusers -> ours -> diffusers: every file bit-identical.
    second = save_diffusers(tmp_path / "again", again, load_controlnet(folder))
    for sub, name in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("controlnet", "diffusion_pytorch_model"),
    ]:
        first_weights = read_state_dict(folder / sub / f"{name}.safetensors")[0]
        second_weights = read_state_dict(second / sub / f"{name}.safetensors")[0]
        assert first_weights.keys() == second_weights.keys()
        assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)


def test_diffusers_pipeline_loads_our_folder(tiny, tmp_path):
    """The folder we write is a real diffusers pipeline: diffusers loads it and gets our weights."""
    diffusers = pytest.importorskip("diffusers")
    model, controlnet = tiny
    folder = save_diffusers(tmp_path / "pipeline", model, controlnet)
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(folder, safety_checker=None)
    ours = text_ldm_to_diffusers(model.text_encoder.state_dict(), model.config.text)
    theirs = pipe.text_encoder.state_dict()
    for key, value in ours.items():
        their_key = key if key in theirs else key.removeprefix("text_model.")
        assert torch.equal(theirs[their_key], value), key
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_single_diffusers_controlnet_file(tiny, tmp_path):
    model, controlnet = tiny
    path = tmp_path / "community_controlnet.safetensors"
    save_file(
        {k: v.contiguous() for k, v in controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config).items()},
        str(path),
    )
    assert detect_format(read_state_dict(path)[0]) == "diffusers-controlnet"
    _assert_same_weights(load_controlnet(path, model.config), controlnet)
    _assert_same_weights(load_controlnet(path), controlnet)  # tiny is told apart by its shapes
    written = save_diffusers(tmp_path / "written.safetensors", controlnet=controlnet)
    assert read_state_dict(written)[0].keys() == read_state_dict(path)[0].keys()


# --- safety ---------------------------------------------------------------------------------------


class _CreatesAFile:
    """A pickle payload that, if unpickled by a plain pickle.load, would create a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("container", ["torch-zip", "legacy-pickle", "pickle-protocol-5"])
def test_a_pickle_that_would_run_code_is_refused_not_executed(tmp_path, container):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"weight": torch.zeros(1)}, "hook": _CreatesAFile(target)}
    if container == "torch-zip":
        torch.save(payload, path)
    elif container == "legacy-pickle":  # the pre-1.6 torch.save format many .ckpt files use
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=5))
    assert not target.exists()
    # A plain pickle (not torch.save's format) is refused the same way, never with torch's own text.
    expected = r"refused: this pickle would run code \(.*open"
    with pytest.raises(CheckpointError, match=expected):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match=expected):
        load_controlnet(path)
    assert not target.exists()


def test_lightning_bookkeeping_and_numpy_scalars_in_a_training_checkpoint_are_tolerated(tiny, tmp_path, monkeypatch):
    """SD 1.x training checkpoints pickle Lightning's ModelCheckpoint callback and numpy scalars
    beside the weights: those load (as inert data) without Lightning installed."""
    import sys
    import types

    import numpy as np

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    callback = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = callback
    instance = callback()
    instance.best_model_score = np.float64(0.1)
    model, controlnet = tiny
    path = tmp_path / "control_sd15_scribble.pth"
    torch.save(
        {
            "state_dict": _tiny_ldm(model, controlnet),
            "callbacks": {callback: instance},
            "global_step": np.int64(840000),
        },
        path,
    )
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    _assert_same_weights(load_controlnet(path), controlnet)


# --- errors users can act on ------------------------------------------------------------------------


def test_missing_unexpected_and_mismatched_keys_are_listed_with_file_and_format(tiny, tmp_path):
    _model, controlnet = tiny
    state_dict = {"control_model." + k: v.clone() for k, v in controlnet.state_dict().items()}
    del state_dict["control_model.zero_convs.0.0.weight"]
    state_dict["control_model.extra.weight"] = torch.zeros(1)
    state_dict["control_model.middle_block_out.0.bias"] = torch.zeros(7)
    path = tmp_path / "broken_control.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(CheckpointError) as caught:
        load_controlnet(path)
    message = str(caught.value)
    assert "broken_control.safetensors (ldm-control)" in message
    assert "1 missing: zero_convs.0.0.weight" in message
    assert "1 unexpected: extra.weight" in message
    assert "middle_block_out.0.bias (file [7], model [64])" in message
    assert "\n" not in message


def test_many_missing_keys_show_the_first_few_and_the_count(tiny, tmp_path):
    model, _ = tiny
    state_dict = _tiny_ldm(model)
    for key in [k for k in state_dict if k.startswith("model.diffusion_model.output_blocks.")]:
        del state_dict[key]
    path = tmp_path / "truncated.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(CheckpointError, match=r"the UNet weights do not fit the model; \d+ missing: .*\(\d+ in all\)"):
        load_base(path)


def test_sd2_controlnet_with_sd1_base_is_refused(tmp_path):
    with torch.device("meta"):
        sd21_control = ControlNet(SD21.controlnet())
    path = tmp_path / "control_v11p_sd21_canny.safetensors"
    shapes = {
        "control_model." + k: torch.zeros(v.shape[:1] + (1,) * (v.ndim - 1)).expand(v.shape)
        for k, v in sd21_control.state_dict().items()
        if k.startswith(("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.0.0", "input_hint_block"))
    }
    save_file({k: v.contiguous() for k, v in shapes.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"made for SD 2.x but the base model is SD 1.x \(sd15\)"):
        load_controlnet(path, SD15)


def test_a_three_stage_hint_encoder_loads_from_every_layout_and_only_onto_its_vae(tmp_path):
    """The world model's 4x VAE takes a ControlNet whose hint encoder has three stages: its files
    say so by their shapes alone, in both layouts, and a base whose VAE downsamples 8x refuses it."""
    controlnet = randomize(ControlNet(WORLD.controlnet()), seed=7).eval()
    ldm = tmp_path / "world-depth.safetensors"
    save_file({"control_model." + k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(ldm))
    diffusers_file = tmp_path / "world-depth-diffusers.safetensors"
    save_file(
        {k: v.contiguous() for k, v in controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config).items()},
        str(diffusers_file),
    )
    for path in (ldm, diffusers_file):
        loaded = load_controlnet(path)
        assert loaded.config.hint_block_channels == (16, 32, 64)
        _assert_same_weights(loaded, controlnet)
        _assert_same_weights(load_controlnet(path, WORLD), controlnet)
    eightfold = WORLD.replace(
        vae=dataclasses.replace(WORLD.vae, ch_mult=(1, 2, 4, 4)), control_hint_block_channels=(16, 32, 64, 64)
    )
    with pytest.raises(CheckpointError, match="hint encoder shrinks images 4x but the base model's VAE 8x"):
        load_controlnet(ldm, eightfold)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"\x00" * 64, "unknown file type|not a readable|not a valid"),
        (b"not a checkpoint at all", "not a readable PyTorch checkpoint"),
    ],
)
def test_corrupt_and_empty_files_give_one_line_errors(tmp_path, content, message):
    for suffix in (".ckpt", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message if suffix == ".ckpt" else "empty|not a valid") as caught:
            read_state_dict(path)
        assert "\n" not in str(caught.value)


def test_truncated_safetensors_and_missing_paths(tiny, tmp_path):
    _model, controlnet = tiny
    good = save_ldm(tmp_path / "good.safetensors", controlnet=controlnet)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_controlnet(truncated)
    with pytest.raises(CheckpointError, match="no such file"):
        load_base(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_base(tmp_path)
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"PK-not-really")
    with pytest.raises(CheckpointError, match=re.escape("unknown file type '.npz'")):
        read_state_dict(unknown)


def test_unknown_keys_outside_any_model_are_refused(tiny, tmp_path):
    model, _ = tiny
    state_dict = _tiny_ldm(model)
    state_dict["lora_unet_down_blocks_0.alpha"] = torch.tensor(1.0)
    expected = re.escape("1 unexpected keys outside any model: lora_unet_down_blocks_0.alpha")
    with pytest.raises(CheckpointError, match=expected):
        split_ldm(state_dict)


def test_ldm_files_are_written_as_safetensors_leaving_no_temporary(tiny, tmp_path):
    # That a write cut short keeps the old file: tests/test_files.py.
    _, controlnet = tiny
    with pytest.raises(CheckpointError, match=re.escape("written as .safetensors only")):
        save_ldm(tmp_path / "out.ckpt", controlnet=controlnet)
    path = save_ldm(tmp_path / "out.safetensors", controlnet=controlnet)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary left behind
    assert path.stat().st_size > 0


# --- transfer_control -------------------------------------------------------------------------------


def test_transfer_control_adds_the_base_difference_to_the_encoder_copy(tiny):
    model, controlnet = tiny
    old = model.unet.state_dict()
    new = {k: v + 0.5 for k, v in old.items()}
    moved = transfer_control(controlnet.state_dict(), old, new)
    for key, value in controlnet.state_dict().items():
        if key in old:
            assert torch.allclose(moved[key], value + 0.5), key
        else:  # hint encoder and zero convolutions have no counterpart
            assert torch.equal(moved[key], value), key
    assert sum(k in old for k in moved) == len(
        [k for k in moved if not k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))]
    )


# --- files with the quirks of real checkpoints ----------------------------------------------------


def test_training_leftovers_and_old_clip_key_layout_are_tolerated(tiny, tmp_path):
    model, _ = tiny
    state_dict = _tiny_ldm(model)
    state_dict["first_stage_model.loss.logvar"] = torch.zeros(())  # saved while training the VAE
    state_dict["lvlb_weights"] = torch.ones(1000)
    # Older / merged SD 1.x files: no "text_model." level, position_ids stored as floats.
    old = {}
    for key, value in state_dict.items():
        old[key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = value
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77.0)[None]
    path = tmp_path / "merged.safetensors"
    save_file(old, str(path))
    loaded = load_base(path)
    _assert_same_weights(loaded.text_encoder, model.text_encoder)
    _assert_same_weights(loaded.vae, model.vae)


def test_diff_controlnets_and_strays_in_control_only_files_are_refused(tiny, tmp_path):
    _, controlnet = tiny
    control = {"control_model." + k: v.clone() for k, v in controlnet.state_dict().items()}
    diff = tmp_path / "diff_control_sd15_canny.safetensors"
    save_file({**control, "difference": torch.zeros(())}, str(diff))
    with pytest.raises(CheckpointError, match="a 'diff' ControlNet"):
        load_controlnet(diff)
    stray = tmp_path / "stray.safetensors"
    save_file({**control, "lora_te_text_model.alpha": torch.zeros(())}, str(stray))
    with pytest.raises(CheckpointError, match="1 unexpected keys beside control_model"):
        load_controlnet(stray)
    save_file({**control, "lvlb_weights": torch.ones(1000)}, str(tmp_path / "ok.safetensors"))
    _assert_same_weights(load_controlnet(tmp_path / "ok.safetensors"), controlnet)


def test_a_full_file_keeps_the_controlnet_config_including_pooling(tiny, tmp_path):
    model, controlnet = tiny
    pooled = ControlNet(TINY.controlnet(global_average_pooling=True))
    pooled.load_state_dict(controlnet.state_dict())
    path = save_ldm(tmp_path / "full.safetensors", model, pooled)
    assert load_controlnet(path).config.global_average_pooling


def test_sd2_ldm_files_must_name_their_prediction_type(tmp_path):
    from controlnet.config import SD21_V
    from controlnet.models.unet import UNet

    with torch.device("meta"):
        parts = {"unet": UNet(SD21.unet).state_dict()}
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    with pytest.raises(CheckpointError, match="say which with prediction='eps' or 'v'"):
        base_config_from_shapes(parts, None, path)
    assert base_config_from_shapes(parts, "v", path) is SD21_V
    assert base_config_from_shapes(parts, "eps", path) is SD21
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert base_config_from_shapes(parts, None, path) is SD21_V


def test_diffusers_layout_oddities(tiny, tmp_path):
    model, controlnet = tiny
    folder = save_diffusers(tmp_path / "pipe", model, controlnet)
    # transformers 5's save_pretrained writes CLIPTextModel keys without "text_model.".
    text_file = folder / "text_encoder" / "model.safetensors"
    weights = read_state_dict(text_file)[0]
    save_file({k.removeprefix("text_model."): v.contiguous() for k, v in weights.items()}, str(text_file))
    _assert_same_weights(load_base(folder).text_encoder, model.text_encoder)
    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel, not a ControlNet"):
        load_controlnet(folder / "unet")
    lonely = tmp_path / "lonely.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}, str(lonely))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion ControlNet in diffusers layout"):
        load_controlnet(lonely)

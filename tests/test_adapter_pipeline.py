"""T2I-Adapter units in the Pipeline: whole few-step generations against diffusers'
StableDiffusionAdapterPipeline (one adapter; a MultiAdapter with weights; a 1-channel adapter) on
identical random weights of the tiny configuration and identical initial latents, then what diffusers
has no counterpart for: the window (TencentARC's cond_tau), strength 0, features computed once, an
adapter beside a ControlNet, and the one-line errors.

Tolerance: max abs difference of the [0, 1] images <= 2e-3 (fp32), as tests/test_pipeline_parity.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from controlnet.annotators.filters import rgb_to_grey
from controlnet.config import TINY, T2IAdapterConfig
from controlnet.formats.diffusers_text import text_config_to_diffusers, text_ldm_to_diffusers
from controlnet.formats.diffusers_tokenizer import write_hf_tokenizer_files
from controlnet.formats.diffusers_unet import unet_ldm_to_diffusers
from controlnet.formats.diffusers_unet_config import unet_config_to_diffusers
from controlnet.formats.diffusers_vae import vae_config_to_diffusers, vae_ldm_to_diffusers
from controlnet.formats.errors import CheckpointError
from controlnet.formats.t2i_adapter import adapter_original_to_diffusers, config_to_diffusers
from controlnet.models.controlnet import ControlNet
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.models.t2i_adapter import build_adapter
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.sampling.guidance import ActiveAdapter, GuidedDenoiser

from .helpers import DIFFUSERS_ORIGINAL_DDIM, random_module, randomize, three_level_unet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOLERANCE = 2e-3
SIZE = 64  # 8x8 latents, UNet levels at 8x8, 4x4 and 2x2
STEPS = 3
PROMPT = "a red circle on a white background"
NEGATIVE = "lowres, bad anatomy"
# The tiny model with a third level without attention: diffusers builds its last down block as SD
# 1.5's (a DownBlock2D without downsampler, where diffusers adds the adapter's last feature), and its
# light adapter repeats the last width.
BASE = TINY.replace(
    name="tiny-3-levels",
    unet=three_level_unet(num_res_blocks=1),
)
ADAPTERS = {
    "full": T2IAdapterConfig(channels=(32, 64, 64), num_res_blocks=1),
    "light": T2IAdapterConfig(kind="light", channels=(32, 64, 64), num_res_blocks=1),
    "grey": T2IAdapterConfig(in_channels=1, channels=(32, 64, 64), num_res_blocks=1),
}


def _meta(factory):
    with torch.device("meta"):
        return factory()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """Our pipeline (three adapters, one ControlNet) and a maker of diffusers' adapter pipeline,
    sharing the very same weight tensors."""
    model = StableDiffusion(BASE, empty=True)
    model.unet = randomize(model.unet.to_empty(device="cpu"), seed=1)
    model.vae = randomize(model.vae.to_empty(device="cpu"), seed=2)
    model.text_encoder = randomize(model.text_encoder.to_empty(device="cpu"), seed=3)
    adapters = {
        name: random_module(lambda c=config: build_adapter(c), seed=10 + i)
        for i, (name, config) in enumerate(ADAPTERS.items())
    }
    controlnet = randomize(_meta(lambda: ControlNet(BASE.controlnet())).to_empty(device="cpu"), seed=4)
    ours = Pipeline(model, [controlnet], dtype=torch.float32, adapters=list(adapters.values()))

    unet = _meta(lambda: diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(BASE.unet)))
    unet.load_state_dict(unet_ldm_to_diffusers(model.unet.state_dict(), BASE.unet), strict=True, assign=True)
    vae = _meta(lambda: diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(BASE.vae)))
    vae.load_state_dict(vae_ldm_to_diffusers(model.vae.state_dict(), BASE.vae), strict=True, assign=True)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config_to_diffusers(BASE.text)))
    weights = text_ldm_to_diffusers(model.text_encoder.state_dict(), BASE.text)
    own_keys = text_encoder.state_dict().keys()
    text_encoder.load_state_dict({k if k in own_keys else k.removeprefix("text_model."): v for k, v in weights.items()})
    theirs_adapters = {}
    for name, adapter in adapters.items():
        theirs = _meta(lambda c=adapter.config: diffusers.T2IAdapter.from_config(config_to_diffusers(c)))
        state = adapter_original_to_diffusers(adapter.state_dict(), adapter.config)
        theirs.load_state_dict(state, strict=True, assign=True)
        theirs_adapters[name] = theirs.eval()
    tokenizer_dir = write_hf_tokenizer_files(tmp_path_factory.mktemp("tokenizer"), pad_token_id=BASE.text.pad_token_id)
    scheduler = diffusers.DDIMScheduler(**DIFFUSERS_ORIGINAL_DDIM)

    def theirs(*names: str):
        chosen = [theirs_adapters[n] for n in names]
        pipe = diffusers.StableDiffusionAdapterPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder.eval(),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
            unet=unet.eval(),
            adapter=chosen[0] if len(chosen) == 1 else diffusers.MultiAdapter(chosen),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return ours, theirs


def _control_images() -> list[np.ndarray]:
    ys, xs = np.mgrid[:SIZE, :SIZE]
    ring = (np.abs(np.hypot(ys - 32, xs - 32) - 20) < 1.5).astype(np.uint8) * 255
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[15:45, 15:17] = square[15:45, 43:45] = square[15:17, 15:45] = square[43:45, 15:45] = 255
    return [np.repeat(m[:, :, None], 3, axis=2) for m in (ring, square)]


def _latents() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))


def _theirs(pipe, images, scales) -> np.ndarray:
    from PIL import Image

    pil = [i if isinstance(i, Image.Image) else Image.fromarray(i) for i in images]
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=pil[0] if len(pil) == 1 else pil,
        num_inference_steps=STEPS,
        guidance_scale=9.0,
        eta=0.0,
        latents=_latents(),
        adapter_conditioning_scale=scales,
        output_type="np",
        height=SIZE,
        width=SIZE,
    )
    return out.images[0]


def _ours(pipe: Pipeline, units, steps: int = STEPS) -> np.ndarray:
    result = pipe.generate(
        PROMPT,
        units,
        negative_prompt=NEGATIVE,
        steps=steps,
        guidance_scale=9.0,
        resolution=SIZE,
        latents=_latents(),
        output="float",
    )
    return result.images[0]


@torch.no_grad()
def test_one_adapter_matches_diffusers(stacks):
    ours, theirs = stacks
    image = _control_images()[0]
    result = _ours(ours, [ControlUnit(image, adapter=0, strength=0.8)])
    difference = np.abs(result - _theirs(theirs("full"), [image], 0.8)).max()
    print(f"one adapter: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    assert np.abs(result - _ours(ours, [])).max() > 1e-2  # the adapter did something


@torch.no_grad()
def test_two_adapters_match_diffusers_multiadapter(stacks):
    ours, theirs = stacks
    images = _control_images()
    units = [ControlUnit(images[0], adapter=0, strength=1.0), ControlUnit(images[1], adapter=1, strength=0.6)]
    difference = np.abs(_ours(ours, units) - _theirs(theirs("full", "light"), images, [1.0, 0.6])).max()
    print(f"two adapters: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE


@torch.no_grad()
def test_one_channel_adapter_reads_the_grey_map(stacks):
    """A 1-channel adapter gets the map's luma: diffusers is given the greyscale PIL image."""
    from PIL import Image

    ours, theirs = stacks
    image = _control_images()[0]
    grey = Image.fromarray(image).convert("L")
    difference = np.abs(_ours(ours, [ControlUnit(image, adapter=2)]) - _theirs(theirs("grey"), [grey], 1.0)).max()
    print(f"1-channel adapter: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    colours = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    tensor = ours.adapter_input(colours, channels=1)
    assert tensor.shape == (1, 1, SIZE, SIZE)
    assert torch.equal(tensor[0, 0], torch.from_numpy(rgb_to_grey(colours)).float() / 255.0)


@torch.no_grad()
def test_strength_zero_equals_no_adapter(stacks):
    ours, _ = stacks
    image = _control_images()[0]
    assert np.array_equal(_ours(ours, [ControlUnit(image, adapter=0, strength=0.0)]), _ours(ours, []))


def _record_calls(monkeypatch, pipe: Pipeline) -> tuple[list[bool], list[int]]:
    """Per UNet call, whether adapter features came; and the number of adapter runs."""
    with_features, adapter_runs = [], []
    unet_forward = pipe.model.unet.forward

    def forward(*args, adapter_features=None, **kwargs):
        with_features.append(adapter_features is not None)
        return unet_forward(*args, adapter_features=adapter_features, **kwargs)

    monkeypatch.setattr(pipe.model.unet, "forward", forward)
    for adapter in pipe.adapters:
        adapter_forward = adapter.forward

        def counted(image, adapter_forward=adapter_forward):
            adapter_runs.append(1)
            return adapter_forward(image)

        monkeypatch.setattr(adapter, "forward", counted)
    return with_features, adapter_runs


@torch.no_grad()
def test_adapter_acts_inside_its_window_only(stacks, monkeypatch):
    """Step i of N acts when i / N >= start and (i + 1) / N <= end; TencentARC's cond_tau = 0.5 is
    end=0.5: the first half. The features are computed once per generation whatever the steps."""
    ours, _ = stacks
    image = _control_images()[0]
    with_features, adapter_runs = _record_calls(monkeypatch, ours)
    _ours(ours, [ControlUnit(image, adapter=0, end=0.5)], steps=4)
    assert with_features == [True, True, False, False]  # one batched [uncond; cond] call per step
    assert len(adapter_runs) == 1
    with_features.clear()
    _ours(ours, [ControlUnit(image, adapter=0, start=0.25, end=0.75)], steps=4)
    assert with_features == [False, True, True, False]
    with_features.clear()
    adapter_runs.clear()
    units = [ControlUnit(image, adapter=0, end=0.5), ControlUnit(image, adapter=1, start=0.5)]
    _ours(ours, units, steps=4)
    assert with_features == [True] * 4 and len(adapter_runs) == 2


def test_denoiser_sums_each_steps_adapters_once():
    """The features of each step are the sum of the adapters in their windows, made when the
    denoiser is built (one object per distinct set of adapters), None where none acts."""
    ones = [torch.ones(1, 2, 4, 4)]
    first, second = ActiveAdapter(ones, end=0.5), ActiveAdapter([2 * ones[0]], start=0.25, end=0.75)
    timesteps = torch.tensor([751.0, 501.0, 251.0, 1.0])
    denoiser = GuidedDenoiser(
        unet=None, cond=torch.zeros(1, 1, 1), uncond=None, guidance_scale=1.0, controls=[], timesteps=timesteps
    )
    assert denoiser.features(timesteps[:1]) is None
    denoiser = GuidedDenoiser(None, torch.zeros(1, 1, 1), None, 1.0, [], timesteps=timesteps, adapters=[first, second])
    sums = [denoiser.features(t[None]) for t in timesteps]
    assert [None if s is None else float(s[0].mean()) for s in sums] == [1.0, 3.0, 2.0, None]
    assert sums[1] is denoiser.features(timesteps[1:2])  # made once, not per call
    with pytest.raises(ValueError, match="not a step of its plan"):
        denoiser.features(torch.tensor([999.0]))


@torch.no_grad()
def test_adapter_and_controlnet_compose(stacks):
    ours, _ = stacks
    images = _control_images()
    adapter = ControlUnit(images[0], adapter=0, strength=0.8)
    controlnet = ControlUnit(images[1], strength=0.7)
    both = _ours(ours, [adapter, controlnet])
    assert np.isfinite(both).all()
    assert np.abs(both - _ours(ours, [adapter])).max() > 1e-2
    assert np.abs(both - _ours(ours, [controlnet])).max() > 1e-2
    # With the ControlNet in control mode (conditional side only) the adapter still acts on both.
    guess = _ours(ours, [adapter, ControlUnit(images[1], mode="control")])
    assert np.isfinite(guess).all()


@torch.no_grad()
def test_adapter_units_low_memory_equal(stacks):
    ours, _ = stacks
    image = _control_images()[0]
    copies = copy.deepcopy((ours.model, ours.controlnets, ours.adapters))  # parking moves the modules
    low = Pipeline(copies[0], copies[1], dtype=torch.float32, low_memory=True, adapters=copies[2])
    units = [ControlUnit(image, adapter=0, strength=0.8, end=0.7)]
    assert np.array_equal(_ours(low, units), _ours(ours, units))


@pytest.mark.parametrize(
    "unit, match",
    [
        (dict(adapter=3), r"control unit 0: T2I-Adapter 3 does not exist \(3 loaded\)"),
        (dict(adapter=-1), "T2I-Adapter index must be between 0 and 63, got -1"),
        (dict(adapter="0"), "T2I-Adapter index must be a number, got '0'"),
        (dict(adapter=0, mode="control"), "takes control mode 'balanced' only"),
        (dict(adapter=0, controlnet=1), "one ControlNet \\(controlnet\\) or one T2I-Adapter \\(adapter\\), not both"),
        (dict(adapter=0, scales=[1.0, 1.0]), "takes no per-residual scales"),
        (dict(adapter=0, start=0.8, end=0.2), "start"),
    ],
)
def test_bad_adapter_units_one_line(stacks, unit, match):
    ours, _ = stacks
    with pytest.raises(ValueError, match=match) as error:
        ours.generate(PROMPT, [ControlUnit(_control_images()[0], **unit)], steps=1, resolution=SIZE)
    assert "\n" not in str(error.value)


def test_adapter_that_does_not_fit_the_base_refused():
    model = StableDiffusion(BASE, empty=True)
    wide = _meta(lambda: build_adapter(T2IAdapterConfig(channels=(320, 640, 640), num_res_blocks=1)))
    with pytest.raises(CheckpointError, match="T2I-Adapter 0: this T2I-Adapter's feature widths") as error:
        Pipeline(model, adapters=[wide])
    assert "\n" not in str(error.value)


@torch.no_grad()
def test_batch_and_record_of_adapter_units(stacks):
    ours, _ = stacks
    image = _control_images()[0]
    units = [ControlUnit(image, adapter=1, strength=0.5, end=0.5), ControlUnit(image)]
    result = ours.generate(PROMPT, units, steps=1, resolution=SIZE, num_images=2)  # features broadcast
    assert len(result.images) == 2 and not np.array_equal(result.images[0], result.images[1])
    controls = result.settings["controls"]
    assert controls[0]["adapter"] == 1 and controls[0]["strength"] == 0.5 and controls[0]["end"] == 0.5
    assert "controlnet" not in controls[0]  # an adapter unit names no ControlNet
    assert "adapter" not in controls[1] and controls[1]["controlnet"] == 0


@torch.no_grad()
def test_from_files_loads_adapters(stacks, tmp_path):
    """Pipeline.from_files(..., adapters=[paths]): the same image as the pipeline built in memory."""
    from controlnet.formats.ldm import save_ldm

    ours, _ = stacks
    base = save_ldm(tmp_path / "base.safetensors", ours.model)
    adapter = tmp_path / "t2iadapter_test_sd15v2.pth"
    torch.save(ours.adapters[1].state_dict(), adapter)
    loaded = Pipeline.from_files(base, dtype=torch.float32, adapters=[adapter])
    image = _control_images()[0]
    assert loaded.adapters[0].config == ADAPTERS["light"]
    unit = ControlUnit(image, adapter=1, strength=0.7)
    assert np.array_equal(_ours(loaded, [ControlUnit(image, adapter=0, strength=0.7)]), _ours(ours, [unit]))

"""End-to-end parity with diffusers' StableDiffusionControlNetPipeline + DDIMScheduler set to the
original's semantics, on identical random SD 1.5-size weights and identical initial latents, at a
small size (128x128, 16x16 latents) and 3 steps.

Tolerance: max abs difference of the [0, 1] images <= 2e-3 (fp32; the two stacks differ only in
the order of floating-point operations).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlnet.config import SD15
from controlnet.formats.diffusers_text import text_config_to_diffusers, text_ldm_to_diffusers
from controlnet.formats.diffusers_tokenizer import write_hf_tokenizer_files
from controlnet.formats.diffusers_unet import controlnet_ldm_to_diffusers, unet_ldm_to_diffusers
from controlnet.formats.diffusers_unet_config import controlnet_config_to_diffusers, unet_config_to_diffusers
from controlnet.formats.diffusers_vae import vae_config_to_diffusers, vae_ldm_to_diffusers
from controlnet.models.controlnet import ControlNet
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.pipeline import ControlUnit, Pipeline

from .helpers import DIFFUSERS_ORIGINAL_DDIM, randomize

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

TOLERANCE = 2e-3
SIZE = 128
STEPS = 3
PROMPT = "a red circle on a white background"
ADDED = "best quality, extremely detailed"
NEGATIVE = "lowres, bad anatomy"


def _meta(factory):
    with torch.device("meta"):
        return factory()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """Our pipeline and diffusers' pipeline sharing the very same weight tensors."""
    model = StableDiffusion(SD15, empty=True)
    model.unet = randomize(model.unet.to_empty(device="cpu"), seed=1)
    model.vae = randomize(model.vae.to_empty(device="cpu"), seed=2)
    model.text_encoder = randomize(model.text_encoder.to_empty(device="cpu"), seed=3)
    controlnets = [
        randomize(_meta(lambda: ControlNet(SD15.controlnet())).to_empty(device="cpu"), seed=s) for s in (4, 5)
    ]
    ours = Pipeline(model, controlnets, dtype=torch.float32)  # exact parity; bf16 is measured in benchmarks/

    unet = _meta(lambda: diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(SD15.unet)))
    unet.load_state_dict(unet_ldm_to_diffusers(model.unet.state_dict(), SD15.unet), strict=True, assign=True)
    vae = _meta(lambda: diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(SD15.vae)))
    vae.load_state_dict(vae_ldm_to_diffusers(model.vae.state_dict(), SD15.vae), strict=True, assign=True)
    text_config = transformers.CLIPTextConfig(**text_config_to_diffusers(SD15.text))
    text_encoder = transformers.CLIPTextModel(text_config)  # not on meta: its position_ids buffer must be real
    weights = text_ldm_to_diffusers(model.text_encoder.state_dict(), SD15.text)
    own_keys = text_encoder.state_dict().keys()
    weights = {k if k in own_keys else k.removeprefix("text_model."): v for k, v in weights.items()}
    text_encoder.load_state_dict(weights, strict=True)
    their_controlnets = []
    for controlnet in controlnets:
        config = controlnet_config_to_diffusers(controlnet.config)
        theirs = _meta(lambda config=config: diffusers.ControlNetModel.from_config(config))
        theirs.load_state_dict(controlnet_ldm_to_diffusers(controlnet.state_dict(), controlnet.config), assign=True)
        their_controlnets.append(theirs.eval())
    tokenizer_dir = write_hf_tokenizer_files(tmp_path_factory.mktemp("tokenizer"), pad_token_id=SD15.text.pad_token_id)
    scheduler = diffusers.DDIMScheduler(**DIFFUSERS_ORIGINAL_DDIM)

    def theirs(count: int):
        controlnet = their_controlnets[0] if count == 1 else diffusers.MultiControlNetModel(their_controlnets)
        return diffusers.StableDiffusionControlNetPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder.eval(),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
            unet=unet.eval(),
            controlnet=controlnet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    return ours, theirs


def _control_images() -> list[np.ndarray]:
    ys, xs = np.mgrid[:SIZE, :SIZE]
    ring = (np.abs(np.hypot(ys - 64, xs - 64) - 40) < 2).astype(np.uint8) * 255
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[30:90, 30:34] = square[30:90, 86:90] = square[30:34, 30:90] = square[86:90, 30:90] = 255
    return [np.repeat(m[:, :, None], 3, axis=2) for m in (ring, square)]


def _latents() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))


def _theirs(pipe, images, scales, guess_mode=False) -> np.ndarray:
    from PIL import Image

    pil = [Image.fromarray(i) for i in images]
    out = pipe(
        prompt=f"{PROMPT}, {ADDED}",
        negative_prompt=NEGATIVE,
        image=pil[0] if len(pil) == 1 else pil,
        num_inference_steps=STEPS,
        guidance_scale=9.0,
        eta=0.0,
        latents=_latents(),
        controlnet_conditioning_scale=scales,
        guess_mode=guess_mode,
        output_type="np",
        height=SIZE,
        width=SIZE,
    )
    return out.images[0]


def _ours(pipe: Pipeline, units) -> np.ndarray:
    result = pipe.generate(
        PROMPT,
        units,
        added_prompt=ADDED,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance_scale=9.0,
        resolution=SIZE,
        latents=_latents(),
        output="float",
    )
    return result.images[0]


@torch.no_grad()
def test_one_controlnet_matches_diffusers(stacks):
    ours, theirs = stacks
    image = _control_images()[0]
    difference = np.abs(_ours(ours, [ControlUnit(image, strength=0.8)]) - _theirs(theirs(1), [image], 0.8)).max()
    print(f"one ControlNet: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE


@torch.no_grad()
def test_two_controlnets_match_diffusers_multicontrolnet(stacks):
    ours, theirs = stacks
    images = _control_images()
    units = [ControlUnit(images[0], strength=1.0), ControlUnit(images[1], controlnet=1, strength=0.6)]
    difference = np.abs(_ours(ours, units) - _theirs(theirs(2), images, [1.0, 0.6])).max()
    print(f"two ControlNets: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE


@torch.no_grad()
def test_guess_mode_matches_diffusers_with_matching_scales(stacks):
    """diffusers' guess mode scales the residuals by logspace(-1, 0, 13); give our unit those scales
    and both run the ControlNet on the conditional side only."""
    ours, theirs = stacks
    image = _control_images()[0]
    scales = torch.logspace(-1, 0, 13).tolist()
    unit = ControlUnit(image, mode="control", scales=scales)
    difference = np.abs(_ours(ours, [unit]) - _theirs(theirs(1), [image], 1.0, guess_mode=True)).max()
    print(f"guess mode: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE

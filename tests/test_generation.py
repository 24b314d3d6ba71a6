"""Generation on the tiny configuration: seeds, control windows, call counts, modes, long prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlnet.config import TINY
from controlnet.models.controlnet import ControlNet, soft_control_scales
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.models.tiny import circle_edges, random_tiny_models
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.sampling.guidance import ActiveControl, GuidedDenoiser
from controlnet.sampling.prompts import encode_prompts, tokenize_chunks
from controlnet.sampling.samplers import make_plan


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    model, controlnet = random_tiny_models(seed=0)
    second = ControlNet.from_unet(model.unet)
    with torch.no_grad():
        for zero in [*second.zero_convs, second.middle_block_out]:
            zero[0].weight.normal_(std=0.05, generator=torch.Generator().manual_seed(9))
    return Pipeline(model, [controlnet, second])


EDGES = circle_edges(64)


class _Counter:
    """Counts forward passes of a module through a hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1

    def close(self) -> int:
        self.handle.remove()
        return self.calls


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_a_seed_gives_the_same_image_whatever_the_batch_size(pipe, sampler):
    unit = ControlUnit(EDGES)
    batch = pipe.generate("a circle", [unit], num_images=3, seed=41, steps=6, sampler=sampler)
    single = pipe.generate("a circle", [unit], num_images=1, seed=42, steps=6, sampler=sampler)
    again = pipe.generate("a circle", [unit], num_images=1, seed=42, steps=6, sampler=sampler)
    assert batch.seeds == [41, 42, 43] and single.seeds == [42]
    assert np.array_equal(single.images[0], again.images[0])
    assert np.abs(batch.images[1].astype(int) - single.images[0].astype(int)).max() <= 1
    assert not np.array_equal(batch.images[0], batch.images[1])


def test_a_unit_outside_its_window_costs_no_controlnet_call(pipe):
    counter = _Counter(pipe.controlnets[0])
    pipe.generate("a circle", [ControlUnit(EDGES, start=0.5, end=1.0)], steps=10, seed=1)
    assert counter.close() == 5  # steps 5..9, cond and uncond in one batched call each
    counter = _Counter(pipe.controlnets[0])
    pipe.generate("a circle", [ControlUnit(EDGES, start=0.0, end=0.3)], steps=10, seed=1)
    assert counter.close() == 3


def test_the_control_window_is_decided_from_the_timestep_not_from_a_counter(pipe):
    """The denoiser holds no step counter: called at the plan's timesteps in any order, each call
    runs exactly the units whose window holds that step; a timestep outside the plan is refused."""
    plan = make_plan("ddim", pipe.model.config.schedule, 10)
    hint = pipe.hint_tensor(EDGES)
    early = ActiveControl(pipe.controlnets[0], pipe.controlnets[0].encode_hint(hint), start=0.0, end=0.3)
    late = ActiveControl(pipe.controlnets[1], pipe.controlnets[1].encode_hint(hint), start=0.5, end=1.0)
    context = torch.randn(1, 77, TINY.text.width)
    denoiser = GuidedDenoiser(pipe.model.unet, context, None, 1.0, [early, late], timesteps=plan.timesteps)
    for step in (9, 0, 5, 2, 3, 4):  # out of order on purpose
        t = plan.timesteps[step].to(torch.float32).reshape(1)
        expected = [unit for unit, window in ((early, range(0, 3)), (late, range(5, 10))) if step in window]
        assert denoiser.active(t) == expected, step
    with pytest.raises(ValueError, match="not a step of its plan"):
        denoiser.active(torch.tensor([123.5]))


def test_the_hint_encoder_runs_once_per_generation(pipe):
    counter = _Counter(pipe.controlnets[0].input_hint_block)
    pipe.generate("a circle", [ControlUnit(EDGES)], num_images=2, steps=8, seed=1)
    assert counter.close() == 1


def test_guess_mode_runs_control_on_the_conditional_side_only(pipe):
    counter = _Counter(pipe.controlnets[0])
    unet_counter = _Counter(pipe.model.unet)
    pipe.generate("a circle", [ControlUnit(EDGES, mode="control")], steps=4, seed=1)
    assert counter.close() == 4 and unet_counter.close() == 8  # cond and uncond UNet calls apart
    unet_counter = _Counter(pipe.model.unet)
    pipe.generate("a circle", [ControlUnit(EDGES)], steps=4, seed=1)
    assert unet_counter.close() == 4  # balanced: one batched call per step


def _image(pipe, units, **settings) -> np.ndarray:
    return pipe.generate("a circle", units, steps=4, seed=3, output="float", **settings).images[0]


def test_prompt_mode_is_balanced_mode_with_the_soft_scales(pipe):
    soft = soft_control_scales(0.8, len(pipe.controlnets[0].zero_convs) + 1)
    with_soft_scales = _image(pipe, [ControlUnit(EDGES, scales=soft)])
    assert np.array_equal(_image(pipe, [ControlUnit(EDGES, mode="prompt", strength=0.8)]), with_soft_scales)
    assert not np.array_equal(_image(pipe, [ControlUnit(EDGES, strength=0.8)]), with_soft_scales)


def test_control_mode_differs_from_prompt_mode_only_on_the_unconditional_side(pipe):
    """Both use the soft scales; control mode also leaves the unit out of the unconditional side.
    With guidance 1 that side plays no part: the two modes give the same image; with 9, not."""
    for scale, same in ((1.0, True), (9.0, False)):
        control = _image(pipe, [ControlUnit(EDGES, mode="control")], guidance_scale=scale)
        prompt = _image(pipe, [ControlUnit(EDGES, mode="prompt")], guidance_scale=scale)
        assert np.array_equal(control, prompt) == same, scale


def test_a_second_unit_acts_through_its_strength(pipe):
    one = _image(pipe, [ControlUnit(EDGES)])
    silent = _image(pipe, [ControlUnit(EDGES), ControlUnit(255 - EDGES, controlnet=1, strength=0.0)])
    acting = _image(pipe, [ControlUnit(EDGES), ControlUnit(255 - EDGES, controlnet=1, strength=0.7)])
    assert np.array_equal(silent, one) and not np.array_equal(acting, one)


def test_several_units_sum_their_residuals():
    torch.manual_seed(0)
    model = StableDiffusion(TINY).eval()
    nets = [ControlNet.from_unet(model.unet).eval() for _ in range(2)]
    for i, net in enumerate(nets):
        with torch.no_grad():
            net.zero_convs[1][0].bias.fill_(0.1 * (i + 1))
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    context = torch.randn(1, 77, 64)
    hint = torch.rand(1, 3, 64, 64)
    units = [ActiveControl(n, n.encode_hint(hint)) for n in nets]
    both = GuidedDenoiser(model.unet, context, None, 1.0, units)(x, t)
    summed = [a + b for a, b in zip(*(u.residuals(x, t, context) for u in units), strict=True)]
    with torch.no_grad():
        assert torch.equal(both, model.unet(x, t, context, control=summed))


def test_fresh_controlnets_leave_the_image_as_without_control():
    model, _ = random_tiny_models(seed=0)
    pipe = Pipeline(model, [ControlNet.from_unet(model.unet)])
    plain = pipe.generate("a circle", [], steps=4, seed=5, resolution=64).images[0]
    controlled = pipe.generate("a circle", [ControlUnit(EDGES)], steps=4, seed=5).images[0]
    assert np.array_equal(plain, controlled)


def test_float_output_and_explicit_latents(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = pipe.generate("a circle", [ControlUnit(EDGES)], num_images=2, steps=3, latents=latents, output="float")
    assert result.images[0].dtype == np.float32 and result.images[0].min() >= 0 and result.images[0].max() <= 1
    again = pipe.generate("a circle", [ControlUnit(EDGES)], num_images=2, steps=3, latents=latents, output="float")
    assert np.array_equal(result.images[1], again.images[1])


def test_long_prompts_are_encoded_in_chunks_of_75_tokens(pipe):
    encoder = pipe.model.text_encoder
    short = "a red circle"
    assert torch.equal(tokenize_chunks(short, 49407), encoder.tokenize([short]))
    with torch.no_grad():
        assert torch.equal(encode_prompts(encoder, [short]), encoder(encoder.tokenize([short])))
    long = " ".join(["red circle"] * 60)  # 120 tokens: two chunks
    tokens = tokenize_chunks(long, 49407)
    assert tokens.shape == (2, 77) and tokens[0, -1] == 49407 and tokens[1, 0] == 49406
    context = encode_prompts(encoder, [long, ""])
    assert context.shape == (2, 154, TINY.text.width)
    with torch.no_grad():  # the short negative prompt is extended with the empty prompt's encoding
        empty = encoder(encoder.tokenize([""]))[0]
    assert torch.equal(context[1, 77:], empty) and torch.equal(context[1, :77], empty)
    assert pipe.generate(long, [ControlUnit(EDGES)], steps=2, seed=0).images[0].shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be between 1 and 100, got 0"),
        ({"num_images": 13}, "images must be between 1 and 12, got 13"),
        ({"sampler": "plms2"}, "sampler must be one of ddim, .* got 'plms2'"),
        ({"seed": 2**31}, "seed must be between -1 and 2147483647, got 2147483648"),
        ({"output": "pil"}, "output must be"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("a circle", [ControlUnit(EDGES)], **kwargs)


def test_bad_units_are_refused(pipe):
    with pytest.raises(ValueError, match=r"control unit 0: ControlNet 5 does not exist \(2 loaded\)"):
        pipe.generate("a circle", [ControlUnit(EDGES, controlnet=5)])
    with pytest.raises(ValueError, match="control unit 0: control mode must be one of balanced, prompt, control"):
        pipe.generate("a circle", [ControlUnit(EDGES, mode="strong")], steps=1)
    with pytest.raises(ValueError, match=r"control unit 0: start \(0.8\) must not be after end \(0.2\)"):
        pipe.generate("a circle", [ControlUnit(EDGES, start=0.8, end=0.2)], steps=1)


def _photo(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_img2img_runs_the_last_fraction_of_the_steps(pipe):
    steps_seen = []
    result = pipe.generate(
        "a circle",
        [ControlUnit(EDGES)],
        init_image=_photo(),
        denoising_strength=0.5,
        steps=10,
        seed=2,
        progress=lambda step, total: steps_seen.append((step, total)),
    )
    assert steps_seen[-1] == (5, 5) and result.settings["denoising_strength"] == 0.5
    txt2img = pipe.generate("a circle", [ControlUnit(EDGES)], steps=10, seed=2)
    assert not np.array_equal(result.images[0], txt2img.images[0])
    again = pipe.generate(
        "a circle", [ControlUnit(EDGES)], init_image=_photo(), denoising_strength=0.5, steps=10, seed=2
    )
    assert np.array_equal(result.images[0], again.images[0])


def test_inpainting_keeps_the_unmasked_pixels_and_feeds_the_inpaint_hint(pipe):
    init = _photo(1)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    unit = ControlUnit(init, annotator="inpaint", annotator_params={"mask_blur": 0})
    result = pipe.generate("a circle", [unit], init_image=init, mask=mask, denoising_strength=1.0, steps=4, seed=3)
    image = result.images[0]
    outside = mask == 0
    assert np.array_equal(image[outside], init[outside])
    assert not np.array_equal(image[~outside], init[~outside])
    hint = result.control_maps[0]
    assert hint.dtype == np.float32 and (hint[20:44, 20:44] == -1).all() and (hint[:8, :8] >= 0).all()
    assert result.settings["inpaint"] is True


def test_mask_and_inpaint_hint_errors(pipe):
    with pytest.raises(ValueError, match="a mask needs an init image"):
        pipe.generate("a circle", [], mask=np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="the inpaint annotator needs a mask"):
        pipe.generate("a circle", [ControlUnit(_photo(), annotator="inpaint")], steps=1)
    with pytest.raises(ValueError, match="denoising strength"):
        pipe.generate("a circle", [], init_image=_photo(), denoising_strength=0.0, steps=4)


def test_guidance_above_one_mixes_in_the_unconditional_side_and_at_most_one_does_not(pipe):
    """A scale above 1 combines the two sides, ``uncond + scale * (cond - uncond)``; at most 1 the
    conditional side alone runs (diffusers' rule; tests/test_guidance_batch.py counts the batch)."""
    unet, x, t = pipe.model.unet, torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond, uncond = (torch.randn(1, 77, TINY.text.width).to(pipe.dtype) for _ in range(2))
    conditional = GuidedDenoiser(unet, cond, None, 1.0, [])(x, t)
    unconditional = GuidedDenoiser(unet, uncond, None, 1.0, [])(x, t)
    for scale in (1.5, 3.0):
        guided = GuidedDenoiser(unet, cond, uncond, scale, [])(x, t)
        torch.testing.assert_close(guided, unconditional + scale * (conditional - unconditional))
    for scale in (0.5, 1.0):
        torch.testing.assert_close(GuidedDenoiser(unet, cond, uncond, scale, [])(x, t), conditional)


def test_uint8_output_truncates_as_the_original(pipe):
    floats = pipe.generate("a circle", [ControlUnit(EDGES)], steps=3, seed=4, output="float").images[0]
    uint8 = pipe.generate("a circle", [ControlUnit(EDGES)], steps=3, seed=4).images[0]
    assert np.array_equal(uint8, (floats * 255.0).clip(0, 255).astype(np.uint8))


def test_the_first_control_image_is_resized_as_the_original_app(pipe):
    from controlnet.imaging.resize import resize_image

    image = np.zeros((50, 70, 3), np.uint8)
    image[10:40, 20:50] = 255
    result = pipe.generate("a box", [ControlUnit(image)], steps=1, seed=0, resolution=64)
    assert np.array_equal(result.control_maps[0], resize_image(image, 64))


@pytest.mark.parametrize("mode", ["just_resize", "crop_and_resize", "resize_and_fill"])
def test_a_named_size_fits_every_map_with_its_resize_mode(pipe, mode):
    """width x height named (the AUTOMATIC1111 API's): the output has that size whatever the images'
    shapes; a ready map is fitted to it with the unit's resize mode, the second unit's too."""
    from controlnet.imaging.resize import fit_to

    units = [ControlUnit(EDGES, resize_mode=mode), ControlUnit(EDGES[:, :32], resize_mode=mode, controlnet=1)]
    result = pipe.generate("a circle", units, steps=1, seed=0, width=128, height=64)
    assert result.images[0].shape == (64, 128, 3) and (result.settings["width"], result.settings["height"]) == (128, 64)
    for unit, control_map in zip(units, result.control_maps, strict=True):
        assert np.array_equal(control_map, fit_to(unit.image, 128, 64, mode))


def test_a_named_size_annotates_before_fitting(pipe):
    """As the extension: the annotator sees the image, not its padding; the map is fitted after.
    Fitted first, a two-colour picture's padding (the median of its borders) would add edges."""
    picture = np.zeros((32, 64, 3), np.uint8)
    picture[:16] = (220, 30, 30)
    picture[16:] = (40, 60, 200)
    unit = ControlUnit(picture, annotator="canny", resize_mode="resize_and_fill")
    edges = pipe.generate("a box", [unit], steps=1, seed=0, width=64, height=64).control_maps[0]
    rows = np.flatnonzero(edges.max(axis=(1, 2)))
    assert edges.shape == (64, 64, 3) and rows.size and rows.min() >= 24 and rows.max() <= 40  # the middle only


def test_a_named_size_without_images_and_a_side_alone(pipe):
    assert pipe.generate("a circle", [], steps=1, seed=0, width=128, height=64).images[0].shape == (64, 128, 3)
    assert pipe.generate("a circle", [], steps=1, seed=0, height=128).images[0].shape == (128, 64, 3)  # native 64
    init = _photo()
    result = pipe.generate("a circle", [], init_image=init, steps=2, seed=0, width=64, height=128)
    assert result.images[0].shape == (128, 64, 3)
    with pytest.raises(ValueError, match="width must be a multiple of 64, got 100"):
        pipe.generate("a circle", [], width=100, height=64)
    with pytest.raises(ValueError, match="the output size 320x64: its long side may be at most 4 times its short"):
        pipe.generate("a circle", [], width=320, height=64)
    with pytest.raises(ValueError, match="the output size 64x512: its long side may be at most 4 times"):
        pipe.generate("a circle", [], height=512)


def test_low_memory_mode_gives_the_same_image_and_parks_idle_models():
    model, controlnet = random_tiny_models(seed=0)
    normal = Pipeline(model, [controlnet]).generate("a circle", [ControlUnit(EDGES)], steps=3, seed=1, output="float")
    model, controlnet = random_tiny_models(seed=0)
    low = Pipeline(model, [controlnet], low_memory=True)
    assert all(low.placement.is_parked(m) for m in (low.model.unet, low.model.vae, low.model.text_encoder))
    result = low.generate("a circle", [ControlUnit(EDGES)], steps=3, seed=1, output="float")
    assert np.abs(result.images[0] - normal.images[0]).max() < 1e-5
    assert all(low.placement.is_parked(m) for m in (low.model.unet, low.controlnets[0], low.model.vae))


def test_sliced_attention_equals_whole_attention():
    from controlnet.models.layers import Attention

    torch.manual_seed(0)
    attention = Attention(64, 32, heads=4, head_dim=16).eval()
    x, context = torch.randn(2, 300, 64), torch.randn(2, 77, 32)
    with torch.no_grad():
        whole = attention(x, context)
        attention.slice_size = 64
        sliced = attention(x, context)
    assert torch.allclose(whole, sliced, atol=1e-6)


def test_low_memory_mode_on_a_cpu_streams_the_unet_and_controlnet_block_by_block():
    """During sampling no more than one block of the UNet and ControlNet holds its weights."""
    from controlnet.models.layers import ResBlock
    from controlnet.models.placement import blocks

    model, controlnet = random_tiny_models(seed=0)
    low = Pipeline(model, [controlnet], low_memory=True)
    streamed = (low.model.unet, low.controlnets[0])
    resident: list[int] = []

    def count(module, args, output):
        resident.append(sum(p.numel() for m in streamed for p in m.parameters() if not p.is_meta))

    for model_ in streamed:
        for layer in model_.modules():
            if isinstance(layer, ResBlock):
                layer.register_forward_hook(count)
    low.generate("a circle", [ControlUnit(EDGES)], steps=2, seed=1)
    largest = max(sum(p.numel() for p in block.parameters()) for m in streamed for block in blocks(m))
    assert resident and max(resident) <= largest  # one block in at a time, never a whole model
    assert all(p.is_meta for m in streamed for p in m.parameters())  # all parked again afterwards

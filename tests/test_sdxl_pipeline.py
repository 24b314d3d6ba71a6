"""SDXL through `Pipeline.generate` and every interface (issue 22, points 5 and 7).

* Whole few-step generations against diffusers' SDXL pipelines on identical random weights of the
  reduced SDXL of tests/test_sdxl.py (every code path of the real model) and identical initial
  latents, at 64x64 (8x8 latents): ``StableDiffusionXLControlNetPipeline`` with one ControlNet, with
  two (``MultiControlNetModel``) and an empty negative prompt (zeros: ``force_zeros_for_empty_prompt``),
  with changed size conditioning; ``StableDiffusionXLControlNetUnionPipeline`` with two conditions in
  one network and with one; ``StableDiffusionXLAdapterPipeline`` with the XL adapter and its
  ``adapter_conditioning_factor``. diffusers' pipelines are built from the diffusers folder we write
  of the same model (its tokenizers, its model_index.json) and its DDIM set to the original's.
* A Control-LoRA through `Pipeline.from_files`, rebuilt on the base's UNet.
* Bad combinations and mistakes refused in one line.
* The command line and the JSON API generate with a reduced SDXL file and its ControlNets (the same
  code paths as the real files); SDXL's default size is its native 1024, checked without making it.

Tolerance: max abs difference of the [0, 1] images <= 2e-3 (fp32), as tests/test_pipeline_parity.py.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from controlnet.cli import main
from controlnet.config import SD15, T2IAdapterConfig, UnionConfig
from controlnet.formats.diffusers import save_diffusers
from controlnet.formats.ldm import save_ldm
from controlnet.formats.t2i_adapter import adapter_original_to_diffusers, config_to_diffusers
from controlnet.loading import load_controlnet
from controlnet.models.conditioning import SizeConditioning
from controlnet.models.controlnet import ControlNet
from controlnet.models.controlnet_union import UnionControlNet
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.models.t2i_adapter import build_adapter
from controlnet.models.tiny import random_tiny_models
from controlnet.pipeline import UNION_TYPES, ControlUnit, Pipeline

from .helpers import DIFFUSERS_ORIGINAL_DDIM, random_module, randomize
from .test_sdxl import SMALL
from .test_sdxl_control import _control_lora_file, _their_controlnet

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 2e-3
SIZE = 64
STEPS = 3
PROMPT = "a red circle on a white background"
ADDED = "best quality"
NEGATIVE = "lowres, bad anatomy"
UNION = dataclasses.replace(SMALL.controlnet(), union=UnionConfig(control_types=8))  # ProMax's 8 types
XL_ADAPTER = T2IAdapterConfig(kind="full_xl", channels=(32, 64, 128, 128), downscale_factor=16)


def _meta(factory):
    with torch.device("meta"):
        return factory()


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    return randomize(StableDiffusion(SMALL), seed=60).eval()


@pytest.fixture(scope="module")
def stacks(model, tmp_path_factory):
    """Our pipeline (two ControlNets, the union model, the XL adapter) and a maker of diffusers'
    SDXL pipelines, sharing the same weights."""
    controlnets = [random_module(lambda: ControlNet(SMALL.controlnet()), seed=s) for s in (61, 62)]
    union = random_module(lambda: UnionControlNet(UNION), seed=63)
    adapter = random_module(lambda: build_adapter(XL_ADAPTER), seed=64)
    ours = Pipeline(model, [*controlnets, union], dtype=torch.float32, adapters=[adapter])

    folder = save_diffusers(tmp_path_factory.mktemp("sdxl") / "pipeline", model)
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    assert base.config.force_zeros_for_empty_prompt  # as SDXL base's model_index.json
    parts = {
        name: getattr(base, name) for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    }
    parts |= {"unet": base.unet, "scheduler": diffusers.DDIMScheduler(**DIFFUSERS_ORIGINAL_DDIM)}
    their_adapter = _meta(lambda: diffusers.T2IAdapter.from_config(config_to_diffusers(XL_ADAPTER)))
    state = adapter_original_to_diffusers(adapter.state_dict(), XL_ADAPTER)
    their_adapter.load_state_dict(state, strict=True, assign=True)

    def theirs(kind: str):
        if kind == "adapter":
            pipe = diffusers.StableDiffusionXLAdapterPipeline(**parts, adapter=their_adapter.eval())
        elif kind == "union":
            pipe = diffusers.StableDiffusionXLControlNetUnionPipeline(
                **parts, controlnet=_their_controlnet(union), add_watermarker=False
            )
        else:
            chosen = [_their_controlnet(c) for c in controlnets[: int(kind)]]
            controlnet = chosen[0] if len(chosen) == 1 else diffusers.MultiControlNetModel(chosen)
            pipe = diffusers.StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return ours, theirs


def _maps() -> list[np.ndarray]:
    ys, xs = np.mgrid[:SIZE, :SIZE]
    ring = (np.abs(np.hypot(ys - 32, xs - 32) - 20) < 1.5).astype(np.uint8) * 255
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[15:45, 15:17] = square[15:45, 43:45] = square[15:17, 15:45] = square[43:45, 15:45] = 255
    return [np.repeat(m[:, :, None], 3, axis=2) for m in (ring, square)]


def _latents() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))


def _ours(pipe: Pipeline, units, negative: str = NEGATIVE, **settings) -> np.ndarray:
    result = pipe.generate(
        PROMPT,
        units,
        added_prompt=ADDED,
        negative_prompt=negative,
        steps=STEPS,
        guidance_scale=7.0,
        resolution=SIZE,
        latents=_latents(),
        output="float",
        **settings,
    )
    return result.images[0]


def _theirs(pipe, negative: str | None = NEGATIVE, **settings) -> np.ndarray:
    out = pipe(
        prompt=f"{PROMPT}, {ADDED}",
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        eta=0.0,
        latents=_latents(),
        output_type="np",
        height=SIZE,
        width=SIZE,
        **settings,
    )
    return out.images[0]


def _pil(images):
    from PIL import Image

    return [Image.fromarray(i) for i in images]


# --- parity with diffusers' SDXL pipelines ---------------------------------------------------------


@torch.no_grad()
def test_one_controlnet_matches_diffusers(stacks):
    ours, theirs = stacks
    image = _maps()[0]
    result = _ours(ours, [ControlUnit(image, strength=0.8)])
    reference = _theirs(theirs("1"), image=_pil([image])[0], controlnet_conditioning_scale=0.8)
    difference = np.abs(result - reference).max()
    print(f"one SDXL ControlNet: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    assert np.abs(result - _ours(ours, [])).max() > 1e-2  # the ControlNet did something


@torch.no_grad()
def test_two_controlnets_and_the_empty_negative_prompt_match_diffusers(stacks):
    """An empty negative prompt is zeros, context and pooled (diffusers' default
    force_zeros_for_empty_prompt, which reads a negative_prompt of None as empty)."""
    ours, theirs = stacks
    images = _maps()
    units = [ControlUnit(images[0], strength=1.0), ControlUnit(images[1], controlnet=1, strength=0.6)]
    result = _ours(ours, units, negative="")
    reference = _theirs(theirs("2"), negative=None, image=_pil(images), controlnet_conditioning_scale=[1.0, 0.6])
    difference = np.abs(result - reference).max()
    print(f"two SDXL ControlNets, empty negative prompt: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    text = ours.encode_text(PROMPT, "", SIZE, SIZE)
    assert not text.uncond.any() and not text.uncond_y[:, : SMALL.text_2.projection_dim].any()
    assert text.cond.any() and text.cond_y.any()


@torch.no_grad()
def test_size_conditioning_matches_diffusers_and_is_recorded(stacks):
    ours, theirs = stacks
    image = _maps()[0]
    size = SizeConditioning(original_size=(128, 96), crop_top_left=(8, 4), target_size=(48, 64))
    result = ours.generate(
        PROMPT, [ControlUnit(image)], added_prompt=ADDED, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.0,
        resolution=SIZE, latents=_latents(), output="float", size_conditioning=size,
    )  # fmt: skip
    reference = _theirs(
        theirs("1"), image=_pil([image])[0], original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(48, 64)
    )
    difference = np.abs(result.images[0] - reference).max()
    print(f"size conditioning: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    assert np.abs(result.images[0] - _ours(ours, [ControlUnit(image)])).max() > 1e-3  # it matters
    expected = {"original_size": [128, 96], "crop_top_left": [8, 4], "target_size": [48, 64]}
    assert result.settings["size_conditioning"] == expected
    assert result.settings["controls"][0].keys() >= {"controlnet", "strength"}
    assert "control_type" not in result.settings["controls"][0]  # not a union unit


@torch.no_grad()
def test_union_units_are_one_network_call_as_in_diffusers_union_pipeline(stacks):
    """Two units of the union ControlNet with the same window: one pass with two conditions, each
    weighted by its unit's strength (diffusers' union pipeline with a list of scales); the types
    named, or from the annotator (canny's map is canny)."""
    ours, theirs = stacks
    pose, edges = _maps()
    units = [
        ControlUnit(pose, controlnet=2, strength=0.7, control_type="openpose"),
        ControlUnit(edges, controlnet=2, strength=1.3, control_type="canny"),
    ]
    assert len(ours.activate_controls(units, [pose, edges])) == 1
    result = _ours(ours, units)
    reference = _theirs(
        theirs("union"),
        control_image=_pil([pose, edges]),
        control_mode=[0, 3],
        controlnet_conditioning_scale=[0.7, 1.3],
    )
    difference = np.abs(result - reference).max()
    print(f"union model, two conditions: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    # Another window makes another call: the conditions no longer share the network.
    units[1] = dataclasses.replace(units[1], end=0.5)
    assert len(ours.activate_controls(units, [pose, edges])) == 2


@torch.no_grad()
def test_one_union_unit_matches_diffusers_and_takes_its_type_from_the_annotator(stacks):
    ours, theirs = stacks
    depth = _maps()[1]
    unit = ControlUnit(depth, controlnet=2, strength=0.8, control_type="depth")
    result = ours.generate(
        PROMPT, [unit], added_prompt=ADDED, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.0,
        resolution=SIZE, latents=_latents(), output="float",
    )  # fmt: skip
    reference = _theirs(
        theirs("union"), control_image=_pil([depth]), control_mode=[1], controlnet_conditioning_scale=0.8
    )
    difference = np.abs(result.images[0] - reference).max()
    print(f"union model, one condition: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    assert result.settings["controls"][0]["control_type"] == "depth"
    # "auto" takes the annotator's: depth_from_file reads a depth map as it is, so the type is depth.
    assert UNION_TYPES["depth_from_file"] == "depth" and UNION_TYPES["canny"] == "canny"
    auto = ours.generate(
        PROMPT, [ControlUnit(depth, annotator="depth_from_file", controlnet=2, strength=0.8)], added_prompt=ADDED,
        negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.0, resolution=SIZE, latents=_latents(), output="float",
    )  # fmt: skip
    assert np.abs(auto.images[0] - result.images[0]).max() <= 1e-5
    assert auto.settings["controls"][0]["control_type"] == "depth"


@torch.no_grad()
def test_the_xl_adapter_unit_matches_diffusers_adapter_pipeline(stacks):
    """The adapter on the first half of the steps (diffusers' adapter_conditioning_factor 0.5: step
    i < int(3 * 0.5); our end 0.5: (i + 1) / 3 <= 0.5), at 0.8."""
    ours, theirs = stacks
    image = _maps()[0]
    result = _ours(ours, [ControlUnit(image, adapter=0, strength=0.8, end=0.5)])
    reference = _theirs(
        theirs("adapter"), image=_pil([image])[0], adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5
    )
    difference = np.abs(result - reference).max()
    print(f"XL adapter: max abs image difference {difference:.2e}")
    assert difference <= TOLERANCE
    assert np.abs(result - _ours(ours, [])).max() > 1e-3


@torch.no_grad()
def test_a_control_lora_loads_through_from_files_on_the_base_unet(model, tmp_path):
    base = save_ldm(tmp_path / "sdxl-small.safetensors", model)
    lora = tmp_path / "control-lora-canny-rank4.safetensors"
    _control_lora_file(lora)
    pipe = Pipeline.from_files(base, [lora], dtype="float32")
    expected = load_controlnet(lora, SMALL, unet=model.unet)
    assert all(
        torch.equal(a, b)
        for a, b in zip(pipe.controlnets[0].state_dict().values(), expected.state_dict().values(), strict=True)
    )
    image = _maps()[0]
    with_lora = pipe.generate(PROMPT, [ControlUnit(image)], steps=2, resolution=SIZE, seed=3, output="float")
    without = pipe.generate(PROMPT, [], steps=2, resolution=SIZE, seed=3, output="float")
    assert np.abs(with_lora.images[0] - without.images[0]).max() > 1e-3


# --- bad combinations and mistakes, one line each --------------------------------------------------


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_controlnets_and_adapters_of_another_family_are_refused_naming_both(model):
    """Checked when the pipeline is made, before anything moves to the device (the models here are
    on the meta device: nothing is allocated)."""
    sd15_controlnet = _meta(lambda: ControlNet(SD15.controlnet()))
    with pytest.raises(
        ValueError, match=r"^ControlNet 0: this ControlNet was made for SD 1.x but the base model is SDXL"
    ):
        Pipeline(model, [sd15_controlnet])
    sd15 = StableDiffusion(SD15, empty=True)
    sdxl_controlnet = _meta(lambda: ControlNet(SMALL.controlnet()))
    with pytest.raises(ValueError, match=r"made for SDXL but the base model is SD 1.x \(sd15\)") as error:
        Pipeline(sd15, [sdxl_controlnet])
    _one_line(error)
    sd_adapter = _meta(lambda: build_adapter(T2IAdapterConfig()))
    with pytest.raises(
        ValueError, match=r"T2I-Adapter 0: this T2I-Adapter was made for SD 1.x/2.x but the base model is SDXL"
    ) as error:
        Pipeline(model, adapters=[sd_adapter])
    _one_line(error)
    xl_adapter = _meta(lambda: build_adapter(XL_ADAPTER))
    with pytest.raises(ValueError, match=r"this T2I-Adapter was made for SDXL but the base model is SD 1.x") as error:
        Pipeline(sd15, adapters=[xl_adapter])
    _one_line(error)


@pytest.mark.parametrize(
    ("unit", "settings", "message"),
    [
        (
            {"controlnet": 2},
            {},
            r"control unit 0: ControlNet 2 is a union model, and annotator 'none' does not say which",
        ),
        ({"controlnet": 2, "control_type": "blur"}, {}, r"control unit 0: union control type must be one of auto,"),
        ({}, {"size_conditioning": (1024, 1024)}, r"size_conditioning must be a SizeConditioning, got tuple"),
    ],
)
def test_union_and_size_mistakes_are_refused_in_one_line(stacks, unit, settings, message):
    ours, _ = stacks
    with pytest.raises(ValueError, match=message) as error:
        ours.generate(PROMPT, [ControlUnit(_maps()[0], **unit)], steps=1, resolution=SIZE, **settings)
    _one_line(error)


def test_the_first_union_model_refuses_promax_types_and_sd_refuses_size_conditioning(model):
    six = random_module(lambda: UnionControlNet(dataclasses.replace(UNION, union=UnionConfig(control_types=6))), 65)
    pipe = Pipeline(model, [six], dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"control unit 0: control type 'tile' is not one of this union model's 6"
    ) as error:
        pipe.generate(PROMPT, [ControlUnit(_maps()[0], annotator="tile")], steps=1, resolution=SIZE)
    assert "tile and inpaint need the ProMax model" in _one_line(error)
    tiny, _ = random_tiny_models(seed=0)
    with pytest.raises(
        ValueError, match=r"size conditioning is SDXL's; the base model tiny \(.*\) takes none"
    ) as error:
        Pipeline(tiny, dtype=torch.float32).generate(PROMPT, [], steps=1, size_conditioning=SizeConditioning())
    _one_line(error)


# --- the command line and the servers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_files(model, tmp_path_factory):
    """A models folder as users have one, at the reduced size: the SDXL base file, the same model
    told its native size is SDXL's (1024), an SDXL ControlNet and a union ControlNet (LDM files
    with their configurations), and two control images."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("models")
    save_ldm(folder / "sdxl-small.safetensors", model)
    native = StableDiffusion(SMALL.replace(native_resolution=1024), empty=True)
    native.load_state_dict(model.state_dict(), assign=True)
    save_ldm(folder / "sdxl-native.safetensors", native)
    save_ldm(
        folder / "controlnet-sdxl.safetensors", controlnet=random_module(lambda: ControlNet(SMALL.controlnet()), 66)
    )
    save_ldm(folder / "union-sdxl.safetensors", controlnet=random_module(lambda: UnionControlNet(UNION), 67))
    images = tmp_path_factory.mktemp("images")
    for name, image in zip(("edges.png", "pose.png"), _maps(), strict=True):
        Image.fromarray(image).save(images / name)
    return folder, images


def test_the_command_line_generates_with_sdxl_its_controlnet_and_union_units(sdxl_files, tmp_path, capsys):
    from controlnet.imaging.images import read_png_text

    models, images = sdxl_files
    argv = [
        "generate", "--prompt", PROMPT, "--base", str(models / "sdxl-small.safetensors"),
        "--controlnet", str(models / "controlnet-sdxl.safetensors"),
        "--controlnet", str(models / "union-sdxl.safetensors"),
        "--image", str(images / "edges.png"), "--annotator", "none",
        "--control", f"image={images / 'pose.png'},controlnet=1,control_type=openpose,strength=0.7",
        "--control", f"image={images / 'edges.png'},controlnet=1,annotator=canny,strength=1.3",
        "--steps", "2", "--resolution", str(SIZE), "--seed", "5", "--dtype", "float32", "--device", "cpu",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads(read_png_text(tmp_path / "5.png")["controlnet"])
    assert record["model"] == "sdxl-small" and (record["width"], record["height"]) == (SIZE, SIZE)
    assert record["size_conditioning"] == {"original_size": [64, 64], "crop_top_left": [0, 0], "target_size": [64, 64]}
    assert [c.get("control_type") for c in record["controls"]] == [None, "openpose", "canny"]


def test_the_command_line_refuses_a_union_unit_without_a_type_in_one_line(sdxl_files, tmp_path, capsys):
    models, images = sdxl_files
    argv = [
        "generate", "--prompt", PROMPT, "--base", str(models / "sdxl-small.safetensors"),
        "--controlnet", str(models / "union-sdxl.safetensors"), "--image", str(images / "edges.png"),
        "--annotator", "none", "--steps", "1", "--resolution", str(SIZE), "--out", str(tmp_path), "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ControlNet 0 is a union model, and annotator 'none' does not say" in err


@pytest.fixture(scope="module")
def client(sdxl_files):
    pytest.importorskip("gradio")
    from fastapi.testclient import TestClient

    from controlnet.serve.app import build_app
    from controlnet.serve.service import Limits, ModelRegistry, Service, discover_models

    service = Service(ModelRegistry(discover_models(sdxl_files[0], include_shipped=False)), Limits())
    with TestClient(build_app(service)) as client:
        yield client


def _b64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_json_api_generates_with_sdxl_and_its_controlnets(client):
    listed = client.get("/api/models").json()
    assert listed["models"] == ["sdxl-native.safetensors", "sdxl-small.safetensors"]
    assert listed["control_models"]["sdxl-small.safetensors"]["controlnets"] == [
        "controlnet-sdxl.safetensors",
        "union-sdxl.safetensors",
    ]
    pose, edges = _maps()
    body = {
        "prompt": PROMPT, "model": "sdxl-small.safetensors", "steps": 2, "seed": 9, "resolution": SIZE,
        "units": [
            {"image": _b64(edges), "annotator": "none", "controlnet": 0},
            {"image": _b64(pose), "annotator": "none", "controlnet": 1, "control_type": "openpose"},
        ],
    }  # fmt: skip
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    settings = response.json()["settings"]
    assert settings["model"] == "sdxl-small.safetensors" and settings["size_conditioning"]["target_size"] == [64, 64]
    assert [c.get("control_type") for c in settings["controls"]] == [None, "openpose"]
    body["units"][1]["control_type"] = "bogus"
    refused = client.post("/api/generate", json=body)
    assert refused.status_code == 400 and "union control type must be one of auto, openpose" in refused.json()["error"]


def test_sdxl_defaults_to_its_native_1024_everywhere(sdxl_files, client, tmp_path, capsys, monkeypatch):
    """The command line, the JSON API and the page size an SDXL model's output at its native 1024
    when no resolution is given, and the server allows it though its own cap is 768 (checked where
    the output size is decided, without generating at 1024)."""
    sizes = []

    def stop(self, controls, resolution, *args, **kwargs):
        sizes.append(resolution)
        raise ValueError(f"stopped at resolution {resolution}")

    monkeypatch.setattr(Pipeline, "output_size", stop)
    models, _ = sdxl_files
    argv = ["generate", "--prompt", PROMPT, "--base", str(models / "sdxl-native.safetensors"), "--device", "cpu",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2 and "stopped at resolution 1024" in capsys.readouterr().err
    response = client.post("/api/generate", json={"prompt": PROMPT, "model": "sdxl-native.safetensors"})
    assert response.status_code == 400 and response.json()["error"] == "stopped at resolution 1024"
    assert sizes == [1024, 1024]
    components = {c["props"].get("label"): c["props"] for c in client.get("/config").json()["components"]}
    assert (components["Image Resolution"]["value"], components["Image Resolution"]["maximum"]) == (1024, 1024)
    too_big = client.post(
        "/api/generate", json={"prompt": PROMPT, "model": "sdxl-native.safetensors", "resolution": 1088}
    )
    assert too_big.status_code == 400 and too_big.json()["error"] == "resolution must be at most 1024 on this server"
    small = client.post("/api/generate", json={"prompt": PROMPT, "model": "sdxl-small.safetensors", "resolution": 832})
    assert small.status_code == 400 and small.json()["error"] == "resolution must be at most 768 on this server"


def test_the_a1111_api_takes_union_control_types_and_sdxl_sizes(client, monkeypatch):
    """The extension's union_control_type names (any case) choose a union unit's type, an unknown
    one is a one-line 422; an SDXL model's native 1024 is within the server's limit as width and
    height (found where the output size is decided, without generating at 1024)."""
    from PIL import Image

    unit = {"enabled": True, "image": _b64(_maps()[1]), "module": "none", "model": "union-sdxl", "weight": 0.8,
            "union_control_type": "openPose", "pixel_perfect": True}  # fmt: skip
    body = {"prompt": PROMPT, "steps": 2, "seed": 4, "width": SIZE, "height": SIZE,
            "override_settings": {"sd_model_checkpoint": "sdxl-small"},
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    png = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    control = json.loads(png.text["controlnet"])["controls"][0]
    assert (control["control_type"], control["controlnet"], control["strength"]) == ("openpose", 1, 0.8)
    unit["union_control_type"] = "Lines"
    refused = client.post("/sdapi/v1/txt2img", json=body)
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("ControlNet unit 0: union_control_type must be one of Unknown, OpenPose")

    def stop(self, controls, resolution, init_image=None, width=None, height=None):
        raise ValueError(f"stopped at {width}x{height}")

    monkeypatch.setattr(Pipeline, "output_size", stop)
    native = {
        "prompt": PROMPT,
        "width": 1024,
        "height": 1024,
        "override_settings": {"sd_model_checkpoint": "sdxl-native"},
    }
    assert client.post("/sdapi/v1/txt2img", json=native).json()["detail"] == "stopped at 1024x1024"
    larger = client.post("/sdapi/v1/txt2img", json=native | {"width": 1088, "height": 1088})
    assert larger.json()["detail"] == "1088x1088: the short side must be at most 1024 on this server"

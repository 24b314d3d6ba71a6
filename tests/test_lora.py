"""LoRA files (formats/lora.py, lora.py): random LoRAs of both layouts merged into tiny SD-shaped
models, against diffusers' reading of the same files.

The reference: diffusers 0.42's own key conversion of each file (``lora_state_dict`` with its
kohya converter, ``convert_unet_state_dict_to_peft``, ``convert_state_dict_to_peft``) and its
configuration of the layers' scales (``get_peft_kwargs``: rank and alpha patterns), merged into the
diffusers UNet and the transformers text encoder that hold the same weights as ours by PEFT's merge
formula (``Linear``: ``B @ A``; ``Conv2d``: a 1x1 product, or ``conv2d(A^T, B)^T`` for a kxk
kernel; times ``lora_alpha / r`` and the weight): the steps ``load_lora_weights`` takes, with
diffusers' own code for every name, for every layout and family. Beside them, one comparison per
layout (kohya and PEFT) against diffusers' real ``load_lora_weights`` + ``fuse_lora`` with PEFT
(in the dev extra) on a two-component pipeline.

Tolerance: the outputs agree to 5e-6 of the reference's largest magnitude (float32; measured: at most
1.1e-6, the plain models' own agreement; the merged weights are summed in another order).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from controlnet.config import TINY, ModelConfig, TextEncoderConfig
from controlnet.formats.diffusers_text import text_config_to_diffusers, text_ldm_to_diffusers
from controlnet.formats.diffusers_unet import unet_ldm_to_diffusers
from controlnet.formats.diffusers_unet_config import unet_config_to_diffusers
from controlnet.formats.errors import CheckpointError
from controlnet.lora import (
    apply_loras,
    find_lora,
    load_lora,
    parse_lora_argument,
    prompt_loras,
)
from controlnet.models.conditioning import added_vector
from controlnet.models.stable_diffusion import build_text_encoders
from controlnet.models.text import with_padding
from controlnet.models.unet import UNet

from .helpers import random_module, relative_error

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from diffusers.utils.peft_utils import get_peft_kwargs  # noqa: E402
from diffusers.utils.state_dict_utils import (  # noqa: E402
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

TOLERANCE = 5e-6
OPENCLIP_TINY = TextEncoderConfig(
    arch="openclip", width=64, layers=3, heads=2, mlp_width=256, output_layer="penultimate", projection_dim=32
)
# SD 1.x's shapes (1x1-conv proj_in/proj_out, CLIP) and SD 2.x's (Linear proj_in, OpenCLIP's fused
# in_proj, the penultimate layer), tiny.
SD1_LIKE = TINY.replace(name="tiny-sd1", unet=dataclasses.replace(TINY.unet, use_linear_in_transformer=False))
SD2_LIKE = TINY.replace(name="tiny-sd2", text=OPENCLIP_TINY)
CONFIGS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE}


# --- the models: ours and diffusers' / transformers' on the same weights -------------------------


class _Model(nn.Module):
    """What LoRAs change, as a StableDiffusion holds it: ``unet`` and ``text_encoder`` (no VAE: faster)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.text_encoder = build_text_encoders(config)


def _ours(config: ModelConfig, seed: int = 0) -> _Model:
    return random_module(lambda: _Model(config), seed)


def _their_unet(model: _Model) -> nn.Module:
    config = model.unet.config
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(config))
    state = {k: v.clone() for k, v in unet_ldm_to_diffusers(model.unet.state_dict(), config).items()}
    theirs.load_state_dict(state, strict=True, assign=True)
    return theirs.eval()


def _their_text(model: _Model) -> nn.Module:
    """transformers' CLIPTextModel of our text encoder (eager attention), as in tests/test_text.py."""
    cfg = model.text_encoder.config
    config = transformers.CLIPTextConfig.from_dict(text_config_to_diffusers(cfg))
    config._attn_implementation = "eager"
    with torch.device("meta"):
        theirs = transformers.CLIPTextModel(config)
    state = text_ldm_to_diffusers(model.text_encoder.state_dict(), cfg)
    if not hasattr(theirs, "text_model"):  # transformers 5 names the modules without it
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    theirs.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    theirs.embeddings.position_ids = torch.arange(cfg.max_length).unsqueeze(0)
    return theirs.eval()


def _inputs(config: ModelConfig, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.unet.in_channels, 16, 16, generator=generator)
    t = torch.tensor([981, 41])
    context = torch.randn(2, 77, config.unet.context_dim, generator=generator)
    tokens = torch.randint(1, 49406, (2, 77), generator=generator)
    tokens[:, 0], tokens[:, 12:] = 49406, 49407
    return x, t, context, tokens


@torch.no_grad()
def _outputs(model: _Model, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, context, tokens = _inputs(config)
    return model.unet(x, t, context), model.text_encoder(tokens)


@torch.no_grad()
def _their_outputs(unet: nn.Module, text: nn.Module, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, context, tokens = _inputs(config)
    return unet(x, t, encoder_hidden_states=context).sample, text(tokens).last_hidden_state


# --- random LoRA files, named from diffusers' and transformers' module trees ----------------------


def _low_rank_layers(root: nn.Module, rank: int, conv_rank: int, generator: torch.Generator):
    """(module name, down, up) for every Linear and Conv2d: LoCon, 3x3 down and 1x1 up for a 3x3 conv."""
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            r = rank
            down = torch.randn(r, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, r, generator=generator) * 0.3 / r**0.5
        elif isinstance(module, nn.Conv2d):
            r = conv_rank if module.kernel_size != (1, 1) else rank
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            down = torch.randn(r, module.in_channels, *module.kernel_size, generator=generator) / fan_in**0.5
            up = torch.randn(module.out_channels, r, 1, 1, generator=generator) * 0.3 / r**0.5
        else:
            continue
        yield name, down, up


def _text_name(name: str) -> str:
    """transformers' module path as kohya and diffusers spell it (transformers 5 leaves out
    ``text_model.``; SDXL's ``text_projection`` is outside it)."""
    return name if name.startswith(("text_model.", "text_projection")) else f"text_model.{name}"


def write_kohya(path: Path, unet: nn.Module, text: nn.Module, seed: int, alpha=2.0, conv_alpha=1.0) -> Path:
    """A kohya-layout LoCon in float16: linear layers rank 4 with one alpha, convolutions rank 2
    (3x3 down, 1x1 up) with another, as sd-scripts' ``conv_dim``/``conv_alpha`` write them."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, root in (("lora_unet_", unet), ("lora_te_", text)):
        for name, down, up in _low_rank_layers(root, 4, 2, generator):
            module = prefix + (_text_name(name) if root is text else name).replace(".", "_")
            tensors[f"{module}.lora_down.weight"] = down.half()
            tensors[f"{module}.lora_up.weight"] = up.half()
            tensors[f"{module}.alpha"] = torch.tensor(conv_alpha if down.ndim == 4 and down.shape[2] > 1 else alpha)
    save_file(tensors, str(path))
    return path


# The PEFT config diffusers' save_lora_weights writes beside the tensors.
PEFT_METADATA = {
    "unet.r": 4,
    "unet.lora_alpha": 8,
    "unet.alpha_pattern": {"conv1": 3, "proj_out": 1},
    "unet.rank_pattern": {},
    "text_encoder.r": 4,
    "text_encoder.lora_alpha": 2,
}


def write_peft(path: Path, unet: nn.Module, text: nn.Module, seed: int, metadata=PEFT_METADATA) -> Path:
    """diffusers' current layout: ``unet.<module>.lora_A.weight``, ``text_encoder.text_model...``,
    with PEFT's config in the safetensors metadata."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, root in (("unet.", unet), ("text_encoder.", text)):
        for name, down, up in _low_rank_layers(root, 4, 4, generator):
            module = prefix + (_text_name(name) if root is text else name)
            tensors[f"{module}.lora_A.weight"] = down
            tensors[f"{module}.lora_B.weight"] = up
    extra = {"lora_adapter_metadata": json.dumps(metadata)} if metadata else {}
    save_file(tensors, str(path), metadata={"format": "pt", **extra})
    return path


_OLD_UNET = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
_OLD_TEXT = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


def write_old_diffusers(path: Path, unet: nn.Module, text: nn.Module, seed: int) -> Path:
    """Older diffusers versions' names: attention processors (``attn1.processor.to_q_lora.down``),
    ``LoRACompatibleConv``/``Linear`` (``conv1.lora.down``), the text encoder's ``to_q_lora`` and
    ``lora_linear_layer``. No alphas: scale 1."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, down, up in _low_rank_layers(unet, 4, 2, generator):
        parent, _, leaf = name.rpartition(".")
        if name.endswith("to_out.0"):
            parent, leaf = name.removesuffix(".to_out.0"), "to_out.0"
        module = f"unet.{parent}.processor.{_OLD_UNET[leaf]}" if leaf in _OLD_UNET else f"unet.{name}.lora"
        tensors[f"{module}.down.weight"], tensors[f"{module}.up.weight"] = down, up
    for name, down, up in _low_rank_layers(text, 4, 4, generator):
        parent, _, leaf = _text_name(name).rpartition(".")
        module = f"text_encoder.{parent}.{_OLD_TEXT[leaf]}" if leaf in _OLD_TEXT else f"text_encoder.{parent}.{leaf}"
        if leaf not in _OLD_TEXT:
            module += ".lora_linear_layer"
        tensors[f"{module}.down.weight"], tensors[f"{module}.up.weight"] = down, up
    save_file(tensors, str(path))
    return path


WRITERS = {"kohya": write_kohya, "peft": write_peft, "diffusers-old": write_old_diffusers}


# --- the reference: diffusers' reading of a file, merged by PEFT's formula ------------------------


def _pattern(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern matching the module's path or a suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_merge(root: nn.Module, state: dict, config: dict, weight: float) -> None:
    """Add every LoRA layer of a PEFT-named state dict into ``root``'s weights, as PEFT's
    ``merge`` does (``get_delta_weight``), with the scale from diffusers' LoraConfig arguments."""
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        name = key.removesuffix(".lora_A.weight")
        a, b = state[key].float(), state[f"{name}.lora_B.weight"].float()
        layer = root.get_submodule(name)
        r = _pattern(config["rank_pattern"], name, config["r"])
        scale = _pattern(config["alpha_pattern"], name, config["lora_alpha"]) / r
        if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif isinstance(layer, nn.Conv2d):
            delta = F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
        else:
            delta = b @ a
        layer.weight.data = layer.weight.data + weight * scale * delta


def _diffusers_reading(path: Path, roots: dict[str, nn.Module], loader=StableDiffusionLoraLoaderMixin, **kwargs):
    """What diffusers makes of a file for each of ``roots`` (``unet``, ``text_encoder``,
    ``text_encoder_2``): the PEFT state dict and LoraConfig arguments its ``load_lora_weights``
    would give PEFT (``load_lora_into_unet`` / ``_load_lora_into_text_encoder``), by its own code."""
    state, alphas, metadata = loader.lora_state_dict(str(path), return_lora_metadata=True, **kwargs)
    readings = {}
    for prefix, root in roots.items():
        is_unet = prefix == "unet"
        own = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
        own_alphas = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items() if k.split(".")[0] == prefix}
        if is_unet:
            own = convert_unet_state_dict_to_peft(own) if "lora_A" not in next(iter(own)) else own
            ranks = {f"^{k}": v.shape[1] for k, v in own.items() if "lora_B" in k}
        else:
            own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
            if not hasattr(root, "text_model"):
                own = {k.removeprefix("text_model."): v for k, v in own.items()}
            ranks = {k: v.shape[1] for k, v in own.items() if "lora_B" in k}
        config = {k.removeprefix(f"{prefix}."): v for k, v in (metadata or {}).items() if k.startswith(f"{prefix}.")}
        if not config:
            config = get_peft_kwargs(ranks, own_alphas, own, is_unet=is_unet)
        config = {"rank_pattern": {}, "alpha_pattern": {}, **config}
        config["rank_pattern"] = {k.lstrip("^"): v for k, v in config["rank_pattern"].items()}
        readings[prefix] = (own, config)
    return readings


def _merge_reference(roots: dict[str, nn.Module], files: list[tuple[Path, float]], **kwargs) -> None:
    for path, weight in files:
        for prefix, (state, config) in _diffusers_reading(path, roots, **kwargs).items():
            _peft_merge(roots[prefix], state, config, weight)


def _reference(model: _Model, files: list[tuple[Path, float]]):
    """diffusers' UNet and transformers' text encoder on the model's weights with the files merged."""
    unet, text = _their_unet(model), _their_text(model)
    _merge_reference({"unet": unet, "text_encoder": text}, files)
    return _their_outputs(unet, text, model.config)


def _assert_close(ours, reference, what: str) -> None:
    for name, a, b in zip(("UNet", "text encoder"), ours, reference, strict=True):
        error = relative_error(a, b)
        print(f"{what} {name}: relative max abs error {error:.1e}")
        assert error <= TOLERANCE, f"{what} {name}: {error:.1e}"


# --- exactness against diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(WRITERS))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_lora_of_each_layout_matches_diffusers(family, layout, tmp_path):
    config = CONFIGS[family]
    model = _ours(config)
    path = WRITERS[layout](tmp_path / "style.safetensors", _their_unet(model), _their_text(model), seed=5)
    plain = _outputs(model, config)
    lora = load_lora(path)
    assert lora.name == "style" and lora.layout == ("kohya" if layout == "kohya" else "diffusers")
    with apply_loras(model, [(lora, 0.8)]) as applied:
        assert applied.parameters
        merged = _outputs(model, config)
    _assert_close(merged, _reference(model, [(path, 0.8)]), f"{family} {layout}")
    # Not a vacuous comparison: the LoRA changes both outputs.
    assert all(relative_error(a, b) > 1e-2 for a, b in zip(merged, plain, strict=True))


def test_two_loras_add_with_their_weights(tmp_path):
    config = SD1_LIKE
    model = _ours(config)
    unet, text = _their_unet(model), _their_text(model)
    first = write_kohya(tmp_path / "first.safetensors", unet, text, seed=6)
    second = write_peft(tmp_path / "second.safetensors", unet, text, seed=7)
    loras = [(load_lora(first), 0.6), (load_lora(second), -0.35)]
    with apply_loras(model, loras):
        merged = _outputs(model, config)
    _assert_close(merged, _reference(model, [(first, 0.6), (second, -0.35)]), "two LoRAs")
    # The merged weights are the sums of each one's difference (float32, rounded once).
    name = "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    before = model.get_parameter(name).detach().clone()
    deltas = []
    for lora, weight in loras:
        with apply_loras(model, [(lora, weight)]):
            deltas.append(model.get_parameter(name).detach() - before)
    with apply_loras(model, loras):
        both = model.get_parameter(name).detach() - before
    assert torch.allclose(both, deltas[0] + deltas[1], atol=1e-6)
    assert deltas[0].abs().max() > 1e-2 and deltas[1].abs().max() > 1e-2


# --- merging and unmerging -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_unmerging_restores_every_weight_bit_for_bit(dtype, tmp_path):
    model = _ours(SD2_LIKE)
    lora = load_lora(write_kohya(tmp_path / "a.safetensors", _their_unet(model), _their_text(model), seed=8))
    model = model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    applied = apply_loras(model, [(lora, 1.3)])
    changed = set(applied.parameters)
    assert "text_encoder.model.transformer.resblocks.0.attn.in_proj_weight" in changed  # q, k, v: one weight
    assert all(model.get_parameter(k).dtype == dtype for k in changed)
    assert sum(not torch.equal(before[k], model.state_dict()[k]) for k in changed) == len(changed)
    with pytest.raises(ValueError, match="already merged"):
        apply_loras(model, [(lora, 1.0)])
    applied.restore()
    applied.restore()  # a second restore does nothing
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(after[k].data_ptr() == pointers[k] for k in after)  # the original tensors themselves
    # Applying again after a restore works and gives the same merged weights.
    with apply_loras(model, [(lora, 1.3)]):
        pass


def test_weight_zero_changes_nothing(tmp_path):
    model = _ours(SD1_LIKE)
    lora = load_lora(write_peft(tmp_path / "a.safetensors", _their_unet(model), _their_text(model), seed=9))
    plain = _outputs(model, SD1_LIKE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_loras(model, [(lora, 0.0)]) as applied:
        assert applied.parameters == ()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model, SD1_LIKE), plain, strict=True))


def test_channels_last_weights_keep_their_layout(tmp_path):
    model = _ours(SD1_LIKE).to(memory_format=torch.channels_last)
    lora = load_lora(write_kohya(tmp_path / "a.safetensors", _their_unet(model), _their_text(model), seed=10))
    name = "unet.input_blocks.1.0.in_layers.2.weight"
    with apply_loras(model, [(lora, 1.0)]):
        assert model.get_parameter(name).is_contiguous(memory_format=torch.channels_last)


def test_a_tucker_convolution_is_the_three_convolutions_in_a_row(tmp_path):
    """LyCORIS' LoCon with a Tucker core: ``up(mid(down(x)))`` (1x1, 3x3, 1x1) merged into one kernel."""
    model = _ours(SD1_LIKE)
    conv = model.unet.input_blocks[1][0].in_layers[2]
    generator = torch.Generator().manual_seed(11)
    down = torch.randn(3, conv.in_channels, 1, 1, generator=generator)
    mid = torch.randn(3, 3, 3, 3, generator=generator)
    up = torch.randn(conv.out_channels, 3, 1, 1, generator=generator)
    save_file(
        {
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": down,
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": mid,
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": up,
            "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.5),
        },
        str(tmp_path / "tucker.safetensors"),
    )
    x = torch.randn(2, conv.in_channels, 9, 9, generator=generator)
    with torch.no_grad():
        base = conv(x)
        chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
        with apply_loras(model, [(load_lora(tmp_path / "tucker.safetensors"), 0.5)]):
            merged = conv(x)
    assert relative_error(merged - base, 0.5 * 1.5 / 3 * chain) <= 1e-5


# --- SDXL: two text encoders, and the UNet under its original names --------------------------------


@pytest.fixture(scope="module")
def sdxl() -> _Model:
    from .test_sdxl import SMALL

    return _ours(SMALL)


@torch.no_grad()
def test_an_sdxl_lora_matches_diffusers(sdxl, tmp_path):
    """kohya's SDXL layout: the UNet under the original (sgm) module names, ``lora_te1_`` and
    ``lora_te2_`` (with the bigG's ``text_projection``), against diffusers' SDXL reading."""
    from .test_sdxl import _inputs, _transformers_text

    config = sdxl.config
    state = sdxl.text_encoder.state_dict()
    texts = [
        _transformers_text(
            cfg,
            {k.removeprefix(f"embedders.{i}."): v.clone() for k, v in state.items() if k.startswith(f"embedders.{i}.")},
        )
        for i, cfg in enumerate((config.text, config.text_2))
    ]
    roots = {"unet": _their_unet(sdxl), "text_encoder": texts[0], "text_encoder_2": texts[1]}
    generator = torch.Generator().manual_seed(13)
    tensors = {}
    for prefix, root in (("lora_unet_", sdxl.unet), ("lora_te1_", texts[0]), ("lora_te2_", texts[1])):
        for name, down, up in _low_rank_layers(root, 4, 2, generator):
            module = prefix + (name if root is sdxl.unet else _text_name(name)).replace(".", "_")
            tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"] = down.half(), up.half()
            tensors[f"{module}.alpha"] = torch.tensor(1.0 if down.ndim == 4 and down.shape[2] > 1 else 2.0)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha" in tensors
    assert "lora_te2_text_projection.alpha" in tensors
    path = tmp_path / "xl.safetensors"
    save_file(tensors, str(path))

    x, t, context, pooled, time_ids = _inputs(seed=1)
    tokens = sdxl.text_encoder.tokenize(["a photo of a cat", "an astronaut riding a horse"])
    with apply_loras(sdxl, [(load_lora(path), 0.9)]):
        ours = sdxl.unet(x, t, context, y=added_vector(pooled, time_ids)), sdxl.text_encoder.encode(tokens)
    _merge_reference(roots, [(path, 0.9)], loader=StableDiffusionXLLoraLoaderMixin, unet_config=roots["unet"].config)
    theirs = roots["unet"](
        x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    )
    first = roots["text_encoder"](with_padding(tokens, config.text.pad_token_id), output_hidden_states=True)
    second = roots["text_encoder_2"](with_padding(tokens, config.text_2.pad_token_id), output_hidden_states=True)
    for name, a, b in [
        ("UNet", ours[0], theirs.sample),
        ("context", ours[1].context, torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)),
        ("pooled", ours[1].pooled, second.text_embeds),
    ]:
        error = relative_error(a, b)
        print(f"SDXL kohya {name}: relative max abs error {error:.1e}")
        assert error <= TOLERANCE, name
    # An SDXL LoRA on an SD model: one line, naming what it is for.
    with pytest.raises(CheckpointError, match=r"match no layer .*first: lora_\w+\); a LoRA for SDXL$"):
        apply_loras(_ours(SD1_LIKE), [(load_lora(path), 1.0)])


def test_sdxl_text_encoders_take_lora_te1_and_lora_te2(sdxl, tmp_path):
    from .test_sdxl import SMALL

    model = sdxl
    first, second = model.text_encoder.embedders
    generator = torch.Generator().manual_seed(12)
    tensors = {}
    for prefix, width in (("lora_te1_", SMALL.text.width), ("lora_te2_", SMALL.text_2.width)):
        for projection in ("q_proj", "v_proj", "out_proj"):
            module = f"{prefix}text_model_encoder_layers_1_self_attn_{projection}"
            tensors[f"{module}.lora_down.weight"] = torch.randn(2, width, generator=generator)
            tensors[f"{module}.lora_up.weight"] = torch.randn(width, 2, generator=generator)
    # kohya's SDXL UNet names are the original ones: input_blocks.4.1 is the first transformer.
    unet = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    tensors[f"{unet}.lora_down.weight"] = torch.randn(2, SMALL.unet.context_dim, generator=generator)
    tensors[f"{unet}.lora_up.weight"] = torch.randn(64, 2, generator=generator)
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = load_lora(tmp_path / "xl.safetensors")
    with apply_loras(model, [(lora, 1.0)]) as applied:
        changed = set(applied.parameters)
        w = SMALL.text_2.width
        fused = model.get_parameter("text_encoder.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight")
        start = before["text_encoder.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
        q = tensors["lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight"]
        q = q @ tensors["lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight"]
        assert torch.allclose(fused[:w] - start[:w], q, atol=1e-5)
        assert torch.equal(fused[w : 2 * w], start[w : 2 * w])  # k: no layer
        assert fused[2 * w :].ne(start[2 * w :]).any()  # v
    assert changed == {
        "text_encoder.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "text_encoder.embedders.0.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight",
        "text_encoder.embedders.0.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight",
        "text_encoder.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "text_encoder.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight",
        "unet.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    }
    assert first is model.text_encoder.embedders[0] and second is model.text_encoder.embedders[1]


# --- refusals, each in one line --------------------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unmatched_layers_are_refused_naming_the_first_and_how_many(tmp_path):
    model = _ours(SD1_LIKE)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 2),
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32),
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2),
        "lora_unet_mid_block_attentions_9_proj_out.lora_down.weight": torch.randn(2, 32),
        "lora_unet_mid_block_attentions_9_proj_out.lora_up.weight": torch.randn(32, 2),
    }
    save_file(tensors, str(tmp_path / "other.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        apply_loras(model, [(load_lora(tmp_path / "other.safetensors"), 1.0)])
    message = _one_line(error)
    assert "2 of its 3 layers match no layer" in message and "lora_unet_down_blocks_7_attentions_0_proj_in" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_a_lora_for_another_family_is_refused_in_one_line(tmp_path):
    # An SD 2.x-shaped LoRA (1024-wide cross-attention) on a model whose context is 64 wide.
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 1024),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(32, 4),
    }
    save_file(tensors, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(CheckpointError) as error:
        apply_loras(_ours(SD1_LIKE), [(load_lora(tmp_path / "sd2.safetensors"), 1.0)])
    message = _one_line(error)
    assert "do not fit" in message and "[32, 1024]" in message and message.endswith("a LoRA for SD 2.x")


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"lora_unet_conv_in.hada_w1_a": torch.ones(2, 2)}, "LoHa"),
        ({"lora_unet_conv_in.lokr_w1": torch.ones(2, 2)}, "LoKr"),
        (
            {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4), "lora_unet_conv_in.dora_scale": torch.ones(4)},
            "DoRA",
        ),
        ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4)}, "has no up weight"),
        (
            {
                "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4),
                "lora_unet_conv_in.lora_up.weight": torch.ones(4, 3),
            },
            "not a low-rank pair",
        ),
        ({"model.diffusion_model.out.2.weight": torch.ones(4, 4)}, r"1 of its 1 tensors are not LoRA layers"),
        ({"lora_unet_conv_in.lora_down.weight": torch.full((2, 4), float("nan"))}, "NaN"),
        ({"lora_controlnet": torch.ones(1), "input_blocks.1.0.in_layers.2.up": torch.ones(4, 2)}, "Control-LoRA"),
    ],
    ids=["loha", "lokr", "dora", "no-up", "no-chain", "not-lora", "nan", "control-lora"],
)
def test_files_that_are_not_usable_loras_are_refused(tensors, message, tmp_path):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=message) as error:
        load_lora(tmp_path / "bad.safetensors")
    _one_line(error)


def test_a_pickle_is_read_as_tensors_only(tmp_path):
    model = _ours(TINY)
    torch.save(
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 64),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(256, 2),
        },
        tmp_path / "old.pt",
    )
    with apply_loras(model, [(load_lora(tmp_path / "old.pt"), 1.0)]) as applied:
        assert applied.parameters == ("text_encoder.transformer.text_model.encoder.layers.0.mlp.fc1.weight",)

    class Evil:
        def __reduce__(self):
            return (print, ("never run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_lora(tmp_path / "evil.pt")


def test_bad_weights_and_arguments_are_refused(tmp_path):
    model = _ours(TINY)
    lora = load_lora(write_peft(tmp_path / "a.safetensors", _their_unet(model), _their_text(model), seed=1))
    for weight in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="finite number"):
            apply_loras(model, [(lora, weight)])
    with pytest.raises(TypeError, match="Lora"):
        apply_loras(model, [(str(tmp_path / "a.safetensors"), 1.0)])


# --- naming LoRAs: FILE[:WEIGHT], <lora:NAME:WEIGHT>, a folder of LoRAs ----------------------------


def test_lora_arguments_and_prompt_tags_are_parsed():
    assert parse_lora_argument("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_argument("loras/style.safetensors:0.6") == (Path("loras/style.safetensors"), 0.6)
    assert parse_lora_argument("loras/style.safetensors:-1") == (Path("loras/style.safetensors"), -1.0)
    assert parse_lora_argument(r"C:\loras\style.safetensors") == (Path(r"C:\loras\style.safetensors"), 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_argument("style.safetensors:nan")
    text, found = prompt_loras("a cat <lora:ink_style:0.7>, sitting <lora:detail> on a mat")
    assert text == "a cat , sitting on a mat" and found == [("ink_style", 0.7), ("detail", 1.0)]
    assert prompt_loras("no tags here") == ("no tags here", [])
    for bad in ("<lora::1>", "<lora:x:y>", "<lora:x:1:2>", "<lora:x:inf>"):
        with pytest.raises(ValueError, match="lora"):
            prompt_loras(f"a cat {bad}")


def test_loras_are_found_by_name_in_their_folder(tmp_path):
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "ink[v2].safetensors").write_bytes(b"x")
    (tmp_path / "detail.pt").write_bytes(b"x")
    (tmp_path / "detail.safetensors").write_bytes(b"x")
    assert find_lora("ink[v2]", tmp_path) == tmp_path / "styles" / "ink[v2].safetensors"
    assert find_lora("detail", tmp_path) == tmp_path / "detail.safetensors"  # safetensors first
    (tmp_path / "styles" / "detail.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="2 LoRAs called 'detail'"):
        find_lora("detail", tmp_path)
    for name in ("../detail", "/etc/passwd", "", ".hidden", "a\\b"):
        with pytest.raises(ValueError, match="LoRA name"):
            find_lora(name, tmp_path)
    with pytest.raises(ValueError, match="no LoRA called 'missing'"):
        find_lora("missing", tmp_path)


# --- diffusers' own load_lora_weights + fuse_lora (PEFT installed) -------------------------------


def safe_open_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return list(file.keys())


class _TinyLoraPipeline(StableDiffusionLoraLoaderMixin):
    """The two components diffusers' LoRA loader reads and fuses into, on our model's weights (a
    DiffusionPipeline's attributes that the loader looks at; no offloading)."""

    hf_device_map = None

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        self.unet, self.text_encoder = unet, text_encoder
        self.components = {"unet": unet, "text_encoder": text_encoder}


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_a_lora_matches_diffusers_load_lora_weights_and_fuse_lora(layout, tmp_path):
    """The end-to-end reference: diffusers' ``load_lora_weights`` (PEFT's layers) then
    ``fuse_lora(lora_scale=...)``, where the tests above replay its steps."""
    pytest.importorskip("peft")
    config = SD1_LIKE
    model = _ours(config)
    path = WRITERS[layout](tmp_path / "style.safetensors", _their_unet(model), _their_text(model), seed=5)
    if layout == "peft":  # the full LoraConfig, as save_lora_weights writes it: also its target modules
        names = {k.removesuffix(".lora_A.weight") for k in safe_open_keys(path) if k.endswith(".lora_A.weight")}
        targets = {
            f"{part}.target_modules": sorted(  # module paths in the model (transformers 5: no text_model.)
                n.split(".", 1)[1].removeprefix("text_model.") for n in names if n.startswith(f"{part}.")
            )
            for part in ("unet", "text_encoder")
        }
        write_peft(path, _their_unet(model), _their_text(model), seed=5, metadata=PEFT_METADATA | targets)
    theirs = _TinyLoraPipeline(_their_unet(model), _their_text(model))
    theirs.load_lora_weights(str(path), adapter_name="style")
    theirs.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.7)
    theirs.unload_lora_weights()  # the fused weights stay; PEFT's layers go
    with apply_loras(model, [(load_lora(path), 0.7)]):
        ours = _outputs(model, config)
    _assert_close(ours, _their_outputs(theirs.unet, theirs.text_encoder, config), f"load_lora_weights {layout}")

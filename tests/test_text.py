"""Text encoders: parity with transformers' CLIPTextModel and open_clip's block structure, key names
against the original SD 1.5 checkpoint layout, and the diffusers key/config maps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from controlnet.config import SD15, SD21, TINY, TextEncoderConfig
from controlnet.formats.diffusers_text import (
    text_config_from_diffusers,
    text_config_to_diffusers,
    text_diffusers_to_ldm,
    text_ldm_to_diffusers,
)
from controlnet.models.text import (
    POSITION_IDS_KEY,
    CLIPTextEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    build_text_encoder,
    clip_position_ids,
)
from controlnet.models.tokenizer import default_tokenizer

transformers = pytest.importorskip("transformers")

LDM_KEYS = Path(__file__).parent / "data" / "ldm_keys.json"
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on Mars, highly detailed, 4k, trending on artstation"]
OPENCLIP_SMALL = TextEncoderConfig(
    arch="openclip", width=96, layers=4, heads=4, mlp_width=384, output_layer="penultimate", projection_dim=48
)
OPENCLIP_TINY = TextEncoderConfig(
    arch="openclip", width=64, layers=3, heads=2, mlp_width=256, output_layer="penultimate", projection_dim=32
)


def _shapes(cfg: TextEncoderConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    return {key: value.shape for key, value in model.state_dict().items()}


def _random_state(cfg: TextEncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights: std 0.02 everywhere, LayerNorm gains near 1 so the output has unit scale."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _shapes(cfg).items():
        value = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
        if len(shape) == 1 and key.endswith(".weight"):  # the only 1-D weights are LayerNorm gains
            value.mul_(5.0).add_(1.0)
        state[key] = value
    return state


def _ours(cfg: TextEncoderConfig, state: dict[str, torch.Tensor]) -> TextEncoder:
    # Built on the meta device and given the tensors themselves: no default init, no copies.
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _hf(cfg: TextEncoderConfig, diffusers_state: dict[str, torch.Tensor]) -> nn.Module:
    """transformers' CLIPTextModel (eager attention: an explicit softmax, independent of our SDPA path).

    transformers 5 names the in-memory parameters without ``text_model.``; the file layout has it.
    """
    config = transformers.CLIPTextConfig.from_dict(text_config_to_diffusers(cfg))
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.CLIPTextModel(config)
    assert all(key.startswith("text_model.") for key in diffusers_state)
    model.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in diffusers_state.items()}, strict=True, assign=True
    )
    # The only buffer (not in any state dict) was made on the meta device.
    model.embeddings.position_ids = torch.arange(cfg.max_length).unsqueeze(0)
    return model.eval()


def _tokens(cfg: TextEncoderConfig) -> torch.Tensor:
    return default_tokenizer()(PROMPTS, pad_token_id=cfg.pad_token_id, max_length=cfg.max_length)


def _compare(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    scale = ref.std().item()
    print(f"{name}: max abs err {err:.3g}, output std {scale:.3g}, relative {err / scale:.3g}")
    assert err <= 1e-4 * scale


# --- (a) parity at full size, and the maps on full-size weights ---------------------------------
# One class per model so that each 0.5-1.4 GB random state is freed before the next is made.


@pytest.mark.slow
class TestSD15FullSize:
    @pytest.fixture(scope="class")
    def sd15_state(self) -> dict[str, torch.Tensor]:
        return _random_state(SD15.text, seed=15)

    def test_sd15_matches_transformers(self, sd15_state: dict[str, torch.Tensor]) -> None:
        cfg = SD15.text
        tokens = _tokens(cfg)
        assert tokens[0, 7:].eq(49407).all()  # SD 1.x pads with the end token
        with torch.no_grad():
            ours = _ours(cfg, sd15_state)(tokens)
            ref = _hf(cfg, text_ldm_to_diffusers(sd15_state, cfg))(tokens).last_hidden_state
        assert ours.shape == (2, 77, 768)
        _compare("SD1.5 CLIP ViT-L/14 vs CLIPTextModel", ours, ref)

    def test_sd15_round_trips(self, sd15_state: dict[str, torch.Tensor]) -> None:
        cfg = SD15.text
        diffusers_state = text_ldm_to_diffusers(sd15_state, cfg)
        assert len(diffusers_state) == len(sd15_state) == 196
        assert (
            diffusers_state["text_model.encoder.layers.0.self_attn.q_proj.weight"]
            is sd15_state["transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]
        )
        _assert_same(text_diffusers_to_ldm(diffusers_state, cfg), sd15_state)
        _assert_same(text_ldm_to_diffusers(text_diffusers_to_ldm(diffusers_state, cfg), cfg), diffusers_state)


@pytest.mark.slow
class TestSD21FullSize:
    @pytest.fixture(scope="class")
    def sd21_state(self) -> dict[str, torch.Tensor]:
        return _random_state(SD21.text, seed=21)

    def test_sd21_penultimate_matches_23_layer_transformers(self, sd21_state: dict[str, torch.Tensor]) -> None:
        cfg = SD21.text
        tokens = _tokens(cfg)
        assert tokens[0, 7:].eq(0).all()  # open_clip pads with 0
        diffusers_state = text_ldm_to_diffusers(sd21_state, cfg)
        assert text_config_to_diffusers(cfg)["num_hidden_layers"] == 23
        with torch.no_grad():
            ours = _ours(cfg, sd21_state)(tokens)
            ref = _hf(cfg, diffusers_state)(tokens).last_hidden_state
        assert ours.shape == (2, 77, 1024)
        _compare("SD2.1 OpenCLIP ViT-H/14 (penultimate) vs 23-layer CLIPTextModel", ours, ref)

    def test_sd21_round_trips(self, sd21_state: dict[str, torch.Tensor]) -> None:
        cfg = SD21.text
        diffusers_state = text_ldm_to_diffusers(sd21_state, cfg)
        assert not any(k.startswith("text_model.encoder.layers.23.") for k in diffusers_state)
        assert "text_model.encoder.layers.22.self_attn.v_proj.bias" in diffusers_state
        assert diffusers_state["text_model.encoder.layers.0.self_attn.k_proj.weight"].shape == (1024, 1024)
        # Diffusers -> LDM -> diffusers is exact.
        back = text_diffusers_to_ldm(diffusers_state, cfg)
        _assert_same(text_ldm_to_diffusers(back, cfg), diffusers_state)
        # LDM -> diffusers -> LDM is exact except for what diffusers cannot hold: zero placeholders.
        assert back.keys() == sd21_state.keys()
        placeholders = {k for k in back if k.startswith("model.transformer.resblocks.23.")}
        placeholders |= {"model.text_projection", "model.logit_scale"}
        for key, value in back.items():
            if key in placeholders:
                assert value.shape == sd21_state[key].shape and not value.any(), key
            else:
                assert torch.equal(value, sd21_state[key]), key


# --- open_clip structure -------------------------------------------------------------------------


def _open_clip_reference(state: dict[str, torch.Tensor], cfg: TextEncoderConfig, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text tower as ``FrozenOpenCLIPEmbedder`` runs it: sequence-first, nn.MultiheadAttention
    with an additive -inf mask, and the last resblock skipped for the penultimate output."""
    length = tokens.shape[1]
    x = F.embedding(tokens, state["model.token_embedding.weight"]) + state["model.positional_embedding"][:length]
    x = x.permute(1, 0, 2)
    mask = torch.full((length, length), float("-inf")).triu_(1)
    skip = 1 if cfg.output_layer == "penultimate" else 0
    for i in range(cfg.layers - skip):
        p = f"model.transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(cfg.width, cfg.heads)
        attn.load_state_dict({k.removeprefix(p + "attn."): v for k, v in state.items() if k.startswith(p + "attn.")})
        h = F.layer_norm(x, (cfg.width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (cfg.width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)
    return F.layer_norm(x, (cfg.width,), state["model.ln_final.weight"], state["model.ln_final.bias"])


@pytest.mark.parametrize("output_layer", ["penultimate", "last"])
def test_openclip_matches_multihead_attention_reference(output_layer: str) -> None:
    # Checks the fused in_proj layout (q, k, v blocks) independently of our diffusers map.
    cfg = dataclasses.replace(OPENCLIP_SMALL, output_layer=output_layer)
    state = _random_state(cfg, seed=3)
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours = _ours(cfg, state)(tokens)
        ref = _open_clip_reference(state, cfg, tokens)
    _compare(f"OpenCLIP small ({output_layer}) vs nn.MultiheadAttention reference", ours, ref)


# --- (b) the tiny preset -------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY.text, OPENCLIP_TINY], ids=["clip", "openclip"])
def test_tiny_forward(cfg: TextEncoderConfig) -> None:
    torch.manual_seed(0)
    model = build_text_encoder(cfg).eval()
    tokens = model.tokenize(PROMPTS)
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert model.tokenize("a photo of a cat").shape == (1, 77)
    with torch.no_grad():
        out = model(tokens)
    assert out.shape == (2, 77, cfg.width) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Causal: a token's state depends only on tokens before it, so the shared prefix "a" agrees.
    with torch.no_grad():
        prefix = model(tokens[:, :3])
    assert torch.allclose(prefix, out[:, :3], atol=1e-5)


def test_tiny_matches_transformers() -> None:
    cfg = TINY.text
    state = _random_state(cfg, seed=1)
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours = _ours(cfg, state)(tokens)
        ref = _hf(cfg, text_ldm_to_diffusers(state, cfg))(tokens).last_hidden_state
    _compare("tiny CLIP vs CLIPTextModel", ours, ref)


def test_factory_and_validation() -> None:
    assert isinstance(build_text_encoder(TINY.text), CLIPTextEncoder)
    assert isinstance(build_text_encoder(OPENCLIP_TINY), OpenCLIPTextEncoder)
    with pytest.raises(ValueError, match="arch"):
        CLIPTextEncoder(OPENCLIP_TINY)
    model = build_text_encoder(TINY.text)
    with pytest.raises(ValueError, match="78"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, length"):
        model(torch.zeros(77, dtype=torch.long))


def test_openclip_keys_and_buffers() -> None:
    model = build_text_encoder(OPENCLIP_TINY)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.positional_embedding"] == (77, 64)
    assert shapes["model.text_projection"] == (64, 32)
    assert shapes["model.logit_scale"] == ()
    assert shapes["model.transformer.resblocks.2.attn.in_proj_weight"] == (192, 64)
    assert list(model.buffers()) == []
    no_projection = build_text_encoder(dataclasses.replace(OPENCLIP_TINY, projection_dim=None)).state_dict()
    assert "model.text_projection" not in no_projection and "model.logit_scale" not in no_projection
    sd21 = _shapes(SD21.text)
    assert sd21["model.token_embedding.weight"] == (49408, 1024)
    assert sd21["model.positional_embedding"] == (77, 1024)
    assert sd21["model.text_projection"] == (1024, 1024)
    assert sd21["model.transformer.resblocks.23.mlp.c_fc.weight"] == (4096, 1024)
    assert sum(k.startswith("model.transformer.resblocks.") for k in sd21) == 24 * 12


# --- (c) key names and the diffusers maps --------------------------------------------------------


def test_sd15_keys_equal_original_checkpoint() -> None:
    original = json.loads(LDM_KEYS.read_text())["v15"]
    prefix = "cond_stage_model."
    expected = {k.removeprefix(prefix): tuple(v) for k, v in original.items() if k.startswith(prefix)}
    assert expected.pop(POSITION_IDS_KEY) == (1, 77)
    assert {k: tuple(v) for k, v in _shapes(SD15.text).items()} == expected
    assert torch.equal(clip_position_ids(SD15.text), torch.arange(77).unsqueeze(0))
    assert clip_position_ids(SD15.text).dtype == torch.long


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("cfg", [TINY.text, OPENCLIP_TINY, OPENCLIP_SMALL], ids=["clip", "openclip", "openclip4"])
def test_round_trips_small(cfg: TextEncoderConfig) -> None:
    state = _random_state(cfg, seed=5)
    diffusers_state = text_ldm_to_diffusers(state, cfg)
    _assert_same(text_ldm_to_diffusers(text_diffusers_to_ldm(diffusers_state, cfg), cfg), diffusers_state)
    if cfg.arch == "clip":
        _assert_same(text_diffusers_to_ldm(diffusers_state, cfg), state)


def test_placeholder_layer_is_identity() -> None:
    # The zero block diffusers -> LDM adds would not change the output even if it were run.
    cfg = OPENCLIP_TINY
    restored = text_diffusers_to_ldm(text_ldm_to_diffusers(_random_state(cfg, seed=7), cfg), cfg)
    tokens = _tokens(cfg)
    with torch.no_grad():
        penultimate = _ours(cfg, restored)(tokens)
        last = _ours(dataclasses.replace(cfg, output_layer="last"), restored)(tokens)
    assert torch.equal(penultimate, last)


def test_position_ids_are_dropped() -> None:
    cfg = TINY.text
    state = _random_state(cfg)
    diffusers_state = text_ldm_to_diffusers({**state, POSITION_IDS_KEY: clip_position_ids(cfg)}, cfg)
    assert not any("position_ids" in k for k in diffusers_state)
    old_file = {**diffusers_state, "text_model.embeddings.position_ids": clip_position_ids(cfg).float()}
    _assert_same(text_diffusers_to_ldm(old_file, cfg), state)


def test_maps_reject_other_layouts() -> None:
    cfg = TINY.text
    state = _random_state(cfg)
    with pytest.raises(ValueError, match="unexpected"):
        text_ldm_to_diffusers({**state, "transformer.text_model.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="missing"):
        text_ldm_to_diffusers(_random_state(dataclasses.replace(cfg, layers=1)), cfg)
    diffusers_state = text_ldm_to_diffusers(state, cfg)
    # transformers 5's save_pretrained drops the text_model. prefix: both spellings read the same.
    unprefixed = text_diffusers_to_ldm({k.removeprefix("text_model."): v for k, v in diffusers_state.items()}, cfg)
    assert all(torch.equal(unprefixed[k], v) for k, v in text_diffusers_to_ldm(diffusers_state, cfg).items())


def test_config_round_trips() -> None:
    for cfg in (SD15.text, SD21.text, TINY.text, dataclasses.replace(OPENCLIP_TINY, projection_dim=64)):
        d = text_config_to_diffusers(cfg)
        assert text_config_from_diffusers(d) == cfg
        hf = transformers.CLIPTextConfig.from_dict(d)
        assert (hf.num_hidden_layers, hf.hidden_act) == (d["num_hidden_layers"], cfg.activation)
    assert text_config_to_diffusers(SD21.text)["num_hidden_layers"] == 23


def test_config_from_real_diffusers_folders() -> None:
    # The text_encoder/config.json values of the SD 1.5 and SD 2.1 diffusers repositories.
    common = {"model_type": "clip_text_model", "vocab_size": 49408, "max_position_embeddings": 77}
    common |= {"layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    sd15 = {**common, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072}
    sd15 |= {"num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768}
    sd21 = {**common, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096}
    sd21 |= {"num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
    assert text_config_from_diffusers(sd15) == SD15.text
    assert text_config_from_diffusers(sd21) == SD21.text
    with pytest.raises(ValueError, match="hidden_act"):
        text_config_from_diffusers({**sd15, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="layer_norm_eps"):
        text_config_from_diffusers({**sd15, "layer_norm_eps": 1e-6})


@pytest.mark.parametrize("cfg", [TINY.text, OPENCLIP_TINY], ids=["clip", "openclip"])
def test_diffusers_folder_loads_in_transformers(cfg: TextEncoderConfig, tmp_path: Path) -> None:
    """A text_encoder/ folder written from our maps is what transformers reads: every weight found."""
    from safetensors.torch import save_file

    state = _random_state(cfg, seed=9)
    save_file(text_ldm_to_diffusers(state, cfg), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(text_config_to_diffusers(cfg)))
    model, info = transformers.CLIPTextModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours = _ours(cfg, state)(tokens)
        ref = model.eval()(tokens).last_hidden_state
    _compare(f"tiny {cfg.arch} from a saved diffusers folder", ours, ref)

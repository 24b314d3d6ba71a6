"""How tests/data/sdxl_keys.json was made: every key name and shape of ``sd_xl_base_1.0.safetensors``,
read off the original model classes, independently of this package.

* ``model.diffusion_model.*``: Stability's ``sgm`` ``UNetModel`` (Stability-AI/generative-models) with
  the ``network_config`` of ``configs/inference/sd_xl_base.yaml``.
* ``first_stage_model.*``: ``sgm``'s ``Encoder``/``Decoder`` with that file's ``ddconfig``, and the
  ``quant_conv``/``post_quant_conv`` of ``sgm.models.autoencoder.AutoencodingEngineLegacy``.
  (``vanilla-xformers`` attention has the parameter names of ``vanilla``: norm, q, k, v, proj_out.)
* ``conditioner.embedders.0.transformer.*``: ``FrozenCLIPEmbedder`` is transformers' ``CLIPTextModel``
  for openai/clip-vit-large-patch14; transformers 4.x (SDXL's) nests it under ``text_model.`` and
  stores ``embeddings.position_ids`` ([1, 77], int64) with the weights.
* ``conditioner.embedders.1.model.*``: ``FrozenOpenCLIPEmbedder2`` is open_clip's ``CLIP`` for
  ``ViT-bigG-14`` with ``model.visual`` deleted (open_clip v2.20.0, the release SDXL was made with).
* The size/crop embedders (``ConcatTimestepEmbedderND``) have no parameters.

Run (from the repository root) with both sources checked out::

    python tests/data/generate_sdxl_keys.py GENERATIVE_MODELS_CHECKOUT OPEN_CLIP_V2_20_CHECKOUT

Everything is built on the meta device: no memory, no weights.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

SD_XL_BASE_UNET = {  # configs/inference/sd_xl_base.yaml, network_config.params
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4],
    "num_head_channels": 64,
    "use_linear_in_transformer": True,
    "transformer_depth": [1, 2, 10],
    "context_dim": 2048,
}
SD_XL_BASE_DDCONFIG = {  # first_stage_config.params.ddconfig
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
EMBED_DIM = 4


def _package(name: str, root: Path) -> None:
    """Register ``name`` as an empty package at ``root`` (its ``__init__`` imports too much)."""
    module = types.ModuleType(name)
    module.__path__ = [str(root)]
    sys.modules[name] = module


def sgm_shapes(checkout: Path) -> dict[str, list[int]]:
    for name in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):
        _package(name, checkout.joinpath(*name.split(".")))
    from sgm.modules.diffusionmodules.model import Decoder, Encoder
    from sgm.modules.diffusionmodules.openaimodel import UNetModel

    ddconfig = {**SD_XL_BASE_DDCONFIG, "attn_type": "vanilla"}
    with torch.device("meta"):
        unet = UNetModel(**SD_XL_BASE_UNET)
        vae = torch.nn.Module()
        vae.encoder = Encoder(**ddconfig)
        vae.decoder = Decoder(**ddconfig)
        vae.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * EMBED_DIM, 1)
        vae.post_quant_conv = torch.nn.Conv2d(EMBED_DIM, ddconfig["z_channels"], 1)
    shapes = {f"model.diffusion_model.{k}": list(v.shape) for k, v in unet.state_dict().items()}
    shapes.update({f"first_stage_model.{k}": list(v.shape) for k, v in vae.state_dict().items()})
    return shapes


def clip_l_shapes() -> dict[str, list[int]]:
    import transformers

    config = transformers.CLIPTextConfig(  # openai/clip-vit-large-patch14's text_config
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    with torch.device("meta"):
        model = transformers.CLIPTextModel(config)
    prefix = "conditioner.embedders.0.transformer.text_model."
    shapes = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("text_model.")  # transformers >= 5.6 no longer nests it
        shapes[prefix + key] = list(value.shape)
    shapes[prefix + "embeddings.position_ids"] = [1, 77]
    return shapes


def open_clip_bigg_shapes(checkout: Path) -> dict[str, list[int]]:
    _package("open_clip", checkout / "src" / "open_clip")
    utils = types.ModuleType("open_clip.utils")  # the real one imports torchvision for a vision-only helper
    utils.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    utils.freeze_batch_norm_2d = None
    sys.modules["open_clip.utils"] = utils
    from open_clip.model import CLIP

    config = json.loads((checkout / "src" / "open_clip" / "model_configs" / "ViT-bigG-14.json").read_text())
    with torch.device("meta"):
        model = CLIP(**config)
    del model.visual  # as FrozenOpenCLIPEmbedder2 does
    return {f"conditioner.embedders.1.model.{k}": list(v.shape) for k, v in model.state_dict().items()}


def main(generative_models: str, open_clip: str) -> None:
    shapes = sgm_shapes(Path(generative_models))
    shapes.update(clip_l_shapes())
    shapes.update(open_clip_bigg_shapes(Path(open_clip)))
    data = {
        "_about": (
            "Key names and shapes of sd_xl_base_1.0.safetensors (the original SDXL single file), read off "
            "the original model classes on the meta device by tests/data/generate_sdxl_keys.py: sgm's "
            "UNetModel, Encoder and Decoder with configs/inference/sd_xl_base.yaml; transformers' "
            "CLIPTextModel (ViT-L/14, transformers 4.x layout with text_model. and position_ids); "
            "open_clip v2.20.0's CLIP ViT-bigG-14 without its visual tower. The file holds no other keys."
        ),
        "sdxl_base": dict(sorted(shapes.items())),
    }
    out = Path(__file__).with_name("sdxl_keys.json")
    out.write_text(json.dumps(data) + "\n")
    print(f"{out}: {len(shapes)} keys")


if __name__ == "__main__":
    main(*sys.argv[1:3])

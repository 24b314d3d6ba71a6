"""How tests/data/sdxl_control_keys.json was made: every key name and shape of the SDXL control files
people have, read off independent sources, not this package.

* ``controlnet_full``, ``controlnet_mid``, ``controlnet_small`` (diffusers/controlnet-{canny,depth}-sdxl-1.0
  and its -mid and -small; lllyasviel/sd_control_collection's ``diffusers_xl_*_{full,mid,small}``):
  diffusers' ``ControlNetModel`` built on the meta device from the hub's config.json. -mid and -small
  are the full config with ``transformer_layers_per_block`` [0, 0, 1] and [0, 0, 0] and no cross-
  attention down block where a level has no transformer blocks (how okotaku/diffengine rebuilds them;
  what the AUTOMATIC1111 extension's ``controlnet_sdxl_mid_config``/``_small_config`` and ComfyUI's
  ``SDXL_mid_cnet``/``SDXL_small_cnet`` detection tables describe).
* ``union``, ``union_promax`` (xinsir/controlnet-union-sdxl-1.0: ``diffusion_pytorch_model.safetensors``
  and ``diffusion_pytorch_model_promax.safetensors``): diffusers' ``ControlNetUnionModel`` built from
  xinsir's config (``config_promax.json``: the full SDXL ControlNet's and ``num_control_type`` 8; 6
  for the first release).
* ``adapter_xl_3ch``, ``adapter_xl_1ch`` (TencentARC/t2i-adapter-{openpose,canny}-sdxl-1.0):
  diffusers' ``T2IAdapter`` with ``adapter_type`` ``full_adapter_xl`` (16x unshuffle).
* ``control_lora_rank128`` (stabilityai/control-lora ``control-lora-canny-rank128.safetensors``): the
  layout ComfyUI's ``ControlLora`` reads and diffusers' ``convert_sai_sd_control_lora_state_dict_to_peft``
  converts (LoRA'd layers: every to_q/k/v/out, ff, proj_in/out, conv, conv1/2, conv_in, conv_shortcut,
  linear_1/2 and time_emb_proj, its ``CONTROL_LORA_TO_DIFFUSERS``), applied to the encoder keys of
  sd_xl_base_1.0 (tests/data/sdxl_keys.json, read off sgm's ``UNetModel``) and the ControlNet's own
  parts as cldm's ``ControlNet`` builds them for SDXL (``input_hint_block`` 3-16-16-32-32-96-96-256-320,
  nine ``zero_convs``, ``middle_block_out``): ``<layer>.up`` [out, 128(, 1, 1)] and ``<layer>.down``
  [128, in(, kh, kw)] for a weight of two or more dimensions, the full tensor otherwise, and the
  marker ``lora_controlnet``.

Run from the repository root (diffusers installed): ``python tests/data/generate_sdxl_control_keys.py``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

DATA = Path(__file__).parent

CONTROLNET_SDXL = {  # diffusers/controlnet-canny-sdxl-1.0/config.json
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}
CONTROLNET_SDXL_MID = {
    **CONTROLNET_SDXL,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "transformer_layers_per_block": [0, 0, 1],
}
CONTROLNET_SDXL_SMALL = {
    **CONTROLNET_SDXL,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "transformer_layers_per_block": [0, 0, 0],
}
UNION_PROMAX = {**CONTROLNET_SDXL, "num_control_type": 8}  # xinsir's config_promax.json
UNION = {**CONTROLNET_SDXL, "num_control_type": 6}
ADAPTER_XL = {  # TencentARC/t2i-adapter-openpose-sdxl-1.0/config.json (canny: in_channels 1)
    "_class_name": "T2IAdapter",
    "adapter_type": "full_adapter_xl",
    "channels": [320, 640, 1280, 1280],
    "downscale_factor": 16,
    "in_channels": 3,
    "num_res_blocks": 2,
}
CONFIGS = {
    "controlnet_full": CONTROLNET_SDXL,
    "controlnet_mid": CONTROLNET_SDXL_MID,
    "controlnet_small": CONTROLNET_SDXL_SMALL,
    "union": UNION,
    "union_promax": UNION_PROMAX,
    "adapter_xl_3ch": ADAPTER_XL,
    "adapter_xl_1ch": {**ADAPTER_XL, "in_channels": 1},
}
RANK = 128


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def diffusers_keys() -> dict[str, dict[str, list[int]]]:
    import diffusers

    classes = {"controlnet": diffusers.ControlNetModel, "union": diffusers.ControlNetUnionModel}
    classes["adapter"] = diffusers.T2IAdapter
    out = {}
    for name, config in CONFIGS.items():
        cls = classes[name.split("_")[0]]
        with torch.device("meta"):
            out[name] = _shapes(cls.from_config({k: v for k, v in config.items() if k != "_class_name"}))
    return out


def control_lora_keys() -> dict[str, list[int]]:
    unet = json.loads((DATA / "sdxl_keys.json").read_text())["sdxl_base"]
    prefix = "model.diffusion_model."
    encoder = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    out: dict[str, list[int]] = {"lora_controlnet": []}
    for key, shape in unet.items():
        name = key.removeprefix(prefix)
        if not key.startswith(prefix) or not name.startswith(encoder):
            continue
        if len(shape) >= 2:
            layer = name.removesuffix(".weight")
            out[f"{layer}.up"] = [shape[0], RANK] + [1] * (len(shape) - 2)
            out[f"{layer}.down"] = [RANK, *shape[1:]]
        else:
            out[name] = shape
    hint = [3, 16, 16, 32, 32, 96, 96, 256, 320]
    for i, (c_in, c_out) in enumerate(itertools.pairwise(hint)):
        out[f"input_hint_block.{2 * i}.weight"] = [c_out, c_in, 3, 3]
        out[f"input_hint_block.{2 * i}.bias"] = [c_out]
    for n, width in enumerate([320] * 4 + [640] * 3 + [1280] * 2):
        out[f"zero_convs.{n}.0.weight"] = [width, width, 1, 1]
        out[f"zero_convs.{n}.0.bias"] = [width]
    out["middle_block_out.0.weight"] = [1280, 1280, 1, 1]
    out["middle_block_out.0.bias"] = [1280]
    return out


def main() -> None:
    data = {
        "_about": (
            "Key names and shapes of the SDXL control files, read off independent sources by "
            "tests/data/generate_sdxl_control_keys.py: diffusers' ControlNetModel, ControlNetUnionModel and "
            "T2IAdapter built on the meta device from the hub's config.json files (full, -mid, -small; xinsir's "
            "union and ProMax; TencentARC's full_adapter_xl), and Stability's Control-LoRA layout (ComfyUI's "
            "ControlLora, diffusers' CONTROL_LORA_TO_DIFFUSERS) on sd_xl_base_1.0's encoder keys, rank 128."
        ),
        "configs": CONFIGS,
        **diffusers_keys(),
        "control_lora_rank128": control_lora_keys(),
    }
    (DATA / "sdxl_control_keys.json").write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

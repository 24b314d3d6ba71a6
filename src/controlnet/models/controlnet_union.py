"""xinsir's ControlNet++ union model (xinsir/controlnet-union-sdxl-1.0 and its ProMax): one SDXL
ControlNet for every condition type, told which by a control-type embedding, that takes several
conditions at once in one pass (github.com/xinsir6/ControlNetPlus, ``models/controlnet_union.py``;
diffusers' ``ControlNetUnionModel``, which reads the same files).

What it adds to an SDXL ControlNet (names as its files have them, in both layouts):

- ``control_add_embedding.linear_1/2``: the control types in use as a 0/1 vector, each entry embedded
  by 256 sinusoids (cosines first, as a timestep), through a Linear, SiLU, Linear into the time
  embedding's width and added to it (before ``label_emb(y)``, as diffusers adds them).
- ``task_embedding`` [control types, 320]: one vector per type.
- ``transformer_layes`` (sic), one CLIP-style residual attention block (LayerNorm, 8-head attention,
  LayerNorm, QuickGELU MLP of 4x width), and ``spatial_ch_projs``, a Linear (zero at initialisation).

Each condition image goes through the shared hint encoder (``input_hint_block``); its features'
spatial mean plus its type's ``task_embedding`` is one token; the tokens go through the transformer,
and each condition's output token, through ``spatial_ch_projs``, is a per-channel bias added to its
features. The sum over the conditions is the hint the ControlNet adds after ``input_blocks[0]``.
Each condition has a weight, applied to its token, its features and its bias (diffusers'
``conditioning_scale`` list for several conditions in one network, whose residuals it leaves
unscaled: a unit of strength 1). One condition at weight 1 is diffusers' single-condition model,
whose scale multiplies the residuals: the unit's strength (`sampling.guidance.ActiveControl`).

The transformer: the original (and diffusers) run ``nn.MultiheadAttention`` without
``batch_first`` on tokens shaped [batch, tokens, width], so the attention runs across the *batch*,
separately for each token position; the conditions never attend to each other, and the token of the
latents the original appends last (the mean of ``conv_in(x)``) reaches no condition's output. With
the same condition images for the whole batch (every image of a generation, both sides of
guidance), each token attends to copies of itself: the hint does not depend on the latents or the
timestep and is computed once per generation (`UnionControlNet.encode_conditions`). This module runs
the same attention on the same shapes, so a batch of different condition images mixes as the
original's does. (ComfyUI and the AUTOMATIC1111 extension attend across the condition tokens of
each image instead, one condition per unit; their results differ from the original's.)

Control types (xinsir's README "ControlMode", ProMax's model card; ComfyUI's ``UNION_CONTROLNET_TYPES``;
diffusers' union pipelines' ``control_mode``): openpose 0, depth 1, thick lines (hed, pidi,
scribble, ted) 2, thin lines (canny, lineart, anime lineart, mlsd) 3, normal 4, segment 5; ProMax
adds tile 6 and repaint/inpaint 7, whose condition is the image with the masked pixels black
(`inpaint_condition`) while the base model inpaints the latents as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TIME_ID_EMBED_DIM, ControlNetConfig
from .controlnet import ControlNet
from .kernels import Linear
from .layers import TimestepEmbedding, zero_module
from .text import quick_gelu
from .unet import embed_time

# Type names -> ids: every name the sources use (ComfyUI's "hed/pidi/scribble/ted" and
# "canny/lineart/anime_lineart/mlsd", the AUTOMATIC1111 extension's tags, diffusers' examples).
CONTROL_TYPES: dict[str, int] = {
    "openpose": 0,
    "depth": 1,
    **dict.fromkeys(("hed", "pidi", "scribble", "ted", "softedge"), 2),
    **dict.fromkeys(("canny", "lineart", "anime_lineart", "mlsd"), 3),
    "normal": 4,
    "segment": 5,
    "tile": 6,
    **dict.fromkeys(("inpaint", "repaint"), 7),
}
_TYPE_LIST = "openpose 0, depth 1, hed/pidi/scribble/ted 2, canny/lineart/anime_lineart/mlsd 3, normal 4, segment 5"
_PROMAX_TYPES = "tile 6, inpaint/repaint 7"


def control_type_id(control_type: int | str, count: int) -> int:
    """The id of ``control_type`` (a name of `CONTROL_TYPES` or an id) for a union model with
    ``count`` types; a one-line ``ValueError`` for anything else."""
    known = f"{_TYPE_LIST}" + (f", {_PROMAX_TYPES}" if count > 6 else "")
    if isinstance(control_type, str):
        if control_type.lower() not in CONTROL_TYPES:
            raise ValueError(f"unknown union control type {control_type!r}; this model takes: {known}")
        index = CONTROL_TYPES[control_type.lower()]
    elif isinstance(control_type, int) and not isinstance(control_type, bool):
        index = control_type
    else:
        raise ValueError(f"a union control type is a name or an id, got {control_type!r}; this model takes: {known}")
    if not 0 <= index < count:
        promax = " (tile and inpaint need the ProMax model)" if count == 6 and index in (6, 7) else ""
        raise ValueError(f"control type {control_type!r} is not one of this union model's {count}{promax}: {known}")
    return index


@dataclass(frozen=True)
class UnionCondition:
    """One condition for a union ControlNet."""

    image: torch.Tensor  # [1 or B, hint_channels, H, W] in [0, 1]
    control_type: int | str  # a name of CONTROL_TYPES or an id
    weight: float = 1.0  # this condition's scale inside the network (diffusers' conditioning_scale list)


@dataclass(frozen=True)
class UnionHint:
    """A union ControlNet's prepared conditions: what `UnionControlNet.forward` reads in place of
    an ordinary ControlNet's hint features. Both broadcast over the batch."""

    features: torch.Tensor  # [1 or B, model_channels, h, w]: added after input_blocks[0]
    control_embedding: torch.Tensor  # [1, time_embed_dim]: added to the time embedding


class ControlTypeEmbedding(nn.Module):
    """``control_add_embedding``: the 0/1 vector of the types in use [B, types] -> [B, time_embed_dim]."""

    def __init__(self, types: int, out_channels: int) -> None:
        super().__init__()
        self.sinusoids = TimestepEmbedding(TIME_ID_EMBED_DIM)  # diffusers' control_type_proj
        self.linear_1 = Linear(types * TIME_ID_EMBED_DIM, out_channels)
        self.act = nn.SiLU()
        self.linear_2 = Linear(out_channels, out_channels)

    def forward(self, used: torch.Tensor) -> torch.Tensor:
        features = self.sinusoids(used.flatten()).reshape(used.shape[0], -1)  # [B, types * 256]
        return self.linear_2(self.act(self.linear_1(features.to(self.linear_1.weight.dtype))))


class ConditionMLP(nn.Module):
    """The block's MLP, CLIP's: c_fc to 4x the width, QuickGELU, c_proj back."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = Linear(width, width * 4)
        self.c_proj = Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ConditionBlock(nn.Module):
    """One block of ``transformer_layes``: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    ``attn`` is ``nn.MultiheadAttention`` as the original's (keys ``attn.in_proj_weight``,
    ``attn.in_proj_bias``, ``attn.out_proj.*``), fed [batch, tokens, width] without ``batch_first``:
    see the module docstring for what that attends across.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = ConditionMLP(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class UnionControlNet(ControlNet):
    """An SDXL ControlNet with the union model's parts; `encode_conditions` prepares its hint."""

    def __init__(self, config: ControlNetConfig) -> None:
        if config.union is None:
            raise ValueError("UnionControlNet needs a configuration with union parts (ControlNetConfig.union)")
        super().__init__(config)
        union, width = config.union, config.unet.model_channels
        # The original initialises it as sqrt(width) * N(0, 1).
        self.task_embedding = nn.Parameter(torch.randn(union.control_types, width) * width**0.5)
        self.transformer_layes = nn.ModuleList(ConditionBlock(width, union.heads) for _ in range(union.layers))
        self.spatial_ch_projs = zero_module(Linear(width, width))
        self.control_add_embedding = ControlTypeEmbedding(union.control_types, config.unet.time_embed_dim)

    def encode_hint(self, hint: torch.Tensor, control_type: int | str | None = None) -> UnionHint:  # type: ignore[override]
        """One condition image of ``control_type``: `encode_conditions` of it alone."""
        if control_type is None:
            raise ValueError(f"a union ControlNet needs the control type of its image: {_TYPE_LIST}, {_PROMAX_TYPES}")
        return self.encode_conditions([UnionCondition(hint, control_type)])

    def encode_conditions(self, conditions: Sequence[UnionCondition]) -> UnionHint:
        """The hint of one or more conditions, computed once per generation (module docstring)."""
        if not conditions:
            raise ValueError("a union ControlNet needs at least one condition")
        count = self.config.union.control_types
        types = [control_type_id(c.control_type, count) for c in conditions]
        sizes = {tuple(c.image.shape[2:]) for c in conditions}
        if len(sizes) != 1:
            raise ValueError(f"a union ControlNet's condition images must have one size, got {sorted(sizes)}")
        features, tokens = [], []
        for condition, index in zip(conditions, types, strict=True):
            feature = self.input_hint_block(condition.image, None, None)  # [B, C, h, w]
            token = feature.mean(dim=(2, 3)) + self.task_embedding[index]  # [B, C]
            features.append(feature * condition.weight)
            tokens.append(token * condition.weight)
        batch = max(t.shape[0] for t in tokens)
        x = torch.stack([t.expand(batch, -1) for t in tokens], dim=1)  # [B, conditions, C]
        for block in self.transformer_layes:
            x = block(x)
        fused = None
        for i, (feature, condition) in enumerate(zip(features, conditions, strict=True)):
            alpha = self.spatial_ch_projs(x[:, i])[:, :, None, None]  # [B, C, 1, 1]
            term = feature + alpha * condition.weight
            fused = term if fused is None else fused + term
        used = torch.zeros(1, count, device=fused.device)
        used[0, types] = 1.0
        return UnionHint(fused, self.control_add_embedding(used))

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        hint: UnionHint,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The residuals, as `ControlNet.forward`, for a hint of `encode_conditions`."""
        emb = embed_time(self, timesteps, y, extra=hint.control_embedding)
        return self.residuals(x, hint.features, emb, context)


def inpaint_condition(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ProMax's inpainting condition (type 7, "repaint"): the image [B, 3, H, W] in [0, 1] with the
    pixels to repaint (``mask`` [B or 1, 1, H, W] > 0) black, as diffusers' union inpainting example
    and the AUTOMATIC1111 extension's ``inpaint_promax`` make it; the base model inpaints the
    latents as for any inpainting (the pipeline's mask)."""
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"the mask {list(mask.shape)} does not have the image's size {list(image.shape)}")
    return torch.where(mask > 0, torch.zeros_like(image), image)


def build_controlnet(config: ControlNetConfig) -> ControlNet:
    """The ControlNet ``config`` describes: a `UnionControlNet` when it has union parts."""
    return UnionControlNet(config) if config.union is not None else ControlNet(config)

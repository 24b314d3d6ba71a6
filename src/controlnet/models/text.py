"""The two text encoders of Stable Diffusion, with the parameter names of the original LDM files.

Parameter names are those of a checkpoint after its ``cond_stage_model.`` prefix:

* ``arch="clip"`` (SD 1.x, ``FrozenCLIPEmbedder``): OpenAI CLIP ViT-L/14's text tower in the HF
  ``CLIPTextModel`` layout, ``transformer.text_model.*``; QuickGELU; output of the last layer after
  ``final_layer_norm``.
* ``arch="openclip"`` (SD 2.x, ``FrozenOpenCLIPEmbedder``): OpenCLIP ViT-H/14's text tower in the
  open_clip layout, ``model.*``, with fused ``in_proj`` attention weights; exact GELU; with
  ``output_layer="penultimate"`` the last resblock is skipped and ``ln_final`` applied to the
  penultimate one, as the original does.

Both are pre-LayerNorm transformers with causal self-attention (``scaled_dot_product_attention`` with
``is_causal=True``) over learned absolute positions. Neither has buffers: the ``position_ids`` that
SD 1.x files may carry (see :data:`POSITION_IDS_KEY`) is derived data that loaders drop on read and
write back with :func:`clip_position_ids`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from controlnet.config import TextEncoderConfig
from controlnet.models.kernels import Linear
from controlnet.models.tokenizer import default_tokenizer

# SD 1.x files (and HF CLIPTextModel files written by transformers < 4.31) hold this [1, 77] int64
# buffer, 0..76. It carries no information and older fine-tunes saved it corrupted (as floats that
# no longer round to 0..76), so our module computes positions itself and has no such entry.
POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"


def clip_position_ids(cfg: TextEncoderConfig) -> torch.Tensor:
    """The ``position_ids`` entry an SD 1.x file holds, for writers that want the original layout."""
    return torch.arange(cfg.max_length, dtype=torch.long).unsqueeze(0)


def layers_used(cfg: TextEncoderConfig) -> int:
    """Transformer layers the output depends on: all, or all but the last for ``penultimate``."""
    return cfg.layers - (1 if cfg.output_layer == "penultimate" else 0)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, which its weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head causal attention of ``[B, T, W]`` projections; returns ``[B, T, W]``."""
    batch, length, width = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, length, heads, width // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return out.transpose(1, 2).reshape(batch, length, width)


class TextEncoder(nn.Module):
    """Common interface: ``forward(tokens [B, T]) -> [B, T, width]`` and ``tokenize(texts)``."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.config = cfg

    def tokenize(self, texts: Sequence[str] | str) -> torch.LongTensor:
        """Token ids ``[B, max_length]`` with this model's padding, on this model's device."""
        ids = default_tokenizer()(texts, pad_token_id=self.config.pad_token_id, max_length=self.config.max_length)
        return ids.to(self._token_embedding_weight().device)

    def _token_embedding_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_length:
            raise ValueError(f"at most {self.config.max_length} tokens fit the position table, got {tokens.shape[1]}")


# --- SD 1.x: HF CLIPTextModel layout -------------------------------------------------------------


class _CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.k_proj = Linear(cfg.width, cfg.width)
        self.v_proj = Linear(cfg.width, cfg.width)
        self.q_proj = Linear(cfg.width, cfg.width)
        self.out_proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class _CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_width)
        self.fc2 = Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class _CLIPLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = _CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = _CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class _CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_CLIPLayer(cfg) for _ in range(cfg.layers))


class _CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = _CLIPEmbeddings(cfg)
        self.encoder = _CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class _CLIPTextModel(nn.Module):
    # HF's CLIPTextModel (transformers < 5) nests the transformer under ``text_model``; SD files keep it.
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.text_model = _CLIPTextTransformer(cfg)


class CLIPTextEncoder(TextEncoder):
    """SD 1.x text encoder: ``transformer.text_model.*``."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        if cfg.arch != "clip":
            raise ValueError(f"CLIPTextEncoder needs arch='clip', got {cfg.arch!r}")
        super().__init__(cfg)
        self.transformer = _CLIPTextModel(cfg)

    def _token_embedding_weight(self) -> torch.Tensor:
        return self.transformer.text_model.embeddings.token_embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        model = self.transformer.text_model
        x = model.embeddings(tokens)
        for layer in model.encoder.layers[: layers_used(self.config)]:
            x = layer(x)
        return model.final_layer_norm(x)


# --- SD 2.x: open_clip layout --------------------------------------------------------------------


class _OpenCLIPAttention(nn.Module):
    # nn.MultiheadAttention's parameter names (open_clip uses that module): q, k, v fused in in_proj.
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.width, cfg.mlp_width)
        self.c_proj = Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class _OpenCLIPResBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = _OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = _OpenCLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_OpenCLIPResBlock(cfg) for _ in range(cfg.layers))


class _OpenCLIPTextModel(nn.Module):
    """open_clip's ``CLIP`` with the image tower removed, as ``FrozenOpenCLIPEmbedder`` keeps it."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        if cfg.projection_dim is not None:
            # Contrastive head: SD never runs it, but SD 2.x files hold it, so a load/save keeps it.
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.transformer = _OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.positional_embedding, std=0.01)


class OpenCLIPTextEncoder(TextEncoder):
    """SD 2.x text encoder: ``model.*``. ``text_projection`` and ``logit_scale`` exist exactly when
    ``cfg.projection_dim`` is set; they are stored, never used."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        if cfg.arch != "openclip":
            raise ValueError(f"OpenCLIPTextEncoder needs arch='openclip', got {cfg.arch!r}")
        super().__init__(cfg)
        self.model = _OpenCLIPTextModel(cfg)

    def _token_embedding_weight(self) -> torch.Tensor:
        return self.model.token_embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        x = self.model.token_embedding(tokens) + self.model.positional_embedding[: tokens.shape[1]]
        for block in self.model.transformer.resblocks[: layers_used(self.config)]:
            x = block(x)
        return self.model.ln_final(x)


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The text encoder ``cfg`` describes, randomly initialised (load weights with ``strict=True``)."""
    if cfg.arch == "clip":
        return CLIPTextEncoder(cfg)
    return OpenCLIPTextEncoder(cfg)

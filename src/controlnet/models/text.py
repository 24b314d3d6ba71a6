"""The text encoders of Stable Diffusion, with the parameter names of the original LDM files.

Parameter names are those of a checkpoint after its ``cond_stage_model.`` prefix:

* ``arch="clip"`` (SD 1.x, ``FrozenCLIPEmbedder``): OpenAI CLIP ViT-L/14's text tower in the HF
  ``CLIPTextModel`` layout, ``transformer.text_model.*``; QuickGELU; output of the last layer after
  ``final_layer_norm``.
* ``arch="openclip"`` (SD 2.x, ``FrozenOpenCLIPEmbedder``): OpenCLIP ViT-H/14's text tower in the
  open_clip layout, ``model.*``, with fused ``in_proj`` attention weights; exact GELU; with
  ``output_layer="penultimate"`` the last resblock is skipped and ``ln_final`` applied to the
  penultimate one, as the original does.
* SDXL (:class:`DualTextEncoder`, after the prefix ``conditioner.``): both, as sgm's
  ``GeneralConditioner`` holds them, ``embedders.0.transformer.*`` (CLIP ViT-L/14) and
  ``embedders.1.model.*`` (OpenCLIP ViT-bigG/14); each gives its penultimate hidden state without
  the final LayerNorm (``final_layer_norm=False``), concatenated on the channel axis, and the bigG
  its pooled, projected embedding.

Both are pre-LayerNorm transformers with causal self-attention (``scaled_dot_product_attention`` with
``is_causal=True``) over learned absolute positions. Neither has buffers: the ``position_ids`` that
SD 1.x files may carry (see :data:`POSITION_IDS_KEY`) is derived data that loaders drop on read and
write back with :func:`clip_position_ids`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from controlnet.config import TextEncoderConfig
from controlnet.models.kernels import Linear
from controlnet.models.tokenizer import END_TOKEN_ID, default_tokenizer

# SD 1.x files (and HF CLIPTextModel files written by transformers < 4.31) hold this [1, 77] int64
# buffer, 0..76. It carries no information and older fine-tunes saved it corrupted (as floats that
# no longer round to 0..76), so our module computes positions itself and has no such entry.
POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"


def clip_position_ids(cfg: TextEncoderConfig) -> torch.Tensor:
    """The ``position_ids`` entry an SD 1.x file holds, for writers that want the original layout."""
    return torch.arange(cfg.max_length, dtype=torch.long).unsqueeze(0)


def position_ids_entries(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The ``position_ids`` entry of every CLIP (HF layout) encoder in ``encoder``, keyed as in its
    state dict: what an original file holds beside the weights (SD 1.x's one, SDXL's embedder 0)."""
    return {
        f"{name}.{POSITION_IDS_KEY}" if name else POSITION_IDS_KEY: clip_position_ids(module.config)
        for name, module in encoder.named_modules()
        if isinstance(module, CLIPTextEncoder)
    }


def is_position_ids_key(key: str) -> bool:
    """A ``position_ids`` entry of a CLIP encoder, at any depth (``embedders.0.`` in SDXL)."""
    return key == POSITION_IDS_KEY or key.endswith("." + POSITION_IDS_KEY)


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
        return model.final_layer_norm(x) if self.config.final_layer_norm else x


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
        return self.encode(tokens, pooled=False)[0]

    def encode(self, tokens: torch.Tensor, pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden state of the configured layer [B, T, width] and, with ``pooled``, the pooled
        embedding [B, projection_dim]: the last layer's state after ``ln_final`` at each row's end
        token (the highest id), times ``text_projection`` (open_clip ``CLIP.encode_text``; sgm's
        FrozenOpenCLIPEmbedder2 ``pool``). One pass gives both."""
        self._check_tokens(tokens)
        if pooled and not self.config.pooled:
            raise ValueError("this text encoder has no text_projection (projection_dim=None): no pooled output")
        x = self.model.token_embedding(tokens) + self.model.positional_embedding[: tokens.shape[1]]
        blocks = self.model.transformer.resblocks
        used = layers_used(self.config)
        for block in blocks[:used]:
            x = block(x)
        hidden = self.model.ln_final(x) if self.config.final_layer_norm else x
        if not pooled:
            return hidden, None
        for block in blocks[used:]:
            x = block(x)
        ends = self.model.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return hidden, ends @ self.model.text_projection


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The text encoder ``cfg`` describes, randomly initialised (load weights with ``strict=True``)."""
    if cfg.arch == "clip":
        return CLIPTextEncoder(cfg)
    return OpenCLIPTextEncoder(cfg)


# --- SDXL: two encoders, as sgm's GeneralConditioner holds them -----------------------------------


class TextEncoding(NamedTuple):
    """What SDXL's text encoders give a prompt."""

    context: torch.Tensor  # [B, T, width + width_2]: what the UNet cross-attends to
    pooled: torch.Tensor  # [B, projection_dim]: the start of the UNet's vector y


def with_padding(tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The same token ids padded with ``pad_token_id``: every position after a row's first end token.

    The two SDXL encoders read the same text with different padding: CLIP ViT-L's tokenizer (HF, as
    sgm's FrozenCLIPEmbedder uses it) pads with the end token, open_clip's with 0; a row without an
    end token is left as it is."""
    is_end = tokens == END_TOKEN_ID
    after_end = (is_end.cumsum(dim=1) - is_end.long()) > 0
    return tokens.masked_fill(after_end, pad_token_id)


class DualTextEncoder(nn.Module):
    """SDXL's text conditioning: ``embedders.0`` (CLIP ViT-L/14) and ``embedders.1`` (OpenCLIP
    ViT-bigG/14), names as an SDXL file holds them after ``conditioner.``.

    ``forward(tokens) -> context`` and ``tokenize`` work as a single encoder's (so prompt encoding
    that reads ``config.pad_token_id`` and ``config.max_length`` needs no change: ``config`` is the
    first encoder's); each encoder gets the ids with its own padding (:func:`with_padding`), whatever
    the padding given. :meth:`encode` adds the pooled embedding.
    """

    def __init__(self, first: TextEncoderConfig, second: TextEncoderConfig) -> None:
        super().__init__()
        if not second.pooled:
            raise ValueError("SDXL's second text encoder must be OpenCLIP with projection_dim (its pooled output)")
        self.config = first
        self.config_2 = second
        self.embedders = nn.ModuleList([build_text_encoder(first), build_text_encoder(second)])

    def tokenize(self, texts: Sequence[str] | str) -> torch.LongTensor:
        return self.embedders[0].tokenize(texts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        first, second = self.embedders
        hidden_2, _ = second.encode(with_padding(tokens, self.config_2.pad_token_id), pooled=False)
        return torch.cat([first(with_padding(tokens, self.config.pad_token_id)), hidden_2], dim=-1)

    def encode(self, tokens: torch.Tensor) -> TextEncoding:
        """The context [B, T, 2048 for SDXL] (GeneralConditioner's ``crossattn``: the embedders'
        hidden states concatenated in order) and the pooled embedding [B, 1280 for SDXL]."""
        first, second = self.embedders
        hidden_2, pooled = second.encode(with_padding(tokens, self.config_2.pad_token_id))
        context = torch.cat([first(with_padding(tokens, self.config.pad_token_id)), hidden_2], dim=-1)
        return TextEncoding(context, pooled)

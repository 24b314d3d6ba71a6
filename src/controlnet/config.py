"""Typed model configurations, the presets users name, and detection of a preset from weights.

Every field is plain data with a comment; invalid values raise ``ValueError`` naming the value and
what is allowed. The numbers of the real presets are those of the original ``cldm_v15.yaml`` and
``cldm_v21.yaml`` (docs/reference.md, "Model configurations") and, for SDXL, of Stability's
``configs/inference/sd_xl_base.yaml`` (docs/sdxl.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

PredictionType = Literal["eps", "v"]
TextArch = Literal["clip", "openclip"]
TextLayer = Literal["last", "penultimate"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def family_name(context_dim: int, reads_vector: bool = False) -> str:
    """A base-model family's name: SDXL for a UNet that reads the vector y (``adm_in_channels``),
    else SD 1.x or SD 2.x by the text context's width (768, 1024)."""
    if reads_vector:
        return "SDXL"
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(context_dim, f"a model with context {context_dim}")


@dataclass(frozen=True)
class UNetConfig:
    """The latent-diffusion UNet (``openaimodel.UNetModel``); the ControlNet copies its encoder."""

    in_channels: int = 4  # latent channels read
    out_channels: int = 4  # latent channels predicted (eps or v)
    model_channels: int = 320  # channels of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # ResBlocks per level in the encoder (the decoder has one more)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a transformer
    num_heads: int | None = 8  # fixed head count (SD 1.x); exclusive with num_head_channels
    num_head_channels: int | None = None  # fixed head width (SD 2.x: 64); exclusive with num_heads
    # BasicTransformerBlocks per SpatialTransformer: one number for every level, or one per level
    # (SDXL: (0, 2, 10)); the middle block takes the last level's (sgm's ``transformer_depth_middle``
    # default, diffusers' ``transformer_layers_per_block[-1]``). Kept canonical, so that equal models
    # have equal configs: one number when every level that uses it agrees, else 0 at the levels
    # without a transformer (SDXL's yaml says [1, 2, 10], diffusers' config too: the 1 is unused).
    # diffusers' smaller SDXL ControlNets: -mid has attention at the last level only, depth 1
    # (attention_resolutions (4,), depth 1); -small none at all and a middle transformer of depth 0.
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768  # width of the text embeddings cross-attention reads
    use_linear_in_transformer: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    norm_groups: int = 32  # GroupNorm groups everywhere in the UNet
    # SDXL (sgm's ``num_classes="sequential"``): the width of a vector ``y`` (the pooled text embedding
    # and the size conditioning, ADDED_TIME_IDS x TIME_ID_EMBED_DIM) that ``label_emb`` maps into the
    # time embedding and adds to it. None: no such input (SD 1.x and 2.x).
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        # A set of factors, kept in one canonical order so equal models have equal configs.
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        _require(self.model_channels > 0, f"model_channels must be positive, got {self.model_channels}")
        _require(len(self.channel_mult) > 0, "channel_mult must have at least one level")
        _require(self.num_res_blocks > 0, f"num_res_blocks must be positive, got {self.num_res_blocks}")
        object.__setattr__(self, "transformer_depth", self._canonical_depth())
        _require(
            self.adm_in_channels is None or self.adm_in_channels > 0,
            f"adm_in_channels must be positive or None, got {self.adm_in_channels}",
        )
        _require(
            (self.num_heads is None) != (self.num_head_channels is None),
            "set exactly one of num_heads and num_head_channels "
            f"(got num_heads={self.num_heads}, num_head_channels={self.num_head_channels})",
        )
        for width in self.level_channels:
            _require(
                width % self.norm_groups == 0,
                f"every level's channels must divide into norm_groups={self.norm_groups}, got {width}",
            )
            if self.num_head_channels is not None:
                _require(
                    width % self.num_head_channels == 0,
                    f"channels {width} are not a multiple of num_head_channels={self.num_head_channels}",
                )
            else:
                _require(width % self.num_heads == 0, f"channels {width} do not split into {self.num_heads} heads")

    def _canonical_depth(self) -> int | tuple[int, ...]:
        depth = self.transformer_depth
        levels = len(self.channel_mult)
        attention = {level for level in range(levels) if self.has_attention(level)}
        if isinstance(depth, int):
            _require(depth >= 0, f"transformer_depth must not be negative, got {depth}")
            _require(depth > 0 or not attention, f"transformer_depth must be positive, got {depth}")
            return depth
        depth = tuple(int(d) for d in depth)
        _require(
            len(depth) == levels, f"transformer_depth={depth} needs one entry per level ({levels} in channel_mult)"
        )
        used = attention | {levels - 1}
        # The middle block always has its transformer; where the last level has no attention, it may
        # have no blocks (norm and projections only: diffusers' controlnet-*-sdxl-1.0-small, whose
        # transformer_layers_per_block are all 0 and whose down blocks have no attention).
        _require(
            all(depth[level] > 0 for level in attention) and depth[levels - 1] >= 0,
            f"transformer_depth={depth} must be positive at every level with attention (and not negative at "
            "the last, the middle block's); leave a level without attention out of attention_resolutions instead",
        )
        if len({depth[level] for level in used}) == 1:
            return depth[levels - 1]
        return tuple(d if level in used else 0 for level, d in enumerate(depth))

    def has_attention(self, level: int) -> bool:
        """Whether level ``level`` (downsampling factor ``2 ** level``) has transformers."""
        return 2**level in self.attention_resolutions

    def transformer_depth_at(self, level: int) -> int:
        """BasicTransformerBlocks per SpatialTransformer at level ``level``."""
        depth = self.transformer_depth
        return depth if isinstance(depth, int) else depth[level]

    @property
    def middle_transformer_depth(self) -> int:
        return self.transformer_depth_at(len(self.channel_mult) - 1)

    @property
    def family(self) -> str:
        """The base-model family, as messages name it (`family_name`)."""
        return family_name(self.context_dim, self.adm_in_channels is not None)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a transformer with ``channels`` channels."""
        if self.num_heads is not None:
            return self.num_heads
        return channels // self.num_head_channels

    def encoder_block_channels(self) -> list[int]:
        """Output channels of each ``input_blocks[i]``: these are the skip connections and, in
        the ControlNet, the widths of the 12 zero convolutions (for SD)."""
        widths = [self.model_channels]
        for level, mult in enumerate(self.channel_mult):
            widths += [self.model_channels * mult] * self.num_res_blocks
            if level != len(self.channel_mult) - 1:
                widths.append(self.model_channels * mult)
        return widths


@dataclass(frozen=True)
class UnionConfig:
    """xinsir's ControlNet++ union model (controlnet-union-sdxl-1.0 and its ProMax; diffusers'
    ``ControlNetUnionModel``): one network for several condition types, told which by a control-type
    embedding, fusing several conditions through a small transformer (models/controlnet_union.py)."""

    control_types: int = 6  # rows of ``task_embedding``: 6 in controlnet-union-sdxl-1.0, 8 in ProMax
    heads: int = 8  # heads of the condition transformer (diffusers' ``num_trans_head``; not in a file's shapes)
    layers: int = 1  # its residual attention blocks (``num_trans_layer``)

    def __post_init__(self) -> None:
        _require(self.control_types > 0, f"control_types must be positive, got {self.control_types}")
        _require(
            self.heads > 0 and self.layers > 0, f"heads and layers must be positive, got {self.heads}, {self.layers}"
        )


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the UNet's encoder copy plus the hint encoder (docs/reference.md, "The network").

    ``unet`` is the encoder copy's: its widths and levels are the base UNet's (the residuals go into
    the base's skips), its transformers may differ (diffusers' SDXL -mid and -small ControlNets).
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3  # channels of the condition image (RGB in [0, 1])
    # Widths of the hint encoder's stages; a stride-2 conv between stages: SD's four stages bring the
    # image to 1/8 size, three to 1/4 for a VAE that downsamples 4x (diffusers' rule for
    # ``conditioning_embedding_out_channels``, of any length).
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_average_pooling: bool = False  # 1.1 shuffle model: average each residual over H and W
    union: UnionConfig | None = None  # the union model's parts; None: an ordinary ControlNet

    def __post_init__(self) -> None:
        _require(self.hint_channels > 0, f"hint_channels must be positive, got {self.hint_channels}")
        _require(
            len(self.hint_block_channels) >= 1 and all(c > 0 for c in self.hint_block_channels),
            f"hint_block_channels needs positive widths, got {self.hint_block_channels}",
        )
        if self.union is not None:
            width = self.unet.model_channels
            _require(
                width % self.union.heads == 0,
                f"the union model's condition transformer ({width} wide) does not split into {self.union.heads} heads",
            )
            _require(
                self.unet.adm_in_channels is not None,
                "a union ControlNet is an SDXL one: its UNet needs adm_in_channels (the control-type embedding "
                "is the size-conditioning embedding's sibling)",
            )

    @property
    def hint_downsample_factor(self) -> int:
        """How much the hint encoder shrinks the condition image: the VAE's factor for a working pair."""
        return 2 ** (len(self.hint_block_channels) - 1)


AdapterKind = Literal["full", "light", "full_xl"]


@dataclass(frozen=True)
class T2IAdapterConfig:
    """A T2I-Adapter (Mou et al. 2023): a small network that turns a condition image into one feature
    map per UNet level, added to the UNet's encoder (TencentARC's ``Adapter``, ``Adapter_light`` and
    ``Adapter_XL``).

    The defaults are those of every released SD 1.x ``full`` adapter (``t2iadapter_*_sd14v1.pth``,
    ``*_sd15v2.pth``: ``ksize=1, sk=True, use_conv=False``); the colour adapter is ``light`` with 4
    blocks per level. The SDXL adapters (TencentARC's t2i-adapter-*-sdxl-1.0) are ``full_xl``: the
    full adapter's blocks, a 16x pixel unshuffle and one downsampling only, before the third feature
    (TencentARC's ``Adapter_XL``, diffusers' ``FullAdapterXL``): four features for SDXL's three
    levels and its middle block (`models.unet.adapter_blocks`).
    """

    kind: AdapterKind = "full"  # "full" (Adapter), "light" (Adapter_light) or "full_xl" (Adapter_XL)
    in_channels: int = 3  # condition image channels (1 for the sketch and canny adapters)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each feature map = the UNet's levels
    # full: ResnetBlocks per level (nums_rb); light: ResnetBlock_light per level's extractor.
    num_res_blocks: int = 2
    downscale_factor: int = 8  # pixel unshuffle: the image to the latent size, channels x factor^2
    # full only: the original's ksize (kernel of in_conv, block2 and skep; block1 is always 3x3),
    # sk=False (``skep``, a convolution on the residual path) and use_conv (a stride-2 conv instead of
    # 2x2 average pooling between levels).
    kernel_size: int = 1
    shortcut_conv: bool = False
    conv_downsample: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        _require(
            self.kind in ("full", "light", "full_xl"),
            f"adapter kind must be 'full', 'light' or 'full_xl', got {self.kind!r}",
        )
        _require(
            self.kind != "full_xl" or len(self.channels) >= 3,
            f"an XL adapter downsamples before its third feature: it needs at least 3 widths, got {self.channels}",
        )
        _require(self.in_channels > 0, f"in_channels must be positive, got {self.in_channels}")
        _require(
            len(self.channels) > 0 and all(c > 0 for c in self.channels),
            f"channels must be positive widths, got {self.channels}",
        )
        _require(self.num_res_blocks > 0, f"num_res_blocks must be positive, got {self.num_res_blocks}")
        _require(self.downscale_factor > 0, f"downscale_factor must be positive, got {self.downscale_factor}")
        _require(self.kernel_size in (1, 3), f"kernel_size must be 1 or 3, got {self.kernel_size}")
        if self.kind == "light":
            _require(
                all(c % 4 == 0 for c in self.channels),
                f"a light adapter's widths must be multiples of 4 (its blocks run at a quarter), got {self.channels}",
            )
            _require(
                (self.kernel_size, self.shortcut_conv, self.conv_downsample) == (1, False, False),
                "kernel_size, shortcut_conv and conv_downsample are options of the full adapter only",
            )

    def downsamples_before(self, level: int) -> bool:
        """Whether the first block of ``level`` halves the size: at every level but the first (SD),
        at the third only for XL (TencentARC's ``Adapter_XL``: ``i == 2``), whose first two features
        both have the size of SDXL's second level."""
        return level == 2 if self.kind == "full_xl" else level > 0


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (``ldm.models.autoencoder``) with its ``ddconfig``."""

    in_channels: int = 3  # image channels
    out_channels: int = 3
    ch: int = 128  # channels of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # len - 1 downsamplings: 8x for SD
    num_res_blocks: int = 2  # per level in the encoder (decoder: one more)
    z_channels: int = 4  # latent channels (the encoder outputs 2 * z_channels: mean and log-variance)
    embed_dim: int = 4  # channels after quant_conv (equal to z_channels in every SD model)
    scale_factor: float = 0.18215  # latents are multiplied by this before diffusion
    norm_groups: int = 32

    def __post_init__(self) -> None:
        _require(self.ch > 0 and self.ch % self.norm_groups == 0, f"ch={self.ch} must divide by norm_groups")
        _require(self.scale_factor > 0, f"scale_factor must be positive, got {self.scale_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer: OpenAI CLIP ViT-L/14 (SD 1.x, HF key layout) or OpenCLIP ViT-H/14
    (SD 2.x, open_clip key layout)."""

    arch: TextArch = "clip"  # key layout and activation: clip (HF CLIPTextModel) or openclip
    vocab_size: int = 49408  # CLIP BPE vocabulary
    max_length: int = 77  # token positions, start and end tokens included
    width: int = 768  # hidden size
    layers: int = 12  # transformer layers stored in the checkpoint
    heads: int = 12
    mlp_width: int = 3072
    output_layer: TextLayer = "last"  # SD 1.x: last layer; SD 2.x and SDXL: penultimate
    # Whether the final LayerNorm is applied to the output layer: yes in SD 1.x and 2.x (``ln_final``
    # after the penultimate block in SD 2.x); no in SDXL, whose conditioner reads the raw hidden state
    # (sgm's FrozenCLIPEmbedder ``layer="hidden"`` and FrozenOpenCLIPEmbedder2 ``legacy=False``,
    # diffusers' ``hidden_states[-2]``).
    final_layer_norm: bool = True
    # OpenCLIP's text_projection: SD 2.x stores it unused; SDXL's pooled text embedding is the last
    # layer's end-token state (after ln_final) times it (open_clip ``CLIP.encode_text``).
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        _require(self.arch in ("clip", "openclip"), f"arch must be 'clip' or 'openclip', got {self.arch!r}")
        _require(
            self.output_layer in ("last", "penultimate"),
            f"output_layer must be 'last' or 'penultimate', got {self.output_layer!r}",
        )
        _require(self.width % self.heads == 0, f"width {self.width} does not split into {self.heads} heads")
        _require(self.layers >= 2 or self.output_layer == "last", "penultimate output needs at least 2 layers")

    @property
    def pooled(self) -> bool:
        """Whether this encoder gives a pooled, projected embedding (OpenCLIP with text_projection)."""
        return self.arch == "openclip" and self.projection_dim is not None

    @property
    def activation(self) -> str:
        # OpenAI's CLIP uses QuickGELU (x * sigmoid(1.702 x)); OpenCLIP ViT-H uses exact GELU.
        return "quick_gelu" if self.arch == "clip" else "gelu"

    @property
    def pad_token_id(self) -> int:
        # SD 1.x (HF tokenizer) pads with the end token; open_clip's tokenizer pads with 0.
        return 49407 if self.arch == "clip" else 0


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule: ``linspace(sqrt(start), sqrt(end), n) ** 2`` ("linear" in LDM)."""

    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    prediction: PredictionType = "eps"  # what the UNet predicts: noise (eps) or velocity (v)

    def __post_init__(self) -> None:
        _require(self.prediction in ("eps", "v"), f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        _require(0 < self.linear_start < self.linear_end < 1, "need 0 < linear_start < linear_end < 1")

    def betas(self) -> torch.Tensor:
        """Betas in float64, exactly as the original ``make_beta_schedule('linear', ...)``."""
        root = torch.linspace(self.linear_start**0.5, self.linear_end**0.5, self.num_timesteps, dtype=torch.float64)
        return root**2

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas(), dim=0)


# SDXL's size conditioning (Podell et al. 2023, "SDXL", section 2.2): six numbers, the original
# size (height, width), the crop's top-left corner (top, left) and the target size (height, width),
# each embedded by sinusoids of TIME_ID_EMBED_DIM channels and concatenated after the pooled text
# embedding into the UNet's vector y (sgm's ConcatTimestepEmbedderND(outdim=256), three of them in
# sd_xl_base.yaml; diffusers' ``addition_time_embed_dim``): 1280 + 6 * 256 = 2816 = adm_in_channels.
ADDED_TIME_IDS = 6
TIME_ID_EMBED_DIM = 256


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a Stable Diffusion + ControlNet stack."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    control_hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    native_resolution: int = 512  # the image size the model was trained at
    # SDXL's second text encoder (OpenCLIP ViT-bigG): its hidden states are concatenated after
    # ``text``'s into the context (768 + 1280 = 2048), and its pooled projection starts the vector y.
    text_2: TextEncoderConfig | None = None

    def __post_init__(self) -> None:
        hint_factor = 2 ** (len(self.control_hint_block_channels) - 1)
        _require(
            hint_factor == self.vae.downsample_factor,
            f"{self.name}: the ControlNet hint encoder shrinks images {hint_factor}x but the VAE "
            f"{self.vae.downsample_factor}x; give control_hint_block_channels one width per VAE level",
        )
        if self.text_2 is not None or self.unet.adm_in_channels is not None:
            self._check_dual_text()

    def _check_dual_text(self) -> None:
        """SDXL's wiring: two text encoders whose widths add up to the context, and a UNet vector y of
        the pooled embedding and the size conditioning."""
        _require(
            self.text_2 is not None and self.text_2.pooled,
            f"{self.name}: a UNet with adm_in_channels needs text_2, an OpenCLIP encoder with projection_dim",
        )
        widths = self.text.width + self.text_2.width
        _require(
            self.unet.context_dim == widths,
            f"{self.name}: the UNet's context_dim {self.unet.context_dim} is not the two text encoders' "
            f"widths together ({self.text.width} + {self.text_2.width})",
        )
        vector = self.text_2.projection_dim + ADDED_TIME_IDS * TIME_ID_EMBED_DIM
        _require(
            self.unet.adm_in_channels == vector,
            f"{self.name}: adm_in_channels must be {vector} (pooled {self.text_2.projection_dim} + "
            f"{ADDED_TIME_IDS} x {TIME_ID_EMBED_DIM} size features), got {self.unet.adm_in_channels}",
        )
        _require(
            (self.text.max_length, self.text.vocab_size) == (self.text_2.max_length, self.text_2.vocab_size),
            f"{self.name}: both text encoders must read the same tokens (max_length and vocab_size)",
        )

    def controlnet(self, global_average_pooling: bool = False) -> ControlNetConfig:
        return ControlNetConfig(
            unet=self.unet,
            hint_block_channels=self.control_hint_block_channels,
            global_average_pooling=global_average_pooling,
        )

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)


SD15 = ModelConfig(
    name="sd15",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text=TextEncoderConfig(),
)

_SD21_UNET = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
_OPENCLIP_H = TextEncoderConfig(
    arch="openclip", width=1024, layers=24, heads=16, mlp_width=4096, output_layer="penultimate", projection_dim=1024
)

SD21 = ModelConfig(name="sd21", unet=_SD21_UNET, vae=VAEConfig(), text=_OPENCLIP_H)
SD21_V = ModelConfig(
    name="sd21-v",
    unet=_SD21_UNET,
    vae=VAEConfig(),
    text=_OPENCLIP_H,
    schedule=ScheduleConfig(prediction="v"),
    native_resolution=768,
)

# SDXL 1.0 base (Podell et al. 2023; Stability's configs/inference/sd_xl_base.yaml): three levels,
# no attention at the first, 2 and 10 transformer blocks at the others (and 10 in the middle), 64-wide
# heads, a 2048-wide context from two text encoders' penultimate hidden states (CLIP ViT-L/14 and
# OpenCLIP ViT-bigG/14, no final LayerNorm), and the vector y of 2816; the VAE of SD with another
# latent scale (the fp16-fix VAE has the same layout and scale); the training schedule of SD.
SDXL = ModelConfig(
    name="sdxl",
    unet=UNetConfig(
        channel_mult=(1, 2, 4),
        attention_resolutions=(4, 2),
        num_heads=None,
        num_head_channels=64,
        transformer_depth=(0, 2, 10),
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    ),
    vae=VAEConfig(scale_factor=0.13025),
    text=TextEncoderConfig(output_layer="penultimate", final_layer_norm=False),
    text_2=TextEncoderConfig(
        arch="openclip",
        width=1280,
        layers=32,
        heads=20,
        mlp_width=5120,
        output_layer="penultimate",
        final_layer_norm=False,
        projection_dim=1280,
    ),
    native_resolution=1024,
)

# A few hundred thousand parameters per model: every code path of the real stack (attention at
# several levels, skip ResBlocks, up/down sampling, 8x VAE, the real tokenizer), fast on 2 CPU cores.
TINY = ModelConfig(
    name="tiny",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 1),
        num_heads=None,
        num_head_channels=16,
        context_dim=64,
        use_linear_in_transformer=True,
        norm_groups=8,
    ),
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
    text=TextEncoderConfig(width=64, layers=2, heads=2, mlp_width=256),
    control_hint_block_channels=(8, 16, 32, 32),
    native_resolution=64,
)

# The project's own small model (issue 6), trained from scratch on synthetic shape scenes by
# scripts/train_shipped_model.sh: 128 px images, 16x16x4 latents, a 64-wide text encoder on CLIP's
# tokenizer. Sizes chosen so that the whole stack trains in about 2 hours on 2 CPU cores and
# ships in under 30 MB.
SHAPES = ModelConfig(
    name="shapes",
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2, 4),
        num_heads=None,
        num_head_channels=32,
        context_dim=64,
        use_linear_in_transformer=True,
        norm_groups=16,
    ),
    # The latent scale the vae task calibrated for the shipped VAE (1 / std of its latents), as its
    # file records it: a copy of the weights without that record (a .pth) must still decode right.
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, scale_factor=0.40144),
    text=TextEncoderConfig(width=64, layers=2, heads=2, mlp_width=256),
    control_hint_block_channels=(16, 32, 64, 64),
    native_resolution=128,
)

# The shipped model of issue 19, trained on the synthetic world (``controlnet data world``): a VAE
# that downsamples 4x, not SD's 8x (LDM's kl-f4 first stage; ch_mult has one level fewer), into 8
# latent channels, so that edges come back at their exact pixels (issue 19 point 2; with 8x, 16x16
# latents for 128 px images, the VAE's reconstructions had half the edge F1 after as many samples);
# the shapes UNet on those 32x32x8 latents with attention at 16x16 and 8x8 as shapes has it, not at
# 32x32 (1024-token self-attention doubled the training step: 1.6 s against 0.85 s at batch 32 on
# 2 cores); a three-stage ControlNet hint encoder to match (two stride-2 convs, as diffusers builds
# from three conditioning widths); a 3-layer text encoder for the world's larger vocabulary and free
# phrasing. The UNet's 8 input channels tell its files apart from ``shapes``.
WORLD = ModelConfig(
    name="world",
    unet=dataclasses.replace(SHAPES.unet, in_channels=8, out_channels=8, attention_resolutions=(2, 4)),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=8, norm_groups=8),
    text=TextEncoderConfig(width=64, layers=3, heads=2, mlp_width=256),
    control_hint_block_channels=(16, 32, 64),
    native_resolution=128,
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SD15, SD21, SD21_V, TINY, SHAPES, WORLD, SDXL)}


def preset(name: str) -> ModelConfig:
    """The preset called ``name`` (``sd15``, ``sd21``, ``sd21-v``, ``tiny``, ``shapes``, ``world``, ``sdxl``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def preset_for(model_channels: int, context_dim: int, in_channels: int = 4) -> ModelConfig | None:
    """The preset whose UNet has this width, text context and latent channel count, if any (SD 2.x:
    the eps model, listed before sd21-v which has the same shapes)."""
    for candidate in PRESETS.values():
        unet = candidate.unet
        if (unet.model_channels, unet.context_dim, unet.in_channels) == (model_channels, context_dim, in_channels):
            return candidate
    return None

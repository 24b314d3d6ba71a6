"""Prompt encoding, including prompts longer than CLIP's 77 positions.

CLIP reads 77 tokens: a start token, 75 tokens of text and an end token. Longer prompts are cut by
the original apps and by diffusers. We do what AUTOMATIC1111 users expect instead: the prompt's
tokens are split into chunks of 75, each chunk is encoded on its own (with its start and end
tokens and padding) and the encodings are concatenated along the sequence axis, so the UNet's
cross-attention reads all of them ([B, 77 * chunks, width]). A prompt of at most 75 tokens gives
exactly the usual single encoding. When the prompt and the negative prompt need different numbers
of chunks, the shorter is extended with encodings of the empty prompt so that both can share one
batched UNet call. (AUTOMATIC1111 also moves a chunk boundary back to a nearby comma; we split
strictly every 75 tokens.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.tokenizer import default_tokenizer

CHUNK_TOKENS = 75  # text tokens per 77-position window (start and end tokens excluded)

# Bounded work per prompt (docs/security.md). The token limit is the one that matters: each window
# of 75 tokens is one more text-encoder pass and 77 more positions for every cross-attention of
# every step; 8 windows (600 tokens) is about twice the longest prompts people write. The character
# limit is checked first, so that a huge text is refused before the tokenizer spends time on it
# (BPE is quadratic in the length of a word: a 5,000-letter word takes about 0.6 s).
MAX_PROMPT_WINDOWS = 8
MAX_PROMPT_TOKENS = MAX_PROMPT_WINDOWS * CHUNK_TOKENS
MAX_PROMPT_CHARACTERS = 5_000

# The original canny app's defaults (docs/reference.md, "The original app"), for models trained on real captions.
ORIGINAL_ADDED_PROMPT = "best quality, extremely detailed"
ORIGINAL_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)


def full_prompt(prompt: str, added_prompt: str) -> str:
    """What is encoded: the prompt, then the added prompt after a comma (as the original apps)."""
    return f"{prompt}, {added_prompt}" if added_prompt else prompt


def check_prompts(
    prompt: object,
    added_prompt: object = "",
    negative_prompt: object = "",
    names: tuple[str, str, str] = ("the prompt", "the added prompt", "the negative prompt"),
) -> None:
    """Refuse (ValueError, one line naming the text by ``names``) prompts that are not text, that
    no PNG record can hold (NUL, lone surrogates), or that are too long: MAX_PROMPT_CHARACTERS
    each, checked first, then MAX_PROMPT_TOKENS for what is encoded (the prompt with its added
    prompt, and the negative prompt)."""
    for text, what in zip((prompt, added_prompt, negative_prompt), names, strict=True):
        _check_text(text, what)
    encoded = full_prompt(prompt, added_prompt)  # type: ignore[arg-type]
    encoded_name = f"{names[0]} with {names[1]}" if added_prompt else names[0]
    for text, what in ((encoded, encoded_name), (negative_prompt, names[2])):
        _check_text(text, what)
        tokens = len(default_tokenizer().encode(text))  # type: ignore[arg-type]
        if tokens > MAX_PROMPT_TOKENS:
            raise ValueError(
                f"{what} is {tokens} tokens long; the limit is {MAX_PROMPT_TOKENS} "
                f"({MAX_PROMPT_WINDOWS} windows of {CHUNK_TOKENS} tokens)"
            )


def _check_text(text: object, what: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARACTERS:
        raise ValueError(f"{what} is {len(text):,} characters long; the limit is {MAX_PROMPT_CHARACTERS:,}")
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL character (code 0), which is not allowed in a prompt")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None


def tokenize_chunks(prompt: str, pad_token_id: int, max_length: int = 77) -> torch.Tensor:
    """[chunks, max_length] token ids for one prompt: start, up to 75 tokens, end, padding."""
    tokenizer = default_tokenizer()
    per_chunk = max_length - 2
    ids = tokenizer.encode(prompt)
    pieces = [ids[i : i + per_chunk] for i in range(0, len(ids), per_chunk)] or [[]]
    rows = torch.full((len(pieces), max_length), pad_token_id, dtype=torch.long)
    for row, piece in enumerate(pieces):
        tokens = [tokenizer.start_token_id, *piece, tokenizer.end_token_id]
        rows[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return rows


def _chunk_tokens(text_encoder: torch.nn.Module, prompts: Sequence[str], min_chunks: int) -> tuple[torch.Tensor, int]:
    """[len(prompts) * chunks, 77] token ids on the encoder's device, every prompt with as many chunks
    as the longest (or ``min_chunks``), missing chunks the empty prompt's; and ``chunks``."""
    config = text_encoder.config
    per_prompt = [tokenize_chunks(p, config.pad_token_id, config.max_length) for p in prompts]
    chunks = max([min_chunks, *(t.shape[0] for t in per_prompt)])
    empty = tokenize_chunks("", config.pad_token_id, config.max_length)
    padded = [torch.cat([t, empty.expand(chunks - t.shape[0], -1)]) for t in per_prompt]
    return torch.cat(padded).to(next(text_encoder.parameters()).device), chunks


@torch.no_grad()
def encode_prompts(text_encoder: torch.nn.Module, prompts: Sequence[str], min_chunks: int = 1) -> torch.Tensor:
    """Encode ``prompts`` to [len(prompts), 77 * chunks, width], every prompt with as many chunks as
    the longest (or ``min_chunks``); missing chunks are the empty prompt's encoding."""
    tokens, chunks = _chunk_tokens(text_encoder, prompts, min_chunks)
    hidden = text_encoder(tokens)  # [B * chunks, 77, width]
    return hidden.reshape(len(prompts), chunks * tokens.shape[1], hidden.shape[-1])


@torch.no_grad()
def encode_prompts_pooled(
    text_encoder: torch.nn.Module, prompts: Sequence[str], min_chunks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's two encodings of ``prompts`` (a `DualTextEncoder`): the context as `encode_prompts`
    gives it, [B, 77 * chunks, width], and the pooled embedding [B, projection_dim] of each prompt's
    first window. A prompt longer than one window is read whole by the cross-attention, while its
    pooled embedding, one vector, is its first window's: what AUTOMATIC1111 and ComfyUI do (diffusers
    cuts every prompt at 77 tokens, so up to 75 tokens the three agree)."""
    tokens, chunks = _chunk_tokens(text_encoder, prompts, min_chunks)
    context, pooled = text_encoder.encode(tokens)  # [B * chunks, 77, width], [B * chunks, projection_dim]
    context = context.reshape(len(prompts), chunks * tokens.shape[1], context.shape[-1])
    return context, pooled.reshape(len(prompts), chunks, pooled.shape[-1])[:, 0]


def chunk_count(prompt: str) -> int:
    return max(1, -(-len(default_tokenizer().encode(prompt)) // CHUNK_TOKENS))

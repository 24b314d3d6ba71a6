"""The ``tokenizer/`` folder of a diffusers pipeline, written from our packaged CLIP vocabulary.

transformers' ``CLIPTokenizer`` reads ``vocab.json`` (token -> id) and ``merges.txt`` (one merge
per line, in rank order, after a version header); both are another spelling of the same BPE file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import atomic_file
from ..models.tokenizer import END_TOKEN_ID, default_tokenizer


def write_hf_tokenizer_files(folder: str | os.PathLike, pad_token_id: int, max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = default_tokenizer()
    _write_text(folder / "vocab.json", json.dumps(tokenizer.encoder, ensure_ascii=False))
    merges = "\n".join(f"{a} {b}" for a, b in tokenizer.merges)
    _write_text(folder / "merges.txt", "#version: 0.2\n" + merges + "\n")
    pad = "<|endoftext|>" if pad_token_id == END_TOKEN_ID else "!"  # id 0 is the byte symbol "!"
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    _write_text(folder / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **specials}
    _write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return folder


def _write_text(path: Path, text: str) -> None:
    # UTF-8 whatever the locale: vocab.json holds non-ASCII byte symbols.
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)

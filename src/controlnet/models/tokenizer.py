"""CLIP's byte-level BPE tokenizer, in the standard library only.

The vocabulary is ``controlnet/data/bpe_simple_vocab_16e6.txt.gz``, the file OpenAI's CLIP and
open_clip ship: taken unchanged from the ``open_clip_torch`` 3.3.0 wheel on PyPI (MIT licence),
sha256 ``924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a``. Its first line is a
header; the next 48,894 lines are the merges, in rank order. The 49,408 ids are the 256 byte
symbols, the same 256 with the end-of-word marker ``</w>``, one id per merge, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Text is cleaned as CLIP's tokenizers do (open_clip's ``basic_clean`` + ``whitespace_clean``, and the
HF tokenizer SD 1.x used): HTML entities unescaped, Unicode NFC, whitespace runs collapsed to one
space, lowercased. ``ftfy`` is replaced by the few of its fixes that change ordinary prompts (curly
quotes, full-width forms, Latin ligatures, stray control characters); its mojibake repair is not
reproduced. The pre-tokenisation pattern of CLIP (``'s|'t|...|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``)
is rebuilt from Python ``re`` classes, with the Unicode categories ``re`` lacks listed explicitly.

Nothing is read at import time; :func:`default_tokenizer` loads the vocabulary once, on first use.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import itertools
import re
import sys
import unicodedata
from collections.abc import Sequence

import torch

START_TOKEN_ID = 49406
END_TOKEN_ID = 49407
VOCAB_SIZE = 49408
_START_TOKEN = "<|startoftext|>"
_END_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894: every id that is neither a byte symbol nor special
# The word cache stays within a few tens of MB: at most this many words, each at most this long.
_MAX_CACHED_WORDS = 100_000
_MAX_CACHED_WORD_LENGTH = 64
_VOCAB_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"

# ftfy's uncurl_quotes: typographic apostrophes and quotes become ASCII, so "don’t" ends in the
# contraction 't exactly as "don't" does.
_QUOTES = {**dict.fromkeys(range(0x2018, 0x201C), "'"), 0x02BC: "'", **dict.fromkeys(range(0x201C, 0x2020), '"')}
# ftfy's remove_control_chars: controls nobody means to type (tab, newline, CR and form feed stay,
# they are whitespace), the byte order mark and a few invisible format characters.
_CONTROLS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)
_LIGATURES = (0x0132, 0x0133, 0x0149, *range(0x01C4, 0x01CD), *range(0x01F1, 0x01F4), *range(0xFB00, 0xFB07))
_WHITESPACE = re.compile(r"\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """The printable stand-in CLIP's BPE uses for each byte: printable Latin-1 bytes stand for
    themselves, the others are moved to code points 256 and up, in byte order. The dict's order
    (the printable bytes first, then the moved ones) is the order of the first 256 ids."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.cache
def _ftfy_like_table() -> dict[int, str | None]:
    """One ``str.translate`` table for the ftfy fixes kept: quotes, controls, ligatures and the
    full-width/half-width forms (replaced by their NFKC equivalent, as ftfy's fix_character_width)."""
    table: dict[int, str | None] = {**_QUOTES, **_CONTROLS, 0x3000: " "}
    for cp in (*range(0xFF01, 0xFFF0), *_LIGATURES):
        compatible = unicodedata.normalize("NFKC", chr(cp))
        if compatible != chr(cp):
            table[cp] = compatible
    return table


def _code_point_class(categories: tuple[str, ...]) -> str:
    """Regex character-class body (ranges, escaped) of every code point in ``categories``."""
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)) in categories:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


def _pretokenizer() -> re.Pattern[str]:
    r"""CLIP's split pattern in ``re`` terms.

    ``re`` has no ``\p{L}``/``\p{N}``. Its ``\w`` is "alphanumeric or underscore" and ``\d`` is
    category Nd, so ``\w`` minus ``\d``, ``_`` and the other numbers (categories Nl and No, e.g. ``²``,
    ``½``, ``Ⅻ``) is exactly the letters; the numbers are ``\d`` plus Nl/No; everything else that is
    not whitespace (``_`` included) is the third class.
    """
    other_numbers = _code_point_class(("Nl", "No"))
    letters = rf"[^\W\d_{other_numbers}]+"
    number = rf"[\d{other_numbers}]"
    rest = r"(?:[^\s\w]|_)+"
    specials = f"{re.escape(_START_TOKEN)}|{re.escape(_END_TOKEN)}"
    return re.compile(rf"{specials}|'s|'t|'re|'ve|'m|'ll|'d|{letters}|{number}|{rest}")


def clean_text(text: str) -> str:
    """CLIP's text normalisation: the text as the BPE sees it."""
    text = html.unescape(html.unescape(text))  # twice, as open_clip does, for doubly escaped scraped text
    text = unicodedata.normalize("NFC", text.translate(_ftfy_like_table()))
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP BPE: ``encode`` gives the ids of a text, calling it gives padded model input."""

    def __init__(self, merges: Sequence[tuple[str, str]]) -> None:
        byte_symbols = _bytes_to_unicode()
        self._byte_symbol = [byte_symbols[b] for b in range(256)]
        symbols = list(byte_symbols.values())
        vocab = [*symbols, *(s + _END_OF_WORD for s in symbols), *(a + b for a, b in merges), _START_TOKEN, _END_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        if len(self.encoder) != len(vocab):
            raise ValueError("the BPE vocabulary has duplicate tokens")
        self.start_token_id = self.encoder[_START_TOKEN]
        self.end_token_id = self.encoder[_END_TOKEN]
        self._ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self._pattern = _pretokenizer()
        # Prompts reuse few words; the merge loop dominates the cost, so remember each word's ids.
        self._cache: dict[str, tuple[int, ...]] = {
            _START_TOKEN: (self.start_token_id,),
            _END_TOKEN: (self.end_token_id,),
        }

    @classmethod
    def from_vocab_file(cls, path: str | None = None) -> CLIPTokenizer:
        """Read a ``bpe_simple_vocab_16e6.txt.gz``-style file (the packaged one by default)."""
        if path is None:
            raw = importlib.resources.files("controlnet").joinpath("data", _VOCAB_RESOURCE).read_bytes()
        else:
            with open(path, "rb") as f:
                raw = f.read()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
        merge_lines = lines[1 : _NUM_MERGES + 1]
        if len(merge_lines) != _NUM_MERGES:
            raise ValueError(f"BPE file has {len(merge_lines)} merges, expected {_NUM_MERGES}")
        merges = []
        for line in merge_lines:
            first, second = line.split()
            merges.append((first, second))
        return cls(merges)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The BPE merges in rank order (what ``merges.txt`` of a HF tokenizer lists)."""
        return list(self._ranks)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (already mapped to byte symbols): merge the best-ranked adjacent
        pair everywhere it occurs until no pair is a known merge."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(parts) > 1:
            best = min(itertools.pairwise(parts), key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self.encoder[p] for p in parts)
        if len(word) > _MAX_CACHED_WORD_LENGTH:  # not a word people reuse; it would take kilobytes
            return ids
        if len(self._cache) >= _MAX_CACHED_WORDS:  # a server sees endless new words: stay bounded
            self._cache = {token: self._cache[token] for token in (_START_TOKEN, _END_TOKEN)}
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens and without truncation."""
        ids: list[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            # The special tokens are ASCII, so their byte symbols spell them and the cache holds their ids.
            ids.extend(self._bpe("".join(self._byte_symbol[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: Sequence[str] | str, pad_token_id: int, max_length: int = 77) -> torch.LongTensor:
        """``[len(texts), max_length]`` ids: start token, text, end token, padding.

        Texts too long are cut to ``max_length - 2`` tokens so that the end token stays last (HF's
        ``truncation=True``, open_clip's ``tokenize``). SD 1.x pads with the end token (49407), open_clip
        (SD 2.x) with 0: pass ``TextEncoderConfig.pad_token_id``.
        """
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), max_length), pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_token_id, *self.encode(text)[: max_length - 2], self.end_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.cache
def default_tokenizer() -> CLIPTokenizer:
    """The packaged CLIP tokenizer, loaded on first call and shared afterwards."""
    return CLIPTokenizer.from_vocab_file()

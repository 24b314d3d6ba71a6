"""The CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary file."""

from __future__ import annotations

import gzip
import html
import importlib.resources
import json
from pathlib import Path

import pytest
import torch

from controlnet.models.tokenizer import END_TOKEN_ID, START_TOKEN_ID, CLIPTokenizer, clean_text, default_tokenizer

LONG = "a highly detailed photograph of a majestic lion, golden hour lighting, 8k resolution, " * 6

TEXTS = [
    "a photo of a cat",
    "",
    "   ",
    "A Photo Of A CAT",
    "an astronaut riding a horse on mars, trending on artstation, 4k, unreal engine",
    "Hello, world!!! ... (masterpiece:1.2), [best quality], {foo|bar}; a-b_c/d\\e",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines  ",
    "don't can't I'm you're we've they'll she'd it's DON'T IT'S",
    "rock'n'roll 'quoted' o'clock",
    "1234567890 3.14159 1,000,000 2024-01-01 12:30pm #42 $9.99 50%",
    "café naïve façade crème brûlée Ångström Zürich",
    "東京タワー 北京 서울 москва Αθήνα",
    "emoji 😀🐱👍🏽 👩‍👩‍👧 🇯🇵 ❤️",
    "straße ÉCOLE ĞÜŞİÖÇ",
    "x² ½ Ⅻ ٣ ۴ ४",
    "<|startoftext|> inside <|endoftext|> text",
    "tom &amp; jerry &lt;3 &quot;quoted&quot; &#39;x&#39;",
    LONG,
]


def _bytes_to_unicode() -> list[str]:
    """The 256 byte symbols in id order, as CLIP defines them (written out independently here)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(moved))]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory):
    """transformers' (tokenizers-backed) CLIPTokenizer over vocab.json + merges.txt derived from our .gz."""
    transformers = pytest.importorskip("transformers")
    raw = importlib.resources.files("controlnet").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder: Path = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def test_reference_ids() -> None:
    tok = default_tokenizer()
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    ids = tok("a photo of a cat", pad_token_id=49407)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    zero_padded = tok(["a photo of a cat"], pad_token_id=0)
    assert zero_padded[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (zero_padded[0, 7:] == 0).all()
    assert (START_TOKEN_ID, END_TOKEN_ID, tok.vocab_size) == (49406, 49407, 49408)


def test_default_tokenizer_is_cached() -> None:
    assert default_tokenizer() is default_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(oracle, text: str) -> None:
    expected = oracle(html.unescape(html.unescape(text)), add_special_tokens=False).input_ids
    assert default_tokenizer().encode(text) == expected


@pytest.mark.parametrize("pad", [49407, 0])
def test_batch_matches_transformers(oracle, pad: int) -> None:
    # The oracle always pads with 49407; its attention mask tells the padding positions to replace.
    ours = default_tokenizer()(TEXTS, pad_token_id=pad)
    texts = [html.unescape(html.unescape(t)) for t in TEXTS]
    ref = oracle(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    expected = torch.where(ref.attention_mask.bool(), ref.input_ids, torch.full_like(ref.input_ids, pad))
    assert ours.shape == (len(TEXTS), 77)
    assert torch.equal(ours, expected)


def test_truncation_keeps_end_token() -> None:
    tok = default_tokenizer()
    assert len(tok.encode(LONG)) > 77
    ids = tok(LONG, pad_token_id=0)[0]
    assert ids[0] == START_TOKEN_ID and ids[-1] == END_TOKEN_ID
    assert ids[1:-1].tolist() == tok.encode(LONG)[:75]
    short = tok(LONG, pad_token_id=0, max_length=10)
    assert short.shape == (1, 10) and short[0, -1] == END_TOKEN_ID


def test_cleaning() -> None:
    tok = default_tokenizer()
    assert clean_text("  Tom &amp;amp; JERRY\n\t") == "tom & jerry"
    # The ftfy fixes CLIP's own tokenizers apply: curly quotes, full-width forms, ligatures, controls.
    assert tok.encode("Don’t “stop”") == tok.encode('don\'t "stop"')
    assert tok.encode("ＣＡＴ　１２") == tok.encode("cat 12")
    assert tok.encode("ﬁne ﬂower") == tok.encode("fine flower")
    assert tok.encode("ca\x00t\ufeff") == tok.encode("cat")
    # Decomposed accents are composed first (NFC), as both reference tokenizers do.
    assert tok.encode("cafe\u0301") == tok.encode("café")


def test_bpe_cache_and_fresh_instance_agree() -> None:
    fresh = CLIPTokenizer.from_vocab_file()
    for text in TEXTS:
        assert fresh.encode(text) == default_tokenizer().encode(text)
        assert fresh.encode(text) == fresh.encode(text)


def test_rejects_too_short_max_length() -> None:
    with pytest.raises(ValueError, match="max_length"):
        default_tokenizer()("cat", pad_token_id=0, max_length=1)

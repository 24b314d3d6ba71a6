"""Image files: every mode to RGB as the original apps see it, every kind of bad file refused with a
one-line ImageError, PNG metadata round trips, and the original HWC3."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet.imaging.images import (
    DEFAULT_MAX_PIXELS,
    HWC3,
    ImageError,
    encode_png,
    image_size,
    load_image,
    read_png_text,
    save_png,
)


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(tmp_path: Path, name: str, image: Image.Image, **kwargs: object) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """The original HWC3 compositing, written out."""
    color = rgba[:, :, :3].astype(np.float32)
    alpha = rgba[:, :, 3:].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# HWC3


def test_hwc3_follows_the_original() -> None:
    rgb = _rgb()
    assert HWC3(rgb) is rgb
    grey = rgb[:, :, 0]
    np.testing.assert_array_equal(HWC3(grey), np.stack([grey] * 3, axis=2))
    np.testing.assert_array_equal(HWC3(grey[:, :, None]), np.stack([grey] * 3, axis=2))
    rgba = np.random.default_rng(1).integers(0, 256, (24, 32, 4), dtype=np.uint8)
    np.testing.assert_array_equal(HWC3(rgba), _over_white(rgba))


def test_hwc3_composites_over_white() -> None:
    rgba = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [100, 50, 0, 128], [10, 20, 30, 1]]], dtype=np.uint8)
    out = HWC3(rgba)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])  # opaque black stays black
    # 100 * 128/255 + 255 * (1 - 128/255) = 177.2 -> 177, truncated as the original's astype; in
    # float32 the white share is 126.99999, so blue 0 gives 126, not 127, exactly as the original
    np.testing.assert_array_equal(out[0, 2], [177, 152, 126])


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (np.zeros((4, 4, 3), np.float32), ValueError),
        (np.zeros((4, 4, 3), np.uint16), ValueError),
        (np.zeros((4, 4, 2), np.uint8), ValueError),
        (np.zeros((4,), np.uint8), ValueError),
        (np.zeros((1, 4, 4, 3), np.uint8), ValueError),
        ([[0, 1]], TypeError),
    ],
)
def test_hwc3_refuses_what_the_original_asserted(bad: object, error: type) -> None:
    with pytest.raises(error):
        HWC3(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Modes


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff", "webp"])
def test_rgb_files_load_exactly(tmp_path: Path, fmt: str) -> None:
    rgb = _rgb()
    kwargs = {"lossless": True} if fmt == "webp" else {}
    out = load_image(_save(tmp_path, f"x.{fmt}", Image.fromarray(rgb), **kwargs))
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_loads_close(tmp_path: Path) -> None:
    rgb = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    out = load_image(_save(tmp_path, "x.jpg", Image.fromarray(rgb), quality=95))
    assert np.abs(out.astype(int) - rgb).max() <= 3


def test_grey_and_one_bit(tmp_path: Path) -> None:
    grey = _rgb()[:, :, 0]
    np.testing.assert_array_equal(load_image(_save(tmp_path, "g.png", Image.fromarray(grey))), HWC3(grey))
    bits = grey > 127
    out = load_image(_save(tmp_path, "b.png", Image.fromarray(bits)))
    np.testing.assert_array_equal(out, HWC3(bits.astype(np.uint8) * 255))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 30000], [32896, 65535, 128, 65534]], dtype=np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(values))
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = load_image(path)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 1, 4, 117], [128, 255, 0, 255]])
    assert (out[:, :, 0] == out[:, :, 2]).all()


def test_sixteen_bit_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 65535], [32896, 12850]], dtype=np.uint16)
    out = load_image(_save(tmp_path, "g16.tif", Image.fromarray(values)))
    np.testing.assert_array_equal(out[:, :, 1], [[0, 255], [128, 50]])


def test_float_images(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    out = load_image(_save(tmp_path, "f.tif", Image.fromarray(unit, mode="F")))
    np.testing.assert_array_equal(out[:, :, 0], [[0, 128], [255, 64]])
    wide = np.array([[0.0, 100.0], [300.0, -5.0]], dtype=np.float32)
    out = load_image(_save(tmp_path, "f2.tif", Image.fromarray(wide, mode="F")))
    np.testing.assert_array_equal(out[:, :, 0], [[0, 100], [255, 0]])


def test_rgba_and_la_are_composited_over_white(tmp_path: Path) -> None:
    rgba = np.random.default_rng(2).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(_save(tmp_path, "a.png", Image.fromarray(rgba))), _over_white(rgba))
    la = rgba[:, :, [0, 3]]
    out = load_image(_save(tmp_path, "la.png", Image.fromarray(la, mode="LA")))
    np.testing.assert_array_equal(out, _over_white(np.dstack([la[:, :, :1]] * 3 + [la[:, :, 1:]])))


def test_palette_transparency_is_white(tmp_path: Path) -> None:
    index = np.zeros((8, 8), np.uint8)
    index[:, 4:] = 1
    image = Image.fromarray(index, mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    path = _save(tmp_path, "p.png", image, transparency=0)  # colour 0 (red) is transparent
    out = load_image(path)
    np.testing.assert_array_equal(out[:, :4], 255)
    np.testing.assert_array_equal(out[:, 4:], np.broadcast_to([0, 0, 255], (8, 4, 3)))
    gif = load_image(_save(tmp_path, "p.gif", image, transparency=0))
    np.testing.assert_array_equal(gif, out)


def test_palette_without_transparency(tmp_path: Path) -> None:
    image = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = load_image(_save(tmp_path, "p.png", image))
    np.testing.assert_array_equal(out, np.array(image.convert("RGB")))


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8] = (0, 255, 255, 0)  # red
    cmyk[:, 8:] = (255, 255, 0, 0)  # blue
    path = _save(tmp_path, "c.jpg", Image.fromarray(cmyk, mode="CMYK"), quality=100)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = load_image(path).astype(int)
    assert np.abs(out[4:12, 1:6] - [255, 0, 0]).max() <= 8
    assert np.abs(out[4:12, 10:15] - [0, 0, 255]).max() <= 8


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored rotated: shown turned 90° clockwise
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
    ],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, expected) -> None:
    rgb = _rgb(4, 6)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(_save(tmp_path, "o.png", Image.fromarray(rgb), exif=exif.tobytes()))
    np.testing.assert_array_equal(out, expected(rgb))


def test_animated_images_give_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "a.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(load_image(path), 10)


# ------------------------------------------------------------------------------------------------
# Bad files


def _assert_refused(path: Path, match: str, **kwargs: object) -> None:
    with pytest.raises(ImageError, match=match) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    _assert_refused(tmp_path / "nope.png", "cannot read .*nope.png: No such file")
    _assert_refused(tmp_path, "cannot read")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_refused(path, "is empty")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("a prompt, not a picture\n" * 20)
    _assert_refused(path, "is not an image")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_images(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_refused(path, "corrupt or truncated")


def test_corrupt_png(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format="png")
    data = bytearray(buffer.getvalue())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)  # damages the compressed pixels and their CRC
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    _assert_refused(path, "corrupt or truncated")


def _png_claiming(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims width x height RGB pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "match"),
    [
        (9000, 9000, "over the limit"),  # above our limit, below Pillow's warning
        (10_000, 10_000, "too large"),  # Pillow's DecompressionBombWarning
        (100_000, 100_000, "too large"),  # Pillow's DecompressionBombError
        (2**31 - 1, 2**31 - 1, "too large|over the limit"),
    ],
)
def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path, width: int, height: int, match: str) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(width, height))
    start = time.perf_counter()
    _assert_refused(path, match)
    with pytest.raises(ImageError):
        read_png_text(path)
    assert time.perf_counter() - start < 5  # refused from the header: nothing is decoded


def test_the_pixel_limit_is_configurable(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.png", Image.fromarray(_rgb(20, 20)))
    _assert_refused(path, "20x20 pixels, over the limit of 399", max_pixels=399)
    assert load_image(path, max_pixels=400).shape == (20, 20, 3)
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


# ------------------------------------------------------------------------------------------------
# PNG metadata


def test_png_text_round_trip(tmp_path: Path) -> None:
    text = {
        "parameters": "a cat, best quality\nSteps: 20, Seed: 42",
        "unicode": "猫 — ß — emoji 🐱",
        "long": "x" * 5000,
        "empty": "",
    }
    image = _rgb()
    path = save_png(tmp_path / "out.png", image, text)
    assert read_png_text(path) == text
    np.testing.assert_array_equal(load_image(path), image)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_save_png_overwrites_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.png"
    save_png(path, _rgb(seed=1), {"run": "1"})
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # the new file is written, then its sync fails
        patch.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left"):
            save_png(path, _rgb(seed=2), {"run": "2"})
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1  # the old one, whole
    save_png(path, _rgb(seed=2), {"run": "2"})
    assert read_png_text(path) == {"run": "2"}
    np.testing.assert_array_equal(load_image(path), _rgb(seed=2))
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    "image",
    [np.zeros((5, 6), np.uint8), np.zeros((5, 6, 1), np.uint8), np.zeros((5, 6, 4), np.uint8)],
)
def test_save_png_takes_grey_and_rgba(tmp_path: Path, image: np.ndarray) -> None:
    path = save_png(tmp_path / "x.png", image)
    with Image.open(path) as im:
        assert im.size == (6, 5)
    assert read_png_text(path) == {}


@pytest.mark.parametrize(
    ("image", "text", "error"),
    [
        (np.zeros((5, 6, 3), np.float32), None, ValueError),
        (np.zeros((5, 6, 2), np.uint8), None, ValueError),
        (np.zeros((0, 6, 3), np.uint8), None, ValueError),
        ("not an array", None, TypeError),
        (np.zeros((5, 6, 3), np.uint8), {"": "v"}, ValueError),
        (np.zeros((5, 6, 3), np.uint8), {"k" * 80: "v"}, ValueError),
        (np.zeros((5, 6, 3), np.uint8), {" key": "v"}, ValueError),
        (np.zeros((5, 6, 3), np.uint8), {"猫": "v"}, ValueError),
        (np.zeros((5, 6, 3), np.uint8), {"k": "a\0b"}, ValueError),
        (np.zeros((5, 6, 3), np.uint8), {"k": 3}, TypeError),
    ],
)
def test_save_png_refuses_bad_input(tmp_path: Path, image: object, text: object, error: type) -> None:
    with pytest.raises(error):
        save_png(tmp_path / "x.png", image, text)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_read_png_text_refuses_other_formats(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.jpg", Image.fromarray(_rgb()))
    with pytest.raises(ImageError, match="not a PNG"):
        read_png_text(path)
    with pytest.raises(ImageError, match="cannot read"):
        read_png_text(tmp_path / "missing.png")


def test_resizing_is_importable_from_images_too() -> None:
    from controlnet import annotators
    from controlnet.imaging.resize import fit_to, pixel_perfect_resolution, resize_image

    assert (fit_to, resize_image, pixel_perfect_resolution) == (
        annotators.fit_to,
        annotators.resize_image,
        annotators.pixel_perfect_resolution,
    )
    with pytest.raises(ImportError):
        from controlnet.imaging.images import no_such_name  # noqa: F401


def test_bytes_in_memory_load_as_the_file_does(tmp_path: Path) -> None:
    path = _save(tmp_path, "x.png", Image.fromarray(_rgb(20, 30)))
    data = path.read_bytes()
    assert np.array_equal(load_image(data), load_image(path))
    assert image_size(data) == image_size(path) == (30, 20)
    with pytest.raises(ImageError, match=r"^the image is empty$"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"^the image is not an image"):
        load_image(b"not an image")
    with pytest.raises(ImageError, match="the image is 30x20 pixels, over the limit of 10"):
        image_size(data, max_pixels=10)


def test_image_size_reads_the_header_only() -> None:
    assert image_size(_png_claiming(9000, 9000), max_pixels=10**9) == (9000, 9000)  # no pixel data at all
    with pytest.raises(ImageError, match="over the limit"):
        image_size(_png_claiming(9000, 9000))


def test_encode_png_is_what_save_png_writes(tmp_path: Path) -> None:
    image = _rgb(8, 8)
    text = {"parameters": "a prompt", "controlnet": "é" * 2000}
    data = encode_png(image, text)
    assert save_png(tmp_path / "x.png", image, text).read_bytes() == data
    assert np.array_equal(load_image(data), image) and read_png_text(tmp_path / "x.png") == text
    with pytest.raises(ValueError, match="NUL"):
        encode_png(image, {"parameters": "a\0b"})


def test_line_chart_draws_error_bars_that_widen_the_axes(tmp_path: Path) -> None:
    """charts.line_chart's ``errors``: a vertical bar of the series' colour around each point, and
    the y axis stretched to hold the bars' ends (experiments' 95% intervals)."""
    from controlnet.imaging.charts import COLOURS, line_chart

    points = {"run": [(0.0, 0.5), (1.0, 0.5)]}
    plain = np.asarray(Image.open(line_chart(tmp_path / "plain.png", points, "t", "x", "y")).convert("RGB"))
    barred = np.asarray(
        Image.open(line_chart(tmp_path / "bars.png", points, "t", "x", "y", errors={"run": [0.4, 0.0]})).convert("RGB")
    )
    colour = np.array(COLOURS[0])

    def rows_in_colour(image: np.ndarray, column: int) -> int:
        return int((image[:, column - 1 : column + 2] == colour).all(axis=2).any(axis=1).sum())

    left_edge = 70 + 1  # the first point sits on the frame's left edge (x = 0)
    assert rows_in_colour(barred, left_edge) > rows_in_colour(plain, left_edge) + 20  # the bar spans rows
    with pytest.raises(ValueError):  # one width per point
        line_chart(tmp_path / "bad.png", points, "t", "x", "y", errors={"run": [0.1]})

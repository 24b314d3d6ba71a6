"""Line charts and image grids as PNGs, with Pillow only (no plotting library to install): the
training curves, validation grids and the figures of docs/."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_file

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
Series = Sequence[tuple[float, float]]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(count + 2) if first + i * step <= high + step * 0.999]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.0e}" if abs(value) < 0.01 else f"{value:,.0f}"
    return f"{value:g}"


def line_chart(
    path: str | Path,
    series: Mapping[str, Series],
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (720, 400),
    log_y: bool = False,
    marks: Mapping[str, float] | None = None,
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Draw each named series of (x, y) points as a line; ``marks``: labelled vertical lines;
    ``errors``: for a series, the half-width of an interval around each of its points (error bars)."""
    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    bars = {name: list(zip(series[name], widths, strict=True)) for name, widths in (errors or {}).items()}
    ends = [(x, y + s * e) for name in bars for (x, y), e in bars[name] for s in (-1, 1)]
    points = [
        (x, y)
        for x, y in [*(p for values in series.values() for p in values), *ends]
        if math.isfinite(y) and (y > 0 or not log_y)
    ]
    if not points:
        points = [(0.0, 0.0), (1.0, 1.0)]

    def ty(y: float) -> float:
        return math.log10(y) if log_y else y

    xs, ys = [p[0] for p in points], [ty(p[1]) for p in points]
    x_ticks, y_ticks = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (ty(y) - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    frame = (left, top, width - right, height - bottom)
    _draw_axes(draw, font, frame, x_ticks, y_ticks, to_pixel, log_y)
    for name, x in (marks or {}).items():
        px = to_pixel(x, 10**y0 if log_y else y0)[0]
        draw.line([px, top, px, height - bottom], fill=(120, 120, 120), width=1)
        draw.text((px + 3, top + 3), name, fill=(90, 90, 90), font=font)
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [to_pixel(x, y) for x, y in values if math.isfinite(y) and (y > 0 or not log_y)]
        for (x, y), e in bars.get(name, []):
            if math.isfinite(y) and math.isfinite(e) and (y - e > 0 or not log_y):
                (px, low), (_, high) = to_pixel(x, y - e), to_pixel(x, y + e)
                px += 4 * (i - (len(bars) - 1) / 2)  # side by side where several series share an x
                draw.line([px, low, px, high], fill=colour, width=1)
                draw.line([px - 3, low, px + 3, low], fill=colour, width=1)
                draw.line([px - 3, high, px + 3, high], fill=colour, width=1)
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        draw.rectangle([left + 10, top + 8 + 14 * i, left + 22, top + 16 + 14 * i], fill=colour)
        draw.text((left + 28, top + 6 + 14 * i), name, fill="black", font=font)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text(((width - len(x_label) * 6) / 2, height - 20), x_label, fill="black", font=font)
    draw.text((6, top - 20), y_label, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:  # whole or not at all
        image.save(handle, format="PNG")
    return path


def _draw_axes(draw, font, frame, x_ticks, y_ticks, to_pixel, log_y: bool) -> None:
    """The frame, the grid lines at the ticks and their labels."""
    left, top, right, bottom = frame
    draw.rectangle(list(frame), outline=(80, 80, 80))
    y0, y1 = y_ticks[0], y_ticks[-1]
    for x in x_ticks:
        px = to_pixel(x, 10**y0 if log_y else y0)[0]
        draw.line([px, top, px, bottom], fill=(230, 230, 230))
        draw.text((px - 12, bottom + 6), _label(x), fill="black", font=font)
    for y in y_ticks:
        py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        draw.line([left, py, right, py], fill=(230, 230, 230))
        draw.text((6, py - 6), _label(10**y if log_y else y), fill="black", font=font)


def _label_width(labels: Sequence[str] | None) -> int:
    return 0 if not labels else 8 + 6 * max(len(label) for label in labels)


def grid_cell(
    grid: Image.Image, row: int, column: int, cell: tuple[int, int], labels: Sequence[str] | None, pad: int = 2
) -> np.ndarray:
    """The image at (``row``, ``column``) of a grid drawn by :func:`image_grid` with these cell size
    (height, width), labels and padding: reads figures back out of saved validation grids."""
    height, width = cell
    x = _label_width(labels) + pad + column * (width + pad)
    y = pad + row * (height + pad)
    return np.asarray(grid.convert("RGB").crop((x, y, x + width, y + height)))


def image_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None, pad: int = 2) -> Image.Image:
    """Images (uint8 [H, W, 3], all one size) in rows, with an optional label left of each row."""
    height, width = rows[0][0].shape[:2]
    label_width = _label_width(labels)
    columns = max(len(row) for row in rows)
    grid = Image.new(
        "RGB", (label_width + columns * (width + pad) + pad, len(rows) * (height + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * (height + pad)
        if labels:
            draw.text((4, y + height // 2 - 6), labels[r], fill="black", font=ImageFont.load_default())
        for c, image in enumerate(row):
            grid.paste(Image.fromarray(np.asarray(image, np.uint8)), (label_width + pad + c * (width + pad), y))
    return grid

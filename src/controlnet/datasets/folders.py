"""Training data: a folder of (condition, target, prompt) triples as a torch Dataset.

Two folder layouts are read, told apart by the file they hold:

- **fill50k** (the original ControlNet tutorial's, and what ``controlnet data`` writes):
  ``prompt.json``, one JSON object a line, ``{"source": "source/0.png", "target":
  "target/0.png", "prompt": "..."}``; the source is the condition image.
- **diffusers** (an image folder as `train_controlnet.py` reads it): ``metadata.jsonl``, one JSON
  object a line with the target image, the conditioning image and the caption in the columns
  ``image``, ``conditioning_image`` and ``text`` (other names can be given). As in Hugging Face's
  image folders, a line without an ``image`` column may name its image in ``file_name``.

Paths are relative to the folder (absolute paths are used as they are). Other fields of a line are
kept in `Record.extra` (the scenes task's ``scene`` metadata, for instance).

Each item is a dict: ``"hint"`` float32 [3, R, R] in [0, 1] (the condition), ``"image"`` float32
[3, R, R] in [-1, 1] (the target), ``"prompt"`` str and ``"index"`` int, R the resolution, as the
original tutorial's dataset scales them (there as HWC arrays). Images are read as RGB (grey, RGBA,
palette, 16-bit converted as `controlnet.imaging.images.load_image` does), scaled so the short side is R
and centre-cropped to R x R: area averaging when shrinking, Lanczos when enlarging (the original
apps' rule, with Pillow's kernels). Source and target are each brought to R x R on their own, so
they stay aligned whenever their aspect ratios match, whatever their sizes; when the aspect ratios
differ, each is centre-cropped from its own image and the two no longer align (a warning says so,
once per dataset).

Bad data: an image that is missing, empty, corrupt or not an image makes its sample *bad*. Reading
a bad sample warns (`DataWarning`, once per sample), records its index (`bad_indices`) and returns the next
good sample instead (index + 1, + 2, ..., wrapping around), so every read returns a sample, the
same one for the same data, and no special collate function is needed; the returned ``"index"``
says which sample it is. A bad sample is never read again by the same dataset object. Once at
least `min_checked` samples (or all, if fewer) have been read and more than `max_bad_fraction` of
those are bad, reading raises `DatasetError`: a folder that is mostly broken fails loudly, not
silently. With DataLoader worker processes, each worker holds its own copy of these counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..imaging.images import ImageError, load_image

FORMATS: tuple[str, ...] = ("fill50k", "diffusers")
PROMPT_FILE = "prompt.json"  # the fill50k layout
METADATA_FILE = "metadata.jsonl"  # the diffusers layout
_LISTINGS = {"fill50k": PROMPT_FILE, "diffusers": METADATA_FILE}
VAE_FACTOR = 8  # the VAE halves the size three times: the resolution must be a multiple of 8


class DatasetError(ValueError):
    """Training data that cannot be used: no dataset in a folder, a bad line, too many bad samples."""


class DataWarning(UserWarning):
    """A sample that was skipped (missing or unreadable image), or images that will not align."""


@dataclass(frozen=True)
class Record:
    """One sample as its folder lists it: image paths (joined to the folder), prompt, the line's other fields."""

    source: Path  # the condition image ("hint")
    target: Path  # the image to generate
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)


def detect_format(folder: str | os.PathLike[str]) -> str:
    """The layout of `folder`: fill50k (it holds prompt.json) or diffusers (metadata.jsonl); else DatasetError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    found = [name for name, file in _LISTINGS.items() if (folder / file).is_file()]
    if len(found) == 2:
        raise DatasetError(
            f"{folder} holds both {PROMPT_FILE} (fill50k layout) and {METADATA_FILE} (diffusers layout); "
            "say which to read (format='fill50k' or format='diffusers')"
        )
    if found:
        return found[0]
    # A common slip: pointing at the parent of the dataset (training/ instead of training/fill50k/).
    inside = sorted(p.parent.name for f in _LISTINGS.values() for p in folder.glob(f"*/{f}"))
    hint = f"; did you mean {folder / inside[0]}?" if inside else ""
    raise DatasetError(
        f"{folder}: no training data found: expected {PROMPT_FILE} (fill50k layout: JSON lines with "
        f"source, target, prompt) or {METADATA_FILE} (diffusers layout: JSON lines with image, "
        f"conditioning_image, text){hint}"
    )


def read_records(
    folder: str | os.PathLike[str],
    format: str | None = None,
    *,
    image_column: str = "image",
    conditioning_image_column: str = "conditioning_image",
    caption_column: str = "text",
) -> list[Record]:
    """The samples listed in `folder` (format detected unless given), checked line by line.

    DatasetError, naming the file and line, for a line that is not a JSON object, lacks a column or
    has a value of the wrong type; also for a listing with no samples. Images are not opened here."""
    folder = Path(folder)
    if format is None:
        format = detect_format(folder)
    elif format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    listing = folder / _LISTINGS[format]
    if format == "fill50k":
        columns = ("source", "target", "prompt")
    else:
        columns = (conditioning_image_column, image_column, caption_column)
        if len(set(columns)) < 3:
            raise DatasetError(f"the image, conditioning image and caption columns must differ, got {columns}")
    try:
        text = listing.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not an error
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise DatasetError(f"cannot read {listing}: {reason}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{listing}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if format == "diffusers" and image_column == "image" and "image" not in row and "file_name" in row:
            row["image"] = row.pop("file_name")  # Hugging Face image folders name the image file_name
        missing = [c for c in columns if c not in row]
        if missing:
            other_names = " (other column names can be given)" if format == "diffusers" else ""
            raise DatasetError(
                f"{where}: missing {', '.join(repr(c) for c in missing)}; "
                f"each line needs {', '.join(repr(c) for c in columns)}{other_names}"
            )
        for column in columns:
            if not isinstance(row[column], str):
                raise DatasetError(f"{where}: {column!r} must be a string, got {type(row[column]).__name__}")
        source, target, prompt = (row.pop(c) for c in columns)
        records.append(Record(folder / source, folder / target, prompt, row))
    if not records:
        raise DatasetError(f"{listing} lists no samples")
    return records


def square_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image scaled so its short side is `resolution`, centre-cropped to square.

    The crop is taken in the source image's own coordinates (a square of side min(H, W) at the
    centre) and resampled once: two images of the same aspect ratio map to the same picture
    whatever their sizes. Area averaging when shrinking, Lanczos when enlarging."""
    height, width = image.shape[:2]
    if (height, width) == (resolution, resolution):
        return image
    side = min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    resample = Image.Resampling.BOX if side >= resolution else Image.Resampling.LANCZOS
    box = (left, top, left + side, top + side)
    return np.asarray(Image.fromarray(image).resize((resolution, resolution), resample, box=box))


class ControlDataset(torch.utils.data.Dataset):
    """The samples of a fill50k or diffusers folder as training items (see the module docstring).

    >>> data = ControlDataset("training/fill50k", resolution=512)
    >>> item = data[0]   # {"hint": [3, 512, 512] in [0, 1], "image": [3, 512, 512] in [-1, 1], "prompt", "index"}
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        resolution: int = 512,
        *,
        format: str | None = None,
        image_column: str = "image",
        conditioning_image_column: str = "conditioning_image",
        caption_column: str = "text",
        max_bad_fraction: float = 0.05,
        min_checked: int = 20,
    ) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % VAE_FACTOR:
            raise DatasetError(
                f"resolution must be a positive multiple of {VAE_FACTOR} (the VAE's downsampling factor), "
                f"got {resolution!r}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise DatasetError(f"max_bad_fraction must be between 0 and 1, got {max_bad_fraction!r}")
        if min_checked < 1:
            raise DatasetError(f"min_checked must be at least 1, got {min_checked!r}")
        self.folder = Path(folder)
        self.format = format or detect_format(self.folder)
        self.records = read_records(
            self.folder,
            self.format,
            image_column=image_column,
            conditioning_image_column=conditioning_image_column,
            caption_column=caption_column,
        )
        self.resolution = resolution
        self.max_bad_fraction = max_bad_fraction
        self.min_checked = min_checked
        self._checked: set[int] = set()  # indices read so far, good or bad
        self._bad: set[int] = set()
        self._warned_aspect = False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                hint, image = self._load(i)
            except ImageError as error:
                self._bad.add(i)
                self._checked.add(i)
                warnings.warn(f"skipping sample {i} of {self.folder}: {error}", DataWarning, stacklevel=2)
                self._check_bad_fraction(str(error))
                continue
            self._checked.add(i)
            self._check_bad_fraction()
            return {
                "hint": torch.from_numpy(hint.transpose(2, 0, 1).copy()).float().div_(255.0),
                "image": torch.from_numpy(image.transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0),
                "prompt": self.records[i].prompt,
                "index": i,
            }
        raise DatasetError(f"{self.folder}: none of the {n} samples can be read")

    @property
    def bad_indices(self) -> list[int]:
        """Indices of the samples found bad so far, in order."""
        return sorted(self._bad)

    @property
    def bad_count(self) -> int:
        return len(self._bad)

    @property
    def checked_count(self) -> int:
        """How many distinct samples have been read so far (good or bad)."""
        return len(self._checked)

    def prompts(self) -> list[str]:
        """Every sample's prompt, in order (bad samples included: their prompts are known)."""
        return [record.prompt for record in self.records]

    def prompt(self, index: int) -> str:
        """The prompt of sample `index`, without reading its images."""
        return self.records[index].prompt

    def fingerprint(self) -> str:
        """A hash of the samples as listed and stored: the format, every record, and the size and
        modification time of every image file. Anything derived from the data (a cache of encoded
        latents, say) is stale when this changes. One stat per file, no image is read."""
        digest = hashlib.sha256(self.format.encode())
        for record in self.records:
            digest.update(json.dumps([str(record.source), str(record.target), record.prompt]).encode())
            for path in (record.source, record.target):
                try:
                    stat = path.stat()
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
                except OSError:
                    digest.update(b"missing")
        return digest.hexdigest()

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        record = self.records[i]
        source, target = load_image(record.source), load_image(record.target)
        if not self._warned_aspect and _aspect_differs(source, target):
            self._warned_aspect = True
            warnings.warn(
                f"sample {i} of {self.folder}: the source is {source.shape[1]}x{source.shape[0]} but the target "
                f"{target.shape[1]}x{target.shape[0]}; with different aspect ratios their centre crops do not "
                "align (said once per dataset)",
                DataWarning,
                stacklevel=3,
            )
        return square_crop(source, self.resolution), square_crop(target, self.resolution)

    def _check_bad_fraction(self, last_error: str | None = None) -> None:
        checked, bad = len(self._checked), len(self._bad)
        if checked < min(self.min_checked, len(self.records)) or bad <= self.max_bad_fraction * checked:
            return
        last = f"; the last: {last_error}" if last_error else ""
        raise DatasetError(
            f"{self.folder}: {bad} of the {checked} samples read so far are missing or unreadable "
            f"({bad / checked:.0%}), more than max_bad_fraction={self.max_bad_fraction:g} allows "
            f"(bad indices {_preview(self.bad_indices)}){last}"
        )


def load_dataset(folder: str | os.PathLike[str], resolution: int = 512, **options: Any) -> ControlDataset:
    """`ControlDataset(folder, resolution, **options)`: the training data in `folder`, either layout."""
    return ControlDataset(folder, resolution, **options)


def _aspect_differs(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two images' aspect ratios differ by more than rounding (1%)."""
    (ha, wa), (hb, wb) = a.shape[:2], b.shape[:2]
    return abs(wa * hb - wb * ha) > 0.01 * max(wa * hb, wb * ha)


def _preview(indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")

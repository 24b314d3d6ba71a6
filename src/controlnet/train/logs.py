"""What a run writes about itself (on the first process only): ``metrics.csv`` (step, loss,
learning rate, samples/s) and ``loss.png``; ``validation.csv``, the grids in ``validation/`` and
``validation.png``; TensorBoard when it is installed; and the progress line.

(Named ``logs``, not ``logging``: a module of that name would read as the standard library's.)
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..files import atomic_file


class Meter:
    """The mean loss since the last report, and the speed since the run (re)started."""

    def __init__(self, step: int, global_batch: int) -> None:
        self.started, self.first_step = time.perf_counter(), step
        self.global_batch = global_batch
        self.losses: list[float] = []

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def steps_per_s(self, step: int) -> float:
        elapsed = time.perf_counter() - self.started
        return (step - self.first_step) / elapsed if elapsed > 0 else 0.0

    def take_mean(self) -> float:
        """The mean of the losses added since the last call."""
        mean = sum(self.losses) / len(self.losses)
        self.losses.clear()
        return mean


class RunLog:
    """The logs of the run in ``out``; ``enabled`` on the first process only (the others write
    nothing); ``log``: where lines go; ``progress``: whether a progress line goes there too."""

    def __init__(self, out: Path, enabled: bool, log: Callable[[str], None], progress: bool) -> None:
        self.out, self.enabled, self.log, self.progress = out, enabled, log, progress
        self.metrics_path = out / "metrics.csv"
        self.validation_path = out / "validation.csv"
        self.tensorboard = _tensorboard(out, log) if enabled else None

    def restart(self, config_json: str) -> None:
        """A new run in the folder: its settings in config.json; the metrics of an earlier one go."""
        if self.enabled:
            with atomic_file(self.out / "config.json", "w", encoding="utf-8") as handle:
                handle.write(config_json + "\n")
            self.metrics_path.unlink(missing_ok=True)

    def resume(self, step: int) -> None:
        """A run resumed from ``step``: the steps after it are trained again, so logged once, later."""
        if self.enabled:
            for path in (self.metrics_path, self.validation_path):
                truncate_csv(path, step)

    def metrics(self, step: int, max_steps: int, meter: Meter, lr: float) -> None:
        """A row of metrics.csv (the mean loss since the last row), TensorBoard, the progress line."""
        mean, rate = meter.take_mean(), meter.steps_per_s(step)
        if not self.enabled:
            return
        samples = rate * meter.global_batch
        append_csv(
            self.metrics_path,
            {"step": step, "loss": f"{mean:.6f}", "lr": f"{lr:.3e}", "samples_per_s": f"{samples:.2f}"},
        )
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", mean, step)
            self.tensorboard.add_scalar("train/lr", lr, step)
        if self.progress:
            eta = (max_steps - step) / rate if rate > 0 else float("nan")
            self.log(
                f"step {step}/{max_steps}  loss {mean:.4f}  lr {lr:.2e}  "
                f"{rate:.2f} steps/s ({samples:.1f} samples/s)  ETA {duration(eta)}"
            )

    def validation(self, step: int, scores: dict[str, float], grid) -> None:
        """The grid ``validation/step-N.png``, a row of validation.csv, TensorBoard, the curves."""
        folder = self.out / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / f"step-{step:08d}.png") as handle:
            grid.save(handle, format="PNG")
        if self.tensorboard is not None:
            for name, value in scores.items():
                self.tensorboard.add_scalar(f"validation/{name}", value, step)
            self.tensorboard.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        append_csv(self.validation_path, {"step": step, **{k: f"{v:.4f}" for k, v in scores.items()}})
        self.draw_curves()
        self.log(f"validation at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def draw_curves(self) -> None:
        """loss.png (training loss) and validation.png (the validation scores) from the CSV logs."""
        from ..imaging.charts import line_chart

        losses = read_csv(self.metrics_path)
        if losses:
            points = [(float(r["step"]), float(r["loss"])) for r in losses]
            line_chart(self.out / "loss.png", {"training loss": points}, "training loss", "step", "loss", log_y=True)
        scores = read_csv(self.validation_path)
        if scores:
            names = [k for k in scores[0] if k != "step"]
            series = {name: [(float(r["step"]), float(r[name])) for r in scores if r.get(name)] for name in names}
            line_chart(self.out / "validation.png", series, "validation", "step", "score")


def _tensorboard(out: Path, log: Callable[[str], None]):
    """A TensorBoard writer in ``<out>/tensorboard`` when the tensorboard package is installed
    (``pip install tensorboard``); the CSV logs and PNG curves are written either way."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard is not installed: logging to metrics.csv and PNG curves only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def append_csv(path: Path, row: dict) -> None:
    """``row`` at the end of the CSV file ``path``, the header first when the file is new. (An
    appended log: a run killed mid-row leaves a half row, which ``read_csv``'s readers skip.)"""
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def truncate_csv(path: Path, last_step: int) -> None:
    """Keep the rows of the CSV log ``path`` up to ``last_step``; the file is replaced whole, so a
    run killed meanwhile keeps the old log rather than half of it."""
    rows = read_csv(path)
    kept = [r for r in rows if _row_step(r) is not None and _row_step(r) <= last_step]
    if len(kept) == len(rows):
        return  # nothing after the checkpoint: the log stays as it is
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(kept)
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text.getvalue())


def _row_step(row: dict) -> int | None:
    """A log row's step, or None for a row a killed run left half-written."""
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def duration(seconds: float) -> str:
    """``H:MM:SS``, or ``?`` for an unknown (NaN) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

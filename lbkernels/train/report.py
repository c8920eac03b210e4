"""What a run shows and writes: the progress bar or epoch lines, ``metrics.csv``,
``config.yaml`` and ``curves.png``. Only the first process reports."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from .plots import plot_curves

COLUMNS = ("epoch", "step", "updates", "lr", "batch_size", "noise_scale", "train_loss",
           "train_acc", "test_loss", "test_acc", "wall_time", "phase", "status")
# status: empty, or what went wrong in the epoch (steps skipped for a non-finite loss,
# training accuracy at chance, the run stopped).


class Report:
    """The run directory's files and the console output of one process.

    On processes other than the first every method does nothing. ``quiet`` leaves only
    the final line; without a terminal, one line per epoch replaces the progress bar.
    """

    def __init__(self, out_dir: Path, *, active: bool, quiet: bool):
        self.dir = out_dir
        self.active = active
        self.quiet = quiet
        self.bar_wanted = active and not quiet and sys.stdout.isatty()
        self._bar: tqdm | None = None

    # -- files --------------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        if self.active:
            (self.dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.csv with ``rows`` (a resumed run drops rows of undone epochs)."""
        if self.active:
            with open(self.dir / "metrics.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS)
                writer.writeheader()
                writer.writerows(_csv_row(r) for r in rows)

    def append_metrics(self, row: dict) -> None:
        if self.active:
            with open(self.dir / "metrics.csv", "a", newline="") as f:
                csv.DictWriter(f, COLUMNS).writerow(_csv_row(row))

    def plot(self, rows: list[dict], title: str) -> None:
        if self.active and rows:
            plot_curves(rows, self.dir / "curves.png", title)

    # -- console --------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if self.bar_wanted:
            self._bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                             unit="step", leave=False, dynamic_ncols=True)

    def step(self, loss: float, acc: float, samples_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} acc {100 * acc:.1f}% {samples_per_s:,.0f} samples/s",
                                      refresh=False)
            self._bar.update()

    def end_epoch(self, row: dict, epochs: int, samples_per_s: float) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.active and not self.quiet:
            test = ("" if row["test_acc"] is None else
                    f"  test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%")
            print(f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} "
                  f"acc {100 * row['train_acc']:.2f}%{test}  lr {row['lr']:.4g}  "
                  f"{samples_per_s:,.0f} samples/s  {row['wall_time']:.1f}s", flush=True)

    def message(self, text: str) -> None:
        """A line that must be seen even under --quiet (warnings, skipped steps)."""
        if self.active:
            (tqdm.write if self._bar is not None else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _csv_row(row: dict) -> dict:
    # A column the row lacks (a run resumed from a checkpoint written before the column
    # existed) is left empty, as a missing value is.
    def cell(value: Any) -> Any:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value

    return {k: cell(row.get(k)) for k in COLUMNS}

"""What the experiments share: their options, the training command under torchrun, the
run directories' metrics, the mean ± sd [min, max] of a figure over seeds, the plots and
the closing report (machine, commands, table)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def parser(module: str, doc: str, *, per: str, out_dir: str, plot: str,
           out_dir_note: str = "") -> argparse.ArgumentParser:
    """``python -m bench.experiments.<module>``'s options: --seeds (runs of each ``per``),
    --out-dir, --plot."""
    p = argparse.ArgumentParser(prog=f"python -m bench.experiments.{module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help=f"seeds per {per} (0, 1, ...)")
    p.add_argument("--out-dir", default=out_dir, help="parent of the run directories" + out_dir_note)
    p.add_argument("--plot", default=plot, help="where the figure goes")
    return p


def torchrun(argv: list[str], nproc: int, timeout: float | None = None,
             **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc -m lbkernels.train argv``, one thread
    per process (the processes share the cores), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "lbkernels.train", *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.csv``: numbers as floats, words (the phase) as they
    are, empty cells as None."""
    def value(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v or None

    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """``mean ± sd [min, max]`` of ``values`` (sd 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)} "
            f"[{format(min(values), fmt)}, {format(max(values), fmt)}]")


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files: imported only by the plots (1.5 s to import
    after torch; the tests read these modules' constants without plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: Path, *, ncols: int = 2, figsize: tuple[float, float] = (12, 4.5), dpi: int = 100,
           layout: str | None = "constrained") -> Iterator[tuple[Any, Any]]:
    """A figure of ``ncols`` axes, saved to ``path`` when the block ends."""
    plt = pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=figsize, layout=layout)
    try:
        yield fig, axes
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def band(ax: Any, x: Sequence[float], curves: list[list[float]], style: str, color: str, label: str) -> None:
    """The mean of ``curves`` (one per seed, on the same ``x``) as a line, their min-max
    as a band around it."""
    columns = list(zip(*curves))
    ax.plot(x, [statistics.mean(c) for c in columns], style, color=color, markersize=3,
            label=f"{label} (mean of {len(curves)})")
    ax.fill_between(x, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.2,
                    linewidth=0)


def report(started: float, table: str, plot: str, commands: list[str], setting: str = "") -> None:
    """The closing lines: torch, Python, the machine, ``setting``, the seconds since
    ``started``; the commands of the runs; the table; where the plot went."""
    print(f"\ntorch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}, "
          f"{os.cpu_count()} cores{setting}; {time.perf_counter() - started:.0f} s in all")
    for line in commands:
        print(line)
    print()
    print(table)
    print(f"\nplot: {plot}")

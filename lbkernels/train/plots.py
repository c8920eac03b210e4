"""``curves.png``: the learning curves and schedules of a run, from its metrics rows."""

from __future__ import annotations

import math
from pathlib import Path


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy and loss against epochs and against updates; the learning rate, the batch
    size and the SGD noise scale."""
    # Imported only to draw: matplotlib.pyplot takes 1.5 s to import (after torch, on a
    # loaded 2-core machine), which --help, option errors and the tests need not pay.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    def series(key: str, x: str = "epoch") -> tuple[list, list]:
        # Rows of older runs may lack a column: such points are missing, not an error.
        pts = [(r[x], r.get(key)) for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for col, x in enumerate(("epoch", "updates")):
        acc, loss = axes[0][col], axes[1][col]
        for split, style in (("train", "-"), ("test", "o-")):
            acc.plot(*series(f"{split}_acc", x), style, label=split, markersize=3)
            loss.plot(*series(f"{split}_loss", x), style, label=split, markersize=3)
        acc.set(xlabel=x, ylabel="accuracy", ylim=(0, 1))
        loss.set(xlabel=x, ylabel="loss", yscale="log")
        for ax in (acc, loss):
            ax.grid(alpha=0.3)
            ax.legend()
    axes[0][2].plot(*series("lr", "updates"), "-")
    axes[0][2].set(xlabel="updates", ylabel="learning rate (end of epoch)")
    batch = axes[1][2]
    batch.step(*series("batch_size"), where="post", color="C0")
    batch.set(xlabel="epoch", ylabel="global batch size")
    batch.yaxis.label.set_color("C0")
    # The noise scale on its own axis: it spans decades where the batch spans a few steps.
    epochs, noise = series("noise_scale")
    if any(g > 0 for g in noise):
        scale = batch.twinx()
        scale.step(epochs, noise, where="post", color="C1")
        scale.set(ylabel="noise scale lr/(1-m)·(N/B-1)", yscale="log")
        scale.yaxis.label.set_color("C1")
    for ax in (axes[0][2], batch):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)

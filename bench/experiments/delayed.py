"""Delayed gradients at the synchronous learning rate, and shifted momentum at the delay-scaled one.

``python -m bench.experiments.delayed [--seeds 0 1 2] [--plot docs/delayed.png]``

Simulated asynchronous SGD (``--method async-sim``) on digits with the MLP, batch 32,
``tau = 8`` (9 workers in a round robin), momentum 0.9, one epoch of warm-up then
polynomial decay. Runs, each over the seeds:

- ``sync``: ``tau = 0`` at the synchronous rate ``lr0`` (the reference);
- ``standard``: standard momentum, ``tau = 8``, at ``lr0``;
- ``shifted-scaled``: shifted momentum, ``tau = 8``, at the stability rule's rate
  ``lr0 * sin(pi / 34)``, about ``0.092 * lr0``;
- ``shifted-lr0``: shifted momentum, ``tau = 8``, at ``lr0``.

The scaled rate is 11 times smaller, so ``shifted-scaled`` also runs with twice the
epochs; ``sync`` does as well, so that the comparison at equal budget stays available.
A run whose loss stays non-finite stops (``--max-bad-steps``) and is reported as diverged.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lbkernels.schedules import delay_scaled_lr
from lbkernels.train import checkpoint
from lbkernels.train.__main__ import main as train

from . import runs as common

LR0 = 0.1
TAU = 8
COMMON = ["--data", "digits", "--model", "mlp", "--batch-size", "32", "--base-batch-size", "32",
          "--lr", str(LR0), "--momentum", "0.9", "--warmup-epochs", "1", "--method", "async-sim",
          "--checkpoint-every", "0", "--quiet"]  # the runs never resume: one checkpoint, at the end
# name -> (flags, epochs)
RUNS = {
    "sync": (["--delay", "0", "--momentum-kind", "standard"], 20),
    "sync-40": (["--delay", "0", "--momentum-kind", "standard"], 40),
    "standard": (["--delay", str(TAU), "--momentum-kind", "standard", "--lr-rule", "none"], 20),
    "shifted-lr0": (["--delay", str(TAU), "--momentum-kind", "shifted", "--lr-rule", "none"], 20),
    "shifted-scaled": (["--delay", str(TAU), "--momentum-kind", "shifted", "--lr-rule", "stability"], 20),
    "shifted-scaled-40": (["--delay", str(TAU), "--momentum-kind", "shifted", "--lr-rule", "stability"], 40),
}


def run_one(name: str, seed: int, root: Path) -> dict:
    flags, epochs = RUNS[name]
    out = root / f"{name}-{seed}"
    argv = COMMON + flags + ["--epochs", str(epochs), "--seed", str(seed), "--out-dir", str(out)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = train(argv)
    history = checkpoint.load(out / "checkpoint.pt")["history"]
    return {"diverged": status != 0, "epochs": epochs,
            "acc": [row["test_acc"] for row in history],
            "final": history[-1]["test_acc"] if status == 0 else None}


def _summary(results: list[dict]) -> str:
    finals = [r["final"] for r in results if r["final"] is not None]
    diverged = sum(r["diverged"] for r in results)
    if not finals:
        at = ", ".join(str(len(r["acc"]) + 1) for r in results)
        return f"diverged ({diverged}/{len(results)}, in epoch {at}) | - | -"
    mean = 100 * statistics.mean(finals)
    spread = 100 * (max(finals) - min(finals))
    text = f"{mean:.2f} | {100 * min(finals):.2f}-{100 * max(finals):.2f} (spread {spread:.2f})"
    return text + (f" | {diverged}/{len(results)} diverged" if diverged else " | -")


def plot(all_results: dict[str, list[dict]], path: Path) -> None:
    with common.figure(path, ncols=1, figsize=(7, 4.2), dpi=120, layout=None) as (fig, ax):
        for name, results in all_results.items():
            longest = max(len(r["acc"]) for r in results)
            epochs, mean, lo, hi = [], [], [], []
            for e in range(longest):
                vals = [r["acc"][e] for r in results if len(r["acc"]) > e]
                epochs.append(e + 1)
                mean.append(100 * statistics.mean(vals))
                lo.append(100 * min(vals))
                hi.append(100 * max(vals))
            label = f"{name}" + (" (diverged)" if all(r["diverged"] for r in results) else "")
            (line,) = ax.plot(epochs, mean, label=label, marker="x" if len(epochs) < 3 else None)
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"async-sim on digits, tau = {TAU}, lr0 = {LR0} (mean and min-max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.delayed",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--plot", type=Path, default=Path("docs/delayed.png"))
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    all_results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            all_results[name] = [run_one(name, seed, Path(tmp)) for seed in args.seeds]
            print(f"{name}: {_summary(all_results[name])}", flush=True)
    plot(all_results, args.plot)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
          f"seeds {args.seeds}; {time.perf_counter() - t0:.0f} s\n")
    print("| run | momentum | tau | peak lr | epochs | final test acc. % (mean) | min-max | diverged |")
    print("|---|---|---|---|---|---|---|---|")
    for name, results in all_results.items():
        flags, epochs = RUNS[name]
        kind = flags[flags.index("--momentum-kind") + 1]
        tau = int(flags[flags.index("--delay") + 1])
        rule = flags[flags.index("--lr-rule") + 1] if "--lr-rule" in flags else "stability"
        lr = LR0 if rule == "none" else delay_scaled_lr(LR0, tau, rule)
        print(f"| {name} | {kind} | {tau} | {lr:.4g} | {epochs} | {_summary(results)} |")
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()

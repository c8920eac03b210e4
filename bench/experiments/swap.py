"""SWAP against large-batch and small-batch training on digits, four processes:
``python -m bench.experiments.swap``.

Every run is ``torchrun --nproc_per_node=4`` of the training command (gloo on the CPU),
the same small BN CNN, momentum SGD (Nesterov), and the same budget of epochs:

- ``large-batch``: data-parallel at the global batch ``B1`` for all the epochs (warm-up,
  then polynomial decay of the linearly scaled rate);
- ``small-batch``: data-parallel at the global batch ``b2`` (``b2 / 4`` per process);
- ``swap``: phase 1 as ``large-batch`` (its schedule spans the epochs left for it, and
  it ends early once an epoch's training accuracy reaches the stop accuracy), phase 2:
  each process alone at ``b2`` for the remaining epochs (its own data order, fresh
  momentum, a linearly decaying rate), phase 3: the average of the four models with
  recomputed BN statistics.

Each runs with several seeds; the script prints test accuracy (mean, standard
deviation, range), parameter updates and training seconds as a Markdown table, each
phase-2 model's test accuracy against the averaged model's, and whether SWAP matched
small-batch accuracy (within 0.5 points) in at most 1.5 times large-batch's time; it
plots test accuracy against epochs and the per-seed workers against their average.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from . import runs as common

WORKERS = 4
EPOCHS = 12  # the budget of every variant
SWAP_EPOCHS = 3  # of which SWAP's phase 2 takes these
B1, B2 = 480, 32  # digits has 1437 training samples: 3 large batches or 45 small ones per epoch
COMMON = ["--data", "digits", "--model", "cnn", "--width", "0.5", "--method", "sgd",
          "--momentum", "0.9", "--weight-decay", "5e-4", "--base-batch-size", str(B2),
          "--decay", "poly", "--poly-power", "2",  # pinned: --method sgd's recipe decays in steps
          "--checkpoint-every", "0", "--quiet", "--dist-timeout", "120"]
# The small batch's rate, in the small-batch runs and SWAP's phase 2 alike (picked on seed
# 0 from 0.02, 0.05, 0.1, 0.2 for SWAP; small-batch reaches the same accuracy at 0.05).
SMALL_LR = 0.1
LARGE = ["--batch-size", str(B1), "--lr", "0.05", "--warmup-epochs", "2"]
VARIANTS = {
    "large-batch": LARGE + ["--epochs", str(EPOCHS)],
    "small-batch": ["--batch-size", str(B2), "--lr", str(SMALL_LR), "--warmup-epochs", "1", "--epochs", str(EPOCHS)],
    "swap": LARGE + ["--method", "swap", "--epochs", str(EPOCHS - SWAP_EPOCHS),
                     "--swap-epochs", str(SWAP_EPOCHS), "--swap-batch-size", str(B2),
                     "--swap-lr", str(SMALL_LR), "--swap-stop-accuracy", "0.98"],
}


def run_one(name: str, seed: int, out_dir: Path) -> dict:
    run_dir = out_dir / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory holding a checkpoint is never reused
    argv = [*COMMON, *VARIANTS[name], "--seed", str(seed), "--out-dir", str(run_dir)]
    started = time.perf_counter()
    proc = common.torchrun(argv, WORKERS, timeout=600, MALLOC_MMAP_THRESHOLD_="65536")
    if proc.returncode != 0:
        raise SystemExit(f"{name}, seed {seed}: the training command failed:\n{proc.stderr[-3000:]}")
    rows = common.read_metrics(run_dir)
    result = {"rows": rows, "test_acc": rows[-1]["test_acc"], "updates": int(rows[-1]["updates"]),
              "train_s": rows[-1]["wall_time"], "process_s": time.perf_counter() - started}
    if name == "swap":
        result["swap"] = json.loads((run_dir / "swap.json").read_text())
    return result


def run_all(seeds: list[int], out_dir: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    # Seed by seed, the variants in turn: drifts of a shared machine hit all of them alike.
    for seed in seeds:
        for name in VARIANTS:
            runs[name].append(run_one(name, seed, out_dir))
            r = runs[name][-1]
            print(f"  {name} seed {seed}: {100 * r['test_acc']:.2f}%, {r['updates']} updates, "
                  f"{r['train_s']:.1f} s", flush=True)
    return runs


def summarise(runs: dict[str, list[dict]]) -> str:
    lines = ["| variant | test accuracy (%): mean ± sd [min, max] | updates per process | "
             "training time (s), median |", "|---|---|---|---|"]
    for name, seeds in runs.items():
        ups = sorted({r["updates"] for r in seeds})
        lines.append(f"| {name} | {common.spread([100 * r['test_acc'] for r in seeds])} | "
                     f"{'/'.join(map(str, ups))} | {statistics.median(r['train_s'] for r in seeds):.1f} |")
    lines += ["", "| seed | switch epoch | phase-2 workers' test accuracy (%) | their mean | averaged | "
              "averaged - mean |", "|---|---|---|---|---|---|"]
    gains = []
    for i, r in enumerate(runs["swap"]):
        s = r["swap"]
        mean, avg = 100 * s["worker_mean_test_acc"], 100 * s["averaged_test_acc"]
        gains.append(avg - mean)
        lines.append(f"| {i} | {s['switch_epoch']} | {', '.join(f'{100 * a:.2f}' for a in s['worker_test_acc'])} "
                     f"| {mean:.2f} | {avg:.2f} | {avg - mean:+.2f} |")
    acc = {n: statistics.mean(100 * r["test_acc"] for r in seeds) for n, seeds in runs.items()}
    time_of = {n: statistics.median(r["train_s"] for r in seeds) for n, seeds in runs.items()}
    matched = acc["swap"] >= acc["small-batch"] - 0.5
    cheap = time_of["swap"] <= 1.5 * time_of["large-batch"]
    lines += ["", f"The averaged model beats the mean of its phase-2 workers in {sum(g > 0 for g in gains)} "
              f"of {len(gains)} seeds (mean gain {statistics.mean(gains):+.2f} points).",
              f"SWAP {acc['swap']:.2f}% vs small-batch {acc['small-batch']:.2f}% vs large-batch "
              f"{acc['large-batch']:.2f}% (means); training time SWAP {time_of['swap']:.1f} s, large-batch "
              f"{time_of['large-batch']:.1f} s, small-batch {time_of['small-batch']:.1f} s. Small-batch "
              f"accuracy (within 0.5 points) {'matched' if matched else 'NOT matched'}; at most 1.5x "
              f"large-batch time: {'yes' if cheap else 'NO'}."]
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    with common.figure(path) as (fig, axes):
        _plot_runs(axes[0], runs)
        _plot_workers(axes[1], runs)
        fig.suptitle(f"digits, BN CNN, {WORKERS} gloo processes, {EPOCHS} epochs: "
                     f"batch {B1} vs {B2} vs SWAP ({B1} then {B2} per worker)")


def _plot_runs(ax, runs: dict[str, list[dict]]) -> None:
    for i, (name, seeds) in enumerate(runs.items()):
        # SWAP's switch epoch may differ between seeds: each seed is its own line.
        for j, r in enumerate(seeds):
            rows = r["rows"]
            ax.plot([row["epoch"] for row in rows], [100 * row["test_acc"] for row in rows], "o-",
                    color=f"C{i}", markersize=2.5, alpha=0.7, label=name if j == 0 else None)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(80, 100),
           title="test accuracy (SWAP: worker 0 in phase 2, the average last)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def _plot_workers(ax, runs: dict[str, list[dict]]) -> None:
    for j, r in enumerate(runs["swap"]):
        s = r["swap"]
        ax.scatter([j] * len(s["worker_test_acc"]), [100 * a for a in s["worker_test_acc"]], color="C2",
                   marker="o", label="phase-2 worker" if j == 0 else None)
        ax.scatter([j], [100 * s["averaged_test_acc"]], color="k", marker="*", s=120,
                   label="averaged (SWAP)" if j == 0 else None)
    for i, name in ((0, "large-batch"), (1, "small-batch")):
        mean = statistics.mean(100 * r["test_acc"] for r in runs[name])
        ax.axhline(mean, color=f"C{i}", linestyle="--", label=f"{name} (mean)")
    ax.set(xlabel="seed", ylabel="test accuracy (%)", xticks=range(len(runs["swap"])),
           title="SWAP: each phase-2 worker vs their average")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def main() -> None:
    p = common.parser("swap", __doc__, per="variant", out_dir="runs/swap", plot="docs/swap.png")
    args = p.parse_args()

    started = time.perf_counter()
    runs = run_all(list(range(args.seeds)), Path(args.out_dir))
    table = summarise(runs)
    plot(runs, Path(args.plot))
    common.report(started, table, args.plot,
                  [f"{name}: torchrun --nproc_per_node={WORKERS} -m lbkernels.train {' '.join(COMMON + flags)} "
                   f"--seed SEED" for name, flags in VARIANTS.items()],
                  setting=f", {WORKERS} processes")


if __name__ == "__main__":
    main()

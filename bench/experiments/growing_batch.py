"""Grow the batch instead of decaying the learning rate, on digits:
``python -m bench.experiments.growing_batch``.

Three schedules of ``--method growing-batch`` with the same epochs, milestones and
5-fold fall of the noise scale at each milestone (Smith, Kindermans, Le 2018, figure 2
on a small scale): "decaying LR" divides the learning rate by 5, "increasing batch"
multiplies the batch by 5 (up to a cap, after which the rate decays), "hybrid" grows
the batch once and then decays the rate. Each runs with several seeds; the script prints
final test accuracy (mean, standard deviation, range), parameter updates and wall time
as a Markdown table, says whether the accuracies agree within 1 point while growing the
batch takes at least 2x fewer updates, and plots test accuracy against epochs and
against updates.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from lbkernels.train.__main__ import main as train

from . import runs as common

SCHEDULES = {"decaying LR": "decay-lr", "hybrid": "hybrid", "increasing batch": "increase"}

# A base batch small enough that growing it matters (digits has 1437 training samples):
# 24 -> 120 -> 360 (capped at N/4; the rate takes the rest of the last 5-fold fall).
# A third of the run at each noise scale.
RECIPE = [
    "--data", "digits", "--model", "cnn", "--width", "0.5",
    "--method", "growing-batch", "--epochs", "30",
    "--batch-size", "24", "--base-batch-size", "24", "--lr", "0.05", "--momentum", "0.9",
    "--weight-decay", "5e-4", "--warmup-epochs", "1",
    "--decay", "step", "--decay-epochs", "10", "20", "--decay-gamma", "0.2", "--max-batch", "360",
    "--checkpoint-every", "0", "--quiet",
]


def command(schedule: str, seed: int, out_dir: Path) -> list[str]:
    return RECIPE + ["--batch-schedule", schedule, "--seed", str(seed), "--out-dir", str(out_dir)]


def run_all(seeds: list[int], out_dir: Path) -> dict[str, list[list[dict]]]:
    runs: dict[str, list[list[dict]]] = {name: [] for name in SCHEDULES}
    # Seed by seed, the schedules in turn: drifts of a shared machine hit all of them alike.
    for seed in seeds:
        for name, schedule in SCHEDULES.items():
            run_dir = out_dir / f"{schedule}-seed{seed}"
            # A run directory holding a checkpoint is never overwritten: start afresh.
            shutil.rmtree(run_dir, ignore_errors=True)
            status = train(command(schedule, seed, run_dir))
            if status != 0:
                raise SystemExit(f"{name}, seed {seed}: the training command failed ({status})")
            runs[name].append(common.read_metrics(run_dir))
    return runs


def summarise(runs: dict[str, list[list[dict]]]) -> tuple[str, bool]:
    """The Markdown table and whether the acceptance criterion holds."""
    lines = ["| schedule | final test accuracy (%): mean ± sd [min, max] | updates | wall time (s), median |",
             "|---|---|---|---|"]
    means, updates = {}, {}
    for name, seeds in runs.items():
        accs = [100 * rows[-1]["test_acc"] for rows in seeds]
        ups = sorted({int(rows[-1]["updates"]) for rows in seeds})
        # The median: the first run of a process also pays one-off start-up costs.
        wall = statistics.median(rows[-1]["wall_time"] for rows in seeds)
        means[name], updates[name] = statistics.mean(accs), ups[0]
        lines.append(f"| {name} | {common.spread(accs)} | {'/'.join(map(str, ups))} | {wall:.1f} |")
    spread = max(means.values()) - min(means.values())
    ratio = updates["decaying LR"] / updates["increasing batch"]
    met = spread <= 1.0 and ratio >= 2.0
    lines.append("")
    lines.append(f"Mean final accuracies within {spread:.2f} points of each other (criterion: <= 1); "
                 f"increasing batch takes {ratio:.2f}x fewer updates than decaying LR "
                 f"(criterion: >= 2): {'met' if met else 'NOT met'}.")
    return "\n".join(lines), met


def plot(runs: dict[str, list[list[dict]]], path: Path) -> None:
    with common.figure(path) as (fig, axes):
        for i, (name, seeds) in enumerate(runs.items()):
            # Every seed of a schedule takes the same updates per epoch: the curves share x.
            accs = [[100 * r["test_acc"] for r in rows] for rows in seeds]
            for ax, key in ((axes[0], "epoch"), (axes[1], "updates")):
                common.band(ax, [r[key] for r in seeds[0]], accs, "o-", f"C{i}", name)
        for ax, label in ((axes[0], "epoch"), (axes[1], "parameter updates")):
            ax.set(xlabel=label, ylabel="test accuracy (%)", ylim=(90, 100))
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
        fig.suptitle("digits, CNN: decaying the learning rate vs growing the batch (band: min-max over seeds)")


def main() -> None:
    p = common.parser("growing_batch", __doc__, per="schedule", out_dir="runs/growing_batch",
                      plot="docs/growing_batch.png")
    args = p.parse_args()

    started = time.perf_counter()
    runs = run_all(list(range(args.seeds)), Path(args.out_dir))
    table, _ = summarise(runs)
    plot(runs, Path(args.plot))
    common.report(started, table, args.plot,
                  [f"recipe: python -m lbkernels.train {' '.join(RECIPE)} --batch-schedule SCHEDULE --seed SEED"])


if __name__ == "__main__":
    main()

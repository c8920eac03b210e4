"""Extrapolated SGD against Nesterov mini-batch SGD on digits:
``python -m bench.experiments.extrap``.

Lin, Kong, Stich, Jaggi (ICML 2020) claim that extrapolating from each worker's past
local gradient helps large-batch *optimisation*: after the same epochs, extrap-SGD
reaches a lower training loss than mini-batch SGD with Nesterov momentum, and combined
with post-local SGD after the first decay it also generalises well. On a small scale:
the global batch is a quarter of the training set (360 of 1437 samples, 4 steps per
epoch), two processes (K = 2, gloo) so that each has its own local gradient, the same
learning-rate schedule, epochs and seeds for every method, at two peak learning rates
(the benefit of extrapolation depends on the rate). The loop's training loss is the
mean loss of the batches as they were trained on, i.e. at the extrapolated point for
extrap-SGD; the final training loss is also measured at the saved weights (the anchors)
over the whole training set with BatchNorm in evaluation mode, the same for every
method. The script prints the training loss before the first decay and at the end, the
final test accuracy (mean, standard deviation, range over seeds) and wall time as a
Markdown table, and plots the training loss and test accuracy per epoch.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from lbkernels.train import checkpoint
from lbkernels.train.__main__ import main as train
from lbkernels.train.cli import build_parser, parse_args
from lbkernels.train.config import resolved
from lbkernels.train.data import DATASETS
from lbkernels.train.models import build_model

from . import runs as common

SGD = ["--method", "sgd", "--nesterov"]
# gamma = lr / K, pinned: --method extrap's recipe halves it for runs in one process.
EXTRAP = ["--method", "extrap", "--extrap-scale", "1"]
POSTLOCAL = ["--method", "extrap-postlocal", "--extrap-scale", "1", "--local-steps", "4"]
# (name, flags, peak learning rate): at lr 1 (the best of 0.4, 1, 2, 4 for Nesterov SGD's
# final training loss on seed 0) and at lr 2.
CONFIGS = [
    ("Nesterov SGD, lr 1", SGD, 1.0),
    ("extrap-SGD, lr 1", EXTRAP, 1.0),
    ("Nesterov SGD, lr 2", SGD, 2.0),
    ("extrap-SGD, lr 2", EXTRAP, 2.0),
    ("extrap-SGD + post-local SGD (H=4), lr 2", POSTLOCAL, 2.0),
]

DECAY_EPOCHS = (15, 23)  # 50% and 75% of the run, as in the paper
RECIPE = [
    "--data", "digits", "--model", "cnn", "--width", "0.5", "--epochs", "30",
    "--batch-size", "360", "--base-batch-size", "360", "--momentum", "0.9",
    "--weight-decay", "5e-4", "--warmup-epochs", "3",
    "--decay", "step", "--decay-epochs", *map(str, DECAY_EPOCHS), "--decay-gamma", "0.1",
    "--checkpoint-every", "0", "--quiet",
]


def command(method: list[str], lr: float, seed: int, out_dir: Path) -> list[str]:
    return RECIPE + method + ["--lr", str(lr), "--seed", str(seed), "--out-dir", str(out_dir)]


def finished(run_dir: Path, argv: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``argv`` (read, not rerun)."""
    if not (run_dir / "checkpoint.pt").exists() or not (run_dir / "config.yaml").exists():
        return False
    want = resolved(parse_args(argv)[0])
    have = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = common.read_metrics(run_dir)
    return have == want and len(rows) == want["epochs"]


@torch.no_grad()
def saved_train_loss(run_dir: Path) -> float:
    """Mean training-set loss of the run's saved weights (extrap: the anchors), BatchNorm
    in evaluation mode with the first process's statistics."""
    args = build_parser().parse_args(RECIPE + ["--lr", "1"])
    data = DATASETS[args.data](args)
    model = build_model(args.model, data.input_shape, data.num_classes, args.width)
    model.load_state_dict(checkpoint.load(run_dir / "checkpoint.pt")["model"])
    model.eval()
    out = model(data.normalise(data.train_inputs))
    return torch.nn.functional.cross_entropy(out, data.train_labels).item()


def run_one(argv: list[str], nproc: int) -> int:
    if nproc == 1:
        return train(argv)
    proc = common.torchrun(argv, nproc)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode


def run_all(seeds: list[int], out_dir: Path, nproc: int) -> dict[str, list[list[dict]]]:
    runs: dict[str, list[list[dict]]] = {name: [] for name, _, _ in CONFIGS}
    # Seed by seed, the methods in turn: drifts of a shared machine hit all of them alike.
    for seed in seeds:
        for name, flags, lr in CONFIGS:
            run_dir = out_dir / f"{flags[1]}-lr{lr:g}-seed{seed}"
            argv = command(flags, lr, seed, run_dir)
            if not finished(run_dir, argv):
                shutil.rmtree(run_dir, ignore_errors=True)  # a run directory is never overwritten
                if run_one(argv, nproc) != 0:
                    raise SystemExit(f"{name}, seed {seed}: the training command failed")
            rows = common.read_metrics(run_dir)
            rows[-1]["saved_train_loss"] = saved_train_loss(run_dir)
            runs[name].append(rows)
            print(f"  {name}, seed {seed}: train loss {rows[-1]['train_loss']:.4f} "
                  f"(saved weights {rows[-1]['saved_train_loss']:.4f}), "
                  f"test accuracy {100 * rows[-1]['test_acc']:.2f}%", flush=True)
    return runs


def summarise(runs: dict[str, list[list[dict]]]) -> str:
    first = DECAY_EPOCHS[0]
    lines = [f"| method | training loss, epoch {first} (before the first decay) | final training loss "
             f"| final training loss of the saved weights | final test accuracy (%) "
             f"| wall time (s), median |",
             "|---|---|---|---|---|---|"]
    means = {}
    for name, seeds in runs.items():
        at_decay = [rows[first - 1]["train_loss"] for rows in seeds]
        final = [rows[-1]["train_loss"] for rows in seeds]
        saved = [rows[-1]["saved_train_loss"] for rows in seeds]
        accs = [100 * rows[-1]["test_acc"] for rows in seeds]
        wall = statistics.median(rows[-1]["wall_time"] for rows in seeds)
        means[name] = [statistics.mean(v) for v in (at_decay, final, saved)]
        lines.append(f"| {name} | {common.spread(at_decay, '.4f')} | {common.spread(final, '.4f')} "
                     f"| {common.spread(saved, '.4f')} | {common.spread(accs, '.2f')} | {wall:.1f} |")
    lines.append("")
    for lr in sorted({lr for _, _, lr in CONFIGS}):
        sgd, ext = means[f"Nesterov SGD, lr {lr:g}"], means[f"extrap-SGD, lr {lr:g}"]
        lines.append(f"lr {lr:g}: extrap-SGD / Nesterov SGD mean training loss {ext[0] / sgd[0]:.2f}x at "
                     f"epoch {first}, {ext[1] / sgd[1]:.2f}x at the end, {ext[2] / sgd[2]:.2f}x for the "
                     f"saved weights (below 1: extrap-SGD optimises better).")
    return "\n".join(lines)


def plot(runs: dict[str, list[list[dict]]], path: Path, nproc: int) -> None:
    colors = {"sgd": "C0", "extrap": "C1", "extrap-postlocal": "C2"}
    with common.figure(path) as (fig, axes):
        for (name, flags, lr), seeds in zip(CONFIGS, runs.values()):
            epochs = [r["epoch"] for r in seeds[0]]
            for ax, key, scale in ((axes[0], "train_loss", 1), (axes[1], "test_acc", 100)):
                common.band(ax, epochs, [[scale * r[key] for r in rows] for rows in seeds],
                            "o-" if lr == 2.0 else "s--", colors[flags[1]], name)
        axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log")
        axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(80, 100))
        for ax in axes:
            for e in DECAY_EPOCHS:
                ax.axvline(e, color="grey", linewidth=0.8, linestyle=":")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right" if ax is axes[0] else "lower right", fontsize=8)
        fig.suptitle(f"digits, CNN, global batch 360 (N/4) on {nproc} processes: extrap-SGD vs Nesterov "
                     f"SGD (band: min-max over seeds; dotted: LR decays)")


def main() -> None:
    p = common.parser("extrap", __doc__, per="method", out_dir="runs/extrap", plot="docs/extrap.png",
                      out_dir_note=" (finished runs of the same options are read, not rerun)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun when > 1)")
    args = p.parse_args()

    started = time.perf_counter()
    runs = run_all(list(range(args.seeds)), Path(args.out_dir), args.nproc)
    table = summarise(runs)
    plot(runs, Path(args.plot), args.nproc)
    common.report(started, table, args.plot,
                  [f"recipe ({args.nproc} processes): python -m lbkernels.train {' '.join(RECIPE)} "
                   f"METHOD --lr LR --seed SEED"])


if __name__ == "__main__":
    main()

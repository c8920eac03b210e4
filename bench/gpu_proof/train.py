"""Stage (d) of the GPU proof: the training command once per method, in this process,
with the optimizer's step timed: ``python -m bench.gpu_proof.train --out DIR [--tiny]``.

The command (``lbkernels.train``) prints each epoch's images/s but has no figure for
the optimizer, so every ``torch.optim.Optimizer.step`` is timed through torch's global
step hooks: CUDA events around it on a GPU (read once the run is over: no sync inside
the step), the clock on a CPU. The optimizer's share is its time in the last epoch over
that epoch's training time (its samples / its images/s; the first epoch holds cuDNN's
autotuning and Triton's compilation). One process runs every method in turn (a start
costs seconds of imports); each method's figures are appended to ``DIR/train.jsonl``
as soon as it ends, so a stage stopped by its time limit keeps the finished ones.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lbkernels.train.__main__ import main as train_main
from lbkernels.train.methods import METHODS

# ResNet-20 at batch 4096 for 2 epochs of 12 steps: 49,152 synthetic samples (12 x 4096).
GPU = dict(batch=4096, samples=49152, image=32, epochs=2)
TINY = dict(batch=32, samples=32, image=8, epochs=1)
# Methods whose recipes do not fit a 2-epoch run at one batch: growing-batch would grow
# the batch past the GPU's memory (capped at the batch instead: its rate decays), swap's
# phase 2 (recipe: 3 epochs at batch 32) takes one epoch at the batch, after one of phase 1.
EXTRA = {
    "growing-batch": lambda c: ["--max-batch", str(c["batch"])],
    "swap": lambda c: ["--epochs", str(max(c["epochs"] - 1, 1)), "--swap-epochs", "1",
                       "--swap-batch-size", str(c["batch"])],
}


class StepTimer:
    """The time of every outermost optimizer step, through torch's global hooks."""

    def __init__(self, cuda: bool):
        self.cuda, self.depth, self.open = cuda, 0, None
        self.spans: list = []
        self.handles = [register_optimizer_step_pre_hook(self._pre),
                        register_optimizer_step_post_hook(self._post)]

    def _pre(self, opt, args, kwargs):
        self.depth += 1
        if self.depth == 1:  # a step inside another optimizer's step is part of it
            if self.cuda:
                self.open = torch.cuda.Event(enable_timing=True)
                self.open.record()
            else:
                self.open = time.perf_counter()

    def _post(self, opt, args, kwargs):
        self.depth -= 1
        if self.depth == 0:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.spans.append((self.open, end))
            else:
                self.spans.append((self.open, time.perf_counter()))

    def seconds(self) -> list[float]:
        """Each step's seconds (synchronises once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.spans]
        return [b - a for a, b in self.spans]

    def close(self):
        for h in self.handles:
            h.remove()


def run_method(method: str, out: Path, c: dict, device: str) -> dict:
    """One training run of ``method``: its figures (or its error), and its console text."""
    run_dir = out / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)  # the command refuses a folder holding another run
    argv = ["--data", "synthetic", "--synthetic-samples", str(c["samples"]), "--image-size", str(c["image"]),
            "--model", "resnet20", "--batch-size", str(c["batch"]), "--epochs", str(c["epochs"]),
            "--method", method, "--device", device, "--out-dir", str(run_dir),
            "--checkpoint-every", "0", *EXTRA.get(method, lambda c: [])(c)]
    timer, text, t0 = StepTimer(device == "cuda"), io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            status = train_main(argv)
    except SystemExit as e:  # argparse's errors
        status = e.code
    except Exception as e:  # the next method still runs; the error is this one's result
        status = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        steps = timer.seconds()
        timer.close()
    wall = time.perf_counter() - t0
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{method}.log").write_text(text.getvalue())
    row = dict(method=method, argv=" ".join(argv), status=status, wall_s=round(wall, 2),
               optimizer_steps=len(steps))
    rates = [float(x.replace(",", "")) for x in re.findall(r"([\d,.]+) samples/s", text.getvalue())]
    metrics = list(csv.DictReader(open(run_dir / "metrics.csv"))) if (run_dir / "metrics.csv").exists() else []
    if status == 0 and rates and metrics:
        last = metrics[-1]
        last_steps = int(last["step"]) - (int(metrics[-2]["step"]) if len(metrics) > 1 else 0)
        epoch_s = last_steps * int(last["batch_size"]) / rates[-1]
        opt_s = sum(steps[-last_steps:])
        row.update(images_per_s=rates[-1], last_epoch_steps=last_steps, last_epoch_s=round(epoch_s, 4),
                   optimizer_ms_per_step=1e3 * opt_s / last_steps, optimizer_share=opt_s / epoch_s)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="one step of 32 8x8 images, on the CPU (dry run)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args(argv)
    c, device = (TINY, "cpu") if args.tiny else (GPU, "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.jsonl").unlink(missing_ok=True)
    failed = 0
    for method in args.methods:
        row = run_method(method, args.out, c, device)
        failed += row["status"] != 0
        print(json.dumps(row), flush=True)
        with open(args.out / "train.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

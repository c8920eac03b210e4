"""The training loop: steps, evaluation, metrics, checkpoints and fault handling.

A run's position is (epoch, batch within it); a checkpoint records it with everything
that decides what happens next (weights, optimizer, schedule, loss scale, data order,
every random generator, the metrics so far), so a resumed run repeats bit for bit what
the uninterrupted run would have done.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lbkernels.data import ScheduledBatchSampler
from lbkernels.schedules import noise_scale

from . import checkpoint, sharded
from .checkpoint import OwnCheckpointError
from .config import CHECKPOINT_NAME, ConfigError, resolved
from .data import DATASETS, TrainBatches, test_batches
from .distributed import Runtime
from .methods import METHODS, Context, peak_lr
from .models import build_model
from .report import Report

EVAL_BATCH = 1024
CHECKPOINT_FORMAT = 1
# A run whose training accuracy stays within CHANCE_SE binomial standard errors above
# chance (1 / classes) for two epochs in a row, both entirely after the warm-up and
# neither the first (which starts from the random network), stops. Digits (1,437
# samples, 10 classes): chance 10%, SE 0.79%, so the line is 12.4%; a network predicting
# one class scores that class's share (9.6-10.2% on digits). Learning runs are far above
# it by then: the default run has 91.5% in epoch 6, its first checked one; without
# warm-up, SGD at --lr 0.01 (20x below its usual rate) has 21% and 47% in epochs 2-3.
# --data synthetic, whose labels are random, is never checked.
CHANCE_SE = 3
_AT_CHANCE = "training accuracy at chance"
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(RuntimeError):
    """The run cannot go on (the loss stayed non-finite, or it learns nothing); a
    checkpoint was written."""


class Trainer:
    """One run of the training command, in one process of it.

    Attributes a method's hooks may use: ``args``, ``runtime``, ``dataset``, ``model``
    (the network, sharded in place under --parallel fsdp), ``net`` (what the steps call:
    ``model`` or its DDP wrapper),
    ``plan``, ``batches`` and :meth:`evaluate`.
    """

    def __init__(self, args: argparse.Namespace, runtime: Runtime, resume: dict | None = None):
        self.args = args
        self.runtime = runtime
        self.device = runtime.device
        self.out_dir = Path(args.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.report = Report(self.out_dir, active=runtime.is_main, quiet=args.quiet)

        _seed_everything(args.seed)
        self.dataset = DATASETS[args.data](args).to(self.device)
        model = build_model(args.model, self.dataset.input_shape, self.dataset.num_classes,
                            args.width).to(self.device)
        METHODS[args.method].prepare_model(args, model)
        # Sharded before the method builds its optimizer on the parameters (--parallel fsdp).
        self.model = runtime.shard(model)
        n = self.dataset.train_size

        def steps_per_epoch(batch_size: int) -> int:
            if batch_size > n:
                raise ConfigError(f"--batch-size: {batch_size} is more than the {n} training "
                                  f"samples of {args.data}")
            return ScheduledBatchSampler(n, lambda epoch: batch_size, rank=runtime.rank,
                                         world_size=runtime.world_size).num_batches(0)

        try:
            self.plan = METHODS[args.method].build(
                Context(args, self.model, steps_per_epoch, runtime.rank, runtime.world_size))
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # an optimizer or schedule refusing a value
            raise ConfigError(f"--method {args.method}: {e}") from None
        self.batches = TrainBatches(self.dataset, self.plan.batch_size, seed=args.seed,
                                    augment=args.augment, cutout=args.cutout,
                                    rank=runtime.rank, world_size=runtime.world_size)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")

        # The position and the record of the run.
        self.epoch = 0  # the epoch under way (or the next one)
        self.steps = 0  # batches trained on, skipped ones included
        self.updates = 0  # updates applied
        self.bad_in_row = 0
        self.epoch_skipped = 0  # steps of the epoch so far skipped for a non-finite loss
        self.elapsed = 0.0  # training seconds of earlier processes of this run
        self.epoch_sums = [0.0, 0.0, 0.0]  # loss sum, correct, samples of the epoch so far
        self.history: list[dict] = []
        self.generation = 0  # saves of a sharded run (names its shard files)
        self.plan.attach(self)
        if resume is not None:
            if sharded.SHARDS_KEY in resume:
                self.generation = resume[sharded.SHARDS_KEY]["generation"]
                resume = self._own_shards(resume)
            elif resume.get("per_process") and not runtime.is_main:
                resume = self._own_checkpoint(resume)
            self._restore(resume)

        # Data-parallel over the processes of the runtime, which a method's attach or
        # load_state_dict may have narrowed to a sub-group (self.runtime, not runtime).
        self.net = self.runtime.data_parallel(self.model)
        if self.runtime.distributed and self.plan.comm_hook is not None:
            self.net.register_comm_hook(*self.plan.comm_hook)

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the last epoch; returns the last metrics row."""
        args, report = self.args, self.report
        if self.runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        report.write_config(resolved(args))
        report.write_metrics(self.history)
        self._started = time.perf_counter()
        try:
            while self.epoch < self.plan.num_epochs(args.epochs):
                self._run_epoch(self.epoch)
                done = self.epoch == self.plan.num_epochs(args.epochs)
                if done or (args.checkpoint_every and self.epoch % args.checkpoint_every == 0):
                    self.save()
        finally:
            self.plan.on_train_end(self)
            report.close()
            report.plot(self.history, f"{args.method} / {args.model} / {args.data}, "
                                      f"batch {args.batch_size}")
        return self.history[-1]

    def _run_epoch(self, epoch: int) -> None:
        args, report = self.args, self.report
        self.plan.on_epoch_start(self, epoch)
        self.net.train()
        steps = self.batches.num_batches(epoch)
        report.start_epoch(epoch, self.plan.num_epochs(args.epochs), steps, self.batches.taken(epoch))
        samples, t0 = 0, time.perf_counter()
        for x, y, total in self.batches.epoch(epoch):
            self._step(x, y, total)
            samples += total
            loss_sum, correct, count = self.epoch_sums
            report.step(loss_sum / max(count, 1), correct / max(count, 1),
                        samples / (time.perf_counter() - t0))
            if args.checkpoint_every_steps and self.steps % args.checkpoint_every_steps == 0:
                self.save()
        throughput = samples / max(time.perf_counter() - t0, 1e-9)
        self.plan.on_epoch_end(self, epoch)
        epochs = self.plan.num_epochs(args.epochs)

        test_loss = test_acc = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs:
            test_loss, test_acc = self.evaluate()
        loss_sum, correct, count = self.epoch_sums
        group, batch_size = self.plan.optimizer.param_groups[0], self.plan.batch_size(epoch)
        row = {
            "epoch": epoch + 1, "step": self.steps, "updates": self.updates,
            "lr": group["lr"], "batch_size": batch_size,
            # SGD's noise scale lr / (1 - m) * (N / B - 1) at the epoch's last update: what
            # decaying the rate and growing the batch both lower (m = 0 for optimizers
            # without momentum).
            "noise_scale": noise_scale(group["lr"], self.dataset.train_size, batch_size,
                                       group.get("momentum", 0.0)),
            "train_loss": loss_sum / count if count else None,
            "train_acc": correct / count if count else None,
            "test_loss": test_loss, "test_acc": test_acc,
            "wall_time": round(self.wall_time(), 3),
            **self.plan.metrics(self, epoch),
            "status": self._status(epoch, correct, count),
        }
        self.history.append(row)
        report.append_metrics(row)
        report.end_epoch(row, epochs, throughput)
        self.epoch, self.epoch_sums, self.epoch_skipped = epoch + 1, [0.0, 0.0, 0.0], 0
        if _AT_CHANCE in row["status"] and len(self.history) > 1 \
                and _AT_CHANCE in (self.history[-2].get("status") or ""):
            self.save()
            raise TrainingStopped(self._at_chance_message())

    def _status(self, epoch: int, correct: float, count: float) -> str:
        """The metrics row's word on the epoch: skipped steps, accuracy at chance, or ""."""
        words = [f"{self.epoch_skipped} steps skipped: non-finite loss"] if self.epoch_skipped else []
        warmup_epochs = math.ceil(self.args.warmup_epochs)
        if self.args.data != "synthetic" and epoch >= max(warmup_epochs, 1) and count:
            chance = 1.0 / self.dataset.num_classes
            line = chance + CHANCE_SE * math.sqrt(chance * (1 - chance) / count)
            if correct / count <= line:
                words.append(_AT_CHANCE)
        return "; ".join(words)

    def _at_chance_message(self) -> str:
        a, b = self.history[-2], self.history[-1]
        args = self.args
        return (f"training accuracy stayed at chance after the warm-up ({100 * a['train_acc']:.1f}% "
                f"and {100 * b['train_acc']:.1f}% in epochs {a['epoch']}-{b['epoch']}, chance "
                f"{100 / self.dataset.num_classes:.1f}%): the learning rate is likely out of range "
                f"for --method {args.method} (--lr {args.lr:g}, a peak of {peak_lr(args):.4g} at "
                f"batch {args.batch_size}); start again with a smaller --lr or a longer "
                f"--warmup-epochs (or a larger --lr if it barely moves the weights). Its last state is in "
                f"{self.checkpoint_path}")

    def _step(self, x: torch.Tensor, y: torch.Tensor, total: int) -> None:
        """One step on this process's share (x, y) of a global batch of ``total``."""
        self.plan.optimizer.zero_grad(set_to_none=True)
        loss_sum, correct = self.plan.forward_backward(self, x, y, total)
        # Every process agrees on the global loss before anyone steps: one process with a
        # non-finite loss makes them all skip, and the metrics are those of the whole batch.
        loss_total, correct = self.runtime.sum(torch.stack([loss_sum.double(), correct.double()])).tolist()
        self.steps += 1
        if not math.isfinite(loss_total):
            self.plan.optimizer.zero_grad(set_to_none=True)
            self._skip(loss_total)
            return
        self.bad_in_row = 0
        if self.plan.step(self.scaler):
            self.updates += 1
        sums = self.epoch_sums
        sums[0], sums[1], sums[2] = sums[0] + loss_total, sums[1] + correct, sums[2] + total

    def _skip(self, loss: float) -> None:
        self.bad_in_row += 1
        self.epoch_skipped += 1
        limit = self.args.max_bad_steps
        self.report.message(f"step {self.steps} (epoch {self.epoch + 1}): loss is {loss}; "
                            f"update skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row > limit:
            self.save()
            # A row of the unfinished epoch in metrics.csv only (not in the history: a
            # resumed run rewrites the file from the history and redoes the epoch).
            self.report.append_metrics({
                "epoch": self.epoch + 1, "step": self.steps, "updates": self.updates,
                "status": f"stopped: {self.bad_in_row} steps in a row with a non-finite loss"})
            raise TrainingStopped(
                f"{self.bad_in_row} steps in a row had a non-finite loss (--max-bad-steps {limit}); "
                f"the run diverged: lower --lr or lengthen --warmup-epochs. Its last state is in "
                f"{self.checkpoint_path}")

    def evaluate(self) -> tuple[float, float]:
        """Mean loss and accuracy on the test set (each process takes a share), of the
        weights the method evaluates (:meth:`Plan.eval_context`)."""
        with self.plan.eval_context(self):
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        # The bare model: processes may hold different numbers of test batches, and DDP's
        # forward would wait for the others at every batch.
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        with self.runtime.gathered(self.model):
            for x, y in test_batches(self.dataset, EVAL_BATCH, self.runtime.rank,
                                     self.runtime.world_size):
                with self.autocast():
                    out = self.model(x)
                sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += len(y)
        self.model.train()
        loss, correct, count = self.runtime.sum(sums).tolist()
        return loss / count, correct / count

    def autocast(self) -> torch.autocast:
        amp = self.args.amp
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES.get(amp), enabled=amp != "none")

    def wall_time(self) -> float:
        """Seconds spent training in this run, over all its processes' lifetimes."""
        return self.elapsed + time.perf_counter() - self._started

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the run: the first process writes it. While the method says the
        processes hold different states (:meth:`Plan.shared_state`), every other
        process also writes its own, ``checkpoint.rank<R>.pt``, which it resumes from.
        A sharded run (--parallel fsdp) writes one shard file per process and then
        ``checkpoint.pt`` (:func:`sharded.save`)."""
        shared = self.plan.shared_state()
        if not (self.runtime.is_main or not shared or self.runtime.sharded):
            return
        # The method's state first: its eval_context may change the weights for a while.
        method_state = self.plan.state_dict()
        with self.plan.eval_context(self):
            # The weights the method evaluates, copied: those in the block are transient.
            model_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": resolved(self.args),
            "model": model_state,
            "method": method_state,
            "scaler": self.scaler.state_dict(),
            "data": self.batches.state_dict(),
            "rng": checkpoint.rng_state(self.device),
            "progress": {
                "epoch": self.epoch, "steps": self.steps, "updates": self.updates,
                "bad_in_row": self.bad_in_row, "epoch_skipped": self.epoch_skipped,
                "wall_time": self.wall_time(),
                "epoch_sums": list(self.epoch_sums),
            },
            "history": self.history,
            "per_process": not shared,
        }
        if self.runtime.sharded:
            self.generation += 1
            sharded.save(self.out_dir, self.checkpoint_path, state, self.runtime.rank,
                         self.runtime.world_size, self.generation)
        elif self.runtime.is_main:
            checkpoint.save(self.checkpoint_path, state)
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.save(self._own_checkpoint_path(), state)

    def _own_checkpoint_path(self) -> Path:
        rank = self.runtime.rank if self.runtime.job_rank is None else self.runtime.job_rank
        return self.out_dir / f"checkpoint.rank{rank}.pt"

    def _own_checkpoint(self, main: dict[str, Any]) -> dict[str, Any]:
        """This process's checkpoint, written beside the first process's ``main``."""
        path = self._own_checkpoint_path()
        try:
            own = checkpoint.load(path)
        except checkpoint.CheckpointError as e:
            raise OwnCheckpointError(str(e)) from None
        if own.get("progress", {}).get("steps") != main["progress"]["steps"]:
            raise OwnCheckpointError(
                f"{path}: written at step {own.get('progress', {}).get('steps')}, but "
                f"{self.checkpoint_path} at step {main['progress']['steps']}: the run stopped "
                f"while its processes were writing; it cannot be resumed exactly")
        return own

    def _own_shards(self, main: dict[str, Any]) -> dict[str, Any]:
        """This process's shard file joined to ``main``; a missing or damaged one stops every
        process before anything is written, with the first such process's error."""
        problem, state = None, main
        try:
            state = sharded.load(Path(self.args.resume or self.args.out_dir), main,
                                 self.runtime.rank, self.model, self.plan)
        except OwnCheckpointError as e:
            problem = f"process {self.runtime.rank}: {e}"
        if (problem := self.runtime.first_error(problem)) is not None:
            raise checkpoint.CheckpointError(problem)
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise checkpoint.CheckpointError(
                f"--resume: checkpoint format {state.get('format')!r}, this version reads "
                f"{CHECKPOINT_FORMAT}")
        try:
            self.model.load_state_dict(state["model"])
            self.plan.load_state_dict(state["method"])
            self.scaler.load_state_dict(state["scaler"])
            self.batches.load_state_dict(state["data"])
            checkpoint.set_rng_state(state["rng"], self.device)
            p = state["progress"]
            self.epoch, self.steps, self.updates = p["epoch"], p["steps"], p["updates"]
            self.bad_in_row, self.elapsed = p["bad_in_row"], p["wall_time"]
            self.epoch_skipped = p["epoch_skipped"]
            self.epoch_sums = list(p["epoch_sums"])
            self.history = list(state["history"])
        except ConfigError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            # Options that change the state were refused before; what is left is a
            # checkpoint whose content is not what this version writes.
            what = f"no entry {e}" if isinstance(e, KeyError) else (
                " ".join(str(e).split()) or type(e).__name__)
            raise checkpoint.CheckpointError(
                f"--resume: the checkpoint does not fit this run ({what[:300]}); was it written "
                f"by another version of the command?") from None

def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed)
    random.seed(seed)

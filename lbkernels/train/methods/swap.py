"""``swap`` and ``swa``: weight averaging (docs/algorithms.md section 4).

``swap`` (Gupta, Akle Serrano, DeCoste, ICLR 2020) drives a
:class:`lbkernels.distributed.SWAP` controller: phase 1 trains data-parallel at
``--batch-size`` with the ``--lr`` schedule over ``--epochs`` and ends early once an
epoch's training accuracy reaches ``--swap-stop-accuracy``; phase 2 trains one model per
group of ``--swap-group-size`` processes for ``--swap-epochs`` epochs at the batch
``--swap-batch-size`` (one group's update, summed over its processes), with fresh
momentum, the rate ``--swap-lr`` decaying linearly to 0 and the data order seeded with
``--seed`` + the group's index; phase 3 averages the parameters over all processes and
recomputes the batch-norm statistics. The run is ``switch epoch + --swap-epochs`` epochs
long; ``swap.json`` in the run directory holds each group's test accuracy and the
average's.

``swa`` (Izmailov et al., UAI 2018) is sequential: the usual schedule until
``--swa-start``, then a constant (or cyclic) rate with the weights averaged every
``--swa-every`` updates (:class:`lbkernels.optim.WeightAverager`); at the end the
average replaces the weights, its batch-norm statistics are recomputed, and the average
is what is evaluated and saved (``swa.json``: the last iterate's accuracy and the
average's).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from lbkernels.bn_stats import update_bn
from lbkernels.data import ScheduledBatchSampler
from lbkernels.distributed.swap import AVERAGED, INDEPENDENT, PHASE_NAMES, SWAP
from lbkernels.optim import WeightAverager

from ..argtypes import _number, nonnegative_float, nonnegative_int, positive_float, positive_int
from ..config import ConfigError
from ..data import TrainBatches
from .plan import Context, Method, Plan, lr_schedule, peak_lr, register
from .sgd import SGD_RECIPE, sgd_optimizer

if TYPE_CHECKING:
    from ..loop import Trainer

_accuracy = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _bn_batches(trainer: Trainer) -> Iterator[torch.Tensor]:
    """This process's share of the training inputs (every K-th sample over the job's K
    processes), normalised, in batches of its share of --batch-size: what update_bn
    passes over (no augmentation)."""
    runtime, data = trainer.runtime, trainer.dataset
    x = data.train_inputs[runtime.rank::runtime.world_size]
    size = max(1, trainer.args.batch_size // runtime.world_size)
    for i in range(0, len(x), size):
        yield data.normalise(x[i:i + size])


def _write_json(trainer: Trainer, name: str, result: dict) -> None:
    if trainer.runtime.is_main:
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        (trainer.out_dir / name).write_text(json.dumps(result, indent=2) + "\n")


# -- swap ------------------------------------------------------------------------------------------
def _swap_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--swap-batch-size", type=positive_int, default=32, metavar="B2",
                       help="swap: the batch of one phase-2 update of a group, summed over its "
                            "--swap-group-size processes (groups of one: each process's own batch)")
    group.add_argument("--swap-stop-accuracy", type=_accuracy, default=1.0, metavar="ACC",
                       help="swap: phase 1 ends after the first epoch whose training accuracy "
                            "reaches this fraction, or after --epochs")
    group.add_argument("--swap-epochs", type=positive_int, default=5,
                       help="swap: epochs of phase 2 (independent small-batch training)")
    group.add_argument("--swap-lr", type=positive_float, default=0.05,
                       help="swap: phase 2's learning rate at its start (at --swap-batch-size, not "
                            "scaled); it decays linearly to 0 over --swap-epochs")
    group.add_argument("--swap-group-size", type=positive_int, default=1, metavar="G",
                       help="swap: processes that train one model together in phase 2 (must "
                            "divide the number of processes)")


class SwapPlan(Plan):
    """The SWAP controller's three phases inside the trainer (see the module docstring).

    Phase 2 installs a new optimizer and schedule, the group's data order and batch
    (``trainer.batches``), a runtime narrowed to the group (``trainer.runtime``: the
    loss sums and evaluations stay within it) and a data-parallel wrapper over the
    group, or the bare model for groups of one. Phase 3 restores the job's runtime.
    """

    def __init__(self, ctx: Context, controller: SWAP):
        optimizer = sgd_optimizer(ctx, peak_lr(ctx.args))
        super().__init__(optimizer, lr_schedule(ctx, optimizer), ctx.args.batch_size)
        self.ctx = ctx
        self.controller = controller
        self.trainer: Trainer | None = None
        self.job_runtime = None
        self._epoch_phase = controller.phase  # the phase the current epoch trains in
        self._installed = False  # phase 2's optimizer, data and runtime are in place
        self.result: dict[str, Any] | None = None

    def batch_size(self, epoch: int) -> int:
        switch = self.controller.switch_epoch
        return self.ctx.args.batch_size if switch is None or epoch < switch else self.ctx.args.swap_batch_size

    def attach(self, trainer: Trainer) -> None:
        self.trainer, self.job_runtime = trainer, trainer.runtime

    def num_epochs(self, epochs: int) -> int:
        return self.controller.total_epochs()

    def shared_state(self) -> bool:
        return not (self._installed and self.controller.phase == INDEPENDENT
                    and self.controller.num_groups > 1)

    def metrics(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        # The last row's test metrics are the averaged model's.
        phase = AVERAGED if self.controller.phase == AVERAGED else self._epoch_phase
        return {"phase": PHASE_NAMES[phase]}

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._epoch_phase = self.controller.phase
        # Installed here rather than when phase 1 ends, so that the last phase-1 row
        # shows that phase's rate and a checkpoint between the two holds phase 1's optimizer.
        if self.controller.phase == INDEPENDENT and not self._installed:
            self._enter_independent(fresh=True)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        _, correct, count = trainer.epoch_sums
        started = self.controller.end_epoch(correct / count if count else 0.0)
        if started == INDEPENDENT:
            trainer.report.message(
                f"swap: phase 1 ends after epoch {epoch + 1} (training accuracy "
                f"{100 * correct / max(count, 1):.2f}%); {self.controller.num_groups} models (groups "
                f"of {self.controller.group_size} processes) train independently for "
                f"{self.controller.swap_epochs} epochs")
        elif started == AVERAGED:
            self._average(trainer)

    def _enter_independent(self, fresh: bool) -> None:
        """Phase 2's optimizer, schedule, runtime, batches and wrapper (``fresh``: at the
        switch; else when a run resumes inside phase 2, whose state then loads into them)."""
        args, trainer, c = self.ctx.args, self.trainer, self.controller
        self._installed = True
        job = self.job_runtime
        if c.group_size == 1:
            runtime = job.within(None, 0, 1)
        elif c.num_groups == 1:
            runtime = job
        else:
            runtime = job.within(c.process_group, c.group_rank, c.group_size)
        trainer.runtime = runtime
        b2 = args.swap_batch_size
        trainer.batches = TrainBatches(trainer.dataset, lambda epoch: b2, seed=c.data_seed,
                                       augment=args.augment, cutout=args.cutout,
                                       rank=runtime.rank, world_size=runtime.world_size)
        steps = ScheduledBatchSampler(trainer.dataset.train_size, lambda epoch: b2, rank=runtime.rank,
                                      world_size=runtime.world_size).num_batches(0)
        total = steps * c.swap_epochs
        # A new optimizer: phase 2 starts without phase 1's momentum.
        self.optimizer = sgd_optimizer(self.ctx, args.swap_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, 1.0 - step / total))
        if fresh:
            trainer.net = runtime.data_parallel(trainer.model)

    def _average(self, trainer: Trainer) -> None:
        c = self.controller
        _, own_acc = trainer.evaluate()  # this group's model, on the whole test set
        trainer.runtime, trainer.net = self.job_runtime, trainer.model
        c.average(trainer.model, _bn_batches(trainer), device=trainer.device)
        accs = c.gather(own_acc, trainer.device)[::c.group_size]  # one per group
        avg_loss, avg_acc = trainer.evaluate()
        self.result = {"switch_epoch": c.switch_epoch, "groups": c.num_groups,
                       "group_size": c.group_size, "worker_test_acc": accs,
                       "worker_mean_test_acc": sum(accs) / len(accs),
                       "averaged_test_acc": avg_acc, "averaged_test_loss": avg_loss}
        _write_json(trainer, "swap.json", self.result)
        trainer.report.message(
            "swap: test accuracy of each group's model " + ", ".join(f"{100 * a:.2f}%" for a in accs)
            + f" (mean {100 * self.result['worker_mean_test_acc']:.2f}%); averaged model {100 * avg_acc:.2f}%")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "swap": self.controller.state_dict(), "installed": self._installed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["swap"])
        if self.controller.phase == INDEPENDENT and state["installed"]:
            self._enter_independent(fresh=False)
        self._epoch_phase = self.controller.phase
        super().load_state_dict(state)


def build_swap(ctx: Context) -> Plan:
    args = ctx.args
    k, g, b2 = ctx.world_size, args.swap_group_size, args.swap_batch_size
    if k % g:
        raise ConfigError(f"--swap-group-size: {g} does not divide the {k} processes")
    if b2 < g:
        raise ConfigError(f"--swap-batch-size: {b2} is less than one sample for each of the "
                          f"{g} processes of a group")
    try:  # b2 against the training set (a batch of at least k samples: the check's sharding)
        ctx.steps_per_epoch(max(b2, k))
    except Exception as e:
        raise ConfigError(f"--swap-batch-size: {str(e).split(': ', 1)[-1]}") from None
    controller = SWAP(max_large_batch_epochs=args.epochs, swap_epochs=args.swap_epochs,
                      stop_accuracy=args.swap_stop_accuracy, group_size=g, seed=args.seed)
    return SwapPlan(ctx, controller)


register(Method(
    "swap", "SWAP (Gupta et al. 2020): large-batch data parallelism, then independent small-batch "
    "training per process group, then the average of all: --swap-batch-size, --swap-epochs, --swap-lr, "
    "--swap-stop-accuracy, --swap-group-size",
    build_swap, _swap_arguments,
    # docs/results.md, "SWAP" (bench/experiments/swap.py, four processes; 98.24% mean over 3
    # seeds at width 0.5): phase 1 at batch 480 with lr 0.05 at batch 32 (0.75), 2 warm-up
    # epochs and (1 - t)^2 over at most 9 epochs, ended at 98% training accuracy; phase 2 at
    # batch 32 for 3 epochs from lr 0.1 (the best of 0.02, 0.05, 0.1, 0.2 there).
    recipe={"batch_size": 480, "base_batch_size": 32, "lr": 0.05, "epochs": 9, "warmup_epochs": 2.0,
            "decay": "poly", "poly_power": 2.0, "swap_stop_accuracy": 0.98, "swap_epochs": 3,
            "swap_batch_size": 32, "swap_lr": 0.1},
))


# -- swa -------------------------------------------------------------------------------------------
def _swa_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--swa-start", type=nonnegative_int, default=0, metavar="EPOCH",
                       help="swa: epoch at which the averaging tail starts (0: three quarters of "
                            "--epochs, leaving at least one epoch of tail)")
    group.add_argument("--swa-lr", type=nonnegative_float, default=0.01,
                       help="swa: the tail's rate (constant), or its lowest at the end of each "
                            "cycle (cyclic)")
    group.add_argument("--swa-schedule", choices=("constant", "cyclic"), default="constant",
                       help="swa: the tail's rate: constant --swa-lr, or cycles of --swa-cycle "
                            "updates falling linearly from the rate at --swa-start to --swa-lr")
    group.add_argument("--swa-cycle", type=nonnegative_int, default=0, metavar="UPDATES",
                       help="swa: updates per cycle of --swa-schedule cyclic (0: one epoch)")
    group.add_argument("--swa-every", type=nonnegative_int, default=0, metavar="UPDATES",
                       help="swa: average the weights every this many updates of the tail "
                            "(0: at the end of every epoch, or of every cycle)")


class SwaPlan(Plan):
    """SGD whose tail is averaged by a :class:`WeightAverager`; the schedule counts the
    updates, so the averaging points follow from it (nothing else to checkpoint)."""

    stateful = ("averager",)

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 batch_size: int, averager: WeightAverager, start: int, every: int, epochs: int):
        super().__init__(optimizer, scheduler, batch_size)
        self.averager = averager
        self.start, self.every, self.epochs = start, every, epochs
        self.result: dict[str, Any] | None = None

    def step(self, scaler: torch.amp.GradScaler) -> bool:
        super().step(scaler)
        done = self.scheduler.last_epoch  # updates so far
        if done > self.start and (done - self.start) % self.every == 0:
            self.averager.update()
        return True

    def metrics(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        if self.result is not None:
            return {"phase": "averaged"}
        return {"phase": "swa" if self.scheduler.last_epoch > self.start else "sgd"}

    @torch.no_grad()
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if epoch + 1 != self.epochs:
            return
        _, last_acc = trainer.evaluate()
        for p, a in zip(trainer.model.parameters(), self.averager.averages):
            p.copy_(a)
        # Gathered: the processes' shares of the data may hold different numbers of batches.
        with trainer.runtime.gathered(trainer.model):
            update_bn(_bn_batches(trainer), trainer.model, device=trainer.device,
                      distributed=trainer.runtime.distributed)
        loss, acc = trainer.evaluate()
        self.result = {"n_averaged": self.averager.n_averaged, "last_iterate_test_acc": last_acc,
                       "averaged_test_acc": acc, "averaged_test_loss": loss}
        _write_json(trainer, "swa.json", self.result)
        trainer.report.message(f"swa: {self.result['n_averaged']} snapshots averaged; test accuracy "
                               f"{100 * last_acc:.2f}% (last iterate), {100 * acc:.2f}% (average)")


def build_swa(ctx: Context) -> Plan:
    args = ctx.args
    # Three quarters of the run, but at least one epoch before and after (a 2-epoch run: 1).
    start_epoch = args.swa_start or max(1, min(round(0.75 * args.epochs), args.epochs - 1))
    if not 0 < start_epoch < args.epochs:
        raise ConfigError(f"--swa-start: epoch {start_epoch} leaves no averaging tail in "
                          f"{args.epochs} --epochs (expected 1 .. {args.epochs - 1})")
    peak = peak_lr(args)
    if peak <= 0:
        raise ConfigError("--lr: swa sets its tail relative to the peak rate, which must be > 0")
    steps = ctx.steps_per_epoch(args.batch_size)
    start, tail = start_epoch * steps, (args.epochs - start_epoch) * steps
    cycle = args.swa_cycle or steps
    every = args.swa_every or (cycle if args.swa_schedule == "cyclic" else steps)
    if every > tail:
        raise ConfigError(f"--swa-every: {every} updates is longer than the {tail} updates of the tail")
    optimizer = sgd_optimizer(ctx, peak)
    base = lr_schedule(ctx, optimizer).lr_lambdas[0]  # the usual warm-up and decay
    high = base(start)  # the cyclic tail starts each cycle at the rate reached at --swa-start

    def factor(step: int) -> float:
        if step < start:
            return base(step)
        if args.swa_schedule == "constant":
            return args.swa_lr / peak
        # Izmailov et al.: t = (k mod c + 1) / c for the tail's k-th update (0-based).
        t = ((step - start) % cycle + 1) / cycle
        return (1 - t) * high + t * args.swa_lr / peak

    # Replaces the schedule made above (which only lent its factor): the optimizer's
    # initial_lr stays the peak, and this one sets the first rate.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return SwaPlan(optimizer, scheduler, args.batch_size, WeightAverager(ctx.model, mode="swa"),
                     start, every, args.epochs)


register(Method(
    "swa", "stochastic weight averaging (Izmailov et al. 2018): after --swa-start, a constant or "
    "cyclic rate with the weights averaged every --swa-every updates; the average is the result",
    build_swa, _swa_arguments,
    # --method sgd's recipe (lr 1 at batch 360, divided by 10 at 50% and 75% of 30 epochs)
    # up to the tail, which starts at 75% (epoch 22) and averages once per epoch at the
    # constant rate 0.05: half the 0.1 the step schedule holds there. No experiment of
    # docs/results.md covers SWA; this tail was measured with the recipe (docs/training.md).
    recipe={**SGD_RECIPE, "swa_lr": 0.05},
))

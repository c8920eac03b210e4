"""``--method growing-batch``: grow the batch instead of decaying the learning rate
(Smith, Kindermans, Le, ICLR 2018).

The step schedule of ``--decay step --decay-epochs E1 E2 .. --decay-gamma G`` is read as
"divide the SGD noise scale ``lr * N / (B * (1 - m))`` by ``1/G`` at every milestone";
``--batch-schedule`` says how (:class:`lbkernels.schedules.BatchSizeSchedule`):

- ``decay-lr``: the learning rate falls by ``G`` at every milestone (plain step decay);
- ``increase``: the batch grows by ``1/G`` instead, up to ``--max-batch``; past the cap
  the learning rate takes the rest of the decay;
- ``hybrid``: the batch grows at the first milestone, the learning rate decays after.

``--batch-size`` is the batch before the first milestone and ``--lr`` (scaled from
``--base-batch-size`` by the linear rule) its learning rate. The learning rate and the
batch are pure functions of the epoch (and of the position in the epoch during
warm-up), so a resumed run needs nothing but the optimizer's state.

The batch a process can hold is bounded: ``--max-micro-batch`` splits this process's
share of a large global batch into micro-batches whose gradients add up before the one
update (synchronised across processes once, after the last), and ``--ghost-batch``
normalises BatchNorm over fixed-size ghost batches, so that the normalisation does not
change with the batch.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lbkernels.distributed import accumulate_gradients
from lbkernels.nn import convert_to_ghost_bn
from lbkernels.schedules import BatchSizeSchedule

from ..argtypes import nonnegative_int
from ..config import ConfigError
from .plan import Context, Method, Plan, peak_lr, register
from .sgd import lars_optimizer, sgd_optimizer

if TYPE_CHECKING:
    from ..loop import Trainer

_MODES = {"increase": "increase_batch", "hybrid": "hybrid", "decay-lr": "decay_lr"}


def _arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--batch-schedule", choices=list(_MODES), default="increase",
                       help="what happens at each of --decay-epochs (with --decay step): the batch "
                            "grows by 1/--decay-gamma (increase), it grows at the first and the "
                            "learning rate decays at the others (hybrid), or only the learning "
                            "rate decays (decay-lr)")
    group.add_argument("--max-batch", type=nonnegative_int, default=0, metavar="B",
                       help="cap of the growing global batch; past it the learning rate decays "
                            "instead (0: only the training set size caps it)")
    group.add_argument("--ghost-batch", type=nonnegative_int, default=0, metavar="SAMPLES",
                       help="ghost batch normalisation: BatchNorm statistics over chunks of this "
                            "many samples, whatever the batch (0: off)")
    group.add_argument("--max-micro-batch", type=nonnegative_int, default=0, metavar="SAMPLES",
                       help="most samples per forward/backward in a process; larger shares of "
                            "the batch accumulate gradients over micro-batches (0: off)")
    group.add_argument("--batch-lars", action="store_true", default=False,
                       help="LARS (with --trust-coefficient, --lars-clip) instead of momentum SGD "
                            "(with --nesterov)")


class GrowingBatchPlan(Plan):
    """Momentum SGD (or LARS) whose learning rate and batch follow a BatchSizeSchedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: BatchSizeSchedule, *,
                 warmup_epochs: float, max_micro_batch: int):
        super().__init__(optimizer, None, schedule.batch_size)
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.max_micro_batch = max_micro_batch

    def batch_size(self, epoch: int) -> int:
        return self.schedule.at(epoch)[1]

    def lr(self, epoch: float) -> float:
        """The learning rate at ``epoch`` (fractional: the position within the epoch):
        the schedule's, ramped linearly from 0 over the warm-up epochs."""
        lr = self.schedule.at(int(epoch))[0]
        if epoch < self.warmup_epochs:
            lr *= epoch / self.warmup_epochs
        return lr

    def forward_backward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                         total: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The rate of this update, from where the batch sits in the run: the sampler has
        # just handed it out, so `taken` counts it.
        epoch = trainer.epoch
        position = epoch + (trainer.batches.taken(epoch) - 1) / trainer.batches.num_batches(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(position)

        if not self.max_micro_batch or len(x) <= self.max_micro_batch:
            return super().forward_backward(trainer, x, y, total)
        # Each micro-batch's mean loss is weighted by its size * K / total, as the whole
        # share's summed loss would be: DDP's average over the K processes is then the
        # mean gradient over the global batch. Only the last backward synchronises.
        with trainer.autocast():
            stats = accumulate_gradients(
                trainer.net, x, y, lambda out, target: F.cross_entropy(out.float(), target),
                self.max_micro_batch, global_batch_size=total,
                world_size=trainer.runtime.world_size, scaler=trainer.scaler)
        return (torch.tensor(stats.loss_sum, dtype=torch.float64, device=x.device),
                torch.tensor(stats.correct, dtype=torch.int64, device=x.device))


def _schedule(ctx: Context) -> BatchSizeSchedule:
    args = ctx.args
    if args.decay != "step":
        raise ConfigError("--decay: --method growing-batch follows a step schedule: give --decay step "
                          "with --decay-epochs and --decay-gamma (the noise scale falls by "
                          "1/gamma at each of those epochs)")
    if not args.decay_gamma < 1:
        raise ConfigError(f"--decay-gamma: expected a factor below 1 (0.2: the noise scale falls "
                          f"5-fold at each milestone), got {args.decay_gamma}")
    if args.max_batch and args.max_batch < args.batch_size:
        raise ConfigError(f"--max-batch: {args.max_batch} is less than --batch-size {args.batch_size}")
    schedule = BatchSizeSchedule(peak_lr(args), args.batch_size, args.decay_epochs,
                                 1.0 / args.decay_gamma, max_batch=args.max_batch or None,
                                 mode=_MODES[args.batch_schedule])
    for phase in schedule.phases:
        try:
            ctx.steps_per_epoch(phase.batch_size)
        except ConfigError as e:
            why = str(e).split(": ", 1)[-1]
            raise ConfigError(f"--max-batch: the batch grows to {phase.batch_size} at epoch "
                              f"{phase.start_epoch}: {why}; cap it with --max-batch") from None
    return schedule


def _prepare_model(args: argparse.Namespace, model: torch.nn.Module) -> None:
    if args.ghost_batch:
        # In place: the trainer's model is this object, and the parameters are the same
        # tensors (checkpoints of either kind load into the other).
        convert_to_ghost_bn(model, args.ghost_batch)


def build_growing_batch(ctx: Context) -> Plan:
    args = ctx.args
    schedule = _schedule(ctx)
    optimizer = (lars_optimizer if args.batch_lars else sgd_optimizer)(ctx, schedule.lr)
    return GrowingBatchPlan(optimizer, schedule, warmup_epochs=args.warmup_epochs,
                              max_micro_batch=args.max_micro_batch)


register(Method(
    "growing-batch",
    "grow the batch instead of decaying the learning rate (Smith, Kindermans, Le 2018): "
    "--batch-schedule, --max-batch, --ghost-batch, --max-micro-batch",
    build_growing_batch, _arguments,
    # docs/results.md, "Growing the batch instead of decaying the learning rate"
    # (bench/experiments/growing_batch.py; 99.26% mean over 3 seeds at width 0.5): batch 24
    # at lr 0.05, 1 warm-up epoch, the noise scale divided by 5 at epochs 10 and 20 of 30,
    # the batch capped at 360 (a quarter of the training set).
    recipe={"batch_size": 24, "base_batch_size": 24, "lr": 0.05, "epochs": 30, "warmup_epochs": 1.0,
            "decay": "step", "decay_epochs": (10, 20), "decay_gamma": 0.2, "max_batch": 360},
    prepare_model=_prepare_model,
))

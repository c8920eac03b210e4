"""``delayed`` and ``async-sim``: training on gradients that are ``tau`` steps stale.

``delayed`` is data parallelism whose all-reduce of step ``t`` is applied at step
``t + tau``, so that communication overlaps the next ``tau`` steps of compute
(:class:`lbkernels.distributed.DelayedGradients`). ``async-sim`` simulates ``tau + 1``
asynchronous workers in one process (:class:`lbkernels.distributed.AsyncSimulator`).
Both follow the same dynamics (docs/algorithms.md section 3): pair them with shifted
momentum (one buffer per worker) and a learning rate scaled down for the delay
(:func:`lbkernels.schedules.delay_scaled_lr`).
"""

from __future__ import annotations

import argparse
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lbkernels.distributed import AsyncSimulator, DelayedGradients, delayed_allreduce_hook
from lbkernels.optim import LARS, ShiftedMomentumSGD, lars_param_groups
from lbkernels.schedules import delay_scaled_lr

from ..argtypes import nonnegative_int
from ..config import ConfigError
from .plan import Context, Method, Plan, decay_groups, lr_schedule, peak_lr, register
from .sgd import SGD_RECIPE

if TYPE_CHECKING:
    from ..loop import Trainer


def _arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--delay", type=nonnegative_int, default=1, metavar="TAU",
                       help="delayed, async-sim: steps between a gradient and its use "
                            "(0: synchronous training)")
    group.add_argument("--lr-rule", choices=("stability", "inverse", "none"), default="stability",
                       help="delayed, async-sim: the peak learning rate is the synchronous one "
                            "times sin(pi / (4 tau + 2)) (stability), 1 / (tau + 1) (inverse) "
                            "or 1 (none)")
    group.add_argument("--momentum-kind", choices=("shifted", "standard", "none"), default="shifted",
                       help="delayed, async-sim: one momentum buffer per worker (shifted), one "
                            "for all (standard), or no momentum (none; ignores --momentum)")
    group.add_argument("--delay-lars", action="store_true", default=False,
                       help="delayed, async-sim: LARS trust ratios (with --trust-coefficient) "
                            "on the weights of convolution and linear layers")


def _optimizer(ctx: Context) -> torch.optim.Optimizer:
    """The optimizer of --momentum-kind at the delay-scaled peak learning rate."""
    args = ctx.args
    tau = args.delay
    lr = peak_lr(args)
    if args.lr_rule != "none" and lr > 0:
        lr = delay_scaled_lr(lr, tau, args.lr_rule)
    if args.momentum_kind == "standard":
        # One buffer for every worker: the plain optimizers, which know nothing of the delay.
        if args.delay_lars:
            return LARS(lars_param_groups(ctx.model, args.weight_decay), lr=lr,
                        momentum=args.momentum, trust_coefficient=args.trust_coefficient)
        return torch.optim.SGD(decay_groups(ctx.model, args.weight_decay), lr=lr, momentum=args.momentum)
    # Without momentum there are no buffers, and this is plain SGD (or LARS) whatever tau.
    momentum = args.momentum if args.momentum_kind == "shifted" else 0.0
    return ShiftedMomentumSGD(lars_param_groups(ctx.model, args.weight_decay), lr=lr,
                              momentum=momentum, delay=tau, lars=args.delay_lars,
                              trust_coefficient=args.trust_coefficient)


def _reject_fp16(args: argparse.Namespace, method: str) -> None:
    if args.amp == "fp16":
        raise ConfigError(
            f"--amp fp16: --method {method} steps the optimizer without the loss scaler "
            f"(a gradient would be unscaled with a scale set steps later); use --amp bf16 or none")


# -- delayed ---------------------------------------------------------------------------------------
class DelayedPlan(Plan):
    """Applies at every step the gradient (averaged over processes) of ``tau`` steps ago.

    The first ``tau`` steps of a run apply nothing: the weights stay where they are until
    the first gradient comes out of the queue. The learning-rate schedule still advances
    at every step, so that it keeps its place in the epochs.

    The queue restarts, dropping the gradients in flight, when a step is skipped for a
    non-finite loss (its gradient must never be applied, and it is already queued: DDP's
    comm hook ran during its backward) and when a run resumes (a checkpoint does not hold
    the gradients in flight). Either way the next ``tau`` steps apply nothing again, so a
    resumed run is not bitwise the uninterrupted one: it has ``tau`` fewer updates.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 batch_size: int, delayed: DelayedGradients, distributed: bool):
        super().__init__(optimizer, scheduler, batch_size,
                         comm_hook=(delayed, delayed_allreduce_hook) if distributed else None)
        self.delayed = delayed
        self.distributed = distributed
        self._queued_unstepped = False  # a gradient was queued and its step never came

    def forward_backward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                         total: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._queued_unstepped:
            # The loop skipped the last step (non-finite loss on some process): every
            # process restarts its queue here, at the same step.
            self.delayed.drain()
        result = super().forward_backward(trainer, x, y, total)
        if not self.distributed:
            # What the comm hook does during a distributed backward.
            self.delayed.record(p for g in self.optimizer.param_groups for p in g["params"])
        self._queued_unstepped = True
        return result

    def step(self, scaler: torch.amp.GradScaler) -> bool:
        self._queued_unstepped = False
        if self.delayed.step(self.optimizer):
            self.scheduler.step()
            return True
        # Nothing applied (the queue is filling): the schedule advances all the same, and
        # torch's warning that the optimizer has not stepped yet is expected.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        return False

    def on_train_end(self, trainer: Trainer) -> None:
        # The all-reduces in flight must finish before the process group goes away.
        self.delayed.drain()


def build_delayed(ctx: Context) -> Plan:
    args = ctx.args
    _reject_fp16(args, "delayed")
    optimizer = _optimizer(ctx)
    return DelayedPlan(optimizer, lr_schedule(ctx, optimizer), args.batch_size,
                         DelayedGradients(args.delay), distributed=ctx.world_size > 1)


register(Method(
    "delayed", "data parallelism whose all-reduce overlaps the next --delay steps (gradients "
    "applied --delay steps late; Giladi et al. 2020)",
    build_delayed, _arguments,
    # The synchronous rate of --method sgd's recipe (lr 1 at batch 360, step decay at 50% and
    # 75% of 30 epochs), scaled down for the delay by --lr-rule stability, with shifted
    # momentum: the rule of docs/results.md, "Delayed gradients and shifted momentum".
    recipe={**SGD_RECIPE, "momentum_kind": "shifted", "lr_rule": "stability"},
))


# -- async-sim -------------------------------------------------------------------------------------
class _NonFiniteLoss(Exception):
    """Raised from the simulator's closure to leave its step before the update."""


class AsyncSimPlan(Plan):
    """Asynchronous SGD with ``tau + 1`` workers in a round robin, simulated in one process.

    Each forward and backward runs on the weights the worker whose turn it is holds, and
    the simulator applies the update within the same call, so :meth:`step` only advances
    the schedule. A step with a non-finite loss leaves the simulator before the update:
    no weight, buffer or worker changes, and the same worker takes the next batch. The
    checkpoint holds the simulator's state (every worker's weights): a resumed run
    continues exactly.
    """

    stateful = ("simulator",)

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 batch_size: int, simulator: AsyncSimulator):
        super().__init__(optimizer, scheduler, batch_size)
        self.simulator = simulator

    def forward_backward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                         total: int) -> tuple[torch.Tensor, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with trainer.autocast():
                out = trainer.net(x)
            loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
            outputs["loss"], outputs["correct"] = loss_sum.detach(), (out.argmax(1) == y).sum()
            if not torch.isfinite(loss_sum):
                raise _NonFiniteLoss
            # As the default step scales it (one process): the mean gradient of the batch.
            (loss_sum * (trainer.runtime.world_size / total)).backward()
            return loss_sum

        try:
            self.simulator.step(closure)
        except _NonFiniteLoss:
            pass  # the loop sees the loss and skips the step
        return outputs["loss"], outputs["correct"]

    def step(self, scaler: torch.amp.GradScaler) -> bool:
        self.scheduler.step()  # the simulator stepped the optimizer in forward_backward
        return True


def build_async_sim(ctx: Context) -> Plan:
    args = ctx.args
    if ctx.world_size > 1:
        raise ConfigError(
            f"--method async-sim: simulates asynchronous workers in a single process, not under "
            f"torchrun ({ctx.world_size} processes); for delayed gradients across processes "
            f"use --method delayed")
    _reject_fp16(args, "async-sim")
    optimizer = _optimizer(ctx)
    return AsyncSimPlan(optimizer, lr_schedule(ctx, optimizer), args.batch_size,
                          AsyncSimulator(ctx.model, optimizer, args.delay))


register(Method(
    "async-sim", "asynchronous SGD with --delay + 1 workers in a round robin, simulated in one "
    "process (Giladi et al. 2020)",
    build_async_sim,
    # docs/results.md, "Delayed gradients and shifted momentum" (bench/experiments/delayed.py):
    # batch 32 at the synchronous lr 0.1, 1 warm-up epoch then (1 - t)^2, shifted momentum at
    # the stability rule's rate (tau 8: 96.02% in 20 epochs, 97.04% in 40 with the MLP).
    recipe={"batch_size": 32, "base_batch_size": 32, "lr": 0.1, "epochs": 20, "warmup_epochs": 1.0,
            "decay": "poly", "poly_power": 2.0, "momentum_kind": "shifted", "lr_rule": "stability"},
))

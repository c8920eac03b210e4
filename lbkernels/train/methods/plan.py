"""What a training method is: the :class:`Plan` the trainer drives, the :class:`Method`
registry behind ``--method``, and the building blocks the methods share (the linearly
scaled peak rate, the warm-up and decay schedule, weight-decay groups).

A leaf of the methods package: every method module imports it, and it imports none
of them (nor the trainer, but for type names).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lbkernels.optim import lars_param_groups
from lbkernels.schedules import linear_scaled_lr, warmup_multistep

if TYPE_CHECKING:
    from ..loop import Trainer


@dataclass
class Context:
    """What a method builds its plan from."""

    args: argparse.Namespace
    model: nn.Module  # on its device, not yet wrapped in DistributedDataParallel
    steps_per_epoch: Callable[[int], int]  # global batch size -> steps in one epoch
    rank: int
    world_size: int


class Plan:
    """A method's part in a run. The trainer calls these methods; a method that needs
    more than an optimizer and a schedule subclasses and overrides what it changes.

    Args:
        optimizer, scheduler: stepped once per update (the scheduler counts updates);
            no scheduler when the method sets the learning rate itself.
        batch_size: the global batch, constant; override :meth:`batch_size` to vary it.
        comm_hook: ``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``,
            used when the run is distributed.
    """

    # Attributes whose own state_dict the checkpoint holds beside the optimizer's and the
    # scheduler's, under their names (async-sim: "simulator"; swa: "averager").
    stateful: tuple[str, ...] = ()

    def __init__(self, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 batch_size: int, comm_hook: tuple[Any, Callable] | None = None):
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.comm_hook = comm_hook
        self._batch_size = batch_size

    def batch_size(self, epoch: int) -> int:
        """The global batch of ``epoch`` (0-based)."""
        return self._batch_size

    def forward_backward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                         total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward on this process's share (x, y) of a global batch of
        ``total`` samples; returns the share's summed loss and correct count (detached).

        DDP averages gradients over the K processes: scaling each share's summed loss by
        K / total makes that average the mean gradient of the global batch, also when
        the shares differ in size.
        """
        with trainer.autocast():
            out = trainer.net(x)
        loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
        trainer.scaler.scale(loss_sum * (trainer.runtime.world_size / total)).backward()
        return loss_sum.detach(), (out.argmax(1) == y).sum()

    def step(self, scaler: torch.amp.GradScaler) -> bool:
        """One update from the gradients of the current batch (already averaged over
        processes by DDP or the comm hook); False when it applied nothing, so that the
        metrics count parameter updates, not steps."""
        scaler.step(self.optimizer)
        scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first step of ``epoch`` (also when a run resumes inside it)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """After the last step of ``epoch``, before it is evaluated."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch, or when the run stops early (before the process group
        is destroyed)."""

    def eval_context(self, trainer: Trainer) -> contextlib.AbstractContextManager:
        """A context in which the model holds the weights to evaluate and checkpoint
        (extrapolated SGD: the anchors, while the parameters hold the extrapolated
        point); the weights trained on are back when it exits."""
        return contextlib.nullcontext()

    def attach(self, trainer: Trainer) -> None:
        """Once the trainer has built its model, data and runtime, before a resumed run's
        state is restored and the model is wrapped for data parallelism: a method that
        swaps in other batches or a sub-group runtime keeps the trainer here."""

    def num_epochs(self, epochs: int) -> int:
        """Epochs of the run (``epochs`` is --epochs); asked again after every epoch, so
        a method whose length depends on the run (SWAP) can change it."""
        return epochs

    def metrics(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        """Extra columns of ``epoch``'s metrics row (``phase``), after it is evaluated."""
        return {}

    def shared_state(self) -> bool:
        """Whether every process holds the same weights and state, so that the first
        process's checkpoint is everyone's; False (SWAP's phase 2): each process also
        writes and resumes from its own."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue the method exactly."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        for name in self.stateful:
            state[name] = getattr(self, name).state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for name in self.stateful:
            getattr(self, name).load_state_dict(state[name])


@dataclass(frozen=True)
class Method:
    """A ``--method``. ``recipe`` maps option names (``lr``, ``decay_epochs``, ...) to the
    values the method takes when no flag, config file or resumed run gives one; its
    ``decay_epochs`` are epochs of its own ``epochs`` and move with ``--epochs``
    (``lbkernels.train.cli`` applies it)."""

    name: str
    summary: str  # one line for --help
    build: Callable[[Context], Plan]
    add_arguments: Callable[[argparse._ArgumentGroup], None] = lambda group: None
    recipe: Mapping[str, Any] = field(default_factory=dict)
    # Changes the model's modules (in place) before it is sharded or wrapped and before
    # ``build``: FSDP's shards stay attached to the modules they were made on.
    prepare_model: Callable[[argparse.Namespace, nn.Module], None] = lambda args, model: None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


# -- building blocks shared by the methods ----------------------------------------------------
def peak_lr(args: argparse.Namespace) -> float:
    """--lr scaled from --base-batch-size to --batch-size by the linear scaling rule."""
    return linear_scaled_lr(args.lr, args.batch_size, args.base_batch_size)


def lr_schedule(ctx: Context, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over --warmup-epochs, then --decay (per update, at --batch-size)."""
    args = ctx.args
    steps = ctx.steps_per_epoch(args.batch_size)
    total = steps * args.epochs
    warmup = min(round(args.warmup_epochs * steps), total)
    if args.decay == "step":
        factor = warmup_multistep(warmup, [e * steps for e in args.decay_epochs], args.decay_gamma)
    else:
        ramp = warmup_multistep(warmup)
        span = max(total - warmup, 1)

        def factor(step: int) -> float:
            return ramp(step) * (1.0 - min(max(step - warmup, 0), span) / span) ** args.poly_power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on weights only, not on biases and
    normalisation parameters (for optimizers without LARS's exclusion flag)."""
    return [{k: v for k, v in g.items() if k != "lars_exclude"}
            for g in lars_param_groups(model, weight_decay)]

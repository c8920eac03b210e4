"""``extrap`` and ``extrap-postlocal``: extrapolated SGD (Lin, Kong, Stich, Jaggi, ICML
2020), alone or followed by post-local SGD (Lin, Stich, Patel, Jaggi, ICLR 2020).

``extrap`` trains with :class:`lbkernels.optim.ExtrapSGD` (docs/algorithms.md section 2):
the model's parameters hold the extrapolated point ``w = x - gamma * g^k`` where the next
forward and backward run, and the optimizer keeps the anchor ``x``, the real iterate.
The run evaluates and checkpoints the anchor (``Plan.eval_context``); the checkpoint
also holds ``w``, so a resumed run continues bit for bit. Under ``torchrun`` the comm hook
:func:`lbkernels.distributed.extrap_allreduce_hook` keeps each process's local gradient
``g^k`` before DDP averages it; ``gamma = --extrap-scale * lr / K``.

``extrap-postlocal`` (section 2.3) runs the same until ``--switch-epoch`` (default: the
first of ``--decay-epochs``), then local steps: no gradient all-reduce, each process on
its own share of the batch with its own momentum, the anchors averaged over the
processes every ``--local-steps`` steps (:class:`lbkernels.distributed.PostLocalSGD`).
The extrapolation is switched off from the switch on (``gamma = 0``: ExtrapSGD is then
Nesterov SGD, the paper's remark on Algorithm 1) unless ``--extrap-in-local-phase``.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lbkernels.distributed import PostLocalSGD, average_parameters, extrap_allreduce_hook
from lbkernels.optim import ExtrapSGD, lars_param_groups

from ..argtypes import nonnegative_float, nonnegative_int, positive_int
from ..config import ConfigError
from .plan import Context, Method, Plan, lr_schedule, peak_lr, register
from .sgd import SGD_RECIPE

if TYPE_CHECKING:
    from ..loop import Trainer

EXTRAPOLATIONS = ("past_grad", "gaussian", "uniform", "weight", "filter")


def _arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--extrap-scale", type=nonnegative_float, default=1.0,
                       help="extrap, extrap-postlocal: the extrapolation rate is this times "
                            "lr / K (the learning rate of one process's share of the batch)")
    group.add_argument("--extrapolation", choices=EXTRAPOLATIONS, default="past_grad",
                       help="extrap, extrap-postlocal: w = x - gamma * (past local gradient), or "
                            "x plus noise of --noise-scale: gaussian, uniform, weight "
                            "(uniform times |x|), filter (SmoothOut, per output filter)")
    group.add_argument("--noise-scale", type=nonnegative_float, default=0.0,
                       help="extrap, extrap-postlocal: amplitude of the noise variants of "
                            "--extrapolation")
    group.add_argument("--noise-anneal", action="store_true", default=False,
                       help="extrap, extrap-postlocal: anneal the noise as (1 + t)^-0.275")
    group.add_argument("--extrap-lars", action="store_true", default=False,
                       help="extrap, extrap-postlocal: LARS trust ratios (with "
                            "--trust-coefficient, --lars-clip) on the weights of convolution "
                            "and linear layers")
    group.add_argument("--switch-epoch", type=nonnegative_int, default=None, metavar="EPOCH",
                       help="extrap-postlocal: the first epoch of local steps (default: the first "
                            "of --decay-epochs, with --decay step)")
    group.add_argument("--local-steps", type=positive_int, default=4, metavar="H",
                       help="extrap-postlocal: local steps between averages of the weights")
    group.add_argument("--extrap-in-local-phase", action="store_true", default=False,
                       help="extrap-postlocal: keep extrapolating after --switch-epoch")


def _optimizer(ctx: Context) -> ExtrapSGD:
    args = ctx.args
    if args.extrapolation != "past_grad" and args.noise_scale == 0:
        raise ConfigError(f"--noise-scale: --extrapolation {args.extrapolation} adds noise of "
                          f"this amplitude; give a value > 0 (0 would be plain SGD)")
    if args.extrapolation == "past_grad" and (args.noise_scale or args.noise_anneal):
        raise ConfigError("--noise-scale: only used with a noise --extrapolation "
                          "(gaussian, uniform, weight, filter), not past_grad")
    # Weight decay and LARS on weights only, not on biases and normalisation parameters.
    # Each process draws its own noise (the smoothing averages the gradients taken at K
    # perturbed points): group i of rank r is keyed seed + 10000 r + i (two groups here).
    return ExtrapSGD(lars_param_groups(ctx.model, args.weight_decay), lr=peak_lr(args),
                     momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0,
                     extrap_scale=args.extrap_scale, extrapolation=args.extrapolation,
                     noise_scale=args.noise_scale, noise_anneal=args.noise_anneal,
                     seed=args.seed + 10_000 * ctx.rank,
                     lars=args.extrap_lars, trust_coefficient=args.trust_coefficient,
                     clip=args.lars_clip)


class ExtrapPlan(Plan):
    """ExtrapSGD in the training loop: the anchors are what is evaluated and saved.

    The checkpoint's model holds the anchors ``x``; the plan's own state holds the
    extrapolated point ``w`` the parameters carry between steps, which a resumed run
    puts back (the anchors alone would lose this step's extrapolation).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 batch_size: int, extrap: ExtrapSGD, comm_hook: tuple | None):
        super().__init__(optimizer, scheduler, batch_size, comm_hook=comm_hook)
        self.extrap = extrap
        self._pending: list[torch.Tensor] | None = None  # w to put back after a resume

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.extrap.param_groups for p in g["params"]]

    def eval_context(self, trainer: Trainer) -> contextlib.AbstractContextManager:
        return self.extrap.anchor_weights()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["extrapolated"] = [p.detach().clone() for p in self._params()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self._params()
        saved = state["extrapolated"]
        if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params)):
            raise ConfigError("--resume: the checkpoint's extrapolated weights do not fit this "
                              "model (another --model or --width?)")
        super().load_state_dict(state)
        self._put_back(saved)
        # Again before the next step: the trainer wraps the model in DDP after this, and
        # DDP's construction broadcasts the first process's parameters, which would
        # overwrite the other processes' own w in the local phase of extrap-postlocal.
        self._pending = saved

    @torch.no_grad()
    def _put_back(self, saved: list[torch.Tensor]) -> None:
        for p, s in zip(self._params(), saved):
            p.copy_(s)

    def forward_backward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                         total: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is not None:
            self._put_back(self._pending)
            self._pending = None
        return super().forward_backward(trainer, x, y, total)


def build_extrap(ctx: Context) -> Plan:
    args = ctx.args
    optimizer = _optimizer(ctx)
    hook = (optimizer, extrap_allreduce_hook) if ctx.world_size > 1 else None
    return ExtrapPlan(optimizer, lr_schedule(ctx, optimizer), args.batch_size, optimizer, hook)


register(Method(
    "extrap", "extrapolated SGD: Nesterov steps from the anchor, gradients taken at the point "
    "extrapolated with each process's past local gradient (Lin et al. 2020)",
    build_extrap, _arguments,
    # docs/results.md, "Extrapolated SGD against Nesterov mini-batch SGD": --method sgd's
    # recipe at lr 2 (where extrapolation beat Nesterov SGD's training loss; 98.06% mean there
    # on two processes, gamma = lr / 2). In one process gamma = scale * lr: scale 0.5 keeps
    # that gamma (scale 1, gamma = lr, destabilises a single large batch).
    recipe={**SGD_RECIPE, "lr": 2.0, "extrap_scale": 0.5},
))


# -- extrap-postlocal --------------------------------------------------------------------------
class AnchorPostLocalSGD(PostLocalSGD):
    """PostLocalSGD over an ExtrapSGD, whose iterate is the anchor ``x``: an average
    averages the anchors, and moves each process's ``w`` with its anchor, keeping the
    process's own extrapolation ``w - x`` (zero when the extrapolation is off, so that
    then ``w = x = mean x`` exactly)."""

    @torch.no_grad()
    def average(self) -> None:
        if not dist.is_initialized() or dist.get_world_size(self.group) <= 1:
            return
        state = self.optimizer.state
        params = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and "anchor" in state.get(p, {})]
        if not params:
            return
        anchors = [state[p]["anchor"] for p in params]
        torch._foreach_sub_(params, anchors)  # w - x
        average_parameters(anchors, self.group)
        torch._foreach_add_(params, anchors)


class ExtrapPostLocalPlan(ExtrapPlan):
    """ExtrapSGD until ``switch_step``, then local steps averaged every ``period``."""

    def __init__(self, optimizer: AnchorPostLocalSGD, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 batch_size: int, extrap: ExtrapSGD, distributed: bool, extrap_in_local_phase: bool):
        hook = optimizer.comm_hook(inner=(extrap, extrap_allreduce_hook)) if distributed else None
        super().__init__(optimizer, scheduler, batch_size, extrap, hook)
        self.distributed = distributed
        self.extrap_in_local_phase = extrap_in_local_phase

    def forward_backward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                         total: int) -> tuple[torch.Tensor, torch.Tensor]:
        result = super().forward_backward(trainer, x, y, total)
        if self.distributed and self.optimizer.local and self.extrap_in_local_phase:
            # The hook no longer sees the gradients: .grad is the local gradient, unchanged
            # until the step.
            self.extrap.capture_local_grads(copy=False)
        return result

    def shared_state(self) -> bool:
        # After the first local step every process has its own momentum (and, between
        # averages, its own weights): each checkpoints and resumes its own state.
        return not (self.distributed and self.optimizer.step_count > self.optimizer.switch_step)

    def metrics(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        # The phase of the epoch's last step.
        return {"phase": "local" if self.optimizer.step_count > self.optimizer.switch_step else "extrap"}

    def step(self, scaler: torch.amp.GradScaler) -> bool:
        if not self.extrap_in_local_phase and self.optimizer.step_count + 1 >= self.optimizer.switch_step:
            # This step writes the point of the first local forward: make it the anchor.
            for group in self.extrap.param_groups:
                group["extrapolation"], group["extrap_lr"] = "past_grad", 0.0
        return super().step(scaler)


def build_extrap_postlocal(ctx: Context) -> Plan:
    args = ctx.args
    if args.amp == "fp16":
        raise ConfigError("--amp fp16: --method extrap-postlocal does not pass the loss scale "
                          "through its post-local wrapper; use --amp bf16 or none")
    switch_epoch = args.switch_epoch
    if switch_epoch is None:
        if args.decay != "step" or not args.decay_epochs:
            raise ConfigError("--switch-epoch: give the first epoch of local steps, or --decay step "
                              "with --decay-epochs (the default is the first of them)")
        switch_epoch = args.decay_epochs[0]
    if switch_epoch > args.epochs:
        # Equal is allowed: a run cut there switches when it is resumed for more epochs.
        raise ConfigError(f"--switch-epoch: {switch_epoch} is after --epochs {args.epochs}: "
                          f"the run would never take a local step")
    extrap = _optimizer(ctx)
    switch_step = switch_epoch * ctx.steps_per_epoch(args.batch_size)
    optimizer = AnchorPostLocalSGD(extrap, switch_step=switch_step, period=args.local_steps)
    return ExtrapPostLocalPlan(optimizer, lr_schedule(ctx, extrap), args.batch_size, extrap,
                                 distributed=ctx.world_size > 1,
                                 extrap_in_local_phase=args.extrap_in_local_phase)


register(Method(
    "extrap-postlocal", "extrap until --switch-epoch, then post-local SGD: local Nesterov steps, "
    "weights averaged every --local-steps (Lin et al. 2020)",
    build_extrap_postlocal,
    # The same experiment's extrap-SGD + post-local SGD (two processes, 98.06% mean): lr 2,
    # gamma = lr / K, local steps from the first decay (epoch 15 of 30), averaged every 4.
    recipe={**SGD_RECIPE, "lr": 2.0, "extrap_scale": 1.0, "local_steps": 4},
))

"""``sgd``, ``lars`` and ``lamb``: momentum SGD, LARS and LAMB with the linear scaling
rule, warm-up and decay; their optimizers serve the other methods too."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from lbkernels.optim import LAMB, LARS, lamb_param_groups, lars_param_groups

from ..argtypes import positive_float
from .plan import Context, Method, Plan, decay_groups, lr_schedule, peak_lr, register


# -- sgd -------------------------------------------------------------------------------------------
def _sgd_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                       help="Nesterov momentum")


def sgd_optimizer(ctx: Context, lr: float) -> torch.optim.SGD:
    """Momentum SGD of the run's options (--momentum, --nesterov, --weight-decay) at ``lr``."""
    args = ctx.args
    return torch.optim.SGD(decay_groups(ctx.model, args.weight_decay), lr=lr, momentum=args.momentum,
                           nesterov=args.nesterov and args.momentum > 0)


def scheduled(make_optimizer: Callable[[Context, float], torch.optim.Optimizer],
              ) -> Callable[[Context], Plan]:
    """The factory of a method that is ``make_optimizer`` at the peak rate under the
    warm-up and decay schedule, at a constant batch (sgd, lars, lamb)."""
    def build(ctx: Context) -> Plan:
        optimizer = make_optimizer(ctx, peak_lr(ctx.args))
        return Plan(optimizer, lr_schedule(ctx, optimizer), ctx.args.batch_size)

    return build


# Nesterov SGD as in docs/results.md, "Extrapolated SGD against Nesterov mini-batch SGD":
# batch 360 (a quarter of digits' 1437 training samples), lr 1 (the best of 0.4, 1, 2, 4 for
# the final training loss), 3 warm-up epochs, the rate divided by 10 at 50% and 75% of 30
# epochs (97.78% mean test accuracy there, at width 0.5 on two processes).
SGD_RECIPE = {"batch_size": 360, "base_batch_size": 360, "lr": 1.0, "epochs": 30,
              "warmup_epochs": 3.0, "decay": "step", "decay_epochs": (15, 23), "decay_gamma": 0.1}

register(Method(
    "sgd", "momentum SGD with the linear scaling rule and warm-up (Goyal et al. 2017)",
    scheduled(sgd_optimizer), _sgd_arguments, recipe=SGD_RECIPE,
))


# -- lars ------------------------------------------------------------------------------------------
def _lars_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--trust-coefficient", type=positive_float, default=0.001,
                       help="LARS trust coefficient: the layer's rate is tc * ||w|| / ||g + wd w||")
    group.add_argument("--lars-clip", action="store_true", default=False,
                       help="clip the layer-wise rate at the global one (LARC)")


def lars_optimizer(ctx: Context, lr: float) -> LARS:
    """LARS of the run's options (--momentum, --weight-decay, --trust-coefficient,
    --lars-clip) at ``lr``."""
    args = ctx.args
    return LARS(lars_param_groups(ctx.model, args.weight_decay), lr=lr, momentum=args.momentum,
                trust_coefficient=args.trust_coefficient, clip=args.lars_clip)


register(Method(
    "lars", "LARS, layer-wise adaptive rates (You et al. 2017), fused kernels of lbkernels.optim",
    scheduled(lars_optimizer), _lars_arguments,
    # The demo of docs/results.md, "The training command" (97.50% on seed 0, 98.61-99.17% on
    # seeds 1-4): lr 5 at batch 256, so 10 at 512, over 5 warm-up epochs, then (1 - t)^2.
    recipe={"batch_size": 512, "base_batch_size": 256, "lr": 5.0, "epochs": 40,
            "warmup_epochs": 5.0, "decay": "poly", "poly_power": 2.0},
))


# -- lamb ------------------------------------------------------------------------------------------
def _lamb_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lamb-clip", action="store_true", default=False,
                       help="clip the layer-wise ratio ||w|| / ||u|| at 1 (LAMBC)")
    group.add_argument("--lamb-max-grad-norm", type=positive_float, default=None, metavar="NORM",
                       help="first clip the gradients to this global norm (timm and apex use 1.0)")


def lamb_optimizer(ctx: Context, lr: float) -> LAMB:
    """LAMB of the run's options at ``lr``: --momentum is beta1, --weight-decay the decay
    inside the update (biases and normalisation weights: none, ratio 1), --lamb-clip,
    --lamb-max-grad-norm."""
    args = ctx.args
    return LAMB(lamb_param_groups(ctx.model, args.weight_decay), lr=lr,
                betas=(args.momentum, 0.999), clip=args.lamb_clip,
                max_grad_norm=args.lamb_max_grad_norm)


# lars's schedule with LAMB's rate (docs/results.md, "LAMB on digits"): on digits, seed 0,
# lr 0.005 / 0.01 / 0.02 at 256 gave 95.00 / 98.61 / 98.61% test accuracy; 0.01, the
# middle, and timm's and apex's weight decay 0.01.
LAMB_RECIPE = {"batch_size": 512, "base_batch_size": 256, "lr": 0.01, "epochs": 40,
               "warmup_epochs": 5.0, "decay": "poly", "poly_power": 2.0, "weight_decay": 0.01}


register(Method(
    "lamb", "LAMB, layer-wise adaptive moments (You et al. 2020), fused kernels of lbkernels.optim",
    scheduled(lamb_optimizer), _lamb_arguments, recipe=LAMB_RECIPE,
))

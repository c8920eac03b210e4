"""The table of optimizers the generic checks run against.

Each entry builds an optimizer for a list of params (or param groups) with the
hyper-parameters it is usually run with. Adding an optimizer to the project means adding
a row here; test_optim_generic.py then applies every check to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lbkernels.optim import LARS, ExtrapAdam, ExtrapSGD, ShiftedMomentumSGD


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[..., torch.optim.Optimizer]  # make(params, impl=..., **overrides)
    state_keys: tuple[str, ...]  # per-param state expected after a step
    group_overrides: dict = field(default_factory=dict)  # a second group's different hyper-parameters
    copy_state_keys: tuple[str, ...] = ()  # state that starts as a copy of the param, not zeros


OPTIMIZERS = [
    Entry(
        "LARS",
        lambda params, impl="auto", **kw: LARS(
            params, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True,
                       "trust_coefficient": 0.02, "impl": impl, **kw}),
        ("momentum_buffer",),
        {"lr": 0.05, "weight_decay": 0.0, "lars_exclude": True},
    ),
    Entry(
        "LARS-paper-clip",
        lambda params, impl="auto", **kw: LARS(
            params, **{"lr": 0.5, "momentum": 0.9, "dampening": 0.1, "clip": True,
                       "momentum_style": "paper", "weight_decay": 1e-3, "impl": impl, **kw}),
        ("momentum_buffer", "step"),
        {"lr": 0.2, "momentum": 0.5},
    ),
    Entry(
        "ShiftedMomentumSGD-lars",
        lambda params, impl="auto", **kw: ShiftedMomentumSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "delay": 2, "weight_decay": 1e-4, "nesterov": True,
                       "lars": True, "trust_coefficient": 0.02, "impl": impl, **kw}),
        ("momentum_buffer_0", "momentum_buffer_1", "momentum_buffer_2"),
        {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "lars_exclude": True},
    ),
    Entry(
        "ExtrapSGD-nesterov",
        lambda params, impl="auto", **kw: ExtrapSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "impl": impl, **kw}),
        ("anchor", "momentum_buffer"),
        {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "extrap_scale": 0.5},
        copy_state_keys=("anchor",),
    ),
    Entry(
        "ExtrapSGD-lars",
        lambda params, impl="auto", **kw: ExtrapSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "lars": True,
                       "trust_coefficient": 0.02, "impl": impl, **kw}),
        ("anchor", "momentum_buffer"),
        {"lr": 0.05, "weight_decay": 0.0, "lars_exclude": True, "extrap_lr": 0.01},
        copy_state_keys=("anchor",),
    ),
    Entry(
        # The groups' noise is keyed by their seeds: the second group names its seed so that
        # a separate optimizer for it draws the same numbers.
        "ExtrapSGD-filter-noise",
        lambda params, impl="auto", **kw: ExtrapSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "extrapolation": "filter",
                       "noise_scale": 0.01, "noise_anneal": True, "seed": 3, "impl": impl, **kw}),
        ("anchor", "momentum_buffer"),
        {"lr": 0.05, "noise_scale": 0.02, "seed": 11},
        copy_state_keys=("anchor",),
    ),
    Entry(
        "ExtrapAdam",
        lambda params, impl="auto", **kw: ExtrapAdam(
            params, **{"lr": 0.01, "weight_decay": 1e-4, "impl": impl, **kw}),
        ("anchor", "step", "exp_avg", "exp_avg_sq"),
        {"lr": 0.005, "betas": (0.8, 0.99), "weight_decay": 1e-2, "decoupled_weight_decay": True},
        copy_state_keys=("anchor",),
    ),
]

"""Checks of the fused optimizers' param groups and of the state they load, and the
groups' hyper-parameters as the keyword arguments of their ops."""

from __future__ import annotations

from typing import Any

import torch

from .._validate import check_bool, check_number

# The hyper-parameters the ops take as one-element tensors (compiled / captured steps).
TENSOR_HYPERPARAMETERS = ("lr", "extrap_lr")


def check_numbers(group: dict, *names: str, positive: tuple[str, ...] = (), values: bool = True) -> None:
    """Each of ``names`` is a finite number >= 0 (> 0 for those in ``positive``); ``lr`` and
    ``extrap_lr`` may be one-element tensors, whose values are read only with ``values``
    (never inside a step: a host sync)."""
    for name in names:
        check_number(name, group[name], positive=name in positive,
                     tensor=name in TENSOR_HYPERPARAMETERS, read_tensor=values)


def check_betas(group: dict) -> None:
    """``group["betas"]`` is a pair of numbers in [0, 1) (Adam's moment decays)."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {b!r} (must be in [0, 1))")


def check_bools(group: dict, *names: str) -> None:
    for name in names:
        check_bool(name, group[name])


def group_args(group: dict, *names: str) -> dict[str, Any]:
    """The hyper-parameters ``names`` of ``group``, and its ``impl``, as keyword arguments
    of its op (each optimizer's hyper-parameters are named as the op's arguments)."""
    return {name: group[name] for name in (*names, "impl")}


def check_state_value(where: str, kind: str | None, value: Any, p: torch.Tensor, me: str) -> None:
    """A loaded state entry ``value`` of param ``p``: ``kind`` "param" (a floating-point
    tensor of the param's shape) or "count" (one real number); ``me``: the optimizer."""
    if kind is None:
        raise ValueError(f"{where}: {me} keeps no such state (a checkpoint of another optimizer?)")
    if value is None:
        return  # torch.optim.SGD's momentum_buffer without momentum
    if kind == "param":
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape):
            got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                   if isinstance(value, torch.Tensor) else type(value).__name__)
            raise ValueError(f"{where} is {got}; expected a floating-point tensor of the "
                             f"param's shape {tuple(p.shape)}")
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where} must hold one real number, got shape {tuple(value.shape)}")
        value = value.item()
    try:
        check_number(where, value)
    except TypeError as e:
        raise ValueError(str(e)) from None

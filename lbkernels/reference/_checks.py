"""Argument checks that several ops share; each op's own check (``check_<op>_args`` in
its reference module) calls them in its order, and every backend in Python runs that
one check, so that all reject the same calls with the same messages."""

from __future__ import annotations

import torch

from .._validate import check_scalar_tensor

# A list argument of the schemas (Tensor[]), as the dispatcher hands it over.
Tensors = list[torch.Tensor]


def check_nonnegative(**values: float) -> None:
    for name, v in values.items():
        if not v >= 0.0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {v}")


def check_betas(beta1: float, beta2: float) -> None:
    """Adam's moment decays (``extrap_adam_``, ``lamb_``): each in [0, 1)."""
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")


def check_scalars(**tensors: torch.Tensor | None) -> None:
    """Every optional one-element tensor argument (``lr_tensor``, ``grad_scale``, ...)."""
    for name, t in tensors.items():
        check_scalar_tensor(name, t)


def check_steps(params, steps) -> None:
    """Step counters: one-element fp32 tensors beside their params (the kernels read and
    write them as fp32, exact up to 2^24 steps)."""
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise TypeError(f"steps[{i}] must be a one-element float32 tensor, "
                            f"got {s.dtype} of shape {tuple(s.shape)}")
        if s.device != params[i].device:
            raise ValueError(f"steps[{i}] is on {s.device} but params[{i}] is on {params[i].device}")


def check_norm_sq(params, norm_sq: torch.Tensor | None) -> None:
    """The optional precomputed squared norms of ``lars_sgd_`` / ``extrap_sgd_``: a
    contiguous float32/float64 tensor of shape ``(2, len(params))`` on the params' device
    (row 0 the trust ratio's w, row 1 the gradient as passed). Its values are not read here:
    it may still be written by a collective in flight."""
    if norm_sq is None:
        return
    if norm_sq.layout != torch.strided:
        raise TypeError(f"norm_sq must be a dense tensor, got layout {norm_sq.layout}")
    if norm_sq.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"norm_sq must be float32 or float64, got {norm_sq.dtype}")
    if params and norm_sq.device != params[0].device:
        raise ValueError(f"norm_sq is on {norm_sq.device} but params[0] is on {params[0].device}")
    if tuple(norm_sq.shape) != (2, len(params)):
        raise ValueError(f"norm_sq must have shape (2, len(params)) = (2, {len(params)}), "
                         f"got {tuple(norm_sq.shape)}")
    if not norm_sq.is_contiguous():
        raise ValueError("norm_sq must be contiguous")

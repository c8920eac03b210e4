"""Argument checks shared by the Python backends (reference and Triton) and the Python API.

The C++ kernels perform the same checks with the same messages (``TORCH_CHECK_VALUE`` /
``TORCH_CHECK_TYPE`` surface as ``ValueError`` / ``TypeError``). Every check runs before
any tensor is written, so a rejected call changes nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor_lists(
    params: Sequence[torch.Tensor],
    *,
    same_shape: dict[str, Sequence[torch.Tensor]],
    optional: dict[str, Sequence[torch.Tensor]] = {},
    flags: dict[str, Sequence[bool]] = {},
) -> None:
    """Check ``params`` and the lists aligned with it.

    ``same_shape`` lists must match ``params`` element by element in length, shape,
    dtype and device; ``optional`` lists must be empty or as long as ``params``;
    ``flags`` lists must be as long as ``params``.
    """
    n = len(params)
    for name, xs in {**same_shape, **flags}.items():
        if len(xs) != n:
            raise ValueError(f"{name} has {len(xs)} entries but params has {n}")
    for name, xs in optional.items():
        if len(xs) not in (0, n):
            raise ValueError(f"{name} has {len(xs)} entries but params has {n} (or pass none)")
    device = params[0].device if n else None
    for i, p in enumerate(params):
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; expected a floating dtype")
        if p.layout != torch.strided:
            raise TypeError(f"params[{i}] has layout {p.layout}; expected a dense tensor")
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {device}")
        for name, xs in same_shape.items():
            x = xs[i]
            if x.layout != torch.strided:
                raise TypeError(f"{name}[{i}] has layout {x.layout}; sparse tensors are not supported")
            if x.device != device:
                raise ValueError(f"{name}[{i}] is on {x.device} but params[0] is on {device}")
            if x.dtype != p.dtype:
                raise TypeError(f"{name}[{i}] has dtype {x.dtype} but params[{i}] has {p.dtype}")
            if x.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but params[{i}] has {tuple(p.shape)}")


def check_scalar_tensor(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.numel() != 1:
        raise ValueError(f"{name} must hold exactly one element, got shape {tuple(t.shape)}")


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools and floats refused); ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value

"""Argument checks shared by the Python backends (reference and Triton) and the Python API.

The C++ kernels perform the same checks with the same messages (``TORCH_CHECK_VALUE`` /
``TORCH_CHECK_TYPE`` surface as ``ValueError`` / ``TypeError``). Every check runs before
any tensor is written, so a rejected call changes nothing.
"""

from __future__ import annotations

import math
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


def check_int(name: str, value: Any, minimum: int = 0, *, maximum: int | None = None,
              error: type[Exception] = ValueError, allow_none: bool = False) -> int | None:
    """``value`` as an int in ``[minimum, maximum]`` (None passes with ``allow_none``).

    Bools and floats are refused with ``error`` (``TypeError`` where a caller's API says a
    wrong type is one), a value out of range with ValueError; both messages name ``name``.
    """
    if value is None and allow_none:
        return None
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    try:
        if isinstance(value, bool):  # True is no count of anything
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer {bound}{' or None' if allow_none else ''}, "
                    f"got {value!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def tensor_list(name: str, value: Any) -> list[torch.Tensor]:
    """A module's parameters, or the items of an iterable, as a list; a lone tensor is
    refused (TypeError naming ``name``): iterating it would yield its rows."""
    if isinstance(value, torch.nn.Module):
        return list(value.parameters())
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a module or an iterable of tensors, not a single tensor")
    return list(value)


def check_number(name: str, value: Any, *, positive: bool = False, tensor: bool = False,
                 read_tensor: bool = True) -> None:
    """``value`` is a finite real ``>= 0`` (``> 0`` with ``positive``); bools refused.

    With ``tensor=True`` a one-element floating-point tensor is accepted too; its value is
    checked only with ``read_tensor=True``: reading it is a host sync, so inside a step
    only its shape and dtype are checked.
    """
    if isinstance(value, torch.Tensor):
        if not tensor:
            raise TypeError(f"{name} must be a number, got a tensor")
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a number or a one-element floating-point tensor, "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        if not read_tensor:
            return
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"Invalid {name}: {value} (must be finite and {'> 0' if positive else '>= 0'})")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Each gradient that is not None is dense and matches its param (shape, dtype, device),
    as the ops require; the messages are those of :func:`check_tensor_lists`.

    A Python loop (~2.5 us per tensor): to name the bad gradient once
    :func:`same_metadata` has found one.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if g.layout != torch.strided:
            raise TypeError(f"grads[{i}] has layout {g.layout}; sparse tensors are not supported")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"grads[{i}] is on {g.device} but params[{i}] is on {p.device}")


_LAYOUT, _DTYPE, _SHAPE, _DEVICE = (operator.attrgetter(a) for a in ("layout", "dtype", "shape", "device"))


def metadata(tensors: Sequence[torch.Tensor]) -> tuple[list, list, list]:
    """(dtypes, shapes, devices) of ``tensors``, for :func:`same_metadata`."""
    return [t.dtype for t in tensors], [t.shape for t in tensors], [t.device for t in tensors]


def same_metadata(tensors: Sequence[torch.Tensor], expected: tuple[list, list, list]) -> bool:
    """Whether ``tensors`` are dense with the ``expected`` :func:`metadata`: one C-level
    ``map`` per attribute, ~0.5-1 us per tensor in all (a Python loop costs ~2.5 us)."""
    if torch.compiler.is_compiling():  # traced once; dynamo cannot call an attrgetter
        return metadata(tensors) == expected and all(t.layout == torch.strided for t in tensors)
    dtypes, shapes, devices = expected
    return (set(map(_LAYOUT, tensors)) <= {torch.strided} and list(map(_DTYPE, tensors)) == dtypes
            and list(map(_SHAPE, tensors)) == shapes and list(map(_DEVICE, tensors)) == devices)

"""Reference weight averaging: running mean (SWA) and EMA (docs/algorithms.md section 4).

Both modes are one convex update per element, ``avg += r * (w - avg)``:

- ``method="swa"``: ``r = 1 / (n + 1)`` with ``n`` the number of snapshots already
  averaged, so after ``k`` updates ``avg`` is the arithmetic mean of the ``k`` snapshots;
- ``method="ema"``: ``r = 1 - decay``.

``r`` is computed once per call in the arithmetic dtype and every backend evaluates the
same expression, ``avg + r * (w - avg)``, so they agree to the last few ulps.

Dtypes: averages are kept in fp32 for fp16/bf16/fp32 params (a running mean of
thousands of snapshots would lose its late contributions in a 16-bit accumulator) and in
fp64 for fp64 params; the arithmetic runs in the averages' dtype.

The count ``n`` is a one-element int64 tensor on the params' device: exact for any
number of updates, and read by the kernels on the device (no host sync, capturable).
It counts updates in both modes; EMA does not need it and may pass None.
"""

from __future__ import annotations

import torch

from .._validate import FLOAT_DTYPES, check_scalar_tensor

METHODS = ("swa", "ema")


def average_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the average of a ``param_dtype`` parameter is kept in."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def check_average_args(averages, params, count, method, found_inf, *, count_name="count",
                       method_name="method") -> None:
    """Every check of ``average_``, before any write (the C++ kernels make the same).

    ``count_name`` and ``method_name`` are the arguments' names in the caller's schema
    (``average_count`` and ``average_method`` when folded into ``lars_sgd_``).
    """
    if method not in METHODS:
        raise ValueError(f"{method_name} must be one of {METHODS}, got {method!r}")
    n = len(params)
    if len(averages) != n:
        raise ValueError(f"averages has {len(averages)} entries but params has {n}")
    device = params[0].device if n else None
    for i, (a, p) in enumerate(zip(averages, params)):
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; expected a floating dtype")
        if p.layout != torch.strided or a.layout != torch.strided:
            raise TypeError(f"params[{i}] and averages[{i}] must be dense tensors")
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {device}")
        if a.device != device:
            raise ValueError(f"averages[{i}] is on {a.device} but params[0] is on {device}")
        if a.dtype != average_dtype(p.dtype):
            raise TypeError(f"averages[{i}] has dtype {a.dtype} but params[{i}] ({p.dtype}) "
                            f"is averaged in {average_dtype(p.dtype)}")
        if a.shape != p.shape:
            raise ValueError(f"averages[{i}] has shape {tuple(a.shape)} but params[{i}] has {tuple(p.shape)}")
    if count is None:
        if method == "swa":
            raise ValueError(f"{method_name}='swa' needs {count_name} (a one-element int64 tensor)")
    else:
        if count.numel() != 1 or count.dtype != torch.int64:
            raise TypeError(f"{count_name} must be a one-element int64 tensor, got {count.dtype} "
                            f"of shape {tuple(count.shape)}")
        if device is not None and count.device != device:
            raise ValueError(f"{count_name} is on {count.device} but params[0] is on {device}")
    check_scalar_tensor("found_inf", found_inf)


def average_(
    averages: list[torch.Tensor],
    params: list[torch.Tensor],
    count: torch.Tensor | None = None,
    *,
    method: str = "swa",
    decay: float = 0.999,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One averaging update in place: ``avg += r * (w - avg)``, then ``count += 1``.

    ``r = 1 / (count + 1)`` for ``method="swa"``, ``1 - decay`` for ``method="ema"``.
    With ``found_inf != 0`` nothing changes (averages and count bitwise).
    """
    check_average_args(averages, params, count, method, found_inf)
    skip = None if found_inf is None else found_inf != 0
    for a, w in zip(averages, params):
        acc = a.dtype
        if method == "swa":
            r = 1.0 / (count.to(a.device, acc) + 1)
        else:
            r = torch.tensor(1.0 - decay, dtype=acc, device=a.device)
        new = a + r * (w.to(acc) - a)
        if skip is not None:
            new = torch.where(skip.to(a.device), a, new)
        a.copy_(new)
    if count is not None:
        count.add_(1 if skip is None else (~skip).to(count.device, count.dtype))


def check_flat_sum(name: str, flat: torch.Tensor, world_size) -> None:
    """``world_size`` and the flat buffer ``name`` of the ops that divide a sum over the
    workers by it (``worker_mean_``, ``mean_sum_squares_``)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if flat.layout != torch.strided or flat.dim() != 1 or not flat.is_contiguous():
        raise TypeError(f"{name} must be a contiguous 1-D tensor, got shape "
                        f"{tuple(flat.shape)} and strides {flat.stride()}")
    if flat.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {flat.dtype}; expected a floating dtype")


def check_worker_mean_args(params, flat_sum, world_size) -> None:
    """Every check of ``worker_mean_``, before any write (the C++ kernels make the same)."""
    check_flat_sum("flat_sum", flat_sum, world_size)
    total = 0
    for i, p in enumerate(params):
        if p.layout != torch.strided:
            raise TypeError(f"params[{i}] has layout {p.layout}; expected a dense tensor")
        if p.dtype != flat_sum.dtype:
            raise TypeError(f"params[{i}] has dtype {p.dtype} but flat_sum has {flat_sum.dtype} "
                            "(pack one flat buffer per dtype)")
        if p.device != flat_sum.device:
            raise ValueError(f"params[{i}] is on {p.device} but flat_sum is on {flat_sum.device}")
        total += p.numel()
    if flat_sum.numel() != total:
        raise ValueError(f"flat_sum has {flat_sum.numel()} elements but the params have {total}")


def worker_mean_(params: list[torch.Tensor], flat_sum: torch.Tensor, world_size: int) -> None:
    """The cross-worker mean written back into ``params``: ``w = sum / K`` per element.

    ``flat_sum`` holds, for every param in order, the sum over the ``K = world_size``
    workers of that param's elements in row-major (logical) order, as
    ``torch.cat([p.reshape(-1) for p in params])`` packs them. The division runs in
    fp32 for fp16/bf16/fp32 params (fp64 for fp64) and is rounded once to the param's
    dtype. A true division, not a multiplication by ``1 / K``: for ``K = 3`` the two
    differ in the last bit, and every backend computes the same quotient.
    """
    check_worker_mean_args(params, flat_sum, world_size)
    acc = average_dtype(flat_sum.dtype)
    # A 0-dim tensor on the device, not a Python number: CUDA turns division by a host
    # scalar into a multiplication by its reciprocal.
    k = torch.tensor(world_size, dtype=acc, device=flat_sum.device)
    offset = 0
    for p in params:
        n = p.numel()
        mean = flat_sum[offset:offset + n].to(acc) / k
        p.copy_(mean.view(p.shape))
        offset += n

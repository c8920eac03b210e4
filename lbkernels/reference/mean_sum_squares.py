"""Reference ``mean_sum_squares_``: the averaging pass of a DDP gradient bucket that also
sums the squares of each parameter's averaged gradient (docs/algorithms.md section 1.1).

After a sum all-reduce, DDP divides each bucket by the world size: one pass that reads
and writes every gradient. LARS then reads every gradient again for ``||g||``. This op
does both in the first pass: ``g = sum / K`` in place, and for every segment ``j`` of
the flat buffer (one parameter's gradient) ``out[j] = sum(g_j^2)`` of the stored,
rounded ``g``, which ``lars_sgd_`` takes as row 1 of its ``norm_sq``.

The division is the one of ``worker_mean_``: in fp32 (fp64 for fp64 buffers), a true
division, rounded once to the buffer's dtype. The sums are float64; this oracle sums in
float64, the compiled kernels in fp32-or-better as the LARS norm pass does (fp32 vector
lanes within a 64K chunk, chunks added in float64; fp64 buffers in fp64).
"""

from __future__ import annotations

import torch

from .average import average_dtype, check_flat_sum


def check_mean_sum_squares_args(flat, sizes, world_size, out) -> None:
    """Every check of ``mean_sum_squares_``, before any write (the C++ kernels make the
    same, in lbkernels/mean_sum_squares_args.h)."""
    check_flat_sum("flat", flat, world_size)
    total = 0
    for j, n in enumerate(sizes):
        if n < 0:
            raise ValueError(f"sizes[{j}] is {n}; expected >= 0")
        total += n
    if total != flat.numel():
        raise ValueError(f"sizes add up to {total} but flat has {flat.numel()} elements")
    if out.layout != torch.strided or out.dim() != 1 or not out.is_contiguous():
        raise TypeError(f"out must be a contiguous 1-D tensor, got shape {tuple(out.shape)} "
                        f"and strides {out.stride()}")
    if out.dtype != torch.float64:
        raise TypeError(f"out must be float64, got {out.dtype}")
    if out.numel() != len(sizes):
        raise ValueError(f"out has {out.numel()} elements but sizes has {len(sizes)}")
    if out.device != flat.device:
        raise ValueError(f"out is on {out.device} but flat is on {flat.device}")


def mean_sum_squares_(flat: torch.Tensor, sizes: list[int], world_size: int,
                      out: torch.Tensor) -> None:
    """``flat = flat / world_size`` in place, then ``out[j] = sum(flat_j^2)`` (float64)
    for the ``j``-th run of ``sizes[j]`` consecutive elements of ``flat``.

    ``flat`` is a contiguous 1-D tensor whose ``sizes`` add up to its length (a DDP
    bucket: each parameter's gradient in turn); ``out`` a contiguous float64 tensor of
    ``len(sizes)`` elements on ``flat``'s device. The squares are of the stored
    (rounded) quotients: the gradient the step will read.
    """
    check_mean_sum_squares_args(flat, sizes, world_size, out)
    acc = average_dtype(flat.dtype)
    # A 0-dim tensor on the device, not a Python number: CUDA turns division by a host
    # scalar into a multiplication by its reciprocal (worker_mean_ divides the same way).
    k = torch.tensor(world_size, dtype=acc, device=flat.device)
    flat.copy_(flat.to(acc) / k)
    for j, segment in enumerate(flat.split(list(sizes))):
        out[j] = segment.to(torch.float64).square().sum()

"""Triton ``mean_sum_squares_`` (docs/algorithms.md section 1.1): ``g = sum / k`` in place
over a flat gradient bucket, and each segment's (parameter's) sum of squares of the
stored ``g``, in one read and one write of the bucket.

Two launches, nothing read back to the host:

1. ``_mean_squares``: one program per chunk (at most ``CHUNK_SIZE`` elements of one
   segment) divides its elements, stores them rounded to the bucket's dtype and writes
   the sum of squares of the stored values (fp32 lanes, fp64 for fp64 buckets) to a
   partials buffer;
2. ``_segment_sums``: one program per segment adds its chunks' partials in chunk order
   in fp64 (deterministic: no atomics) into ``out``.

The chunk table (begin, end per chunk, then the first chunk of each segment) depends
only on ``sizes`` and is uploaded once per layout (``multi_tensor.upload``'s cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.mean_sum_squares import check_mean_sum_squares_args
from . import multi_tensor as mt
from .math import ELEM, acc_types, add_square, load, soft_bf16, to_elem, worker_mean


@triton.jit
def _mean_squares(flat, table, partial, k: tl.float64, ELEM: tl.constexpr, ACC: tl.constexpr,
                  BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    c = tl.program_id(0)
    begin = tl.load(table + 2 * c)
    end = tl.load(table + 2 * c + 1)
    kv = tl.full([], k, ACC)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    for s in range(begin, end, BLOCK):
        idx = s + offs
        mask = idx < end
        stored = to_elem(worker_mean(load(flat, idx, mask, ACC), kv), ELEM, SOFT_BF16)
        tl.store(flat + idx, stored, mask=mask)
        acc = add_square(acc, stored.to(ACC))  # masked-off lanes loaded 0: they add 0
    tl.store(partial + c, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _segment_sums(partial, first, out):
    j = tl.program_id(0)
    c0 = tl.load(first + j)
    c1 = tl.load(first + j + 1)
    total = tl.zeros([], tl.float64)
    for c in range(c0, c1):
        total += tl.load(partial + c)
    tl.store(out + j, total)


def _table(sizes: tuple[int, ...], chunk: int) -> list[int]:
    """(begin, end) of every chunk, then the first chunk of every segment and the end."""
    spans, first, offset = [], [], 0
    for n in sizes:
        first.append(len(spans) // 2)
        for b in range(0, n, chunk):
            spans += [offset + b, offset + min(n, b + chunk)]
        offset += n
    first.append(len(spans) // 2)
    return spans + first


def mean_sum_squares_(flat, sizes, world_size, out) -> None:
    """The contract of ``lbkernels.reference.mean_sum_squares.mean_sum_squares_``."""
    check_mean_sum_squares_args(flat, sizes, world_size, out)
    device = flat.device
    mt.check_runnable(device)
    chunk = max(1, int(mt.CHUNK_SIZE))
    key = ("mean_sum_squares", tuple(sizes), chunk, str(device))
    table = mt.upload(key, lambda: _table(tuple(sizes), chunk), device)
    n_chunks = (table.numel() - len(sizes) - 1) // 2
    if n_chunks:
        partial = torch.empty(n_chunks, dtype=torch.float64, device=device)
        dtype = flat.dtype
        _mean_squares[(n_chunks,)](flat, table, partial, float(world_size), ELEM=ELEM[dtype],
                                   ACC=acc_types(dtype)[1], BLOCK=mt.block(max(sizes)),
                                   SOFT_BF16=soft_bf16(dtype), num_warps=mt.NUM_WARPS)
    else:
        partial = out  # never read: every segment is empty
    if len(sizes):
        _segment_sums[(len(sizes),)](partial, table[2 * n_chunks:], out)
    # Written through raw pointers: bump the versions as an in-place torch op would.
    mt.bump_versions([flat, out])

"""Triton weight averaging (docs/algorithms.md section 4): ``avg += r * (w - avg)``, and the
write-back of the cross-worker mean, ``w = sum / k`` (``worker_mean_``).

One launch per param dtype covers every tensor of that dtype: a chunk table
(``multi_tensor.py``) of lists (average, param), or (param, segment of the flat sum),
with one program per chunk. The average (fp32/fp64) and the param (any float dtype)
have different element sizes, so the table is built with one element size per list.

``r = 1 / (n + 1)`` (SWA, the count read on the device) or ``1 - decay`` (EMA) is
computed by each program in the averages' dtype; the count is incremented after all
launches of the call, on the device. With ``found_inf != 0`` nothing is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.average import check_average_args, check_worker_mean_args
from . import multi_tensor as mt
from .math import ELEM, acc_types, average_rate, average_update, chunk_rows, list_ptr, load
from .math import proceed, soft_bf16, store, worker_mean


@triton.jit
def _average(table, n_chunks, count_ptr, skip_ptr, one_minus_decay: tl.float64,
             PARAM: tl.constexpr, AVG: tl.constexpr, BLOCK: tl.constexpr,
             SWA: tl.constexpr, HAS_SKIP: tl.constexpr):
    c = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        a_ptr = list_ptr(table, 0, n_chunks, c, AVG)
        p_ptr = list_ptr(table, 1, n_chunks, c, PARAM)
        n, _, _ = chunk_rows(table, 2, n_chunks, c)
        r = average_rate(count_ptr, one_minus_decay, AVG, SWA)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            a = tl.load(a_ptr + s + offs, mask=mask, other=0.0)
            w = load(p_ptr, s + offs, mask, AVG)
            tl.store(a_ptr + s + offs, average_update(a, w, r), mask=mask)


def average_(averages, params, count=None, **kw) -> None:
    """One averaging update in place; the contract (and keyword arguments) of
    ``lbkernels.reference.average.average_``."""
    method, found_inf = kw["method"], kw["found_inf"]
    check_average_args(averages, params, count, method, found_inf)
    if not params:
        return
    device = params[0].device
    mt.check_runnable(device)
    (found_inf,) = mt.scalars_on(device, found_inf)
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(params).items():
        addresses, numels = [], []
        for i in index:
            a = staging.lead(averages[i], written=True)
            # A param in another layout is read through a copy in its average's layout.
            w = staging.follow(params[i], a, written=False)
            addresses.append((a.data_ptr(), w.data_ptr()))
            numels.append(a.numel())
        avg_dtype = averages[index[0]].dtype
        tab = mt.chunk_table(addresses, numels, (averages[index[0]].element_size(),
                                                 params[index[0]].element_size()), [], device)
        if tab.n_chunks:
            _average[(tab.n_chunks,)](
                tab.data, tab.n_chunks, mt.pointer(count, tab.data),
                mt.pointer(found_inf, tab.data), 1.0 - float(kw["decay"]),
                PARAM=ELEM[dtype], AVG=ELEM[avg_dtype], BLOCK=mt.block(max(numels)),
                SWA=method == "swa", HAS_SKIP=found_inf is not None, num_warps=mt.NUM_WARPS)
    staging.write_back()
    mt.bump_versions(averages)
    if count is not None:
        count.add_(1 if found_inf is None else (found_inf == 0).to(count.dtype))


@triton.jit
def _worker_mean(table, n_chunks, k: tl.float64, ELEM: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    c = tl.program_id(0)
    w_ptr = list_ptr(table, 0, n_chunks, c, ELEM)
    s_ptr = list_ptr(table, 1, n_chunks, c, ELEM)
    n, _, _ = chunk_rows(table, 2, n_chunks, c)
    kv = tl.full([], k, ACC)
    offs = tl.arange(0, BLOCK)
    for s in range(0, n, BLOCK):
        mask = s + offs < n
        total = load(s_ptr, s + offs, mask, ACC)
        store(w_ptr, s + offs, worker_mean(total, kv), mask, ELEM, SOFT_BF16)


def worker_mean_(params, flat_sum, world_size) -> None:
    """``w = sum / k`` into every param; the contract of
    ``lbkernels.reference.average.worker_mean_``."""
    check_worker_mean_args(params, flat_sum, world_size)
    if not params:
        return
    device = flat_sum.device
    mt.check_runnable(device)
    # Lists (param, its segment of the flat sum); a param that is not contiguous (memory
    # order unlike the flat buffer's row-major order) is written through a contiguous
    # temporary.
    staging = mt.Staging()
    addresses, numels = [], []
    elem = flat_sum.element_size()
    base, offset = flat_sum.data_ptr(), 0
    for p in params:
        w = staging.lead(p, written=True, contiguous=True)
        addresses.append((w.data_ptr(), base + offset * elem))
        numels.append(p.numel())
        offset += p.numel()
    tab = mt.chunk_table(addresses, numels, (elem, elem), [], device)
    if tab.n_chunks:
        dtype = flat_sum.dtype
        _worker_mean[(tab.n_chunks,)](tab.data, tab.n_chunks, float(world_size), ELEM=ELEM[dtype],
                                      ACC=acc_types(dtype)[1], BLOCK=mt.block(max(numels)),
                                      SOFT_BF16=soft_bf16(dtype), num_warps=mt.NUM_WARPS)
    staging.write_back()
    mt.bump_versions(params)

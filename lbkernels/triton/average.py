"""Triton weight averaging (ALGORITHMS.md section 4): ``avg += r * (w - avg)``, and the
write-back of the cross-worker mean, ``w = sum / k`` (``worker_mean_``).

One launch per param dtype covers every tensor of that dtype: a table of chunk rows
(average address, param address, element count) in the style of ``multi_tensor.py``,
with one program per chunk. The table is built here rather than with
``multi_tensor.table`` because the average (fp32/fp64) and the param (any float dtype)
have different element sizes, so their chunk offsets differ.

``r = 1 / (n + 1)`` (SWA, the count read on the device) or ``1 - decay`` (EMA) is
computed by each program in the averages' dtype; the count is incremented after all
launches of the call, on the device. With ``found_inf != 0`` nothing is written.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.average import check_average_args, check_worker_mean_args
from . import multi_tensor as mt
from .math import average_update as _average_update
from .math import div, to_elem, worker_mean

_ELEM = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
         torch.bfloat16: tl.bfloat16}
_BLOCK = 1024
_BLOCK_INTERPRETED = 65536
_NUM_WARPS = 4

# Tables kept per process (24 bytes per chunk each); rebuilt only when storage moves.
_CACHE_ENTRIES = 64
_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _block() -> int:
    limit = _BLOCK_INTERPRETED if mt.interpreting() else _BLOCK
    return min(limit, triton.next_power_of_2(max(1, mt.CHUNK_SIZE)))


def _table(rows: list[tuple[int, int, int]], avg_size: int, param_size: int,
           device: torch.device) -> tuple[torch.Tensor, int]:
    """Chunk table: rows 0..2 = average address, param address, element count."""
    chunk = int(mt.CHUNK_SIZE)
    key = (device, chunk, avg_size, param_size, tuple(rows))
    n_chunks = sum(-(-n // chunk) for _, _, n in rows)
    data = _cache.get(key)
    if data is not None:
        _cache.move_to_end(key)
        return data, n_chunks
    a_row, p_row, n_row = [], [], []
    for a, p, n in rows:
        for begin in range(0, n, chunk):
            a_row.append(a + begin * avg_size)
            p_row.append(p + begin * param_size)
            n_row.append(min(chunk, n - begin))
    host = torch.tensor(a_row + p_row + n_row, dtype=torch.int64)
    data = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    _cache[key] = data
    if len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    return data, n_chunks


@triton.jit
def _average(table, n_chunks, count_ptr, skip_ptr, one_minus_decay: "fp64",
             PARAM: tl.constexpr, AVG: tl.constexpr, BLOCK: tl.constexpr,
             SWA: tl.constexpr, HAS_SKIP: tl.constexpr):
    c = tl.program_id(0)
    work = True
    if HAS_SKIP:
        work = tl.load(skip_ptr) == 0
    if work:
        a_ptr = tl.load(table + c).to(tl.pointer_type(AVG))
        p_ptr = tl.load(table + n_chunks + c).to(tl.pointer_type(PARAM))
        n = tl.load(table + 2 * n_chunks + c)
        if SWA:
            r = div(tl.full([], 1.0, AVG), tl.load(count_ptr).to(AVG) + tl.full([], 1.0, AVG))
        else:
            r = tl.full([], one_minus_decay, AVG)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            a = tl.load(a_ptr + s + offs, mask=mask, other=0.0)
            w = tl.load(p_ptr + s + offs, mask=mask, other=0.0).to(AVG)
            tl.store(a_ptr + s + offs, _average_update(a, w, r), mask=mask)


def _average_impl(averages, params, count, method, decay, found_inf) -> None:
    check_average_args(averages, params, count, method, found_inf)
    if not params:
        return
    device = params[0].device
    from . import available

    ok, why = available(device.type)
    if not ok:
        raise RuntimeError(f"the Triton kernels cannot run on {device.type} tensors here: {why}")
    found_inf = mt.scalar_on(found_inf, device)
    staging = mt.Staging()
    keep = []  # params copied into their average's layout, alive until the launches are queued
    for dtype, index in mt.group_by_dtype(params).items():
        rows = []
        for i in index:
            a = staging.lead(averages[i], written=True)
            w = params[i]
            if not (mt.dense(w) and w.stride() == a.stride()):
                w = torch.empty_like(a, dtype=w.dtype).copy_(w)
                keep.append(w)
            rows.append((a.data_ptr(), w.data_ptr(), a.numel()))
        avg_dtype = averages[index[0]].dtype
        data, n_chunks = _table(rows, averages[index[0]].element_size(),
                                params[index[0]].element_size(), device)
        if n_chunks:
            _average[(n_chunks,)](
                data, n_chunks, data if count is None else count,
                data if found_inf is None else found_inf, 1.0 - float(decay),
                PARAM=_ELEM[dtype], AVG=_ELEM[avg_dtype], BLOCK=_block(), SWA=method == "swa",
                HAS_SKIP=found_inf is not None, num_warps=_NUM_WARPS)
    staging.write_back()
    keep.clear()
    if count is not None:
        count.add_(1 if found_inf is None else (found_inf == 0).to(count.dtype))


# Same argument names, types and defaults as the main schema in _library.py, but not
# keyword-only: custom_op does not accept keyword-only tensor arguments.
@torch.library.custom_op("lbkernels::triton_average_", mutates_args=("averages", "count"))
def triton_average_(
    averages: list[torch.Tensor],
    params: list[torch.Tensor],
    count: Optional[torch.Tensor] = None,
    method: str = "swa",
    decay: float = 0.999,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One averaging update in place; the contract of ``lbkernels.reference.average.average_``."""
    _average_impl(averages, params, count, method, decay, found_inf)


@triton_average_.register_fake
def _(averages, params, count=None, method="swa", decay=0.999, found_inf=None):
    return None


@triton.jit
def _worker_mean(table, n_chunks, k: "fp64", ELEM: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    c = tl.program_id(0)
    w_ptr = tl.load(table + c).to(tl.pointer_type(ELEM))
    s_ptr = tl.load(table + n_chunks + c).to(tl.pointer_type(ELEM))
    n = tl.load(table + 2 * n_chunks + c)
    kv = tl.full([], k, ACC)
    offs = tl.arange(0, BLOCK)
    for s in range(0, n, BLOCK):
        mask = s + offs < n
        total = tl.load(s_ptr + s + offs, mask=mask, other=0.0).to(ACC)
        tl.store(w_ptr + s + offs, to_elem(worker_mean(total, kv), ELEM, SOFT_BF16), mask=mask)


def _worker_mean_impl(params, flat_sum, world_size) -> None:
    check_worker_mean_args(params, flat_sum, world_size)
    if not params:
        return
    device = flat_sum.device
    from . import available

    ok, why = available(device.type)
    if not ok:
        raise RuntimeError(f"the Triton kernels cannot run on {device.type} tensors here: {why}")
    # Rows (param address, address of its segment of the flat sum, count); a param that
    # is not contiguous (memory order unlike the flat buffer's row-major order) is
    # written through a contiguous temporary.
    rows, pending = [], []
    elem = flat_sum.element_size()
    base, offset = flat_sum.data_ptr(), 0
    for p in params:
        w = p
        if not p.is_contiguous():
            w = torch.empty(p.shape, dtype=p.dtype, device=device)
            pending.append((p, w))
        rows.append((w.data_ptr(), base + offset * elem, p.numel()))
        offset += p.numel()
    data, n_chunks = _table(rows, elem, elem, device)
    if n_chunks:
        dtype = flat_sum.dtype
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        _worker_mean[(n_chunks,)](data, n_chunks, float(world_size), ELEM=_ELEM[dtype], ACC=acc,
                                  BLOCK=_block(),
                                  SOFT_BF16=dtype == torch.bfloat16 and mt.interpreting(),
                                  num_warps=_NUM_WARPS)
    for p, w in pending:
        p.copy_(w)


@torch.library.custom_op("lbkernels::triton_worker_mean_", mutates_args=("params",))
def triton_worker_mean_(params: list[torch.Tensor], flat_sum: torch.Tensor, world_size: int) -> None:
    """``w = sum / k`` into every param; the contract of ``lbkernels.reference.average.worker_mean_``."""
    _worker_mean_impl(params, flat_sum, world_size)


@triton_worker_mean_.register_fake
def _(params, flat_sum, world_size):
    return None

"""Triton per-tensor norms and LARS trust ratios (docs/algorithms.md sections 1 and 6): the
``multi_tensor_l2norm`` op, the coefficient passes that ``lars_sgd_`` and
``extrap_sgd_`` (with ``lars=True``) run before their updates, and the sum of squares
of all gradients behind ``lamb_``'s global clipping (section 7).

Two launches per dtype group over a chunk table of lists (w, g, buf) whose per-tensor
rows are (first chunk, end chunk, step address, excluded, output index); nothing is
read back to the host:

1. ``_sum_squares``: one program per chunk writes the chunk's sums of squares of w and
   of the unscaled g (fp32, fp64 for fp64 tensors) to a partials buffer;
2. ``_lars_coefs`` (``_norms`` for the norm op): one program per tensor adds its
   chunks' partials in chunk order (deterministic: no atomics), takes the norms, and
   writes the tensor's trust ratio, weight decay and first-step flag; it then counts
   the step, the update reading the flag from the coefficients, not from the counter.

A norm given by the op's ``norm_sq`` (an entry >= 0, read on the device) is not summed
by pass 1 (that list is not read for the tensor); pass 2 takes its square root instead.

lars_sgd_'s cache of ||w||^2 (``w_norm_sq``) is a given norm of the same kind: a table
built with ``cached`` has a sixth per-tensor row (beside the five above), 1 where the host found the tensor's key
(version counter, address) unchanged; such a tensor's entry of ``w_norm_sq``, when >= 0,
stands for its w sum (w is not read). The update pass then writes the new w's chunk sums
into the partials (the same tiles and ``add_square`` as pass 1) and ``_store_w_norm_sq``
adds them per tensor with pass 2's ``_tensor_sum``: the number the next call's passes
would compute from w, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.lars import check_l2norm_args
from . import multi_tensor as mt
from .math import ELEM, acc_types, add_square, chunk_rows, div, lars_scale, list_ptr, load
from .math import proceed, scalar, sqrt

# Per-tensor rows start after the 3 lists and the count, slot and begin rows.
TENSOR_ROWS: tl.constexpr = tl.constexpr(6)


def table(addresses: list[tuple[int, int, int]], numels: list[int], element_size: int,
          steps: list[int], excluded: list[bool], out_index: list[int],
          device: torch.device, cached: list[bool] | None = None) -> mt.Table:
    """The chunk table of lists (w, g, buf) with the per-tensor rows these kernels read;
    ``cached`` (lars_sgd_'s w_norm_sq): whether each tensor's cache key matched."""
    first, end = mt.chunk_spans(numels)
    rows = [first, end, steps, [int(e) for e in excluded], out_index]
    if cached is not None:
        rows.append([int(c) for c in cached])
    return mt.chunk_table(addresses, numels, (element_size,) * 3, rows, device)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _given(norm_sq, n_params, row, index, read):
    """Whether entry (row, index) of the op's norm_sq is given (>= 0; NaN is not), and the
    entry; not read (not given) where ``read`` is false."""
    v = tl.load(norm_sq + row * n_params + index, mask=read, other=-1.0)
    return v >= 0, v


@triton.jit
def _cached(table, n_chunks, n_tensors, t, w_norm_sq, index, read):
    """Whether tensor ``t``'s ||w||^2 comes from lars_sgd_'s cache (its key matched on the
    host and its entry of w_norm_sq is >= 0; NaN is not), and the entry; nothing is read
    where ``read`` is false."""
    rows = table + TENSOR_ROWS * n_chunks
    hit = read & (tl.load(rows + 5 * n_tensors + t, mask=read, other=0) != 0)
    v = tl.load(w_norm_sq + index, mask=hit, other=-1.0)
    return v >= 0, v


@triton.jit
def _sum_squares(table, n_chunks, n_tensors, partial, scale_ptr, skip_ptr, norm_sq, n_params,
                 w_norm_sq,
                 ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 WITH_G: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr,
                 HAS_NORM_SQ: tl.constexpr, HAS_W_CACHE: tl.constexpr):
    c = tl.program_id(0)
    n, t, _ = chunk_rows(table, 3, n_chunks, c)
    # Excluded tensors need no norms, and a skipped step none at all: read nothing (but
    # with the cache, below).
    adapted = tl.load(table + TENSOR_ROWS * n_chunks + 3 * n_tensors + t) == 0
    work = adapted
    if HAS_SKIP:
        work = adapted & (tl.load(skip_ptr) == 0)
    do_w = work
    do_g = work
    if HAS_NORM_SQ:  # a norm given by norm_sq is not summed: its list is not read
        index = tl.load(table + TENSOR_ROWS * n_chunks + 4 * n_tensors + t)
        given_w, _ = _given(norm_sq, n_params, 0, index, work)
        given_g, _ = _given(norm_sq, n_params, 1, index, work)
        do_w = work & (given_w == 0)
        do_g = work & (given_g == 0)
    if HAS_W_CACHE:
        # A cached ||w||^2: w is not read. A skipped step writes no new w, so a tensor
        # whose entry is not valid gets the sum of its unchanged w from here instead
        # (_store_w_norm_sq), norm_sq or not: skipped steps are rare.
        index = tl.load(table + TENSOR_ROWS * n_chunks + 4 * n_tensors + t)
        hit, _ = _cached(table, n_chunks, n_tensors, t, w_norm_sq, index, adapted)
        do_w = (do_w | (adapted & (work == 0))) & (hit == 0)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    if do_w | do_g:
        w_ptr = list_ptr(table, 0, n_chunks, c, ELEM)
        g_ptr = list_ptr(table, 1, n_chunks, c, ELEM)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            if do_w:
                acc_w = add_square(acc_w, load(w_ptr, s + offs, mask, ACC))
            if WITH_G:
                if do_g:
                    g = load(g_ptr, s + offs, mask, ACC)
                    if HAS_SCALE:
                        # The norm of the unscaled gradient, element by element as the
                        # reference computes it (no overflow of g**2 at large scales).
                        g = div(g, tl.load(scale_ptr).to(ACC))
                    acc_g = add_square(acc_g, g)
    tl.store(partial + c, tl.sum(acc_w, 0))
    if WITH_G:
        tl.store(partial + n_chunks + c, tl.sum(acc_g, 0))


@triton.jit
def _tensor_sum(partial, first, end, ACC: tl.constexpr, RBLOCK: tl.constexpr):
    acc = tl.zeros([RBLOCK], dtype=ACC)
    offs = tl.arange(0, RBLOCK)
    for c0 in range(first, end, RBLOCK):
        acc += tl.load(partial + c0 + offs, mask=c0 + offs < end, other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def _norms(table, n_chunks, n_tensors, partial, out, ACC: tl.constexpr, RBLOCK: tl.constexpr):
    t = tl.program_id(0)
    rows = table + TENSOR_ROWS * n_chunks
    first = tl.load(rows + t)
    end = tl.load(rows + n_tensors + t)
    norm = sqrt(_tensor_sum(partial, first, end, ACC, RBLOCK))
    tl.store(out + tl.load(rows + 4 * n_tensors + t), norm.to(tl.float32))


@triton.jit
def _lars_coefs(table, n_chunks, n_tensors, partial, coefs, lr: tl.float64, lr_ptr,
                weight_decay: tl.float64, trust_coefficient: tl.float64, eps: tl.float64, skip_ptr,
                norm_sq, n_params, scale_ptr, w_norm_sq,
                ACC: tl.constexpr, RBLOCK: tl.constexpr, CLIP: tl.constexpr,
                ZERO_NORM_DECAY: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, HAS_STEPS: tl.constexpr, HAS_SKIP: tl.constexpr,
                HAS_NORM_SQ: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W_CACHE: tl.constexpr):
    t = tl.program_id(0)
    rows = table + TENSOR_ROWS * n_chunks
    first = tl.load(rows + t)
    end = tl.load(rows + n_tensors + t)
    excluded = tl.load(rows + 3 * n_tensors + t) != 0
    n_w = sqrt(_tensor_sum(partial, first, end, ACC, RBLOCK))
    n_g = sqrt(_tensor_sum(partial + n_chunks, first, end, ACC, RBLOCK))
    if HAS_W_CACHE:
        # The cached sum is an ACC sum stored as fp64 (exact): sqrt of it in ACC is the
        # norm pass 1's partials would give. norm_sq, below, takes precedence.
        hit, v_c = _cached(table, n_chunks, n_tensors, t, w_norm_sq,
                           tl.load(rows + 4 * n_tensors + t), excluded == 0)
        n_w = tl.where(hit, sqrt(tl.where(hit, v_c, 0.0).to(ACC)), n_w)
    if HAS_NORM_SQ:
        # A given norm: sqrt of the entry in ACC (as the reference's .to(dtype)); ||g|| of
        # the scaled gradient divided by the scale. Excluded tensors' entries are not read.
        index = tl.load(rows + 4 * n_tensors + t)
        given_w, v_w = _given(norm_sq, n_params, 0, index, excluded == 0)
        given_g, v_g = _given(norm_sq, n_params, 1, index, excluded == 0)
        # (0 where not given: the square root of -1 would be discarded anyway.)
        n_w = tl.where(given_w, sqrt(tl.where(given_w, v_w, 0.0).to(ACC)), n_w)
        g_given = sqrt(tl.where(given_g, v_g, 0.0).to(ACC))
        if HAS_SCALE:
            g_given = div(g_given, tl.load(scale_ptr).to(ACC))
        n_g = tl.where(given_g, g_given, n_g)
    lr_v = scalar(lr, lr_ptr, HAS_LR_TENSOR, ACC)
    r, wd = lars_scale(n_w, n_g, lr_v, tl.full([], weight_decay, ACC),
                       tl.full([], trust_coefficient, ACC), tl.full([], eps, ACC), CLIP,
                       ZERO_NORM_DECAY, excluded)
    tl.store(coefs + t, r)
    tl.store(coefs + n_tensors + t, wd)
    if HAS_STEPS:
        step_ptr = tl.load(rows + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr)
        tl.store(coefs + 2 * n_tensors + t, (step == 0).to(ACC))
        if proceed(skip_ptr, HAS_SKIP):
            tl.store(step_ptr, step + 1.0)
    elif HAS_MOMENTUM:  # zero-initialised buffers: m * 0 + d is already the first step
        tl.store(coefs + 2 * n_tensors + t, tl.zeros([], ACC))


@triton.jit
def _store_w_norm_sq(table, n_chunks, n_tensors, partial, w_norm_sq, skip_ptr,
                     ACC: tl.constexpr, RBLOCK: tl.constexpr, HAS_SKIP: tl.constexpr):
    """After lars_sgd_'s update: each adapted tensor's entry of w_norm_sq = its new w's
    chunk sums (row 0 of the partials, written by the update) added as ``_lars_coefs``
    adds them. On a skipped step w is unchanged: a valid entry stays, any other gets the
    sums of w that ``_sum_squares`` then wrote to the same row."""
    t = tl.program_id(0)
    rows = table + TENSOR_ROWS * n_chunks
    if tl.load(rows + 3 * n_tensors + t) == 0:  # excluded tensors: entries untouched
        index = tl.load(rows + 4 * n_tensors + t)
        write = True
        if HAS_SKIP:
            hit, _ = _cached(table, n_chunks, n_tensors, t, w_norm_sq, index, True)
            write = (tl.load(skip_ptr) == 0) | (hit == 0)
        if write:
            s = _tensor_sum(partial, tl.load(rows + t), tl.load(rows + n_tensors + t), ACC,
                            RBLOCK)
            tl.store(w_norm_sq + index, s.to(tl.float64))


# ------------------------------------------------------------------------ launchers


def _chunk_sums(xs: list[torch.Tensor], index: list[int], staging: mt.Staging,
                device: torch.device) -> tuple[mt.Table, torch.Tensor]:
    """The table of ``xs[i]`` (``i`` in ``index``, one dtype) and the sum of squares of
    each of its chunks (at least one entry; fp32, fp64 for fp64 tensors)."""
    views = [staging.lead(xs[i], written=False) for i in index]
    numels = [x.numel() for x in views]
    tab = table([(x.data_ptr(), 0, 0) for x in views], numels, xs[index[0]].element_size(),
                [0] * len(index), [False] * len(index), index, device)
    acc_torch, acc = acc_types(xs[index[0]].dtype)
    partial = torch.empty(max(1, tab.n_chunks), dtype=acc_torch, device=device)
    if tab.n_chunks:
        _sum_squares[(tab.n_chunks,)](
            tab.data, tab.n_chunks, tab.n_tensors, partial, partial, partial, partial, 0,
            partial, ELEM=ELEM[xs[index[0]].dtype], ACC=acc, BLOCK=mt.block(max(numels)),
            WITH_G=False, HAS_SCALE=False, HAS_SKIP=False, HAS_NORM_SQ=False,
            HAS_W_CACHE=False, num_warps=mt.NUM_WARPS)
    return tab, partial


def multi_tensor_l2norm(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms (fp32 result; fp64 accumulation for fp64 tensors)."""
    out = torch.empty(len(xs), dtype=torch.float32, device=xs[0].device if xs else None)
    multi_tensor_l2norm_out(xs, out=out)
    return out


def multi_tensor_l2norm_out(xs: list[torch.Tensor], *, out: torch.Tensor) -> None:
    """``multi_tensor_l2norm`` written into ``out``, checked before it is written."""
    check_l2norm_args(xs, out)
    if not xs:
        return
    device = xs[0].device
    mt.check_runnable(device)
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(xs).items():
        tab, partial = _chunk_sums(xs, index, staging, device)
        _norms[(tab.n_tensors,)](tab.data, tab.n_chunks, tab.n_tensors, partial, out,
                                 ACC=acc_types(dtype)[1], RBLOCK=mt.RBLOCK, num_warps=mt.NUM_WARPS)
    mt.bump_versions([out])


def total_sum_squares(xs: list[torch.Tensor], staging: mt.Staging) -> torch.Tensor:
    """The sum of squares of every element of ``xs`` (lamb_'s global gradient norm), an
    fp64 device scalar: the chunks' sums added on the device, nothing read on the host."""
    total = torch.zeros((), dtype=torch.float64, device=xs[0].device)
    for index in mt.group_by_dtype(xs).values():
        tab, partial = _chunk_sums(xs, index, staging, xs[0].device)
        total += partial[:tab.n_chunks].sum(dtype=torch.float64)
    return total


def partials(tab: mt.Table, dtype: torch.dtype) -> torch.Tensor:
    """The chunk sums' buffer of ``lars_coefs``: rows w and g, ``tab.n_chunks`` each."""
    return torch.empty(2 * max(1, tab.n_chunks), dtype=acc_types(dtype)[0],
                       device=tab.data.device)


def lars_coefs(tab: mt.Table, dtype: torch.dtype, block: int, *, lr, lr_tensor, weight_decay,
               trust_coefficient, eps, clip, zero_norm_decay, grad_scale, found_inf,
               has_momentum: bool, has_steps: bool,
               norm_sq: torch.Tensor | None = None, w_norm_sq: torch.Tensor | None = None,
               partial: torch.Tensor | None = None) -> torch.Tensor:
    """Trust ratio, weight decay and first-step flag of every tensor of ``tab`` (a
    ``table`` of lists (w, g, buf)), as 3 rows of ``tab.n_tensors`` values. ``norm_sq``:
    the op's precomputed squared norms (by argument index, the table's output-index row),
    read on the device: a norm given there (>= 0) is not summed. ``w_norm_sq``: lars_sgd_'s
    cache (``tab`` built with ``cached``). ``partial``: the chunk sums' buffer (``partials``),
    for a caller that reuses it."""
    device = tab.data.device
    acc_torch, acc = acc_types(dtype)
    if partial is None:
        partial = partials(tab, dtype)
    coefs = torch.empty(3 * tab.n_tensors, dtype=acc_torch, device=device)
    skip_arg = mt.pointer(found_inf, tab.data)
    scale_arg = mt.pointer(grad_scale, tab.data)
    norm_arg = mt.pointer(norm_sq, tab.data)
    w_arg = mt.pointer(w_norm_sq, tab.data)
    n_params = 0 if norm_sq is None else norm_sq.shape[1]
    if tab.n_chunks:
        _sum_squares[(tab.n_chunks,)](
            tab.data, tab.n_chunks, tab.n_tensors, partial, scale_arg, skip_arg, norm_arg,
            n_params, w_arg, ELEM=ELEM[dtype], ACC=acc, BLOCK=block, WITH_G=True,
            HAS_SCALE=grad_scale is not None, HAS_SKIP=found_inf is not None,
            HAS_NORM_SQ=norm_sq is not None, HAS_W_CACHE=w_norm_sq is not None,
            num_warps=mt.NUM_WARPS)
    _lars_coefs[(tab.n_tensors,)](
        tab.data, tab.n_chunks, tab.n_tensors, partial, coefs, float(lr),
        mt.pointer(lr_tensor, tab.data), float(weight_decay), float(trust_coefficient),
        float(eps), skip_arg, norm_arg, n_params, scale_arg, w_arg, ACC=acc, RBLOCK=mt.RBLOCK,
        CLIP=bool(clip), ZERO_NORM_DECAY=bool(zero_norm_decay),
        HAS_LR_TENSOR=lr_tensor is not None, HAS_MOMENTUM=has_momentum, HAS_STEPS=has_steps,
        HAS_SKIP=found_inf is not None, HAS_NORM_SQ=norm_sq is not None,
        HAS_SCALE=grad_scale is not None, HAS_W_CACHE=w_norm_sq is not None,
        num_warps=mt.NUM_WARPS)
    return coefs


def store_w_norm_sq(tab: mt.Table, dtype: torch.dtype, partial: torch.Tensor,
                    w_norm_sq: torch.Tensor, found_inf: torch.Tensor | None) -> None:
    """``_store_w_norm_sq`` over ``tab`` (a ``table`` with ``cached``) once the update
    has written the new w's chunk sums into ``partial`` (``lars_coefs``'s buffer)."""
    _store_w_norm_sq[(tab.n_tensors,)](
        tab.data, tab.n_chunks, tab.n_tensors, partial, w_norm_sq,
        mt.pointer(found_inf, tab.data), ACC=acc_types(dtype)[1], RBLOCK=mt.RBLOCK,
        HAS_SKIP=found_inf is not None, num_warps=mt.NUM_WARPS)

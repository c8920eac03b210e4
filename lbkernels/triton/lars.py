"""Triton LARS-SGD step (docs/algorithms.md section 1).

Three launches per dtype group (four with the norm cache: ``norms.store_w_norm_sq``), each covering every tensor of the group through a
chunk table of lists (w, g, buf); nothing is read back to the host: the two
coefficient passes of ``norms.py`` (per-chunk sums of squares, then per tensor the
trust ratio, weight decay and first-step flag, counting the step), and
``_lars_update``: one program per chunk applies ``sgd_update`` with its tensor's
coefficients and, with ``averages``, averages the stored weight in (section 4).

The AMP ``found_inf`` flag is read by every program: when set, nothing is written.

With the op's ``w_norm_sq`` / ``w_norm_key`` (the cache of ||w||^2 from the previous
step): the key (version counter, address) is compared on the host, a matching tensor's
cached sum replaces its w norm in the coefficient passes (w is not read for it), the
update sums the squares of the new w as stored (``add_square`` over the tiles of
``norms._sum_squares``) into the chunk partials, and ``norms.store_w_norm_sq`` adds
them per tensor as the coefficient pass does: the cached number is the one the next
call would compute, bit for bit (only for the same chunk size and block, which depend
on the group's tensors: the cache belongs to one parameter list).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.lars import check_lars_sgd_args
from . import multi_tensor as mt
from . import norms
from .math import ELEM, acc_types, add_square, average_rate, average_update, chunk_rows, list_ptr
from .math import load_sgd_update, proceed, scalar, soft_bf16, store, to_elem


@triton.jit
def _lars_update(table, n_chunks, n_tensors, coefs, lr: tl.float64, lr_ptr, scale_ptr, skip_ptr,
                 momentum: tl.float64, one_minus_dampening: tl.float64, avg_table, count_ptr,
                 one_minus_decay: tl.float64, partial,
                 ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                 PAPER: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_SKIP: tl.constexpr,
                 SOFT_BF16: tl.constexpr, HAS_AVG: tl.constexpr, AVG: tl.constexpr,
                 SWA: tl.constexpr, W_SQ: tl.constexpr):
    c = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        n, t, _ = chunk_rows(table, 3, n_chunks, c)
        w_ptr = list_ptr(table, 0, n_chunks, c, ELEM)
        g_ptr = list_ptr(table, 1, n_chunks, c, ELEM)
        b_ptr = list_ptr(table, 2, n_chunks, c, ELEM)
        r = tl.load(coefs + t)
        wd = tl.load(coefs + n_tensors + t)
        first = False
        if HAS_MOMENTUM:
            first = tl.load(coefs + 2 * n_tensors + t) != 0
        lr_v = scalar(lr, lr_ptr, HAS_LR_TENSOR, ACC)
        one = tl.full([], 1.0, ACC)
        # momentum_style="paper" keeps lr in the buffer: d is scaled by lr, w -= u.
        if PAPER:
            pre = lr_v
            step_lr = one
        else:
            pre = one
            step_lr = lr_v
        scale = scalar(1.0, scale_ptr, HAS_SCALE, ACC)
        m = tl.full([], momentum, ACC)
        damp = tl.full([], one_minus_dampening, ACC)
        if HAS_AVG:  # folded averaging: avg_table's list 0 holds this chunk's average
            a_ptr = list_ptr(avg_table, 0, n_chunks, c, AVG)
            r_avg = average_rate(count_ptr, one_minus_decay, AVG, SWA)
        offs = tl.arange(0, BLOCK)
        acc_sq = tl.zeros([BLOCK], dtype=ACC)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            w, buf, g = load_sgd_update(w_ptr, g_ptr, b_ptr, s + offs, mask, scale, wd, r, pre,
                                        m, damp, step_lr, first, ACC, HAS_SCALE, HAS_MOMENTUM,
                                        NESTEROV)
            w_stored = to_elem(w, ELEM, SOFT_BF16)
            tl.store(w_ptr + s + offs, w_stored, mask=mask)
            if HAS_MOMENTUM:
                store(b_ptr, s + offs, buf, mask, ELEM, SOFT_BF16)
            if HAS_AVG:  # the stored (rounded) weight, as average_ would read it
                a = tl.load(a_ptr + s + offs, mask=mask, other=0.0)
                tl.store(a_ptr + s + offs, average_update(a, w_stored.to(AVG), r_avg), mask=mask)
            if W_SQ:  # the stored w as the norm pass loads it (0 where masked off)
                acc_sq = add_square(acc_sq, tl.where(mask, w_stored.to(ACC), 0.0))
        if W_SQ:  # where norms._sum_squares puts chunk c's sum of w
            tl.store(partial + c, tl.sum(acc_sq, 0))


def lars_sgd_(params, grads, momentum_buffers, steps, exclude, **kw) -> None:
    """One LARS-SGD step in place; the contract (and keyword arguments) of
    ``lbkernels.reference.lars.lars_sgd_``."""
    check_lars_sgd_args(params, grads, momentum_buffers, steps, exclude, **kw)
    if not params:
        return
    device = params[0].device
    mt.check_runnable(device)
    averages = kw["averages"] or []
    average_count = kw["average_count"]
    has_momentum = kw["momentum"] != 0.0
    has_steps = has_momentum and len(steps) > 0
    w_norm_sq, w_norm_key = kw["w_norm_sq"], kw["w_norm_key"]
    cached = None if w_norm_sq is None else key_matches(params, exclude, w_norm_key)
    lr_tensor, grad_scale, found_inf = mt.scalars_on(
        device, kw["lr_tensor"], kw["grad_scale"], kw["found_inf"])
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(params).items():
        addresses, leads = [], []
        for i in index:
            w = staging.lead(params[i], written=True)
            leads.append(w)
            g = staging.follow(grads[i], w, written=False)
            b = staging.follow(momentum_buffers[i], w, written=True) if has_momentum else None
            addresses.append((w.data_ptr(), g.data_ptr(), 0 if b is None else b.data_ptr()))
        numels = [w.numel() for w in leads]
        elem = params[index[0]].element_size()
        tab = norms.table(addresses, numels, elem,
                          [steps[i].data_ptr() if has_steps else 0 for i in index],
                          [bool(exclude[i]) for i in index], index, device,
                          None if cached is None else [cached[i] for i in index])
        # Folded averaging: list 0 of a table with tab's chunking holds each chunk's average
        # (in w's layout but the average's dtype: fp32 for 16-bit params).
        avg_rows = tab.data
        if averages:
            avgs = [staging.follow(averages[i], w, written=True) for i, w in zip(index, leads)]
            avg_rows = mt.chunk_table([(a.data_ptr(),) for a in avgs], numels,
                                      (averages[index[0]].element_size(),), [], device).data
        block = mt.block(max(numels))
        partial = norms.partials(tab, dtype)
        coefs = norms.lars_coefs(
            tab, dtype, block, lr=kw["lr"], lr_tensor=lr_tensor,
            weight_decay=kw["weight_decay"], trust_coefficient=kw["trust_coefficient"],
            eps=kw["eps"], clip=kw["clip"], zero_norm_decay=kw["zero_norm_decay"],
            grad_scale=grad_scale, found_inf=found_inf, has_momentum=has_momentum,
            has_steps=has_steps, norm_sq=kw["norm_sq"], w_norm_sq=w_norm_sq, partial=partial)
        if tab.n_chunks:
            _lars_update[(tab.n_chunks,)](
                tab.data, tab.n_chunks, tab.n_tensors, coefs, float(kw["lr"]),
                mt.pointer(lr_tensor, tab.data), mt.pointer(grad_scale, tab.data),
                mt.pointer(found_inf, tab.data), float(kw["momentum"]),
                1.0 - float(kw["dampening"]), avg_rows, mt.pointer(average_count, tab.data),
                1.0 - float(kw["average_decay"]),
                ELEM=ELEM[dtype], ACC=acc_types(dtype)[1], BLOCK=block,
                HAS_SCALE=grad_scale is not None, HAS_MOMENTUM=has_momentum,
                NESTEROV=bool(kw["nesterov"]) and has_momentum,
                PAPER=kw["momentum_style"] == "paper", HAS_LR_TENSOR=lr_tensor is not None,
                HAS_SKIP=found_inf is not None, SOFT_BF16=soft_bf16(dtype),
                HAS_AVG=bool(averages), AVG=acc_types(dtype)[1],
                SWA=kw["average_method"] == "swa", partial=partial,
                W_SQ=w_norm_sq is not None, num_warps=mt.NUM_WARPS)
        if w_norm_sq is not None:
            norms.store_w_norm_sq(tab, dtype, partial, w_norm_sq, found_inf)
    staging.write_back()
    if averages and average_count is not None:
        # After every launch of the call (stream order): each program read the old count.
        average_count.add_(1 if found_inf is None else (found_inf == 0).to(average_count.dtype))
    # A skipped step counts as a write too, as in torch's fused optimizers.
    mt.bump_versions([*params, *(momentum_buffers if has_momentum else []),
                      *(steps if has_steps else []), *averages,
                      *([] if w_norm_sq is None else [w_norm_sq, w_norm_key])])
    if w_norm_sq is not None:
        write_keys(params, exclude, w_norm_key)


def key_matches(params, exclude, w_norm_key: torch.Tensor) -> list[bool]:
    """Per param: adapted, not an inference tensor (it has no version counter: never
    matched) and its (version counter, address) equal to its column of w_norm_key (read
    on the host, where it lives: no device sync)."""
    versions, addresses = w_norm_key.tolist()
    return [not e and not p.is_inference() and v == p._version and a == p.data_ptr()
            for p, e, v, a in zip(params, exclude, versions, addresses)]


def write_keys(params, exclude, w_norm_key: torch.Tensor) -> None:
    """Every adapted param's key after this call (after the version bump), written
    through a numpy view: no torch op, no allocation per step. An inference tensor's key
    is left as it is, as the reference and the native op leave it."""
    key = w_norm_key.numpy()
    for i, p in enumerate(params):
        if not exclude[i] and not p.is_inference():
            key[0, i] = p._version
            key[1, i] = p.data_ptr()

"""Triton extrapolated SGD step (docs/algorithms.md sections 2 and 2.1).

One launch per dtype group and pass, each covering every tensor of the group through a
chunk table of lists (w, x, buf, g, gk) (``multi_tensor.py``) whose per-tensor rows are
(argument index, filter size F, slot of the first filter):

- [lars] the coefficient passes of ``norms.py`` over (x, g): the trust ratio of every
  tensor from ||x|| and ||g||, deterministic, no atomics;
- ``_sgd_update`` (a program per chunk): the momentum-SGD step of the anchor x and the
  extrapolated point w = x - extrap_lr * gk, or w = x + noise (``noise.py``);
- [filter] ``noise._filter_norms`` then ``noise._filter_write``.

The noise variants walk tensors in row-major order (non-contiguous ones through a
contiguous temporary), as the random numbers' counter is the row-major element index.
The AMP ``found_inf`` flag is read by every program: when set, nothing is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import extrap as ref
from . import multi_tensor as mt
from . import norms
from .math import ELEM, acc_types, chunk_rows, div, list_ptr, load, load_sgd_update, proceed
from .math import scalar, soft_bf16, store
from .noise import _filter_norms, _filter_write, filter_size, filter_table, noise, noise_key

# extrapolation= values, as the kernels' MODE constant (the order of ref.EXTRAPOLATIONS).
_MODES = {name: k for k, name in enumerate(ref.EXTRAPOLATIONS)}
PAST_GRAD = tl.constexpr(_MODES["past_grad"])
GAUSSIAN = tl.constexpr(_MODES["gaussian"])
WEIGHT = tl.constexpr(_MODES["weight"])
FILTER = tl.constexpr(_MODES["filter"])


@triton.jit
def _sgd_update(table, n_chunks, coefs, lr: tl.float64, lr_ptr, elr: tl.float64, elr_ptr,
                scale_ptr, skip_ptr, momentum: tl.float64, weight_decay: tl.float64,
                noise_scale: tl.float64, key, off_lo,
                ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                LARS: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                HAS_ELR_TENSOR: tl.constexpr, HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr):
    # Chunk rows: w, x, buf, g, gk, count, slot, begin; tensor row 0: argument index.
    c = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        w_ptr = list_ptr(table, 0, n_chunks, c, ELEM)
        x_ptr = list_ptr(table, 1, n_chunks, c, ELEM)
        b_ptr = list_ptr(table, 2, n_chunks, c, ELEM)
        g_ptr = list_ptr(table, 3, n_chunks, c, ELEM)
        gk_ptr = list_ptr(table, 4, n_chunks, c, ELEM)
        n, t, begin = chunk_rows(table, 5, n_chunks, c)
        index = tl.load(table + 8 * n_chunks + t)
        one = tl.full([], 1.0, ACC)
        r = one
        if LARS:
            r = tl.load(coefs + t)
        lr_v = scalar(lr, lr_ptr, HAS_LR_TENSOR, ACC)
        elr_v = scalar(elr, elr_ptr, HAS_ELR_TENSOR, ACC)
        scale = scalar(1.0, scale_ptr, HAS_SCALE, ACC)
        m = tl.full([], momentum, ACC)
        wd = tl.full([], weight_decay, ACC)
        a = tl.full([], noise_scale, ACC)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            # buf = m * buf + d: zero-initialised buffers, no first-step case.
            x, buf, g = load_sgd_update(x_ptr, g_ptr, b_ptr, s + offs, mask, scale, wd, r, one,
                                        m, one, lr_v, False, ACC, HAS_SCALE, HAS_MOMENTUM,
                                        NESTEROV)
            store(x_ptr, s + offs, x, mask, ELEM, SOFT_BF16)
            if HAS_MOMENTUM:
                store(b_ptr, s + offs, buf, mask, ELEM, SOFT_BF16)
            if MODE == PAST_GRAD:  # w = x - extrap_lr * gk
                gk = g
                if HAS_LOCAL:
                    gk = load(gk_ptr, s + offs, mask, ACC)
                if HAS_SCALE:
                    gk = div(gk, scale)
                w = x - elr_v * gk
                store(w_ptr, s + offs, w, mask, ELEM, SOFT_BF16)
            elif MODE != FILTER:  # filter: w is written by _filter_write
                z = noise(key, off_lo, index, begin + s + offs, MODE == GAUSSIAN).to(ACC)
                if MODE == WEIGHT:
                    w = x + a * z * tl.abs(x)
                else:
                    w = x + a * z
                store(w_ptr, s + offs, w, mask, ELEM, SOFT_BF16)



def extrap_sgd_(params, anchors, momentum_buffers, grads, local_grads, exclude, **kw) -> None:
    """One extrapolated-SGD step in place; the contract (and keyword arguments) of
    ``lbkernels.reference.extrap.extrap_sgd_``."""
    ref.check_extrap_sgd_args(params, anchors, momentum_buffers, grads, local_grads, exclude,
                              **kw)
    if not params:
        return
    device = params[0].device
    mt.check_runnable(device)
    extrapolation, lars = kw["extrapolation"], bool(kw["lars"])
    filter_mode = extrapolation == "filter"
    has_momentum = kw["momentum"] != 0.0
    has_local = len(local_grads) > 0 and extrapolation == "past_grad"
    lr_tensor, extrap_lr_tensor, grad_scale, found_inf = mt.scalars_on(
        device, kw["lr_tensor"], kw["extrap_lr_tensor"], kw["grad_scale"], kw["found_inf"])
    key, off_lo = noise_key(int(kw["seed"]), int(kw["offset"]))
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(params).items():
        addresses, numels, f_sizes, first_filters, filter_rows = [], [], [], [], []
        n_filters = 0
        for i in index:
            # The noise is keyed by row-major position: noise variants walk row-major memory.
            w = staging.lead(params[i], written=True, contiguous=extrapolation != "past_grad")
            x = staging.follow(anchors[i], w, written=True)
            g = staging.follow(grads[i], w, written=False)
            b = staging.follow(momentum_buffers[i], w, written=True) if has_momentum else None
            gk = staging.follow(local_grads[i], w, written=False) if has_local else None
            addresses.append((w.data_ptr(), x.data_ptr(), 0 if b is None else b.data_ptr(),
                              g.data_ptr(), 0 if gk is None else gk.data_ptr()))
            numels.append(w.numel())
            f = filter_size(w)
            f_sizes.append(f)
            first_filters.append(n_filters)
            if filter_mode and w.numel():
                filter_rows.append((x.data_ptr(), w.numel(), f, i))
                n_filters += w.numel() // f
        elem = params[index[0]].element_size()
        tab = mt.chunk_table(addresses, numels, (elem,) * 5, [index, f_sizes, first_filters],
                             device)
        block = mt.block(max(numels))
        acc_torch, acc = acc_types(dtype)
        skip_arg = mt.pointer(found_inf, tab.data)
        has_skip = found_inf is not None
        coefs = tab.data
        if lars:
            # zero_norm_decay: a zero norm sets r = 1 and keeps the weight decay.
            norm_tab = norms.table([(x, g, 0) for _, x, _, g, _ in addresses], numels, elem,
                                   [0] * len(index), [bool(exclude[i]) for i in index], index,
                                   device)
            coefs = norms.lars_coefs(
                norm_tab, dtype, block, lr=kw["lr"], lr_tensor=lr_tensor,
                weight_decay=kw["weight_decay"], trust_coefficient=kw["trust_coefficient"],
                eps=kw["eps"], clip=kw["clip"], zero_norm_decay=True, grad_scale=grad_scale,
                found_inf=found_inf, has_momentum=False, has_steps=False,
                norm_sq=kw["norm_sq"])
        if tab.n_chunks:
            _sgd_update[(tab.n_chunks,)](
                tab.data, tab.n_chunks, coefs, float(kw["lr"]), mt.pointer(lr_tensor, tab.data),
                float(kw["extrap_lr"]), mt.pointer(extrap_lr_tensor, tab.data),
                mt.pointer(grad_scale, tab.data), skip_arg, float(kw["momentum"]),
                float(kw["weight_decay"]), float(kw["noise_scale"]), key, off_lo,
                ELEM=ELEM[dtype], ACC=acc, BLOCK=block, MODE=_MODES[extrapolation],
                HAS_SCALE=grad_scale is not None, HAS_MOMENTUM=has_momentum,
                NESTEROV=bool(kw["nesterov"]) and has_momentum, LARS=lars, HAS_LOCAL=has_local,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_ELR_TENSOR=extrap_lr_tensor is not None,
                HAS_SKIP=has_skip, SOFT_BF16=soft_bf16(dtype), num_warps=mt.NUM_WARPS)
        if filter_mode and n_filters:
            longest = max(f for _, _, f, _ in filter_rows)
            factors = torch.empty(n_filters, dtype=acc_torch, device=device)
            _filter_norms[(n_filters,)](
                filter_table(filter_rows, elem, device), n_filters, factors, skip_arg,
                float(kw["noise_scale"]), key, off_lo, ELEM=ELEM[dtype], ACC=acc,
                BLOCK=mt.block(longest, chunked=False), HAS_SKIP=has_skip,
                num_warps=mt.NUM_WARPS)
            _filter_write[(tab.n_chunks,)](
                tab.data, tab.n_chunks, len(index), factors, skip_arg, key, off_lo,
                ELEM=ELEM[dtype], ACC=acc, BLOCK=block, HAS_SKIP=has_skip,
                SOFT_BF16=soft_bf16(dtype), num_warps=mt.NUM_WARPS)
    staging.write_back()
    # Written through raw addresses: bumped as torch's in-place ops (and the native op) do,
    # also on a skipped step (lars_sgd_'s norm cache keys on the params' versions).
    mt.bump_versions([*params, *anchors, *(momentum_buffers if has_momentum else [])])

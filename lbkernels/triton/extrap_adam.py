"""Triton extrap-Adam step (docs/algorithms.md section 2.2).

One chunk table per dtype group (``multi_tensor.py``) of lists (w, x, m, v, g, gk) with
per-tensor rows (argument index, step counter address), and two launches:
``_adam_bias`` (a program per tensor: step += 1, then the fp64 bias corrections) and
``_adam_update`` (a program per chunk: csrc's extrap_adam_update). The AMP
``found_inf`` flag is read by every program: when set, nothing is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.extrap import check_extrap_adam_args
from . import multi_tensor as mt
from .math import ELEM, acc_types, chunk_rows, div, list_ptr, load, proceed, scalar, soft_bf16
from .math import sqrt, store


@triton.jit
def _pow_int(base, n):
    """base^n for an integer n >= 0 by repeated squaring, in base's dtype (fp64 here):
    at most 2 log2(n) roundings (1e-14 relative at n = 2^24), and no fp64
    transcendental, which not every GPU backend lowers."""
    result = base * 0.0 + 1.0
    while n > 0:
        if n % 2 == 1:
            result = result * base
        base = base * base
        n = n // 2
    return result


@triton.jit
def _adam_bias(table, n_chunks, n_tensors, bias, skip_ptr, beta1: tl.float64, beta2: tl.float64,
               HAS_SKIP: tl.constexpr):
    # A program per tensor (empty ones included). Tensor row 1: the step counter address.
    # bias[t] = 1 - beta1^t, bias[T + t] = sqrt(1 - beta2^t), in fp64 from the new step.
    t = tl.program_id(0)
    step_ptr = tl.load(table + 9 * n_chunks + n_tensors + t).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr) + 1.0
    if proceed(skip_ptr, HAS_SKIP):
        tl.store(step_ptr, step)
    n = step.to(tl.int64)  # fp32 counters are exact integers up to 2^24
    tl.store(bias + t, 1.0 - _pow_int(tl.full([], beta1, tl.float64), n))
    tl.store(bias + n_tensors + t, tl.sqrt(1.0 - _pow_int(tl.full([], beta2, tl.float64), n)))


@triton.jit
def _adam_update(table, n_chunks, n_tensors, bias, lr: tl.float64, lr_ptr, elr: tl.float64,
                 elr_ptr, scale_ptr, skip_ptr, beta2: tl.float64, w1: tl.float64,
                 w2: tl.float64, eps: tl.float64, weight_decay: tl.float64, decay: tl.float64,
                 ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_WD: tl.constexpr,
                 DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                 HAS_ELR_TENSOR: tl.constexpr, HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr):
    # extrap_math.h's extrap_adam_update. Chunk rows: w, x, m, v, g, gk, count, slot, begin.
    c = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        w_ptr = list_ptr(table, 0, n_chunks, c, ELEM)
        x_ptr = list_ptr(table, 1, n_chunks, c, ELEM)
        m_ptr = list_ptr(table, 2, n_chunks, c, ELEM)
        v_ptr = list_ptr(table, 3, n_chunks, c, ELEM)
        g_ptr = list_ptr(table, 4, n_chunks, c, ELEM)
        gk_ptr = list_ptr(table, 5, n_chunks, c, ELEM)
        n, t, _ = chunk_rows(table, 6, n_chunks, c)
        # lr / (1 - beta1^t) in fp64 (a tensor lr rounded to ACC first), as the reference.
        if HAS_LR_TENSOR:
            lr_a = tl.load(lr_ptr).to(ACC)
            step_size = (lr_a.to(tl.float64) / tl.load(bias + t)).to(ACC)
            shrink = 1.0 - lr_a * tl.full([], weight_decay, ACC)
        else:
            step_size = (lr / tl.load(bias + t)).to(ACC)
            shrink = tl.full([], decay, ACC)
        bc2_sqrt = tl.load(bias + n_tensors + t).to(ACC)
        elr_v = scalar(elr, elr_ptr, HAS_ELR_TENSOR, ACC)
        scale = scalar(1.0, scale_ptr, HAS_SCALE, ACC)
        wd = tl.full([], weight_decay, ACC)
        lerp_w = tl.full([], w1, ACC)
        lerp_wc = 1.0 - lerp_w
        b2 = tl.full([], beta2, ACC)
        c2 = tl.full([], w2, ACC)
        eps_v = tl.full([], eps, ACC)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            x = load(x_ptr, s + offs, mask, ACC)
            m = load(m_ptr, s + offs, mask, ACC)
            v = load(v_ptr, s + offs, mask, ACC)
            g = load(g_ptr, s + offs, mask, ACC)
            if HAS_SCALE:
                g = div(g, scale)
            gk = g
            if HAS_LOCAL:
                gk = load(gk_ptr, s + offs, mask, ACC)
                if HAS_SCALE:
                    gk = div(gk, scale)
            if HAS_WD:
                if DECOUPLED:
                    x = x * shrink
                else:
                    g = g + wd * x
            if LERP_LOW:
                m = m + lerp_w * (g - m)
            else:
                m = g - (g - m) * lerp_wc
            v = v * b2 + c2 * g * g
            denom = div(sqrt(v), bc2_sqrt) + eps_v
            x = x - step_size * div(m, denom)
            w = x - elr_v * div(gk, denom)
            store(w_ptr, s + offs, w, mask, ELEM, SOFT_BF16)
            store(x_ptr, s + offs, x, mask, ELEM, SOFT_BF16)
            store(m_ptr, s + offs, m, mask, ELEM, SOFT_BF16)
            store(v_ptr, s + offs, v, mask, ELEM, SOFT_BF16)



def extrap_adam_(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads,
                 **kw) -> None:
    """One extrap-Adam step in place; the contract (and keyword arguments) of
    ``lbkernels.reference.extrap.extrap_adam_``."""
    check_extrap_adam_args(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads,
                           **kw)
    if not params:
        return
    device = params[0].device
    mt.check_runnable(device)
    has_local = len(local_grads) > 0
    lr, beta1, beta2, weight_decay = (float(kw[k]) for k in ("lr", "beta1", "beta2", "weight_decay"))
    lr_tensor, extrap_lr_tensor, grad_scale, found_inf = mt.scalars_on(
        device, kw["lr_tensor"], kw["extrap_lr_tensor"], kw["grad_scale"], kw["found_inf"])
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(params).items():
        addresses, numels = [], []
        for i in index:
            w = staging.lead(params[i], written=True)
            gk = staging.follow(local_grads[i], w, written=False) if has_local else None
            addresses.append((w.data_ptr(),
                              staging.follow(anchors[i], w, written=True).data_ptr(),
                              staging.follow(exp_avgs[i], w, written=True).data_ptr(),
                              staging.follow(exp_avg_sqs[i], w, written=True).data_ptr(),
                              staging.follow(grads[i], w, written=False).data_ptr(),
                              0 if gk is None else gk.data_ptr()))
            numels.append(w.numel())
        tab = mt.chunk_table(addresses, numels, (params[index[0]].element_size(),) * 6,
                             [index, [steps[i].data_ptr() for i in index]], device)
        bias = torch.empty(2 * len(index), dtype=torch.float64, device=device)
        skip_arg = mt.pointer(found_inf, tab.data)
        # A program per tensor, empty ones included: every counter counts the step.
        _adam_bias[(len(index),)](tab.data, tab.n_chunks, len(index), bias, skip_arg, beta1,
                                  beta2, HAS_SKIP=found_inf is not None, num_warps=1)
        if tab.n_chunks:
            w1 = 1.0 - beta1
            _adam_update[(tab.n_chunks,)](
                tab.data, tab.n_chunks, len(index), bias, lr, mt.pointer(lr_tensor, tab.data),
                float(kw["extrap_lr"]), mt.pointer(extrap_lr_tensor, tab.data),
                mt.pointer(grad_scale, tab.data), skip_arg, beta2, w1, 1.0 - beta2,
                float(kw["eps"]), weight_decay, 1.0 - lr * weight_decay,
                ELEM=ELEM[dtype], ACC=acc_types(dtype)[1], BLOCK=mt.block(max(numels)),
                HAS_SCALE=grad_scale is not None, HAS_LOCAL=has_local, HAS_WD=weight_decay != 0.0,
                DECOUPLED=bool(kw["decoupled_weight_decay"]), LERP_LOW=w1 < 0.5,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_ELR_TENSOR=extrap_lr_tensor is not None,
                HAS_SKIP=found_inf is not None, SOFT_BF16=soft_bf16(dtype),
                num_warps=mt.NUM_WARPS)
    staging.write_back()
    # Written through raw addresses: bumped as torch's in-place ops (and the native op) do.
    mt.bump_versions([*params, *anchors, *exp_avgs, *exp_avg_sqs, *steps])

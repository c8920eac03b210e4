"""Triton LAMB step (docs/algorithms.md section 7).

One chunk table per dtype group (``multi_tensor.py``) of lists (w, g, m, v) whose
per-tensor rows are (first chunk, end chunk, step address, excluded), and three
launches per group, nothing read back on the host:

1. ``_lamb_moments`` (a program per chunk): g unscaled and clipped, the new moments
   m and v, the direction u, and the chunk's sums of squares of w and u;
2. ``_lamb_coefs`` (a program per tensor): its partials added in chunk order
   (deterministic: no atomics), the trust ratio and the bias corrections of the
   step, then the step counted;
3. ``_lamb_update`` (a program per chunk): ``w -= lr r u`` from the same u, and with
   ``averages`` the stored weight averaged in (section 4).

u must be the value whose norm pass 1 took, which the reference computes from the
unrounded moments. fp32/fp64 moments store exactly, so pass 1 stores them and pass 3
reads w, m, v back (10 element accesses: w, g, m, v in, m, v out; w, m, v in, w out);
16-bit ones would round, so pass 1 stores nothing and pass 3 computes the moments
again from w, g and the old m, v (11 accesses of half the bytes). With
``max_grad_norm`` and no ``grad_norm``, the gradients' global norm is one more read
of g (``norms.total_sum_squares``). The AMP
``found_inf`` flag is read by every program: when set, nothing is written.

The stages (``stage="moments" | "update"``, docs/algorithms.md section 7) split the
call at pass 2: "moments" runs pass 1 storing the moments of every dtype (16-bit ones
rounded, after u took the unrounded values for its norm), then pass 2 writes each
tensor's sums (in ACC, as the full step adds them) into ``norm_sq`` (column: the
tensor's argument index, a per-tensor row) and counts the step; "update" runs pass 2
on the sums ``norm_sq`` gives, with the counters already counted, and pass 3 from the
stored moments of every dtype (w, m, v in, w out). For 16-bit tensors the update's u
then comes from the rounded moments, the full step's from the unrounded ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.lamb import check_lamb_args, clip_divisor
from . import multi_tensor as mt
from . import norms
from .extrap_adam import _pow_int
from .math import ELEM, acc_types, average_rate, average_update, chunk_rows, div, list_ptr, load
from .math import proceed, scalar, soft_bf16, sqrt, to_elem

# Per-tensor rows start after the 4 lists and the count, slot and begin rows.
TENSOR_ROWS: tl.constexpr = tl.constexpr(7)
# The STAGE of _lamb_coefs: the whole step, or one of the stages around the norms' sum.
STAGES = {"full": 0, "moments": 1, "update": 2}
# Warps of the two chunk passes: 8 (4 elements per thread at BLOCK 1024), as with 4 (8
# per thread) ptxas spilled 8-24 B in 14 of their variants (sm_90, Triton 3.6: the AOT
# check); per-tensor passes keep multi_tensor.NUM_WARPS.
NUM_WARPS = 8


@triton.jit
def _moments(w, g, m, v, scale, clip, b1, b3, b2, c2, wd, HAS_SCALE: tl.constexpr,
             HAS_CLIP: tl.constexpr, WD_L2: tl.constexpr, LERP: tl.constexpr,
             LERP_LOW: tl.constexpr):
    """lamb_math.h's lamb_moments: (m, v) from g / scale / clip (+ wd * w in L2 mode).
    LERP: timm's torch.lerp(m, g, b3) (its two formulas, b1 = 1 - b3 rounded); else
    m * b1 + b3 * g. v * b2 + c2 * g * g (c2 = 1 - b2)."""
    if HAS_SCALE:
        g = div(g, scale)
    if HAS_CLIP:
        g = div(g, clip)
    if WD_L2:
        g = g + wd * w
    if LERP:
        if LERP_LOW:
            m = m + b3 * (g - m)
        else:
            m = g - (g - m) * b1
    else:
        m = m * b1 + b3 * g
    v = v * b2 + c2 * g * g
    return m, v


@triton.jit
def _direction(w, m, v, bc1, bc2, eps, wd, WD_U: tl.constexpr, APEX: tl.constexpr):
    """lamb_math.h's lamb_direction: u = (m / bc1) / denom (+ wd * w), with
    denom = sqrt(v / bc2) + eps (apex, bc2 = 1 - b2^t) or sqrt(v) / bc2 + eps (timm,
    bc2 its square root); bc1 = bc2 = 1 without bias correction (exact divisions)."""
    if APEX:
        denom = sqrt(div(v, bc2)) + eps
    else:
        denom = div(sqrt(v), bc2) + eps
    u = div(div(m, bc1), denom)
    if WD_U:
        u = u + wd * w
    return u


@triton.jit
def _bias(step_ptr, beta1: tl.float64, beta2: tl.float64, ACC: tl.constexpr,
          BIAS: tl.constexpr, APEX: tl.constexpr, COUNTED: tl.constexpr = False):
    """(bc1, bc2) of the step after the counter at ``step_ptr`` (of the counter itself
    when COUNTED: the update stage), in fp64, rounded to ACC: 1 - beta1^t, and
    1 - beta2^t (apex) or its square root (timm); 1, 1 without bias correction."""
    if BIAS:
        t = tl.load(step_ptr)
        if not COUNTED:
            t = t + 1.0
        t = t.to(tl.int64)  # fp32 counters: exact up to 2^24
        bc1 = 1.0 - _pow_int(tl.full([], beta1, tl.float64), t)
        bc2 = 1.0 - _pow_int(tl.full([], beta2, tl.float64), t)
        if not APEX:
            bc2 = tl.sqrt(bc2)
        return bc1.to(ACC), bc2.to(ACC)
    else:
        return tl.full([], 1.0, ACC), tl.full([], 1.0, ACC)


@triton.jit
def _chunk_lists(table, n_chunks, c, ELEM: tl.constexpr):
    """(elements, tensor, w, g, m, v pointers) of chunk c of the table's four lists."""
    n, t, _ = chunk_rows(table, 4, n_chunks, c)
    return (n, t, list_ptr(table, 0, n_chunks, c, ELEM), list_ptr(table, 1, n_chunks, c, ELEM),
            list_ptr(table, 2, n_chunks, c, ELEM), list_ptr(table, 3, n_chunks, c, ELEM))


@triton.jit
def _constants(beta1, beta2, one_minus_beta1, one_minus_beta2, scale_ptr, clip_ptr,
               ACC: tl.constexpr, APEX: tl.constexpr, GRAD_AVG: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """(b1, b3, b2, c2, grad scale, clip divisor) in ACC: apex rounds b1 and b2 first and
    takes b3 = 1 - b1 and c2 = 1 - b2 in ACC; timm rounds the fp64 differences, and its
    lerp's b1 is 1 - b3 in ACC (torch.lerp's 1 - weight). b3 = 1 without grad averaging."""
    b1 = tl.full([], beta1, ACC)
    b2 = tl.full([], beta2, ACC)
    if APEX:
        c2 = 1.0 - b2
        b3 = 1.0 - b1
    else:
        c2 = tl.full([], one_minus_beta2, ACC)
        b3 = tl.full([], one_minus_beta1, ACC)
        if GRAD_AVG:
            b1 = 1.0 - b3
    if not GRAD_AVG:
        b3 = tl.full([], 1.0, ACC)
    return b1, b3, b2, c2, scalar(1.0, scale_ptr, HAS_SCALE, ACC), scalar(1.0, clip_ptr, HAS_CLIP, ACC)


@triton.jit
def _lamb_moments(table, n_chunks, n_tensors, partial, clip_ptr, scale_ptr, skip_ptr,
                  beta1: tl.float64, beta2: tl.float64, one_minus_beta1: tl.float64,
                  one_minus_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
                  ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, WD_L2: tl.constexpr,
                  WD_U: tl.constexpr, GRAD_AVG: tl.constexpr, LERP: tl.constexpr,
                  LERP_LOW: tl.constexpr, BIAS: tl.constexpr, APEX: tl.constexpr,
                  STORE: tl.constexpr, HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr):
    c = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        n, t, w_ptr, g_ptr, m_ptr, v_ptr = _chunk_lists(table, n_chunks, c, ELEM)
        rows = table + TENSOR_ROWS * n_chunks
        step_ptr = tl.load(rows + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
        included = tl.load(rows + 3 * n_tensors + t) == 0
        bc1, bc2 = _bias(step_ptr, beta1, beta2, ACC, BIAS, APEX)
        b1, b3, b2, c2, scale, clip = _constants(beta1, beta2, one_minus_beta1, one_minus_beta2,
                                                 scale_ptr, clip_ptr, ACC, APEX, GRAD_AVG,
                                                 HAS_SCALE, HAS_CLIP)
        eps_v = tl.full([], eps, ACC)
        wd = tl.full([], weight_decay, ACC)
        acc_w = tl.zeros([BLOCK], dtype=ACC)
        acc_u = tl.zeros([BLOCK], dtype=ACC)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            w = load(w_ptr, s + offs, mask, ACC)
            m, v = _moments(w, load(g_ptr, s + offs, mask, ACC), load(m_ptr, s + offs, mask, ACC),
                            load(v_ptr, s + offs, mask, ACC), scale, clip, b1, b3, b2, c2, wd,
                            HAS_SCALE, HAS_CLIP, WD_L2, LERP, LERP_LOW)
            if STORE:  # fp32/fp64 exactly; 16-bit rounded in the moments stage
                tl.store(m_ptr + s + offs, to_elem(m, ELEM, SOFT_BF16), mask=mask)
                tl.store(v_ptr + s + offs, to_elem(v, ELEM, SOFT_BF16), mask=mask)
            u = _direction(w, m, v, bc1, bc2, eps_v, wd, WD_U, APEX)
            acc_w += w * w
            acc_u += tl.where(mask, u * u, 0.0)
        # Excluded tensors (r = 1) need no norms: pass 2 reads none of their partials.
        if included:
            tl.store(partial + c, tl.sum(acc_w, 0))
            tl.store(partial + n_chunks + c, tl.sum(acc_u, 0))


@triton.jit
def _lamb_coefs(table, n_chunks, n_tensors, partial, coefs, max_trust: tl.float64, skip_ptr,
                beta1: tl.float64, beta2: tl.float64, norm_sq, n_params, ACC: tl.constexpr,
                RBLOCK: tl.constexpr, HAS_MAX_TRUST: tl.constexpr, CLIP: tl.constexpr,
                BIAS: tl.constexpr, APEX: tl.constexpr, HAS_SKIP: tl.constexpr,
                STAGE: tl.constexpr):
    # Rows of coefs: r, bc1, bc2 of tensor t at the step pass 1 used; then the step counts.
    # STAGE (STAGES): 1 writes the sums into norm_sq, 2 takes them from it.
    t = tl.program_id(0)
    rows = table + TENSOR_ROWS * n_chunks
    first = tl.load(rows + t)
    included = tl.load(rows + 3 * n_tensors + t) == 0
    end = tl.where(included, tl.load(rows + n_tensors + t), first)
    i = tl.load(rows + 4 * n_tensors + t)  # the tensor's column of norm_sq
    if STAGE == 2:  # the sums given, rounded to ACC as the full step holds them
        sum_w = tl.load(norm_sq + i).to(ACC)
        sum_u = tl.load(norm_sq + n_params + i).to(ACC)
    else:  # an excluded tensor's sums: 0 (no chunk)
        sum_w = norms._tensor_sum(partial, first, end, ACC, RBLOCK)
        sum_u = norms._tensor_sum(partial + n_chunks, first, end, ACC, RBLOCK)
    if STAGE == 1:
        tl.store(norm_sq + i, sum_w.to(norm_sq.dtype.element_ty))
        tl.store(norm_sq + n_params + i, sum_u.to(norm_sq.dtype.element_ty))
    n_w = sqrt(sum_w)
    n_u = sqrt(sum_u)
    phi = n_w
    if HAS_MAX_TRUST:
        phi = tl.minimum(n_w, tl.full([], max_trust, ACC))
    # The division runs for zero norms too (0/0); `where` discards it.
    r = tl.where((n_w > 0) & (n_u > 0) & included, div(phi, n_u), 1.0)
    if CLIP:
        r = tl.where(r < 1.0, r, 1.0)
    step_ptr = tl.load(rows + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
    bc1, bc2 = _bias(step_ptr, beta1, beta2, ACC, BIAS, APEX, STAGE == 2)
    tl.store(coefs + t, r)
    tl.store(coefs + n_tensors + t, bc1)
    tl.store(coefs + 2 * n_tensors + t, bc2)
    if STAGE != 2:  # the update stage's step was counted by the moments stage
        if proceed(skip_ptr, HAS_SKIP):
            tl.store(step_ptr, tl.load(step_ptr) + 1.0)


@triton.jit
def _lamb_update(table, n_chunks, n_tensors, coefs, lr: tl.float64, lr_ptr, clip_ptr,
                 scale_ptr, skip_ptr, beta1: tl.float64, beta2: tl.float64,
                 one_minus_beta1: tl.float64, one_minus_beta2: tl.float64, eps: tl.float64,
                 weight_decay: tl.float64, avg_table, count_ptr, one_minus_decay: tl.float64,
                 ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, WD_L2: tl.constexpr,
                 WD_U: tl.constexpr, GRAD_AVG: tl.constexpr, LERP: tl.constexpr,
                 LERP_LOW: tl.constexpr, APEX: tl.constexpr, STORED: tl.constexpr,
                 HAS_LR_TENSOR: tl.constexpr, HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr,
                 HAS_AVG: tl.constexpr, AVG: tl.constexpr, SWA: tl.constexpr):
    c = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        n, t, w_ptr, g_ptr, m_ptr, v_ptr = _chunk_lists(table, n_chunks, c, ELEM)
        r = tl.load(coefs + t)
        bc1 = tl.load(coefs + n_tensors + t)
        bc2 = tl.load(coefs + 2 * n_tensors + t)
        b1, b3, b2, c2, scale, clip = _constants(beta1, beta2, one_minus_beta1, one_minus_beta2,
                                                 scale_ptr, clip_ptr, ACC, APEX, GRAD_AVG,
                                                 HAS_SCALE, HAS_CLIP)
        lr_v = scalar(lr, lr_ptr, HAS_LR_TENSOR, ACC)
        lr_r = lr_v * r  # apex's step size
        eps_v = tl.full([], eps, ACC)
        wd = tl.full([], weight_decay, ACC)
        if HAS_AVG:  # folded averaging: avg_table's list 0 holds this chunk's average
            a_ptr = list_ptr(avg_table, 0, n_chunks, c, AVG)
            r_avg = average_rate(count_ptr, one_minus_decay, AVG, SWA)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            w = load(w_ptr, s + offs, mask, ACC)
            m = load(m_ptr, s + offs, mask, ACC)
            v = load(v_ptr, s + offs, mask, ACC)
            if not STORED:  # 16-bit moments: the unrounded values pass 1 had, then stored
                m, v = _moments(w, load(g_ptr, s + offs, mask, ACC), m, v, scale, clip, b1, b3,
                                b2, c2, wd, HAS_SCALE, HAS_CLIP, WD_L2, LERP, LERP_LOW)
                tl.store(m_ptr + s + offs, to_elem(m, ELEM, SOFT_BF16), mask=mask)
                tl.store(v_ptr + s + offs, to_elem(v, ELEM, SOFT_BF16), mask=mask)
            u = _direction(w, m, v, bc1, bc2, eps_v, wd, WD_U, APEX)
            if APEX:
                w = w - lr_r * u
            else:
                w = w - lr_v * (u * r)
            w_stored = to_elem(w, ELEM, SOFT_BF16)
            tl.store(w_ptr + s + offs, w_stored, mask=mask)
            if HAS_AVG:  # the stored (rounded) weight, as average_ would read it
                a = tl.load(a_ptr + s + offs, mask=mask, other=0.0)
                tl.store(a_ptr + s + offs, average_update(a, w_stored.to(AVG), r_avg), mask=mask)


def lamb_(params, grads, exp_avgs, exp_avg_sqs, steps, exclude, **kw) -> None:
    """One LAMB step in place; the contract (and keyword arguments) of
    ``lbkernels.reference.lamb.lamb_``."""
    check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, steps, exclude, **kw)
    if not params:
        return
    device = params[0].device
    mt.check_runnable(device)
    stage = STAGES[kw["stage"]]
    norm_sq = kw["norm_sq"]
    # The moments stage writes no weight: nothing to average.
    averages = (kw["averages"] or []) if stage != STAGES["moments"] else []
    average_count = kw["average_count"] if averages else None
    apex = kw["style"] == "apex"
    wd = float(kw["weight_decay"])
    decoupled = bool(kw["decoupled_weight_decay"])
    beta1, beta2 = float(kw["beta1"]), float(kw["beta2"])
    lr_tensor, grad_scale, found_inf, grad_norm = mt.scalars_on(
        device, kw["lr_tensor"], kw["grad_scale"], kw["found_inf"], kw["grad_norm"])
    staging = mt.Staging()
    clip = None
    if kw["max_grad_norm"] is not None and stage != STAGES["update"]:  # update reads no g
        if grad_norm is None:  # the norm of the scaled grads, in the reference's dtype
            dtype = (torch.float64 if all(g.dtype == torch.float64 for g in grads)
                     else torch.float32)
            grad_norm = norms.total_sum_squares(grads, staging).sqrt().to(dtype)
        clip = clip_divisor(grads, kw["max_grad_norm"], grad_norm, grad_scale)
    flags = dict(HAS_SCALE=grad_scale is not None, HAS_CLIP=clip is not None,
                 WD_L2=not decoupled and (apex or wd != 0.0),
                 WD_U=decoupled and (apex or wd != 0.0), GRAD_AVG=bool(kw["grad_averaging"]),
                 APEX=apex)
    # torch.lerp's formula by its weight (one compiled variant when there is no lerp).
    flags.update(LERP=not apex and flags["GRAD_AVG"],
                 LERP_LOW=not apex and flags["GRAD_AVG"] and 1.0 - beta1 < 0.5)
    for dtype, index in mt.group_by_dtype(params).items():
        addresses, leads = [], []
        for i in index:
            w = staging.lead(params[i], written=True)
            leads.append(w)
            addresses.append((w.data_ptr(), staging.follow(grads[i], w, written=False).data_ptr(),
                              staging.follow(exp_avgs[i], w, written=True).data_ptr(),
                              staging.follow(exp_avg_sqs[i], w, written=True).data_ptr()))
        numels = [w.numel() for w in leads]
        first, end = mt.chunk_spans(numels)
        rows = [first, end, [steps[i].data_ptr() for i in index],
                [int(bool(exclude[i])) for i in index], list(index)]
        tab = mt.chunk_table(addresses, numels, (params[index[0]].element_size(),) * 4, rows,
                             device)
        avg_rows = tab.data
        if averages:  # list 0 of a table with tab's chunking: each chunk's average
            avgs = [staging.follow(averages[i], w, written=True) for i, w in zip(index, leads)]
            avg_rows = mt.chunk_table([(a.data_ptr(),) for a in avgs], numels,
                                      (averages[index[0]].element_size(),), [], device).data
        acc_torch, acc = acc_types(dtype)
        # apex rounds beta1, beta2 to the arithmetic dtype first, bias corrections included.
        b1_bias, b2_bias = ((torch.tensor(b, dtype=acc_torch).item() for b in (beta1, beta2))
                            if apex else (beta1, beta2))
        block = mt.block(max(numels))
        partial = torch.empty(2 * max(1, tab.n_chunks), dtype=acc_torch, device=device)
        coefs = torch.empty(3 * tab.n_tensors, dtype=acc_torch, device=device)
        pointer = {name: mt.pointer(x, tab.data) for name, x in (
            ("clip", clip), ("scale", grad_scale), ("skip", found_inf), ("lr", lr_tensor),
            ("count", average_count))}
        consts = (b1_bias, b2_bias, 1.0 - beta1, 1.0 - beta2, float(kw["eps"]), wd)
        # Pass 1 stores the moments when exact (fp32/fp64), or always in the moments stage;
        # pass 3 reads them back then, and always in the update stage.
        store = dtype in (torch.float32, torch.float64) or stage == STAGES["moments"]
        has_skip = found_inf is not None
        if tab.n_chunks and stage != STAGES["update"]:
            _lamb_moments[(tab.n_chunks,)](
                tab.data, tab.n_chunks, tab.n_tensors, partial, pointer["clip"], pointer["scale"],
                pointer["skip"], *consts, ELEM=ELEM[dtype], ACC=acc, BLOCK=block,
                BIAS=bool(kw["bias_correction"]), STORE=store, HAS_SKIP=has_skip,
                SOFT_BF16=soft_bf16(dtype), **flags, num_warps=NUM_WARPS)
        # A program per tensor, empty ones included: every counter counts the step.
        max_trust = kw["max_trust"]
        _lamb_coefs[(tab.n_tensors,)](
            tab.data, tab.n_chunks, tab.n_tensors, partial, coefs,
            0.0 if max_trust is None else float(max_trust), pointer["skip"], b1_bias, b2_bias,
            mt.pointer(norm_sq, tab.data), len(params), ACC=acc, RBLOCK=mt.RBLOCK,
            HAS_MAX_TRUST=max_trust is not None, CLIP=bool(kw["clip"]),
            BIAS=bool(kw["bias_correction"]), APEX=apex, HAS_SKIP=has_skip, STAGE=stage,
            num_warps=mt.NUM_WARPS)
        if tab.n_chunks and stage != STAGES["moments"]:
            _lamb_update[(tab.n_chunks,)](
                tab.data, tab.n_chunks, tab.n_tensors, coefs, float(kw["lr"]), pointer["lr"],
                pointer["clip"], pointer["scale"], pointer["skip"], *consts, avg_rows,
                pointer["count"], 1.0 - float(kw["average_decay"]), ELEM=ELEM[dtype], ACC=acc,
                BLOCK=block, STORED=store or stage == STAGES["update"],
                HAS_LR_TENSOR=lr_tensor is not None,
                HAS_SKIP=has_skip, SOFT_BF16=soft_bf16(dtype), HAS_AVG=bool(averages),
                AVG=acc, SWA=kw["average_method"] == "swa", **flags, num_warps=NUM_WARPS)
    staging.write_back()
    if averages and average_count is not None:
        # After every launch of the call (stream order): each program read the old count.
        average_count.add_(1 if found_inf is None else (found_inf == 0).to(average_count.dtype))
    # Written through raw addresses: bumped as torch's in-place ops (and the native op) do.
    mt.bump_versions([*params, *exp_avgs, *exp_avg_sqs, *steps, *averages,
                      *([] if norm_sq is None else [norm_sq])])

"""Triton extrapolated SGD and extrap-Adam steps (ALGORITHMS.md sections 2, 2.1, 2.2).

One launch per dtype group and pass, each covering every tensor of the group through a
chunk table (rows: the lists' addresses at the chunk's first element, element count,
tensor slot, the chunk's first element index; then per-tensor rows):

``extrap_sgd_``
    [lars] ``_sum_squares`` and ``_lars_coefs`` of ``lars.py`` over (x, g): the trust
    ratio of every tensor from ||x|| and ||g||, deterministic, no atomics;
    ``_sgd_update`` (a program per chunk): the momentum-SGD step of the anchor x and the
    extrapolated point w = x - extrap_lr * gk, or w = x + noise;
    [filter] ``_filter_norms`` (a program per output filter: a * ||x_j|| / (||r_j|| +
    1e-6), from the updated anchor) then ``_filter_write`` (a program per chunk).
``extrap_adam_``
    ``_adam_bias`` (a program per tensor: step += 1, then the fp64 bias corrections)
    and ``_adam_update`` (a program per chunk).

Random numbers follow ``csrc/include/lbkernels/philox.h`` word for word: Triton's
``tl.philox`` is the same Philox4x32-10, fed the header's counter (element index / 4,
tensor index, low word of ``offset``) and key (``seed`` with the high word of
``offset`` folded in), and the words become U(-1, 1) or N(0, 1) values by the header's
formulas. A value is regenerated wherever it is needed, so the filter passes see the
same r without storing it. The noise variants walk tensors in row-major order
(non-contiguous ones through a contiguous temporary), as the counter is the row-major
element index.

The AMP ``found_inf`` flag is read by every program: when set, nothing is written. The
ops are registered as opaque custom ops (``lbkernels::triton_extrap_*``) with the
arguments of the main schemas; ``lbkernels.ops`` selects them with ``impl="triton"``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl

from .._validate import check_tensor_lists
from ..reference import extrap as ref
from . import multi_tensor as mt
from .math import div, sgd_update, sqrt, to_elem

# lars.py imports this module to list its ops in OPS, so the LARS module (its norm and
# trust-ratio kernels, element types and block sizes) is imported when first used.


def _lars():
    from . import lars

    return lars

_NUM_WARPS = 4

# extrapolation= values, as the kernels' MODE constant (the order of ref.EXTRAPOLATIONS).
_MODES = {name: k for k, name in enumerate(ref.EXTRAPOLATIONS)}
PAST_GRAD = tl.constexpr(_MODES["past_grad"])
GAUSSIAN = tl.constexpr(_MODES["gaussian"])
WEIGHT = tl.constexpr(_MODES["weight"])
FILTER = tl.constexpr(_MODES["filter"])

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1

# Tables kept per process; rebuilt only when storage moves (see multi_tensor.py).
_CACHE_ENTRIES = 64
_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _upload(key: tuple, build, device: torch.device) -> torch.Tensor:
    """The int64 table ``build()`` (a flat list) on ``device``, cached under ``key``."""
    data = _cache.get(key)
    if data is not None:
        _cache.move_to_end(key)
        return data
    host = torch.tensor(build(), dtype=torch.int64)
    # Pinned + non_blocking: the upload is queued on the stream, no host sync.
    data = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    _cache[key] = data
    if len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    return data


def chunk_table(addresses: list[tuple[int, ...]], numels: list[int], element_size: int,
                tensor_rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, int]:
    """Chunk table of one dtype group, and its number of chunks.

    ``addresses[k]`` holds tensor k's address in each list (0: absent). Layout, with ``L``
    lists, ``C`` chunks, ``T`` tensors: rows ``0..L-1`` the addresses at each chunk's
    first element, row ``L`` the element count, ``L + 1`` the tensor slot, ``L + 2`` the
    chunk's first element index within its tensor (all of length ``C``); then the rows of
    ``tensor_rows`` (length ``T`` each).
    """
    chunk = int(mt.CHUNK_SIZE)
    if chunk <= 0:
        raise ValueError(f"CHUNK_SIZE must be positive, got {chunk}")
    n_chunks = sum(-(-n // chunk) for n in numels)

    def build():
        n_lists = len(addresses[0]) if addresses else 0
        rows = [[] for _ in range(n_lists + 3)]
        for k, (addr, numel) in enumerate(zip(addresses, numels)):
            for begin in range(0, numel, chunk):
                for d, a in enumerate(addr):
                    rows[d].append(a + begin * element_size if a else 0)
                rows[n_lists].append(min(chunk, numel - begin))
                rows[n_lists + 1].append(k)
                rows[n_lists + 2].append(begin)
        return [v for row in rows + tensor_rows for v in row]

    key = (device, chunk, element_size, tuple(addresses), tuple(numels),
           tuple(tuple(r) for r in tensor_rows))
    return _upload(key, build, device), n_chunks


def block_for(longest: int, chunked: bool = True) -> int:
    """Elements per loop iteration for a launch whose longest run is ``longest``: the
    usual block, or the next power of two above ``longest`` when that is smaller, so
    that a group of small tensors does not pay for masked-off lanes (the interpreter's
    65,536-element block over a 300-element tensor is 200x the work). Runs that are not
    chunks (filters) ignore the chunk size, so that filter norms, summed in blocks of
    this size, do not depend on it."""
    lars = _lars()
    if chunked:
        limit = lars._block()
    else:
        limit = lars._BLOCK_INTERPRETED if mt.interpreting() else lars._BLOCK
    return max(16, min(limit, triton.next_power_of_2(max(1, longest))))


def filter_size(x: torch.Tensor) -> int:
    """Elements per output filter: dim 0 for ndim >= 2; a 0-d or 1-d tensor is one filter
    (1 for an empty tensor, which has no filters to draw for)."""
    if x.numel() == 0:
        return 1
    return x.numel() // x.shape[0] if x.dim() >= 2 else x.numel()


def noise_key(seed: int, offset: int) -> tuple[int, int]:
    """(Philox key as a signed 64-bit int, low counter word) of a call (philox.h layout)."""
    key = (seed & _MASK64) ^ ((offset >> 32) << 32 & _MASK64)
    return key - (1 << 64) if key >= 1 << 63 else key, offset & _MASK32


# --------------------------------------------------------------------------- kernels


@triton.jit
def noise(key, off_lo, index, e, NORMAL: tl.constexpr):
    """philox.h's value of elements ``e`` (int64) of tensor ``index``, in fp32: N(0, 1)
    (Box-Muller on the word pairs (0, 1) and (2, 3)) or U(-1, 1)."""
    q = e // 4
    lane = e % 4
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(key, c0, c1, zero + index.to(tl.uint32), zero + off_lo.to(tl.uint32))
    if NORMAL:
        first = lane < 2
        a = ((tl.where(first, w0, w2) >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
        b = (tl.where(first, w1, w3) >> 8).to(tl.float32) * 5.9604644775390625e-08
        radius = tl.sqrt_rn(-2.0 * tl.log(a))
        theta = 6.283185307179586 * b
        z = tl.where(lane % 2 == 0, radius * tl.cos(theta), radius * tl.sin(theta))
    else:
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        odd = ((word >> 8) * 2).to(tl.int32) + (1 - (1 << 24))
        z = odd.to(tl.float32) * 5.9604644775390625e-08
    return z


@triton.jit
def _scalar(value, ptr, HAS_TENSOR: tl.constexpr, ACC: tl.constexpr):
    """A float argument or its one-element tensor form, in the arithmetic type."""
    if HAS_TENSOR:
        return tl.load(ptr).to(ACC)
    else:
        return tl.full([], value, ACC)


@triton.jit
def _sgd_update(table, n_chunks, coefs, lr: "fp64", lr_ptr, elr: "fp64", elr_ptr, scale_ptr,
                skip_ptr, momentum: "fp64", weight_decay: "fp64", noise_scale: "fp64", key, off_lo,
                ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                LARS: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                HAS_ELR_TENSOR: tl.constexpr, HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr):
    # Chunk rows: w, x, buf, g, gk, count, slot, begin; tensor row 0: argument index.
    c = tl.program_id(0)
    work = True
    if HAS_SKIP:
        work = tl.load(skip_ptr) == 0
    if work:
        w_ptr = tl.load(table + c).to(tl.pointer_type(ELEM))
        x_ptr = tl.load(table + n_chunks + c).to(tl.pointer_type(ELEM))
        b_ptr = tl.load(table + 2 * n_chunks + c).to(tl.pointer_type(ELEM))
        g_ptr = tl.load(table + 3 * n_chunks + c).to(tl.pointer_type(ELEM))
        gk_ptr = tl.load(table + 4 * n_chunks + c).to(tl.pointer_type(ELEM))
        n = tl.load(table + 5 * n_chunks + c)
        t = tl.load(table + 6 * n_chunks + c)
        begin = tl.load(table + 7 * n_chunks + c)
        index = tl.load(table + 8 * n_chunks + t)
        one = tl.full([], 1.0, ACC)
        r = one
        if LARS:
            r = tl.load(coefs + t)
        lr_v = _scalar(lr, lr_ptr, HAS_LR_TENSOR, ACC)
        elr_v = _scalar(elr, elr_ptr, HAS_ELR_TENSOR, ACC)
        scale = one
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(ACC)
        m = tl.full([], momentum, ACC)
        wd = tl.full([], weight_decay, ACC)
        a = tl.full([], noise_scale, ACC)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            x = tl.load(x_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            buf = x
            if HAS_MOMENTUM:
                buf = tl.load(b_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            # buf = m * buf + d: zero-initialised buffers, no first-step case.
            x, buf = sgd_update(x, buf, g, scale, wd, r, one, m, one, lr_v, False,
                                HAS_SCALE, HAS_MOMENTUM, NESTEROV)
            tl.store(x_ptr + s + offs, to_elem(x, ELEM, SOFT_BF16), mask=mask)
            if HAS_MOMENTUM:
                tl.store(b_ptr + s + offs, to_elem(buf, ELEM, SOFT_BF16), mask=mask)
            if MODE == PAST_GRAD:  # w = x - extrap_lr * gk
                gk = g
                if HAS_LOCAL:
                    gk = tl.load(gk_ptr + s + offs, mask=mask, other=0.0).to(ACC)
                if HAS_SCALE:
                    gk = div(gk, scale)
                w = x - elr_v * gk
                tl.store(w_ptr + s + offs, to_elem(w, ELEM, SOFT_BF16), mask=mask)
            elif MODE != FILTER:  # filter: w is written by _filter_write
                z = noise(key, off_lo, index, begin + s + offs, MODE == GAUSSIAN).to(ACC)
                if MODE == WEIGHT:
                    w = x + a * z * tl.abs(x)
                else:
                    w = x + a * z
                tl.store(w_ptr + s + offs, to_elem(w, ELEM, SOFT_BF16), mask=mask)


@triton.jit
def _filter_norms(ftable, n_filters, factors, skip_ptr, noise_scale: "fp64", key, off_lo,
                  ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_SKIP: tl.constexpr):
    # A program per filter. Rows: address of the filter's first anchor element, F,
    # argument index, index of the filter's first element; factor slot = program id.
    j = tl.program_id(0)
    work = True
    if HAS_SKIP:
        work = tl.load(skip_ptr) == 0
    if work:
        x_ptr = tl.load(ftable + j).to(tl.pointer_type(ELEM))
        f = tl.load(ftable + n_filters + j)
        index = tl.load(ftable + 2 * n_filters + j)
        e0 = tl.load(ftable + 3 * n_filters + j)
        acc_x = tl.zeros([BLOCK], dtype=ACC)
        acc_r = tl.zeros([BLOCK], dtype=ACC)
        offs = tl.arange(0, BLOCK)
        for s in range(0, f, BLOCK):
            mask = s + offs < f
            x = tl.load(x_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            z = tl.where(mask, noise(key, off_lo, index, e0 + s + offs, False).to(ACC), 0.0)
            acc_x += x * x
            acc_r += z * z
        n_x = sqrt(tl.sum(acc_x, 0))
        n_r = sqrt(tl.sum(acc_r, 0))
        factor = div(tl.full([], noise_scale, ACC) * n_x, n_r + 1e-6)
        tl.store(factors + j, factor)


@triton.jit
def _filter_write(table, n_chunks, n_tensors, factors, skip_ptr, key, off_lo,
                  ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr):
    # w = x + factor_j * r. Tensor rows: argument index, F, slot of the first filter.
    c = tl.program_id(0)
    work = True
    if HAS_SKIP:
        work = tl.load(skip_ptr) == 0
    if work:
        w_ptr = tl.load(table + c).to(tl.pointer_type(ELEM))
        x_ptr = tl.load(table + n_chunks + c).to(tl.pointer_type(ELEM))
        n = tl.load(table + 5 * n_chunks + c)
        t = tl.load(table + 6 * n_chunks + c)
        begin = tl.load(table + 7 * n_chunks + c)
        rows = table + 8 * n_chunks
        index = tl.load(rows + t)
        f = tl.load(rows + n_tensors + t)
        first_filter = tl.load(rows + 2 * n_tensors + t)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            e = begin + s + offs
            x = tl.load(x_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            z = noise(key, off_lo, index, e, False).to(ACC)
            factor = tl.load(factors + first_filter + e // f, mask=mask, other=0.0)
            tl.store(w_ptr + s + offs, to_elem(x + factor * z, ELEM, SOFT_BF16), mask=mask)


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
def _adam_bias(table, n_chunks, n_tensors, bias, skip_ptr, beta1: "fp64", beta2: "fp64",
               HAS_SKIP: tl.constexpr):
    # A program per tensor (empty ones included). Tensor row 1: the step counter address.
    # bias[t] = 1 - beta1^t, bias[T + t] = sqrt(1 - beta2^t), in fp64 from the new step.
    t = tl.program_id(0)
    step_ptr = tl.load(table + 9 * n_chunks + n_tensors + t).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr) + 1.0
    count = True
    if HAS_SKIP:
        count = tl.load(skip_ptr) == 0
    if count:
        tl.store(step_ptr, step)
    n = step.to(tl.int64)  # fp32 counters are exact integers up to 2^24
    tl.store(bias + t, 1.0 - _pow_int(tl.full([], beta1, tl.float64), n))
    tl.store(bias + n_tensors + t, tl.sqrt(1.0 - _pow_int(tl.full([], beta2, tl.float64), n)))


@triton.jit
def _adam_update(table, n_chunks, n_tensors, bias, lr: "fp64", lr_ptr, elr: "fp64", elr_ptr,
                 scale_ptr, skip_ptr, beta2: "fp64", w1: "fp64", w2: "fp64", eps: "fp64",
                 weight_decay: "fp64", decay: "fp64",
                 ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_WD: tl.constexpr,
                 DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                 HAS_ELR_TENSOR: tl.constexpr, HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr):
    # extrap_math.h's extrap_adam_update. Chunk rows: w, x, m, v, g, gk, count, slot, begin.
    c = tl.program_id(0)
    work = True
    if HAS_SKIP:
        work = tl.load(skip_ptr) == 0
    if work:
        w_ptr = tl.load(table + c).to(tl.pointer_type(ELEM))
        x_ptr = tl.load(table + n_chunks + c).to(tl.pointer_type(ELEM))
        m_ptr = tl.load(table + 2 * n_chunks + c).to(tl.pointer_type(ELEM))
        v_ptr = tl.load(table + 3 * n_chunks + c).to(tl.pointer_type(ELEM))
        g_ptr = tl.load(table + 4 * n_chunks + c).to(tl.pointer_type(ELEM))
        gk_ptr = tl.load(table + 5 * n_chunks + c).to(tl.pointer_type(ELEM))
        n = tl.load(table + 6 * n_chunks + c)
        t = tl.load(table + 7 * n_chunks + c)
        # lr / (1 - beta1^t) in fp64 (a tensor lr rounded to ACC first), as the reference.
        if HAS_LR_TENSOR:
            lr_a = tl.load(lr_ptr).to(ACC)
            step_size = (lr_a.to(tl.float64) / tl.load(bias + t)).to(ACC)
            shrink = 1.0 - lr_a * tl.full([], weight_decay, ACC)
        else:
            step_size = (lr / tl.load(bias + t)).to(ACC)
            shrink = tl.full([], decay, ACC)
        bc2_sqrt = tl.load(bias + n_tensors + t).to(ACC)
        elr_v = _scalar(elr, elr_ptr, HAS_ELR_TENSOR, ACC)
        scale = tl.full([], 1.0, ACC)
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(ACC)
        wd = tl.full([], weight_decay, ACC)
        lerp_w = tl.full([], w1, ACC)
        lerp_wc = 1.0 - lerp_w
        b2 = tl.full([], beta2, ACC)
        c2 = tl.full([], w2, ACC)
        eps_v = tl.full([], eps, ACC)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            x = tl.load(x_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            m = tl.load(m_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            v = tl.load(v_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            if HAS_SCALE:
                g = div(g, scale)
            gk = g
            if HAS_LOCAL:
                gk = tl.load(gk_ptr + s + offs, mask=mask, other=0.0).to(ACC)
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
            tl.store(w_ptr + s + offs, to_elem(w, ELEM, SOFT_BF16), mask=mask)
            tl.store(x_ptr + s + offs, to_elem(x, ELEM, SOFT_BF16), mask=mask)
            tl.store(m_ptr + s + offs, to_elem(m, ELEM, SOFT_BF16), mask=mask)
            tl.store(v_ptr + s + offs, to_elem(v, ELEM, SOFT_BF16), mask=mask)


# ------------------------------------------------------------------------ launchers


def _check_sgd_args(params, anchors, momentum_buffers, grads, local_grads, exclude, lr,
                    lr_tensor, extrap_lr, extrap_lr_tensor, momentum, weight_decay,
                    extrapolation, noise_scale, offset, grad_scale, found_inf) -> None:
    """The reference's checks, in its order and with its messages."""
    ref._check_common(params, anchors, grads, local_grads, lr_tensor, extrap_lr_tensor,
                      grad_scale, found_inf)
    check_tensor_lists(params, same_shape={}, flags={"exclude": exclude})
    if momentum != 0.0:
        check_tensor_lists(params, same_shape={"momentum_buffers": momentum_buffers})
    if extrapolation not in ref.EXTRAPOLATIONS:
        raise ValueError(f"extrapolation must be one of {ref.EXTRAPOLATIONS}, got {extrapolation!r}")
    ref.check_nonnegative(lr=lr, extrap_lr=extrap_lr, momentum=momentum,
                          weight_decay=weight_decay, noise_scale=noise_scale, offset=offset)


def _extrap_sgd(params, anchors, momentum_buffers, grads, local_grads, exclude, lr, lr_tensor,
                extrap_lr, extrap_lr_tensor, momentum, weight_decay, nesterov, lars,
                trust_coefficient, eps, clip, extrapolation, noise_scale, seed, offset,
                grad_scale, found_inf) -> None:
    _check_sgd_args(params, anchors, momentum_buffers, grads, local_grads, exclude, lr,
                    lr_tensor, extrap_lr, extrap_lr_tensor, momentum, weight_decay,
                    extrapolation, noise_scale, offset, grad_scale, found_inf)
    if not params:
        return
    device = params[0].device
    lars_mod = _lars()
    lars_mod._check_runnable(device)
    mode = _MODES[extrapolation]
    filter_mode = extrapolation == "filter"
    has_momentum = momentum != 0.0
    has_local = len(local_grads) > 0 and extrapolation == "past_grad"
    lr_tensor = mt.scalar_on(lr_tensor, device)
    extrap_lr_tensor = mt.scalar_on(extrap_lr_tensor, device)
    grad_scale = mt.scalar_on(grad_scale, device)
    found_inf = mt.scalar_on(found_inf, device)
    key, off_lo = noise_key(int(seed), int(offset))
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(params).items():
        addresses, numels, f_sizes, first_filters, filter_rows = [], [], [], [], []
        n_filters = 0
        norm_entries = []
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
            norm_entries.append(mt.Entry(x.data_ptr(), g.data_ptr(), 0, 0, w.numel(),
                                         bool(exclude[i]), i))
            f = filter_size(w)
            f_sizes.append(f)
            first_filters.append(n_filters)
            if filter_mode and w.numel():
                filter_rows.append((x.data_ptr(), w.numel(), f, i))
                n_filters += w.numel() // f
        elem = params[index[0]].element_size()
        tab, n_chunks = chunk_table(addresses, numels, elem, [index, f_sizes, first_filters], device)
        block = block_for(min(max(numels), int(mt.CHUNK_SIZE)))
        acc_torch, acc = lars_mod._acc(dtype)
        elem_t = lars_mod._ELEM[dtype]
        lr_arg = tab if lr_tensor is None else lr_tensor
        elr_arg = tab if extrap_lr_tensor is None else extrap_lr_tensor
        scale_arg = tab if grad_scale is None else grad_scale
        skip_arg = tab if found_inf is None else found_inf
        has_skip = found_inf is not None
        coefs = tab
        if lars:
            norm_tab = mt.table(norm_entries, elem, device)
            partial = torch.empty(2 * max(1, norm_tab.n_chunks), dtype=acc_torch, device=device)
            coefs = torch.empty(3 * norm_tab.n_tensors, dtype=acc_torch, device=device)
            if norm_tab.n_chunks:
                lars_mod._sum_squares[(norm_tab.n_chunks,)](
                    norm_tab.data, norm_tab.n_chunks, norm_tab.n_tensors, partial, scale_arg,
                    skip_arg, ELEM=elem_t, ACC=acc, BLOCK=block, WITH_G=True,
                    HAS_SCALE=grad_scale is not None, HAS_SKIP=has_skip, num_warps=_NUM_WARPS)
            # zero_norm_decay: a zero norm sets r = 1 and keeps the weight decay.
            lars_mod._lars_coefs[(norm_tab.n_tensors,)](
                norm_tab.data, norm_tab.n_chunks, norm_tab.n_tensors, partial, coefs, float(lr),
                lr_arg, float(weight_decay), float(trust_coefficient), float(eps), skip_arg,
                ACC=acc, RBLOCK=lars_mod._RBLOCK, CLIP=bool(clip), ZERO_NORM_DECAY=True,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_MOMENTUM=False, HAS_STEPS=False,
                HAS_SKIP=has_skip, num_warps=_NUM_WARPS)
        soft_bf16 = dtype == torch.bfloat16 and mt.interpreting()
        if n_chunks:
            _sgd_update[(n_chunks,)](
                tab, n_chunks, coefs, float(lr), lr_arg, float(extrap_lr), elr_arg, scale_arg,
                skip_arg, float(momentum), float(weight_decay), float(noise_scale), key, off_lo,
                ELEM=elem_t, ACC=acc, BLOCK=block, MODE=mode,
                HAS_SCALE=grad_scale is not None, HAS_MOMENTUM=has_momentum,
                NESTEROV=bool(nesterov) and has_momentum, LARS=bool(lars), HAS_LOCAL=has_local,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_ELR_TENSOR=extrap_lr_tensor is not None,
                HAS_SKIP=has_skip, SOFT_BF16=soft_bf16, num_warps=_NUM_WARPS)
        if filter_mode and n_filters:
            ftab = _filter_table(filter_rows, elem, device)
            longest = max(f for _, _, f, _ in filter_rows)
            factors = torch.empty(n_filters, dtype=acc_torch, device=device)
            _filter_norms[(n_filters,)](
                ftab, n_filters, factors, skip_arg, float(noise_scale), key, off_lo,
                ELEM=elem_t, ACC=acc, BLOCK=block_for(longest, chunked=False),
                HAS_SKIP=has_skip,
                num_warps=_NUM_WARPS)
            _filter_write[(n_chunks,)](
                tab, n_chunks, len(index), factors, skip_arg, key, off_lo,
                ELEM=elem_t, ACC=acc, BLOCK=block, HAS_SKIP=has_skip,
                SOFT_BF16=soft_bf16, num_warps=_NUM_WARPS)
    staging.write_back()


def _filter_table(rows: list[tuple[int, int, int, int]], element_size: int,
                  device: torch.device) -> torch.Tensor:
    """Per-filter rows of ``_filter_norms`` from (anchor address, numel, F, argument
    index) per tensor: first-element address, F, argument index, first element index."""

    def build():
        out = [[], [], [], []]
        for addr, numel, f, i in rows:
            for e0 in range(0, numel, f):
                out[0].append(addr + e0 * element_size)
                out[1].append(f)
                out[2].append(i)
                out[3].append(e0)
        return [v for row in out for v in row]

    return _upload(("filter", device, element_size, tuple(rows)), build, device)


def _check_adam_args(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads, lr,
                     lr_tensor, extrap_lr, extrap_lr_tensor, beta1, beta2, eps, weight_decay,
                     grad_scale, found_inf) -> None:
    """The reference's checks, in its order and with its messages."""
    ref._check_common(params, anchors, grads, local_grads, lr_tensor, extrap_lr_tensor,
                      grad_scale, found_inf)
    check_tensor_lists(params, same_shape={"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
    if len(steps) != len(params):
        raise ValueError(f"steps has {len(steps)} entries but params has {len(params)}")
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise TypeError(f"steps[{i}] must be a one-element float32 tensor")
        if s.device != params[i].device:
            raise ValueError(f"steps[{i}] is on {s.device} but params[{i}] is on {params[i].device}")
    ref.check_nonnegative(lr=lr, extrap_lr=extrap_lr, eps=eps, weight_decay=weight_decay)
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")


def _extrap_adam(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads, lr,
                 lr_tensor, extrap_lr, extrap_lr_tensor, beta1, beta2, eps, weight_decay,
                 decoupled_weight_decay, grad_scale, found_inf) -> None:
    _check_adam_args(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads, lr,
                     lr_tensor, extrap_lr, extrap_lr_tensor, beta1, beta2, eps, weight_decay,
                     grad_scale, found_inf)
    if not params:
        return
    device = params[0].device
    lars_mod = _lars()
    lars_mod._check_runnable(device)
    has_local = len(local_grads) > 0
    lr_tensor = mt.scalar_on(lr_tensor, device)
    extrap_lr_tensor = mt.scalar_on(extrap_lr_tensor, device)
    grad_scale = mt.scalar_on(grad_scale, device)
    found_inf = mt.scalar_on(found_inf, device)
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
        tab, n_chunks = chunk_table(addresses, numels, params[index[0]].element_size(),
                                    [index, [steps[i].data_ptr() for i in index]], device)
        block = block_for(min(max(numels), int(mt.CHUNK_SIZE)))
        _, acc = lars_mod._acc(dtype)
        bias = torch.empty(2 * len(index), dtype=torch.float64, device=device)
        skip_arg = tab if found_inf is None else found_inf
        # A program per tensor, empty ones included: every counter counts the step.
        _adam_bias[(len(index),)](tab, n_chunks, len(index), bias, skip_arg, float(beta1),
                                  float(beta2), HAS_SKIP=found_inf is not None, num_warps=1)
        if n_chunks:
            w1 = 1.0 - float(beta1)
            _adam_update[(n_chunks,)](
                tab, n_chunks, len(index), bias, float(lr), tab if lr_tensor is None else lr_tensor,
                float(extrap_lr), tab if extrap_lr_tensor is None else extrap_lr_tensor,
                tab if grad_scale is None else grad_scale, skip_arg, float(beta2), w1,
                1.0 - float(beta2), float(eps), float(weight_decay),
                1.0 - float(lr) * float(weight_decay),
                ELEM=lars_mod._ELEM[dtype], ACC=acc, BLOCK=block,
                HAS_SCALE=grad_scale is not None,
                HAS_LOCAL=has_local, HAS_WD=weight_decay != 0.0,
                DECOUPLED=bool(decoupled_weight_decay), LERP_LOW=w1 < 0.5,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_ELR_TENSOR=extrap_lr_tensor is not None,
                HAS_SKIP=found_inf is not None,
                SOFT_BF16=dtype == torch.bfloat16 and mt.interpreting(), num_warps=_NUM_WARPS)
    staging.write_back()


# ------------------------------------------------------------------------ custom ops
# Same argument names, types and defaults as the main schemas in _library.py, but not
# keyword-only: custom_op does not accept keyword-only tensor arguments.


@torch.library.custom_op("lbkernels::triton_extrap_sgd_",
                         mutates_args=("params", "anchors", "momentum_buffers"))
def triton_extrap_sgd_(
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    grads: list[torch.Tensor],
    local_grads: list[torch.Tensor],
    exclude: list[bool],
    lr: float,
    lr_tensor: Optional[torch.Tensor] = None,
    extrap_lr: float = 0.0,
    extrap_lr_tensor: Optional[torch.Tensor] = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    lars: bool = False,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    clip: bool = False,
    extrapolation: str = "past_grad",
    noise_scale: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One extrapolated-SGD step in place; the contract of ``reference.extrap.extrap_sgd_``."""
    _extrap_sgd(params, anchors, momentum_buffers, grads, local_grads, exclude, lr, lr_tensor,
                extrap_lr, extrap_lr_tensor, momentum, weight_decay, nesterov, lars,
                trust_coefficient, eps, clip, extrapolation, noise_scale, seed, offset,
                grad_scale, found_inf)


@triton_extrap_sgd_.register_fake
def _(params, anchors, momentum_buffers, grads, local_grads, exclude, lr, lr_tensor=None,
      extrap_lr=0.0, extrap_lr_tensor=None, momentum=0.0, weight_decay=0.0, nesterov=False,
      lars=False, trust_coefficient=0.001, eps=1e-8, clip=False, extrapolation="past_grad",
      noise_scale=0.0, seed=0, offset=0, grad_scale=None, found_inf=None):
    return None


@torch.library.custom_op("lbkernels::triton_extrap_adam_",
                         mutates_args=("params", "anchors", "exp_avgs", "exp_avg_sqs", "steps"))
def triton_extrap_adam_(
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    grads: list[torch.Tensor],
    local_grads: list[torch.Tensor],
    lr: float,
    lr_tensor: Optional[torch.Tensor] = None,
    extrap_lr: float = 0.0,
    extrap_lr_tensor: Optional[torch.Tensor] = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One extrap-Adam step in place; the contract of ``reference.extrap.extrap_adam_``."""
    _extrap_adam(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads, lr,
                 lr_tensor, extrap_lr, extrap_lr_tensor, beta1, beta2, eps, weight_decay,
                 decoupled_weight_decay, grad_scale, found_inf)


@triton_extrap_adam_.register_fake
def _(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads, lr, lr_tensor=None,
      extrap_lr=0.0, extrap_lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
      decoupled_weight_decay=False, grad_scale=None, found_inf=None):
    return None

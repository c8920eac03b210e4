"""Triton LARS-SGD step and multi-tensor L2 norm (ALGORITHMS.md sections 1 and 6).

Three launches per dtype group, each covering every tensor of the group through the
chunk table of ``multi_tensor.py``; nothing is read back to the host:

1. ``_sum_squares``: one program per chunk writes the chunk's sums of squares of w and
   of the unscaled g (fp32, fp64 for fp64 tensors) to a partials buffer;
2. ``_lars_coefs`` (``_norms`` for the norm op): one program per tensor adds its
   chunks' partials in chunk order (deterministic: no atomics), takes the norms, and
   writes the tensor's trust ratio, weight decay and first-step flag; it then counts
   the step, the update reading the flag from the coefficients, not from the counter;
3. ``_lars_update``: one program per chunk applies ``sgd_update`` with its tensor's
   coefficients.

The AMP ``found_inf`` flag is read by every program: when set, nothing is written.
The ops are registered as opaque custom ops (``lbkernels::triton_*``) with the
arguments of the main schemas; ``lbkernels.ops`` selects them with ``impl="triton"``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._validate import check_scalar_tensor, check_tensor_lists
from ..reference.lars import check_folded_average_args
from . import multi_tensor as mt
from .math import average_update, div, lars_scale, sgd_update, sqrt
from .math import to_elem as _to_elem

_ELEM = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
         torch.bfloat16: tl.bfloat16}

# Elements per loop iteration of a chunk program. On a GPU, 1024 with 4 warps is 8
# elements (two 16-byte fp32 loads) per thread, which saturates bandwidth; the
# interpreter runs one numpy operation per iteration, so there a whole chunk at once.
_BLOCK = 1024
_BLOCK_INTERPRETED = 65536
# Partials reduced per iteration of a per-tensor program.
_RBLOCK = 1024
_NUM_WARPS = 4


def _block() -> int:
    limit = _BLOCK_INTERPRETED if mt.interpreting() else _BLOCK
    return min(limit, triton.next_power_of_2(max(1, mt.CHUNK_SIZE)))


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _sum_squares(table, n_chunks, n_tensors, partial, scale_ptr, skip_ptr,
                 ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 WITH_G: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(table + 4 * n_chunks + c)
    # Excluded tensors need no norms, and a skipped step none at all: read nothing.
    work = tl.load(table + 5 * n_chunks + 3 * n_tensors + t) == 0
    if HAS_SKIP:
        work = work & (tl.load(skip_ptr) == 0)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    if work:
        n = tl.load(table + 3 * n_chunks + c)
        w_ptr = tl.load(table + c).to(tl.pointer_type(ELEM))
        g_ptr = tl.load(table + n_chunks + c).to(tl.pointer_type(ELEM))
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            w = tl.load(w_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            acc_w += w * w
            if WITH_G:
                g = tl.load(g_ptr + s + offs, mask=mask, other=0.0).to(ACC)
                if HAS_SCALE:
                    # The norm of the unscaled gradient, element by element as the
                    # reference computes it (no overflow of g**2 at large scales).
                    g = div(g, tl.load(scale_ptr).to(ACC))
                acc_g += g * g
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
    rows = table + 5 * n_chunks
    first = tl.load(rows + t)
    end = tl.load(rows + n_tensors + t)
    norm = sqrt(_tensor_sum(partial, first, end, ACC, RBLOCK))
    tl.store(out + tl.load(rows + 4 * n_tensors + t), norm.to(tl.float32))


@triton.jit
def _lars_coefs(table, n_chunks, n_tensors, partial, coefs, lr: "fp64", lr_ptr,
                weight_decay: "fp64", trust_coefficient: "fp64", eps: "fp64", skip_ptr,
                ACC: tl.constexpr, RBLOCK: tl.constexpr, CLIP: tl.constexpr,
                ZERO_NORM_DECAY: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, HAS_STEPS: tl.constexpr, HAS_SKIP: tl.constexpr):
    t = tl.program_id(0)
    rows = table + 5 * n_chunks
    first = tl.load(rows + t)
    end = tl.load(rows + n_tensors + t)
    excluded = tl.load(rows + 3 * n_tensors + t) != 0
    n_w = sqrt(_tensor_sum(partial, first, end, ACC, RBLOCK))
    n_g = sqrt(_tensor_sum(partial + n_chunks, first, end, ACC, RBLOCK))
    if HAS_LR_TENSOR:
        lr_v = tl.load(lr_ptr).to(ACC)
    else:
        lr_v = tl.full([], lr, ACC)
    r, wd = lars_scale(n_w, n_g, lr_v, tl.full([], weight_decay, ACC),
                       tl.full([], trust_coefficient, ACC), tl.full([], eps, ACC), CLIP,
                       ZERO_NORM_DECAY, excluded)
    tl.store(coefs + t, r)
    tl.store(coefs + n_tensors + t, wd)
    if HAS_STEPS:
        step_ptr = tl.load(rows + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr)
        tl.store(coefs + 2 * n_tensors + t, (step == 0).to(ACC))
        count = True
        if HAS_SKIP:
            count = tl.load(skip_ptr) == 0
        if count:
            tl.store(step_ptr, step + 1.0)
    elif HAS_MOMENTUM:  # zero-initialised buffers: m * 0 + d is already the first step
        tl.store(coefs + 2 * n_tensors + t, tl.zeros([], ACC))


@triton.jit
def _lars_update(table, n_chunks, n_tensors, coefs, lr: "fp64", lr_ptr, scale_ptr, skip_ptr,
                 momentum: "fp64", one_minus_dampening: "fp64", avg_table, count_ptr,
                 one_minus_decay: "fp64",
                 ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                 PAPER: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_SKIP: tl.constexpr,
                 SOFT_BF16: tl.constexpr, HAS_AVG: tl.constexpr, AVG: tl.constexpr,
                 SWA: tl.constexpr):
    c = tl.program_id(0)
    work = True
    if HAS_SKIP:
        work = tl.load(skip_ptr) == 0
    if work:
        t = tl.load(table + 4 * n_chunks + c)
        n = tl.load(table + 3 * n_chunks + c)
        w_ptr = tl.load(table + c).to(tl.pointer_type(ELEM))
        g_ptr = tl.load(table + n_chunks + c).to(tl.pointer_type(ELEM))
        b_ptr = tl.load(table + 2 * n_chunks + c).to(tl.pointer_type(ELEM))
        r = tl.load(coefs + t)
        wd = tl.load(coefs + n_tensors + t)
        first = False
        if HAS_MOMENTUM:
            first = tl.load(coefs + 2 * n_tensors + t) != 0
        if HAS_LR_TENSOR:
            lr_v = tl.load(lr_ptr).to(ACC)
        else:
            lr_v = tl.full([], lr, ACC)
        one = tl.full([], 1.0, ACC)
        # momentum_style="paper" keeps lr in the buffer: d is scaled by lr, w -= u.
        if PAPER:
            pre = lr_v
            step_lr = one
        else:
            pre = one
            step_lr = lr_v
        scale = one
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(ACC)
        m = tl.full([], momentum, ACC)
        damp = tl.full([], one_minus_dampening, ACC)
        if HAS_AVG:  # folded averaging: avg_table[c] is the address of this chunk's average
            a_ptr = tl.load(avg_table + c).to(tl.pointer_type(AVG))
            if SWA:
                r_avg = div(tl.full([], 1.0, AVG), tl.load(count_ptr).to(AVG) + tl.full([], 1.0, AVG))
            else:
                r_avg = tl.full([], one_minus_decay, AVG)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            w = tl.load(w_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            buf = w
            if HAS_MOMENTUM:
                buf = tl.load(b_ptr + s + offs, mask=mask, other=0.0).to(ACC)
            w, buf = sgd_update(w, buf, g, scale, wd, r, pre, m, damp, step_lr, first,
                                HAS_SCALE, HAS_MOMENTUM, NESTEROV)
            w_stored = _to_elem(w, ELEM, SOFT_BF16)
            tl.store(w_ptr + s + offs, w_stored, mask=mask)
            if HAS_MOMENTUM:
                tl.store(b_ptr + s + offs, _to_elem(buf, ELEM, SOFT_BF16), mask=mask)
            if HAS_AVG:  # the stored (rounded) weight, as average_ would read it
                a = tl.load(a_ptr + s + offs, mask=mask, other=0.0)
                tl.store(a_ptr + s + offs, average_update(a, w_stored.to(AVG), r_avg), mask=mask)


# ------------------------------------------------------------------------ launchers


def _check_runnable(device: torch.device) -> None:
    from . import available

    ok, why = available(device.type)
    if not ok:
        raise RuntimeError(f"the Triton kernels cannot run on {device.type} tensors here: {why}")


def _l2norm(xs: list[torch.Tensor]) -> torch.Tensor:
    if not xs:
        return torch.empty(0, dtype=torch.float32)
    device = xs[0].device
    for i, x in enumerate(xs):
        if x.device != device:
            raise ValueError(f"xs[{i}] is on {x.device} but xs[0] is on {device}")
        if x.dtype not in _ELEM or x.layout != torch.strided:
            raise TypeError(f"xs[{i}] must be a dense floating-point tensor, got {x.dtype} {x.layout}")
    _check_runnable(device)
    out = torch.empty(len(xs), dtype=torch.float32, device=device)
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(xs).items():
        entries = []
        for i in index:
            x = staging.lead(xs[i], written=False)
            entries.append(mt.Entry(x.data_ptr(), 0, 0, 0, x.numel(), False, i))
        tab = mt.table(entries, xs[index[0]].element_size(), device)
        acc_torch, acc = _acc(dtype)
        partial = torch.empty(max(1, tab.n_chunks), dtype=acc_torch, device=device)
        if tab.n_chunks:
            _sum_squares[(tab.n_chunks,)](
                tab.data, tab.n_chunks, tab.n_tensors, partial, partial, partial,
                ELEM=_ELEM[dtype], ACC=acc, BLOCK=_block(), WITH_G=False, HAS_SCALE=False,
                HAS_SKIP=False, num_warps=_NUM_WARPS)
        _norms[(tab.n_tensors,)](tab.data, tab.n_chunks, tab.n_tensors, partial, out,
                                 ACC=acc, RBLOCK=_RBLOCK, num_warps=_NUM_WARPS)
    return out


def _check_lars_args(params, grads, momentum_buffers, steps, exclude, momentum, dampening,
                     momentum_style, lr_tensor, grad_scale, found_inf) -> None:
    """The reference's checks (same messages), plus what the kernels assume of steps."""
    check_tensor_lists(
        params,
        same_shape={"grads": grads},
        optional={"momentum_buffers": momentum_buffers, "steps": steps},
        flags={"exclude": exclude},
    )
    if momentum != 0.0:
        if len(momentum_buffers) != len(params):
            raise ValueError(f"momentum_buffers has {len(momentum_buffers)} entries but params has {len(params)}")
        if dampening != 0.0 and len(steps) != len(params):
            raise ValueError(f"steps has {len(steps)} entries but params has {len(params)} "
                             "(dampening != 0 needs a step counter per param)")
        check_tensor_lists(params, same_shape={"momentum_buffers": momentum_buffers})
        for i, s in enumerate(steps):
            if s.numel() != 1 or s.dtype != torch.float32:
                raise TypeError(f"steps[{i}] must be a one-element float32 tensor, "
                                f"got {s.dtype} of shape {tuple(s.shape)}")
            if s.device != params[i].device:
                raise ValueError(f"steps[{i}] is on {s.device} but params[{i}] is on {params[i].device}")
    if momentum_style not in ("torch", "paper"):
        raise ValueError(f"momentum_style must be 'torch' or 'paper', got {momentum_style!r}")
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        check_scalar_tensor(name, t)


def _lars_sgd(params, grads, momentum_buffers, steps, exclude, lr, lr_tensor, momentum,
              dampening, weight_decay, nesterov, trust_coefficient, eps, clip, zero_norm_decay,
              momentum_style, grad_scale, found_inf, averages=None, average_count=None,
              average_method="swa", average_decay=0.999) -> None:
    _check_lars_args(params, grads, momentum_buffers, steps, exclude, momentum, dampening,
                     momentum_style, lr_tensor, grad_scale, found_inf)
    averages = averages or []
    check_folded_average_args(params, averages, average_count, average_method, found_inf)
    if not params:
        return
    device = params[0].device
    _check_runnable(device)
    has_momentum = momentum != 0.0
    has_steps = has_momentum and len(steps) > 0
    lr_tensor = mt.scalar_on(lr_tensor, device)
    grad_scale = mt.scalar_on(grad_scale, device)
    found_inf = mt.scalar_on(found_inf, device)
    staging = mt.Staging()
    for dtype, index in mt.group_by_dtype(params).items():
        entries, leads = [], []
        for i in index:
            w = staging.lead(params[i], written=True)
            leads.append(w)
            g = staging.follow(grads[i], w, written=False)
            b = staging.follow(momentum_buffers[i], w, written=True) if has_momentum else None
            entries.append(mt.Entry(
                w.data_ptr(), g.data_ptr(), 0 if b is None else b.data_ptr(),
                steps[i].data_ptr() if has_steps else 0, w.numel(), bool(exclude[i]), i))
        tab = mt.table(entries, params[index[0]].element_size(), device)
        # Folded averaging: per chunk, the address of its average (same chunking as tab).
        avg_rows = tab.data
        if averages:
            rows = []
            for i, w in zip(index, leads):
                a = averages[i]
                if not (mt.dense(a) and a.stride() == w.stride()):
                    # In w's layout but the average's dtype (fp32 for 16-bit params).
                    a = staging._stage(a, torch.empty_like(w, dtype=a.dtype).copy_(a), True)
                rows.append((a.data_ptr(), w.data_ptr(), w.numel()))
            avg_rows, _ = _average._table(rows, averages[index[0]].element_size(),
                                          params[index[0]].element_size(), device)
        acc_torch, acc = _acc(dtype)
        partial = torch.empty(2 * max(1, tab.n_chunks), dtype=acc_torch, device=device)
        coefs = torch.empty(3 * tab.n_tensors, dtype=acc_torch, device=device)
        # Unused pointer arguments get a valid tensor; the constexpr flags keep them unread.
        lr_arg = tab.data if lr_tensor is None else lr_tensor
        scale_arg = tab.data if grad_scale is None else grad_scale
        skip_arg = tab.data if found_inf is None else found_inf
        flags = dict(HAS_SKIP=found_inf is not None)
        if tab.n_chunks:
            _sum_squares[(tab.n_chunks,)](
                tab.data, tab.n_chunks, tab.n_tensors, partial, scale_arg, skip_arg,
                ELEM=_ELEM[dtype], ACC=acc, BLOCK=_block(), WITH_G=True,
                HAS_SCALE=grad_scale is not None, num_warps=_NUM_WARPS, **flags)
        _lars_coefs[(tab.n_tensors,)](
            tab.data, tab.n_chunks, tab.n_tensors, partial, coefs, float(lr), lr_arg,
            float(weight_decay), float(trust_coefficient), float(eps), skip_arg,
            ACC=acc, RBLOCK=_RBLOCK, CLIP=bool(clip), ZERO_NORM_DECAY=bool(zero_norm_decay),
            HAS_LR_TENSOR=lr_tensor is not None, HAS_MOMENTUM=has_momentum,
            HAS_STEPS=has_steps, num_warps=_NUM_WARPS, **flags)
        if tab.n_chunks:
            _lars_update[(tab.n_chunks,)](
                tab.data, tab.n_chunks, tab.n_tensors, coefs, float(lr), lr_arg, scale_arg,
                skip_arg, float(momentum), 1.0 - float(dampening), avg_rows,
                tab.data if average_count is None else average_count, 1.0 - float(average_decay),
                ELEM=_ELEM[dtype], ACC=acc, BLOCK=_block(), HAS_SCALE=grad_scale is not None,
                HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov) and has_momentum,
                PAPER=momentum_style == "paper", HAS_LR_TENSOR=lr_tensor is not None,
                SOFT_BF16=dtype == torch.bfloat16 and mt.interpreting(),
                HAS_AVG=bool(averages), AVG=_acc(dtype)[1], SWA=average_method == "swa",
                num_warps=_NUM_WARPS, **flags)
    staging.write_back()
    if averages and average_count is not None:
        # After every launch of the call (stream order): each program read the old count.
        average_count.add_(1 if found_inf is None else (found_inf == 0).to(average_count.dtype))


# ------------------------------------------------------------------------ custom ops
# Same argument names, types and defaults as the main schemas in _library.py, but not
# keyword-only: custom_op does not accept keyword-only tensor arguments.


@torch.library.custom_op("lbkernels::triton_multi_tensor_l2norm", mutates_args=())
def triton_multi_tensor_l2norm(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms (fp32 result; fp64 accumulation for fp64 tensors)."""
    return _l2norm(list(xs))


@triton_multi_tensor_l2norm.register_fake
def _(xs):
    device = xs[0].device if xs else torch.device("cpu")
    return torch.empty(len(xs), dtype=torch.float32, device=device)


@torch.library.custom_op("lbkernels::triton_lars_sgd_",
                         mutates_args=("params", "momentum_buffers", "steps", "averages",
                                       "average_count"))
def triton_lars_sgd_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    steps: list[torch.Tensor],
    exclude: list[bool],
    lr: float,
    # Required here (custom_op takes no list default); lbkernels.ops always passes it.
    averages: list[torch.Tensor],
    lr_tensor: Optional[torch.Tensor] = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    clip: bool = False,
    zero_norm_decay: bool = True,
    momentum_style: str = "torch",
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    average_count: Optional[torch.Tensor] = None,
    average_method: str = "swa",
    average_decay: float = 0.999,
) -> None:
    """One LARS-SGD step in place; the contract of ``lbkernels.reference.lars.lars_sgd_``."""
    _lars_sgd(params, grads, momentum_buffers, steps, exclude, lr, lr_tensor, momentum,
              dampening, weight_decay, nesterov, trust_coefficient, eps, clip, zero_norm_decay,
              momentum_style, grad_scale, found_inf, averages, average_count, average_method,
              average_decay)


@triton_lars_sgd_.register_fake
def _(params, grads, momentum_buffers, steps, exclude, lr, averages, lr_tensor=None,
      momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, trust_coefficient=0.001,
      eps=1e-8, clip=False, zero_norm_decay=True, momentum_style="torch", grad_scale=None,
      found_inf=None, average_count=None, average_method="swa", average_decay=0.999):
    return None


from . import average as _average  # noqa: E402  (registers lbkernels::triton_average_)



def _lars_sgd_op(params, grads, momentum_buffers, steps, exclude, *, averages=None, **kwargs):
    """triton_lars_sgd_ with the main schema's default ``averages=None`` (no averaging)."""
    torch.ops.lbkernels.triton_lars_sgd_(params, grads, momentum_buffers, steps, exclude,
                                         averages=[] if averages is None else averages, **kwargs)


OPS = {
    "multi_tensor_l2norm": torch.ops.lbkernels.triton_multi_tensor_l2norm,
    "lars_sgd_": _lars_sgd_op,
    "average_": torch.ops.lbkernels.triton_average_,
    "worker_mean_": torch.ops.lbkernels.triton_worker_mean_,
}

from . import extrap as _extrap  # noqa: E402  (registers lbkernels::triton_extrap_*)

OPS.update({
    "extrap_sgd_": torch.ops.lbkernels.triton_extrap_sgd_,
    "extrap_adam_": torch.ops.lbkernels.triton_extrap_adam_,
})

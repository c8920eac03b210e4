"""Per-element math of the Triton kernels: csrc/include/lbkernels/math.h in Triton.

The same functions, arguments and operation order as the C++ header, so that every
backend computes the same values (the tests compare each with the reference).
Divisions and square roots are the IEEE round-to-nearest ones (``div``, ``sqrt``
below): plain ``/`` and ``tl.sqrt`` on fp32 compile to approximate (about 2 ulp)
instructions on NVIDIA GPUs, which would make the trust ratio differ from the
reference's. fp64 has only the IEEE forms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import interpreting

# Storage dtype of each tensor dtype the kernels take, as Triton's type.
ELEM = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16}


def acc_types(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The arithmetic dtype of ``dtype`` tensors (fp64 for fp64, fp32 otherwise), as torch's
    and as Triton's type."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def soft_bf16(dtype: torch.dtype) -> bool:
    """Whether ``to_elem`` rounds to bf16 on the bits (the interpreter truncates)."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def proceed(skip_ptr, HAS_SKIP: tl.constexpr):
    """False when the AMP flag ``found_inf`` (at ``skip_ptr``) is set: write nothing."""
    work = True
    if HAS_SKIP:
        work = tl.load(skip_ptr) == 0
    return work


@triton.jit
def scalar(value, ptr, HAS_TENSOR: tl.constexpr, ACC: tl.constexpr):
    """A float argument or its one-element tensor form, in the arithmetic type."""
    if HAS_TENSOR:
        return tl.load(ptr).to(ACC)
    else:
        return tl.full([], value, ACC)


@triton.jit
def list_ptr(table, row, n_chunks, c, ELEM: tl.constexpr):
    """Chunk ``c``'s address in list ``row`` of a chunk table, as a typed pointer."""
    return tl.load(table + row * n_chunks + c).to(tl.pointer_type(ELEM))


@triton.jit
def div(a, b):
    """a / b rounded to nearest (IEEE) in fp32 and fp64."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt(x):
    """Square root rounded to nearest (IEEE) in fp32 and fp64."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def lars_scale(n_w, n_g, lr, wd, tc, eps, CLIP: tl.constexpr, ZERO_NORM_DECAY: tl.constexpr,
               excluded):
    """(r, wd) of one tensor from its norms: the ratio, the zero-norm rule, then clipping.

    ``excluded`` is a runtime flag (r = 1, wd kept); the rest mirror ``lars_scale``.
    """
    valid = (n_w > 0) & (n_g > 0)
    # The division runs for invalid norms too (0/0); `where` discards it.
    r = tl.where(valid, div(tc * n_w, n_g + n_w * wd + eps), 1.0)
    if CLIP:
        r = div(r, lr)
        r = tl.where(r < 1.0, r, 1.0)
    wd_used = wd
    if not ZERO_NORM_DECAY:
        r = tl.where(valid, r, 1.0)
        wd_used = tl.where(valid, wd, 0.0)
    r = tl.where(excluded, 1.0, r)
    wd_used = tl.where(excluded, wd, wd_used)
    return r, wd_used


@triton.jit
def sgd_update(w, buf, g, scale, wd, r, pre, m, damp, lr, first, HAS_SCALE: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """d = ((g / scale) + wd * w) * r * pre;  buf = first ? d : m * buf + damp * d;
    u = nesterov ? d + m * buf : buf (d without momentum);  returns (w - lr * u, buf)."""
    if HAS_SCALE:
        g = div(g, scale)
    d = (g + wd * w) * r * pre
    u = d
    if HAS_MOMENTUM:
        buf = tl.where(first, d, m * buf + damp * d)
        if NESTEROV:
            u = d + m * buf
        else:
            u = buf
    return w - lr * u, buf


@triton.jit
def load_sgd_update(w_ptr, g_ptr, b_ptr, idx, mask, scale, wd, r, pre, m, damp, lr, first,
                    ACC: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                    NESTEROV: tl.constexpr):
    """``sgd_update`` of elements ``idx``, loaded from w, g and (with momentum) buf:
    returns (new w, new buf, g as loaded)."""
    w = load(w_ptr, idx, mask, ACC)
    g = load(g_ptr, idx, mask, ACC)
    buf = w
    if HAS_MOMENTUM:
        buf = load(b_ptr, idx, mask, ACC)
    w, buf = sgd_update(w, buf, g, scale, wd, r, pre, m, damp, lr, first, HAS_SCALE,
                        HAS_MOMENTUM, NESTEROV)
    return w, buf, g


@triton.jit
def to_elem(x, ELEM: tl.constexpr, SOFT_BF16: tl.constexpr):
    """x (fp32 or fp64) rounded to the storage dtype, to nearest even.

    Triton's interpreter truncates fp32 -> bf16 (compiled kernels round), so there the
    rounding is done on the bits: add 0x7fff plus the lowest kept bit, drop 16 bits.
    """
    if SOFT_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)  # NaN stays a quiet NaN
        return rounded.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ELEM)


@triton.jit
def worker_mean(total, k):
    """math.h's worker_mean: the cross-worker mean sum / k, an IEEE division."""
    return div(total, k)


@triton.jit
def average_update(avg, w, r):
    """math.h's average_update: avg + r * (w - avg) (SWA r = 1 / (n + 1), EMA r = 1 - decay)."""
    return avg + r * (w - avg)


@triton.jit
def chunk_rows(table, n_lists, n_chunks, c):
    """(element count, tensor slot, first element index) of chunk ``c`` of a chunk table
    with ``n_lists`` lists (layout in multi_tensor.py)."""
    rows = table + n_lists * n_chunks + c
    return tl.load(rows), tl.load(rows + n_chunks), tl.load(rows + 2 * n_chunks)


@triton.jit
def load(ptr, idx, mask, ACC: tl.constexpr):
    """Elements ``idx`` from ``ptr`` in the arithmetic type (0 where masked off)."""
    return tl.load(ptr + idx, mask=mask, other=0.0).to(ACC)


@triton.jit
def add_square(acc, x):
    """acc + x * x: one tile of a sum of squares. The norm passes and the write pass that
    sums the new w for the next step's norm (lars_sgd_'s w_norm_sq) both call it, so
    that both compile to the same operations (e.g. one fused multiply-add per element)."""
    return acc + x * x


@triton.jit
def store(ptr, idx, x, mask, ELEM: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``x`` rounded to the storage dtype into elements ``idx`` of ``ptr``."""
    tl.store(ptr + idx, to_elem(x, ELEM, SOFT_BF16), mask=mask)


@triton.jit
def average_rate(count_ptr, one_minus_decay, AVG: tl.constexpr, SWA: tl.constexpr):
    """r of ``average_update``: 1 / (n + 1) from the count (SWA) or 1 - decay (EMA)."""
    if SWA:
        return div(tl.full([], 1.0, AVG), tl.load(count_ptr).to(AVG) + tl.full([], 1.0, AVG))
    else:
        return tl.full([], one_minus_decay, AVG)

"""Triton noise of the extrapolation variants (docs/algorithms.md section 2.1): Philox
numbers as ``csrc/include/lbkernels/philox.h`` defines them, and the two passes of the
filter variant.

Random numbers follow philox.h word for word: Triton's ``tl.philox`` is the same
Philox4x32-10, fed the header's counter (element index / 4, tensor index, low word of
``offset``) and key (``seed`` with the high word of ``offset`` folded in), and the words
become U(-1, 1) or N(0, 1) values by the header's formulas. A value is regenerated
wherever it is needed, so the filter passes see the same r without storing it.

Filter variant: ``_filter_norms`` (a program per output filter: a * ||x_j|| / (||r_j||
+ 1e-6), from the updated anchor), then ``_filter_write`` (a program per chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import multi_tensor as mt
from .math import chunk_rows, div, list_ptr, load, proceed, sqrt, store

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


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


def filter_table(rows: list[tuple[int, int, int, int]], element_size: int,
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

    return mt.upload(("filter", device, element_size, tuple(rows)), build, device)


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
def _filter_norms(ftable, n_filters, factors, skip_ptr, noise_scale: tl.float64, key, off_lo,
                  ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_SKIP: tl.constexpr):
    # A program per filter. Rows: address of the filter's first anchor element, F,
    # argument index, index of the filter's first element; factor slot = program id.
    j = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        x_ptr = tl.load(ftable + j).to(tl.pointer_type(ELEM))
        f = tl.load(ftable + n_filters + j)
        index = tl.load(ftable + 2 * n_filters + j)
        e0 = tl.load(ftable + 3 * n_filters + j)
        acc_x = tl.zeros([BLOCK], dtype=ACC)
        acc_r = tl.zeros([BLOCK], dtype=ACC)
        offs = tl.arange(0, BLOCK)
        for s in range(0, f, BLOCK):
            mask = s + offs < f
            x = load(x_ptr, s + offs, mask, ACC)
            z = tl.where(mask, noise(key, off_lo, index, e0 + s + offs, False).to(ACC), 0.0)
            acc_x += x * x
            acc_r += z * z
        n_x = sqrt(tl.sum(acc_x, 0))
        n_r = sqrt(tl.sum(acc_r, 0))
        # 1e-6: reference.extrap.FILTER_EPS (a jit function reads no Python float global).
        factor = div(tl.full([], noise_scale, ACC) * n_x, n_r + 1e-6)
        tl.store(factors + j, factor)


@triton.jit
def _filter_write(table, n_chunks, n_tensors, factors, skip_ptr, key, off_lo,
                  ELEM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_SKIP: tl.constexpr, SOFT_BF16: tl.constexpr):
    # w = x + factor_j * r over an extrap_sgd_ table (5 lists: w, x at 0 and 1). Tensor
    # rows: argument index, F, slot of the first filter.
    c = tl.program_id(0)
    if proceed(skip_ptr, HAS_SKIP):
        w_ptr = list_ptr(table, 0, n_chunks, c, ELEM)
        x_ptr = list_ptr(table, 1, n_chunks, c, ELEM)
        n, t, begin = chunk_rows(table, 5, n_chunks, c)
        rows = table + 8 * n_chunks
        index = tl.load(rows + t)
        f = tl.load(rows + n_tensors + t)
        first_filter = tl.load(rows + 2 * n_tensors + t)
        offs = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            mask = s + offs < n
            e = begin + s + offs
            x = load(x_ptr, s + offs, mask, ACC)
            z = noise(key, off_lo, index, e, False).to(ACC)
            factor = tl.load(factors + first_filter + e // f, mask=mask, other=0.0)
            store(w_ptr, s + offs, x + factor * z, mask, ELEM, SOFT_BF16)


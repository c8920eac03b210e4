"""Triton extrap_sgd_ / extrap_adam_ (lbkernels.triton.extrap_sgd, extrap_adam, noise) at
chunk boundaries.

test_extrap_ops.py runs every backend against the reference; this file adds what is
particular to the Triton kernels: the chunk size lowered to 64 so that chunk boundaries
fall inside small tensors and filters, the noise drawn exactly as philox.h documents
(so the Triton, CPU and CUDA kernels draw the same numbers), noise and filter factors
independent of how tensors are cut into chunks, row-major noise for non-contiguous
tensors, and the custom ops' registration. Under the interpreter a program costs a few
milliseconds: the tensors are small.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import TRITON_CHUNK, TRITON_SHAPES, documented_draw, noise_call, randn, triton_chunked_device
from lbkernels import ops

CHUNK = TRITON_CHUNK
SHAPES = TRITON_SHAPES
STEPS = 7
# fp32 over 7 steps: the same operations as the reference but LARS norms summed per
# chunk and coefficients folded, a few ulps per step compounding through the buffers;
# fp64 the same in its own ulps (the tolerances of test_extrap_ops.py).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}

device = triton_chunked_device


def _sgd(impl, device, dtype, local, **cfg):
    x = randn(SHAPES, 0, dtype, device)
    state = [[t.clone() for t in x], x, [torch.zeros_like(t) for t in x] if cfg.get("momentum") else []]
    exclude = [i % 3 == 1 for i in range(len(SHAPES))]
    for t in range(STEPS):
        grads = randn(SHAPES, 100 + t, dtype, device)
        local_grads = randn(SHAPES, 200 + t, dtype, device) if local else []
        ops.extrap_sgd_(*state, grads, local_grads, exclude, impl=impl, **cfg)
    return state


SGD_CONFIGS = {
    "plain": dict(lr=0.1, extrap_lr=0.05),
    "momentum-local": dict(lr=0.2, extrap_lr=0.1, momentum=0.9, weight_decay=1e-2, local=True),
    "lars-nesterov-clip": dict(lr=2.0, extrap_lr=0.3, momentum=0.9, nesterov=True,
                               weight_decay=1e-3, lars=True, clip=True, trust_coefficient=0.02),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_sgd_across_chunk_boundaries(device, dtype, config):
    cfg = dict(SGD_CONFIGS[config])
    local = cfg.pop("local", False)
    want = _sgd("reference", device, dtype, local, **cfg)
    got = _sgd("triton", device, dtype, local, **cfg)
    for name, xs, ys in zip(("params", "anchors", "momentum_buffers"), got, want):
        for i, (a, b) in enumerate(zip(xs, ys)):
            torch.testing.assert_close(a.cpu(), b.cpu(), msg=lambda m: f"{name}[{i}]: {m}", **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("local,first_step", [(False, 0), (True, 0), (False, 123_456)],
                         ids=["global", "local", "late"])
def test_adam_across_chunk_boundaries(device, dtype, local, first_step):
    """From step 0, and from a late step (the bias corrections beta^t are taken by
    repeated squaring in the kernel, against the reference's pow)."""
    results = []
    for impl in ("reference", "triton"):
        x = randn(SHAPES, 0, dtype, device)
        state = [[t.clone() for t in x], x, [torch.zeros_like(t) for t in x],
                 [torch.zeros_like(t) for t in x],
                 [torch.full((), float(first_step), device=device) for _ in x]]
        for t in range(STEPS):
            grads = randn(SHAPES, 100 + t, dtype, device)
            local_grads = randn(SHAPES, 200 + t, dtype, device) if local else []
            ops.extrap_adam_(*state, grads, local_grads, lr=1e-2, extrap_lr=5e-3, weight_decay=1e-2,
                             decoupled_weight_decay=local, impl=impl)
        results.append(state)
    names = ("params", "anchors", "exp_avgs", "exp_avg_sqs", "steps")
    for name, ys, xs in zip(names, *results):
        for i, (a, b) in enumerate(zip(xs, ys)):
            torch.testing.assert_close(a.cpu(), b.cpu(), msg=lambda m: f"{name}[{i}]: {m}", **TOL[dtype])
    assert all(s.item() == first_step + STEPS for s in results[1][4])


def test_noise_follows_the_documented_counter_layout(device):
    """The Triton kernels draw the values philox.h defines (the same the CPU and CUDA
    kernels draw), across chunk boundaries and with seed and offset above 2^32."""
    seed, offset = 0x1234_5678_9ABC, (5 << 32) + 7
    shapes = [(37,), (3, 50), (150,)]
    zeros = [torch.zeros(s) for s in shapes]
    uni = noise_call("triton", device, "uniform", zeros, a=1.0, seed=seed, offset=offset)
    gau = noise_call("triton", device, "gaussian", zeros, a=1.0, seed=seed, offset=offset)
    for i, s in enumerate(shapes):
        n = math.prod(s)
        # U(-1, 1): odd multiples of 2^-24, exact in fp32.
        assert torch.equal(uni[i].flatten(), documented_draw(n, i, seed, offset, False))
        # Box-Muller in fp32: radius <= 5.7 times an angle error of ~1 ulp of 2 pi
        # (4.8e-7), plus the fp32 log and cos/sin: a few 1e-6 absolute.
        torch.testing.assert_close(gau[i].flatten(), documented_draw(n, i, seed, offset, True),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("extrapolation", ["gaussian", "weight", "filter"])
def test_noise_does_not_depend_on_the_chunking(device, extrapolation, monkeypatch):
    """The same call with 64- and 65,536-element chunks gives the same bits: each value
    is keyed by its element index and each filter norm is one program's sum."""
    from lbkernels.triton import multi_tensor

    g = torch.Generator().manual_seed(3)
    # Filters of 27 (within chunks), 100 (straddling chunk boundaries), a 1-d tensor of
    # 150 (one filter over three chunks).
    anchors = [torch.randn(s, generator=g) for s in [(5, 3, 3, 3), (4, 100), (150,)]]
    small = noise_call("triton", device, extrapolation, anchors, seed=2, offset=9)
    monkeypatch.setattr(multi_tensor, "CHUNK_SIZE", 65536)
    large = noise_call("triton", device, extrapolation, anchors, seed=2, offset=9)
    for a, b in zip(small, large):
        assert torch.equal(a, b)
    if extrapolation == "filter":  # ||eps_j|| = a ||x_j||, up to fp32 (see test_extrap_ops)
        for x, e in zip(anchors, small):
            rows = x.shape[0] if x.dim() >= 2 else 1
            torch.testing.assert_close(e.reshape(rows, -1).norm(dim=1),
                                       0.5 * x.double().reshape(rows, -1).norm(dim=1),
                                       rtol=2e-6, atol=0)


@pytest.mark.parametrize("extrapolation", ["uniform", "filter"])
def test_noise_is_row_major_for_non_contiguous_tensors(device, extrapolation):
    """A channels_last or transposed tensor gets the noise of its contiguous copy: the
    counter is the row-major element index, whatever the memory layout."""
    g = torch.Generator().manual_seed(4)
    dense = [torch.randn(4, 3, 5, 5, generator=g), torch.randn(6, 9, generator=g)]
    strided = [dense[0].to(memory_format=torch.channels_last), dense[1].t().contiguous().t()]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    want = noise_call("triton", device, extrapolation, dense, seed=7, offset=1)
    got = noise_call("triton", device, extrapolation, strided, seed=7, offset=1)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


_AOT = r'''
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lbkernels.triton import extrap_adam as A
from lbkernels.triton import extrap_sgd as S
from lbkernels.triton import noise as N

def compile_(fn, sig, const):
    sig = {**sig, **{k: "constexpr" for k in const}}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in const.items()})
    assert ".entry" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

flags = dict(HAS_SCALE=True, HAS_LOCAL=True, HAS_ELR_TENSOR=True, HAS_SKIP=True, SOFT_BF16=False)
scalars = dict(table="*i64", n_chunks="i64", lr="fp64", lr_ptr="*fp32", elr="fp64",
               elr_ptr="*fp32", scale_ptr="*fp32", skip_ptr="*fp32")
for acc, elem, mode in ((tl.float32, tl.bfloat16, 1), (tl.float64, tl.float64, 0)):
    wide = "*fp32" if acc == tl.float32 else "*fp64"
    compile_(S._sgd_update, dict(scalars, coefs=wide, momentum="fp64", weight_decay="fp64",
                                 noise_scale="fp64", key="i64", off_lo="i64"),
             dict(flags, ELEM=elem, ACC=acc, BLOCK=1024, MODE=mode, HAS_MOMENTUM=True,
                  NESTEROV=True, LARS=True, HAS_LR_TENSOR=True))
    compile_(A._adam_update, dict(scalars, n_tensors="i64", bias="*fp64", beta2="fp64", w1="fp64",
                                  w2="fp64", eps="fp64", weight_decay="fp64", decay="fp64"),
             dict(flags, ELEM=elem, ACC=acc, BLOCK=1024, HAS_WD=True, DECOUPLED=True,
                  LERP_LOW=False, HAS_LR_TENSOR=mode == 1))
compile_(N._filter_norms, dict(ftable="*i64", n_filters="i64", factors="*fp32", skip_ptr="*fp32",
                               noise_scale="fp64", key="i64", off_lo="i64"),
         dict(ELEM=tl.float16, ACC=tl.float32, BLOCK=1024, HAS_SKIP=True))
compile_(N._filter_write, dict(table="*i64", n_chunks="i64", n_tensors="i64", factors="*fp32",
                               skip_ptr="*fp32", key="i64", off_lo="i64"),
         dict(ELEM=tl.float16, ACC=tl.float32, BLOCK=1024, HAS_SKIP=True, SOFT_BF16=False))
compile_(A._adam_bias, dict(table="*i64", n_chunks="i64", n_tensors="i64", bias="*fp64",
                            skip_ptr="*fp32", beta1="fp64", beta2="fp64"), dict(HAS_SKIP=True))
print("compiled")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run in the tests above")
def test_kernels_compile_for_a_gpu():
    """Without a GPU the kernels only run interpreted; compiling them ahead of time for
    sm_90 (Triton's bundled LLVM and ptxas, no device needed) checks that the GPU build
    lowers them (e.g. fp64 arithmetic, Philox, the noise and filter passes), for a
    representative set of their constexpr variants."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the current default, stated to silence its warning
    result = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

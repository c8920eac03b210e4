"""The native CPU kernels split their chunks over the intra-op threads (at::parallel_for),
while ``make test`` runs each test process on one thread (OMP_NUM_THREADS=1, two
processes on two cores). Here every native op runs on three threads, over tensors that
span several chunks and a hundred small ones, against the same op on one thread and
against the reference."""

from __future__ import annotations

import pytest
import torch

from helpers import LARS_CONFIGS, LARS_TOL, assert_lists_close, grads_for, lars_shapes, make_state, randn
from lbkernels import _library, ops

pytestmark = pytest.mark.skipif(not _library.has_native_kernel("lars_sgd_", "cpu"),
                                reason="compiled kernels not loaded")

SHAPES = lars_shapes("native", mixed=True)  # 65537 elements: two chunks; 100 small tensors
TOL = LARS_TOL[torch.float32]


def on_threads(n: int, run, impl: str):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return run(impl)
    finally:
        torch.set_num_threads(old)


def lars(impl):
    params, bufs, steps = make_state(SHAPES, torch.float32, "cpu")
    averages = [torch.zeros_like(p) for p in params]
    count = torch.zeros((), dtype=torch.int64)
    exclude = [i % 3 == 0 for i in range(len(params))]
    for t in range(3):
        ops.lars_sgd_(params, grads_for(t, SHAPES, torch.float32, "cpu"), bufs, steps, exclude,
                      averages=averages, average_count=count, impl=impl, **LARS_CONFIGS["nesterov"])
    return params, bufs, averages


def extrap_sgd(impl, **noise):
    params = randn(SHAPES, 0, torch.float32, "cpu")
    anchors = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for t in range(3):
        grads = grads_for(t, SHAPES, torch.float32, "cpu")
        ops.extrap_sgd_(params, anchors, bufs, grads, [g * 0.5 for g in grads],
                        [i % 3 == 0 for i in range(len(params))], lr=0.2, extrap_lr=0.1,
                        momentum=0.9, nesterov=True, lars=True, offset=t, impl=impl, **noise)
    return params, anchors, bufs


def extrap_adam(impl):
    params = randn(SHAPES, 0, torch.float32, "cpu")
    anchors = [p.clone() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    for t in range(3):
        grads = grads_for(t, SHAPES, torch.float32, "cpu")
        ops.extrap_adam_(params, anchors, m, v, steps, grads, [g * 0.5 for g in grads], lr=0.01,
                         extrap_lr=0.005, weight_decay=1e-2, decoupled_weight_decay=True, impl=impl)
    return params, anchors, m, v


def lamb(impl):
    params = randn(SHAPES, 0, torch.float32, "cpu")
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    averages = [torch.zeros_like(p) for p in params]
    count = torch.zeros((), dtype=torch.int64)
    for t in range(3):
        ops.lamb_(params, grads_for(t, SHAPES, torch.float32, "cpu"), m, v, steps,
                  [i % 3 == 0 for i in range(len(params))], lr=0.01, max_grad_norm=1.0,
                  averages=averages, average_count=count, impl=impl)
    return params, m, v, averages


def norms_and_mean(impl):
    xs = randn(SHAPES, 3, torch.float32, "cpu")
    norms = ops.multi_tensor_l2norm(xs, impl=impl)
    flat = torch.cat([x.flatten() for x in xs]) * 3
    ops.worker_mean_(xs, flat, 3, impl=impl)
    return [norms], xs


@pytest.mark.parametrize("run", [lars, extrap_sgd, extrap_adam, lamb, norms_and_mean])
def test_three_threads_match_one_and_the_reference(run):
    three = on_threads(3, run, "native")
    one = on_threads(1, run, "native")
    ref = run("reference")
    for a, b, e in zip(three, one, ref):
        assert_lists_close(a, b, **TOL)
        assert_lists_close(a, e, **TOL)


def test_lamb_is_bitwise_the_same_on_three_threads_as_on_one():
    # The norms are summed per 64K chunk and the chunks added in order, whatever thread
    # summed each: the split over threads changes no bit.
    for a, b in zip(on_threads(3, lamb, "native"), on_threads(1, lamb, "native")):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_noise_is_the_same_on_three_threads_as_on_one():
    # Philox is keyed by (seed, offset, element): the split over threads changes nothing.
    three = on_threads(3, lambda impl: extrap_sgd(impl, extrapolation="gaussian",
                                                  noise_scale=0.01, seed=5), "native")
    one = on_threads(1, lambda impl: extrap_sgd(impl, extrapolation="gaussian",
                                                noise_scale=0.01, seed=5), "native")
    for a, b in zip(three, one):
        assert_lists_close(a, b, **TOL)

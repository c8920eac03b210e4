"""torch.library.opcheck for every op of lbkernels/_library.py on every backend here.

opcheck runs each op on sample inputs under torch's own checks: the schema's alias and
mutation annotations against what the kernel really writes, the autograd registration,
the fake kernel against the real one (shapes, dtypes, devices) and tracing through
AOTAutograd. Backends:

- reference: the pure-PyTorch kernels. Where the compiled library serves ``lbkernels``
  on the CPU the reference kernels are reached through the same definitions
  (``_library.define_ops``) in a second namespace, ``lbkernels_reference``;
- native: the compiled C++ (CPU) or CUDA kernels, when built;
- triton: the ``lbkernels::triton_*`` ops, on CPU under ``TRITON_INTERPRET=1`` (the
  interpreter runs ~1 us per element: the samples hold a few hundred elements).

Every schema needs sample inputs in SAMPLES: a new op without them fails here.
"""

from __future__ import annotations

import pytest
import torch

from helpers import backend_params
from lbkernels import _library

_reference_lib = torch.library.Library("lbkernels_reference", "DEF")
_library.define_ops(_reference_lib)

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *backend_params()]


def _randn(shapes, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]


# Shapes: a matrix, a vector longer than a vector register, a scalar.
SHAPES = [(3, 4), (70,), ()]


def _l2norm(dev):
    return [((_randn(SHAPES, 0, dev),), {}), (([],), {})]


def _l2norm_out(dev):
    xs = _randn(SHAPES, 0, dev) + _randn([(5,)], 9, dev, torch.float64)
    return [((xs,), dict(out=torch.full((4,), -1.0, device=dev))),
            (([],), dict(out=torch.empty(0, device=dev)))]


def _lars(dev):
    ps, grads = _randn(SHAPES, 1, dev), _randn(SHAPES, 2, dev)
    bufs = [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros((), device=dev) for _ in ps]
    exclude = [False, True, False]
    scalar = dict(lr_tensor=torch.tensor(0.05, device=dev), grad_scale=torch.tensor(2.0, device=dev),
                  found_inf=torch.tensor(0.0, device=dev))
    return [
        ((ps, grads, bufs, steps, exclude),
         dict(lr=0.1, averages=[], momentum=0.9, weight_decay=1e-3, nesterov=True, **scalar)),
        # No momentum: no buffers nor step counters.
        ((ps, grads, [], [], exclude), dict(lr=1.0, averages=[], lr_tensor=torch.tensor(0.05, device=dev))),
        # Precomputed squared norms, float32, given for some entries (< 0: computed); the
        # excluded tensor's entries are never read.
        ((ps, grads, bufs, steps, exclude),
         dict(lr=0.1, averages=[], momentum=0.9, clip=True, grad_scale=torch.tensor(2.0, device=dev),
              norm_sq=torch.tensor([[-1.0, 5.0, 2.0], [3.0, 7.0, -1.0]], device=dev))),
        # Weight averaging folded in: the averages and their count are written too.
        ((ps, grads, bufs, steps, exclude),
         dict(lr=0.1, momentum=0.9, averages=[torch.zeros_like(p) for p in ps],
              average_count=torch.zeros((), dtype=torch.int64, device=dev))),
    ]


def _average(dev):
    params = [*_randn([(4, 3)], 3, dev), *_randn([(5,)], 4, dev, torch.float16)]
    averages = _randn([(4, 3), (5,)], 5, dev)  # fp32 averages of fp32 and fp16 params
    return [((averages, params, torch.zeros((), dtype=torch.int64, device=dev)),
             dict(method=method, decay=0.9, found_inf=torch.zeros((), device=dev)))
            for method in ("swa", "ema")]


def _worker_mean(dev):
    params = _randn(SHAPES, 6, dev)
    flat_sum = torch.cat([p.reshape(-1) for p in _randn(SHAPES, 7, dev)])
    return [((params, flat_sum, 3), {})]


def _mean_sum_squares(dev):
    # A bucket of the SHAPES' gradients (12, 70 and 1 elements) and an empty segment.
    flat = torch.cat([g.reshape(-1) for g in _randn(SHAPES, 8, dev)])
    return [((flat, [12, 0, 70, 1], 3, torch.zeros(4, dtype=torch.float64, device=dev)), {})]


def _extrap_inputs(dev, seed):
    x = _randn(SHAPES, seed, dev)
    return [t + 1 for t in x], [t.clone() for t in x]


def _extrap_scalars(dev):
    return dict(lr_tensor=torch.tensor(0.05, device=dev), extrap_lr_tensor=torch.tensor(0.02, device=dev),
                grad_scale=torch.tensor(2.0, device=dev), found_inf=torch.tensor(0.0, device=dev))


def _extrap_sgd(dev):
    grads, local = _randn(SHAPES, 8, dev), _randn(SHAPES, 9, dev)
    params, anchors = _extrap_inputs(dev, 10)
    bufs = [torch.zeros_like(t) for t in params]
    return [
        ((params, anchors, bufs, grads, local, [False, True, False]),
         dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True, lars=True, **_extrap_scalars(dev))),
        # Precomputed squared norms of the anchors and gradients, float64, some not given.
        ((params, anchors, bufs, grads, local, [False, True, False]),
         dict(lr=0.1, momentum=0.9, lars=True, clip=True, grad_scale=torch.tensor(2.0, device=dev),
              norm_sq=torch.tensor([[4.0, 1.0, -1.0], [-1.0, 9.0, 0.5]], dtype=torch.float64,
                                   device=dev))),
        # Noise extrapolation (the filter variant: per-filter norms), no momentum, no local grads.
        ((params, anchors, [], grads, [], [False] * 3),
         dict(lr=0.1, extrapolation="filter", noise_scale=0.1, seed=3, offset=4)),
    ]


def _extrap_adam(dev):
    grads, local = _randn(SHAPES, 11, dev), _randn(SHAPES, 12, dev)
    params, anchors = _extrap_inputs(dev, 13)
    moments = [[torch.zeros_like(t) for t in params] for _ in range(2)]
    steps = [torch.zeros((), device=dev) for _ in params]
    return [((params, anchors, *moments, steps, grads, local),
             dict(lr=0.1, weight_decay=1e-2, decoupled_weight_decay=True, **_extrap_scalars(dev)))]


def _lamb(dev):
    ps, grads = _randn(SHAPES, 14, dev), _randn(SHAPES, 15, dev)
    moments = [[torch.zeros_like(p) for p in ps] for _ in range(2)]
    steps = [torch.zeros((), device=dev) for _ in ps]
    exclude = [False, True, False]
    scalar = dict(lr_tensor=torch.tensor(0.05, device=dev), grad_scale=torch.tensor(2.0, device=dev),
                  found_inf=torch.tensor(0.0, device=dev))
    return [
        ((ps, grads, *moments, steps, exclude),
         dict(lr=0.1, averages=[], max_grad_norm=1.0, clip=True, max_trust=5.0, **scalar)),
        # apex's order, L2 decay, the global norm given; weight averaging folded in.
        ((ps, grads, *moments, steps, exclude),
         dict(lr=0.1, style="apex", decoupled_weight_decay=False, max_grad_norm=1.0,
              grad_norm=torch.tensor([3.0], device=dev), averages=[torch.zeros_like(p) for p in ps],
              average_count=torch.zeros((), dtype=torch.int64, device=dev))),
        # The two stages: "moments" writes norm_sq (float64) and the moments, "update"
        # reads norm_sq (float32 here) and writes the weights and the folded average.
        ((ps, grads, *moments, steps, exclude),
         dict(lr=0.1, max_grad_norm=1.0, stage="moments", **scalar,
              norm_sq=torch.zeros((2, 3), dtype=torch.float64, device=dev))),
        ((ps, grads, *moments, steps, exclude),
         dict(lr=0.1, style="apex", clip=True, stage="update",
              norm_sq=torch.tensor([[4.0, 0.0, 2.0], [9.0, 0.0, 0.5]], device=dev),
              averages=[torch.zeros_like(p) for p in ps],
              average_count=torch.zeros((), dtype=torch.int64, device=dev))),
    ]


SAMPLES = {
    "multi_tensor_l2norm": _l2norm,
    "multi_tensor_l2norm.out": _l2norm_out,
    "lars_sgd_": _lars,
    "average_": _average,
    "worker_mean_": _worker_mean,
    "mean_sum_squares_": _mean_sum_squares,
    "extrap_sgd_": _extrap_sgd,
    "extrap_adam_": _extrap_adam,
    "lamb_": _lamb,
}


def _op(name: str, impl: str, device: str):
    # opcheck takes one overload: "multi_tensor_l2norm" has two (its default and .out).
    overload = name if "." in name else name + ".default"
    if impl == "reference":
        return _library.op(overload, "lbkernels_reference")
    if impl == "native":
        if not _library.has_native_kernel(name, device):
            pytest.fail(f"the compiled library serves lars_sgd_ on {device} but not {name}")
        return _library.op(overload)
    # get_op defines the Triton ops on first use; each has its main op's schema.
    from lbkernels import triton as lbk_triton

    lbk_triton.get_op(name, device)
    return _library.op("triton_" + overload)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("name", list(_library.SCHEMAS))
def test_opcheck(name, impl, device):
    assert name in SAMPLES, f"no sample inputs for the op {name}: add them to SAMPLES"
    op = _op(name, impl, device)
    for args, kwargs in SAMPLES[name](device):
        torch.library.opcheck(op, args, kwargs)

"""worker_mean_ (the write-back of the cross-worker mean): every backend against the reference."""

from __future__ import annotations

import pytest
import torch

from helpers import backend_params
from lbkernels import ops
from lbkernels.reference.average import average_dtype

IMPLS = backend_params() + [pytest.param("reference", "cpu", id="reference")]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1, a chunk, chunk + 1, an odd prime, empty, 0-dim, 2-D, and a model of small layers.
SHAPES = [(1,), (65536,), (65537,), (7919,), (0,), (), (33, 17)]
SHAPES_INTERPRETED = [(1,), (1024,), (1025,), (127,), (0,), (), (9, 7)]
MIXED = [(int(n),) for n in torch.randint(1, 300, (50,), generator=torch.Generator().manual_seed(5))]


def shapes_for(impl):
    interpreted = impl == "triton" and not torch.cuda.is_available()
    return (SHAPES_INTERPRETED if interpreted else SHAPES) + MIXED


def make(shapes, dtype, device, world_size, transposed=False):
    g = torch.Generator().manual_seed(7)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)
        if transposed and p.dim() == 2:
            p = p.t().contiguous().t()  # same shape, column-major strides
        params.append(p)
    total = sum(p.numel() for p in params)
    # A sum of world_size workers' values: world_size times larger than one of them.
    flat = (torch.randn(total, generator=g, dtype=torch.float64) * world_size).to(device, dtype)
    return params, flat


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_writes_the_rounded_quotient(impl, device, dtype, world_size):
    params, flat = make(shapes_for(impl), dtype, device, world_size, transposed=True)
    strides = [p.stride() for p in params]
    ops.worker_mean_(params, flat, world_size, impl=impl)
    # Independent of the reference's loop: one division of the whole flat sum.
    acc = average_dtype(dtype)
    expected = (flat.cpu().to(acc) / torch.tensor(world_size, dtype=acc)).to(dtype)
    got = torch.cat([p.cpu().reshape(-1) for p in params])
    # Bitwise: one IEEE division in the same dtype, one rounding to the param dtype.
    assert torch.equal(got, expected)
    assert [p.stride() for p in params] == strides


@pytest.mark.parametrize("impl,device", IMPLS)
def test_bad_arguments_change_nothing(impl, device):
    params, flat = make([(3,), (4,)], torch.float32, device, 2)
    before = [p.clone() for p in params]
    cases = [
        ((params, flat, 0), ValueError, "world_size"),
        ((params, flat[:-1], 2), ValueError, "has 6 elements but the params have 7"),
        ((params, flat.double(), 2), TypeError, r"params\[0\] has dtype \S+ but flat_sum has"),
        ((params, flat.view(7, 1), 2), TypeError, "1-D"),
        ((params, flat[::2], 2), TypeError, "contiguous"),
        (([params[0], params[1].double()], flat, 2), TypeError, r"params\[1\]"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            ops.worker_mean_(*args, impl=impl)
    for p, b in zip(params, before):
        assert torch.equal(p, b)

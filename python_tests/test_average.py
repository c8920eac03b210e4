"""Every weight-averaging backend against the reference, on averages and count."""

from __future__ import annotations

import pytest
import torch

from helpers import backend_params
from lbkernels import ops
from lbkernels.reference.average import average_dtype

BACKENDS = backend_params()

# 1, a chunk, chunk + 1, an odd prime, empty, 0-dim, 2-D.
SHAPES = [(1,), (65536,), (65537,), (7919,), (0,), (), (33, 17)]
# The Triton interpreter costs ~1 us per element: the same kinds of shapes, small.
SHAPES_INTERPRETED = [(1,), (1024,), (1025,), (127,), (0,), (), (9, 7)]
# ~50 tensors of mixed sizes, as a model of many small layers.
MIXED = [(int(n),) for n in torch.randint(1, 300, (50,), generator=torch.Generator().manual_seed(3))]
UPDATES = 7

# The same expression in every backend; what is left is the compiler's freedom to fuse
# a multiply-add (one rounding less) per update.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-14, atol=1e-14)}


def shapes_for(impl):
    interpreted = impl == "triton" and not torch.cuda.is_available()
    return (SHAPES_INTERPRETED if interpreted else SHAPES) + MIXED


def snapshot(t, shapes, dtype, device):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


def run(impl, shapes, dtype, device, method, updates=UPDATES, decay=0.9, found_inf_at=()):
    params0 = snapshot(-1, shapes, dtype, device)
    averages = [p.to(average_dtype(dtype)) for p in params0]  # initialised from the model
    count = torch.ones((), dtype=torch.int64, device=device)
    for t in range(updates):
        found_inf = None
        if found_inf_at:
            found_inf = torch.tensor(float(t in found_inf_at), device=device)
        ops.average_(averages, snapshot(t, shapes, dtype, device), count, method=method,
                     decay=decay, found_inf=found_inf, impl=impl)
    return averages, count


def assert_close_lists(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a.cpu(), e.cpu(), **tol)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("method", ["swa", "ema"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(impl, device, method, dtype):
    shapes = shapes_for(impl)
    avg, count = run(impl, shapes, dtype, device, method)
    ref_avg, ref_count = run("reference", shapes, dtype, "cpu", method)
    assert count.item() == ref_count.item() == 1 + UPDATES
    # fp16/bf16 params are widened exactly, so the fp32 tolerance holds for them too.
    assert_close_lists(avg, ref_avg, **TOL[average_dtype(dtype)])


@pytest.mark.parametrize("impl,device", BACKENDS + [pytest.param("reference", "cpu", id="reference")])
def test_swa_is_the_arithmetic_mean(impl, device):
    shapes = [(5,), (3, 4), ()]
    snaps = [snapshot(t, shapes, torch.float64, device) for t in range(UPDATES)]
    averages = [torch.zeros(s, dtype=torch.float64, device=device) for s in shapes]
    count = torch.zeros((), dtype=torch.int64, device=device)
    for s in snaps:
        ops.average_(averages, s, count, impl=impl)
    for i, a in enumerate(averages):
        torch.testing.assert_close(a, torch.stack([s[i] for s in snaps]).mean(0), rtol=1e-14, atol=1e-14)
    assert count.item() == UPDATES


@pytest.mark.parametrize("impl,device", BACKENDS + [pytest.param("reference", "cpu", id="reference")])
def test_found_inf_changes_nothing(impl, device):
    shapes = shapes_for(impl)[:10]
    for method in ("swa", "ema"):
        avg, count = run(impl, shapes, torch.float32, device, method, found_inf_at=(2, 5))
        # Skipped updates are as if absent: compare with a run of the other updates only.
        ref_avg, ref_count = run("reference", shapes, torch.float32, "cpu", method, found_inf_at=(2, 5))
        assert count.item() == ref_count.item() == 1 + UPDATES - 2
        assert_close_lists(avg, ref_avg, **TOL[torch.float32])
        averages = [a.clone() for a in avg]
        before = [a.clone() for a in averages]
        c = count.clone()
        ops.average_(averages, snapshot(9, shapes, torch.float32, device), c, method=method,
                     found_inf=torch.ones((), device=device), impl=impl)
        assert c.item() == count.item()
        for a, b in zip(averages, before):
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_mixed_dtypes_and_non_contiguous_in_one_call(impl, device):
    dtypes = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.float32]
    base = snapshot(0, [(6, 5)] * 5, torch.float64, device)
    params = [b.to(d) for b, d in zip(base, dtypes)]
    params[4] = params[4].t()  # a param whose strides differ from its average's
    averages = [torch.zeros(p.shape, dtype=average_dtype(p.dtype), device=device) for p in params]
    averages[0] = torch.zeros(5, 12, device=device)[:, ::2].t()  # a non-dense average
    ref = [a.clone().cpu() for a in averages]
    count, ref_count = (torch.zeros((), dtype=torch.int64, device=d) for d in (device, "cpu"))
    for _ in range(2):
        ops.average_(averages, params, count, impl=impl)
        ops.average_(ref, [p.cpu() for p in params], ref_count, impl="reference")
    assert_close_lists(averages, ref, **TOL[torch.float32])
    assert count.item() == 2


@pytest.mark.parametrize("impl,device", BACKENDS + [pytest.param("reference", "cpu", id="reference")])
def test_rejects_bad_arguments(impl, device):
    p = [torch.zeros(3, device=device)]
    a = [torch.zeros(3, device=device)]
    c = torch.zeros((), dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="method"):
        ops.average_(a, p, c, method="mean", impl=impl)
    with pytest.raises(ValueError, match="needs count"):
        ops.average_(a, p, None, impl=impl)
    with pytest.raises(TypeError, match="count"):
        ops.average_(a, p, c.float(), impl=impl)
    with pytest.raises(TypeError, match="averaged in"):
        ops.average_([torch.zeros(3, dtype=torch.float16, device=device)],
                     [torch.zeros(3, dtype=torch.float16, device=device)], c, impl=impl)
    with pytest.raises(ValueError, match="shape"):
        ops.average_([torch.zeros(4, device=device)], p, c, impl=impl)
    with pytest.raises(ValueError, match="entries"):
        ops.average_([], p, c, impl=impl)
    assert c.item() == 0
    ops.average_(a, p, None, method="ema", impl=impl)  # EMA needs no count


@pytest.mark.parametrize("impl,device", [p for p in BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_chunk_boundaries(impl, device, dtype, monkeypatch):
    # Small chunks put chunk boundaries inside small tensors (and make the fp16 params'
    # offsets differ from their fp32 averages' at every chunk but the first).
    from lbkernels.triton import multi_tensor

    monkeypatch.setattr(multi_tensor, "CHUNK_SIZE", 256)
    shapes = [(255,), (256,), (257,), (1000,), (0,), ()]
    avg, count = run(impl, shapes, dtype, device, "swa", updates=3)
    ref_avg, _ = run("reference", shapes, dtype, "cpu", "swa", updates=3)
    assert count.item() == 4
    assert_close_lists(avg, ref_avg, **TOL[torch.float32])

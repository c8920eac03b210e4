"""Weight averaging folded into lars_sgd_: every backend against the reference, on
weights, momentum buffers, step counters, averages and the averaging count."""

from __future__ import annotations

import pytest
import torch

from helpers import LARS_CONFIGS as CONFIGS
from helpers import LARS_TOL as TOL
from helpers import assert_lists_close, backend_params, grads_for, make_state
from helpers import lars_shapes as shapes_for
from lbkernels import ops
from lbkernels.reference.average import average_dtype

BACKENDS = backend_params()
ALL = BACKENDS + [pytest.param("reference", "cpu", id="reference")]
STEPS = 7
DECAY = 0.9
# Folded vs step-then-average_ on one backend: the same expression avg + r * (w - avg)
# on the same w; what is left is the compiler's freedom to fuse a multiply-add (one
# rounding less) per update, as in test_average.py.
AVG_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-14, atol=1e-14)}


def make_averages(params, method):
    if method == "ema":  # an EMA starts from the weights
        return [p.to(average_dtype(p.dtype), copy=True) for p in params]
    return [torch.zeros_like(p, dtype=average_dtype(p.dtype)) for p in params]


def run(impl, shapes, dtype, device, cfg, method, folded=True, found_inf_at=(), steps=STEPS, iterates=None):
    params, bufs, steps_t = make_state(shapes, dtype, device)
    averages = make_averages(params, method)
    count = torch.zeros((), dtype=torch.int64, device=device)
    has_momentum = cfg.get("momentum", 0) != 0
    exclude = [i % 3 == 0 for i in range(len(params))]
    for t in range(steps):
        grads = grads_for(t, shapes, dtype, device)
        found_inf = None
        if found_inf_at:
            found_inf = torch.tensor(float(t in found_inf_at), device=device)
        step_args = (params, grads, bufs if has_momentum else [], steps_t if has_momentum else [], exclude)
        if folded:
            ops.lars_sgd_(*step_args, found_inf=found_inf, averages=averages, average_count=count,
                          average_method=method, average_decay=DECAY, impl=impl, **cfg)
        else:
            ops.lars_sgd_(*step_args, found_inf=found_inf, impl=impl, **cfg)
            ops.average_(averages, params, count, method=method, decay=DECAY, found_inf=found_inf,
                         impl=impl)
        if iterates is not None:
            iterates.append([p.clone() for p in params])
    return params, bufs, steps_t, averages, count


def rule_averages(method, initial, iterates):
    """The averages of the weights after each step by their definition, in fp64: the mean
    (SWA), or the EMA started at the initial weights."""
    if method == "swa":
        return [torch.stack([w[i].double() for w in iterates]).mean(0) for i in range(len(initial))]
    out = [w.double() for w in initial]
    for ws in iterates:
        out = [a + (1 - DECAY) * (w.double() - a) for a, w in zip(out, ws)]
    return out


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("method", ["swa", "ema"])
# dampening-clip (step counters) runs in the tests below.
@pytest.mark.parametrize("cfg", ["momentum-wd", "paper-apex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(impl, device, method, cfg, dtype):
    # Many small tensors on the compiled backends (the interpreter runs ~1 s per tensor).
    shapes = shapes_for(impl, mixed=cfg == "momentum-wd" and impl == "native")
    exp = run("reference", shapes, dtype, "cpu", CONFIGS[cfg], method)
    got = run(impl, shapes, dtype, device, CONFIGS[cfg], method)
    # Weights, buffers and steps as in test_lars.py; an average is a convex combination
    # of the weights, so it inherits their tolerance.
    for a, e in zip(got[:4], exp[:4]):
        assert_lists_close(a, e, **TOL[dtype])
    assert got[4].item() == exp[4].item() == STEPS


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("method", ["swa", "ema"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
def test_folded_is_step_then_average(impl, device, method, dtype):
    shapes = shapes_for(impl)
    cfg = CONFIGS["dampening-clip"]
    folded = run(impl, shapes, dtype, device, cfg, method)
    iterates = []
    separate = run(impl, shapes, dtype, device, cfg, method, folded=False, iterates=iterates)
    # The step itself is the same code with or without averaging: bitwise.
    for a, e in zip(folded[:3], separate[:3]):
        assert all(torch.equal(x, y) for x, y in zip(a, e))
    assert folded[4].item() == separate[4].item() == STEPS
    assert all(s.item() == STEPS for s in folded[2])  # dampening: one counter per param
    if impl != "reference":  # (the reference folds by calling average_ itself)
        assert_lists_close(folded[3], separate[3], **AVG_TOL[average_dtype(dtype)])
    # Both are the rule's averages of these iterates. Each update rounds ~4 times (w - avg,
    # the factor r, r * (w - avg), the sum), each by at most eps/2 * M with M the largest
    # |w|, and carries earlier errors with a factor <= 1: <= 2 eps M per update, in the
    # averages' dtype and again in the fp64 rule; twice STEPS updates' worth bounds both.
    initial = make_state(shapes, dtype, device)[0]
    expected = rule_averages(method, initial, iterates)
    eps = torch.finfo(average_dtype(dtype)).eps
    for i, (a, e) in enumerate(zip(folded[3], expected)):
        big = max([w[i].abs().max().item() for w in [initial] + iterates if w[i].numel()], default=0.0)
        torch.testing.assert_close(a.double(), e, rtol=0, atol=4 * STEPS * eps * big, msg=f"average {i}")


@pytest.mark.parametrize("impl,device", ALL)
def test_swa_average_is_the_mean_of_the_iterates(impl, device):
    shapes = [(5,), (3, 4), ()]
    cfg = CONFIGS["momentum-wd"]
    params, bufs, _ = make_state(shapes, torch.float64, device)
    averages = make_averages(params, "swa")
    count = torch.zeros((), dtype=torch.int64, device=device)
    iterates = []
    for t in range(STEPS):
        ops.lars_sgd_(params, grads_for(t, shapes, torch.float64, device), bufs, [], [False] * 3,
                      averages=averages, average_count=count, impl=impl, **cfg)
        iterates.append([p.clone() for p in params])
    for i, a in enumerate(averages):
        torch.testing.assert_close(a, torch.stack([w[i] for w in iterates]).mean(0), rtol=1e-14, atol=1e-14)
    assert count.item() == STEPS


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("method", ["swa", "ema"])
def test_found_inf_changes_nothing(impl, device, method):
    shapes = shapes_for(impl)
    cfg = CONFIGS["dampening-clip"]
    # Steps 2 and 5 are skipped: the same as 5 steps without them.
    skipped = run(impl, shapes, torch.float32, device, cfg, method, found_inf_at=(2, 5))
    assert skipped[4].item() == STEPS - 2
    params, bufs, steps_t = make_state(shapes, torch.float32, device)
    averages = make_averages(params, method)
    count = torch.zeros((), dtype=torch.int64, device=device)
    exclude = [i % 3 == 0 for i in range(len(params))]
    for t in range(2):
        ops.lars_sgd_(params, grads_for(t, shapes, torch.float32, device), bufs, steps_t, exclude,
                      averages=averages, average_count=count, average_method=method,
                      average_decay=DECAY, impl=impl, **cfg)
    before = [[x.clone() for x in lst] for lst in (params, bufs, steps_t, averages)] + [count.clone()]
    ops.lars_sgd_(params, grads_for(2, shapes, torch.float32, device), bufs, steps_t, exclude,
                  found_inf=torch.ones((), device=device), averages=averages, average_count=count,
                  average_method=method, average_decay=DECAY, impl=impl, **cfg)
    for lst, old in zip((params, bufs, steps_t, averages), before):
        assert all(torch.equal(x, y) for x, y in zip(lst, old))
    assert torch.equal(count, before[4])


@pytest.mark.parametrize("impl,device", ALL)
def test_bad_arguments_change_nothing(impl, device):
    params, bufs, steps_t = make_state([(4,), (3, 2)], torch.float32, device)
    grads = grads_for(0, [(4,), (3, 2)], torch.float32, device)
    averages = make_averages(params, "swa")
    count = torch.zeros((), dtype=torch.int64, device=device)
    args = (params, grads, bufs, steps_t, [False, False])
    cases = [
        (dict(averages=averages[:1], average_count=count), ValueError, "averages has 1 entries"),
        (dict(averages=[averages[0], averages[1].half()], average_count=count), TypeError, r"averages\[1\]"),
        (dict(averages=[averages[0], averages[1].view(-1)], average_count=count), ValueError, r"averages\[1\]"),
        (dict(averages=averages), ValueError, "average_count"),
        (dict(averages=averages, average_count=count.float()), TypeError, "average_count"),
        (dict(averages=averages, average_count=count, average_method="mean"), ValueError, "average_method"),
        (dict(average_count=count), ValueError, "averages is empty"),
    ]
    before = [[x.clone() for x in lst] for lst in (params, bufs, steps_t, averages)] + [count.clone()]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            ops.lars_sgd_(*args, lr=0.1, momentum=0.9, impl=impl, **kwargs)
    for lst, old in zip((params, bufs, steps_t, averages), before):
        assert all(torch.equal(x, y) for x, y in zip(lst, old))
    assert torch.equal(count, before[4])


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("method", ["swa", "ema"])
def test_staged_params_match_reference(impl, device, method):
    """Params the loops cannot walk as they are (transposed views: staged through a
    contiguous copy and written back), with averaging folded in: weights, momentum
    buffers, averages and count against the reference, and the params' layout kept."""
    cfg = CONFIGS["momentum-wd"]

    def run_staged(impl, device):
        g = torch.Generator().manual_seed(0)
        # 300x260 spans two 64K-element chunks; 1x5 is smaller than a vector.
        params = [torch.randn(b, a, generator=g).t().to(device) for a, b in [(33, 17), (300, 260), (1, 5)]]
        strides = [p.stride() for p in params]
        bufs = [torch.zeros_like(p) for p in params]
        averages = make_averages(params, method)
        count = torch.zeros((), dtype=torch.int64, device=device)
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
            ops.lars_sgd_(params, grads, bufs, [], [False, True, False], averages=averages,
                          average_count=count, average_method=method, average_decay=DECAY,
                          impl=impl, **cfg)
        assert [p.stride() for p in params] == strides
        return params, bufs, averages, count

    exp = run_staged("reference", "cpu")
    got = run_staged(impl, device)
    for a, e in zip(got[:3], exp[:3]):
        assert_lists_close(a, e, **TOL[torch.float32])
    assert got[3].item() == exp[3].item() == 3

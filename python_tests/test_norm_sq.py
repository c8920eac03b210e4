"""The precomputed squared norms of ``lars_sgd_`` and ``extrap_sgd_(lars=True)``
(``norm_sq``, docs/algorithms.md section 1), on every backend against the reference:

(a) all -1 ("not given") is ``norm_sq=None`` bit for bit, weights and all state;
(b) the true sums of squares give the step without ``norm_sq`` within the rounding of a
    sum taken in another order;
(c) other values, given for some entries only, are used: the backend equals the reference
    given the same ``norm_sq``, and both differ from the step without it; the entries of
    excluded tensors are never read (garbage there changes no bit);
(d) a bad ``norm_sq`` (shape, dtype, layout, device) is refused naming it, with nothing
    written.
Every run has momentum, weight decay, LARC clipping, a loss scale, excluded tensors, a
zero weight and, now and then, a zero gradient (helpers.make_state / grads_for).
"""

from __future__ import annotations

import pytest
import torch

from helpers import LARS_TOL as TOL
from helpers import backend_params, grads_for, make_state, randn
from helpers import lars_shapes as shapes_for
from lbkernels import _library, ops

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *backend_params()]
COMPILED = backend_params()

SCALE = 1024.0  # the loss scale: norm_sq row 1 holds ||g||^2 of the gradient as passed
# trust_coefficient 0.02 and lr 0.5: r / lr ~ 0.04, so the clipped ratio is r / lr.
CONFIGS = {
    "lars": dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2, clip=True,
                 trust_coefficient=0.02),
    "extrap": dict(lr=0.5, momentum=0.9, weight_decay=1e-2, clip=True, lars=True,
                   trust_coefficient=0.02, extrap_lr=0.05),
}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
OPS = pytest.mark.parametrize("op", list(CONFIGS))
STEPS = 3


def make(op, shapes, dtype, device) -> dict:
    params, bufs, steps = make_state(shapes, dtype, device)
    if op == "lars":
        return {"params": params, "bufs": bufs, "steps": steps}
    return {"params": [p.clone() for p in params], "anchors": params, "bufs": bufs}


def trust_w(op, state):
    """The tensors the trust ratio reads as "w": params for lars_sgd_, anchors for extrap_sgd_."""
    return state["params"] if op == "lars" else state["anchors"]


def true_sq(op, state, grads) -> torch.Tensor:
    """The exact-as-fp64 sums of squares, (2, n): w at its current value, g as passed."""
    rows = [[w.double().square().sum() for w in trust_w(op, state)],
            [g.double().square().sum() for g in grads]]
    return torch.stack([torch.stack(r) for r in rows])


def other_sq(true: torch.Tensor, exclude, excluded_fill: float) -> torch.Tensor:
    """Values that change the step, given for some entries only: 4x ||w||^2 (||w|| doubled)
    with ||g|| computed, ||g||^2 / 4 with ||w|| computed, or nothing given; the excluded
    tensors' entries set to ``excluded_fill``."""
    sq = torch.full_like(true, -1.0)
    for i in range(true.shape[1]):
        if exclude[i]:
            sq[:, i] = excluded_fill
        elif i % 4 == 1:
            sq[0, i] = 4 * true[0, i]
        elif i % 4 == 2:
            sq[1, i] = true[1, i] / 4
        elif i % 4 == 3:
            sq[:, i] = true[:, i] * torch.tensor([4.0, 0.25], dtype=true.dtype)
    return sq


def run(op, impl, device, dtype, mode, sq_dtype=torch.float64, given=None, excluded_fill=-1.0,
        shapes=None):
    """STEPS steps of ``op``; returns (every list of the state, the norm_sq of each step).
    ``mode``: None, "minus_one", "true" or "other"; ``given``: the norm_sq of each step to
    pass instead (another run's, so that both see the same values); ``shapes``: those of
    ``impl`` (helpers.lars_shapes) unless given."""
    shapes = shapes or shapes_for(impl)
    state = make(op, shapes, dtype, device)
    exclude = [i % 3 == 0 for i in range(len(shapes))]
    scale = torch.tensor(SCALE, device=device)
    used = []
    for t in range(STEPS):
        grads = [g * SCALE for g in grads_for(t, shapes, dtype, device)]
        if given is not None:
            sq = given[t]
        elif mode is None:
            sq = None
        elif mode == "minus_one":
            sq = torch.full((2, len(shapes)), -1.0)
        elif mode == "true":
            sq = true_sq(op, state, grads)
        else:
            sq = other_sq(true_sq(op, state, grads).cpu(), exclude, excluded_fill)
        if sq is not None:
            sq = sq.to(device, sq_dtype)
        used.append(sq)
        kw = {} if sq is None else {"norm_sq": sq}
        if op == "lars":
            ops.lars_sgd_(state["params"], grads, state["bufs"], state["steps"], exclude,
                          grad_scale=scale, impl=impl, **CONFIGS[op], **kw)
        else:
            local = [g * SCALE for g in randn(shapes, 500 + t, dtype, device)]
            ops.extrap_sgd_(state["params"], state["anchors"], state["bufs"], grads, local, exclude,
                            grad_scale=scale, impl=impl, **CONFIGS[op], **kw)
    return state, used


def assert_states(got: dict, exp: dict, exact: bool = False, **tol) -> None:
    assert got.keys() == exp.keys()
    for name in got:
        for i, (a, e) in enumerate(zip(got[name], exp[name], strict=True)):
            if exact:
                assert torch.equal(a.cpu(), e.cpu()), f"{name}[{i}] differs"
            else:
                torch.testing.assert_close(a.cpu(), e.cpu(), msg=lambda m: f"{name}[{i}]: {m}", **tol)


def cross(dtype):
    """A norm_sq dtype other than the params' (fp64 entries rounded for fp32 arithmetic,
    fp32 ones read exactly as doubles)."""
    return torch.float32 if dtype == torch.float64 else torch.float64


@pytest.mark.parametrize("impl,device", BACKENDS)
@OPS
@DTYPES
def test_minus_one_is_none_bit_for_bit(impl, device, op, dtype):
    plain, _ = run(op, impl, device, dtype, None)
    minus_one, _ = run(op, impl, device, dtype, "minus_one", sq_dtype=cross(dtype))
    assert_states(minus_one, plain, exact=True)


@pytest.mark.parametrize("impl,device", BACKENDS)
@OPS
@DTYPES
def test_true_sums_give_the_computed_step(impl, device, op, dtype):
    """The norms of given sums differ from the computed ones by the rounding of a sum in
    another order (docs/algorithms.md section 1): the same bound as the backends' own
    comparison with the reference (helpers.LARS_TOL), after STEPS steps."""
    plain, _ = run(op, impl, device, dtype, None)
    given, used = run(op, impl, device, dtype, "true", sq_dtype=dtype)
    assert all(sq.dtype == dtype and bool((sq >= 0).all()) for sq in used)
    assert_states(given, plain, **TOL[dtype])


@pytest.mark.parametrize("impl,device", BACKENDS)
@OPS
@DTYPES
def test_given_values_are_used(impl, device, op, dtype):
    sq_dtype = cross(dtype)
    exp, used = run(op, "reference", "cpu", dtype, "other", sq_dtype=sq_dtype,
                    shapes=shapes_for(impl))
    got, _ = run(op, impl, device, dtype, None, sq_dtype=sq_dtype, given=used)
    assert_states(got, exp, **TOL[dtype])
    # The values change the step: ||w|| doubled or ||g|| halved doubles a ratio.
    plain, _ = run(op, impl, device, dtype, None)
    changed = [i for i, (a, b) in enumerate(zip(trust_w(op, got), trust_w(op, plain)))
               if not torch.allclose(a.cpu(), b.cpu(), rtol=1e-3, atol=1e-4)]
    given_at = [i for i in range(used[0].shape[1]) if i % 3 != 0 and i % 4 != 0]
    assert changed and set(changed) <= set(given_at), (changed, given_at)
    # Excluded tensors' entries are never read: garbage there changes no bit.
    garbage, _ = run(op, impl, device, dtype, "other", sq_dtype=sq_dtype, excluded_fill=1e30)
    minus_one, _ = run(op, impl, device, dtype, "other", sq_dtype=sq_dtype, excluded_fill=-1.0)
    assert_states(garbage, minus_one, exact=True)


def _bad_norm_sqs(n: int, device: str) -> list:
    ok = torch.full((2, n), -1.0, device=device)
    cases = [
        (torch.full((2, n - 1), -1.0, device=device), ValueError, "shape"),
        (torch.full((n,), -1.0, device=device), ValueError, "shape"),
        (torch.full((3, n), -1.0, device=device), ValueError, "shape"),
        (ok.half(), TypeError, "float32 or float64"),
        (ok.long(), TypeError, "float32 or float64"),
        (torch.full((n, 2), -1.0, device=device).t(), ValueError, "contiguous"),
    ]
    if device != "cpu":
        cases.append((ok.cpu(), ValueError, "is on cpu"))
    return cases


@pytest.mark.parametrize("impl,device", BACKENDS)
@OPS
def test_bad_norm_sq_is_refused_before_any_write(impl, device, op):
    shapes = shapes_for(impl)
    state = make(op, shapes, torch.float32, device)
    before = {k: [t.clone() for t in v] for k, v in state.items()}
    grads = grads_for(0, shapes, torch.float32, device)
    exclude = [False] * len(shapes)
    for bad, error, words in _bad_norm_sqs(len(shapes), device):
        with pytest.raises(error, match=rf"norm_sq.*{words}|{words}.*norm_sq"):
            if op == "lars":
                ops.lars_sgd_(state["params"], grads, state["bufs"], state["steps"], exclude,
                              impl=impl, norm_sq=bad, **CONFIGS[op])
            else:
                ops.extrap_sgd_(state["params"], state["anchors"], state["bufs"], grads, [],
                                exclude, impl=impl, norm_sq=bad, **CONFIGS[op])
    assert_states(state, before, exact=True)


@pytest.mark.parametrize("impl", ["reference", "native"])
@pytest.mark.parametrize("op", list(CONFIGS))
def test_norm_sq_on_another_device_is_refused(op, impl):
    """norm_sq on another device than the params: a "meta" tensor beside CPU params here
    (the CUDA rows above cover a CPU norm_sq beside CUDA params). The dispatcher would
    send a call holding a meta tensor to the fake kernel: the CPU kernel is reached by
    redispatching to its key."""
    from lbkernels.reference import extrap, lars

    if impl == "native" and not _library.has_native_kernel("lars_sgd_", "cpu"):
        pytest.skip("compiled kernels not loaded")
    params, ones = [torch.ones(3)], [torch.ones(3)]
    bad = torch.full((2, 1), -1.0, device="meta")
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match=r"norm_sq is on meta but params\[0\] is on cpu"):
        if op == "lars":
            args = (params, ones, [], [], [False])
            if impl == "reference":
                lars.lars_sgd_(*args, lr=0.1, norm_sq=bad)
            else:
                torch.ops.lbkernels.lars_sgd_.default.redispatch(cpu, *args, lr=0.1, norm_sq=bad)
        else:
            args = (params, ones, [], ones, [], [False])
            if impl == "reference":
                extrap.extrap_sgd_(*args, lr=0.1, lars=True, norm_sq=bad)
            else:
                torch.ops.lbkernels.extrap_sgd_.default.redispatch(cpu, *args, lr=0.1, lars=True,
                                                                   norm_sq=bad)
    assert torch.equal(params[0], torch.ones(3))

"""Every lamb_ backend against the reference (docs/algorithms.md section 7).

Weights, both moments and the step counters (and, with folded averaging, the averages
and their count) are compared after 7 steps for every option; 16-bit tensors by their
error against an fp64 run; found_inf by bitwise equality. The reference itself is checked
against values worked out by hand here, and against timm's ``Lamb`` and apex's
``FusedLAMB`` transcribed bit for bit in test_lamb_optim.py (the LAMB optimizer with
impl="reference" calls this op's reference kernel).
"""

from __future__ import annotations

import pytest
import torch

from helpers import backend_params
from lbkernels import _library, ops
from lbkernels.reference import lamb as ref
from lbkernels.reference.average import average_dtype

BACKENDS = backend_params()
WITH_REFERENCE = BACKENDS + [pytest.param("reference", "cpu", id="reference-cpu")]
STEPS = 7

# Two tensors over a 64K chunk (the blocked path: 66820 and 150000 elements, 2 and 3
# chunks), a conv weight, a zero matrix (||w|| = 0), a vector that starts at zero with a
# zero first gradient (||w|| = ||u|| = 0 at step 1 without L2), a 0-dim and an empty tensor.
SHAPES = [(257, 260), (300, 500), (16, 3, 3, 3), (33, 17), (7,), (), (0, 4)]
# The Triton interpreter costs ~1 us per element: the same kinds of shapes, small.
SHAPES_INTERPRETED = [(40, 30), (9, 70), (4, 3, 3, 3), (9, 7), (7,), (), (0, 4)]
ZERO_W, ZERO_G = 3, 4

CONFIGS = {
    "timm": dict(lr=0.02),
    "timm-l2-lambc-max-trust": dict(lr=0.05, decoupled_weight_decay=False, clip=True,
                                    max_trust=20.0, weight_decay=0.05),
    "timm-no-bias-correction-no-averaging-clipped": dict(lr=0.01, bias_correction=False,
                                                         grad_averaging=False, max_grad_norm=2.0),
    "timm-lerp-high-no-decay": dict(lr=0.03, beta1=0.3, beta2=0.99, eps=1e-8, weight_decay=0.0),
    "apex": dict(lr=0.02, style="apex", max_grad_norm=1.0),
    "apex-l2-no-bias-correction": dict(lr=0.05, style="apex", decoupled_weight_decay=False,
                                       bias_correction=False, grad_averaging=False,
                                       weight_decay=0.1, clip=True),
    "apex-no-decay-max-trust": dict(lr=0.02, style="apex", weight_decay=0.0, max_trust=5.0),
}

# fp32 after 7 steps: the kernels sum the norms in another order and may contract
# products into FMAs (a few ulps per step, compounding through the moments): 1e-5
# relative is ~80 ulps. Absolute errors are measured against the tensor's largest value
# (an element near 0 carries the error of its neighbours' norms), at 1e-6 of it. fp64:
# the same in fp64 ulps.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
ATOL = {torch.float32: 1e-6, torch.float64: 1e-13}
NAMES = ("params", "exp_avgs", "exp_avg_sqs", "steps")


def shapes_for(impl: str):
    return SHAPES_INTERPRETED if impl == "triton" and not torch.cuda.is_available() else SHAPES


def randn(shapes, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


def make_state(shapes, dtype, device):
    params = randn(shapes, 0, dtype, device)
    params[ZERO_W].zero_()
    params[ZERO_G].zero_()
    return [params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros((), device=device) for _ in params]]


def step_grads(t, shapes, dtype, device):
    grads = randn(shapes, 1000 + t, dtype, device)
    if t == 0:
        grads[ZERO_G].zero_()
    return grads


def exclude_for(shapes):
    return [i % 3 == 2 for i in range(len(shapes))]


def run(impl, shapes, dtype, device, cfg, steps=STEPS, state=None, lr_tensor=False,
        grad_scale=None, grad_norm=False, grad_round=None, averages=None, found_inf_at=()):
    """``steps`` lamb_ calls on ``impl``; the state lists (plus the averages and count)."""
    cfg = dict(cfg)
    state = state or make_state(shapes, dtype, device)
    if lr_tensor:
        cfg["lr"] = torch.tensor(cfg["lr"], device=device)
    extra = []
    if averages is not None:
        params = state[0]
        avg = ([p.to(average_dtype(p.dtype), copy=True) for p in params] if averages == "ema"
               else [torch.zeros_like(p, dtype=average_dtype(p.dtype)) for p in params])
        count = torch.zeros((), dtype=torch.int64, device=device)
        cfg.update(averages=avg, average_count=count, average_method=averages, average_decay=0.8)
        extra = [avg, [count]]
    for t in range(steps):
        grads = step_grads(t, shapes, dtype, device)
        if grad_round is not None:  # the inputs a lower-precision run sees, exactly
            grads = [g.to(grad_round).to(dtype) for g in grads]
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
            cfg["grad_scale"] = torch.tensor(grad_scale, device=device)
        if grad_norm:
            cfg["grad_norm"] = ref.global_grad_norm(grads).reshape(1)
        if found_inf_at:
            cfg["found_inf"] = torch.tensor(float(t in found_inf_at), device=device)
        ops.lamb_(state[0], grads, *state[1:], exclude_for(shapes), impl=impl, **cfg)
    return state + extra


def assert_lists_close(actual, expected, what, dtype):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = e.double().abs().max().item() if e.numel() else 0.0
        torch.testing.assert_close(a.cpu(), e.cpu(), rtol=RTOL[dtype], atol=ATOL[dtype] * scale,
                                   msg=lambda m: f"{what}[{i}]: {m}")


def assert_follows_reference(impl, device, cfg, dtype, **kw):
    shapes = shapes_for(impl)
    exp = run("reference", shapes, dtype, "cpu", cfg, **kw)
    got = run(impl, shapes, dtype, device, cfg, **kw)
    for name, a, e in zip(NAMES + ("averages", "average_count"), got, exp):
        assert_lists_close(a, e, name, dtype)
    return got


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(impl, device, cfg, dtype):
    got = assert_follows_reference(impl, device, CONFIGS[cfg], dtype)
    assert all(s.item() == STEPS for s in got[3])


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("method", ["swa", "ema"])
def test_folded_averaging_matches_reference(impl, device, method):
    got = assert_follows_reference(impl, device, CONFIGS["apex"], torch.float32, averages=method)
    assert got[5][0].item() == STEPS


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("cfg", ["timm-no-bias-correction-no-averaging-clipped", "apex"])
def test_lr_tensor_grad_scale_and_given_grad_norm(impl, device, cfg):
    """A tensor lr, AMP-scaled gradients and the global norm given by the caller (the norm
    of the scaled gradients) step as a float lr on unscaled gradients, the op computing
    the norm itself."""
    shapes = shapes_for(impl)
    cfg = CONFIGS[cfg]
    plain = run("reference", shapes, torch.float32, "cpu", cfg)
    for kw in (dict(lr_tensor=True, grad_scale=1024.0), dict(grad_scale=512.0, grad_norm=True)):
        exp = run("reference", shapes, torch.float32, "cpu", cfg, **kw)
        got = run(impl, shapes, torch.float32, device, cfg, **kw)
        for name, a, e, p in zip(NAMES, got, exp, plain):
            assert_lists_close(a, e, name, torch.float32)
            assert_lists_close(a, p, name, torch.float32)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_bound(impl, device, dtype):
    """16-bit tensors are rounded once per step after fp32 arithmetic, so a kernel and the
    reference may round a value differently and then drift apart by whole 16-bit ulps: no
    elementwise tolerance is meaningful. Instead: the kernel's error is at most 2x the
    reference's own error in that dtype, both measured against the fp64 reference run
    from the same rounded inputs."""
    shapes = shapes_for(impl)
    cfg = dict(CONFIGS["timm-l2-lambc-max-trust"], max_grad_norm=5.0)
    low = make_state(shapes, dtype, "cpu")
    exact = run("reference", shapes, torch.float64, "cpu", cfg, grad_round=dtype,
                state=[[t.double() for t in lst] for lst in low[:3]] + [[s.clone() for s in low[3]]])
    ref_low = run("reference", shapes, dtype, "cpu", cfg, state=[[t.clone() for t in lst] for lst in low])
    got = run(impl, shapes, dtype, device, cfg, state=[[t.to(device) for t in lst] for lst in low])

    def err(xs, want):
        return torch.cat([(x.cpu().double() - e.double()).flatten() for x, e in zip(xs, want)]).norm()

    for k, name in enumerate(NAMES[:3]):
        assert err(got[k], exact[k]) <= 2 * err(ref_low[k], exact[k]), name
    assert err(got[0], exact[0]) > 0  # the check compares something
    assert all(s.item() == STEPS for s in got[3])


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("averages", [None, "swa"])
def test_found_inf_changes_nothing(impl, device, averages):
    shapes = shapes_for(impl)
    cfg = CONFIGS["apex"]
    state = run(impl, shapes, torch.float32, device, cfg, steps=2, averages=averages)
    before = [[t.clone() for t in lst] for lst in state]
    grads = step_grads(5, shapes, torch.float32, device)
    grads[0].view(-1)[0] = float("inf")
    kw = {}
    if averages:
        kw = dict(averages=state[4], average_count=state[5][0], average_method=averages)
    ops.lamb_(state[0], grads, *state[1:4], exclude_for(shapes), impl=impl, found_inf=torch.ones((), device=device),
              grad_scale=torch.tensor(65536.0, device=device), **cfg, **kw)
    for lst, old in zip(state, before):
        for a, b in zip(lst, old):
            assert torch.equal(a, b)  # NaN-free state: equal means identical bits
    # A skipped step between others: the backend still follows the reference.
    exp = run("reference", shapes, torch.float32, "cpu", cfg, steps=4, found_inf_at=(1,), averages=averages)
    got = run(impl, shapes, torch.float32, device, cfg, steps=4, found_inf_at=(1,), averages=averages)
    for name, a, e in zip(NAMES + ("averages", "average_count"), got, exp):
        assert_lists_close(a, e, name, torch.float32)
    assert all(s.item() == 3 for s in got[3])


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_zero_norms_and_exclusion_take_ratio_one(impl, device):
    """Worked by hand, in fp64: at step 1 with bias correction m_hat = g, v_hat = g^2, so
    u = g / (|g| + eps) + wd * w. A zero w (||w|| = 0) and an excluded tensor take r = 1:
    w - lr * u. A zero w with a zero gradient (||u|| = 0) stays zero. A plain tensor takes
    r = ||w|| / ||u||, and phi(||w||) = max_trust below ||w||."""
    g = torch.Generator().manual_seed(3)
    w = [torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
         torch.randn(6, generator=g, dtype=torch.float64) + 2, torch.randn(70, generator=g, dtype=torch.float64),
         torch.randn(9, generator=g, dtype=torch.float64)]
    grads = [torch.randn(5, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
             torch.randn(6, generator=g, dtype=torch.float64), torch.randn(70, generator=g, dtype=torch.float64),
             torch.randn(9, generator=g, dtype=torch.float64)]
    lr, wd, eps = 0.1, 0.01, 1e-6
    u = [gi / (gi.abs() + eps) + wd * wi for gi, wi in zip(grads, w)]
    r = [1.0, 1.0, 1.0, w[3].norm() / u[3].norm(), 0.5 / u[4].norm()]
    want = [wi - lr * ri * ui for wi, ri, ui in zip(w, r, u)]
    params = [t.clone().to(device) for t in w]
    state = [params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros((), device=device) for _ in params]]
    for style in ("timm", "apex"):
        for p, w0 in zip(params, w):
            p.copy_(w0)
        for lst in state[1:]:
            for t in lst:
                t.zero_()
        exclude = [False, False, True, False, False]
        # max_trust caps only the last tensor's ||w|| (~3): the others are 0 or excluded,
        # and tensor 3 is checked without it below.
        ops.lamb_(params, [x.to(device) for x in grads], *state[1:], exclude, lr=lr, weight_decay=wd, eps=eps,
                  style=style, max_trust=0.5, impl=impl)
        for i in (0, 1, 2, 4):
            torch.testing.assert_close(params[i].cpu(), want[i], rtol=1e-12, atol=1e-14)
        assert torch.equal(params[1], torch.zeros_like(params[1]))
    for p, w0 in zip(params, w):
        p.copy_(w0)
    for lst in state[1:]:
        for t in lst:
            t.zero_()
    ops.lamb_(params, [x.to(device) for x in grads], *state[1:], [False] * 5, lr=lr, weight_decay=wd, eps=eps,
              impl=impl)
    torch.testing.assert_close(params[3].cpu(), want[3], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_non_contiguous_mixed_dtypes_and_empty_lists(impl, device):
    """Strided views (transposed, every other column, channels_last) are updated in place
    through the view; one call may mix dtypes (the global clipping spans all of them); an
    empty call is a no-op."""
    def fresh(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(6, 5, generator=g, dtype=torch.float64).to(device).t(),
                torch.randn(7, 10, generator=g).to(device)[:, ::2],
                torch.randn(4, 3, 5, 5, generator=g).to(device).to(memory_format=torch.channels_last),
                torch.randn(50, generator=g, dtype=torch.float64).to(device)]

    params, grads = fresh(0), fresh(1)
    grads[0] = grads[0].contiguous()  # strides unlike its param
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    exp = [[t.cpu().clone() for t in lst] for lst in (params, m, v, steps)]
    kw = dict(lr=0.1, weight_decay=1e-2, max_grad_norm=1.0)
    ops.lamb_(exp[0], [x.cpu() for x in grads], *exp[1:], [False, True, False, False], impl="reference",
              **kw)
    views = [p.stride() for p in params]
    ops.lamb_(params, grads, m, v, steps, [False, True, False, False], impl=impl, **kw)
    assert [p.stride() for p in params] == views
    for name, a, e in zip(NAMES, (params, m, v, steps), exp):
        assert_lists_close(a, e, name, torch.float32)

    ops.lamb_([], [], [], [], [], [], lr=0.1, max_grad_norm=1.0, impl=impl)


# --- argument errors ---------------------------------------------------------------------

@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_bad_arguments_name_the_argument_and_change_nothing(impl, device):
    shapes = [(4, 3), (5,)]
    params, grads = randn(shapes, 0, torch.float32, device), randn(shapes, 1, torch.float32, device)
    m, v = [torch.zeros_like(p) + 0.5 for p in params], [torch.zeros_like(p) + 0.25 for p in params]
    steps = [torch.ones((), device=device) for _ in params]
    ok = dict(params=params, grads=grads, exp_avgs=m, exp_avg_sqs=v, steps=steps,
              exclude=[False, True], lr=0.1)
    state = params + m + v + steps
    before = [t.clone() for t in state]
    f64 = torch.zeros((), dtype=torch.float64, device=device)
    bad = [
        (dict(grads=grads[:1]), ValueError, "grads has 1 entries but params has 2"),
        (dict(exp_avgs=m[:1]), ValueError, "exp_avgs has 1 entries"),
        (dict(exp_avg_sqs=[v[0]]), ValueError, "exp_avg_sqs has 1 entries"),
        (dict(exclude=[False]), ValueError, "exclude has 1 entries"),
        (dict(steps=steps[:1]), ValueError, "steps has 1 entries"),
        (dict(steps=[steps[0], f64]), TypeError, r"steps\[1\] must be a one-element float32 tensor"),
        (dict(grads=[grads[0], grads[1].double()]), TypeError, r"grads\[1\] has dtype"),
        (dict(exp_avgs=[m[0], m[1][:4]]), ValueError, r"exp_avgs\[1\] has shape"),
        (dict(lr=-0.1), ValueError, "lr must be >= 0"),
        (dict(eps=-1e-8), ValueError, "eps must be >= 0"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
        (dict(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\)"),
        (dict(beta2=-0.1), ValueError, r"beta2 must be in \[0, 1\)"),
        (dict(max_trust=0.0), ValueError, "max_trust must be > 0 or None"),
        (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm must be > 0 or None"),
        (dict(grad_norm=torch.ones(1, device=device)), ValueError, "grad_norm is given but max_grad_norm is None"),
        (dict(style="keras"), ValueError, "style must be one of"),
        (dict(lr=torch.ones(2, device=device)), ValueError, "lr_tensor must hold exactly one element"),
        (dict(max_grad_norm=1.0, grad_norm=torch.ones(2, device=device)), ValueError,
         "grad_norm must hold exactly one element"),
        (dict(grad_scale=torch.ones(3, device=device)), ValueError, "grad_scale must hold exactly one"),
        (dict(found_inf=torch.zeros(2, device=device)), ValueError, "found_inf must hold exactly one"),
        (dict(averages=[torch.zeros_like(p) for p in params]), ValueError, "average_method='swa' needs average_count"),
        (dict(averages=[torch.zeros_like(params[0])], average_count=torch.zeros((), dtype=torch.int64, device=device)),
         ValueError, "averages has 1 entries"),
        (dict(average_count=torch.zeros((), dtype=torch.int64, device=device)), ValueError,
         "average_count is given but averages is empty"),
        (dict(average_method="median"), ValueError, "average_method must be one of"),
    ]
    for change, exc, match in bad:
        kw = {**ok, **change}
        args = [kw.pop(k) for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "exclude")]
        with pytest.raises(exc, match=match):
            ops.lamb_(*args, impl=impl, **kw)
        for a, b in zip(state, before):
            assert torch.equal(a, b), change
    with pytest.raises(TypeError, match="unexpected keyword argument 'trust_coefficient'"):
        ops.lamb_(params, grads, m, v, steps, [False, True], lr=0.1, trust_coefficient=0.1, impl=impl)


def test_native_kernel_is_built_with_the_others():
    """Where the compiled library serves lars_sgd_ on the CPU it serves lamb_ too: a build
    that left csrc/cpu/lamb.cpp out would otherwise fall back to the reference silently."""
    if not _library.has_native_kernel("lars_sgd_", "cpu"):
        pytest.skip("compiled kernels not loaded")
    assert _library.has_native_kernel("lamb_", "cpu")

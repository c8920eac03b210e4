"""Every extrap_sgd_ / extrap_adam_ backend against the reference (docs/algorithms.md section 2).

Weights, anchors, momentum buffers, Adam moments and step counters are compared after 7
steps; the noise variants are compared statistically (the reference draws from torch's
generator, the kernels from Philox), and each backend must be reproducible for a fixed
``(seed, offset)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import M32, backend_params, documented_draw, noise_call, philox4x32_10
from lbkernels import _library, ops
from lbkernels.reference import extrap as ref

BACKENDS = backend_params()
WITH_REFERENCE = BACKENDS + [pytest.param("reference", "cpu", id="reference-cpu")]
NOISE = ("gaussian", "uniform", "weight", "filter")

# One tensor over a 64K chunk (66820 elements, 260 per filter: the blocked path, and filter
# chunks of 252 rows), a conv weight, a matrix, a bias, a 0-dim and an empty tensor.
SHAPES = [(257, 260), (16, 3, 3, 3), (33, 17), (7,), (), (0, 4)]
# The Triton interpreter costs ~1 us per element: the same kinds of shapes, small.
SHAPES_INTERPRETED = [(40, 30), (4, 3, 3, 3), (9, 7), (7,), (), (0, 4)]

SGD_CONFIGS = {
    "plain": dict(lr=0.1, extrap_lr=0.05),
    "momentum-wd": dict(lr=0.2, extrap_lr=0.1, momentum=0.9, weight_decay=1e-2),
    "nesterov-local": dict(lr=0.2, extrap_lr=0.05, momentum=0.9, nesterov=True,
                           weight_decay=5e-4, local=True),
    "lars": dict(lr=2.0, extrap_lr=0.5, momentum=0.9, weight_decay=5e-3, lars=True,
                 trust_coefficient=0.02),
    "lars-nesterov-clip-local": dict(lr=2.0, extrap_lr=0.3, momentum=0.9, nesterov=True,
                                     weight_decay=1e-3, lars=True, clip=True, local=True),
}
ADAM_CONFIGS = {
    "l2": dict(lr=1e-2, extrap_lr=5e-3, weight_decay=1e-2),
    "decoupled-local": dict(lr=1e-2, extrap_lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.1,
                            decoupled_weight_decay=True, local=True),
    "lerp-high": dict(lr=1e-3, extrap_lr=1e-3, beta1=0.3, local=True),  # 1 - beta1 >= 0.5
}

# fp32 after 7 steps: the kernels fold coefficients, contract products into FMAs and sum
# the LARS norms in another order (a few ulps per step, compounding through the
# buffers): 1e-5 relative is ~80 ulps. fp64: the same in fp64 ulps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def shapes_for(impl: str):
    return SHAPES_INTERPRETED if impl == "triton" and not torch.cuda.is_available() else SHAPES


def require(impl: str, device: str, name: str) -> None:
    """Skip a backend that does not implement `name` yet (the table lists it regardless)."""
    if impl == "triton":
        from lbkernels.triton import OPS

        if name not in OPS:
            pytest.skip(f"no Triton kernel for {name}")
    elif impl == "native" and not _library.has_native_kernel(name, device):
        pytest.skip(f"no native {device} kernel for {name}")


def randn(shapes, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


def sgd_state(shapes, dtype, device, momentum=True):
    x = randn(shapes, 0, dtype, device)
    if len(x) > 2:
        x[2].zero_()  # a zero anchor: the trust ratio falls back to 1
    params = [t.clone() for t in x]
    bufs = [torch.zeros_like(t) for t in x] if momentum else []
    return [params, x, bufs]


def adam_state(shapes, dtype, device):
    x = randn(shapes, 0, dtype, device)
    return [[t.clone() for t in x], x, [torch.zeros_like(t) for t in x],
            [torch.zeros_like(t) for t in x], [torch.zeros((), device=device) for _ in x]]


def step_grads(t, shapes, dtype, device, local):
    grads = randn(shapes, 1000 + t, dtype, device)
    if len(grads) > 3 and t % 3 == 1:
        grads[3].zero_()  # a zero gradient now and then
    return grads, (randn(shapes, 2000 + t, dtype, device) if local else [])


def run_sgd(impl, shapes, dtype, device, cfg, steps=7, state=None, lr_tensor=False,
            grad_scale=None, extrapolation="past_grad", grad_round=None):
    cfg = dict(cfg)
    local = cfg.pop("local", False)
    momentum = cfg.get("momentum", 0.0) != 0.0
    state = state or sgd_state(shapes, dtype, device, momentum)
    if lr_tensor:
        cfg["lr"] = torch.tensor(cfg["lr"], device=device)
        cfg["extrap_lr"] = torch.tensor(cfg["extrap_lr"], device=device)
    exclude = [i % 3 == 1 for i in range(len(shapes))]
    for t in range(steps):
        grads, local_grads = step_grads(t, shapes, dtype, device, local)
        if grad_round is not None:  # the inputs a lower-precision run sees, exactly
            grads = [g.to(grad_round).to(dtype) for g in grads]
            local_grads = [g.to(grad_round).to(dtype) for g in local_grads]
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
            local_grads = [g * grad_scale for g in local_grads]
        ops.extrap_sgd_(*state, grads, local_grads, exclude, impl=impl, extrapolation=extrapolation,
                        noise_scale=0.1, seed=3, offset=t,
                        grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device),
                        **cfg)
    return state


def run_adam(impl, shapes, dtype, device, cfg, steps=7, state=None, lr_tensor=False,
             grad_scale=None):
    cfg = dict(cfg)
    local = cfg.pop("local", False)
    state = state or adam_state(shapes, dtype, device)
    if lr_tensor:
        cfg["lr"] = torch.tensor(cfg["lr"], device=device)
        cfg["extrap_lr"] = torch.tensor(cfg["extrap_lr"], device=device)
    for t in range(steps):
        grads, local_grads = step_grads(t, shapes, dtype, device, local)
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
            local_grads = [g * grad_scale for g in local_grads]
        ops.extrap_adam_(*state, grads, local_grads, impl=impl,
                         grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device),
                         **cfg)
    return state


def assert_lists_close(actual, expected, what, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.cpu(), e.cpu(), msg=lambda m: f"{what}[{i}]: {m}", **tol)


SGD_NAMES = ("params", "anchors", "momentum_buffers")
ADAM_NAMES = ("params", "anchors", "exp_avgs", "exp_avg_sqs", "steps")


def assert_follows_reference(run, names, impl, device, cfg, dtype):
    """``run`` (run_sgd or run_adam) on ``impl`` against the reference; the state it left."""
    shapes = shapes_for(impl)
    exp = run("reference", shapes, dtype, "cpu", cfg)
    got = run(impl, shapes, dtype, device, cfg)
    for name, a, e in zip(names, got, exp):
        assert_lists_close(a, e, name, **TOL[dtype])
    return got


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("cfg", list(SGD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sgd_matches_reference(impl, device, cfg, dtype):
    require(impl, device, "extrap_sgd_")
    assert_follows_reference(run_sgd, SGD_NAMES, impl, device, SGD_CONFIGS[cfg], dtype)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("cfg", list(ADAM_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_adam_matches_reference(impl, device, cfg, dtype):
    require(impl, device, "extrap_adam_")
    got = assert_follows_reference(run_adam, ADAM_NAMES, impl, device, ADAM_CONFIGS[cfg], dtype)
    assert all(s.item() == 7 for s in got[4])


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_lr_tensors_and_grad_scale(impl, device):
    require(impl, device, "extrap_sgd_")
    require(impl, device, "extrap_adam_")
    shapes = shapes_for(impl)
    cfg = SGD_CONFIGS["lars-nesterov-clip-local"]
    exp = run_sgd("reference", shapes, torch.float32, "cpu", cfg, grad_scale=1024.0)
    got = run_sgd(impl, shapes, torch.float32, device, cfg, lr_tensor=True, grad_scale=1024.0)
    for name, a, e in zip(SGD_NAMES, got, exp):
        assert_lists_close(a, e, name, **TOL[torch.float32])
    # Unscaling inside the kernel equals stepping on unscaled gradients.
    plain = run_sgd("reference", shapes, torch.float32, "cpu", cfg)
    assert_lists_close(got[0], plain[0], "params", **TOL[torch.float32])

    acfg = ADAM_CONFIGS["decoupled-local"]
    exp = run_adam("reference", shapes, torch.float32, "cpu", acfg, grad_scale=1024.0)
    got = run_adam(impl, shapes, torch.float32, device, acfg, lr_tensor=True, grad_scale=1024.0)
    for name, a, e in zip(ADAM_NAMES, got, exp):
        assert_lists_close(a, e, name, **TOL[torch.float32])


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_bound(impl, device, dtype):
    """16-bit tensors are rounded once per step after fp32 arithmetic, so a kernel and the
    reference may round a value differently and then drift apart by whole 16-bit ulps
    (2^-8 relative for bf16): no elementwise tolerance is meaningful. Instead: the
    kernel's error is at most 2x the reference's own error in that dtype, both measured
    against the fp64 reference run from the same rounded inputs."""
    require(impl, device, "extrap_sgd_")
    require(impl, device, "extrap_adam_")
    shapes = shapes_for(impl)
    cfg = SGD_CONFIGS["lars-nesterov-clip-local"]
    low = sgd_state(shapes, dtype, "cpu")
    exact = run_sgd("reference", shapes, torch.float64, "cpu", cfg, grad_round=dtype,
                    state=[[t.double() for t in lst] for lst in low])
    ref_low = run_sgd("reference", shapes, dtype, "cpu", cfg, state=[[t.clone() for t in lst] for lst in low])
    got = run_sgd(impl, shapes, dtype, device, cfg, state=[[t.to(device) for t in lst] for lst in low])

    def err(xs, want):
        return torch.cat([(x.cpu().double() - e).flatten() for x, e in zip(xs, want)]).norm()

    for k, name in enumerate(SGD_NAMES):
        assert err(got[k], exact[k]) <= 2 * err(ref_low[k], exact[k]), name
    assert err(got[0], exact[0]) > 0  # the check compares something

    # extrap_adam_: the same bound on the anchor and the extrapolated point.
    acfg = ADAM_CONFIGS["decoupled-local"]
    low = adam_state(shapes, dtype, "cpu")
    grads = [step_grads(t, shapes, dtype, "cpu", True) for t in range(7)]

    def adam_run(impl_, state, device_, cast):
        c = dict(acfg)
        c.pop("local")
        for g, gk in grads:
            ops.extrap_adam_(*state, [cast(x) for x in g], [cast(x) for x in gk], impl=impl_, **c)
        return state

    exact = adam_run("reference", [[t.double() if t.dim() or t.dtype != torch.float32 else t.clone()
                                     for t in lst] for lst in low[:4]] + [[s.clone() for s in low[4]]],
                     "cpu", lambda x: x.double())
    ref_low = adam_run("reference", [[t.clone() for t in lst] for lst in low], "cpu", lambda x: x)
    got = adam_run(impl, [[t.to(device) for t in lst] for lst in low], device, lambda x: x.to(device))
    for k, name in enumerate(ADAM_NAMES[:2]):
        assert err(got[k], exact[k]) <= 2 * err(ref_low[k], exact[k]), name


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("extrapolation", ("past_grad",) + NOISE)
def test_found_inf_changes_nothing(impl, device, extrapolation):
    require(impl, device, "extrap_sgd_")
    require(impl, device, "extrap_adam_")
    shapes = shapes_for(impl)
    cfg = SGD_CONFIGS["lars-nesterov-clip-local"]
    state = run_sgd(impl, shapes, torch.float32, device, cfg, steps=2, extrapolation=extrapolation)
    before = [[t.clone() for t in lst] for lst in state]
    grads, local_grads = step_grads(5, shapes, torch.float32, device, True)
    grads[0].fill_(float("inf"))
    c = {k: v for k, v in cfg.items() if k != "local"}
    ops.extrap_sgd_(*state, grads, local_grads, [False] * len(shapes), impl=impl,
                    extrapolation=extrapolation, noise_scale=0.1, seed=1, offset=9,
                    found_inf=torch.ones((), device=device),
                    grad_scale=torch.tensor(65536.0, device=device), **c)
    for lst, old in zip(state, before):
        for a, b in zip(lst, old):
            assert torch.equal(a, b)  # NaN-free inputs: equal means identical bits
    if extrapolation != "past_grad":
        return
    astate = run_adam(impl, shapes, torch.float32, device, ADAM_CONFIGS["l2"], steps=2)
    before = [[t.clone() for t in lst] for lst in astate]
    ops.extrap_adam_(*astate, grads, local_grads, lr=0.1, extrap_lr=0.1, impl=impl,
                     found_inf=torch.ones((), device=device))
    for lst, old in zip(astate, before):
        for a, b in zip(lst, old):
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_non_contiguous_mixed_dtypes_and_empty_lists(impl, device):
    """Strided views (transposed, every other column, channels_last) are updated in place
    through the view, as lars_sgd_ does; one call may mix dtypes; an empty call is a no-op."""
    require(impl, device, "extrap_sgd_")
    require(impl, device, "extrap_adam_")
    g = torch.Generator().manual_seed(5)

    def fresh():
        return [torch.randn(6, 5, generator=g, dtype=torch.float64).to(device).t(),
                torch.randn(7, 10, generator=g).to(device)[:, ::2],
                torch.randn(4, 3, 5, 5, generator=g).to(device).to(memory_format=torch.channels_last),
                torch.randn(50, generator=g, dtype=torch.float64).to(device)]

    for extrapolation in ("past_grad", "filter"):
        params, anchors, grads, local_grads = fresh(), fresh(), fresh(), fresh()
        grads[0] = grads[0].contiguous()  # strides unlike its param
        bufs = [torch.zeros_like(p) for p in params]
        exp = [[t.cpu().clone() for t in lst] for lst in (params, anchors, bufs)]
        kw = dict(lr=0.1, extrap_lr=0.05, momentum=0.9, weight_decay=1e-3, lars=True,
                  extrapolation=extrapolation, noise_scale=0.0)  # a = 0: w = x exactly
        ops.extrap_sgd_(*exp, [x.cpu() for x in grads], [x.cpu() for x in local_grads], [False] * 4,
                        impl="reference", **kw)
        views = [p.stride() for p in params]
        ops.extrap_sgd_(params, anchors, bufs, grads, local_grads, [False] * 4, impl=impl, **kw)
        assert [p.stride() for p in params] == views
        for name, a, e in zip(SGD_NAMES, (params, anchors, bufs), exp):
            assert_lists_close(a, e, name, rtol=2e-6, atol=1e-7)

    params, anchors, grads = fresh(), fresh(), fresh()
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    exp = [[t.cpu().clone() for t in lst] for lst in (params, anchors, m, v, steps)]
    ops.extrap_adam_(*exp, [x.cpu() for x in grads], [], lr=0.1, extrap_lr=0.1, impl="reference")
    ops.extrap_adam_(params, anchors, m, v, steps, grads, [], lr=0.1, extrap_lr=0.1, impl=impl)
    for name, a, e in zip(ADAM_NAMES, (params, anchors, m, v, steps), exp):
        assert_lists_close(a, e, name, rtol=2e-6, atol=1e-7)

    ops.extrap_sgd_([], [], [], [], [], [], lr=0.1, impl=impl)
    ops.extrap_adam_([], [], [], [], [], [], [], lr=0.1, impl=impl)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_many_small_tensors(impl, device):
    """2000 tensors of 1..300 elements: a model of many small layers, in one call. The
    Triton interpreter takes ~45 ms per tensor and call here (6 minutes for 2000): it gets 60."""
    require(impl, device, "extrap_sgd_")
    require(impl, device, "extrap_adam_")
    count = 60 if impl == "triton" and not torch.cuda.is_available() else 2000
    sizes = torch.randint(1, 300, (count,), generator=torch.Generator().manual_seed(7)).tolist()
    shapes = [(n,) for n in sizes]
    cfg = SGD_CONFIGS["lars-nesterov-clip-local"]
    exp = run_sgd("reference", shapes, torch.float32, "cpu", cfg, steps=2)
    got = run_sgd(impl, shapes, torch.float32, device, cfg, steps=2)
    for name, a, e in zip(SGD_NAMES, got, exp):
        assert_lists_close(a, e, name, **TOL[torch.float32])
    exp = run_adam("reference", shapes, torch.float32, "cpu", ADAM_CONFIGS["l2"], steps=2)
    got = run_adam(impl, shapes, torch.float32, device, ADAM_CONFIGS["l2"], steps=2)
    for name, a, e in zip(ADAM_NAMES, got, exp):
        assert_lists_close(a, e, name, **TOL[torch.float32])


# --- noise variants (section 2.1) ------------------------------------------------------

def noise_numel(impl):
    # The Triton interpreter is ~1 us per element: 20K there, 256K elsewhere.
    return 20_000 if impl == "triton" and not torch.cuda.is_available() else 1 << 18


def moments_ok(z: torch.Tensor, var: float, fourth: float) -> None:
    """Sample mean, variance and kurtosis of z against the distribution's, within 5
    standard errors (a false alarm about once in 1.7 million runs per check)."""
    n = z.numel()
    mean, m2 = z.mean().item(), z.pow(2).mean().item()
    assert abs(mean) <= 5 * math.sqrt(var / n), f"mean {mean}"
    assert abs(m2 - var) <= 5 * math.sqrt((fourth - var * var) / n), f"variance {m2}, want {var}"
    # Kurtosis separates U(-1,1) (1.8) from N(0,1) (3); its spread is below 0.05 at these n.
    kurt = z.pow(4).mean().item() / (m2 * m2)
    assert abs(kurt - fourth / var ** 2) < 0.15, f"kurtosis {kurt}, want {fourth / var ** 2}"


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("extrapolation", ["gaussian", "uniform"])
def test_elementwise_noise_statistics(impl, device, extrapolation):
    require(impl, device, "extrap_sgd_")
    n = noise_numel(impl)
    a = 0.5
    # x = 0: w = a * z exactly, for a tensor over many chunks and a small one.
    eps = noise_call(impl, device, extrapolation, [torch.zeros(n), torch.zeros(1000)], a=a)
    z = torch.cat([e.flatten() for e in eps]) / a
    if extrapolation == "gaussian":
        moments_ok(z, 1.0, 3.0)
    else:
        assert z.abs().max() < 1
        moments_ok(z, 1 / 3, 1 / 5)


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_weight_noise_is_bounded_by_the_weight(impl, device):
    require(impl, device, "extrap_sgd_")
    n = noise_numel(impl)
    a = 0.5
    x = torch.randn(n, generator=torch.Generator().manual_seed(4)) + 0.1
    (eps,) = noise_call(impl, device, "weight", [x], a=a)
    # |eps| <= a|x|, up to the rounding of w = x + eps (half an ulp of |w| <= 1.5|x|).
    assert torch.all(eps.abs() <= a * x.double().abs() * (1 + 2 ** -22))
    moments_ok(eps / (a * x.double().abs()), 1 / 3, 1 / 5)


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_filter_noise_norms(impl, device):
    """||eps_j|| = a ||x_j|| ||r_j|| / (||r_j|| + 1e-6) for each output filter j."""
    require(impl, device, "extrap_sgd_")
    big = (40, 2000) if impl == "triton" and not torch.cuda.is_available() else (300, 2000)
    shapes = [(64, 3, 5, 5), big, (50,), (), (1, 7)]
    g = torch.Generator().manual_seed(6)
    anchors = [torch.randn(s, generator=g) for s in shapes]
    anchors.append(torch.zeros(4, 9))  # ||x_j|| = 0: no noise at all
    a = 0.5
    eps = noise_call(impl, device, "filter", anchors, a=a)
    zs = []
    for x, e in zip(anchors, eps):
        rows = x.shape[0] if x.dim() >= 2 else 1
        e2, x2 = e.reshape(rows, -1), x.double().reshape(rows, -1)
        got, want = e2.norm(dim=1), a * x2.norm(dim=1)
        if x.numel() == 1:
            # One element: ||r_j|| = |r| ~ U(0, 1) may be small enough for the 1e-6 to show.
            assert 0 < got.item() <= want.item() * (1 + 2e-6)
            continue
        # ||r_j|| ~ sqrt(n/3) >= 1.5 for these filters (n >= 7): the 1e-6 term moves the
        # norm by < 7e-7 relative; recovering eps as w - x in fp32 adds about
        # 2^-24 ||x_j|| / (a ||x_j||) = 1.2e-7 relative: 2e-6 is fp32 precision here.
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
        nz = want > 0
        zs.append((e2[nz] / (a * x2[nz].norm(dim=1, keepdim=True)) * math.sqrt(x2.shape[1])).flatten())
    # The direction is a normalised U(-1, 1) draw: kurtosis 1.8, not a Gaussian's 3.
    z = torch.cat(zs[:2])
    kurt = z.pow(4).mean().item() / z.pow(2).mean().item() ** 2
    assert abs(kurt - 1.8) < 0.15, kurt


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("extrapolation", NOISE)
def test_noise_reproducible_per_seed_and_offset(impl, device, extrapolation):
    require(impl, device, "extrap_sgd_")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3000, generator=g)
    anchors = [x, x.clone(), torch.randn(6, 4, 5, generator=g)]  # two equal tensors
    first = noise_call(impl, device, extrapolation, anchors, seed=5, offset=2)
    again = noise_call(impl, device, extrapolation, anchors, seed=5, offset=2)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for other in (dict(seed=5, offset=3), dict(seed=6, offset=2)):
        diff = noise_call(impl, device, extrapolation, anchors, **other)
        for a, b in zip(first, diff):
            assert (a != b).double().mean() > 0.99, other
    # Equal tensors at different list positions draw different noise.
    assert (first[0] != first[1]).double().mean() > 0.99


# --- Philox4x32-10 and the counter layout of philox.h --------------------------------

def test_philox_known_answers():
    """The known-answer vectors of the Random123 distribution (kat_vectors)."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        assert philox4x32_10(ctr, key) == want


@pytest.mark.parametrize("impl,device", [p for p in BACKENDS if p.values[0] == "native"])
def test_native_noise_follows_the_documented_counter_layout(impl, device):
    """The compiled kernels draw exactly the values the layout in philox.h defines (seed
    and offset above 2^32 exercise the high words), so CPU and CUDA agree."""
    require(impl, device, "extrap_sgd_")
    seed, offset = 0x1234_5678_9ABC, (5 << 32) + 7
    shapes = [(37,), (3, 5)]
    zeros = [torch.zeros(s) for s in shapes]
    uni = noise_call(impl, device, "uniform", zeros, a=1.0, seed=seed, offset=offset)
    gau = noise_call(impl, device, "gaussian", zeros, a=1.0, seed=seed, offset=offset)
    for i, s in enumerate(shapes):
        n = math.prod(s)
        # U(-1, 1) is exact: odd multiples of 2^-24, representable in fp32.
        assert torch.equal(uni[i].flatten(), documented_draw(n, i, seed, offset, False))
        # Box-Muller in fp32 (logf, cosf, 2*pi*b rounded): radius <= 5.7 times an angle
        # error of ~1 ulp of 2*pi (4.8e-7), a few 1e-6 absolute.
        torch.testing.assert_close(gau[i].flatten(), documented_draw(n, i, seed, offset, True),
                                   rtol=0, atol=1e-5)


# --- argument errors ---------------------------------------------------------------------

@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_bad_arguments_name_the_argument_and_change_nothing(impl, device):
    require(impl, device, "extrap_sgd_")
    require(impl, device, "extrap_adam_")
    shapes = [(4, 3), (5,)]
    x = randn(shapes, 0, torch.float32, device)
    params, bufs, grads = [t + 1 for t in x], [torch.zeros_like(t) for t in x], randn(shapes, 1, torch.float32, device)
    ok = dict(params=params, anchors=x, momentum_buffers=bufs, grads=grads, local_grads=[],
              exclude=[False, True], lr=0.1, extrap_lr=0.1, momentum=0.9)
    before = [t.clone() for t in params + x + bufs]
    bad = [
        (dict(extrapolation="sideways"), ValueError, "extrapolation must be one of"),
        (dict(anchors=x[:1]), ValueError, "anchors has 1 entries but params has 2"),
        (dict(grads=grads[:1]), ValueError, "grads has 1 entries"),
        (dict(local_grads=grads[:1]), ValueError, "local_grads has 1 entries"),
        (dict(exclude=[False]), ValueError, "exclude has 1 entries"),
        (dict(momentum_buffers=[]), ValueError, "momentum_buffers has 0 entries"),
        (dict(lr=-0.1), ValueError, "lr must be >= 0"),
        (dict(extrap_lr=-1.0), ValueError, "extrap_lr must be >= 0"),
        (dict(momentum=-0.5), ValueError, "momentum must be >= 0"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
        (dict(noise_scale=-1.0, extrapolation="gaussian"), ValueError, "noise_scale must be >= 0"),
        (dict(offset=-1), ValueError, "offset must be >= 0"),
        (dict(grads=[grads[0], grads[1].double()]), TypeError, r"grads\[1\] has dtype"),
        (dict(anchors=[x[0], x[1][:4]]), ValueError, r"anchors\[1\] has shape"),
        (dict(lr=torch.ones(2, device=device)), ValueError, "lr_tensor must hold exactly one element"),
        (dict(grad_scale=torch.ones(3, device=device)), ValueError, "grad_scale must hold exactly one"),
    ]
    for change, exc, match in bad:
        kw = {**ok, **change}
        args = [kw.pop(k) for k in ("params", "anchors", "momentum_buffers", "grads", "local_grads", "exclude")]
        with pytest.raises(exc, match=match):
            ops.extrap_sgd_(*args, impl=impl, **kw)
        for a, b in zip(params + x + bufs, before):
            assert torch.equal(a, b), change

    m, v = [torch.zeros_like(t) for t in x], [torch.zeros_like(t) for t in x]
    steps = [torch.zeros((), device=device) for _ in x]
    aok = dict(params=params, anchors=x, exp_avgs=m, exp_avg_sqs=v, steps=steps, grads=grads,
               local_grads=[], lr=0.1)
    abad = [
        (dict(steps=steps[:1]), ValueError, "steps has 1 entries"),
        (dict(exp_avgs=m[:1]), ValueError, "exp_avgs has 1 entries"),
        (dict(exp_avg_sqs=[v[0]]), ValueError, "exp_avg_sqs has 1 entries"),
        (dict(steps=[steps[0], torch.zeros((), dtype=torch.float64, device=device)]), TypeError,
         r"steps\[1\] must be a one-element float32 tensor"),
        (dict(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\)"),
        (dict(beta2=-0.1), ValueError, r"beta2 must be in \[0, 1\)"),
        (dict(eps=-1e-8), ValueError, "eps must be >= 0"),
        (dict(lr=-1.0), ValueError, "lr must be >= 0"),
        (dict(extrap_lr=torch.ones(2, device=device)), ValueError, "extrap_lr_tensor must hold"),
    ]
    before = [t.clone() for t in params + x + m + v + steps]
    for change, exc, match in abad:
        kw = {**aok, **change}
        args = [kw.pop(k) for k in ("params", "anchors", "exp_avgs", "exp_avg_sqs", "steps", "grads", "local_grads")]
        with pytest.raises(exc, match=match):
            ops.extrap_adam_(*args, impl=impl, **kw)
        for a, b in zip(params + x + m + v + steps, before):
            assert torch.equal(a, b), change

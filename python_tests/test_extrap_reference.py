"""The extrapolated-SGD reference against the math of docs/algorithms.md section 2 and torch.optim.

The backends are tested against the reference (test_extrap_ops.py); this file tests the
reference itself: against a step-by-step fp64 transcription of sections 2 and 2.2, and
its anchor update against torch.optim.SGD (Nesterov) and torch.optim.Adam.
"""

from __future__ import annotations

import pytest
import torch

from lbkernels.reference import extrap as ref

SHAPES = [(7, 5), (33,), (3, 4, 2)]
STEPS = 6


def _transcribed_sgd(xs, grads_per_step, local_per_step, *, lr, gamma, m, wd, nesterov, lars,
                     tc, eps, clip, exclude):
    """Section 2 as written, one tensor and one step at a time, in fp64."""
    xs = [x.clone() for x in xs]
    bufs = [torch.zeros_like(x) for x in xs]
    ws = [x.clone() for x in xs]
    for gs, gks in zip(grads_per_step, local_per_step):
        for i, x in enumerate(xs):
            g, gk = gs[i], (gks[i] if gks else gs[i])
            d = g + wd * x
            if lars and not exclude[i]:
                n_x, n_g = x.norm().item(), g.norm().item()
                r = tc * n_x / (n_g + wd * n_x + eps) if n_x > 0 and n_g > 0 else 1.0
                if clip:
                    r = min(r / lr, 1.0)
                d = r * d
            if m > 0:
                bufs[i] = m * bufs[i] + d
                u = d + m * bufs[i] if nesterov else bufs[i]
            else:
                u = d
            xs[i] = x - lr * u
            ws[i] = xs[i] - gamma * gk
    return xs, bufs, ws


def _rand_lists(gen, n_steps, dtype=torch.float64):
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(n_steps)]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lars,clip", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_transcription(nesterov, lars, clip, local, momentum):
    gen = torch.Generator().manual_seed(0)
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = _rand_lists(gen, STEPS)
    locals_ = _rand_lists(gen, STEPS) if local else [[] for _ in range(STEPS)]
    hp = dict(lr=0.1, gamma=0.03, m=momentum, wd=1e-2, nesterov=nesterov, lars=lars,
              tc=0.02, eps=1e-8, clip=clip, exclude=[False, True, False])
    want_x, want_buf, want_w = _transcribed_sgd(x0, grads, locals_, **hp)

    params = [x.clone() for x in x0]
    anchors = [x.clone() for x in x0]
    bufs = [torch.zeros_like(x) for x in x0] if momentum else []
    for gs, gks in zip(grads, locals_):
        ref.extrap_sgd_(params, anchors, bufs, gs, gks, hp["exclude"], lr=hp["lr"],
                        extrap_lr=hp["gamma"], momentum=momentum, weight_decay=hp["wd"],
                        nesterov=nesterov, lars=lars, trust_coefficient=hp["tc"], clip=clip)
    # fp64 throughout; only the association order of a few products differs.
    for got, want in [(anchors, want_x), (params, want_w)] + ([(bufs, want_buf)] if momentum else []):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("nesterov", [False, True])
def test_anchor_is_torch_sgd_when_extrap_lr_zero(nesterov):
    gen = torch.Generator().manual_seed(1)
    x0 = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = _rand_lists(gen, STEPS, torch.float32)
    model = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = torch.optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov,
                          foreach=False)
    params = [x.clone() for x in x0]
    anchors = [x.clone() for x in x0]
    bufs = [torch.zeros_like(x) for x in x0]
    for gs in grads:
        for p, g in zip(model, gs):
            p.grad = g.clone()
        opt.step()
        ref.extrap_sgd_(params, anchors, bufs, gs, [], [False] * 3, lr=0.05, extrap_lr=0.0,
                        momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    for p, x, w, b in zip(model, anchors, params, bufs):
        # Same operations in the same order as torch's single-tensor SGD: bitwise equal.
        torch.testing.assert_close(x, p.detach(), rtol=0, atol=0)
        torch.testing.assert_close(w, x, rtol=0, atol=0)
        torch.testing.assert_close(b, opt.state[p]["momentum_buffer"], rtol=0, atol=0)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("local", [False, True])
def test_adam_anchor_is_torch_adam(decoupled, local):
    gen = torch.Generator().manual_seed(2)
    x0 = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = _rand_lists(gen, STEPS, torch.float32)
    locals_ = _rand_lists(gen, STEPS, torch.float32) if local else [[] for _ in range(STEPS)]
    lr, gamma, b1, b2, eps, wd = 1e-2, 3e-3, 0.9, 0.99, 1e-8, 0.05
    model = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = torch.optim.Adam(model, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                           decoupled_weight_decay=decoupled, foreach=False)
    params = [x.clone() for x in x0]
    anchors = [x.clone() for x in x0]
    m = [torch.zeros_like(x) for x in x0]
    v = [torch.zeros_like(x) for x in x0]
    steps = [torch.zeros((), dtype=torch.float32) for _ in x0]
    for t, (gs, gks) in enumerate(zip(grads, locals_), start=1):
        for p, g in zip(model, gs):
            p.grad = g.clone()
        opt.step()
        ref.extrap_adam_(params, anchors, m, v, steps, gs, gks, lr=lr, extrap_lr=gamma, beta1=b1,
                         beta2=b2, eps=eps, weight_decay=wd, decoupled_weight_decay=decoupled)
        for i, p in enumerate(model):
            st = opt.state[p]
            # fp32; the bias corrections are the only values not computed identically
            # (fp64 tensor pow vs Python float pow): a few ulps after 6 steps.
            torch.testing.assert_close(anchors[i], p.detach(), rtol=2e-6, atol=1e-7)
            torch.testing.assert_close(m[i], st["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(v[i], st["exp_avg_sq"], rtol=0, atol=0)
            assert steps[i].item() == st["step"].item() == t
            gk = gks[i] if gks else gs[i]
            v_hat = st["exp_avg_sq"].double() / (1 - b2 ** t)
            want_w = p.detach().double() - gamma * gk.double() / (v_hat.sqrt() + eps)
            torch.testing.assert_close(params[i].double(), want_w, rtol=2e-6, atol=1e-6)


def test_found_inf_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    x0 = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [x + 1 for x in x0]
    anchors = [x.clone() for x in x0]
    bufs = [torch.randn(s, generator=gen) for s in SHAPES]
    before = [t.clone() for t in params + anchors + bufs]
    for extrapolation in ref.EXTRAPOLATIONS:
        ref.extrap_sgd_(params, anchors, bufs, x0, [], [False] * 3, lr=0.1, extrap_lr=0.1,
                        momentum=0.9, extrapolation=extrapolation, noise_scale=0.1,
                        found_inf=torch.ones(()))
    for a, b in zip(params + anchors + bufs, before):
        assert torch.equal(a, b)
    m = [torch.randn(s, generator=gen) for s in SHAPES]
    v = [torch.rand(s, generator=gen) for s in SHAPES]
    steps = [torch.full((), 3.0) for _ in SHAPES]
    before = [t.clone() for t in params + anchors + m + v + steps]
    ref.extrap_adam_(params, anchors, m, v, steps, x0, [], lr=0.1, extrap_lr=0.1,
                     found_inf=torch.ones(()))
    for a, b in zip(params + anchors + m + v + steps, before):
        assert torch.equal(a, b)

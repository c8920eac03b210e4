"""ExtrapSGD / ExtrapAdam in one process: extragradient from the past, gamma, anchors,
resume, local-gradient capture, the noise variants and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import optim_backend_params, through_checkpoint
from lbkernels.optim import ExtrapAdam, ExtrapSGD, lars_param_groups

BACKENDS = optim_backend_params()


def model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device, torch.float64)


def batch(t, device="cpu"):
    g = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    return x.to(device), y.to(device)


def backward(m, t):
    m.zero_grad()
    x, y = batch(t, next(m.parameters()).device)
    nn.functional.cross_entropy(m(x), y).backward()


def train(m, opt, steps, start=0):
    for t in range(start, start + steps):
        backward(m, t)
        opt.step()


CONFIGS = {
    "sgd-nesterov-lars": lambda ps, **kw: ExtrapSGD(ps, lr=0.2, weight_decay=1e-3, lars=True,
                                                    trust_coefficient=0.05, **kw),
    "sgd-gaussian-anneal": lambda ps, **kw: ExtrapSGD(ps, lr=0.2, extrapolation="gaussian", noise_scale=0.01,
                                                      noise_anneal=True, seed=5, **kw),
    "adam": lambda ps, **kw: ExtrapAdam(ps, lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True, **kw),
}


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_one_worker_is_extragradient_from_the_past(impl, device):
    # Popov's rule: w_t = x_t - gamma * grad f(w_{t-1}) (w_0 = x_0), x_{t+1} = x_t - lr * grad f(w_t).
    lr, gamma = 0.3, 0.3
    ref = model(device=device)
    x = [p.detach().clone() for p in ref.parameters()]
    past = [torch.zeros_like(p) for p in x]
    for t in range(6):
        with torch.no_grad():
            for p, xi, gi in zip(ref.parameters(), x, past):
                p.copy_(xi - gamma * gi)
        backward(ref, t)
        past = [p.grad.clone() for p in ref.parameters()]
        x = [xi - lr * gi for xi, gi in zip(x, past)]
    m = model(device=device)
    opt = ExtrapSGD(m.parameters(), lr=lr, momentum=0.0, nesterov=False, impl=impl)
    train(m, opt, 6)
    # fp64; the two differ only in operation order (~1e-16 per op).
    for p, xi in zip(m.parameters(), x):
        torch.testing.assert_close(opt.state[p]["anchor"], xi, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the params hold the next extrapolated point
        for p, xi, gi in zip(m.parameters(), x, past):
            torch.testing.assert_close(p, xi - gamma * gi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_first_step_does_not_extrapolate_and_anchor_is_the_initial_weights(impl, device):
    # Step 0: x = w (the initial weights), no past gradient: the first backward runs at
    # w_0 = x_0. Then x_1 = x_0 - lr * g_0 and w_1 = x_1 - gamma * g_0 (gamma = lr / K, K = 1).
    m = model(device=device)
    w0 = [p.detach().clone() for p in m.parameters()]
    opt = ExtrapSGD(m.parameters(), lr=0.1, momentum=0.0, nesterov=False, impl=impl)
    with opt.anchor_weights():  # not stepped yet: the params are their own anchors
        assert all(torch.equal(p, w) for p, w in zip(m.parameters(), w0))
    backward(m, 0)
    g0 = [p.grad.clone() for p in m.parameters()]
    opt.step()
    # fp64, two roundings per element of values below 1 (ulp <= 2.2e-16): 1e-15 is ~4 ulp.
    for p, w, g in zip(m.parameters(), w0, g0):
        x1 = w - 0.1 * g
        torch.testing.assert_close(opt.state[p]["anchor"], x1, rtol=0, atol=1e-15)
        torch.testing.assert_close(p.detach(), x1 - 0.1 * g, rtol=0, atol=1e-15)
    with opt.anchor_weights():  # the anchors, not the extrapolated point, are the iterate
        for p, w, g in zip(m.parameters(), w0, g0):
            torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=0, atol=1e-15)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_gamma_follows_scheduler_world_size_and_override(impl, device):
    m = model(device=device)
    opt = ExtrapSGD(m.parameters(), lr=0.4, extrap_scale=0.5, world_size=4, impl=impl)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert opt.extrap_lr(opt.param_groups[0]) == 0.5 * 0.4 / 4
    for t in range(2):
        backward(m, t)
        opt.capture_local_grads()
        opt.step()
        lr_used = opt.param_groups[0]["lr"]
        with torch.no_grad():  # w - x = -gamma * g^k with this step's gamma
            for p in m.parameters():
                torch.testing.assert_close(p - opt.state[p]["anchor"], -(0.5 * lr_used / 4) * p.grad,
                                           rtol=1e-9, atol=1e-15)
        sched.step()
    assert opt.extrap_lr(opt.param_groups[0]) == 0.5 * 0.1 / 4
    assert ExtrapSGD(m.parameters(), lr=0.4).extrap_lr(opt.param_groups[0]) == 0.5 * 0.1 / 1
    fixed = ExtrapSGD(m.parameters(), lr=0.4, extrap_lr=0.03, world_size=8)
    assert fixed.extrap_lr(fixed.param_groups[0]) == 0.03
    tensor_lr = ExtrapAdam(m.parameters(), lr=torch.tensor(0.2, dtype=torch.float64), world_size=2)
    gamma = tensor_lr.extrap_lr(tensor_lr.param_groups[0])
    assert isinstance(gamma, torch.Tensor) and gamma.item() == pytest.approx(0.1)


def test_anchor_weights_swaps_and_restores():
    m = model()
    opt = ExtrapSGD(m.parameters(), lr=0.2)
    train(m, opt, 3)
    w = [p.detach().clone() for p in m.parameters()]
    x = [opt.state[p]["anchor"].clone() for p in m.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(w, x))
    with opt.anchor_weights():
        assert all(torch.equal(p, a) for p, a in zip(m.parameters(), x))
        with pytest.raises(RuntimeError, match="inside anchor_weights"):
            opt.step()
        with pytest.raises(RuntimeError, match="already active"):
            with opt.anchor_weights():
                pass
    assert all(torch.equal(p, a) for p, a in zip(m.parameters(), w))
    with pytest.raises(KeyError):
        with opt.anchor_weights():
            with torch.no_grad():
                m[0].weight.zero_()  # discarded on exit
            raise KeyError("evaluation failed")
    assert all(torch.equal(p, a) for p, a in zip(m.parameters(), w))
    assert all(torch.equal(opt.state[p]["anchor"], a) for p, a in zip(m.parameters(), x))
    train(m, opt, 1, start=3)  # stepping works again after the block


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl,device", BACKENDS)
def test_resume_is_bit_exact(name, impl, device):
    make = CONFIGS[name]
    a = model(device=device)
    oa = make(lars_param_groups(a, 1e-3) if "lars" in name else a.parameters(), impl=impl)
    train(a, oa, 10)

    b = model(device=device)
    ob = make(lars_param_groups(b, 1e-3) if "lars" in name else b.parameters(), impl=impl)
    train(b, ob, 5)
    saved = through_checkpoint({"model": b.state_dict(), "opt": ob.state_dict()})
    c = model(seed=1, device=device)
    oc = make(lars_param_groups(c, 1e-3) if "lars" in name else c.parameters(), impl=impl)
    c.load_state_dict(saved["model"])
    oc.load_state_dict(saved["opt"])
    train(c, oc, 5, start=5)

    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    sa, sc = oa.state_dict(), oc.state_dict()
    assert sa.get("extrap") == sc.get("extrap")
    for k in sa["state"]:
        assert sa["state"][k].keys() == sc["state"][k].keys()
        for n in sa["state"][k]:
            assert torch.equal(sa["state"][k][n], sc["state"][k][n]), (k, n)


def test_loads_a_torch_sgd_checkpoint():
    # The anchors start at the loaded weights and the buffers carry on: the next anchor
    # update is torch.optim.SGD's next step.
    a, b = model(), model()
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    train(a, sgd, 3)
    b.load_state_dict(a.state_dict())
    opt = ExtrapSGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt.load_state_dict(copy.deepcopy(sgd.state_dict()))  # as from a file: no shared buffers
    train(a, sgd, 1, start=3)
    train(b, opt, 1, start=3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(opt.state[q]["anchor"], p, rtol=1e-14, atol=1e-15)  # fp64 rounding
    assert opt.state_dict()["extrap"] == {"rng_step": 0}


def test_multi_worker_step_needs_local_gradients():
    m = model()
    opt = ExtrapSGD(m.parameters(), lr=0.1, world_size=2)
    backward(m, 0)
    before = copy.deepcopy(m)
    with pytest.raises(RuntimeError, match=r"K=2 .*attach\(ddp_model\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before.parameters()))
    assert not opt.state
    opt.capture_local_grads(copy=False)
    opt.step()
    with pytest.raises(RuntimeError, match="no local"):  # the capture was consumed
        opt.step()
    opt.zero_grad()
    opt.step()  # no gradients: nothing to step, nothing needed
    # Noise extrapolation and a zero extrapolation rate read no local gradient.
    ExtrapSGD(m.parameters(), lr=0.1, world_size=2, extrapolation="uniform", noise_scale=0.1).step()
    ExtrapSGD(m.parameters(), lr=0.1, world_size=2, extrap_lr=0.0).step()
    ExtrapAdam(m.parameters(), world_size=2, extrap_scale=0.0).step()


def test_captured_local_gradient_is_the_extrapolation_direction():
    m = model()
    opt = ExtrapSGD(m.parameters(), lr=0.1, momentum=0.0, nesterov=False, world_size=1)
    backward(m, 0)
    local = [torch.full_like(p, 0.5) for p in m.parameters()]
    opt.capture_local_grads(list(m.parameters()), local)
    opt.step()
    for p, g in zip(m.parameters(), local):
        torch.testing.assert_close(p, opt.state[p]["anchor"] - 0.1 * g, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        opt.capture_local_grads([m[0].weight], [torch.zeros(3)])
    with pytest.raises(ValueError, match="grads has 1 entries but params has 2"):
        opt.capture_local_grads([m[0].weight, m[0].bias], [m[0].weight.grad])


def test_grad_scaler_unscales_the_captured_local_gradients():
    def run(scaled):
        m = model()
        opt = ExtrapSGD(m.parameters(), lr=0.1, weight_decay=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        for t in range(3):
            m.zero_grad()
            loss = nn.functional.cross_entropy(m(batch(t)[0]), batch(t)[1])
            (scaler.scale(loss) if scaled else loss).backward()
            # a local gradient unlike the (would-be all-reduced) p.grad
            opt.capture_local_grads(list(m.parameters()), [p.grad * 0.5 for p in m.parameters()])
            scaler.step(opt) if scaled else opt.step()
            if scaled:
                scaler.update()
        return m, opt, scaler

    (a, _, _), (b, ob, scaler) = run(False), run(True)
    # Scaling by 2^12 and dividing by it again is exact: bitwise equal.
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    ob.zero_grad()
    scaler.scale(nn.functional.cross_entropy(b(batch(9)[0]), batch(9)[1])).backward()
    ob.capture_local_grads()
    scaler.unscale_(ob)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(ob)


def test_noise_anneals_is_reproducible_and_independent_across_groups():
    p = nn.Parameter(torch.zeros(200, 500))
    q = nn.Parameter(torch.zeros(200, 500))
    opt = ExtrapSGD([{"params": [p]}, {"params": [q]}], lr=0.1, momentum=0.0, nesterov=False,
                    extrapolation="gaussian", noise_scale=0.1, noise_anneal=True, seed=3)
    assert [g["seed"] for g in opt.param_groups] == [3, 4]
    draws = []
    for t in range(4):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)  # x stays 0: w is the noise
        opt.step()
        # 1e5 samples: the std estimate's relative error is ~0.2%; 3% is 10 standard errors,
        # and a wrong exponent (-0.55 for -0.275) is off by 21% at t=1.
        assert p.std().item() == pytest.approx(0.1 * (1 + t) ** (-0.275), rel=0.03)
        assert abs(torch.corrcoef(torch.stack([p.flatten(), q.flatten()]))[0, 1].item()) < 0.02
        draws.append(p.detach().clone())
    assert opt.state_dict()["extrap"] == {"rng_step": 4}
    assert not torch.equal(draws[0], draws[1] * (2 ** 0.275))  # a new draw each step
    p2 = nn.Parameter(torch.zeros(200, 500))
    again = ExtrapSGD([p2], lr=0.1, momentum=0.0, nesterov=False, extrapolation="gaussian",
                      noise_scale=0.1, noise_anneal=True, seed=3)
    for t in range(4):
        p2.grad = torch.zeros_like(p2)
        again.step()
    assert torch.equal(p2, draws[-1])


BAD = [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr=0.1, momentum=0.0), ValueError, "nesterov"),
    (dict(lr=0.1, weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(lr=0.1, extrap_scale=-1.0), ValueError, "extrap_scale"),
    (dict(lr=0.1, extrap_lr=-0.5), ValueError, "extrap_lr"),
    (dict(lr=0.1, world_size=0), ValueError, "world_size"),
    (dict(lr=0.1, world_size=1.5), TypeError, "world_size"),
    (dict(lr=0.1, extrapolation="noise"), ValueError, "extrapolation"),
    (dict(lr=0.1, noise_scale=-0.1), ValueError, "noise_scale"),
    (dict(lr=0.1, noise_anneal=1), TypeError, "noise_anneal"),
    (dict(lr=0.1, seed=-1), ValueError, "seed"),
    (dict(lr=0.1, seed=2**63), ValueError, "seed"),
    (dict(lr=0.1, lars="yes"), TypeError, "lars"),
    (dict(lr=0.1, trust_coefficient=-1.0), ValueError, "trust_coefficient"),
    (dict(lr=0.1, impl="cuda"), ValueError, "impl"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_sgd_arguments_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ExtrapSGD(model().parameters(), **kwargs)


def test_bad_adam_arguments_and_attach_name_the_argument():
    ps = list(model().parameters())
    for kwargs, match in [(dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(betas=0.9), "betas"),
                          (dict(eps=-1.0), "eps"), (dict(lr=float("nan")), "lr"),
                          (dict(decoupled_weight_decay=None), "decoupled_weight_decay")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ExtrapAdam(ps, **kwargs)
    opt = ExtrapSGD(ps, lr=0.1)
    with pytest.raises(ValueError, match="extrap_lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "extrap_lr": -1.0})
    with pytest.raises(TypeError, match="ddp_model"):
        opt.attach(model())

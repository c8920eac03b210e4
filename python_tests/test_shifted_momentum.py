"""ShiftedMomentumSGD on every backend, its round robin, and the asynchronous simulator."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import backend_params
from lbkernels.distributed import AsyncSimulator
from lbkernels.optim import LARS, ShiftedMomentumSGD, lars_param_groups

# 1, a chunk-sized tensor and one past it, an odd prime, empty, 0-dim, 2-D; the Triton
# interpreter gets the small versions.
SHAPES = [(1,), (65536,), (65537,), (7919,), (0,), (), (33, 17)]
SHAPES_INTERPRETED = [(1,), (1024,), (1025,), (127,), (0,), (), (9, 7)]
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-13, atol=1e-13)}
CONFIGS = {
    "lars-nesterov": dict(lr=0.5, momentum=0.9, weight_decay=1e-2, nesterov=True, lars=True,
                          trust_coefficient=0.02),
    "sgd": dict(lr=0.1, momentum=0.8, weight_decay=1e-3),
}


def make_params(shapes, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
            for s in shapes]


def set_grads(params, t):
    g = torch.Generator().manual_seed(1000 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)


def run(params, impl, cfg, delay=2, steps=8, workers=None):
    # Two groups: the first tensors decayed (and adapted), the others excluded, no decay.
    half = len(params) // 2
    opt = ShiftedMomentumSGD([{"params": params[:half]},
                              {"params": params[half:], "weight_decay": 0.0, "lars_exclude": True}],
                             delay=delay, impl=impl, **cfg)
    for t in range(steps):
        set_grads(params, t)
        opt.step(worker=None if workers is None else workers[t])
    return opt


def buffers(opt, params):
    return [opt.state[p][f"momentum_buffer_{k}"] for p in params for k in range(opt.delay + 1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("impl, device", backend_params())
def test_backends_match_reference(impl, device, dtype, cfg):
    interpreted = impl == "triton" and not torch.cuda.is_available()
    shapes = SHAPES_INTERPRETED if interpreted else SHAPES
    got = make_params(shapes, dtype, device)
    want = make_params(shapes, dtype)
    # 8 steps of 3 workers: every buffer past its first step, the round robin wrapped twice.
    opt_got = run(got, impl, CONFIGS[cfg])
    opt_want = run(want, "reference", CONFIGS[cfg])
    for a, e in zip(got + buffers(opt_got, got), want + buffers(opt_want, want)):
        torch.testing.assert_close(a.detach().cpu(), e.detach(), **TOL[dtype])


def test_delay_zero_is_lars_and_sgd():
    # With delay 0 both ShiftedMomentumSGD and LARS must follow the LARS rule, written
    # out in plain torch (manual), not one backend checked against another.
    shapes = [(5, 3), (3,), (7, 5), (7,)]
    cfg = CONFIGS["lars-nesterov"]
    a, b = make_params(shapes, torch.float64), make_params(shapes, torch.float64)
    expected_w, expected_v = manual(a, cfg, delay=0, workers=[0] * 7)
    opt_a = run(a, "reference", cfg, delay=0, steps=7)
    half = len(b) // 2
    lars = LARS([{"params": b[:half]}, {"params": b[half:], "weight_decay": 0.0, "lars_exclude": True}],
                impl="auto", **{k: v for k, v in cfg.items() if k != "lars"})
    for t in range(7):
        set_grads(b, t)
        lars.step()
    for i, e in enumerate(expected_w):
        torch.testing.assert_close(a[i].detach(), e, **TOL[torch.float64])
        torch.testing.assert_close(b[i].detach(), e, **TOL[torch.float64])
        torch.testing.assert_close(opt_a.state[a[i]]["momentum_buffer_0"], expected_v[0][i], **TOL[torch.float64])
        torch.testing.assert_close(lars.state[b[i]]["momentum_buffer"], expected_v[0][i], **TOL[torch.float64])

    c, d = make_params(shapes, torch.float64), make_params(shapes, torch.float64)
    sgd_cfg = CONFIGS["sgd"]
    shifted = ShiftedMomentumSGD(c, delay=0, **sgd_cfg)
    sgd = torch.optim.SGD(d, **sgd_cfg)
    for t in range(7):
        set_grads(c, t), set_grads(d, t)
        shifted.step(), sgd.step()
    for p, q in zip(c, d):
        torch.testing.assert_close(p, q, **TOL[torch.float64])


def manual(params, cfg, delay, workers):
    """The rule in plain fp64 torch, ``k`` the given worker of each step: the first half of
    the tensors decayed (and LARS-scaled when ``cfg["lars"]``), the others not::

        d = r * (g + wd * w);  v_k = m * v_k + d;  w -= lr * (d + m * v_k if nesterov else v_k)
    """
    w = [p.detach().clone() for p in params]
    v = [[torch.zeros_like(p) for p in w] for _ in range(delay + 1)]
    half = len(params) // 2
    m = cfg["momentum"]
    for t, k in enumerate(workers):
        g = torch.Generator().manual_seed(1000 + t)
        for i, p in enumerate(w):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            wd = cfg["weight_decay"] if i < half else 0.0
            d = grad + wd * p
            if cfg.get("lars") and i < half and p.norm() > 0 and grad.norm() > 0:
                d = cfg["trust_coefficient"] * p.norm() / (grad.norm() + wd * p.norm() + 1e-8) * d
            v[k][i] = m * v[k][i] + d
            p -= cfg["lr"] * (d + m * v[k][i] if cfg.get("nesterov") else v[k][i])
    return w, v


@pytest.mark.parametrize("workers", [None, [2, 0, 2, 1, 1, 0, 2]], ids=["round-robin", "explicit"])
def test_buffers_follow_the_workers(workers):
    shapes, delay, cfg = [(4, 3), (3,), (2, 2), (5,)], 2, CONFIGS["sgd"]
    params = make_params(shapes, torch.float64)
    expected_w, expected_v = manual(params, cfg, delay, workers or [t % 3 for t in range(7)])
    opt = run(params, "reference", cfg, delay=delay, steps=7, workers=workers)
    assert opt.next_worker == 7 % 3  # the position counts updates, explicit or not
    for p, e in zip(params, expected_w):
        torch.testing.assert_close(p.detach(), e, **TOL[torch.float64])
    for k in range(delay + 1):
        for p, e in zip(params, expected_v[k]):
            torch.testing.assert_close(opt.state[p][f"momentum_buffer_{k}"], e, **TOL[torch.float64])


def test_state_dict_keeps_the_round_robin_and_rejects_another_delay():
    params = make_params([(3, 2), (2,)], torch.float64)
    opt = run(params, "reference", CONFIGS["sgd"], delay=2, steps=4)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["round_robin"] == {"delay": 2, "position": 4}
    other = run(make_params([(3, 2), (2,)], torch.float64), "reference", CONFIGS["sgd"], delay=2, steps=0)
    other.load_state_dict(saved)
    assert other.next_worker == 1
    wrong = run(make_params([(3, 2), (2,)], torch.float64), "reference", CONFIGS["sgd"], delay=3, steps=0)
    with pytest.raises(ValueError, match="delay=2"):
        wrong.load_state_dict(saved)
    with pytest.raises(ValueError, match="round_robin"):
        wrong.load_state_dict({k: v for k, v in saved.items() if k != "round_robin"})
    assert not wrong.state and wrong.next_worker == 0  # nothing changed


def test_bad_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="delay"):
        ShiftedMomentumSGD(p, lr=0.1, momentum=0.9, delay=-1)
    with pytest.raises(TypeError, match="delay"):
        ShiftedMomentumSGD(p, lr=0.1, momentum=0.9, delay=1.5)
    with pytest.raises(TypeError, match="delay"):
        ShiftedMomentumSGD(p, lr=0.1, momentum=0.9, delay=True)
    with pytest.raises(ValueError, match="lr"):
        ShiftedMomentumSGD(p, lr=-0.1, momentum=0.9, delay=1)
    with pytest.raises(TypeError, match="lars"):
        ShiftedMomentumSGD(p, lr=0.1, momentum=0.9, delay=1, lars="yes")
    with pytest.raises(ValueError, match="nesterov"):
        ShiftedMomentumSGD(p, lr=0.1, momentum=0.0, delay=1, nesterov=True)
    opt = ShiftedMomentumSGD(p, lr=0.1, momentum=0.9, delay=1)
    p[0].grad = torch.ones(2)
    for worker, err in ((2, ValueError), (-1, ValueError), ("0", TypeError), (True, TypeError)):
        with pytest.raises(err, match="worker"):
            opt.step(worker=worker)
    assert torch.equal(p[0], torch.zeros(2)) and opt.next_worker == 0 and not opt.state


# -- AsyncSimulator ---------------------------------------------------------------------------
def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def closure_for(model, opt, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("shifted", [False, True], ids=["sgd", "shifted"])
def test_async_simulator_without_delay_is_plain_training(shifted):
    def make(m):
        if shifted:
            return ShiftedMomentumSGD(lars_param_groups(m, 1e-3), lr=0.1, momentum=0.9, delay=0)
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    a, b = mlp(), mlp()
    opt_a, opt_b = make(a), make(b)
    sim = AsyncSimulator(a, opt_a, delay=0)
    for t in range(6):
        loss = sim.step(closure_for(a, opt_a, t))
        assert torch.equal(loss, opt_b.step(closure_for(b, opt_b, t)))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def quadratic_run(delay, momentum, shifted, steps=12, lr=0.1):
    """AsyncSimulator on f(w) = |w|^2 / 2, where the gradient is the stale weight itself."""
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64))
    opt = (ShiftedMomentumSGD(model.parameters(), lr=lr, momentum=momentum, delay=delay) if shifted
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
    sim = AsyncSimulator(model, opt, delay)

    def closure():
        opt.zero_grad()
        loss = 0.5 * model.weight.square().sum()
        loss.backward()
        return loss

    weights = []
    for _ in range(steps):
        sim.step(closure)
        weights.append(model.weight.detach().clone())
    return weights


@pytest.mark.parametrize("delay", [1, 3])
@pytest.mark.parametrize("shifted", [False, True], ids=["standard", "shifted"])
def test_async_simulator_applies_gradients_delay_steps_stale(delay, shifted):
    lr, m = 0.1, 0.7
    w = [torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)]
    v = [torch.zeros_like(w[0]) for _ in range(delay + 1)]
    for t in range(12):
        g = w[max(t - delay, 0)]  # the weights the worker pulled, w_0 before any update
        k = t % (delay + 1) if shifted else 0
        v[k] = m * v[k] + g
        w.append(w[-1] - lr * v[k])
    got = quadratic_run(delay, m, shifted, lr=lr)
    for t, weight in enumerate(got):
        torch.testing.assert_close(weight, w[t + 1], **TOL[torch.float64])
    assert all(torch.equal(x, y) for x, y in zip(got, quadratic_run(delay, m, shifted, lr=lr)))


def test_async_simulator_resumes_exactly_and_checks_its_optimizer():
    a = mlp()
    opt_a = ShiftedMomentumSGD(a.parameters(), lr=0.05, momentum=0.9, delay=2)
    sim_a = AsyncSimulator(a, opt_a, 2)
    for t in range(4):
        sim_a.step(closure_for(a, opt_a, t))
    b = copy.deepcopy(a)
    opt_b = ShiftedMomentumSGD(b.parameters(), lr=0.05, momentum=0.9, delay=2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a live state_dict shares tensors
    sim_b = AsyncSimulator(b, opt_b, 2)
    sim_b.load_state_dict(sim_a.state_dict())
    for t in range(4, 9):
        sim_a.step(closure_for(a, opt_a, t))
        sim_b.step(closure_for(b, opt_b, t))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="delay"):
        AsyncSimulator(a, opt_a, 1)
    with pytest.raises(ValueError, match="delay"):
        AsyncSimulator(a, opt_a, -1)
    with pytest.raises(TypeError, match="optimizer"):
        AsyncSimulator(a, object(), 2)

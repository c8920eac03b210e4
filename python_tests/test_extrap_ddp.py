"""Extrapolated SGD / extrap-Adam with K workers: the rule of docs/algorithms.md section 2 written
with plain torch ops, against two optimizers in one process and two gloo DDP ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lbkernels.optim import ExtrapAdam, ExtrapSGD

STEPS, BATCH, K = 5, 12, 2
SGD_HP = dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-3, extrap_scale=1.5)
ADAM_HP = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-8, weight_decay=1e-2, decoupled_weight_decay=True,
               extrap_scale=1.0)
LR_DECAY = 0.7  # ExponentialLR: gamma must follow the scheduler


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def batch(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(BATCH, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def shard(t, k, n):
    x, y = batch(t)
    share = BATCH // n
    return x[k * share:(k + 1) * share], y[k * share:(k + 1) * share]


def loss_of(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


def simulate(kind, n):
    """``n`` workers, plain torch: each worker's weights w^k, its local gradient g^k at w^k,
    g = mean_k g^k, the anchor update and w^k = x - gamma * (preconditioned) g^k."""
    workers = [model() for _ in range(n)]
    x = [p.detach().clone() for p in workers[0].parameters()]
    s1 = [torch.zeros_like(t) for t in x]  # momentum buffer, or Adam's m
    s2 = [torch.zeros_like(t) for t in x]  # Adam's v
    lr = SGD_HP["lr"] if kind == "sgd" else ADAM_HP["lr"]
    for t in range(STEPS):
        local = []
        for k, m in enumerate(workers):
            m.zero_grad()
            loss_of(m, *shard(t, k, n)).backward()
            local.append([p.grad.clone() for p in m.parameters()])
        g = [sum(gs) / n for gs in zip(*local)]
        if kind == "sgd":
            mom, wd = SGD_HP["momentum"], SGD_HP["weight_decay"]
            gamma = SGD_HP["extrap_scale"] * lr / n
            for i in range(len(x)):
                d = g[i] + wd * x[i]
                s1[i] = mom * s1[i] + d
                x[i] = x[i] - lr * (d + mom * s1[i])
            precond = [torch.ones_like(xi) for xi in x]
        else:
            (b1, b2), eps, wd = ADAM_HP["betas"], ADAM_HP["eps"], ADAM_HP["weight_decay"]
            gamma = ADAM_HP["extrap_scale"] * lr / n
            precond = []
            for i in range(len(x)):
                x[i] = x[i] * (1 - lr * wd)
                s1[i] = b1 * s1[i] + (1 - b1) * g[i]
                s2[i] = b2 * s2[i] + (1 - b2) * g[i] * g[i]
                denom = (s2[i] / (1 - b2 ** (t + 1))).sqrt() + eps
                x[i] = x[i] - lr / (1 - b1 ** (t + 1)) * s1[i] / denom
                precond.append(1 / denom)
        with torch.no_grad():
            for k, m in enumerate(workers):
                for i, p in enumerate(m.parameters()):
                    p.copy_(x[i] - gamma * local[k][i] * precond[i])
        lr = lr * LR_DECAY
    return x, [[p.detach().clone() for p in m.parameters()] for m in workers]


def make_opt(kind, params, **kw):
    return ExtrapSGD(params, **SGD_HP, **kw) if kind == "sgd" else ExtrapAdam(params, **ADAM_HP, **kw)


def anchors(opt, m):
    return [opt.state[p]["anchor"].clone() for p in m.parameters()]


def assert_close(got, want):
    # fp64. The only differences from the plain-torch rule are operation order and fused
    # multiply-adds (~1e-16 relative per operation over 5 steps); a wrong rule (g instead of
    # g^k, the wrong K, the step-0 extrapolation) moves the weights by ~gamma*|g^k - g|, 1e-3.
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_two_workers_in_one_process_follow_the_rule(kind, impl):
    """Two optimizers with world_size=2: capture_local_grads, then the mean gradient."""
    models = [model() for _ in range(K)]
    opts = [make_opt(kind, m.parameters(), world_size=K, impl=impl) for m in models]
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, LR_DECAY) for o in opts]
    for t in range(STEPS):
        for k, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            loss_of(m, *shard(t, k, K)).backward()
            o.capture_local_grads()
        with torch.no_grad():
            for ps in zip(*(m.parameters() for m in models)):
                mean = sum(p.grad for p in ps) / K
                for p in ps:
                    p.grad.copy_(mean)
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
    x, ws = simulate(kind, K)
    for m, o, w in zip(models, opts, ws):
        assert_close(anchors(o, m), x)
        assert_close(list(m.parameters()), w)
    assert not torch.equal(ws[0][0], ws[1][0])  # the workers' extrapolated points differ


def _ranks(rank: int, world_size: int) -> dict:
    results = {}
    for kind, as_view in (("sgd", False), ("sgd", True), ("adam", False)):
        m = model()
        # ~1 KB buckets: one bucket at the first iteration, several once DDP rebuilds them.
        # As views, p.grad is the bucket itself: the copy must precede the all-reduce.
        ddp = nn.parallel.DistributedDataParallel(m, bucket_cap_mb=0.001, gradient_as_bucket_view=as_view)
        opt = make_opt(kind, m.parameters())
        opt.attach(ddp)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, LR_DECAY)
        calls: list[list[int]] = []
        capture = opt.capture_local_grads

        def counting(params, grads, _capture=capture, _calls=calls):
            _calls[-1].append(len(params))
            _capture(params, grads)

        opt.capture_local_grads = counting
        for t in range(STEPS):
            calls.append([])
            opt.zero_grad()
            loss_of(ddp, *shard(t, rank, world_size)).backward()
            opt.step()
            sched.step()
        results[kind, as_view] = (anchors(opt, m), [p.detach().clone() for p in m.parameters()], calls,
                                  opt.resolved_world_size())
    # DDP without the hook: the gradients are averaged, no g^k was captured.
    m = model()
    ddp = nn.parallel.DistributedDataParallel(m)
    opt = make_opt("sgd", m.parameters())
    loss_of(ddp, *shard(0, rank, world_size)).backward()
    before = [p.detach().clone() for p in m.parameters()]
    try:
        opt.step()
        results["no_hook"] = None
    except RuntimeError as e:
        results["no_hook"] = (str(e), all(torch.equal(p, q) for p, q in zip(m.parameters(), before)),
                              dict(opt.state))
    return results


@pytest.mark.distributed
def test_two_gloo_ranks_follow_the_rule(gloo):
    runs = gloo(K).run(_ranks)
    n_params = len(list(model().parameters()))
    for kind, as_view in (("sgd", False), ("sgd", True), ("adam", False)):
        x, ws = simulate(kind, K)
        for rank in range(K):
            got_x, got_w, calls, world = runs[rank][kind, as_view]
            assert world == K
            assert_close(got_x, x)
            assert_close(got_w, ws[rank])
            # The hook saw every parameter at every step, through DDP's rebuilt buckets:
            # one bucket at step 0, several afterwards.
            assert all(sum(c) == n_params for c in calls)
            assert len(calls[0]) == 1 and all(len(c) >= 2 for c in calls[1:])
    for rank in range(K):
        message, unchanged, state = runs[rank]["no_hook"]
        assert "attach" in message and "K=2" in message
        assert unchanged and not state

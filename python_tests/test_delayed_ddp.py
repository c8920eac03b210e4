"""Delayed-gradient data parallelism: the single-process rule, and two gloo ranks against it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lbkernels.distributed import AsyncSimulator, DelayedGradients, delayed_allreduce_hook
from lbkernels.optim import ShiftedMomentumSGD, lars_param_groups
from lbkernels.schedules import delay_scaled_lr

DELAY, STEPS, BATCH = 2, 10, 12


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def optimizer(m, delay=DELAY):
    return ShiftedMomentumSGD(lars_param_groups(m, 1e-3), lr=delay_scaled_lr(0.5, delay), momentum=0.9,
                              delay=delay, lars=True, trust_coefficient=0.05)


def batch(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(BATCH, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def loss_of(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


def single_process(steps, delay=DELAY):
    """The rule in one process: every step's gradient queued, applied ``delay`` steps later."""
    m = model()
    opt, delayed = optimizer(m, delay), DelayedGradients(delay)
    applied = []
    for t in range(steps):
        opt.zero_grad()
        loss_of(m, *batch(t)).backward()
        delayed.record(m.parameters())
        applied.append(delayed.step(opt))
    return m, applied


@pytest.mark.parametrize("delay", [0, 1, 3])
def test_delayed_queue_is_the_asynchronous_simulation(delay):
    # Update u applies the gradient of batch u taken on w_{u-delay}: AsyncSimulator's rule.
    m, applied = single_process(STEPS, delay)
    assert applied == [t >= delay for t in range(STEPS)]
    ref = model()
    opt = optimizer(ref, delay)
    sim = AsyncSimulator(ref, opt, delay)
    for u in range(STEPS - delay):
        x, y = batch(u)

        def closure():
            opt.zero_grad()
            loss = loss_of(ref, x, y)
            loss.backward()
            return loss

        sim.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))


def test_first_steps_apply_nothing_and_bad_use_is_refused():
    m = model()
    before = [p.clone() for p in m.parameters()]
    opt, delayed = optimizer(m), DelayedGradients(DELAY)
    for t in range(DELAY):
        loss_of(m, *batch(t)).backward()
        delayed.record(m.parameters())
        assert delayed.step(opt) is False
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    loss_of(m, *batch(9)).backward()
    delayed.record(m.parameters())
    with pytest.raises(RuntimeError, match="second backward"):
        delayed.record(m.parameters())
    with pytest.raises(ValueError, match="delay"):
        delayed.step(optimizer(m, DELAY + 1))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="delay"):
            DelayedGradients(bad)


def _ranks(rank: int, world_size: int) -> list:
    results = []
    for as_view in (False, True):
        m = model()
        # ~1 KB buckets: several of them, rebuilt by DDP after the first iteration.
        ddp = nn.parallel.DistributedDataParallel(m, bucket_cap_mb=0.001, gradient_as_bucket_view=as_view)
        delayed = DelayedGradients(DELAY)
        ddp.register_comm_hook(delayed, delayed_allreduce_hook)
        opt = optimizer(m)
        applied = []
        for t in range(STEPS):
            x, y = batch(t)
            share = BATCH // world_size
            opt.zero_grad()
            loss_of(ddp, x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]).backward()
            applied.append(delayed.step(opt))
        delayed.drain()
        results.append(([p.detach().clone() for p in m.parameters()], applied))
    return results


@pytest.mark.distributed
def test_two_ranks_equal_the_single_process_rule(gloo):
    runs = gloo(2).run(_ranks)
    expected, applied = single_process(STEPS)
    for rank in range(2):
        for params, got_applied in runs[rank]:
            assert got_applied == applied
            for p, e in zip(params, expected.parameters()):
                # fp64; the only difference is the order of the batch mean (two halves averaged).
                torch.testing.assert_close(p, e.detach(), rtol=1e-12, atol=1e-13)

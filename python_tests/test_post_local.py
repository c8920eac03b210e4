"""PostLocalSGD: against torch's PostLocalSGDOptimizer on two gloo ranks, its step count in
checkpoints, and its argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lbkernels.distributed import PostLocalSGD

SWITCH, PERIOD, STEPS, BATCH = 3, 2, 9, 12


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)


def batch(t, rank):
    # Each rank its own data: local steps then move the ranks apart.
    g = torch.Generator().manual_seed(100 * t + rank)
    return torch.randn(BATCH, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _train(rank: int, kind: str) -> list[list[torch.Tensor]]:
    m = model()
    # ~1 KB buckets: several per step, so the hook's phase must hold for every bucket.
    ddp = nn.parallel.DistributedDataParallel(m, bucket_cap_mb=0.001)
    if kind == "torch":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState, post_localSGD_hook)
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        ddp.register_comm_hook(PostLocalSGDState(None, None, SWITCH, post_local_gradient_allreduce=False),
                               post_localSGD_hook)
        opt = PostLocalSGDOptimizer(sgd(m), PeriodicModelAverager(period=PERIOD, warmup_steps=SWITCH))
    else:
        opt = PostLocalSGD(sgd(m), switch_step=SWITCH, period=PERIOD)
        opt.attach(ddp)
    trajectory = []
    for t in range(STEPS):
        opt.zero_grad()
        x, y = batch(t, rank)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in m.parameters()])
    if kind == "lbkernels":
        assert opt.state_dict()["post_local_step"] == STEPS
    return trajectory


def _ranks(rank: int, world_size: int) -> dict:
    return {kind: _train(rank, kind) for kind in ("torch", "lbkernels")}


@pytest.mark.distributed
def test_two_ranks_follow_torch_post_local_sgd(gloo):
    runs = gloo(2).run(_ranks)
    for rank in range(2):
        for t, (ours, ref) in enumerate(zip(runs[rank]["lbkernels"], runs[rank]["torch"])):
            # Bitwise in fp64: the same gradient hook (torch's allreduce_hook) before the
            # switch and the same SGD; torch averages as sum(w_k / 2), lbkernels as
            # sum(w_k) / 2, and halving is exact in binary floating point, so the two
            # agree to the last bit (a tolerance would hide a misplaced average).
            for p, q in zip(ours, ref):
                assert torch.equal(p, q), (rank, t)
    averaged = {t for t in range(SWITCH, STEPS) if (t - SWITCH) % PERIOD == 0}
    assert averaged == {3, 5, 7}
    for t in range(STEPS):
        same = all(torch.equal(p, q) for p, q in zip(runs[0]["lbkernels"][t], runs[1]["lbkernels"][t]))
        # All-reduced gradients before the switch, an average at 3, 5, 7; local steps
        # on different data in between move the ranks apart.
        assert same == (t < SWITCH or t in averaged), t
    # The local steps moved the weights on (not a frozen model that is trivially equal).
    assert not torch.equal(runs[0]["lbkernels"][SWITCH][0], runs[0]["lbkernels"][STEPS - 1][0])


def test_one_process_is_the_wrapped_optimizer_and_works_with_schedulers():
    # No process group: nothing to average, the steps are the wrapped optimizer's.
    m, ref = model(), model()
    opt, ref_opt = PostLocalSGD(sgd(m), switch_step=1, period=2), sgd(ref)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    for t in range(4):
        for o, net in ((opt, m), (ref_opt, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(net(batch(t, 0)[0]), batch(t, 0)[1]).backward()
            o.step()
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(0.2 / 5)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))
    assert opt.step_count == 4 and opt.local


def test_state_dict_carries_the_step_count():
    m = model()
    opt = PostLocalSGD(sgd(m), switch_step=5, period=3)
    for t in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(batch(t, 0)[0]), batch(t, 0)[1]).backward()
        opt.step()
    state = opt.state_dict()
    assert state["post_local_step"] == 3 and state["state"]  # momentum buffers included
    fresh = PostLocalSGD(sgd(model()), switch_step=5, period=3)
    assert fresh.step_count == 0 and not fresh.local  # before the load: step 0 of phase 1
    fresh.load_state_dict(state)
    assert fresh.step_count == 3 and not fresh.local
    # The wrapper's groups are the loaded ones (load_state_dict replaces the inner list).
    assert fresh.param_groups is fresh.optimizer.param_groups
    for p in state["state"]:
        assert torch.equal(fresh.state_dict()["state"][p]["momentum_buffer"],
                           state["state"][p]["momentum_buffer"])
    # Refused before anything is loaded: a new wrapper keeps its count and the wrapped
    # optimizer its empty state and its own hyper-parameters.
    del state["post_local_step"]
    state["param_groups"][0]["lr"] = 0.05
    other = PostLocalSGD(sgd(model()), switch_step=5, period=3)
    with pytest.raises(ValueError, match="post_local_step"):
        other.load_state_dict(state)
    assert other.step_count == 0 and not other.state and other.param_groups[0]["lr"] == 0.2


@pytest.mark.parametrize("kwargs, match", [
    ({"switch_step": -1, "period": 2}, "switch_step must be >= 0"),
    ({"switch_step": 1.5, "period": 2}, "switch_step must be an integer"),
    ({"switch_step": 0, "period": 0}, "period must be >= 1"),
    ({"switch_step": 0, "period": True}, "period must be an integer"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostLocalSGD(sgd(model()), **kwargs)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        PostLocalSGD(model().parameters(), 0, 1)

"""||g|| from DDP's averaging pass (lbkernels.distributed.grad_norms) on two gloo ranks: the
step with the hook's norms equals the step with DDP's default averaging, the norms handed
to lars_sgd_ are the averaged gradients' ||g||^2, and a norm made stale by an in-place
edit of the grads between backward and step is not used."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lbkernels import _library, ops
from lbkernels.distributed import grad_norms
from lbkernels.optim import LARS, lars_param_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.grad_norms import HookAveraging  # noqa: E402
from bench.params import make_params  # noqa: E402

STEPS, BATCH = 5, 16
HP = dict(lr=0.5, momentum=0.9, nesterov=True, trust_coefficient=0.02)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def shard(t, rank, world):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(BATCH, 5, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
    share = BATCH // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def spy_lars(calls: list):
    """Wraps ops.lars_sgd_ to record the norm_sq each call gets (a copy, or None)."""
    real = ops.lars_sgd_

    def spy(params, grads, *args, **kw):
        ns = kw.get("norm_sq")
        calls.append((ns.clone() if ns is not None else None,
                      [g.double().square().sum().item() for g in grads]))
        return real(params, grads, *args, **kw)

    return real, spy


def run(rank, world, hook: bool, edit=None, amp: str | None = None):
    """STEPS LARS steps under DDP (~1 KB buckets: several once DDP rebuilds them), with the
    grad-norm hook or DDP's default averaging; ``edit(params)`` runs between backward and
    step; ``amp``: a GradScaler steps (``"step"``), after ``unscale_`` (``"unscale"``).
    Returns weights, momentum buffers and the recorded lars_sgd_ calls."""
    m = model()
    ddp = nn.parallel.DistributedDataParallel(m, bucket_cap_mb=0.001, gradient_as_bucket_view=True)
    opt = LARS(lars_param_groups(m, weight_decay=1e-3), **HP)
    if hook:
        grad_norms.attach(ddp, opt)
    scaler = None if amp is None else torch.amp.GradScaler("cpu", init_scale=1024.0)
    calls: list = []
    real, spy = spy_lars(calls)
    ops.lars_sgd_ = spy  # the optimizer calls ops.lars_sgd_ through the module
    try:
        for t in range(STEPS):
            x, y = shard(t, rank, world)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if amp == "unscale":
                scaler.unscale_(opt)
            if edit is not None:
                edit(list(m.parameters()))
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
    finally:
        ops.lars_sgd_ = real
    return ([p.detach().clone() for p in m.parameters()],
            [opt.state[p]["momentum_buffer"].clone() for p in m.parameters()], calls)


def _same_steps(rank, world):
    return {"default": run(rank, world, hook=False), "hook": run(rank, world, hook=True)}


@pytest.mark.distributed
def test_hook_norms_match_default_averaging(gloo):
    for res in gloo(2).run(_same_steps):
        w_def, b_def, calls_def = res["default"]
        w_hook, b_hook, calls_hook = res["hook"]
        # Sum-then-divide by 2 equals divide-then-sum bit for bit (halving is exact), so
        # the grads are the same; only ||g|| is summed in another order (the hook's fp32
        # lanes per bucket segment vs the step's own pass): trust ratios differ by fp32
        # rounding. Measured: weights and buffers within 3.0e-8 absolute (one
        # ulp; larger relative only on entries near 0) after 5 steps.
        for a, b in zip(w_hook + b_hook, w_def + b_def):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert all(ns is None for ns, _ in calls_def)
        adapted = [(ns, sums) for ns, sums in calls_hook if ns is not None]
        # Every step's adapted bucket got the hook's norms (the bias bucket adapts not).
        assert len(adapted) == STEPS
        for ns, sums in adapted:
            assert (ns[0] == -1).all()  # ||w|| is left to the op
            # The norms handed over are the averaged grads' ||g||^2 (fp32 lanes vs fp64).
            torch.testing.assert_close(ns[1], torch.tensor(sums, dtype=torch.float64),
                                       rtol=8192 * 2.0**-24, atol=0.0)


def _clip(params):
    torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)


def _edit_one(params):
    params[0].grad.mul_(3.0)


CASES = {"clip": dict(edit=_clip), "edit": dict(edit=_edit_one), "unscale": dict(amp="unscale"),
         "amp": dict(amp="step")}


def _stale_steps(rank, world):
    return {name: {"default": run(rank, world, hook=False, **kw), "hook": run(rank, world, hook=True, **kw)}
            for name, kw in CASES.items()}


@pytest.mark.distributed
def test_stale_norms_are_recomputed(gloo):
    for res in gloo(2).run(_stale_steps):
        for name in CASES:
            w_def, b_def, _ = res[name]["default"]
            w_hook, b_hook, calls = res[name]["hook"]
            # With the pre-edit norms the trust ratios would be off by the edit's factor
            # (1000x for the clip, 3x for the edited weight, the loss scale 1024 after
            # unscale_): far outside this bound.
            for a, b in zip(w_hook + b_hook, w_def + b_def):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            given = [ns for ns, _ in calls if ns is not None]
            # unscale_ bumps no version counter: told apart by the step's arguments.
            # A GradScaler step alone writes no grad: the norms (still scaled) are used.
            if name == "unscale":
                assert not given
            if name == "amp":
                assert len(given) == STEPS and all((ns[1] >= 0).all() for ns in given)
            for ns, sums in calls:
                if ns is None:
                    continue
                # The clip wrote every bucket: nothing fresh is left. The edit wrote the
                # first weight's bucket: that weight (position 0 of the adapted bucket)
                # is computed by the op, and whatever is given is the grads' norm.
                if name == "clip":
                    assert (ns[1] == -1).all()
                elif name == "edit":
                    assert ns[1, 0] == -1
                given = ns[1] >= 0
                torch.testing.assert_close(ns[1][given], torch.tensor(sums, dtype=torch.float64)[given],
                                           rtol=8192 * 2.0**-24, atol=0.0)


def test_hook_op_and_step_allocate_nothing_after_the_first():
    """The hook's layout and op over flat buckets, then the step given the norms (what
    bench.grad_norms times, through GradNorms' own code): 0 bytes once the first step
    has made the layouts, index tensors and norm_sq."""
    if not _library.has_native_kernel("mean_sum_squares_", "cpu"):
        pytest.skip("compiled kernels not loaded (the reference allocates by design)")
    work = HookAveraging(make_params([(256, 256)] * 6 + [(300,)] * 40 + [(70000,)]))
    work.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work.step()
    assert sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0) == 0
    adapted = next(iter(work.opt._buckets.values()))[1][0]  # group 0: the weights, adapted
    assert adapted.norm_sq is not None and (adapted.norm_sq[1] >= 0).all()


def test_fills_stay_bounded_when_bucket_lists_keep_changing():
    """An optimizer rebuilds its bucket lists when the set of params with grads changes:
    GradNorms keeps at most _MAX_FILLS of their fills (and the lists they hold), and
    a list seen again after its fill was dropped gets the same norms."""
    work = HookAveraging(make_params([(16, 8)] * 3 + [(5,)]))
    for b in work.buckets:
        work.norms.reduced(b.index(), work.norms.layout(b), b.buffer(), 1)
    params = work.buckets[0].parameters()
    grads = [p.grad for p in params]
    first = list(params)
    expected = work.norms.norm_sq(first, grads, True, None, None).clone()
    assert (expected[1] >= 0).all()
    for _ in range(3 * grad_norms._MAX_FILLS):
        assert torch.equal(work.norms.norm_sq(list(params), grads, True, None, None), expected)
    assert len(work.norms._fills) == grad_norms._MAX_FILLS
    assert torch.equal(work.norms.norm_sq(first, grads, True, None, None), expected)

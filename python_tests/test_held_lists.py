"""LARS buckets that hold their lists in C++ (lbkernels.HeldLists, docs/algorithms.md
section 1.2): the held step is the list step, bit for bit, on weights and all state; it
falls back to the list step whenever a grad is missing or wrong, writes nothing before
every check passed, and keeps no grad alive after the step."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from lbkernels import _library, ops
from lbkernels.optim import LARS, WeightAverager
from helpers import assert_same

pytestmark = pytest.mark.skipif(
    "lars_sgd_held_" not in _library.HELD_OPS, reason="compiled library not loaded")

SHAPES = [(16, 8), (300,), (7, 3, 3), (70000,), (5,)]


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def set_grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def make(ps, held: bool, **hp):
    groups = [{"params": ps[:3], "weight_decay": 1e-4},
              {"params": ps[3:], "weight_decay": 0.0, "lars_exclude": True}]
    opt = LARS(groups, lr=0.5, momentum=0.9, impl="native", **hp)
    opt._holds_lists = held
    return opt


@pytest.fixture
def held_calls(monkeypatch):
    """How many times the held op ran."""
    calls = []
    original = ops.lars_sgd_held_

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "lars_sgd_held_", spy)
    return calls


def state_of(opt, ps):
    return [t for p in ps for t in opt.state[p].values() if isinstance(t, torch.Tensor)]


def step_both(a, oa, b, ob, steps):
    """Steps both optimizers on the same grads; weights and state agree after each step."""
    for step in steps:
        set_grads(a, step)
        set_grads(b, step)
        oa.step()
        ob.step()
        assert_same(a, b)
        assert_same(state_of(oa, a), state_of(ob, b))


@pytest.mark.parametrize("hp", [dict(), dict(reuse_norms=False), dict(nesterov=True),
                                dict(dampening=0.1), dict(momentum_style="paper", clip=True)],
                         ids=["default", "no-cache", "nesterov", "dampening", "paper-clip"])
def test_held_step_is_the_list_step_bitwise(hp, held_calls):
    a, b = params(), params()
    oa, ob = make(a, True, **hp), make(b, False, **hp)
    step_both(a, oa, b, ob, range(5))
    assert len(held_calls) == 2 * 4  # two groups; every step after the first is held
    assert all(bucket.held is None for _, bs, _ in ob._buckets.values() for bucket in bs)


def test_tensor_lr_grad_scaler_arguments_and_folded_averaging(held_calls):
    a, b = params(), params()
    lr_a, lr_b = torch.tensor(0.5), torch.tensor(0.5)
    oa = LARS(a, lr=lr_a, momentum=0.9, weight_decay=1e-4, impl="native")
    ob = LARS(b, lr=lr_b, momentum=0.9, weight_decay=1e-4, impl="native")
    ob._holds_lists = False
    avg_a = WeightAverager(a, mode="swa", fused_with=oa, impl="native")
    avg_b = WeightAverager(b, mode="swa", fused_with=ob, impl="native")
    for step in range(4):
        set_grads(a, step)
        set_grads(b, step)
        scale = torch.tensor(2.0 ** step)
        inf = torch.tensor(1.0 if step == 2 else 0.0)  # step 2 is skipped on both
        for opt in (oa, ob):
            opt.grad_scale, opt.found_inf = scale, inf
        oa.step()
        ob.step()
        lr_a.mul_(0.9)
        lr_b.mul_(0.9)
    assert_same(a, b)
    assert_same(state_of(oa, a), state_of(ob, b))
    assert_same(avg_a.averages, avg_b.averages)
    assert len(held_calls) == 3


def test_missing_grad_steps_through_the_lists(held_calls):
    """A param without a grad is skipped, as torch.optim skips it: the held bucket (every
    param of its group) cannot serve that step, the list step does."""
    a, b = params(), params()
    oa, ob = make(a, True), make(b, False)
    for step in range(4):
        set_grads(a, step)
        set_grads(b, step)
        if step == 2:
            a[1].grad = b[1].grad = None
        oa.step()
        ob.step()
    assert_same(a, b)
    assert_same(state_of(oa, a), state_of(ob, b))
    # Step 1 held (both groups). Step 2 went through the lists, and its group 0 bucket
    # (two params) replaced the full one in the cache; step 3 rebuilt the full bucket
    # through the lists too, and holds it for the steps after.
    assert len(held_calls) == 2


def test_bad_grad_is_refused_by_the_list_step_and_nothing_changes(held_calls):
    ps = params()
    opt = make(ps, True)
    set_grads(ps, 0)
    opt.step()
    set_grads(ps, 1)
    # A sparse grad in group 1: group 0 would be held, and written first, were the
    # checks not all made before.
    ps[4].grad = ps[4].grad.to_sparse()
    before = [p.detach().clone() for p in ps]
    state = [t.clone() for t in state_of(opt, ps)]
    with pytest.raises((TypeError, ValueError), match="sparse"):
        opt.step()
    assert_same(ps, before)
    assert_same(state_of(opt, ps), state)
    assert held_calls == []


def test_no_grad_is_kept_alive_after_a_step():
    ps = params()
    opt = make(ps, True)
    for step in range(3):
        set_grads(ps, step)
        opt.step()
    refs = [weakref.ref(p.grad) for p in ps]
    for p in ps:
        p.grad = None
    gc.collect()
    assert all(r() is None for r in refs)


def test_held_op_refuses_a_call_without_gathered_grads():
    ps = params()
    for p in ps:
        p.grad = torch.ones_like(p)
    held = _library.held_lists(ps, [[torch.zeros_like(p) for p in ps], []])
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="lars_sgd_held_: gather_grads"):
        ops.lars_sgd_held_(held, False, lr=0.1, momentum=0.9)
    assert_same(ps, before)
    ps[2].grad = None
    assert not held.gather_grads()
    ps[2].grad = torch.ones_like(ps[2]).to_sparse()
    assert not held.gather_grads()
    ps[2].grad = torch.ones_like(ps[2])
    assert held.gather_grads()
    with pytest.raises(ValueError, match="reference|native"):
        ops.lars_sgd_held_(held, False, lr=0.1, impl="reference")
    with pytest.raises(ValueError, match="list 0 has 1 tensors for 5 params"):
        _library.held_lists(ps, [[ps[0]]])


def test_loaded_state_is_held_anew(held_calls):
    a, b = params(), params()
    oa, ob = make(a, True), make(b, False)
    step_both(a, oa, b, ob, range(2))
    saved = ob.state_dict()
    oa.load_state_dict(copy.deepcopy(saved))  # torch may load the very tensors given
    ob.load_state_dict(copy.deepcopy(saved))
    step_both(a, oa, b, ob, range(2, 5))
    assert len(held_calls) == 2 * (1 + 2)  # not the first step after each load


def test_scheduled_lr_steps_held_and_a_changed_impl_steps_through_the_lists(held_calls):
    """A scheduler changes lr every step (the group is re-checked, the held lists stay);
    a group switched to the reference kernel after its lists were held steps through
    them with that kernel, as the list path would."""
    a, b = params(), params()
    oa, ob = make(a, True), make(b, False)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=1, gamma=0.7)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=1, gamma=0.7)
    for step in range(4):
        step_both(a, oa, b, ob, [step])
        sa.step()
        sb.step()
    assert len(held_calls) == 2 * 3
    for opt in (oa, ob):
        opt.param_groups[0]["impl"] = "reference"
    step_both(a, oa, b, ob, range(4, 6))
    assert len(held_calls) == 2 * 3  # a step is held whole or not at all


def test_held_op_refuses_a_held_lists_with_another_count_of_lists():
    """lars_sgd_ takes two lists after params and grads (momentum buffers, steps): a
    HeldLists with none is refused by name before anything is written."""
    ps = params()
    for p in ps:
        p.grad = torch.ones_like(p)
    held = _library.held_lists(ps, [])
    assert held.gather_grads()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="lars_sgd_held_: the HeldLists holds 0 lists"):
        ops.lars_sgd_held_(held, False, lr=0.1)
    assert_same(ps, before)

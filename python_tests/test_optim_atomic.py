"""A refused step, a refused load or a refused hyper-parameter changes nothing: every
optimizer validates everything before its first write."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lbkernels.optim import LARS, ExtrapAdam, ExtrapSGD, ShiftedMomentumSGD, WeightAverager
from helpers import OPTIMIZERS, model, optim_backend_params, train

each_optimizer = pytest.mark.parametrize("entry", OPTIMIZERS, ids=[e.name for e in OPTIMIZERS])
each_backend = pytest.mark.parametrize("impl,device", optim_backend_params())


def assert_same(a, b, where="state"):
    """``a`` and ``b`` (nested dicts, lists, tensors, numbers) are equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


def snapshot(m, opt, averager=None):
    return copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict(),
                          "avg": averager.state_dict() if averager else None})


def two_groups(entry, m, **kw):
    ps = list(m.parameters())
    return entry.make([{"params": ps[:2]}, {"params": ps[2:], **entry.group_overrides}], **kw)


def fused_averager(m, opt):
    return WeightAverager(m, fused_with=opt) if isinstance(opt, (LARS, ShiftedMomentumSGD)) else None


def backward(m, t=7):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(t)).to(next(m.parameters()).device)
    m.zero_grad()
    m(x).square().mean().backward()


# -- a bad gradient in a later group ---------------------------------------------------------
def _wrong_shape(p):
    p.grad.data = torch.zeros(p.numel() + 1, device=p.device)  # what p.grad = ... refuses, .data lets through


def _sparse(p):
    p.grad = p.grad.to_sparse()


def _wrong_dtype(p):
    p.grad.data = p.grad.data.double()


BAD_GRADS = {"shape": _wrong_shape, "sparse": _sparse, "dtype": _wrong_dtype}


@each_optimizer
@each_backend
@pytest.mark.parametrize("bad", list(BAD_GRADS))
@pytest.mark.parametrize("steps_before", [0, 2], ids=["first-step", "later-step"])
@pytest.mark.parametrize("group", [0, 1], ids=["first-group", "second-group"])
def test_a_bad_grad_changes_nothing(entry, impl, device, bad, steps_before, group):
    m = model(device=device)
    opt = two_groups(entry, m, impl=impl)
    avg = fused_averager(m, opt)
    train(m, opt, steps_before)
    backward(m)
    BAD_GRADS[bad](opt.param_groups[group]["params"][0])
    before = snapshot(m, opt, avg)
    # (the first group's own op may be the one that refuses it, without the group's name)
    with pytest.raises((ValueError, TypeError), match=r"grads\[0\]"):
        opt.step()
    assert_same(snapshot(m, opt, avg), before)


# -- hyper-parameters ------------------------------------------------------------------------
CLASSES = {
    "LARS": lambda ps, **kw: LARS(ps, **{"lr": 0.1, "momentum": 0.9, **kw}),
    "ShiftedMomentumSGD": lambda ps, **kw: ShiftedMomentumSGD(ps, **{"lr": 0.1, "momentum": 0.9, "delay": 1, **kw}),
    "ExtrapSGD": lambda ps, **kw: ExtrapSGD(ps, **{"lr": 0.1, **kw}),
    "ExtrapAdam": lambda ps, **kw: ExtrapAdam(ps, **{"lr": 0.1, **kw}),
}
INF, NAN = float("inf"), float("nan")
BAD_VALUES = [
    ("LARS", {"trust_coefficient": 0.0}, ValueError, "trust_coefficient"),
    ("LARS", {"lr": INF}, ValueError, "lr"),
    ("LARS", {"eps": INF}, ValueError, "eps"),
    ("LARS", {"lr": torch.tensor(INF)}, ValueError, "lr"),
    ("LARS", {"lr": torch.tensor([0.1, 0.2])}, ValueError, "lr"),
    ("LARS", {"momentum": torch.tensor(0.9)}, TypeError, "momentum"),
    ("LARS", {"nesterov": "yes"}, TypeError, "nesterov"),
    ("LARS", {"clip": 1}, TypeError, "clip"),
    ("LARS", {"lars_exclude": "no"}, TypeError, "lars_exclude"),
    ("ShiftedMomentumSGD", {"trust_coefficient": 0.0, "lars": True}, ValueError, "trust_coefficient"),
    ("ShiftedMomentumSGD", {"weight_decay": INF}, ValueError, "weight_decay"),
    ("ExtrapSGD", {"lr": INF}, ValueError, "lr"),
    ("ExtrapSGD", {"noise_scale": INF, "extrapolation": "gaussian"}, ValueError, "noise_scale"),
    ("ExtrapSGD", {"extrap_lr": NAN}, ValueError, "extrap_lr"),
    ("ExtrapSGD", {"trust_coefficient": 0.0, "lars": True}, ValueError, "trust_coefficient"),
    ("ExtrapAdam", {"lr": INF}, ValueError, "lr"),
    ("ExtrapAdam", {"betas": (0.9, NAN)}, ValueError, "betas"),
]


@pytest.mark.parametrize("cls, kwargs, exc, name", BAD_VALUES,
                         ids=[f"{c}-{next(iter(k))}-{i}" for i, (c, k, _, _) in enumerate(BAD_VALUES)])
def test_values_no_user_means_are_refused(cls, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        CLASSES[cls](model().parameters(), **kwargs)


EDITS = [("lr", -1.0, ValueError), ("lr", NAN, ValueError), ("lr", INF, ValueError),
         ("weight_decay", -1e-4, ValueError), ("lr", "fast", TypeError)]


@each_optimizer
@each_backend
@pytest.mark.parametrize("name, value, exc", EDITS, ids=[f"{n}={v}" for n, v, _ in EDITS])
def test_a_group_edited_after_construction_is_checked_at_step(entry, impl, device, name, value, exc):
    m = model(device=device)
    opt = two_groups(entry, m, impl=impl)
    train(m, opt, 2)
    opt.param_groups[1][name] = value  # the second group: the first must not move either
    backward(m)
    before = snapshot(m, opt)
    with pytest.raises(exc, match=name):
        opt.step()
    assert_same(snapshot(m, opt), before)
    opt.param_groups[1][name] = opt.param_groups[0][name]  # repaired: it steps again
    opt.step()


def test_a_non_bool_flag_set_after_construction_is_refused_at_step():
    m = model()
    opt = LARS(m.parameters(), lr=0.1, momentum=0.9)
    opt.param_groups[0]["nesterov"] = "yes"
    backward(m)
    with pytest.raises(TypeError, match="nesterov"):
        opt.step()


# -- load_state_dict -------------------------------------------------------------------------
def trained(entry, steps=2, seed=0):
    m = model(seed)
    opt = entry.make(m.parameters())
    train(m, opt, steps)
    return m, opt


def _foreign_state(opt, entry):
    # A torch optimizer over the same parameters, one step taken, whose state names are not
    # all this optimizer's: Adam's (ExtrapAdam keeps Adam's names: SGD's momentum then).
    params = [torch.nn.Parameter(p.detach().clone()) for g in opt.param_groups for p in g["params"]]
    if {"step", "exp_avg", "exp_avg_sq"} <= set(entry.state_keys):
        foreign = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        foreign = torch.optim.Adam(params)
    for q in params:
        q.grad = torch.ones_like(q)
    foreign.step()
    return foreign.state_dict()


def _wrong_shape_state(state):
    st = state["state"][0]
    name = next(n for n, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    st[name] = torch.zeros(3, 3)
    return state


def _bad_group(state):
    state["param_groups"][0]["lr"] = -1.0
    return state


def _unknown_param(state):
    state["state"][99] = copy.deepcopy(state["state"][0])
    return state


def _one_group_too_many(state):
    state["param_groups"].append(copy.deepcopy(state["param_groups"][0]))
    return state


BAD_STATES = {
    "foreign-optimizer": lambda entry, opt, state: _foreign_state(opt, entry),
    "wrong-shape": lambda entry, opt, state: _wrong_shape_state(state),
    "bad-hyperparameter": lambda entry, opt, state: _bad_group(state),
    "unknown-param": lambda entry, opt, state: _unknown_param(state),
    "group-count": lambda entry, opt, state: _one_group_too_many(state),
}


@each_optimizer
@pytest.mark.parametrize("bad", list(BAD_STATES))
def test_a_refused_load_changes_nothing(entry, bad):
    _, source = trained(entry, steps=3)
    state = BAD_STATES[bad](entry, source, copy.deepcopy(source.state_dict()))
    m, opt = trained(entry, steps=2, seed=1)
    before = snapshot(m, opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(state)
    assert_same(snapshot(m, opt), before)


@pytest.mark.parametrize("position", [-1, "3", 2.5, None])
def test_shifted_momentum_refuses_a_bad_position_before_loading(position):
    entry = next(e for e in OPTIMIZERS if e.name.startswith("ShiftedMomentumSGD"))
    _, source = trained(entry, steps=3)
    state = copy.deepcopy(source.state_dict())
    state["round_robin"]["position"] = position
    m, opt = trained(entry, steps=1, seed=1)
    before = snapshot(m, opt)
    with pytest.raises(ValueError, match="position"):
        opt.load_state_dict(state)
    assert_same(snapshot(m, opt), before)
    assert opt.next_worker == 1


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("count", [-1, 2.7, torch.tensor(2.7), torch.tensor([3, -1]), True, "2"])
def test_weight_averager_refuses_a_bad_count_and_changes_nothing(fused, count):
    m = model()
    opt = LARS(m.parameters(), lr=0.1, momentum=0.9)
    avg = WeightAverager(m, fused_with=opt if fused else None)
    for _ in range(2):
        train(m, opt, 1)
        if not fused:
            avg.update()
    state = copy.deepcopy(avg.state_dict())
    state["count"] = count
    before = copy.deepcopy(avg.state_dict())
    with pytest.raises(ValueError, match="count"):
        avg.load_state_dict(state)
    assert_same(avg.state_dict(), before)
    assert avg.n_averaged == 2


@pytest.mark.parametrize("key, value", [("decay", math.nan), ("decay", True), ("averages", None),
                                        ("mode", None)])
def test_weight_averager_refuses_other_bad_entries(key, value):
    m = model()
    avg = WeightAverager(m, mode="ema", decay=0.9)
    avg.update()
    state = copy.deepcopy(avg.state_dict())
    if value is None:
        del state[key]
    else:
        state[key] = value
    before = copy.deepcopy(avg.state_dict())
    with pytest.raises(ValueError, match=key):
        avg.load_state_dict(state)
    assert_same(avg.state_dict(), before)

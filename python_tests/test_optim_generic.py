"""Checks every optimizer of the project must pass, applied to each row of helpers.OPTIMIZERS."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import OPTIMIZERS, batch, model, optim_backend_params, through_checkpoint, train

BACKENDS = optim_backend_params()
each_backend = pytest.mark.parametrize("impl,device", BACKENDS)


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def state_equal(oa, ob):
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][n], sb[k][n]) for n in sa[k]) for k in sa)


pytestmark = pytest.mark.parametrize("entry", OPTIMIZERS, ids=[e.name for e in OPTIMIZERS])


@pytest.mark.parametrize("impl,device", optim_backend_params(triton_cpu=True))
def test_state_dict_round_trip_continues_bitwise(entry, impl, device):
    a = model(device=device)
    oa = entry.make(a.parameters(), impl=impl)
    train(a, oa, 3)
    saved = through_checkpoint({"model": a.state_dict(), "opt": oa.state_dict()})
    b = model(seed=1, device=device)
    ob = entry.make(b.parameters(), impl=impl)
    b.load_state_dict(saved["model"])
    ob.load_state_dict(saved["opt"])
    for p in b.parameters():
        assert set(ob.state[p]) == set(entry.state_keys)
    train(a, oa, 4, start=3)
    train(b, ob, 4, start=3)
    assert params_equal(a, b) and state_equal(oa, ob)


@each_backend
def test_param_groups_with_different_hyperparameters(entry, impl, device):
    a, b = model(device=device), model(device=device)
    ga, gb = list(a.parameters()), list(b.parameters())
    grouped = entry.make([{"params": ga[:2]}, {"params": ga[2:], **entry.group_overrides}], impl=impl)
    first = entry.make(gb[:2], impl=impl)
    second = entry.make(gb[2:], impl=impl, **entry.group_overrides)

    class Both:
        def zero_grad(self):
            first.zero_grad(), second.zero_grad()

        def step(self):
            first.step(), second.step()

    train(a, grouped, 4)
    train(b, Both(), 4)
    assert params_equal(a, b)
    assert not torch.equal(ga[0], model(device=device).state_dict()["0.weight"])  # it did train


@each_backend
def test_closure_returns_loss_and_steps(entry, impl, device):
    m = model(device=device)
    opt = entry.make(m.parameters(), impl=impl)
    x, y = batch(0, device=device)
    before = [p.clone() for p in m.parameters()]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert all(not torch.equal(p, q) for p, q in zip(m.parameters(), before))


@each_backend
def test_zero_grad_then_step_changes_nothing(entry, impl, device):
    m = model(device=device)
    opt = entry.make(m.parameters(), impl=impl)
    train(m, opt, 2)
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    before = copy.deepcopy(m)
    state = copy.deepcopy(opt.state_dict())
    opt.step()
    assert params_equal(m, before)
    assert all(torch.equal(state["state"][k][n], v) for k, s in opt.state_dict()["state"].items() for n, v in s.items())


@each_backend
def test_non_contiguous_params(entry, impl, device):
    torch.manual_seed(0)
    w = torch.randn(5, 7).to(device)
    contiguous = torch.nn.Parameter(w.clone())
    strided = torch.nn.Parameter(torch.empty(7, 5, device=device).t().copy_(w))  # a transposed leaf
    assert not strided.is_contiguous()
    oc, os_ = entry.make([contiguous], impl=impl), entry.make([strided], impl=impl)
    for t in range(4):
        g = torch.randn(5, 7, generator=torch.Generator().manual_seed(t)).to(device)
        contiguous.grad = g.clone()
        # grads in the param's layout, then in another layout
        strided.grad = torch.empty(7, 5, device=device).t().copy_(g) if t % 2 else g.clone()
        oc.step()
        os_.step()
    assert torch.equal(contiguous, strided)
    assert strided.stride() == (1, 5)  # updated in place


@each_backend
def test_none_grads_are_skipped(entry, impl, device):
    m = model(device=device)
    opt = entry.make(m.parameters(), impl=impl)
    frozen = m[2].bias
    frozen.requires_grad_(False)
    before = frozen.clone()
    train(m, opt, 3)
    assert torch.equal(frozen, before)
    assert frozen not in opt.state or not opt.state[frozen]


@pytest.mark.parametrize("skip_first", [True, False], ids=["first-step", "later-step"])
@each_backend
def test_grad_scaler_skip_leaves_everything_bitwise_unchanged(entry, skip_first, impl, device):
    a, b = model(device=device), model(device=device)
    oa, ob = entry.make(a.parameters(), impl=impl), entry.make(b.parameters(), impl=impl)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    if not skip_first:
        train(a, oa, 2, scaler=scaler)
        train(b, ob, 2, scaler=torch.amp.GradScaler(device, init_scale=2.0**10))
    before = copy.deepcopy(a), copy.deepcopy(oa.state_dict())
    # A non-finite gradient: the scaler must skip the step (and halve its scale).
    scale = scaler.get_scale()
    oa.zero_grad()
    x, y = batch(99, device=device)
    loss = torch.nn.functional.cross_entropy(a(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(oa)
    scaler.update()
    assert scaler.get_scale() == scale * 0.5
    assert params_equal(a, before[0])
    params = [p for g in oa.param_groups for p in g["params"]]
    for k, s in oa.state_dict()["state"].items():
        for n, v in s.items():
            ref = before[1]["state"].get(k, {}).get(n)
            if ref is None and n in entry.copy_state_keys:  # lazily created: a copy of the param
                assert torch.equal(v, params[k])
            elif ref is None:  # lazily created on the skipped first step: must be initial state
                assert torch.count_nonzero(v) == 0
            else:
                assert torch.equal(v, ref)
    # ...and the run continues exactly as one that took a step without gradients there (it
    # changes no tensor; the step count, a round-robin position or a noise offset, advances:
    # knowing that the scaler skipped would take a host read of found_inf).
    ob.zero_grad()
    ob.step()
    train(a, oa, 3, start=10)
    train(b, ob, 3, start=10)
    assert params_equal(a, b)


@each_backend
def test_deepcopy_steps_independently(entry, impl, device):
    m = model(device=device)
    opt = entry.make(m.parameters(), impl=impl)
    train(m, opt, 2)
    m2, opt2 = copy.deepcopy((m, opt))
    train(m, opt, 3, start=2)
    train(m2, opt2, 3, start=2)
    assert params_equal(m, m2) and state_equal(opt, opt2)
    assert all(p is not q for p, q in zip(m.parameters(), m2.parameters()))


@each_backend
def test_lr_scheduler_and_tensor_lr(entry, impl, device):
    a, b = model(device=device), model(device=device)
    oa = entry.make(a.parameters(), impl=impl)
    ob = entry.make(b.parameters(), impl=impl, lr=torch.tensor(oa.param_groups[0]["lr"], device=device))
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    for t in range(5):
        train(a, oa, 1, start=t)
        train(b, ob, 1, start=t)
        sa.step(), sb.step()
    assert oa.param_groups[0]["lr"] == pytest.approx(float(ob.param_groups[0]["lr"]))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# Every form of ``params`` that torch.optim accepts, on the model of model(): its four tensors.
PARAM_FORMS = {
    "list": lambda m: list(m.parameters()),
    "tuple": lambda m: tuple(m.parameters()),
    "generator": lambda m: m.parameters(),
    "named_parameters": lambda m: m.named_parameters(),
    "group-of-generator": lambda m: [{"params": m.parameters()}],
    "group-of-named_parameters": lambda m: [{"params": m.named_parameters()}],
    "groups-of-tensor-tuple-generator": lambda m: [
        {"params": m[0].weight}, {"params": (m[0].bias,)}, {"params": (p for p in m[2].parameters())}],
    "generator-of-groups": lambda m: ({"params": p} for p in m.parameters()),
}


@pytest.mark.parametrize("form", list(PARAM_FORMS))
@each_backend
def test_every_params_form_trains_every_param(entry, form, impl, device):
    sgd_model = model()
    sgd = torch.optim.SGD(PARAM_FORMS[form](sgd_model), lr=0.1)
    m = model(device=device)
    opt = entry.make(PARAM_FORMS[form](m), impl=impl)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in sgd.param_groups]
    assert [g.get("param_names") for g in opt.param_groups] == [g.get("param_names") for g in sgd.param_groups]
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == 4 and {id(p) for p in held} == {id(p) for p in m.parameters()}
    before = [p.detach().clone() for p in m.parameters()]
    train(m, opt, 1)
    for i, (p, q) in enumerate(zip(m.parameters(), before)):
        assert not torch.equal(p, q), f"parameter {i} did not move"


def test_a_bare_tensor_is_refused_as_torch_refuses_it(entry):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        torch.optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        entry.make(p)

"""WeightAverager(fused_with=optimizer): the optimizer's step averages in its fused pass."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from helpers import optim_backend_params
from lbkernels.optim import LARS, ShiftedMomentumSGD, WeightAverager, lars_param_groups

IMPLS = optim_backend_params(triton_cpu=True)
STEPS = 7
# Fused vs step-then-update() on one backend: the same expression on the same weights;
# what is left is the compiler's freedom to fuse a multiply-add per update (fp32).
TOL = dict(rtol=1e-6, atol=1e-6)


def make_model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(device)


def make_lars(model, impl):
    return LARS(lars_param_groups(model, weight_decay=1e-3), lr=0.5, momentum=0.9, impl=impl)


def train_step(model, opt, t):
    g = torch.Generator().manual_seed(100 + t)
    device = next(model.parameters()).device
    x, y = torch.randn(16, 7, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


DECAY = 0.8


def run(impl, mode, fused, steps=STEPS, make_opt=make_lars, iterates=None, device="cpu"):
    model = make_model(device)
    opt = make_opt(model, impl)
    avg = WeightAverager(model, mode=mode, decay=DECAY, impl=impl, fused_with=opt if fused else None)
    for t in range(steps):
        train_step(model, opt, t)
        if not fused:
            avg.update()
        if iterates is not None:
            iterates.append([p.detach().clone().cpu() for p in model.parameters()])
    return model, avg


def assert_rule_averages(averages, mode, iterates):
    """``averages`` are the mean (SWA) or the EMA (from the initial weights) of the
    iterates, computed here in fp64. Each fp32 update rounds ~4 times by at most eps/2 * M
    (M the largest |w|) and carries earlier errors with a factor <= 1: 2 eps M per update."""
    initial = [p.detach().double() for p in make_model().parameters()]
    if mode == "swa":
        expected = [torch.stack([w[i].double() for w in iterates]).mean(0) for i in range(len(initial))]
    else:
        expected = initial
        for ws in iterates:
            expected = [a + (1 - DECAY) * (w.double() - a) for a, w in zip(expected, ws)]
    eps = torch.finfo(torch.float32).eps
    for i, (a, e) in enumerate(zip(averages, expected)):
        big = max(w[i].abs().max().item() for w in [initial] + iterates)
        torch.testing.assert_close(a.cpu().double(), e, rtol=0, atol=2 * len(iterates) * eps * big,
                                   msg=f"average {i}")


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_fused_is_step_then_update(impl, device, mode):
    iterates = []
    m_fused, fused = run(impl, mode, True, iterates=iterates, device=device)
    m_sep, sep = run(impl, mode, False, device=device)
    for a, b in zip(m_fused.parameters(), m_sep.parameters()):
        assert torch.equal(a, b)  # the step itself does not change
    if impl != "reference":  # (the reference folds by calling average_ itself)
        for a, b in zip(fused.averages, sep.averages):
            torch.testing.assert_close(a, b, **TOL)
    assert_rule_averages(fused.averages, mode, iterates)
    assert fused.n_averaged == sep.n_averaged == STEPS
    assert fused.state_dict()["count"].tolist() == [STEPS, STEPS]  # one per param group


def test_shifted_momentum_sgd_fuses_too():
    def make(model, impl):
        return ShiftedMomentumSGD(model.parameters(), lr=0.1, momentum=0.9, delay=2, impl=impl)

    iterates = []
    _, fused = run("auto", "swa", True, make_opt=make, iterates=iterates)
    assert_rule_averages(fused.averages, "swa", iterates)
    assert fused.n_averaged == STEPS


@pytest.mark.parametrize("impl,device", IMPLS)
def test_count_and_averages_survive_a_checkpoint(impl, device):
    model, avg = run(impl, "swa", True, steps=3, device=device)
    opt = avg.fused_with
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "avg": avg.state_dict()}, blob)
    blob.seek(0)
    ckpt = torch.load(blob, weights_only=True)

    model2 = make_model(device)
    opt2 = make_lars(model2, impl)
    avg2 = WeightAverager(model2, mode="swa", impl=impl, fused_with=opt2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    avg2.load_state_dict(ckpt["avg"])
    assert avg2.n_averaged == 3
    for t in range(3, STEPS):
        train_step(model2, opt2, t)

    _, whole = run(impl, "swa", True, device=device)
    assert avg2.state_dict()["count"].tolist() == [STEPS, STEPS]
    for a, b in zip(avg2.averages, whole.averages):
        assert torch.equal(a, b)  # the same operations in the same order


def test_update_raises_and_found_inf_averages_nothing():
    model, avg = run("reference", "swa", True, steps=2)
    with pytest.raises(RuntimeError, match="already averages"):
        avg.update()
    with pytest.raises(RuntimeError, match="fused optimizer"):
        avg.op_arguments()
    opt = avg.fused_with
    before = [a.clone() for a in avg.averages]
    opt.found_inf = torch.ones(())  # what GradScaler hands a skipped step
    train_step(model, opt, 5)
    del opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(avg.averages, before))
    assert avg.n_averaged == 2


def test_bad_fusions_are_refused():
    model = make_model()
    with pytest.raises(TypeError, match="fused_with must be a lbkernels.optim.LARS"):
        WeightAverager(model, fused_with=torch.optim.SGD(model.parameters(), lr=0.1))
    opt = make_lars(model, "reference")
    params = list(model.parameters())
    with pytest.raises(ValueError, match="does not average"):
        WeightAverager(params[:-1], fused_with=opt)
    with pytest.raises(ValueError, match="not in the optimizer"):
        WeightAverager(params + [nn.Parameter(torch.zeros(2))], fused_with=opt)
    WeightAverager(model, fused_with=opt)
    with pytest.raises(ValueError, match="already updates"):
        WeightAverager(model, fused_with=opt)


def test_unfit_steps_raise_before_changing_anything():
    model = make_model()
    opt = make_lars(model, "reference")
    avg = WeightAverager(model, fused_with=opt)
    train_step(model, opt, 0)
    after_first = [p.detach().clone() for p in model.parameters()]
    # A parameter without a gradient: its group's step would skip its average.
    model[0].bias.grad = None
    with pytest.raises(RuntimeError, match="needs a gradient for every parameter"):
        opt.step()
    # A group added after fusing is not averaged: refused rather than silently skipped.
    opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "lars_exclude": True})
    opt.param_groups[-1]["params"][0].grad = torch.ones(3)
    model[0].bias.grad = torch.zeros(5)
    with pytest.raises(RuntimeError, match="added to the optimizer after"):
        opt.step()
    # Both refusals came before any write: one averaged step, weights as after it.
    assert avg.state_dict()["count"].tolist() == [1, 1]
    for p, q in zip(model.parameters(), after_first):
        assert torch.equal(p, q)
    # Evaluating the averages mid-training: a step then would mix them into the weights.
    with avg.apply_to(model):
        with pytest.raises(RuntimeError, match="restore"):
            opt.step()

"""WeightAverager (SWA, EMA, apply/restore, checkpoints) and update_bn."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import optim_backend_params
from lbkernels.bn_stats import update_bn
from lbkernels.optim import WeightAverager

IMPLS = optim_backend_params(triton_cpu=True)


def make_model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(device, dtype)


def perturb(model, t):
    g = torch.Generator().manual_seed(50 + t)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype))


@pytest.mark.parametrize("impl,device", IMPLS)
def test_swa_is_the_mean_of_the_snapshots(impl, device):
    model = make_model(torch.float64, device)
    avg = WeightAverager(model, mode="swa", impl=impl)
    snaps = []
    for t in range(7):
        perturb(model, t)
        snaps.append([p.detach().clone() for p in model.parameters()])
        avg.update()
    assert avg.n_averaged == 7
    for i, a in enumerate(avg.averages):
        torch.testing.assert_close(a, torch.stack([s[i] for s in snaps]).mean(0), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_ema_matches_the_closed_form(impl, device):
    decay = 0.8
    model = make_model(torch.float64, device)
    w0 = [p.detach().clone() for p in model.parameters()]
    avg = WeightAverager(model, mode="ema", decay=decay, impl=impl)
    snaps = []
    for t in range(7):
        perturb(model, t)
        snaps.append([p.detach().clone() for p in model.parameters()])
        avg.update()
    k = len(snaps)
    for i, a in enumerate(avg.averages):
        expected = decay**k * w0[i] + sum((1 - decay) * decay ** (k - j) * snaps[j - 1][i]
                                          for j in range(1, k + 1))
        torch.testing.assert_close(a, expected, rtol=1e-13, atol=1e-13)
    assert avg.n_averaged == 7


def test_low_precision_params_keep_fp32_averages():
    model = make_model(torch.bfloat16)
    avg = WeightAverager(model)
    for t in range(3):
        perturb(model, t)
        avg.update()
    assert all(a.dtype == torch.float32 for a in avg.averages)
    with avg.apply_to(model):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("impl,device", IMPLS)
def test_apply_restore_round_trip_is_bitwise(impl, device):
    model = make_model(device=device)
    avg = WeightAverager(model, impl=impl)
    for t in range(3):
        perturb(model, t)
        avg.update()
    weights = [p.detach().clone() for p in model.parameters()]
    avg.apply_to(model)
    for p, a in zip(model.parameters(), avg.averages):
        assert torch.equal(p, a)
    avg.restore()
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    other = copy.deepcopy(model)
    with avg.apply_to(other):  # another model of the same shape; this one untouched
        assert all(torch.equal(p, a) for p, a in zip(other.parameters(), avg.averages))
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(p, w) for p, w in zip(other.parameters(), weights))


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_state_dict_round_trip_continues_bitwise(mode, tmp_path):
    model = make_model()
    avg = WeightAverager(model, mode=mode, decay=0.9)
    for t in range(3):
        perturb(model, t)
        avg.update()
    torch.save({"model": model.state_dict(), "avg": avg.state_dict()}, tmp_path / "ckpt.pt")
    for t in range(3, 6):
        perturb(model, t)
        avg.update()

    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2 = make_model()
    model2.load_state_dict(ckpt["model"])
    avg2 = WeightAverager(model2, mode=mode, decay=0.5)
    avg2.load_state_dict(ckpt["avg"])
    assert avg2.n_averaged == 3 and avg2.decay == 0.9
    for t in range(3, 6):
        perturb(model2, t)
        avg2.update()
    assert avg2.n_averaged == avg.n_averaged == 6
    for a, b in zip(avg.averages, avg2.averages):
        assert torch.equal(a, b)


def test_found_inf_skips_the_update():
    model = make_model()
    avg = WeightAverager(model)
    avg.update()
    before = [a.clone() for a in avg.averages]
    perturb(model, 0)
    avg.update(found_inf=torch.ones(()))
    assert avg.n_averaged == 1
    assert all(torch.equal(a, b) for a, b in zip(avg.averages, before))


def test_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="mode"):
        WeightAverager(model, mode="mean")
    for decay in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            WeightAverager(model, mode="ema", decay=decay)
    with pytest.raises(ValueError, match="impl"):
        WeightAverager(model, impl="cuda")
    with pytest.raises(ValueError, match="no parameters"):
        WeightAverager([])
    avg = WeightAverager(model)
    with pytest.raises(RuntimeError, match="restore"):
        avg.restore()
    avg.apply_to()
    with pytest.raises(RuntimeError, match="already applied"):
        avg.apply_to()
    with pytest.raises(RuntimeError, match="restore"):
        avg.update()
    avg.restore()
    with pytest.raises(ValueError, match="parameters"):
        avg.apply_to(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        WeightAverager(model, mode="ema").load_state_dict(avg.state_dict())


# ------------------------------------------------------------------------ update_bn


def bn_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 6), nn.BatchNorm1d(6))


def batches(n, seed=0, sizes=(5, 3, 8)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(sizes[i % len(sizes)], 3, 8, 8, generator=g), torch.zeros(1))
            for i in range(n)]


def test_update_bn_matches_torch():
    loader = batches(6)
    ours, theirs = bn_model(), bn_model()
    ours.eval()
    ours[5].train()  # a per-module mode, restored as it was
    theirs.eval()
    update_bn(loader, ours)
    torch.optim.swa_utils.update_bn(loader, theirs)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not ours.training and not ours[1].training and ours[5].training
    assert ours[1].momentum == 0.3 and ours[5].momentum == 0.1


def _bn_ranks(rank, world):
    loader = batches(6)[rank::world]
    model = bn_model()
    update_bn(loader, model, distributed=True)
    return model.state_dict()


@pytest.mark.distributed
def test_update_bn_distributed_equals_the_union(gloo):
    states = gloo(2).run(_bn_ranks)
    single = bn_model()
    update_bn(batches(6), single)
    for name, v in single.state_dict().items():
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], v, rtol=1e-6, atol=1e-7, msg=name)

"""Ghost batch norm against BatchNorm applied ghost batch by ghost batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lbkernels.nn import GhostBatchNorm1d, GhostBatchNorm2d, convert_to_ghost_bn

TOL = dict(rtol=1e-12, atol=1e-12)
SHAPES = {1: [(4,), (4, 5)], 2: [(3, 4, 5)]}  # per-sample shapes (C, ...) for 1d and 2d
GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def pair(dim: int, g: int, **kw):
    torch.manual_seed(0)
    bn = BN[dim](SHAPES[dim][0][0], dtype=torch.float64, **kw)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ghost = GHOST[dim](bn.num_features, g, dtype=torch.float64, **kw)
    ghost.load_state_dict(bn.state_dict())
    return bn, ghost


def chunked(bn: nn.Module, x: torch.Tensor, g: int) -> torch.Tensor:
    return torch.cat([bn(chunk) for chunk in x.split(g)])


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], **TOL)


CASES = [(dim, shape) for dim in (1, 2) for shape in SHAPES[dim]]


@pytest.mark.parametrize("dim, shape", CASES)
@pytest.mark.parametrize("n", [40, 43])  # whole ghost batches; and a remainder of 3
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
    ids=["default", "cumulative", "no-affine", "no-running-stats"],
)
def test_equals_batchnorm_ghost_batch_by_ghost_batch(dim, shape, n, kw):
    g = 8
    bn, ghost = pair(dim, g, **kw)
    for step in range(3):  # running statistics carry over between steps
        x = torch.randn(n, *shape, dtype=torch.float64) * (step + 1) + step
        x_ref = x.clone().requires_grad_()
        x_gh = x.clone().requires_grad_()
        y_ref, y_gh = chunked(bn, x_ref, g), ghost(x_gh)
        torch.testing.assert_close(y_gh, y_ref, **TOL)
        grad_out = torch.randn_like(y_ref)
        y_ref.backward(grad_out)
        y_gh.backward(grad_out)
        torch.testing.assert_close(x_gh.grad, x_ref.grad, **TOL)
        if bn.affine:
            torch.testing.assert_close(ghost.weight.grad, bn.weight.grad, **TOL)
            torch.testing.assert_close(ghost.bias.grad, bn.bias.grad, **TOL)
        assert_same_state(ghost, bn)
    bn.eval(), ghost.eval()
    x = torch.randn(n, *shape, dtype=torch.float64)
    expected = chunked(bn, x, g) if not bn.track_running_stats else bn(x)
    torch.testing.assert_close(ghost(x), expected, **TOL)


@pytest.mark.parametrize("dim, shape", CASES)
@pytest.mark.parametrize("n", [5, 8])
def test_one_ghost_batch_is_batchnorm(dim, shape, n):
    bn, ghost = pair(dim, 8)
    x = torch.randn(n, *shape, dtype=torch.float64)
    assert torch.equal(ghost(x), bn(x))
    for key, value in bn.state_dict().items():
        assert torch.equal(ghost.state_dict()[key], value)


def test_float32_matches_and_channels_last():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(6)
    ghost = GhostBatchNorm2d(6, ghost_batch_size=4)
    x = torch.randn(12, 6, 5, 5).to(memory_format=torch.channels_last)
    torch.testing.assert_close(ghost(x), chunked(bn, x, 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(ghost.num_batches_tracked) == 3


def test_convert_keeps_eval_outputs_and_tensors():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)
    ).double()
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(16, 3, 8, 8, dtype=torch.float64))
    model.eval()
    x = torch.randn(20, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    params = [id(p) for p in model.parameters()]
    converted = convert_to_ghost_bn(model, ghost_batch_size=4)
    assert converted is model and not model.training
    assert isinstance(model[1], GhostBatchNorm2d) and isinstance(model[5], GhostBatchNorm1d)
    assert model[1].ghost_batch_size == 4 and [id(p) for p in model.parameters()] == params
    assert torch.equal(model(x), before)
    assert "ghost_batch_size=4" in repr(model[1])
    # A BatchNorm at the root is replaced and returned; ghost modules are resized.
    root = convert_to_ghost_bn(nn.BatchNorm1d(3).train(), 16)
    assert isinstance(root, GhostBatchNorm1d) and root.training and root.weight.device.type == "cpu"
    assert convert_to_ghost_bn(root, 32).ghost_batch_size == 32


def test_bad_ghost_batch_size():
    with pytest.raises(ValueError, match="ghost_batch_size"):
        GhostBatchNorm2d(4, ghost_batch_size=0)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        GhostBatchNorm1d(4, ghost_batch_size=2.5)

"""Accumulated micro-batch gradients equal the full-batch mean gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lbkernels.data import split_evenly
from lbkernels.distributed import StepStats, accumulate_gradients
from lbkernels.nn import GhostBatchNorm1d

TOL = dict(rtol=1e-12, atol=1e-12)
B, FEATURES, CLASSES = 13, 5, 3


class Net(nn.Module):
    """A small fp64 classifier with a buffer (so DDP has buffers to broadcast)."""

    def __init__(self, ghost_batch_size: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 8)
        self.norm = GhostBatchNorm1d(8, ghost_batch_size) if ghost_batch_size else nn.Identity()
        self.fc2 = nn.Linear(8, CLASSES)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)) * self.scale))


def make(seed: int = 0, n: int = B, ghost_batch_size: int | None = None):
    torch.manual_seed(seed)
    model = Net(ghost_batch_size).double()
    x = torch.randn(n, FEATURES, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (n,))
    return model, x, y


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def full_batch(model, x, y):
    model = copy.deepcopy(model)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    correct = int((out.argmax(1) == y).sum())
    return grads(model), float(loss.detach()), correct


@pytest.mark.parametrize("micro", [None, 1, 3, 5, 13, 100])
def test_single_process_equals_full_batch(micro):
    model, x, y = make()
    expected, loss, correct = full_batch(model, x, y)
    stats = accumulate_gradients(model, x, y, nn.functional.cross_entropy, micro)
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, **TOL)
    assert stats.samples == B and stats.correct == correct
    assert stats.micro_batches == (1 if micro is None else -(-B // micro))
    assert stats.loss == pytest.approx(loss, rel=1e-12)
    assert stats.accuracy == correct / B


@pytest.mark.parametrize("world_size", [2, 3])
def test_simulated_ranks_with_uneven_shares(world_size):
    """K plain modules, averaged by hand as the DDP all-reduce would: the mean over B."""
    model, x, y = make(1)
    expected, _, _ = full_batch(model, x, y)
    shares = split_evenly(B, world_size)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for xr, yr in zip(x.split(shares), y.split(shares)):
        replica = copy.deepcopy(model)
        accumulate_gradients(
            replica, xr, yr, nn.functional.cross_entropy, 2, global_batch_size=B, world_size=world_size
        )
        total = [t + g / world_size for t, g in zip(total, grads(replica))]
    for g, e in zip(total, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_ghost_batches_aligned_with_micro_batches_change_nothing():
    model, x, y = make(2, n=16, ghost_batch_size=4)
    reference = copy.deepcopy(model)
    expected, _, _ = full_batch(reference, x, y)
    reference(x)  # the running statistics the full batch would leave
    accumulate_gradients(model, x, y, nn.functional.cross_entropy, 8)
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, **TOL)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, **TOL)


def test_grad_scaler_scales_every_micro_batch():
    model, x, y = make(3)
    expected, _, _ = full_batch(model, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    accumulate_gradients(model, x, y, nn.functional.cross_entropy, 4, scaler=scaler)
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, 16.0 * e, **TOL)


def test_regression_output_has_no_accuracy():
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    stats = accumulate_gradients(model, x, y, nn.functional.mse_loss, 4)
    assert stats.correct is None and stats.accuracy is None and stats.micro_batches == 2


def test_bad_arguments():
    model, x, y = make()
    ce = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="empty"):
        accumulate_gradients(model, x[:0], y[:0], ce)
    with pytest.raises(ValueError, match="targets"):
        accumulate_gradients(model, x, y[:3], ce)
    with pytest.raises(ValueError, match="max_micro_batch"):
        accumulate_gradients(model, x, y, ce, 0)
    with pytest.raises(ValueError, match="global_batch_size"):
        accumulate_gradients(model, x, y, ce, global_batch_size=B - 1)
    with pytest.raises(ValueError, match="global_batch_size"):
        accumulate_gradients(model, x, y, ce, world_size=2)


def _ddp_ranks(rank: int, world_size: int) -> dict:
    model, x, y = make(4)
    ddp = nn.parallel.DistributedDataParallel(model)
    xr, yr = x.split(split_evenly(B, world_size))[rank], y.split(split_evenly(B, world_size))[rank]
    results = {}
    # Shares 7 and 6; micro-batches 3+3+1 against 3+3, then 2+2+2+1 against 2+2+2.
    for micro, known_batch in ((3, None), (2, B)):
        ddp.zero_grad()
        stats = accumulate_gradients(
            ddp, xr, yr, nn.functional.cross_entropy, micro, global_batch_size=known_batch
        )
        results[micro] = (grads(model), stats, stats.all_reduce())
    return results


@pytest.mark.distributed
def test_ddp_two_ranks_unequal_micro_batches(gloo):
    runs = gloo(2).run(_ddp_ranks)
    model, x, y = make(4)
    expected, loss, correct = full_batch(model, x, y)
    for rank, micro_batches in ((0, {3: 3, 2: 4}), (1, {3: 2, 2: 3})):
        for micro, (got, local, total) in runs[rank].items():
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, **TOL)
            assert local.samples == (7, 6)[rank] and local.micro_batches == micro_batches[micro]
            assert isinstance(total, StepStats) and total.samples == B and total.correct == correct
            assert total.loss == pytest.approx(loss, rel=1e-12)
            assert total.micro_batches == {3: 3, 2: 4}[micro]

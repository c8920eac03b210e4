"""ScheduledBatchSampler: coverage, determinism and exact resume across rank counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lbkernels.data import ScheduledBatchSampler, split_evenly
from lbkernels.schedules import BatchSizeSchedule

N = 103  # prime: no batch size divides it

# Batch sizes per epoch chosen to hit every end-of-epoch case for 1-3 ranks: an even
# split, a remainder >= world_size, a remainder < world_size that joins the last batch,
# a single batch larger than the dataset.
SIZES = {0: 10, 1: 17, 2: 34, 3: 51, 4: 100, 5: 200}


def ranks(world_size: int, schedule=SIZES.__getitem__, **kw) -> list[ScheduledBatchSampler]:
    return [ScheduledBatchSampler(N, schedule, rank=r, world_size=world_size, seed=7, **kw) for r in range(world_size)]


def epoch_batches(samplers, epoch: int) -> list[list[list[int]]]:
    """Per step, the share of every rank."""
    for s in samplers:
        s.set_epoch(epoch)
    return [list(step) for step in zip(*(list(s) for s in samplers), strict=True)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(world_size):
    samplers = ranks(world_size)
    for epoch, b in SIZES.items():
        steps = epoch_batches(samplers, epoch)
        assert all(len(s) == len(steps) for s in samplers)
        flat = [i for step in steps for share in step for i in share]
        assert sorted(flat) == list(range(N)), f"epoch {epoch}"
        for step in steps:
            sizes = [len(share) for share in step]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        global_sizes = [sum(len(share) for share in step) for step in steps]
        assert global_sizes == samplers[0].global_batch_sizes(epoch)
        assert all(g == b for g in global_sizes[:-1]) or global_sizes == [N]


@pytest.mark.parametrize("world_size", [2, 3])
def test_global_batches_do_not_depend_on_world_size(world_size):
    for epoch in SIZES:
        one = [step[0] for step in epoch_batches(ranks(1), epoch)]
        many = [sum(step, []) for step in epoch_batches(ranks(world_size), epoch)]
        # Only the end differs, where a remainder smaller than world_size joins the last batch.
        k = len(many) - 1
        assert one[:k] == many[:k] and sum(one[k:], []) == many[k]
    # The permutation is DistributedSampler's: the same seed gives the same order.
    torch_order = torch.utils.data.DistributedSampler(range(N), num_replicas=1, rank=0, seed=7)
    torch_order.set_epoch(5)
    assert sum(many, []) == list(torch_order)


def test_remainder_rules():
    s = ScheduledBatchSampler(N, SIZES.__getitem__, rank=0, world_size=3, seed=0)
    assert s.global_batch_sizes(0) == [10] * 10 + [3]
    assert s.global_batch_sizes(3) == [51, 52]  # one left over, fewer than 3 ranks: joins
    assert s.global_batch_sizes(5) == [N]
    d = ScheduledBatchSampler(N, SIZES.__getitem__, rank=0, world_size=3, seed=0, drop_last=True)
    assert d.global_batch_sizes(0) == [10] * 10 and d.global_batch_sizes(5) == []
    assert split_evenly(10, 3) == [4, 3, 3]


def test_deterministic_and_epochs_differ():
    a, b = ranks(2), ranks(2)
    assert epoch_batches(a, 2) == epoch_batches(b, 2)
    assert epoch_batches(a, 2) == epoch_batches(a, 2)  # iterating again replays the epoch
    first = [i for step in epoch_batches(a, 0) for i in step[0]]
    again = [i for step in epoch_batches(a, 1) for i in step[0]]
    assert first[:10] != again[:10]


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch(world_size):
    schedule = BatchSizeSchedule(0.1, 10, milestones=(2,), factor=3)  # B = 10, then 30
    reference = ranks(world_size, schedule)
    expected = {e: epoch_batches(reference, e) for e in (1, 2)}
    for epoch, stop in ((1, 4), (2, 1)):
        live = ranks(world_size, schedule)
        for s in live:
            s.set_epoch(epoch)
        iters = [iter(s) for s in live]
        for _ in range(stop):
            for it in iters:
                next(it)
        states = [s.state_dict() for s in live]
        assert states[0] == {"epoch": epoch, "step": stop, "seed": 7, "dataset_size": N}
        resumed = ranks(world_size, schedule)
        for s, st in zip(resumed, states):
            s.load_state_dict(st)
            s.set_epoch(epoch)  # the usual loop calls it again: the position stays
            assert len(s) == len(expected[epoch]) - stop
        assert [list(step) for step in zip(*(list(s) for s in resumed))] == expected[epoch][stop:]
        # A new epoch starts from its beginning.
        for s in resumed:
            s.set_epoch(epoch + 1)
        assert epoch_batches(resumed, epoch + 1) == epoch_batches(reference, epoch + 1)


def test_resume_on_another_world_size_and_explicit_step():
    two = ranks(2)
    for s in two:
        s.set_epoch(1)
    state = two[0].state_dict(step=3)  # e.g. steps the loop finished, behind a prefetching loader
    three = ranks(3)
    for s in three:
        s.load_state_dict(state)
    got = [sum(step, []) for step in zip(*(list(s) for s in three))]
    assert got == [sum(step, []) for step in epoch_batches(ranks(2), 1)][3:]


def test_with_a_dataloader():
    data = TensorDataset(torch.arange(N))
    sampler = ScheduledBatchSampler(N, BatchSizeSchedule(0.1, 16, (1,), 4), rank=1, world_size=2)
    sizes = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        loader = DataLoader(data, batch_sampler=sampler)
        sizes[epoch] = [len(x) for (x,) in loader]
        assert len(loader) == len(sizes[epoch])
    assert sizes[0][0] == 8 and sizes[1][0] == 32


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        ScheduledBatchSampler(N, SIZES.__getitem__, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        ScheduledBatchSampler(N, SIZES.__getitem__, rank=0, world_size=0)
    with pytest.raises(ValueError, match="dataset_size"):
        ScheduledBatchSampler(2, SIZES.__getitem__, rank=0, world_size=3)
    with pytest.raises(ValueError, match="schedule"):
        ScheduledBatchSampler(N, 128, rank=0, world_size=1)
    small = ScheduledBatchSampler(N, lambda e: 2, rank=0, world_size=3)
    with pytest.raises(ValueError, match="smaller than world_size"):
        len(small)
    s = ranks(1)[0]
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "step": 0, "seed": 8, "dataset_size": N})
    with pytest.raises(ValueError, match="past"):
        s.load_state_dict({"epoch": 0, "step": 12, "seed": 7, "dataset_size": N})

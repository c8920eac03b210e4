"""Data-parallel batch sampling whose global batch follows a schedule.

:class:`ScheduledBatchSampler` is the data half of growing the batch instead of decaying
the learning rate (see :class:`lbkernels.schedules.BatchSizeSchedule`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, Union

import torch
from torch.utils.data import Sampler

from ._validate import check_int


class _HasAt(Protocol):
    def at(self, epoch: int) -> tuple[float, int]: ...


BatchSchedule = Union[_HasAt, Callable[[int], int]]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one, larger ones first."""
    q, r = divmod(total, parts)
    return [q + 1] * r + [q] * (parts - r)


class ScheduledBatchSampler(Sampler[list[int]]):
    r"""Batch sampler for one data-parallel rank whose global batch changes with the epoch.

    Epoch ``e`` shuffles the ``N = dataset_size`` indices with ``torch.randperm`` seeded
    with ``seed + e`` (the permutation ``DistributedSampler`` draws), the same on every
    rank, and cuts it into consecutive global batches of ``B(e)`` indices. Each global
    batch of ``b`` indices is split into ``world_size = K`` contiguous shares: with
    ``q, r = divmod(b, K)`` ranks ``0 .. r-1`` get ``q + 1`` indices and the others ``q``.
    The sampler yields this rank's share of each global batch, in order.

    The end of the epoch: the ``N mod B`` indices left over form a last, smaller global
    batch; when there are fewer of them than ranks they join the previous batch instead,
    so that no rank ever gets an empty share (a data-parallel step needs every rank).
    Every index is then used exactly once per epoch across the ranks. With
    ``drop_last=True`` the leftover indices are skipped and every batch has ``B(e)``.

    The global batches depend on ``seed``, the epoch and the schedule, and not on
    ``world_size`` except through that last-batch rule: a job resumed mid-epoch on a
    different number of ranks sees the same batches. Shares differ by one sample when
    ``K`` does not divide the batch: weight the losses as
    :func:`lbkernels.distributed.accumulate_gradients` does, so that the step sees the
    mean gradient over the global batch.

    Args:
        dataset_size: ``N``.
        schedule: the global batch per epoch: an object whose ``at(epoch)`` returns
            ``(lr, batch_size)`` (a :class:`~lbkernels.schedules.BatchSizeSchedule`), or a
            callable ``epoch -> batch_size``. Every ``B(e)`` must be at least ``world_size``.
        rank, world_size: this rank and the number of ranks; by default those of the
            initialised default process group, else 0 and 1.
        seed: seed of the epoch permutations (the same on every rank).
        drop_last: skip the indices that do not fill a whole global batch.

    Call :meth:`set_epoch` before each epoch. :meth:`state_dict` records the epoch and
    the number of batches already taken from it; after :meth:`load_state_dict` the next
    iteration continues that epoch with the very batches an uninterrupted run would
    have produced.
    """

    def __init__(
        self,
        dataset_size: int,
        schedule: BatchSchedule,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if world_size is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            world_size = (dist.get_world_size() if initialised else 1) if world_size is None else world_size
            rank = (dist.get_rank() if initialised else 0) if rank is None else rank
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size, got rank {self.rank} with world_size {self.world_size}")
        self.dataset_size = check_int("dataset_size", dataset_size, self.world_size)
        if not (hasattr(schedule, "at") or callable(schedule)):
            raise ValueError("schedule must have .at(epoch) -> (lr, batch_size) or be a callable epoch -> batch_size")
        self.schedule = schedule
        self.seed = check_int("seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._resume = 0  # batch of self.epoch the next iteration starts at
        self._step = 0  # batches of self.epoch taken so far

    def batch_size(self, epoch: int) -> int:
        """The global batch ``B(epoch)`` the schedule asks for."""
        b = self.schedule.at(epoch)[1] if hasattr(self.schedule, "at") else self.schedule(epoch)
        b = check_int(f"batch size of epoch {epoch}", b, 1)
        if b < self.world_size:
            raise ValueError(f"the global batch of epoch {epoch} is {b}, smaller than world_size {self.world_size}")
        return b

    def global_batch_sizes(self, epoch: int) -> list[int]:
        """Sizes of the global batches of ``epoch``, in order."""
        n, b = self.dataset_size, self.batch_size(epoch)
        full, rest = divmod(n, b)
        if self.drop_last:
            return [b] * full
        if rest == 0:
            return [b] * full
        if rest < self.world_size and full > 0:
            return [b] * (full - 1) + [b + rest]
        return [b] * full + [rest]

    def num_batches(self, epoch: int) -> int:
        """Number of batches in a whole ``epoch`` (the same on every rank)."""
        return len(self.global_batch_sizes(epoch))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws from. Staying on the current epoch
        keeps a position restored by :meth:`load_state_dict`; a new epoch starts at 0."""
        epoch = check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self._resume, self._step = epoch, 0, 0

    def __len__(self) -> int:
        """Batches the next iteration yields: fewer than :meth:`num_batches` after a
        mid-epoch resume."""
        return self.num_batches(self.epoch) - self._resume

    def __iter__(self) -> Iterator[list[int]]:
        sizes = self.global_batch_sizes(self.epoch)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.dataset_size, generator=g).tolist()
        self._step = self._resume
        start = sum(sizes[: self._resume])
        for step in range(self._resume, len(sizes)):
            b = sizes[step]
            shares = split_evenly(b, self.world_size)
            lo = start + sum(shares[: self.rank])
            self._step = step + 1
            yield perm[lo : lo + shares[self.rank]]
            start += b
        # A restored position serves one pass; iterating again replays the whole epoch.
        self._resume = 0

    def state_dict(self, step: int | None = None) -> dict[str, int]:
        """The position in the data: epoch and batches already taken from it.

        ``step`` defaults to the number of batches this sampler has yielded in the
        epoch. A ``DataLoader`` with workers fetches batches ahead of the training loop;
        then pass the number of steps the loop has completed.
        """
        step = self._step if step is None else check_int("step", step, 0)
        return {"epoch": self.epoch, "step": step, "seed": self.seed, "dataset_size": self.dataset_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` (saved with any ``world_size``)."""
        for key in ("seed", "dataset_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]}, this sampler has {getattr(self, key)}")
        epoch = check_int("epoch", state["epoch"], 0)
        step = check_int("step", state["step"], 0)
        if step > self.num_batches(epoch):
            raise ValueError(f"step {step} is past the {self.num_batches(epoch)} batches of epoch {epoch}")
        self.epoch, self._resume, self._step = epoch, step, step

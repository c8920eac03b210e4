"""Gradient accumulation over micro-batches, exact for uneven shares of a global batch.

Growing the batch during training (Smith, Kindermans, Le 2018), put together::

    schedule = BatchSizeSchedule(0.1, 128, (60, 120, 160), 5, max_batch=5120)
    sampler = ScheduledBatchSampler(len(dataset), schedule)  # rank, world size: process group
    loader = DataLoader(dataset, batch_sampler=sampler)
    for epoch in range(200):
        sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = schedule.at(epoch)[0]
        for x, y in loader:
            optimizer.zero_grad()
            stats = accumulate_gradients(ddp_model, x, y, F.cross_entropy, max_micro_batch=512)
            optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .._validate import check_int


@dataclass(frozen=True)
class StepStats:
    """What one :func:`accumulate_gradients` call saw on this rank, for logging.

    ``loss_sum`` is the sum of per-sample losses (the micro-batch mean times its size),
    ``correct`` the number of top-1 hits when the model is a classifier (else ``None``).
    :meth:`all_reduce` sums them over the ranks.
    """

    loss_sum: float
    correct: int | None
    samples: int
    micro_batches: int

    @property
    def loss(self) -> float:
        """Mean loss per sample."""
        return self.loss_sum / self.samples

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.samples

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> StepStats:
        """The sums over the ranks of ``group`` (one collective; every rank must call it).
        ``micro_batches`` becomes the largest count of any rank."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        sums = torch.tensor(
            [self.loss_sum, -1.0 if self.correct is None else float(self.correct), float(self.samples)],
            dtype=torch.float64,
            device=device,
        )
        most = torch.tensor([self.micro_batches], device=device)
        dist.all_reduce(sums, group=group)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        loss_sum, correct, samples = sums.tolist()
        return StepStats(loss_sum, None if self.correct is None else round(correct), round(samples), int(most))


def _is_classification(output: Tensor, target: Tensor) -> bool:
    return output.dim() == 2 and target.dim() == 1 and not (target.is_floating_point() or target.is_complex())


def accumulate_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    max_micro_batch: int | None = None,
    *,
    global_batch_size: int | None = None,
    world_size: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepStats:
    r"""Forward and backward over this rank's batch in micro-batches, for one optimizer step.

    Rank ``r`` of ``K`` holds ``n_r`` of the ``B = sum_r n_r`` samples of the global
    batch and cuts them into consecutive micro-batches of at most ``max_micro_batch``
    samples (the last one smaller). ``loss_fn(model(x), y)`` must be the *mean* over the
    micro-batch (the default reduction of the ``torch.nn`` losses); the loss of a
    micro-batch of ``n_mb`` samples is scaled by ``n_mb * K / B`` before its backward.
    The gradients add up in ``.grad`` and the all-reduce of DDP averages over the ranks,
    so the optimizer sees::

        (1/K) * sum_r sum_mb (n_mb * K / B) * grad(mean loss of mb) = (1/B) * sum_i grad(l_i)

    the mean gradient over the global batch, whatever the shares ``n_r`` (a global
    batch not divisible by ``K``) and the micro-batch sizes.

    With a ``DistributedDataParallel`` model every micro-batch but the last runs under
    ``no_sync()``, so the gradients are reduced once per step; ranks may run different
    numbers of micro-batches (DDP broadcasts buffers in the first forward of a step
    only). Every rank must call this once per step, with at least one sample. A plain
    module works the same with ``K = 1``, or with ``world_size=K`` when the caller
    averages the gradients over ``K`` workers itself.

    Batch norm sees micro-batches, not the whole batch: with
    :class:`lbkernels.nn.GhostBatchNorm2d` and ``max_micro_batch`` a multiple of the
    ghost batch size the result is the same as without accumulation.

    Call ``optimizer.zero_grad()`` before and ``optimizer.step()`` after.

    Args:
        model: a module or a ``DistributedDataParallel``.
        inputs, targets: this rank's samples, batched along dimension 0.
        loss_fn: ``(output, target) -> mean loss``.
        max_micro_batch: most samples per forward; ``None`` runs the batch at once.
        global_batch_size: ``B``. When ``None``: ``n_r`` for a single process, the sum
            over the ranks (one small all-reduce) for DDP.
        world_size: ``K``, the number of ranks the gradient all-reduce averages over;
            defaults to the DDP process group's size, 1 for a plain module.
        scaler: an AMP ``GradScaler`` whose ``scale`` is applied to every backward.

    Returns:
        The :class:`StepStats` of this rank.
    """
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("inputs is empty: every rank needs at least one sample per step")
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} samples, inputs {n}")
    micro = n if max_micro_batch is None else check_int("max_micro_batch", max_micro_batch, 1,
                                                        error=TypeError)
    ddp = isinstance(model, DistributedDataParallel)
    if world_size is None:
        world_size = dist.get_world_size(model.process_group) if ddp else 1
    elif world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch_size is None:
        if ddp:
            count = torch.tensor([n], dtype=torch.int64, device=inputs.device)
            dist.all_reduce(count, group=model.process_group)
            global_batch_size = int(count)
        elif world_size == 1:
            global_batch_size = n
        else:
            raise ValueError("global_batch_size is needed for a plain module with world_size > 1")
    if global_batch_size < n:
        raise ValueError(f"global_batch_size must be >= this rank's {n} samples, got {global_batch_size}")

    chunks = list(zip(inputs.split(micro), targets.split(micro)))
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    classification = True
    for i, (x, y) in enumerate(chunks):
        last = i == len(chunks) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            output = model(x)
            loss = loss_fn(output, y)
            weighted = loss * (x.shape[0] * world_size / global_batch_size)
            (weighted if scaler is None else scaler.scale(weighted)).backward()
        loss_sum += loss.detach().double() * x.shape[0]
        classification = classification and _is_classification(output, y)
        if classification:
            correct += (output.detach().argmax(dim=1) == y).sum()
    # One device-to-host copy for the whole step, not one per micro-batch.
    return StepStats(
        loss_sum=float(loss_sum),
        correct=int(correct) if classification else None,
        samples=n,
        micro_batches=len(chunks),
    )

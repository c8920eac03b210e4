"""Batch-norm statistics of an averaged model (docs/algorithms.md section 4, SWAP phase 3).

Averaging weights does not average batch-norm statistics: the running mean and
variance of the averaged model must be recomputed with one pass over the training data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: torch.nn.Module,
              device: torch.device | str | None = None, distributed: bool = False) -> None:
    r"""Recompute every batch-norm layer's running statistics with one pass over ``loader``.

    As ``torch.optim.swa_utils.update_bn``: the statistics are reset and, during the
    pass, each layer runs in training mode with ``momentum=None``, which makes its
    running statistics the *cumulative* average over the ``B`` batches seen,

    .. math::  \mu = \frac1B \sum_{b=1}^B \mu_b, \qquad \sigma^2 = \frac1B \sum_{b=1}^B \sigma_b^2

    (:math:`\mu_b`, :math:`\sigma^2_b` the mean and unbiased variance of batch ``b``:
    every batch weighs the same, whatever its size). Momenta and every module's
    train/eval mode are restored afterwards. A batch that is a list or tuple contributes
    its first element; ``device`` moves the inputs before the forward pass.

    With ``distributed=True`` (an initialised default process group), each rank passes
    over its own ``loader`` and the statistics are then combined so that every rank ends
    with those of a single pass over the union of all ranks' batches: rank ``r``
    with :math:`B_r` batches contributes :math:`B_r \mu^{(r)}` and
    :math:`B_r \sigma^{2\,(r)}`, one all-reduce (sum) adds them with the :math:`B_r`,
    and the sums are divided by :math:`B = \sum_r B_r` (weighting by batch counts), up
    to the order of floating-point additions. ``num_batches_tracked`` becomes ``B``.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    momenta = {m: m.momentum for m in bns}
    modes = {m: m.training for m in model.modules()}
    for m in bns:
        m.reset_running_stats()
    try:
        model.train()
        for m in bns:
            m.momentum = None
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    if distributed:
        _all_reduce_stats(bns)


def _all_reduce_stats(bns: list[_BatchNorm]) -> None:
    """Batch-count-weighted mean of the ranks' cumulative statistics, in one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("update_bn(distributed=True) needs an initialised default process group")
    device = bns[0].running_mean.device
    parts = []
    for m in bns:
        n = m.num_batches_tracked.to(device, torch.float64).reshape(1)
        parts += [n, n * m.running_mean.double().to(device), n * m.running_var.double().to(device)]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    offset = 0
    for m in bns:
        c = m.running_mean.numel()
        total = flat[offset]
        mean = flat[offset + 1: offset + 1 + c]
        var = flat[offset + 1 + c: offset + 1 + 2 * c]
        offset += 1 + 2 * c
        if total > 0:  # no rank saw a batch: the reset statistics stay
            m.running_mean.copy_(mean / total)
            m.running_var.copy_(var / total)
        m.num_batches_tracked.fill_(int(total.item()))

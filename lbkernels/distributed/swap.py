"""SWAP: stochastic weight averaging in parallel (docs/algorithms.md section 4).

See :class:`SWAP`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .._validate import check_int
from ..bn_stats import update_bn
from .worker_mean import average_parameters

LARGE_BATCH, INDEPENDENT, AVERAGED = 1, 2, 3
PHASE_NAMES = {LARGE_BATCH: "large-batch", INDEPENDENT: "independent", AVERAGED: "averaged"}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SWAP:
    r"""The three phases of SWAP (Gupta, Akle Serrano, DeCoste, ICLR 2020), driven by a
    training loop.

    With ``K`` processes split into ``K / G`` groups of ``G = group_size`` consecutive
    ranks (group ``g`` holds ranks ``gG .. gG + G - 1``):

    1. **Large batch** (:data:`LARGE_BATCH`): all ``K`` processes train one model with
       data-parallel SGD at the large global batch ``B1`` and the large-batch
       learning-rate schedule. The phase ends after the first epoch whose *training*
       accuracy reaches ``stop_accuracy``, or after ``max_large_batch_epochs`` epochs.
    2. **Independent** (:data:`INDEPENDENT`): each group starts a fresh optimizer (no
       momentum carried over), reseeds its data order with ``seed + g``
       (:attr:`data_seed`) and trains its own copy of the model at the small batch
       ``b2`` with its own schedule for ``swap_epochs`` epochs. Within a group the
       gradients are averaged over :attr:`process_group` (``None`` when ``G = 1``: no
       collective at all); nothing crosses groups, so the ``K / G`` models diverge.
    3. **Averaged** (:data:`AVERAGED`, :meth:`average`): the parameters of all ``K``
       processes are averaged,

       .. math::  w \leftarrow \frac1K \sum_{k=1}^{K} w^{(k)}
                  = \frac{G}{K} \sum_{g=1}^{K/G} w^{(g)}

       (every member of a group holds the group's model, so this is the mean of the
       groups' models), with :func:`lbkernels.distributed.average_parameters` (one
       all-reduce; every rank ends bitwise equal). Buffers are not averaged: the
       batch-norm statistics of the averaged model are recomputed with one pass over
       the training data (:func:`lbkernels.bn_stats.update_bn`, distributed).

    The loop calls :meth:`end_epoch` after every training epoch with the epoch's
    training accuracy; it returns the phase that starts next when one does, and the
    loop then switches its optimizer, batch, data order and data-parallel wrapper
    (phase 2) or calls :meth:`average` (phase 3). :meth:`state_dict` holds the phase,
    the epochs done in it and the switch epoch, so a checkpointed run resumes within
    any phase. Each worker's and the average's test accuracy are the loop's to measure;
    :meth:`gather` collects a number from every rank.

    Construction is collective: every rank calls ``torch.distributed.new_group`` for
    every group, in the same order (as that function requires), when ``1 < G < K``.

    Args:
        max_large_batch_epochs: epoch limit of phase 1.
        swap_epochs: epochs of phase 2 (``T2``).
        stop_accuracy: training accuracy in ``(0, 1]`` that ends phase 1 early
            (1.0: only an epoch at 100% does).
        group_size: ``G``, ranks that train one model together in phase 2; must divide
            the world size.
        seed: base seed of phase 2's data orders.
    """

    def __init__(self, *, max_large_batch_epochs: int, swap_epochs: int, stop_accuracy: float = 1.0,
                 group_size: int = 1, seed: int = 0):
        for name, value in (("max_large_batch_epochs", max_large_batch_epochs),
                            ("swap_epochs", swap_epochs), ("group_size", group_size)):
            check_int(name, value, 1)
        if not 0.0 < stop_accuracy <= 1.0:
            raise ValueError(f"stop_accuracy must be in (0, 1], got {stop_accuracy}")
        check_int("seed", seed)
        rank, world = _world()
        if world % group_size:
            raise ValueError(f"group_size {group_size} does not divide the {world} processes")
        self.max_large_batch_epochs = max_large_batch_epochs
        self.swap_epochs = swap_epochs
        self.stop_accuracy = float(stop_accuracy)
        self.group_size = group_size
        self.seed = seed
        self.rank, self.world_size = rank, world
        self.num_groups = world // group_size
        self.group_index, self.group_rank = divmod(rank, group_size)
        # Phase 2's gradient averaging within the group. G = 1: no collective at all
        # (the attribute is unused); G = K: the default group (None).
        self.process_group: Any = None
        if 1 < group_size < world:
            for g in range(self.num_groups):
                group = dist.new_group(list(range(g * group_size, (g + 1) * group_size)))
                if g == self.group_index:
                    self.process_group = group
        self.phase = LARGE_BATCH
        self.epoch_in_phase = 0
        self.switch_epoch: int | None = None  # epochs of phase 1, once it has ended

    # -- the phases ------------------------------------------------------------------------------
    @property
    def phase_name(self) -> str:
        return PHASE_NAMES[self.phase]

    @property
    def data_seed(self) -> int:
        """Seed of this group's data order in phase 2: ``seed + group index``."""
        return self.seed + self.group_index

    def total_epochs(self) -> int:
        """Epochs of the whole run: the switch epoch plus ``swap_epochs`` once phase 1 has
        ended, the most it can be before."""
        first = self.max_large_batch_epochs if self.switch_epoch is None else self.switch_epoch
        return first + self.swap_epochs

    def end_epoch(self, train_accuracy: float) -> int | None:
        """Record a finished training epoch; returns the phase that starts now
        (:data:`INDEPENDENT` or :data:`AVERAGED`), or None to go on."""
        if self.phase == AVERAGED:
            raise RuntimeError("end_epoch() after phase 3: the run is over")
        self.epoch_in_phase += 1
        if self.phase == LARGE_BATCH:
            if train_accuracy >= self.stop_accuracy or self.epoch_in_phase >= self.max_large_batch_epochs:
                self.switch_epoch = self.epoch_in_phase
                self.phase, self.epoch_in_phase = INDEPENDENT, 0
                return INDEPENDENT
            return None
        if self.epoch_in_phase >= self.swap_epochs:
            return AVERAGED
        return None

    @torch.no_grad()
    def average(self, model: torch.nn.Module, bn_loader: Iterable[Any] | None = None, *,
                device: torch.device | str | None = None, impl: str = "auto") -> None:
        """Phase 3 (collective over all ranks): average ``model``'s parameters over the
        world, then, with ``bn_loader`` (this rank's share of the training data),
        recompute the batch-norm statistics from every rank's batches."""
        if self.phase != INDEPENDENT or self.epoch_in_phase < self.swap_epochs:
            raise RuntimeError(f"average() after {self.epoch_in_phase} of the {self.swap_epochs} "
                               f"epochs of phase 2 (phase {self.phase})")
        average_parameters(list(model.parameters()), impl=impl)
        if bn_loader is not None:
            update_bn(bn_loader, model, device=device, distributed=self.world_size > 1)
        self.phase, self.epoch_in_phase = AVERAGED, 0

    def gather(self, value: float, device: torch.device | str = "cpu") -> list[float]:
        """``value`` of every rank, in rank order (collective over all ranks)."""
        if self.world_size == 1:
            return [float(value)]
        mine = torch.tensor([float(value)], dtype=torch.float64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [t.item() for t in out]

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "epoch_in_phase": self.epoch_in_phase,
                "switch_epoch": self.switch_epoch, "group_size": self.group_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["group_size"] != self.group_size:
            raise ValueError(f"the state was saved with group_size {state['group_size']}, "
                             f"this controller has {self.group_size}")
        if state["phase"] not in PHASE_NAMES:
            raise ValueError(f"unknown phase {state['phase']!r}")
        self.phase = int(state["phase"])
        self.epoch_in_phase = int(state["epoch_in_phase"])
        self.switch_epoch = None if state["switch_epoch"] is None else int(state["switch_epoch"])

"""Delayed-gradient data parallelism: the all-reduce of one step overlaps the next ``tau`` steps.

Usage in a ``torchrun`` job, with shifted momentum and the delay-scaled learning rate::

    delayed = DelayedGradients(delay=tau)
    ddp.register_comm_hook(delayed, delayed_allreduce_hook)
    opt = ShiftedMomentumSGD(lars_param_groups(model, 5e-4), lr=delay_scaled_lr(lr0, tau),
                             momentum=0.9, delay=tau)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()   # starts this step's all-reduce; waits for none
        delayed.step(opt)               # applies the average of step t - tau
    delayed.drain()                     # before destroying the process group

The same rule in one process (the reference the distributed run is tested against)::

    loss_fn(model(x), y).backward()
    delayed.record(model.parameters())  # what the hook does, without communication
    delayed.step(opt)
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects
# (dist.GradBucket, torch.futures.Future[torch.Tensor]), not as strings.
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist

from .._validate import check_int
from ..optim.shifted_momentum import ShiftedMomentumSGD


class _Record(NamedTuple):
    flat: torch.Tensor  # the (averaged, once ``work`` is done) gradient of one bucket
    work: dist.Work | None  # the all-reduce in flight, None in a single-process simulation
    grads: list[tuple[torch.Tensor, torch.Tensor]]  # (param, its gradient: a view of flat)


class DelayedGradients:
    r"""A queue of depth ``tau = delay`` between the all-reduce of a gradient and its use.

    At step ``t`` every process computes its local gradient ``g_t^i`` on the weights it
    has, the comm hook :func:`delayed_allreduce_hook` starts the all-reduce of
    ``g_t^i / K`` into a persistent buffer and returns at once, and :meth:`step` waits for
    the all-reduce of step ``t - tau`` (finished long ago, as ``tau`` steps of compute
    overlapped it) and updates the weights with it::

        g_t     = (1/K) * sum_i grad L^i_t(w_{u-tau})      u = t - tau: the update number
        w_{u+1} = optimizer update of w_u with g_{t-tau}    for t >= tau

    The first ``tau`` steps apply nothing (:meth:`step` returns False there): the weights
    stay ``w_0`` until the first all-reduce has had ``tau`` steps to finish. Update ``u``
    then applies a gradient computed on ``w_{u-tau}`` (``w_0`` while ``u < tau``): the
    dynamics of asynchronous SGD with delay ``tau`` (docs/algorithms.md section 3, and
    :class:`~lbkernels.distributed.AsyncSimulator`), so the stability threshold falls as in
    :func:`~lbkernels.schedules.stability_threshold`: pair it with
    :class:`~lbkernels.optim.ShiftedMomentumSGD` of the same ``delay`` (buffer
    ``u mod (tau + 1)`` at update ``u``) and :func:`~lbkernels.schedules.delay_scaled_lr`.
    ``delay=0`` is synchronous data parallelism.

    The ring holds ``tau + 1`` slots of flat buffers (one per DDP bucket), allocated once
    and reused while the bucket sizes stay the same. The layout of each bucket is recorded
    with its all-reduce, every step, because DDP rebuilds its buckets after the first
    iteration. Each process keeps ``tau + 1`` gradient-sized buffers.

    Not covered: loss scaling with ``torch.amp.GradScaler`` (the gradient applied was
    scaled ``tau`` steps earlier), and the gradients in flight in a checkpoint: a resumed
    run restarts the queue, so its first ``tau`` steps again apply nothing.

    Args:
        delay: ``tau >= 0``, the number of steps between a gradient and its use.
        process_group: the group to average over (default: the world).
    """

    def __init__(self, delay: int, process_group: dist.ProcessGroup | None = None):
        self.delay = check_int("delay", delay, 0)
        self.process_group = process_group
        self._iteration = 0
        self._slots: list[dict[object, _Record]] = [{} for _ in range(delay + 1)]
        self._buffers: list[dict[object, torch.Tensor]] = [{} for _ in range(delay + 1)]

    # -- the producing side: the comm hook, or record() in one process -------------------
    def _buffer(self, key: object, like: torch.Tensor) -> torch.Tensor:
        slot = self._iteration % (self.delay + 1)
        if key in self._slots[slot]:
            raise RuntimeError("a second backward in one step: call DelayedGradients.step() after "
                               "every backward that all-reduces (use DDP's no_sync() to accumulate)")
        buf = self._buffers[slot].get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
            self._buffers[slot][key] = buf
        return buf

    def _push(self, key: object, record: _Record) -> None:
        self._slots[self._iteration % (self.delay + 1)][key] = record

    @torch.no_grad()
    def record(self, params: Iterable[torch.Tensor]) -> None:
        """Queue the current gradients of ``params`` as this step's: the single-process
        counterpart of the comm hook (no communication, no averaging)."""
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            flat = self._buffer(("param", i), p.grad)
            flat.copy_(p.grad)
            self._push(("param", i), _Record(flat, None, [(p, flat)]))

    # -- the consuming side ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Write the gradient of step ``t - tau`` into ``p.grad`` and step ``optimizer``.

        Returns False, and steps nothing, during the first ``delay`` steps. A parameter of
        ``optimizer`` that had no gradient at step ``t - tau`` gets ``p.grad = None``, so
        that the local gradient of step ``t`` is never applied.
        """
        if isinstance(optimizer, ShiftedMomentumSGD) and optimizer.delay != self.delay:
            raise ValueError(f"optimizer has delay={optimizer.delay} but the gradients are "
                             f"delayed by {self.delay}: shifted momentum needs one buffer per slot")
        slot = (self._iteration - self.delay) % (self.delay + 1)
        records = self._slots[slot] if self._iteration >= self.delay else {}
        self._slots[slot] = {}
        self._iteration += 1
        if not records:
            return False
        applied = set()
        for rec in records.values():
            if rec.work is not None:
                rec.work.wait()
            for p, g in rec.grads:
                if p.grad is None:
                    p.grad = g.clone(memory_format=torch.preserve_format)
                else:
                    p.grad.copy_(g)
                applied.add(id(p))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in applied:
                    p.grad = None
        optimizer.step()
        return True

    def drain(self) -> None:
        """Wait for every all-reduce in flight and drop its gradient (call it before the
        process group is destroyed)."""
        for slot in self._slots:
            for rec in slot.values():
                if rec.work is not None:
                    rec.work.wait()
            slot.clear()


def delayed_allreduce_hook(state: DelayedGradients, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook of :class:`DelayedGradients`: starts the all-reduce of this bucket's
    average into the state's ring and returns the local gradient at once, so that DDP
    waits for no communication (``p.grad`` holds the local gradient until
    :meth:`DelayedGradients.step` replaces it)."""
    buffer = bucket.buffer()
    key = ("bucket", bucket.index())
    flat = state._buffer(key, buffer)
    torch.div(buffer, dist.get_world_size(state.process_group), out=flat)
    work = dist.all_reduce(flat, group=state.process_group, async_op=True)
    grads = []
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        # The gradients are views of the bucket's buffer: take the same view of ours.
        offset = g.storage_offset() - buffer.storage_offset()
        grads.append((p, flat.as_strided(g.shape, g.stride(), flat.storage_offset() + offset)))
    state._push(key, _Record(flat, work, grads))
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut

"""``||g||`` of every parameter from DDP's averaging pass (docs/algorithms.md section 1.1).

LARS needs the norm of each gradient before it writes. Under DDP every gradient is
already read and written once after the all-reduce: the division by the world size.
The comm hook here all-reduces (sums) each bucket, then runs ``mean_sum_squares_`` on it:
the division and every parameter's ``sum(g^2)`` in that same pass. The optimizer's step
hands those sums to ``lars_sgd_`` as ``norm_sq[1]`` and reads no gradient for its norm.

Usage::

    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = LARS(lars_param_groups(model, weight_decay=5e-5), lr=8.0, momentum=0.9)
    grad_norms.attach(ddp, opt)          # lbkernels.distributed.grad_norms
    for x, y in loader:
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()    # all-reduce, then divide + sums per bucket
        opt.step()                       # uses the sums that are still fresh

A sum is used only while it is **fresh**: the param's grad is still the view of the
bucket the hook wrote (``gradient_as_bucket_view=True``; without it DDP copies the
bucket into separate grads and the step computes ``||g||`` itself), and the bucket's
version counter, which its views share, is the one recorded right after the op. So
anything that writes the grads in place between the backward and the step
(``clip_grad_norm_``, a second backward, an edit by hand) makes the step compute that
norm itself. ``GradScaler.unscale_`` bumps no version counter; the step after it is
told apart by its arguments (``found_inf`` without ``grad_scale``) and computes every
norm. A write through ``.data`` has its own version
counter and is not seen: code that does that does not attach.

The all-reduce sums and the op then divides, where DDP's default hook divides first:
for a world size of 2 (a power of two) both give the same bits in fp32 unless the sum
overflows; for other sizes they differ by fp32 rounding.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects.
from collections import OrderedDict

import torch
import torch.distributed as dist

from .. import ops
from ..optim._base import FusedOptimizer, capturing


class _Slot:
    """Where one param's sum lives: its position in ``GradNorms.sums``, the address its
    grad (a bucket view) has, and the bucket whose version decides freshness."""

    __slots__ = ("position", "grad_ptr", "bucket")

    def __init__(self, position: int, grad_ptr: int, bucket: int):
        self.position, self.grad_ptr, self.bucket = position, grad_ptr, bucket


class _Layout:
    """One DDP bucket as the hook last saw it: its params (by identity), their sizes and
    the view of ``GradNorms.sums`` the op writes."""

    __slots__ = ("ids", "sizes", "start", "out")

    def __init__(self, ids: list[int], sizes: list[int], start: int, out: torch.Tensor):
        self.ids, self.sizes, self.start, self.out = ids, sizes, start, out


class _Fill:
    """The optimizer side of one optimizer bucket: its (2, n) ``norm_sq`` (row 0 = -1:
    ``||w||`` is computed by the op) and the positions of its params in ``sums``."""

    __slots__ = ("params", "generation", "slots", "index", "norm_sq")

    def __init__(self, params: list, generation: int, slots: list, index: torch.Tensor,
                 norm_sq: torch.Tensor):
        self.params, self.generation, self.slots = params, generation, slots
        self.index, self.norm_sq = index, norm_sq


# Optimizer bucket lists whose fill GradNorms keeps (a model's optimizer has one per
# param group and device; more only while the set of params with grads keeps changing).
_MAX_FILLS = 64


class GradNorms:
    """The state of :func:`grad_norms_hook`: every param's ``sum(g^2)`` of the averaged
    gradient (float64, in ``sums``), where each lives, and the buckets' versions.

    ``sums[j]`` is the param's ``||g||^2`` (the gradient as averaged, still loss-scaled
    under a ``GradScaler``), laid out bucket after bucket in the order DDP reduces
    them (bucket 0 first: DDP reduces its buckets in index order). DDP rebuilds its
    buckets after the first iteration; a bucket whose params changed gets a new layout.
    Allocates nothing per step after the first of each layout.
    """

    def __init__(self, n_params: int, device: torch.device,
                 process_group: dist.ProcessGroup | None = None, impl: str = "auto"):
        ops.check_impl(impl)
        self.process_group = process_group
        self.impl = impl
        self.sums = torch.full((n_params,), -1.0, dtype=torch.float64, device=device)
        self.generation = 0          # bumped whenever a bucket's layout changes
        self._layouts: dict[int, _Layout] = {}
        self._versions: list[int] = []   # per bucket: the buffer's version after the op
        self._slots: dict[int, _Slot] = {}   # id(param) -> _Slot
        # id(optimizer bucket's params list) -> _Fill, most recently used last. An
        # optimizer rebuilds its bucket lists when the set of params with grads changes;
        # the oldest entries (and the lists they keep alive) go beyond _MAX_FILLS.
        self._fills: OrderedDict[int, _Fill] = OrderedDict()

    # -- the hook side ----------------------------------------------------------------
    def layout(self, bucket: dist.GradBucket) -> _Layout:
        """The layout of ``bucket`` (recorded again when its params changed)."""
        b = bucket.index()
        params = bucket.parameters()
        ids = [id(p) for p in params]
        # Buckets are reduced in index order: this one starts where the previous ends.
        prev = self._layouts.get(b - 1)
        start = 0 if b == 0 or prev is None else prev.start + len(prev.sizes)
        known = self._layouts.get(b)
        if known is not None and known.ids == ids and known.start == start:
            return known
        if start + len(ids) > self.sums.numel():
            raise RuntimeError(f"DDP bucket {b} holds params beyond the {self.sums.numel()} "
                               "trainable parameters counted at attach(); attach again")
        sizes = [p.numel() for p in params]
        for j, (p, view) in enumerate(zip(params, bucket.gradients())):
            self._slots[id(p)] = _Slot(start + j, view.data_ptr(), b)
        while len(self._versions) <= b:
            self._versions.append(-1)
        layout = _Layout(ids, sizes, start, self.sums[start:start + len(ids)])
        self._layouts[b] = layout
        self.generation += 1
        return layout

    def reduced(self, bucket_index: int, layout: _Layout, buffer: torch.Tensor,
                world_size: int) -> torch.Tensor:
        """The all-reduced (summed) ``buffer``: divide it and take the sums, in one op."""
        ops.mean_sum_squares_(buffer, layout.sizes, world_size, layout.out, impl=self.impl)
        self._versions[bucket_index] = buffer._version
        return buffer

    # -- the optimizer side -----------------------------------------------------------
    def norm_sq(self, params: list[torch.Tensor], grads: list, adapts: bool,
                grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> torch.Tensor | None:
        """``lars_sgd_``'s ``norm_sq`` for one optimizer bucket of a group that ``adapts``
        (else None): row 0 all -1 (the op computes ``||w||``), row 1 the hook's
        ``||g||^2`` of each param whose sum is fresh, -1 where it is not; None when none
        is, in a compiled or captured step (these host checks would be frozen), and
        after ``GradScaler.unscale_``.

        ``GradScaler.unscale_`` rewrites the grads in place without bumping their version
        counters (torch 2.13: ``_amp_foreach_non_finite_check_and_unscale_`` does not);
        the step it leads to is the only one that gets ``found_inf`` without
        ``grad_scale`` from the scaler, which is how it is told apart."""
        if (not adapts or (found_inf is not None and grad_scale is None)
                or torch.compiler.is_compiling() or capturing()):
            return None
        fill = self._fills.get(id(params))
        if fill is None or fill.params is not params or fill.generation != self.generation:
            fill = self._fill(params)
        else:
            self._fills.move_to_end(id(params))
        versions = self._versions
        stale = [k for k, (s, g) in enumerate(zip(fill.slots, grads))
                 if s is None or g is None or g.data_ptr() != s.grad_ptr
                 or g._version != versions[s.bucket]]
        if len(stale) == len(params):
            return None
        row = fill.norm_sq[1]
        torch.index_select(self.sums, 0, fill.index, out=row)
        for k in stale:  # rare (a grad edited in place): a few small writes
            row[k] = -1.0
        return fill.norm_sq

    def _fill(self, params: list[torch.Tensor]) -> _Fill:
        slots = [self._slots.get(id(p)) for p in params]
        device = self.sums.device
        index = torch.tensor([0 if s is None else s.position for s in slots], dtype=torch.int64,
                             device=device)
        norm_sq = torch.full((2, len(params)), -1.0, dtype=torch.float64, device=device)
        fill = _Fill(params, self.generation, slots, index, norm_sq)
        self._fills.pop(id(params), None)
        self._fills[id(params)] = fill
        while len(self._fills) > _MAX_FILLS:
            self._fills.popitem(last=False)
        return fill


def grad_norms_hook(state: GradNorms, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce (sum) the bucket over ``state.process_group`` (the
    default group when None), then divide it by the group's size and record every
    param's ``sum(g^2)`` in one pass (``mean_sum_squares_``); returns the bucket."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = group.size()
    layout = state.layout(bucket)
    index = bucket.index()
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: state.reduced(index, layout, f.value()[0], world_size))


def attach(ddp_model: torch.nn.parallel.DistributedDataParallel, optimizer: torch.optim.Optimizer,
           impl: str = "auto") -> GradNorms:
    """Register :func:`grad_norms_hook` on ``ddp_model`` (instead of DDP's default
    averaging) and let ``optimizer`` take the gradient norms from it. Call once, before
    the first backward. ``impl`` picks the op's backend (``lbkernels.ops``).

    Only the optimizers with ``takes_grad_norms`` (:class:`~lbkernels.optim.LARS`,
    :class:`~lbkernels.optim.ShiftedMomentumSGD`) use the norms, in their groups that
    adapt (LARS trust ratios), through ``take_grad_norms``; any other optimizer
    still gets the averaged gradients, and the sums are not read. Create ``ddp_model``
    with ``gradient_as_bucket_view=True``: without it no sum is ever fresh, and the step
    computes every ``||g||`` itself."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    trained = [p for p in ddp_model.parameters() if p.requires_grad]
    if not trained:
        raise ValueError("ddp_model has no trainable parameters")
    state = GradNorms(len(trained), trained[0].device, ddp_model.process_group, impl)
    ddp_model.register_comm_hook(state, grad_norms_hook)
    if isinstance(optimizer, FusedOptimizer) and optimizer.takes_grad_norms:
        optimizer.take_grad_norms(state)
    return state

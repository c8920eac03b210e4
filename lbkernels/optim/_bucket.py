"""The lists one fused op call steps: a param group's params on one device, with state."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .. import _library, _sharded


class GradNormSource(Protocol):
    """What :meth:`FusedOptimizer.take_grad_norms` takes: the ``norm_sq`` argument of a
    bucket's op, computed outside the step (``lbkernels.distributed.grad_norms.GradNorms``)."""

    def norm_sq(self, params: list[torch.Tensor], grads: list, adapts: bool,
                grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> torch.Tensor | None:
        """Row 0 / row 1: ``||w||^2`` / ``||g||^2`` of each param (-1: not known, the op
        computes it), or None when none is known."""


class Bucket:
    """The params of one group on one device that have grads, and their state tensors.

    ``sharded``: some params are DTensors; the step then hands the op ``local()``, the
    same bucket over the local shards (sharded too: made every step, it keeps no norm
    cache nor held lists), with ``norm_sq`` (the global sums of squares of the sharded
    tensors, for the op's argument of that name) when the rule needs norms.
    ``w_norm``: lars_sgd_'s norm cache of this bucket (see :func:`norm_cache_arguments`),
    made on first use and dropped with the bucket.
    """

    __slots__ = ("index", "params", "state", "sharded", "norm_sq", "w_norm", "held")

    def __init__(self, index: list[int] | None, params: list[torch.Tensor],
                 state: dict[str, list[torch.Tensor]], norm_sq: torch.Tensor | None = None,
                 sharded: bool | None = None):
        self.index = index  # positions in the group's params; None: all of them, in order
        self.params = params
        self.state = state
        self.sharded = any(_sharded.is_sharded(p) for p in params) if sharded is None else sharded
        self.held = None  # an lbkernels.HeldLists of params and state, where the optimizer made one
        self.norm_sq = norm_sq
        self.w_norm: dict[str, torch.Tensor] | None = None

    def local(self, norm_sq: torch.Tensor | None) -> Bucket:
        """This bucket over the local shards of its DTensors (~5 us per DTensor), marked
        sharded."""
        return Bucket(self.index, _sharded.locals_of(self.params),
                      {name: _sharded.locals_of(ts) for name, ts in self.state.items()}, norm_sq,
                      sharded=True)


def iter_buckets(work: list):
    """(group, grads, bucket, the bucket's grads) of every bucket of ``work``."""
    for group, grads, buckets in work:
        for bucket in buckets:
            yield group, grads, bucket, grads if bucket.index is None else [grads[i] for i in bucket.index]


# The impl values under which a bucket's op may be its held op (the compiled kernel).
HELD_IMPLS = ("auto", "native")


def hold(bucket: Bucket, op: str, lists: list[list[torch.Tensor]], impl: str) -> bool:
    """Gives ``bucket`` its ``held``: an ``lbkernels.HeldLists`` of its params and of
    ``lists`` (the per-param lists that follow params and grads in ``op``'s arguments),
    so that its next steps run ``op``'s held op without converting those lists from
    Python (docs/algorithms.md section 1.2). Only where that op is the compiled library's
    on the CPU (the held op forwards to it; not yet run on a GPU), for a bucket of every
    param of its group (the held step needs every grad), unsharded, in an eager step.
    Returns whether the bucket holds its lists now."""
    if bucket.held is not None:
        return True
    if (bucket.index is not None or bucket.sharded or impl not in HELD_IMPLS
            or op + "held_" not in _library.HELD_OPS or bucket.params[0].device.type != "cpu"
            or not _library.has_native_kernel(op, "cpu") or torch.compiler.is_compiling()):
        return False
    bucket.held = _library.held_lists(bucket.params, lists)
    return True


def norm_arguments(bucket: Bucket) -> dict[str, Any]:
    """The op's ``norm_sq`` argument for ``bucket`` ({} unless it holds sharded params)."""
    return {} if bucket.norm_sq is None else {"norm_sq": bucket.norm_sq}


def norm_cache_arguments(bucket: Bucket, use: bool) -> dict[str, Any]:
    """lars_sgd_'s ``w_norm_sq`` / ``w_norm_key`` for ``bucket`` (docs/algorithms.md
    section 1), or {}: the caller's ``use`` says whether the group adapts, reuses norms and
    the step is not being captured in a CUDA graph (a replay runs no host code: the key
    check would be frozen at capture time). Never for a sharded bucket (its norms come in
    ``norm_sq``) nor in a compiled step (whose graph may run the op on functional copies).
    Made once per bucket (all "unknown"), then the same tensors every step: no allocation.
    """
    if not use or bucket.sharded or torch.compiler.is_compiling():
        return {}
    if bucket.w_norm is None:
        n = len(bucket.params)
        device = bucket.params[0].device
        bucket.w_norm = {"w_norm_sq": torch.full((n,), -1.0, dtype=torch.float64, device=device),
                         "w_norm_key": torch.zeros((2, n), dtype=torch.int64)}
    return bucket.w_norm

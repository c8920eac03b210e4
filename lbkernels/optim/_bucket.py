"""The lists one fused op call steps: a param group's params on one device, with state."""

from __future__ import annotations

from typing import Any

import torch

from .. import _sharded


class Bucket:
    """The params of one group on one device that have grads, and their state tensors.

    ``sharded``: some params are DTensors; the step then hands the op ``local()``, the
    same bucket over the local shards, with ``norm_sq`` (the global sums of squares of
    the sharded tensors, for the op's argument of that name) when the rule needs norms.
    """

    __slots__ = ("index", "params", "state", "sharded", "norm_sq")

    def __init__(self, index: list[int] | None, params: list[torch.Tensor],
                 state: dict[str, list[torch.Tensor]], norm_sq: torch.Tensor | None = None):
        self.index = index  # positions in the group's params; None: all of them, in order
        self.params = params
        self.state = state
        self.sharded = any(_sharded.is_sharded(p) for p in params)
        self.norm_sq = norm_sq

    def local(self, norm_sq: torch.Tensor | None) -> Bucket:
        """This bucket over the local shards of its DTensors (~5 us per DTensor)."""
        return Bucket(self.index, _sharded.locals_of(self.params),
                      {name: _sharded.locals_of(ts) for name, ts in self.state.items()}, norm_sq)


def iter_buckets(work: list):
    """(group, grads, bucket, the bucket's grads) of every bucket of ``work``."""
    for group, grads, buckets in work:
        for bucket in buckets:
            yield group, grads, bucket, grads if bucket.index is None else [grads[i] for i in bucket.index]


def norm_arguments(bucket: Bucket) -> dict[str, Any]:
    """The op's ``norm_sq`` argument for ``bucket`` ({} unless it holds sharded params)."""
    return {} if bucket.norm_sq is None else {"norm_sq": bucket.norm_sq}

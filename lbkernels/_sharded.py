"""Sharded parameters (``torch.distributed.tensor.DTensor``, e.g. FSDP2's ``fully_shard``).

The fused ops are elementwise except for the layer norms of the trust ratios, so a step
on DTensor parameters runs the same ops on the local shards (``to_local()``), with the
state kept as DTensors of the param's placements (``state_dict`` then works with
``torch.distributed.checkpoint`` as for torch's own optimizers). A trust ratio needs
``||w||`` and ``||g||`` of the *whole* tensor while each rank holds a shard: the step
computes every shard's local sums of squares, all-reduces them in one collective per
(process group, dtype), and hands the global sums to the op as its ``norm_sq``
argument (docs/algorithms.md section 1). A per-tensor ``vector_norm`` on DTensors
would issue one collective per tensor and norm: 2 x 161 on ResNet-50.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

# norm_sq entries the op computes itself: params not sharded, or without a trust ratio.
NOT_GIVEN = -1.0


class _NoDTensor:
    """Stands for DTensor while torch.distributed.tensor is not imported (importing it
    takes ~1-2 s): no tensor can be a DTensor then."""


def _dtensor() -> type:
    module = sys.modules.get("torch.distributed.tensor")
    return _NoDTensor if module is None else module.DTensor


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor())


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, _dtensor()) else t


def locals_of(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    dtensor = _dtensor()
    return [t.to_local() if isinstance(t, dtensor) else t for t in ts]


def shard_group(p: torch.Tensor) -> dist.ProcessGroup | None:
    """The process group over which the elements of ``p`` are split, or None when every
    rank holds all of them (a plain tensor, or a DTensor replicated on every mesh dim)."""
    if not is_sharded(p):
        return None
    dims = [d for d, placement in enumerate(p.placements) if placement.is_shard()]
    return p.device_mesh.get_group(dims[0]) if dims else None


def check_placements(i: int, p: torch.Tensor, owner: str) -> None:
    """Placements the step handles: Shard on at most one mesh dimension (FSDP2 on a 1-D
    mesh, or HSDP's (Replicate(), Shard(0))), Replicate on the others."""
    if not is_sharded(p):
        return
    placements = p.placements
    if any(pl.is_partial() for pl in placements):
        raise ValueError(f"params[{i}] is a DTensor with a Partial placement {placements}: "
                         f"{owner} needs the parameter's values, not pending sums")
    if sum(pl.is_shard() for pl in placements) > 1:
        raise ValueError(f"params[{i}] is sharded over {sum(pl.is_shard() for pl in placements)} "
                         f"mesh dimensions {placements}; {owner} supports one sharded dimension "
                         "(FSDP2, or HSDP's (Replicate(), Shard(0)))")


def local_sums_of_squares(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum of squares of each local shard, as one ``dtype`` vector (one fused norm pass;
    squaring the norm rounds once more: 1 ulp of ``dtype``)."""
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(norms).square()


def global_norm_sq(jobs: list[tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]],
                   ) -> list[torch.Tensor | None]:
    """``norm_sq`` for each job (the DTensor params, grads and "needs a norm" flags of one
    op call): a ``(2, n)`` tensor of the global sums of squares of every sharded w and g
    that needs a norm, ``NOT_GIVEN`` elsewhere; None for a job with nothing to give.

    One ``all_reduce`` per (process group, dtype) for all jobs together, whatever the
    number of tensors; the sums stay on the device (no host read).
    """
    # (group, dtype) -> [(job, position in the job)], in job order: every rank lists the
    # same entries in the same order (the optimizers hold the same params everywhere).
    entries: dict[tuple, list[tuple[int, int]]] = {}
    for j, (params, _, needs) in enumerate(jobs):
        dtype = _norm_dtype(params)
        for i, (p, need) in enumerate(zip(params, needs)):
            if need:
                group = shard_group(p)
                if group is not None:
                    entries.setdefault((group, dtype), []).append((j, i))
    out: list[torch.Tensor | None] = [None] * len(jobs)
    for (group, dtype), where in entries.items():
        ws = [jobs[j][0][i].to_local() for j, i in where]
        gs = [jobs[j][1][i].to_local() for j, i in where]
        sums = local_sums_of_squares(ws + gs, dtype)
        dist.all_reduce(sums, group=group)
        sums = sums.view(2, len(where))  # row 0: the weights, row 1: the gradients
        by_job: dict[int, tuple[list[int], list[int]]] = {}
        for k, (j, i) in enumerate(where):
            positions, ks = by_job.setdefault(j, ([], []))
            positions.append(i)
            ks.append(k)
        for j, (positions, ks) in by_job.items():
            if out[j] is None:
                params = jobs[j][0]
                out[j] = torch.full((2, len(params)), NOT_GIVEN, dtype=dtype,
                                    device=local(params[0]).device)
            out[j][:, positions] = sums[:, ks]
    return out


def _norm_dtype(params: list[torch.Tensor]) -> torch.dtype:
    # One norm_sq per op call: fp64 when any of its params is fp64 (their arithmetic is).
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def sum_sharded_columns(jobs: list[tuple[list[torch.Tensor], torch.Tensor]]) -> None:
    """For each job ``(params, sums)`` (``sums`` of shape ``(rows, len(params))``, local
    sums of squares such as the ``norm_sq`` that ``lamb_``'s moments stage writes), adds up
    over the shards, in place, the columns of the params that are sharded; the others
    already hold the whole tensor's sums. One ``all_reduce`` per (process group, dtype)
    for all jobs together; nothing is read on the host."""
    entries: dict[tuple, dict[int, list[int]]] = {}
    for j, (params, sums) in enumerate(jobs):
        for i, p in enumerate(params):
            group = shard_group(p)
            if group is not None:
                entries.setdefault((group, sums.dtype), {}).setdefault(j, []).append(i)
    for (group, _), columns in entries.items():
        parts = [jobs[j][1][:, index] for j, index in columns.items()]
        flat = torch.cat(parts, dim=1)
        dist.all_reduce(flat, group=group)
        for (j, index), part in zip(columns.items(), flat.split([len(c) for c in columns.values()], dim=1)):
            jobs[j][1][:, index] = part

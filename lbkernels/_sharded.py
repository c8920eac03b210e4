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


def global_norm_sq(jobs: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
                   ) -> list[torch.Tensor]:
    """``norm_sq`` for each job (the params and grads of one op call whose rule needs layer
    norms): a ``(2, n)`` tensor holding, for every sharded w and g, the sum of squares of
    the whole tensor (its shards' local sums added up by :func:`sum_sharded_columns`: one
    ``all_reduce`` per (process group, dtype) for all jobs together), and ``NOT_GIVEN``
    for the others, whose norms the op computes itself. Nothing is read on the host."""
    out = []
    for params, grads in jobs:
        dtype = _norm_dtype(params)
        norm_sq = torch.full((2, len(params)), NOT_GIVEN, dtype=dtype,
                             device=local(params[0]).device)
        index = [i for i, p in enumerate(params) if shard_group(p) is not None]
        if index:
            ws = [params[i].to_local() for i in index]
            gs = [grads[i].to_local() for i in index]
            norm_sq[:, index] = local_sums_of_squares(ws + gs, dtype).view(2, len(index))
        out.append(norm_sq)
    sum_sharded_columns([(params, norm_sq) for (params, _), norm_sq in zip(jobs, out)])
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
        parts = flat.split([len(index) for index in columns.values()], dim=1)
        for (j, index), part in zip(columns.items(), parts):
            jobs[j][1][:, index] = part

"""The cross-worker mean of parameters (docs/algorithms.md section 4, SWAP's phase 3).

See :func:`average_parameters`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.distributed as dist

from .. import _sharded, ops
from .._validate import tensor_list

# Flat buffers kept per process, keyed on the params' addresses and layouts. One entry
# is a copy of the averaged parameters (e.g. 102 MB for ResNet-50 in fp32), so only a
# few are kept: a job averages one model (or one per device) again and again.
_CACHE_ENTRIES = 4
_cache: OrderedDict[tuple, list[tuple[torch.Tensor, list[int], list[torch.Tensor]]]] = OrderedDict()


def _key(params: list[torch.Tensor]) -> tuple:
    # The buffer only has to fit the params; addresses, dtypes and shapes identify the
    # same tensors from call to call, and a stale hit with the same sizes is still valid.
    return tuple((p.data_ptr(), p.dtype, p.device, tuple(p.shape)) for p in params)


def _flat_buffers(params: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[int], list[torch.Tensor]]]:
    """Per dtype: (flat buffer, indices of its params, views of the buffer shaped as them)."""
    key = _key(params)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    out = []
    for dtype, index in groups.items():
        sizes = [params[i].numel() for i in index]
        flat = torch.empty(sum(sizes), dtype=dtype, device=params[0].device)
        views = [v.view(params[i].shape) for v, i in zip(flat.split(sizes), index)]
        out.append((flat, index, views))
    _cache[key] = out
    if len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    return out


def _check_params(params: list) -> None:
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a Tensor")
        if not p.is_floating_point() or p.layout != torch.strided:
            raise TypeError(f"params[{i}] must be a dense floating-point tensor, got {p.dtype} {p.layout}")
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {params[0].device}")
        if _sharded.is_sharded(p):
            # SWAP's phase 3 after independent phase-2 workers: under FSDP there are none.
            raise ValueError(f"params[{i}] is a DTensor (sharded, e.g. by FSDP2's fully_shard): "
                             "the ranks already hold one model between them, so there are no "
                             "per-worker copies to average; average independent models (DDP or "
                             "one process each)")


@torch.no_grad()
def average_parameters(params: torch.nn.Module | Iterable[torch.Tensor],
                       group: dist.ProcessGroup | None = None, *, impl: str = "auto") -> None:
    r"""Replace every parameter by its mean over the workers of ``group``, in place.

    .. math::  w \leftarrow \frac1K \sum_{k=1}^{K} w^{(k)}

    with ``K`` the size of ``group`` (``None``: the default group). Per dtype, the
    parameters are packed into one flat buffer (``torch._foreach_copy_`` into views of
    it: one pass over the weights, one fused launch on CUDA, no allocation), summed by
    ONE ``all_reduce`` over ``group``, and written back by one fused
    :func:`lbkernels.ops.worker_mean_` (``w = sum / K``, the division in fp32, fp64 for
    fp64 params). Every rank computes the same quotient from the same reduced sum, so
    all ranks end bitwise equal. The flat buffers are kept between calls for the same
    parameters (up to a few parameter sets), so steady-state calls allocate nothing.

    Only what is passed is averaged: give ``model.parameters()`` (or the module, whose
    parameters are taken) to leave batch-norm buffers alone, as SWAP does before it
    recomputes them (:func:`lbkernels.bn_stats.update_bn`).

    With no initialised process group, a group of one worker, or a rank outside
    ``group``, this returns without doing anything. The params must live where the
    group's backend communicates (CPU for gloo, CUDA for NCCL).

    Args:
        params: a module (its ``parameters()``) or an iterable of tensors on one device.
        group: the process group to average over; ``None`` for the default group.
        impl: backend of the write-back, as for every op in :mod:`lbkernels.ops`.
    """
    ops.check_impl(impl)
    params = tensor_list("params", params)
    _check_params(params)
    if not params or not dist.is_available() or not dist.is_initialized():
        return
    world_size = dist.get_world_size(group)  # -1 on a rank outside the group
    if world_size <= 1:
        return
    params = [p.detach() for p in params]
    for flat, index, views in _flat_buffers(params):
        torch._foreach_copy_(views, [params[i] for i in index])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        ops.worker_mean_([params[i] for i in index], flat, world_size, impl=impl)

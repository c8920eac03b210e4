"""``--parallel fsdp``: what it refuses, and its checkpoints of per-process shards.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, :meth:`Runtime.shard`) each process
holds a shard of every parameter and of the optimizer state (momentum buffers, the
averages of ``swa``: DTensors with the parameter's placements) and its own BatchNorm
buffers. A checkpoint is then one file per process plus the run's ``checkpoint.pt``:

- ``checkpoint.shard<R>.<G>.pt``, written by process ``R``: its local shards of the
  weights, its buffers, the method's state (optimizer, schedule, averager) with every
  DTensor as its local tensor, and its random generators; ``G`` counts the saves;
- ``checkpoint.pt``, written by the first process once every process has written its
  file: the options, loss scaler, data position, progress and metrics (the same on every
  process) and, under ``shards``, the world size, ``G`` and the SHA-256 of each shard
  file's content.

Every file is written as :func:`checkpoint.save` writes one (a temporary file, flushed,
renamed; content checksum; tensors and plain values only). ``checkpoint.pt`` is renamed
into place last, and a process deletes its shard files of earlier saves only after that
(a barrier), so a process killed at any moment leaves ``checkpoint.pt`` and every shard
file it names whole: the previous save or the new one. A resume reads the shards back
into DTensors of the same placements; it needs the same number of processes (a run
sharded over 2 is refused over 3, naming both: shards of another layout would have to be
cut again, which these files do not describe).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import checkpoint
from .checkpoint import OwnCheckpointError
from .config import ConfigError

# Methods that train under --parallel fsdp, and why the others cannot.
FSDP_METHODS = ("sgd", "lars", "lamb", "growing-batch", "swa")
_EXTRAP = ("each process steps from its own extrapolated point (the anchor minus gamma times "
           "its own previous gradient), which cannot exist when FSDP gives every process the "
           "same gathered weights")
FSDP_REFUSED = {
    "extrap": _EXTRAP,
    "extrap-postlocal": _EXTRAP + ", and post-local SGD needs each process's own model",
    "delayed": "its delayed all-reduce is a DDP comm hook; FSDP2 reduce-scatters the gradients "
               "itself, in the backward, with no comm hook",
    "async-sim": "it simulates the asynchronous workers in one process: there is no process "
                 "group to shard over",
    "swap": "its phase 2 trains independent models, one per process, which one model sharded "
            "over all processes cannot hold",
}
# Options of the allowed methods that cannot work with a sharded model.
_REFUSED_OPTIONS = {
    "max_micro_batch": "a process runs as many micro-batches as its share of the batch needs, "
                       "which differs between processes whose shares differ, while every FSDP "
                       "forward and backward is a collective all of them must join",
}
SHARDS_KEY = "shards"


def check_options(args: argparse.Namespace, world_size: int, state: dict | None) -> None:
    """Refuse ``--parallel fsdp`` where it cannot work, before any process group starts:
    one process (``world_size`` from torchrun's environment), a method or option it cannot
    serve, and a resume of a sharded run with another number of processes."""
    saved = (state or {}).get(SHARDS_KEY)
    if args.parallel != "fsdp":
        return  # resuming a sharded run with --parallel ddp: check_resume names the change
    if saved is not None and saved["world_size"] != world_size:
        raise ConfigError(f"--resume: the run was sharded over {saved['world_size']} processes and "
                          f"this job has {world_size}; resume it with --nproc_per_node="
                          f"{saved['world_size']} (its shard files hold that layout)")
    if world_size < 2:
        raise ConfigError("--parallel fsdp: shards the model over the processes of a torchrun job "
                          "and this is one process; start it with torchrun --nproc_per_node=K "
                          "(K >= 2), or use --parallel ddp")
    if args.method not in FSDP_METHODS:
        why = FSDP_REFUSED.get(args.method, "it is not one of the methods FSDP2 is known to serve")
        raise ConfigError(f"--method {args.method}: not with --parallel fsdp ({', '.join(FSDP_METHODS)} "
                          f"are): {why}")
    for name, why in _REFUSED_OPTIONS.items():
        if getattr(args, name, 0):
            raise ConfigError(f"--{name.replace('_', '-')}: not with --parallel fsdp: {why}")


# -- DTensors as their local shards and back --------------------------------------------------
def local_copies(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by a copy of its local shard (a copy: the shard
    may be a view of a larger padded buffer, all of which torch.save would write)."""
    if isinstance(obj, DTensor):
        return obj.to_local().detach().clone()
    if isinstance(obj, dict):
        return {k: local_copies(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(local_copies(v) for v in obj)
    return obj


def _like(saved: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``saved``, a local shard, as a DTensor laid out like ``template``."""
    if tuple(saved.shape) != tuple(template.to_local().shape):
        raise ValueError(f"a shard of shape {tuple(saved.shape)} where this process holds "
                         f"{tuple(template.to_local().shape)}")
    return DTensor.from_local(saved.to(template.device), template.device_mesh, template.placements,
                              run_check=False, shape=template.shape, stride=template.stride())


def sharded_like(saved: Any, template: Any) -> Any:
    """``saved`` (from :func:`local`) with a DTensor wherever ``template`` (the same
    structure, live) holds one."""
    if isinstance(template, DTensor) and isinstance(saved, torch.Tensor):
        return _like(saved, template)
    if isinstance(saved, dict) and isinstance(template, dict):
        return {k: sharded_like(v, template[k]) if k in template else v for k, v in saved.items()}
    if isinstance(saved, (list, tuple)) and isinstance(template, (list, tuple)) \
            and len(saved) == len(template):
        return type(saved)(sharded_like(s, t) for s, t in zip(saved, template))
    return saved


def optimizer_state_like(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer's saved state with the per-parameter tensors of sharded parameters as
    DTensors (before ``load_state_dict``, which would keep plain tensors). The state
    is keyed by the parameters' positions in the groups, as ``state_dict`` numbers them;
    a tensor of the parameter's local shape is one of its shards (not ``step``)."""
    params = {}
    for group, live in zip(saved["param_groups"], optimizer.param_groups):
        params.update(zip(group["params"], live["params"]))
    state = {}
    for index, entry in saved["state"].items():
        p = params.get(index)
        if isinstance(p, DTensor):
            entry = {k: _like(v, p) if k != "step" and isinstance(v, torch.Tensor) and v.dim()
                     else v for k, v in entry.items()}
        state[index] = entry
    return {**saved, "state": state}


# -- the files -----------------------------------------------------------------------------
_OWN = ("model", "method", "rng")  # what each process writes of its own


def _shard_path(out_dir: Path, rank: int, generation: int) -> Path:
    return out_dir / f"checkpoint.shard{rank}.{generation}.pt"


def save(out_dir: Path, main_path: Path, state: dict[str, Any], rank: int, world_size: int,
         generation: int) -> None:
    """Write save number ``generation`` of the run: this process's shard file, then (the
    first process, once every process has written its own) ``main_path``; then delete
    this process's shard files of other saves. Every process calls it."""
    own = local_copies({k: state[k] for k in _OWN})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _shard_path(out_dir, rank, generation)
    digest = checkpoint.save(path, own)
    digests: list[str | None] = [None] * world_size
    dist.all_gather_object(digests, digest)  # also: every shard file is on disk
    if rank == 0:
        main = {k: v for k, v in state.items() if k not in _OWN}
        main[SHARDS_KEY] = {"world_size": world_size, "generation": generation, "sha256": digests}
        checkpoint.save(main_path, main)
    dist.barrier()  # checkpoint.pt names this save: the earlier shards are no longer needed
    for stale in out_dir.glob(f"checkpoint.shard{rank}.*.pt"):
        if stale != path:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def load(run_dir: Path, main: dict[str, Any], rank: int, model: torch.nn.Module,
         plan: Any) -> dict[str, Any]:
    """The state this process resumes from: ``main`` (``checkpoint.pt``, already read)
    with this process's shard file of the same save, checked against the digest
    ``checkpoint.pt`` recorded for it, its shards made DTensors laid out as ``model``'s
    parameters and ``plan``'s state (the method's :class:`Plan`)."""
    shards = main[SHARDS_KEY]
    path = _shard_path(run_dir, rank, shards["generation"])
    try:
        own = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise OwnCheckpointError(str(e)) from None
    if checkpoint.content_digest(own) != shards["sha256"][rank]:
        raise OwnCheckpointError(f"{path}: not the shard file {run_dir / 'checkpoint.pt'} was "
                                 f"written with (its content differs); the run cannot be resumed")
    try:
        method = sharded_like(own["method"], plan.state_dict())
        method["optimizer"] = optimizer_state_like(own["method"]["optimizer"], plan.optimizer)
        weights = sharded_like(own["model"], model.state_dict())
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise OwnCheckpointError(f"{path}: does not fit this run ({e}); was it written by another "
                                 f"version of the command?") from None
    return {**main, **own, "model": weights, "method": method}

"""The processes of a run: one, or one per ``torchrun`` worker.

``torchrun`` describes the job in environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without them the run is a single
process. Collectives fail instead of waiting forever once ``--dist-timeout`` passes, so a
dead process ends the others' run with an error.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import ConfigError


@dataclass
class Runtime:
    """This process among those it trains with: ``rank`` of ``world_size``, whose
    collectives span ``group`` (None: every process of the job). A method that trains
    in sub-groups (SWAP's phase 2) gives the trainer a view made by :meth:`within`."""

    rank: int
    world_size: int
    device: torch.device
    group: Any = None
    job_rank: int | None = None  # rank in the whole job; None: ``rank``
    sharded: bool = False  # --parallel fsdp: the model is sharded by FSDP2, not wrapped in DDP

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The job's first process: the one that reports and writes the checkpoint."""
        return (self.rank if self.job_rank is None else self.job_rank) == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes."""
        if self.distributed:
            dist.all_reduce(t, group=self.group)
        return t

    def data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the steps call: ``model`` itself in a single process or when sharded (FSDP2
        modules reduce their own gradients), else ``model`` in a DistributedDataParallel
        over this runtime's processes."""
        if not self.distributed or self.sharded:
            return model
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            process_group=self.group)

    def within(self, group: Any, rank: int, world_size: int) -> Runtime:
        """This process as rank ``rank`` of the ``world_size`` processes of ``group``:
        collectives, data shares and test shares become the group's; the job's first
        process stays the one that reports."""
        job_rank = self.rank if self.job_rank is None else self.job_rank
        return Runtime(rank, world_size, self.device, group, job_rank, self.sharded)

    def shard(self, model: nn.Module) -> nn.Module:
        """``model`` (on its device), sharded in place by FSDP2 when ``sharded`` (before
        an optimizer is built on its parameters, which become DTensors); else as it is.

        The unit of sharding is every direct child module that holds parameters (the
        models of the command are ``nn.Sequential``s of layers and residual blocks),
        then the model itself (whatever parameters are left), over a 1-D mesh of all
        the processes: each block's weights are all-gathered for its forward and
        backward and freed after, and its gradients reduce-scattered (averaged, as DDP
        averages). Buffers (BatchNorm's running statistics) are not sharded and stay
        each process's own (see :meth:`gathered`)."""
        if not self.sharded:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh, reshard_after_forward=True)
        # The root keeps its (few) parameters gathered from forward to backward, as FSDP2
        # does by default for the root.
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        return model

    @contextlib.contextmanager
    def gathered(self, model: nn.Module):
        """A block in which the forward passes of ``model`` run without collectives, so
        that the processes may run different numbers of them (evaluation on test shares
        of different sizes, update_bn): a sharded model's weights are all-gathered once
        on entry and kept until the exit, and the BatchNorm statistics of process 0 are
        broadcast to every process, which makes one model evaluated everywhere: the one
        DDP evaluates (DDP broadcasts process 0's buffers before every forward, so
        process 0's statistics evolve from its own batches alone, as they do here)."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        for b in model.buffers():
            dist.broadcast(b, src=0, group=self.group)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(m is not model, recurse=False)

    def first_error(self, message: str | None) -> str | None:
        """The first process's (by job rank) error among every process's ``message``
        (None: no error), the same on every process of the job: for a check that only
        some processes make or that may come out differently on each, after which all
        must stop together or go on together."""
        if not dist.is_initialized():
            return message
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        return next((m for m in messages if m is not None), None)

    def close(self, finished: bool = False) -> None:
        """Leave the job. ``finished`` (every process ran to the end): first wait until
        all have done their last collective, so that none tears its connections down
        while a peer still uses them. Then the process groups go, and with them (once
        nothing else holds them) gloo's threads."""
        if dist.is_initialized():
            if finished and self.distributed:
                with contextlib.suppress(RuntimeError):  # a peer already lost
                    dist.barrier()
            dist.destroy_process_group()
        gc.collect()


def first_process() -> bool:
    """Whether this is the job's first process (``RANK`` 0), the one that prints what
    every process would; a process not started by torchrun is."""
    return os.environ.get("RANK", "0") == "0"


def in_a_job() -> bool:
    """Whether torchrun started this process among others (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def job_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup(args) -> Runtime:
    """Pick the device and join the process group (when started by torchrun)."""
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"--device cuda: LOCAL_RANK {local_rank} but only "
                              f"{torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        if args.batch_size < world_size:
            raise ConfigError(f"--batch-size: {args.batch_size} is less than one sample for "
                              f"each of the {world_size} processes")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=args.dist_timeout))
        # Every process writes to (or reads from) the directory the first one names.
        shared = [args.out_dir]
        dist.broadcast_object_list(shared, src=0)
        args.out_dir = shared[0]
    return Runtime(rank, world_size, device, sharded=args.parallel == "fsdp")

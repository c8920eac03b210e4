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
        """What the steps call: ``model`` itself in a single process, else ``model`` in a
        DistributedDataParallel over this runtime's processes."""
        if not self.distributed:
            return model
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            process_group=self.group)

    def within(self, group: Any, rank: int, world_size: int) -> Runtime:
        """This process as rank ``rank`` of the ``world_size`` processes of ``group``:
        collectives, data shares and test shares become the group's; the job's first
        process stays the one that reports."""
        job_rank = self.rank if self.job_rank is None else self.job_rank
        return Runtime(rank, world_size, self.device, group, job_rank)

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
    return Runtime(rank, world_size, device)

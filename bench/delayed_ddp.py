"""Steps per second of delayed-gradient data parallelism against synchronous DDP.

``python -m bench.delayed_ddp [--hidden 2048 --layers 3 --batch 16 --steps 20 --rounds 9]``

Two processes (gloo on the loopback interface, ``torch.multiprocessing``) train a wide
MLP on synthetic data: few FLOPs per parameter (a small per-process batch), so that the
all-reduce of the gradients is a sizeable share of a step. Variants, each its own model
and optimizer (:class:`~lbkernels.optim.ShiftedMomentumSGD` of the variant's delay, so the
update costs the same everywhere):

- ``local``: no communication at all (the bound any overlap can reach);
- ``ddp``: ``DistributedDataParallel`` as it comes: the all-reduce of each bucket overlaps
  the rest of the backward, and the step waits for the last one;
- ``delayed-0``: the delayed comm hook with ``tau = 0`` (the step waits for this step's
  all-reduce: the cost of the hook itself);
- ``delayed-1``: ``tau = 1``: the all-reduce of step ``t`` overlaps the forward and
  backward of step ``t + 1``.

Every round runs every variant for ``--steps`` steps, in an order that rotates from round
to round, so that drifts of a shared machine hit all of them alike; the table gives
medians over rounds, and the ratio of ``delayed-1`` to ``ddp`` is the median of the
per-round ratios. A timed segment ends with ``DelayedGradients.drain()``, so it pays for
the all-reduce it leaves in flight.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lbkernels.distributed import DelayedGradients, delayed_allreduce_hook
from lbkernels.optim import ShiftedMomentumSGD, lars_param_groups

VARIANTS = ("local", "ddp", "delayed-0", "delayed-1")
WORLD = 2


def _mlp(args: argparse.Namespace) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(args.inputs, args.hidden), nn.ReLU()]
    for _ in range(args.layers - 1):
        layers += [nn.Linear(args.hidden, args.hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(args.hidden, 10))


class _Variant:
    def __init__(self, name: str, args: argparse.Namespace):
        torch.manual_seed(0)
        self.model = _mlp(args)
        self.delayed = None
        tau = int(name.split("-")[1]) if name.startswith("delayed") else 0
        self.net: nn.Module = self.model
        if name != "local":
            self.net = DistributedDataParallel(self.model)
        if name.startswith("delayed"):
            self.delayed = DelayedGradients(tau)
            self.net.register_comm_hook(self.delayed, delayed_allreduce_hook)
        self.opt = ShiftedMomentumSGD(lars_param_groups(self.model, 5e-4), lr=1e-3, momentum=0.9, delay=tau)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(x), y).backward()
        if self.delayed is None:
            self.opt.step()
        else:
            self.delayed.step(self.opt)

    def finish(self) -> None:
        if self.delayed is not None:
            self.delayed.drain()


def _worker(rank: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, args.inputs, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        variants = {name: _Variant(name, args) for name in VARIANTS}
        for v in variants.values():  # DDP builds its final buckets after the first steps
            for _ in range(3):
                v.step(x, y)
            v.finish()
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for name in order:
                v = variants[name]
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    v.step(x, y)
                v.finish()
                elapsed = time.perf_counter() - t0
                # The pair runs in lockstep: the slower process sets the rate.
                t = torch.tensor([elapsed], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                rates[name].append(args.steps / t.item())
        if rank == 0:
            results.put(rates)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.delayed_ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=3, help="hidden layers")
    p.add_argument("--batch", type=int, default=16, help="samples per process and step")
    p.add_argument("--steps", type=int, default=20, help="steps per timed segment")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)

    params = sum(q.numel() for q in _mlp(args).parameters())
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(_worker, args=(_free_port(), args, results), nprocs=WORLD, join=True)
    rates = results.get()

    print(f"{WORLD} processes, gloo on loopback, {args.threads} torch thread(s) each; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical CPUs")
    print(f"MLP {args.inputs}-{'-'.join([str(args.hidden)] * args.layers)}-10: {params / 1e6:.2f}M "
          f"parameters ({4 * params / 2**20:.0f} MiB of fp32 gradients), batch {args.batch} per "
          f"process; {args.rounds} rounds x {args.steps} steps per variant\n")
    base = statistics.median(rates["ddp"])
    print(f"| variant | steps/s (median) | min-max | vs ddp |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        med = statistics.median(rates[name])
        print(f"| {name} | {med:.2f} | {min(rates[name]):.2f}-{max(rates[name]):.2f} | {med / base:.2f}x |")
    ratios = [d / s for d, s in zip(rates["delayed-1"], rates["ddp"])]
    print(f"\ndelayed-1 / ddp, per round: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()

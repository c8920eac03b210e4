"""LARS under FSDP2: ``python -m bench.sharded [--worlds 2 3] [--reps 11]``.

For each world size, that many processes (gloo on loopback, spawned by this module) hold
the ResNet-50 parameter set of ``bench.params`` as a module of parameters, sharded with
``torch.distributed.fsdp.fully_shard`` layer by layer (each conv / linear weight with the
norm weight and bias that follow it is one FSDP unit, then the root), so every parameter
is a DTensor ``Shard(0)`` over a 1-D mesh; the gradients are DTensors of the same
placements (fixed seed, 1e-3 of a standard normal). Variants, each on its own copy, step
in turn round after round in one process per rank (``bench.harness``'s approach):

- ``lbkernels LARS``: ``LARS(lars_param_groups(model, wd))``: the fused op on the local
  shards, the layer norms' sums of squares all-reduced together;
- ``LARS timm-style loop``: ``bench.params.TimmStyleLARS`` run on the DTensors as it is
  (per-param ``norm`` of w and g, trust ratio, momentum buffer): DTensor turns every norm
  into a collective;
- ``SGD foreach``: ``torch.optim.SGD(foreach=True)``, no LARS: the floor;
- ``SGD foreach, local shards``: the same over the local shards as plain tensors (what
  DTensor's dispatch adds to the floor).

A round's time of a variant is the slowest rank's (the ranks step in lockstep and meet
at a barrier before each step); the table gives medians over rounds. Collectives and
bytes per step are counted over one further step per variant by a dispatch mode that
sees DTensor's functional collectives and plain ``torch.distributed`` calls alike
(:class:`CollectiveCounter`, cross-checked against torch's ``CommDebugMode``); bytes are
the tensors this rank hands to the collectives (its payload, before the algorithm's own
traffic).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .harness import header
from .params import HP, TimmStyleLARS, make_params, resnet50_shapes

# glibc reads the malloc threshold when a process starts: set here, before the spawn, as
# the Makefile's BENCH_ENV sets it; one thread per process by default (2-3 processes on
# this 2-core machine).
BENCH_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
LARS_HP = dict(HP, trust_coefficient=0.001)


# -- the module --------------------------------------------------------------------------
def layer_shapes() -> list[list[tuple[int, ...]]]:
    """The ResNet-50 shapes grouped as FSDP users wrap them: a weight of ndim >= 2 with
    the 1-D parameters that follow it (its norm's weight and bias; the fc bias)."""
    layers: list[list[tuple[int, ...]]] = []
    for s in resnet50_shapes():
        if len(s) >= 2 or not layers:
            layers.append([s])
        else:
            layers[-1].append(s)
    return layers


class Layer(nn.Module):
    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t) for t in tensors])


class ParamModel(nn.Module):
    """The parameter set as layers of parameters (no forward: only the step is timed)."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        layers, i = [], 0
        for shapes in layer_shapes():
            layers.append(Layer(tensors[i:i + len(shapes)]))
            i += len(shapes)
        self.layers = nn.ModuleList(layers)


def sharded_model(mesh) -> nn.Module:
    """A fresh ParamModel sharded by fully_shard per layer, grads set as DTensors."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    full = make_params(resnet50_shapes())  # the same on every rank: seed 0
    model = ParamModel([p.detach() for p in full])
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for p, f in zip(model.parameters(), full):
        # src_data_rank=None: each rank takes its own chunk of the (identical) full grad.
        p.grad = distribute_tensor(f.grad, p.device_mesh, p.placements, src_data_rank=None)
    return model


def variants() -> dict[str, Callable[[nn.Module], object]]:
    from lbkernels.optim import LARS, lars_param_groups

    return {
        "lbkernels LARS": lambda m: LARS(lars_param_groups(m, HP["weight_decay"]), lr=HP["lr"],
                                         momentum=HP["momentum"], trust_coefficient=0.001),
        "LARS timm-style loop": lambda m: TimmStyleLARS(m.parameters(), **LARS_HP),
        "SGD foreach": lambda m: torch.optim.SGD(m.parameters(), foreach=True, **HP),
        # The same on the local shards as plain tensors: what DTensor's dispatch costs.
        "SGD foreach, local shards": lambda m: torch.optim.SGD(local_shards(m), foreach=True, **HP),
    }


def local_shards(model: nn.Module) -> list[torch.Tensor]:
    """Each DTensor parameter's local shard (a view of its storage), its grad's beside it."""
    out = []
    for p in model.parameters():
        t = p.to_local().detach()
        t.grad = p.grad.to_local()
        out.append(t)
    return out


# -- counting collectives ----------------------------------------------------------------
def collective_counter():
    """A CommDebugMode that also sums the bytes of the tensors handed to each collective
    it counts (the functional ``_c10d_functional`` ops DTensor issues and the ``c10d``
    ops behind ``dist.all_reduce`` and friends)."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops
    from torch.utils._pytree import tree_flatten

    counted = c10d_collective_ops | {op for op in (
        getattr(torch.ops._c10d_functional, name) for name in (
            "all_reduce", "all_reduce_coalesced", "all_gather_into_tensor",
            "all_gather_into_tensor_coalesced", "reduce_scatter_tensor",
            "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast"))}

    class CollectiveCounter(CommDebugMode):
        def __init__(self):
            super().__init__()
            self.calls, self.bytes = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if out is not NotImplemented and not isinstance(func, torch._ops.HigherOrderOperator) \
                    and func._overloadpacket in counted:
                self.calls += 1
                self.bytes += sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs))[0]
                                  if isinstance(t, torch.Tensor))
            return out

    return CollectiveCounter()


def check_counter() -> None:
    """The counter sees one functional all-reduce (a DTensor norm made replicated) and
    one plain ``dist.all_reduce``, with their bytes: else the counts below are wrong."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x = distribute_tensor(torch.ones(12, 4), mesh, [Shard(0)], src_data_rank=None)
    with collective_counter() as c:
        x.norm().redistribute(mesh, [Replicate()])
        dist.all_reduce(torch.ones(5, dtype=torch.float64))
    total = c.get_total_counts()
    if (c.calls, total, c.bytes) != (2, 2, 4 + 40):
        raise RuntimeError(f"collective counter broken: {c.calls} calls ({total} by CommDebugMode), "
                           f"{c.bytes} bytes; expected 2 calls of 4 + 40 bytes")


# -- one rank ----------------------------------------------------------------------------
def _rank(rank: int, world: int, store: str, args: argparse.Namespace, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        check_counter()
        mesh = init_device_mesh("cpu", (world,))
        opts, skipped = {}, {}
        for name, make in variants().items():
            if args.variants and not any(v in name for v in args.variants):
                continue
            try:
                opts[name] = make(sharded_model(mesh))
                opts[name].step()  # state, and whether it runs on DTensors at all
            except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
                skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                opts.pop(name, None)
        times: dict[str, list[float]] = {name: [] for name in opts}
        for r in range(args.warmup + args.reps):
            for name, opt in opts.items():
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                dt = time.perf_counter() - t0
                if r >= args.warmup:
                    times[name].append(dt)
        counts = {}
        for name, opt in opts.items():
            dist.barrier()
            with collective_counter() as c:
                opt.step()
            counts[name] = (c.calls, c.get_total_counts(), c.bytes)
        # The slowest rank's time per round (after the timing: this all-reduce is not counted).
        rows = []
        for name in opts:
            t = torch.tensor(times[name], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rows.append(dict(world=world, variant=name, ms=statistics.median(t.tolist()) * 1e3,
                             calls=counts[name][0], commdebug=counts[name][1], bytes=counts[name][2]))
        if rank == 0:
            results.put(dict(rows=rows, skipped=skipped))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), args, results), nprocs=world,
                           join=True, start_method="spawn")
    return results.get()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sharded", description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3], help="process counts")
    # 11 rounds, not bench's 21: a round of the timm-style loop takes 2-6 s here (805
    # collectives of ~3 ms on loopback gloo), and 21 made a run of both worlds ~7 minutes.
    ap.add_argument("--reps", type=int, default=11, help="measured rounds per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="+", help="run only variants whose name contains one of these")
    args = ap.parse_args(argv)
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(header())
    n = sum(torch.Size(s).numel() for s in resnet50_shapes())
    print(f"ResNet-50 set: {len(resnet50_shapes())} tensors, {n / 1e6:.1f}M fp32 parameters, "
          f"{len(layer_shapes())} FSDP units + root; lr {HP['lr']}, momentum {HP['momentum']}, "
          f"weight decay {HP['weight_decay']} (LARS: lars_param_groups, trust coefficient 0.001)")
    print("| processes | variant | median ms (slowest rank) | x SGD foreach | collectives/step | "
          "bytes sent/step/rank |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    verdicts = []
    for world in args.worlds:
        out = run_world(world, args)
        base = {r["variant"]: r["ms"] for r in out["rows"]}.get("SGD foreach")
        for r in out["rows"]:
            if r["calls"] != r["commdebug"]:
                sys.exit(f"{r['variant']}: {r['calls']} collectives counted, CommDebugMode saw {r['commdebug']}")
            ratio = f"{r['ms'] / base:.2f}" if base else "-"
            print(f"| {world} | {r['variant']} | {r['ms']:.2f} | {ratio} | {r['calls']} | "
                  f"{r['bytes']} |")
        for name, why in out["skipped"].items():
            print(f"| {world} | {name} | skipped: {why} | | | |")
        verdicts.append(verdict(world, out["rows"]))
    for line in verdicts:
        print(line)


def verdict(world: int, rows: list[dict]) -> str:
    """The targets: lbkernels LARS >= 3x faster than the timm-style loop on DTensors, with
    <= 1/50 of its collectives."""
    by = {r["variant"]: r for r in rows}
    ours, timm = by.get("lbkernels LARS"), by.get("LARS timm-style loop")
    if ours is None or timm is None:
        return f"{world} processes: targets not measured (a LARS variant is missing)"
    speed, calls = timm["ms"] / ours["ms"], ours["calls"] / max(timm["calls"], 1)
    return (f"{world} processes: timm-style / lbkernels LARS = {speed:.1f}x (target >= 3x: "
            f"{'met' if speed >= 3 else 'missed'}); collectives {ours['calls']} / {timm['calls']} = "
            f"1/{1 / calls if calls else float('inf'):.0f} (target <= 1/50: {'met' if calls <= 1 / 50 else 'missed'})")


if __name__ == "__main__":
    main()

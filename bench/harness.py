"""Timing and tables shared by the step benchmarks (``python -m bench``,
``python -m bench.bench_averaging``): interleaved rounds, medians, the machine header.

Every variant steps its own copy of the same parameter set in turn, round after round,
in one process, so that drifts of this shared machine hit all of them alike; the rows
give medians, the ratio to the anchor ``torch.optim.SGD(fused=True)`` and effective
bandwidth counted at 20 bytes per fp32 parameter (read w, g, buf; write w, buf: the
minimum of a momentum step) unless the variant says otherwise (``BYTES_PER_PARAM``: 28
for ExtrapSGD, AdamW and LAMB).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch

import lbkernels

from .params import ANCHOR, PARAM_SETS, make_params

BYTES_PER_PARAM = 20


def parser(description: str, sets: list[str]) -> argparse.ArgumentParser:
    """The options every step benchmark takes: parameter sets, rounds, device."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sets", nargs="+", default=sets, choices=list(PARAM_SETS))
    ap.add_argument("--reps", type=int, default=21, help="measured rounds per variant (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def start() -> None:
    """Threads as OMP_NUM_THREADS says (torch may pick otherwise), then the header."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(header())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _copy(p: torch.nn.Parameter) -> torch.nn.Parameter:
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    return q


def measure(set_name: str, device: str, reps: int, variants: dict[str, Callable], warmup: int = 3,
            only: list[str] | None = None, shapes: list[tuple[int, ...]] | None = None,
            dtype: torch.dtype = torch.float32) -> list[dict]:
    """Median step time of each of ``variants`` (name -> factory of an optimizer over a
    parameter list) on ``set_name`` (or on ``shapes`` of ``dtype``, named so), stepping
    them in turn round after round; ``only``: the variants whose name contains one of
    these, and the anchor. On CUDA a step is timed by events around it (the GPU's time
    from the step's first launch to its last kernel's end), elsewhere by the clock."""
    shapes = PARAM_SETS[set_name]() if shapes is None else shapes
    vs = variants
    if only:  # the anchor always runs: the ratios are to it
        vs = {k: v for k, v in vs.items() if k == ANCHOR or any(o in k for o in only)}
    opts, params = {}, {}
    base = make_params(shapes, dtype=dtype, device=device)  # drawn once: 256M values take seconds
    for name, make in vs.items():
        params[name] = [_copy(p) for p in base]
        opts[name] = make(params[name])
    del base
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device == "cuda" else None
    n = sum(p.numel() for p in next(iter(params.values())))
    times: dict[str, list[float]] = {name: [] for name in vs}
    faults: dict[str, list[int]] = {name: [] for name in vs}
    for r in range(warmup + reps):
        for name, opt in opts.items():
            if hasattr(opt, "prepare"):  # work outside the step (ExtrapSGD's gradient capture)
                opt.prepare()
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            if events:
                events[0].record()
            opt.step()
            if events:
                events[1].record()
            sync(device)
            dt = events[0].elapsed_time(events[1]) / 1e3 if events else time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    anchor = statistics.median(times[ANCHOR])
    rows = []
    for name in vs:
        med = statistics.median(times[name])
        rows.append(dict(set=set_name, variant=name, ms=med * 1e3, ratio=med / anchor,
                         gbs=getattr(opts[name], "BYTES_PER_PARAM", BYTES_PER_PARAM) * n / med / 1e9,
                         faults=statistics.median(faults[name]),
                         params=n, tensors=len(shapes)))
    return rows


def header() -> str:
    return (f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus; "
            f"torch {torch.__version__}; lbkernels {lbkernels.__version__}; "
            f"cpu capability {cpu_capability()}; threads {torch.get_num_threads()}; "
            f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def cpu_capability() -> str:
    try:  # the compiled extension is optional: without it lbkernels runs the reference ops
        from lbkernels import _C

        return _C.cpu_capability()
    except ImportError:
        return "none (reference only)"


def table(rows: list[dict]) -> str:
    lines = ["| set | variant | median ms | x SGD fused | GB/s @20B/param (ExtrapSGD, AdamW, LAMB 28) | page faults/step |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['set']} ({r['tensors']} tensors, {r['params'] / 1e6:.1f}M) | {r['variant']} | "
                     f"{r['ms']:.2f} | {r['ratio']:.2f} | {r['gbs']:.1f} | {r['faults']:.0f} |")
    return "\n".join(lines)

"""Interleaved benchmark of one optimizer step: ``python -m bench [--sets ...] [--reps N]``.

Every variant steps the same parameter set in turn, round after round, in one process,
so that drifts of this shared machine hit all of them alike; the table reports medians,
the ratio to ``torch.optim.SGD(fused=True)`` and effective bandwidth counted at 20 bytes
per fp32 parameter (read w, g, buf; write w, buf: the minimum of a momentum step), 28 for
ExtrapSGD (which also reads the local gradient and writes the anchor).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

import torch

import lbkernels
from lbkernels import _library
from lbkernels.optim import LARS

from .params import PARAM_SETS, ExtrapSGDWithLocalGrads, ForeachLARS, TimmStyleLARS, make_params

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-5)
BYTES_PER_PARAM = 20


def variants(device: str) -> dict:
    out = {
        "SGD foreach": lambda ps: torch.optim.SGD(ps, foreach=True, **HP),
        "SGD fused": lambda ps: torch.optim.SGD(ps, fused=True, **HP),
        "LARS timm-style loop": lambda ps: TimmStyleLARS(ps, **HP),
        "LARS torch._foreach_": lambda ps: ForeachLARS(ps, **HP),
    }
    if _library.has_native_kernel("lars_sgd_", device):
        out[f"lbkernels LARS native-{device}"] = lambda ps: LARS(ps, impl="native", **HP)
    from .averaging import averaging_variants  # SWA with the LARS step (bench/averaging.py)

    out.update(averaging_variants(device, HP))
    if _library.has_native_kernel("extrap_sgd_", device):
        out[f"lbkernels ExtrapSGD native-{device}"] = lambda ps: ExtrapSGDWithLocalGrads(ps, **HP)
    if device == "cuda":
        from lbkernels import triton as lbk_triton

        if lbk_triton.available("cuda")[0]:
            out["lbkernels LARS triton"] = lambda ps: LARS(ps, impl="triton", **HP)
    return out


def skipped(device: str) -> list[str]:
    notes = []
    if not torch.cuda.is_available():
        notes.append("native-cuda and triton columns skipped: no CUDA device")
    if not _library.has_native_kernel("lars_sgd_", device):
        notes.append(f"native-{device} skipped: {lbkernels.native_unavailable_reason}")
    return notes


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(set_name: str, device: str, reps: int, warmup: int = 3, only: list[str] | None = None) -> list[dict]:
    shapes = PARAM_SETS[set_name]()
    vs = variants(device)
    if only:  # the anchor always runs: the ratios are to it
        vs = {k: v for k, v in vs.items() if k == "SGD fused" or any(o in k for o in only)}
    opts, params = {}, {}
    for name, make in vs.items():
        params[name] = make_params(shapes, device=device)
        opts[name] = make(params[name])
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
            opt.step()
            sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    anchor = statistics.median(times["SGD fused"])
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
    try:
        from lbkernels import _C

        return _C.cpu_capability()
    except ImportError:
        return "none (reference only)"


def table(rows: list[dict]) -> str:
    lines = ["| set | variant | median ms | x SGD fused | GB/s @20B/param (ExtrapSGD 28) | page faults/step |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['set']} ({r['tensors']} tensors, {r['params'] / 1e6:.1f}M) | {r['variant']} | "
                     f"{r['ms']:.2f} | {r['ratio']:.2f} | {r['gbs']:.1f} | {r['faults']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(PARAM_SETS), choices=list(PARAM_SETS))
    ap.add_argument("--reps", type=int, default=21, help="measured rounds per variant (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="+", help="run only variants whose name contains one of these")
    args = ap.parse_args(argv)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(header())
    for note in skipped(args.device):
        print("note:", note)
    rows = []
    for s in args.sets:
        rows += measure(s, args.device, args.reps, only=args.variants)
    print(table(rows))


if __name__ == "__main__":
    main()

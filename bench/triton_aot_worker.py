"""The compiling side of ``bench/triton_aot.py``: run by it in a fresh process (the
pinned Triton's Python, no TRITON_INTERPRET), it compiles every variant for sm_90 and
prints the report. Exit status 0 when all compiled without (unknown) spills, 1 otherwise,
``SKIPPED`` where Triton or its ptxas is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import multiprocessing
import re
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SKIPPED = 75
ARCH = 90
_variants: list = []  # set before the pool forks: a task is an index


def load_variants(path: Path | None) -> list:
    if path is None:
        from bench import triton_aot_kernels as module
    else:
        spec = importlib.util.spec_from_file_location(f"triton_aot_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # Triton reads the kernels' source through it
        spec.loader.exec_module(module)
    return module.variants()


def ptxas_path() -> str:
    """Triton's ptxas for sm_90; RuntimeError when missing."""
    from triton import knobs

    return knobs.nvidia.ptxas.path


def usage(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ptxas -v's log of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise RuntimeError(f"no register or spill counts in the ptxas log: {log!r}")
    return {"regs": int(regs.group(1)), "stack": int(frame.group(1)),
            "spills": int(frame.group(2)) + int(frame.group(3))}


def compile_one(i: int) -> dict:
    """Variant ``i`` compiled to PTX and cubin for sm_90: its registers, stack frame and
    spills, or the error. A stack frame alone is no spill: libdevice's sinf/cosf keep a
    28-byte array there for arguments past 105615."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    v = _variants[i]
    names = v.fn.arg_names
    unknown = sorted((set(v.signature) | set(v.constexprs)) - set(names))
    untyped = [n for n in names if n not in v.signature and n not in v.constexprs]
    if unknown or untyped:
        return {"error": f"the variant's arguments differ from the kernel's: unknown {unknown}, "
                         f"untyped {untyped}"}
    signature = {n: "constexpr" if n in v.constexprs else v.signature[n] for n in names}
    # The allocator's addresses are 16-byte aligned; Triton's launcher marks them so.
    attrs = {(k,): BaseBackend.parse_attr("D") for k, n in enumerate(names)
             if signature[n].startswith("*")}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        # TRITON_DUMP_PTXAS_LOG (set by work) prints the log of ptxas -v, as Triton ran it.
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(v.fn, signature=signature,
                                              constexprs=v.constexprs, attrs=attrs),
                                    target=GPUTarget("cuda", ARCH, 32),
                                    options={"num_warps": v.num_warps})
        if not kernel.asm.get("ptx") or not kernel.asm.get("cubin"):
            raise RuntimeError(f"no PTX or cubin, only {sorted(kernel.asm)}")
        counts = usage(log.getvalue())
    except Exception as e:  # noqa: BLE001  (every failure is reported, none stops the others)
        lines = [line for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
        return {"error": "\n      ".join(lines[:12]), "seconds": time.perf_counter() - start}
    return {**counts, "shared": kernel.metadata.shared, "seconds": time.perf_counter() - start}


def report(results: list[dict], verbose: bool) -> list[str]:
    """Per kernel: variants, registers (min-max), stack frame, spills and shared memory
    (bytes per thread, per block); then the failures: errors, and spills beyond a
    variant's ``known_spills``."""
    by_kernel = defaultdict(list)
    for v, r in zip(_variants, results):
        by_kernel[v.kernel].append((v, r))
        if verbose:
            what = r.get("error") or (f"{r['regs']} regs, stack {r['stack']} B, "
                                      f"spills {r['spills']} B, shared {r['shared']} B")
            print(f"  {v.kernel} [{v.label}]: {what} ({r['seconds']:.1f} s)")
    print(f"{'kernel':28} {'variants':>8} {'regs':>7} {'stack B':>7} {'spill B':>7} "
          f"{'shared B':>8} {'failed':>6}")
    failures, notes = [], []
    for kernel, rows in by_kernel.items():
        ok = [r for _, r in rows if "error" not in r]
        regs = [r["regs"] for r in ok]
        bad = []
        for v, r in rows:
            known, why = v.known_spills
            if "error" in r:
                bad.append(f"{kernel} [{v.label}]: {r['error']}")
            elif r["spills"] > known:
                bad.append(f"{kernel} [{v.label}]: {r['spills']} B of spill stores and loads "
                           f"({r['regs']} regs, {r['stack']} B stack frame)"
                           + (f", {known} B known" if known else ""))
            elif r["spills"]:
                notes.append(f"{kernel} [{v.label}]: {r['spills']} B spilled, known: {why}")
        span = f"{min(regs)}-{max(regs)}" if regs else "-"
        most = {k: max((r[k] for r in ok), default=0) for k in ("stack", "spills", "shared")}
        print(f"{kernel:28} {len(rows):8} {span:>7} {most['stack']:7} {most['spills']:7} "
              f"{most['shared']:8} {len(bad):6}")
        failures += bad
    for line in notes:
        print(f"known {line}")
    return failures


def work(kernels: Path | None, jobs: int, verbose: bool) -> int:
    try:
        import triton
    except ImportError as e:
        print(f"triton not found: skipped ({e})")
        return SKIPPED
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        ptxas = ptxas_path()
    except Exception as e:  # noqa: BLE001  (a missing or broken binary: Triton says which)
        print(f"ptxas not found: skipped ({e})")
        return SKIPPED
    _variants[:] = load_variants(kernels)
    interpreted = sorted({v.kernel for v in _variants if type(v.fn).__name__ != "JITFunction"})
    if interpreted:
        print(f"kernels defined under the interpreter cannot be compiled: {interpreted}; "
              "unset TRITON_INTERPRET")
        return 1
    ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True,
                                   text=True).stdout.strip().splitlines()[-1]
    print(f"sm_{ARCH}, triton {triton.__version__}, ptxas {ptxas_version}: "
          f"{len(_variants)} variants of {len({v.kernel for v in _variants})} kernels, "
          f"{jobs} jobs", flush=True)
    start = time.perf_counter()
    if jobs == 1 or len(_variants) == 1:
        results = [compile_one(i) for i in range(len(_variants))]
    else:
        # fork: the children inherit the variants (jit functions are not pickled).
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(compile_one, range(len(_variants))))
    failures = report(results, verbose)
    compile_s = sum(r["seconds"] for r in results)
    print(f"compiled in {time.perf_counter() - start:.0f} s ({compile_s:.0f} s of compiling)")
    for line in failures:
        print(f"FAILED {line}")
    if failures:
        print(f"{len(failures)} of {len(results)} variants failed")
        return 1
    print("Triton AOT check passed")
    return 0

"""The GPU benchmark table of ``make gpu-proof``: ``python -m bench.gpu_table --out DIR [--tiny]``.

One optimizer step per row, the rows of a set stepping in turn round after round
(``bench.harness.measure``: medians, CUDA events on a GPU), on four parameter sets:
ResNet-50's 161 tensors in fp32 and in bf16, 2000 tensors of 1000 elements, and one
tensor of 256M elements. Rows: LARS, ExtrapSGD (stepping with local gradients),
ShiftedMomentumSGD (delay 1) and LARS with SWA folded into its pass
(``WeightAverager(fused_with=...)``), each with ``impl="native"`` and ``"triton"``;
against ``torch.optim.SGD(fused=True)`` (the anchor of the ratios), ``SGD(foreach=True)``,
timm's per-tensor LARS loop, LARS from ``torch._foreach_`` ops and that LARS under
``torch.compile``; and ``dst.copy_(src)`` of the set's bytes, the bandwidth a pass
over memory reaches here, which every row's bandwidth is divided by.

Byte model (effective bandwidth = bytes / median step time): the least traffic of the
algorithm, in passes over tensors of the params' element size E (4 for fp32, 2 for
bf16) per parameter, plus the fp32 average of SWA:

- a momentum step (both SGDs, LARS in every form, ShiftedMomentumSGD): 5 E (read w, g,
  buf; write w, buf). LARS's norm pass re-reads w and g (2 E more) and is not counted:
  its cost shows as a lower bandwidth;
- ExtrapSGD: 7 E (read x, buf, g, g^k; write x, buf, w);
- LARS+SWA: 5 E + 8 (the fp32 average read and written);
- the copy: 2 E (read src, write dst).

Each set's rows are appended to ``DIR/rows.jsonl`` as soon as they are measured, so a
run stopped by its time limit keeps what it finished. ``torch.compile``'s LARS is
measured apart (with the anchor), so that its compilation, which grows with the number
of tensors, can only cost its own row. ``--tiny``: small shapes, one round and
``torch.compile``'s eager backend (inductor's C++ build takes minutes on a CPU): every
row's code in seconds, for the dry run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from lbkernels import _library
from lbkernels.optim import LARS, ShiftedMomentumSGD

from .harness import measure, start
from .params import ANCHOR, HP, ExtrapSGDWithLocalGrads, FoldedSWALARS, ForeachLARS, TimmStyleLARS, resnet50_shapes

ROWS = "rows.jsonl"
COPY = "copy dst.copy_(src)"
COMPILED = "LARS torch.compile (foreach)"
IMPLS = ("native", "triton")

# name -> (shapes, dtype). 256M = 2^28 elements: 1 GiB of fp32 per tensor. The 2000
# tensors come last: torch.compile's time grows with the number of tensors, and a stage
# stopped by its limit keeps the sets before.
SETS = {
    "resnet50 fp32": (resnet50_shapes, torch.float32),
    "resnet50 bf16": (resnet50_shapes, torch.bfloat16),
    "1x256M fp32": (lambda: [(256 * 2**20,)], torch.float32),
    "2000x1000 fp32": (lambda: [(1000,)] * 2000, torch.float32),
}
# Tiny stand-ins of the same kinds (a conv weight, its norm's vectors, many small, one
# large): the Triton rows run in the interpreter, milliseconds per tensor.
TINY_SETS = {
    "resnet50 fp32": (lambda: [(8, 3, 3, 3), (8,), (8,)], torch.float32),
    "resnet50 bf16": (lambda: [(8, 3, 3, 3), (8,), (8,)], torch.bfloat16),
    "1x256M fp32": (lambda: [(4096,)], torch.float32),
    "2000x1000 fp32": (lambda: [(10,)] * 5, torch.float32),
}


class CopyStep:
    """``dst.copy_(src)`` of as many bytes as the set's params: what one pass reaches."""

    def __init__(self, params):
        n = sum(p.numel() for p in params)
        self.src = torch.ones(n, dtype=params[0].dtype, device=params[0].device)
        self.dst = torch.empty_like(self.src)

    def step(self):
        self.dst.copy_(self.src)


class CompiledLARS(ForeachLARS):
    """``ForeachLARS``'s step under ``torch.compile``. The buffers start at zero, which
    gives the first step's ``buf = d`` too, so that one graph serves every step."""

    def __init__(self, params, backend="inductor", **hp):
        super().__init__(params, **hp)
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self._compiled = torch.compile(super().step, backend=backend)

    def step(self):
        self._compiled()


# Fused rows: name -> (factory(params, impl), the op of lbkernels.ops it calls,
# passes of the params' dtype, fp32 bytes) per parameter.
FUSED = {
    "LARS": (lambda ps, impl: LARS(ps, impl=impl, **HP), "lars_sgd_", 5, 0),
    "ExtrapSGD": (lambda ps, impl: ExtrapSGDWithLocalGrads(ps, impl=impl, **HP), "extrap_sgd_", 7, 0),
    "ShiftedMomentumSGD": (lambda ps, impl: ShiftedMomentumSGD(ps, delay=1, impl=impl, **HP), "lars_sgd_", 5, 0),
    "LARS+SWA": (lambda ps, impl: FoldedSWALARS(ps, impl=impl, **HP), "lars_sgd_", 5, 8),
}
# The rows a user has without lbkernels: name -> (factory, passes, fp32 bytes).
OTHERS = {
    COPY: (CopyStep, 2, 0),
    ANCHOR: (lambda ps: torch.optim.SGD(ps, fused=True, **HP), 5, 0),
    "SGD foreach": (lambda ps: torch.optim.SGD(ps, foreach=True, **HP), 5, 0),
    "LARS timm-style loop": (lambda ps: TimmStyleLARS(ps, **HP), 5, 0),
    "LARS torch._foreach_": (lambda ps: ForeachLARS(ps, **HP), 5, 0),
    COMPILED: (CompiledLARS, 5, 0),
}


def row_names() -> list[str]:
    """Every row of a set, in table order."""
    return [*OTHERS, *(f"{name} {impl}" for name in FUSED for impl in IMPLS)]


def byte_model(variant: str) -> tuple[int, int]:
    """(passes of the params' dtype, fp32 bytes) per parameter of ``variant``."""
    if variant in OTHERS:
        return OTHERS[variant][1:]
    return FUSED[variant.rpartition(" ")[0]][2:]


def unavailable(impl: str, op: str, device: str) -> str | None:
    """Why ``impl`` cannot run ``op`` on ``device`` here, or None."""
    if impl == "native":
        return None if _library.has_native_kernel(op, device) else f"no native {op} kernel on {device}"
    from lbkernels import triton as lbk_triton  # optional: imported only for its rows

    ok, why = lbk_triton.available(device)
    return None if ok else why


def set_variants(device: str, backend: str) -> tuple[dict, dict, dict]:
    """(the main rows, the compiled row with the anchor, {row: why skipped})."""
    main = {name: make for name, (make, *_) in OTHERS.items() if name != COMPILED}
    skipped = {}
    for name, (make, op, *_) in FUSED.items():
        for impl in IMPLS:
            why = unavailable(impl, op, device)
            if why:
                skipped[f"{name} {impl}"] = why
            else:
                main[f"{name} {impl}"] = lambda ps, make=make, impl=impl: make(ps, impl)
    compiled = {ANCHOR: main[ANCHOR], COMPILED: lambda ps: CompiledLARS(ps, backend=backend, **HP)}
    return main, compiled, skipped


def with_bandwidth(rows: list[dict], dtype: torch.dtype, copy_gbs: float | None) -> list[dict]:
    """``rows`` with the byte model's bandwidth and its ratio to the copy's."""
    size = torch.empty((), dtype=dtype).element_size()
    for r in rows:
        passes, fp32_bytes = byte_model(r["variant"])
        r.update(dtype=str(dtype).removeprefix("torch."), bytes_per_param=passes * size + fp32_bytes)
        r["gbs"] = r["bytes_per_param"] * r["params"] / (r["ms"] / 1e3) / 1e9
        r["x_copy"] = r["gbs"] / copy_gbs if copy_gbs else None
    return rows


def run_set(set_name: str, shapes: list, dtype: torch.dtype, device: str, reps: int, warmup: int,
            backend: str) -> list[dict]:
    """Every row of one set: measured, skipped (with why) or failed (with the error)."""
    main, compiled, skipped = set_variants(device, backend)
    out = [dict(set=set_name, variant=v, skipped=why) for v, why in skipped.items()]
    copy_gbs = None
    for variants in (main, compiled):
        try:
            rows = measure(set_name, device, reps, variants, warmup=warmup, shapes=shapes, dtype=dtype)
        except Exception as e:  # one failing row must not cost the table: reported instead
            out += [dict(set=set_name, variant=v, error=f"{type(e).__name__}: {e}".splitlines()[0])
                    for v in variants if v != ANCHOR or variants is main]
            continue
        if variants is compiled:  # the anchor was measured with the main rows already
            rows = [r for r in rows if r["variant"] != ANCHOR]
        copy_gbs = copy_gbs or next((2 * r["params"] * torch.empty((), dtype=dtype).element_size()
                                     / (r["ms"] / 1e3) / 1e9 for r in rows if r["variant"] == COPY), None)
        out += with_bandwidth(rows, dtype, copy_gbs)
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def load_rows(out: Path) -> list[dict]:
    path = out / ROWS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def table(rows: list[dict]) -> str:
    lines = ["| set | row | median ms | x SGD fused | GB/s (bytes/param) | x copy |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['set']} | {r['variant']} | {r.get('skipped') or r.get('error')} | | | |")
            continue
        x_copy = "" if r["x_copy"] is None else f"{r['x_copy']:.2f}"
        lines.append(f"| {r['set']} | {r['variant']} | {r['ms']:.3f} | {r['ratio']:.2f} | "
                     f"{r['gbs']:.1f} ({r['bytes_per_param']}) | {x_copy} |")
    return "\n".join(lines)


def auto_pick(rows: list[dict]) -> dict[str, str]:
    """Per op of the fused rows: "triton" where the geometric mean over sets and rows of
    triton / native step time is below 1, else "native". Ops without both measured are
    left out (``impl="auto"`` keeps native for them)."""
    ms = {(r["set"], r["variant"]): r["ms"] for r in rows if "ms" in r}
    logs: dict[str, list[float]] = {}
    for name, (_, op, *_) in FUSED.items():
        for s in {r["set"] for r in rows}:
            native, triton = ms.get((s, f"{name} native")), ms.get((s, f"{name} triton"))
            if native and triton:
                logs.setdefault(op, []).append(math.log(triton / native))
    return {op: "triton" if sum(v) / len(v) < 0 else "native" for op, v in sorted(logs.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help=f"folder of {ROWS}")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, one round, eager torch.compile (dry run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=21, help="measured rounds per row (median reported)")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # the Triton rows run in the interpreter (read when the kernels load)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    start()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ROWS).unlink(missing_ok=True)
    reps, warmup, backend = (1, 0, "eager") if args.tiny else (args.reps, 3, "inductor")
    failed = 0
    for set_name, (shapes, dtype) in (TINY_SETS if args.tiny else SETS).items():
        rows = run_set(set_name, shapes(), dtype, args.device, reps, warmup, backend)
        failed += sum("error" in r for r in rows)
        with open(args.out / ROWS, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(table(rows), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

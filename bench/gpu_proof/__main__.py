"""``python -m bench.gpu_proof --out DIR [--dry-run]``: the stages of the GPU proof (see
``bench/gpu_proof/__init__.py``), their time limits, and the summary.

Time limits, seconds on one H200 (16 cores), adding up to 570; with this process's own
start and report (importing torch, ~10 s) under 10 minutes. How each was made:

- build 170: ``bash csrc/cuda/check.sh`` compiles every kernel for two architectures
  (sm_80, sm_90) and the three host files, one after another, in 2 min 16 s on two busy
  cores here; the build compiles the same for one architecture, in parallel over 16
  cores (MAX_JOBS), plus the C++ files (a few seconds each here) and the CPU loops (9
  compiles in series, 2-5 s each here);
- tests 140: 269 CUDA tests, whose collection and skipping take 3 s here; on the GPU
  Triton compiles each kernel specialisation once (about 1 s each, some dozens);
- bench 160: four sets of 15 rows, 24 rounds each, milliseconds a step but for timm's
  loop over 2000 tensors (~16,000 launches, ~0.1 s a step); drawing 2 x 256M random
  values takes seconds; inductor compiles the foreach LARS once per set, tens of seconds
  for hundreds of tensors (the 2000-tensor set comes last); every row's dry run takes
  ~6 s here;
- train 100: nine methods, 24 steps of ResNet-20 at batch 4096 each (~100,000 images: a
  few seconds at the tens of thousands of images/s of an H200) with the evaluation of
  1024 images and the plot; the tiny run of one method takes ~10 s here, mostly imports
  (dynamo, matplotlib) paid once per process.

The dry run interrupts nothing: its stages take seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
BUDGETS = {"build": 170, "tests": 140, "bench": 160, "train": 100}
# Before a stage over its limit is killed, SIGINT lets it finish its files (pytest writes
# its JUnit XML and summary on an interrupt) for this long.
GRACE_S = 15
# The CUDA part of the suite: test ids carry "native-cuda" / "triton-cuda" (helpers.py's
# backend_params), CUDA-only tests "cuda" in their names. test_cuda_build.py compiles the
# sources for machines without a GPU (minutes of nvcc) and is left to `make cuda-check`.
TEST_ARGS = ["-k", "cuda", "--ignore=python_tests/test_cuda_build.py", "-p", "no:cacheprovider", "-rs",
             "--durations=10", "--maxfail=20"]
# The H200's capability stands in for the GPU a dry run does not have.
DRY_RUN_ARCH = "9.0"


def device_info() -> dict:
    """Versions, device and the build's architecture list (torch only: lbkernels is
    imported by the stages, after the build)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME  # where the build looks for nvcc

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    nvcc = shutil.which("nvcc") or (CUDA_HOME and shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")))
    git = shutil.which("git") and subprocess.run([shutil.which("git"), "rev-parse", "--short", "HEAD"],
                                                 cwd=ROOT, capture_output=True, text=True).stdout.strip()
    nvcc_version = nvcc and subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=version("triton"), timm=version("timm"), setuptools=version("setuptools"),
                ninja=shutil.which("ninja") is not None, cpus=os.cpu_count(),
                commit=git or None,
                nvcc=nvcc_version and next((x for x in nvcc_version.splitlines() if "release" in x), None))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(device=torch.cuda.get_device_name(), arch=f"{major}.{minor}")
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})", arch=None)
    return info


def stage_commands(name: str, out: Path, dry: bool, info: dict) -> tuple[list[list[str]], dict]:
    """The commands of stage ``name`` (run in turn) and its environment additions."""
    if name == "build":
        env = dict(TORCH_CUDA_ARCH_LIST=info["arch"] or DRY_RUN_ARCH, MAX_JOBS=str(os.cpu_count()))
        check = [PY, "-c", "import lbkernels; print('native kernels:', "
                           "lbkernels.native_unavailable_reason or 'loaded')"]
        return [[PY, "setup.py", "build_ext", "--inplace"], check], env
    if name == "tests":
        timeout = ["--timeout=120"] if importlib.util.find_spec("pytest_timeout") else []
        return [[PY, "-m", "pytest", "python_tests", "-q", *TEST_ARGS, *timeout,
                 f"--junitxml={out / 'tests.xml'}"]], {}
    tiny = ["--tiny"] if dry else []
    if name == "bench":
        return [[PY, "-m", "bench.gpu_table", "--out", str(out / "bench"), *tiny]], {}
    methods = ["--methods", "lars"] if dry else []  # one method: each start takes seconds here
    return [[PY, "-m", "bench.gpu_proof.train", "--out", str(out / "train"), *tiny, *methods]], {}


def run_stage(name: str, out: Path, dry: bool, info: dict) -> dict:
    """Run stage ``name`` under its time limit; its record (commands, status, seconds)."""
    commands, env = stage_commands(name, out, dry, info)
    record = dict(stage=name, budget_s=BUDGETS[name], env=env, commands=[" ".join(c) for c in commands],
                  log=f"{name}.log", status="ok")
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        log.write(f"env: {env}\n")
        if dry and name == "build":  # no nvcc run: the command line and what it needs
            log.write("dry run, not run: " + " ; ".join(record["commands"]) + "\n")
            record.update(status="dry run: not run", nvcc=info["nvcc"] is not None,
                          setup_py=(ROOT / "setup.py").exists())
            return record
        for cmd in commands:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            left = BUDGETS[name] - (time.perf_counter() - start)
            rc = run_with_limit(cmd, {**os.environ, **env}, log, left)
            if rc != 0:
                record["status"] = "timed out" if rc is None else f"exit {rc}"
                break
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def run_with_limit(cmd: list[str], env: dict, log, limit_s: float) -> int | None:
    """``cmd``'s exit status, or None when it ran past ``limit_s`` and was stopped."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.write(f"\nstopped: past the stage's limit of {limit_s:.0f} s\n")
        return None


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a JUnit XML file ({} when absent)."""
    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def train_table(rows: list[dict]) -> str:
    lines = ["| method | status | images/s (last epoch) | optimizer ms/step | optimizer share |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "images_per_s" in r:
            lines.append(f"| {r['method']} | ok | {r['images_per_s']:,.0f} | "
                         f"{r['optimizer_ms_per_step']:.2f} | {100 * r['optimizer_share']:.1f}% |")
        else:
            lines.append(f"| {r['method']} | {r['status']} | | | |")
    return "\n".join(lines)


def report(out: Path, info: dict, stages: list[dict], dry: bool) -> dict:
    """(e): auto_pick.json, summary.json and summary.md under ``out``."""
    from bench import gpu_table  # imports lbkernels: only once the build is done

    rows, train = gpu_table.load_rows(out / "bench"), read_jsonl(out / "train" / "train.jsonl")
    pick = gpu_table.auto_pick(rows)
    (out / "auto_pick.json").write_text(json.dumps(pick, indent=1) + "\n")
    summary = dict(dry_run=dry, info=info, stages=stages, tests=junit_counts(out / "tests.xml"),
                   bench=rows, train=train, auto_pick=pick)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    stage_lines = ["| stage | status | seconds | limit s |", "| --- | --- | ---: | ---: |"]
    stage_lines += [f"| {s['stage']} | {s['status']} | {s.get('seconds', '')} | {s['budget_s']} |" for s in stages]
    md = [f"# GPU proof{' (dry run)' if dry else ''}", "",
          "; ".join(f"{k} {v}" for k, v in info.items()), "", *stage_lines, "",
          f"CUDA tests: {summary['tests']}", "", "## Benchmark (bench/gpu_table.py)", "",
          "Median step time (CUDA events); GB/s: the least bytes per parameter of the "
          "algorithm (in brackets; the byte model is in bench/gpu_table.py) over it; x copy: "
          "that over the bandwidth of dst.copy_(src) of the set's bytes.", "",
          gpu_table.table(rows), "", "## Training throughput (bench/gpu_proof/train.py)", "",
          "images/s: the command's figure for the last epoch; optimizer: CUDA events around "
          "every Optimizer.step (torch's global step hooks), its share of the last epoch's time.",
          "", train_table(train), "", "## auto_pick (copy auto_pick.json to lbkernels/triton/ to ship it)",
          "", json.dumps(pick)]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder of every log, table and figure")
    ap.add_argument("--dry-run", action="store_true", help="rehearse every stage a CPU can")
    ap.add_argument("--stages", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = device_info()
    if not args.dry_run and info["arch"] is None:
        print("gpu_proof: no CUDA device; --dry-run rehearses the stages on a CPU", file=sys.stderr)
        return 2
    print(json.dumps(info), flush=True)
    stages = []
    for name in args.stages:
        stages.append(run_stage(name, out, args.dry_run, info))
        print(json.dumps(stages[-1]), flush=True)
    report(out, info, stages, args.dry_run)
    print(f"summary: {out / 'summary.md'}")
    return 0 if all(s["status"] in ("ok", "dry run: not run") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())

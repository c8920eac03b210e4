"""Ahead-of-time compile check of the Triton kernels for sm_90 (``make triton-aot-check``).

The kernels otherwise run only under ``TRITON_INTERPRET=1`` on machines without a GPU,
and the interpreter forgives what the compiler does not (type errors, constexpr misuse,
unsupported ops, register and shared-memory limits). Triton's compiler needs no GPU: each
variant of ``bench/triton_aot_kernels.py`` (every kernel the backend launches, with the
argument types and constexprs its launchers can give it) is compiled to PTX and a cubin
for ``GPUTarget("cuda", 90, 32)`` by Triton's bundled ptxas. A compile error, a register
spill or any other local memory (the cubin's LOCAL or STACK bytes, from the bundled
cuobjdump) fails the check. The report gives per kernel the variants compiled, the most
registers per thread and the spills (local bytes / 4, Triton's ``n_spills``).

The compiling Triton is the GPU machine's (``--triton``, pinned in the Makefile as
TRITON_AOT_VERSION), installed with torch (the version constraints.txt pins) in a venv
of its own under ${LBK_CACHE_DIR:-~/.cache/lbkernels}; where that venv cannot be built
(no network), the Triton installed beside this Python compiles, and the report says
which version did. The kernels are imported in a fresh process without TRITON_INTERPRET:
kernels defined under the interpreter cannot be compiled.

A passing run is cached in the same folder, keyed on lbkernels/triton/*.py, these two
files and the Triton version: unchanged sources are not compiled again (minutes on two
cores). Exits 0 with "... not found: skipped" where Triton or ptxas is missing.

    python bench/triton_aot.py [--triton 3.6.0 | --installed] [--jobs N] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: bench.* importable

from bench.triton_aot_worker import SKIPPED, work  # noqa: E402  (imports no Triton)


def cache_dir() -> Path:
    """csrc/check_common.sh's cache folder."""
    home = os.environ.get("HOME", "/tmp")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return Path(os.environ.get("LBK_CACHE_DIR") or os.path.join(base, "lbkernels"))


def pinned_version() -> str:
    """TRITON_AOT_VERSION of the Makefile."""
    return re.search(r"^TRITON_AOT_VERSION\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(),
                     re.M).group(1)


def torch_pin() -> str:
    """The torch requirement constraints.txt pins (torch==X)."""
    return re.search(r"^torch==\S+", (ROOT / "constraints.txt").read_text(), re.M).group(0)


def pinned_python(version: str) -> tuple[str | None, str]:
    """(the Python of a venv with triton==version and torch, or None, what happened).
    The venv is built once; a marker file says it is complete."""
    venv = cache_dir() / f"triton-{version}-venv"
    python = venv / "bin" / "python"
    marker = venv / "complete"
    if marker.exists() and python.exists():
        return str(python), f"venv {venv}"
    shutil.rmtree(venv, ignore_errors=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--retries", "1"]
    numpy = re.search(r"^numpy==\S+", (ROOT / "constraints.txt").read_text(), re.M).group(0)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             pip + [torch_pin(), numpy],
             # Last, without dependencies: a torch that requires another triton is overruled.
             pip + ["--no-deps", f"triton=={version}"]]
    print(f"building {venv} (torch, triton=={version}) ...", flush=True)
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
            return None, f"building the triton=={version} venv failed: {' / '.join(tail)}"
    marker.write_text(f"{torch_pin()} triton=={version}\n")
    return str(python), f"venv {venv} (built)"


def source_key(version: str) -> str:
    """The cache key: the kernels, this check's files and the compiling Triton's version."""
    digest = hashlib.sha256(f"triton {version}\n".encode())
    files = sorted((ROOT / "lbkernels" / "triton").glob("*.py"))
    for path in files + sorted((ROOT / "bench").glob("triton_aot*.py")):
        digest.update(f"{path.relative_to(ROOT)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_worker(python: str, args, log_path: Path | None) -> int:
    """The worker in a fresh process (no TRITON_INTERPRET), its output shown and, when it
    passes, kept at ``log_path``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["LBK_DISABLE_NATIVE"] = "1"  # the compiled C++ ops play no part here
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default, stated to silence its warning
    cmd = [python, str(Path(__file__)), "--worker", "--jobs", str(args.jobs)]
    cmd += ["--kernels", str(args.kernels)] if args.kernels else []
    cmd += ["--verbose"] if args.verbose else []
    with tempfile.TemporaryDirectory() as triton_cache:
        # A fresh Triton cache: every variant is compiled, none is read back.
        env["TRITON_CACHE_DIR"] = triton_cache
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        rc = proc.wait()
    if rc == 0 and log_path is not None:
        for old in log_path.parent.glob("triton-aot-*.log"):
            old.unlink()
        partial = log_path.with_suffix(".partial")
        partial.write_text("".join(lines))
        partial.replace(log_path)
    return 0 if rc == SKIPPED else rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", default=None,
                        help="Triton version to compile with "
                             "(default: the Makefile's TRITON_AOT_VERSION)")
    parser.add_argument("--installed", action="store_true",
                        help="compile with the Triton installed beside this Python")
    parser.add_argument("--kernels", type=Path, default=None,
                        help="a file whose variants() gives the variants "
                             "(default: triton_aot_kernels.py); not cached")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--force", action="store_true", help="compile even when a pass is cached")
    parser.add_argument("--verbose", action="store_true", help="one line per variant")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.kernels is not None and not args.kernels.is_file():
        parser.error(f"--kernels: no such file {args.kernels}")
    if args.worker:
        return work(args.kernels, args.jobs, args.verbose)

    python, how = sys.executable, "installed beside this Python, --installed"
    if not args.installed:
        python, how = pinned_python(args.triton or pinned_version())
        if python is None:
            print(f"{how}; compiling with the Triton installed beside this Python instead")
            python, how = sys.executable, "installed beside this Python"
    try:
        query = "import importlib.metadata as m; print(m.version('triton'))"
        version = subprocess.run([python, "-c", query],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError:
        print(f"triton not found: skipped (none installed for {python})")
        return 0
    print(f"triton {version} ({how})", flush=True)
    log_path = None
    if args.kernels is None:
        log_path = cache_dir() / f"triton-aot-{source_key(version)}.log"
        if log_path.exists() and not args.force:
            print(f"cached: these sources passed with triton {version} ({log_path})")
            print(log_path.read_text(), end="")
            return 0
        log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rc = run_worker(python, args, log_path)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())

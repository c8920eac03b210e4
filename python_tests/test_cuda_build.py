"""The compile-only check of the CUDA sources (csrc/cuda/check.sh) on this machine.
A passing run is cached on the sources' content (and the nvcc and torch versions).

The CUDA kernels run only on a GPU; the check keeps them compiling everywhere nvcc
exists: every kernel for every dtype to PTX and SASS (sm_80, sm_90) with warnings as
errors, and the host/registration file against the installed torch's headers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "csrc" / "cuda" / "check.sh"


def _run(env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)


# Cached: 1.4 s (most of it the torch import that reads its version for the key); after a
# change to the CUDA sources, 1-2 minutes on two cores.
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA compile check needs a CUDA toolkit")
def test_cuda_sources_compile():
    result = _run({**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    # The last step ran (the host files need torch to import with this Python).
    assert result.stdout.rstrip().endswith("CUDA compile check passed"), result.stdout


def _launches(source: str) -> set[tuple[str, str]]:
    """(depth, functor) of every multi_tensor_apply<depth>(..., Functor<...>{...}) launch."""
    out = set()
    for m in re.finditer(r"multi_tensor_apply<(\d+)>\(", source):
        functor = re.search(r"(\w+)\s*(<[^<>{};]*>)?\s*\{", source[m.end():m.end() + 600])
        out.add((m.group(1), functor.group(1) + re.sub(r"\s", "", functor.group(2) or "")))
    return out


def test_compile_check_instantiates_every_launched_kernel():
    """Every kernel the CUDA host files launch is compiled by the check (check/kernels_check.cu),
    for every dtype the host code dispatches to: what the check cannot see, it cannot keep
    compiling. Needs no nvcc: it reads the sources."""
    cuda = ROOT / "csrc" / "cuda"
    launched = set()
    for host in sorted(cuda.glob("*.cu")):
        launched |= _launches(host.read_text())
    assert len(launched) > 10  # the parser found the launches (14 today)
    dtypes = set(re.findall(r"return f\((\w+)\{\}\);", (cuda / "host_args.cuh").read_text()))
    assert dtypes == {"float", "double", "__half", "__nv_bfloat16"}
    check = (cuda / "check" / "kernels_check.cu").read_text()
    # Instantiations (LBK_KERNEL(depth, functor): the kernel and its launcher) per dtype:
    # the bodies of the LBK_INSTANTIATE* macros, expanded for the types they are invoked
    # with; outside them, the T-free ones as written.
    kernel = r"LBK_KERNEL\((\d+),\s*(\w+(?:<[^<>]*>)?)\)"
    per_dtype = {t: set() for t in dtypes}
    for name, body in re.findall(r"#define (\w+)\(T\)((?:.*\\\n)*.*)", check):
        for t in re.findall(rf"^{name}\((\w+)\)$", check, re.M):
            per_dtype[t] |= {(d, re.sub(r"\s", "", f)) for d, f in re.findall(kernel, body)}
    plain = {(d, re.sub(r"\s", "", f)) for d, f in re.findall(kernel, check) if "<T" not in f}
    for t in sorted(dtypes):
        missing = {k for k in launched if "<T" in k[1]} - per_dtype[t]
        assert not missing, f"launched but not instantiated for {t} in kernels_check.cu: {missing}"
    missing = {k for k in launched if "<T" not in k[1]} - plain
    assert not missing, f"launched but not instantiated in kernels_check.cu: {missing}"
    assert "average_count_kernel<<<" in (cuda / "average.cu").read_text()
    assert re.search(r"template __global__ void average_count_kernel<int64_t>", check)


def test_check_skips_without_nvcc(tmp_path):
    env = {**os.environ, "NVCC": str(tmp_path / "no-such-nvcc")}
    result = _run(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "nvcc not found: skipped"


def test_check_fails_on_compile_error(tmp_path):
    """A failing compiler fails the check (what CI relies on)."""
    fake = tmp_path / "nvcc"
    fake.write_text("#!/usr/bin/env bash\n[ \"$1\" = --version ] && { echo; echo fake nvcc; echo; exit 0; }\n"
                    "echo 'error: expected a ;' >&2; exit 2\n")
    fake.chmod(0o755)
    result = _run({**os.environ, "NVCC": str(fake)})
    assert result.returncode != 0
    assert "expected a ;" in result.stderr

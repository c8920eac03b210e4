"""The compile-only check of the CUDA sources (csrc/cuda/check.sh) on this machine.

The CUDA kernels run only on a GPU; the check keeps them compiling everywhere nvcc
exists: every kernel for every dtype to PTX and SASS (sm_80, sm_90) with warnings as
errors, and the host/registration file against the installed torch's headers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "csrc" / "cuda" / "check.sh"


def _run(env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA compile check needs a CUDA toolkit")
def test_cuda_sources_compile():
    result = _run({**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    for arch in ("80", "90"):
        # 8 kernels (2 norm passes, 3 LARS passes, the LARS update with folded averaging,
        # the averaging update, the worker-mean write-back) and 5 extrapolation kernels
        # (SGD update, 3 filter passes, Adam update) x 4 dtypes per architecture, plus the
        # averaging count update and the extrap-Adam step counters.
        assert f"kernels: PTX and SASS for sm_{arch} OK (54 kernels)" in result.stdout
    assert "filter pieces: 52 layouts OK" in result.stdout
    assert "host file: csrc/cuda/lars.cu compiled" in result.stdout
    assert "host file: csrc/cuda/average.cu compiled" in result.stdout
    assert "host file: csrc/cuda/extrap.cu compiled" in result.stdout
    assert result.stdout.rstrip().endswith("CUDA compile check passed")


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

"""The CMake build (csrc/cmake_check.sh, make cmake-check) on this machine.

CMakeLists.txt is built against the installed torch and the library it makes is loaded
next to the pure-Python package: it must serve every op on the CPU and run extrap_sgd_
as the reference does (the script's assertions). The build is cached on the content of
CMakeLists.txt and csrc/ (minutes on two cores the first time, seconds after), so a
change to either is built here, and the CMake build cannot rot unseen again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "csrc" / "cmake_check.sh"


def _run(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK)], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_build_serves_the_ops():
    result = _run({})
    assert result.returncode == 0, result.stdout + result.stderr
    # Printed after the comparison with the reference passed (not a skip, not a build only).
    assert "the CMake-built kernel matches the reference" in result.stdout, result.stdout


def test_check_fails_on_a_build_error(tmp_path):
    """A failing build fails the check (what CI relies on), and is not cached."""
    fake = tmp_path / "cmake"
    fake.write_text("#!/usr/bin/env bash\n[ \"$1\" = --version ] && { echo fake cmake; exit 0; }\n"
                    "echo 'CMake Error at CMakeLists.txt:1' >&2; exit 1\n")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    result = _run({"CMAKE": str(fake), "LBK_CACHE_DIR": str(cache)})
    assert result.returncode != 0
    assert "CMake Error at CMakeLists.txt:1" in result.stderr
    assert not list(cache.iterdir())

"""lbkernels refuses a torch older than the oldest it supports (lbkernels.MIN_TORCH), with
an ImportError that names both versions, before it defines any op."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lbkernels


def _import_with_torch_version(version: str) -> subprocess.CompletedProcess:
    code = f"import torch; torch.__version__ = {version!r}; import lbkernels"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on two cores
def test_an_older_torch_is_refused_and_the_oldest_supported_is_accepted():
    oldest = ".".join(map(str, lbkernels.MIN_TORCH))
    major, minor = lbkernels.MIN_TORCH
    older = _import_with_torch_version(f"{major}.{minor - 1}.0+cpu")
    assert older.returncode != 0
    assert f"ImportError: lbkernels needs torch >= {oldest}, found {major}.{minor - 1}.0+cpu" in older.stderr
    assert _import_with_torch_version(f"{oldest}.0").returncode == 0

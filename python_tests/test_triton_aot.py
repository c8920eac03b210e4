"""The ahead-of-time compile check of the Triton kernels (bench/triton_aot.py, ``make
triton-aot-check``): every variant the launchers can give a kernel, compiled to PTX and a
cubin for sm_90 by the Triton the GPU machine runs (TRITON_AOT_VERSION), with no GPU.

A passing run is cached on the kernels' sources, the check's files and the Triton
version: under 2 s. A cold run compiles about 450 variants (two minutes on two cores),
after building the pinned Triton's venv once (a minute and a half).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "triton_aot.py"


def _missing() -> str | None:
    """Why Triton cannot compile for sm_90 here, or None."""
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "triton is not installed"
    ptxas = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        return f"Triton's ptxas is missing ({ptxas}) and TRITON_PTXAS_PATH is unset"
    return None


needs_triton = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # The check starts its own process without TRITON_INTERPRET; conftest.py sets it here.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@needs_triton
def test_triton_kernels_compile_for_sm90():
    result = _run(timeout=1800)
    out = result.stdout + result.stderr
    if "not found: skipped" in result.stdout:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, out
    assert "Triton AOT check passed" in result.stdout, out


# Three tiny kernels: one compiles, one the compiler rejects (tl.arange needs a power of
# two), one that keeps 4096 fp64 values live in 32 threads (256 registers each, over the
# 255 a thread has): it must spill.
BROKEN = '''
import triton
import triton.language as tl

from bench.triton_aot_kernels import Variant


@triton.jit
def fine(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2.0)


@triton.jit
def not_pow2(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2.0)


@triton.jit
def spills(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, x / tl.sum(x * x, 0) + x * tl.max(x, 0))


def variants():
    return [Variant(fine, "fine", "BLOCK=128", {"x_ptr": "*fp32"}, {"BLOCK": 128}),
            Variant(not_pow2, "not_pow2", "BLOCK=48", {"x_ptr": "*fp32"}, {"BLOCK": 48}),
            Variant(spills, "spills", "BLOCK=4096", {"x_ptr": "*fp64"}, {"BLOCK": 4096},
                    num_warps=1)]
'''


@needs_triton
def test_check_fails_on_broken_kernels(tmp_path):
    kernels = tmp_path / "broken_kernels.py"
    kernels.write_text(BROKEN)
    result = _run("--installed", "--jobs", "1", "--kernels", str(kernels), timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2, out
    assert failed[0].startswith("FAILED not_pow2 [BLOCK=48]"), out
    assert failed[1].startswith("FAILED spills [BLOCK=4096]") and "spill" in failed[1], out
    assert "2 of 3 variants failed" in result.stdout, out

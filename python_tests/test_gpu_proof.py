"""The GPU proof (bench/gpu_proof, bench/gpu_table.py) rehearsed on the CPU, and the
``impl="auto"`` table it writes (lbkernels/triton/__init__.py ``auto_pick``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import gpu_table
from bench.gpu_proof.__main__ import run_with_limit
from lbkernels import _library, ops

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.slow  # ~20-30 s on two cores: four stages in subprocesses
def test_dry_run_runs_every_stage_and_row(tmp_path):
    out = tmp_path / "proof"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_proof", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("summary.md", "summary.json", "auto_pick.json", "tests.xml",
                 "build.log", "tests.log", "bench.log", "train.log"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["build", "tests", "bench", "train"]
    assert "setup.py build_ext --inplace" in summary["stages"][0]["commands"][0]
    assert summary["stages"][0]["env"]["TORCH_CUDA_ARCH_LIST"]
    # The CUDA selection is collected and, without a GPU, skipped whole.
    tests = summary["tests"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
    # Every row of every set ran (nothing skipped or failed) and is in the table.
    measured = {(r["set"], r["variant"]) for r in summary["bench"] if "ms" in r}
    expected = {(s, v) for s in gpu_table.TINY_SETS for v in gpu_table.row_names()}
    assert measured == expected, [r for r in summary["bench"] if "ms" not in r]
    md = (out / "summary.md").read_text()
    assert all(f"| {s} | {v} |" in md for s, v in expected)
    [train] = summary["train"]
    assert train["status"] == 0 and train["images_per_s"] > 0 and 0 < train["optimizer_share"] < 1
    assert json.loads((out / "auto_pick.json").read_text()) == summary["auto_pick"]


def test_a_stage_past_its_limit_is_stopped(tmp_path):
    with open(tmp_path / "log", "w") as log:
        status = run_with_limit([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                {}, log, limit_s=2)
    assert status is None
    text = (tmp_path / "log").read_text()
    assert "started" in text and "stopped: past the stage's limit of 2 s" in text


def test_auto_pick_of_the_benchmark_rows():
    def row(s, variant, ms):
        return dict(set=s, variant=variant, ms=ms)

    rows = [row("a", "LARS native", 2.0), row("a", "LARS triton", 1.0),
            row("b", "LARS+SWA native", 1.0), row("b", "LARS+SWA triton", 1.5),
            row("a", "ExtrapSGD native", 1.0), row("a", "ExtrapSGD triton", 1.1),
            dict(set="a", variant="ShiftedMomentumSGD triton", skipped="no CUDA device")]
    # lars_sgd_: geometric mean of 0.5 and 1.5 is below 1; extrap_sgd_ is slower in Triton.
    assert gpu_table.auto_pick(rows) == {"extrap_sgd_": "native", "lars_sgd_": "triton"}
    assert gpu_table.auto_pick([]) == {}


# --- impl="auto" and the shipped table ------------------------------------------------------
def test_shipped_table_reads_and_bad_tables_are_refused(tmp_path):
    from lbkernels import triton as lbk_triton

    assert lbk_triton.read_auto_pick(tmp_path / "absent.json") == {}
    (tmp_path / "empty.json").write_text("\n")
    assert lbk_triton.read_auto_pick(tmp_path / "empty.json") == {}
    shipped = ROOT / "lbkernels" / "triton" / "auto_pick.json"
    assert lbk_triton.read_auto_pick(shipped) == lbk_triton.AUTO_PICK
    (tmp_path / "bad.json").write_text('{"lars_sgd_": "cuda"}')
    with pytest.raises(ValueError, match=r"bad\.json.*'lars_sgd_'"):
        lbk_triton.read_auto_pick(tmp_path / "bad.json")
    (tmp_path / "unknown.json").write_text('{"adamw_": "triton"}')
    with pytest.raises(ValueError, match="'adamw_'"):
        lbk_triton.read_auto_pick(tmp_path / "unknown.json")


# Tensors that say they are on CUDA: resolve() reads only the device of the first one.
CUDA_TENSORS = [SimpleNamespace(device=torch.device("cuda"))]


@needs_triton
def test_a_triton_entry_makes_auto_pick_triton_on_gpus(monkeypatch):
    from lbkernels import triton as lbk_triton

    monkeypatch.setattr(lbk_triton, "available", lambda device_type: (True, ""))
    monkeypatch.setattr(lbk_triton, "AUTO_PICK", {"lars_sgd_": "triton", "extrap_sgd_": "native"})
    assert ops.resolve("lars_sgd_", "auto", CUDA_TENSORS) is torch.ops.lbkernels.triton_lars_sgd_
    assert ops.resolve("extrap_sgd_", "auto", CUDA_TENSORS) is torch.ops.lbkernels.extrap_sgd_
    assert ops.resolve("average_", "auto", CUDA_TENSORS) is torch.ops.lbkernels.average_  # no entry
    # On the CPU the table does not apply; nor where Triton cannot run.
    assert lbk_triton.auto_pick("lars_sgd_", "cpu") is None
    monkeypatch.setattr(lbk_triton, "available", lambda device_type: (False, "no CUDA device"))
    assert ops.resolve("lars_sgd_", "auto", CUDA_TENSORS) is torch.ops.lbkernels.lars_sgd_


def test_the_shipped_table_keeps_native_everywhere():
    from lbkernels import triton as lbk_triton

    for name in lbk_triton.OPS:
        assert lbk_triton.auto_pick(name, "cuda") is None
        assert ops.resolve(name, "auto", CUDA_TENSORS) is _library.op(name)

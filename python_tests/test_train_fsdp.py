"""The training command with --parallel fsdp (FSDP2): two gloo processes train as DDP
does, a sharded run killed with SIGKILL resumes bit for bit, and what FSDP cannot serve
is refused in one line before any process group starts."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_same, history_rows, load_run, torchrun, train_env
from lbkernels.train import checkpoint
from lbkernels.train.__main__ import main
from lbkernels.train.cli import parse_args
from lbkernels.train.config import resolved

# The CNN at width 0.25 (BatchNorm, whose statistics stay per process under FSDP) on
# digits; 1437 samples at batch 256: 6 steps an epoch, the last of 157 samples, which the
# two processes share unevenly (and the test set's 360 unevenly too).
RUN = ["--model", "cnn", "--width", "0.25", "--epochs", "3", "--batch-size", "256", "--quiet"]
FSDP = ["--parallel", "fsdp"]
# swa: the sgd method's optimizer and schedule until --swa-start, then its averages
# (sharded too), and BatchNorm recomputed at the end. Every step checkpointed: the
# reference of the resume after SIGKILL too.
SWA = ["--method", "swa", "--swa-start", "2"]
SWA_RUN = [*RUN, *FSDP, *SWA, "--checkpoint-every-steps", "1"]


def _shards(run: Path) -> list[dict]:
    """Every process's shard file of the save ``checkpoint.pt`` names."""
    shards = load_run(run)["shards"]
    return [load_run(run, f"checkpoint.shard{r}.{shards['generation']}.pt")
            for r in range(shards["world_size"])]


def _full_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights of a sharded run: FSDP2 splits each parameter in dim 0 as torch.chunk
    does, in rank order; buffers (not sharded) are process 0's, which it evaluates."""
    shards = _shards(run)
    params = {k for k in shards[0]["model"] if "running_" not in k and "num_batches" not in k}
    return {k: torch.cat([s["model"][k] for s in shards]) if k in params else v
            for k, v in shards[0]["model"].items()}


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory) -> tuple[Path, str]:
    """A finished --parallel fsdp swa run and its standard output (a torchrun costs
    10-30 s here: shared by two tests)."""
    run = tmp_path_factory.mktemp("fsdp") / "swa"
    return run, torchrun(*SWA_RUN, "--out-dir", str(run)).stdout


@pytest.mark.distributed
# LARS at --lr 1 (a peak of 2): at its recipe's 5 the first epochs are chaotic (training
# loss 2.1-2.3 over 3 epochs) and amplify the rounding of the norms to 5e-3 in the BN
# weights after 18 steps (measured); at 1 the weights differ by at most 1.2e-7.
@pytest.mark.parametrize("method", [SWA, ["--method", "lars", "--lr", "1"]], ids=["sgd+swa", "lars"])
def test_fsdp_trains_as_ddp_does(tmp_path, request, method):
    torchrun(*RUN, *method, "--out-dir", str(tmp_path / "ddp"))
    if method == SWA:
        run, stdout = request.getfixturevalue("swa_run")
    else:
        run = tmp_path / "fsdp"
        stdout = torchrun(*RUN, *FSDP, *method, "--out-dir", str(run)).stdout
    ddp, fsdp = load_run(tmp_path / "ddp"), load_run(run)
    weights = _full_weights(run)
    # The same batches and mean gradients; FSDP reduce-scatters where DDP all-reduces
    # (fp32 sums in another order, and LARS's norms from summed shard squares): a few
    # ulps a step, amplified over 18 steps. Measured: sgd+swa equal bit for bit on this
    # CPU (two processes add two terms, in either order alike), lars within 1.2e-7.
    for name, w in ddp["model"].items():
        torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(ddp["history"], fsdp["history"], strict=True):
        assert (a["step"], a["updates"], a["lr"]) == (b["step"], b["updates"], b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        # DDP evaluates each process's share of the test set with that process's BN
        # statistics (process 0's, moved by its own last batch), FSDP with process 0's:
        # a prediction near a boundary may flip. Measured: 0 or 1 of the 360 samples.
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=3 / 360)
    assert stdout.count("final test accuracy") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_sigkill_and_resume_of_a_sharded_run_matches_the_uninterrupted_run(tmp_path, swa_run):
    ref_dir = swa_run[0]
    ref = load_run(ref_dir)
    total = ref["progress"]["steps"]

    run = tmp_path / "run"
    target = random.Random(os.getpid()).randrange(2, total - 2)
    env = train_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "lbkernels.train", *SWA_RUN, "--out-dir", str(run)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if (run / "checkpoint.pt").exists() and load_run(run)["progress"]["steps"] >= target:
                break
            time.sleep(0.005)
        for p in procs:  # both at once: wherever each is, in a step or writing its shard
            p.send_signal(signal.SIGKILL)
    finally:
        errs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, f"ended before the kill: {errs}"
    assert target <= load_run(run)["progress"]["steps"] < total

    torchrun("--resume", str(run))
    out = load_run(run)
    assert history_rows(out) == history_rows(ref)
    assert_same(out["data"], ref["data"], "data")
    assert_same(out["scaler"], ref["scaler"], "scaler")
    assert out["shards"] == ref["shards"]  # the same saves, of the same content digests
    for r, (a, b) in enumerate(zip(_shards(run), _shards(ref_dir), strict=True)):
        # Weights and buffers, optimizer state, schedule and averages, random generators.
        assert_same(a, b, f"shard {r}")
    # Only the files of the last save are left.
    assert sorted(p.name for p in run.glob("checkpoint*")) == [
        "checkpoint.pt", *(f"checkpoint.shard{r}.{out['shards']['generation']}.pt" for r in range(2))]


@pytest.mark.distributed
def test_a_damaged_shard_stops_every_process_before_anything_is_written(tmp_path, swa_run):
    run = tmp_path / "run"
    run.mkdir()
    for f in swa_run[0].iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    shard = run / f"checkpoint.shard1.{load_run(run)['shards']['generation']}.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    proc = torchrun("--resume", str(run), "--epochs", "4", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lbk-train: error:")]
    assert lines == [f"lbk-train: error: process 1: {shard}: damaged checkpoint: its content no longer "
                     "matches the checksum written with it (bytes changed on disk or in transit); "
                     "the file is kept as it is"], proc.stderr
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("world, argv, message", [
    (1, FSDP, "--parallel fsdp: shards the model over the processes of a torchrun job and this is "
              "one process"),
    (2, FSDP + ["--method", "extrap"], "--method extrap: not with --parallel fsdp (sgd, lars, lamb, "
                                       "growing-batch, swa are): each process steps from its own "
                                       "extrapolated point"),
    (2, FSDP + ["--method", "extrap-postlocal"], "post-local SGD needs each process's own model"),
    (2, FSDP + ["--method", "delayed"], "--method delayed: not with --parallel fsdp (sgd, lars, lamb, "
                                        "growing-batch, swa are): its delayed all-reduce is a DDP "
                                        "comm hook"),
    (2, FSDP + ["--method", "async-sim"], "simulates the asynchronous workers in one process"),
    (2, FSDP + ["--method", "swap"], "--method swap: not with --parallel fsdp (sgd, lars, lamb, "
                                     "growing-batch, swa are): its phase 2 trains independent models"),
    (2, FSDP + ["--method", "growing-batch", "--max-micro-batch", "8"],
     "--max-micro-batch: not with --parallel fsdp: "),
])
def test_what_fsdp_cannot_serve_is_refused_before_starting(tmp_path, monkeypatch, capsys, world, argv, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main([*RUN, *argv, "--out-dir", str(tmp_path / "run")]) == 2
    assert message in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def sharded_run(tmp_path, monkeypatch) -> Path:
    """A run directory whose checkpoint.pt is that of a run sharded over 2 processes (the
    refusals below read nothing else)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args, _ = parse_args([*RUN, *FSDP, "--out-dir", str(tmp_path / "run")])
    (tmp_path / "run").mkdir()
    checkpoint.save(tmp_path / "run" / "checkpoint.pt", {
        "config": resolved(args), "shards": {"world_size": 2, "generation": 1, "sha256": ["", ""]}})
    return tmp_path / "run"


@pytest.mark.parametrize("world, argv, message", [
    (3, [], "--resume: the run was sharded over 2 processes and this job has 3; resume it with "
            "--nproc_per_node=2"),
    (1, [], "--resume: the run was sharded over 2 processes and this job has 1"),
    (2, ["--parallel", "ddp"], "--parallel ddp: the run in {run} was trained with --parallel fsdp"),
])
def test_a_sharded_run_resumes_only_as_it_was_sharded(sharded_run, monkeypatch, capsys, world, argv, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    before = {p.name: p.read_bytes() for p in sharded_run.iterdir()}
    assert main(["--resume", str(sharded_run), *argv]) == 2
    assert message.format(run=sharded_run) in _one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in sharded_run.iterdir()} == before

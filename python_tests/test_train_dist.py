"""The training command under torchrun: two gloo processes train as one, and a dead
process ends the run of the others with an error instead of a hang."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import load_run, main_one_thread, torchrun, train_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Plain MLP (no BatchNorm, whose statistics are per process) on digits; 1437 samples at
# batch 256 end every epoch on a batch of 157, which the two processes share unevenly.
RUN = ["--model", "mlp", "--width", "0.25", "--epochs", "3", "--batch-size", "256", "--quiet"]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    assert main_one_thread(RUN + ["--out-dir", str(tmp_path / "one")]) == 0
    proc = torchrun(*RUN, "--out-dir", str(tmp_path / "two"))
    one, two = load_run(tmp_path / "one"), load_run(tmp_path / "two")
    # Same batches and the same mean gradients; only the order of the sums differs.
    for name, w in one["model"].items():
        torch.testing.assert_close(two["model"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(one["history"], two["history"]):
        assert (a["step"], a["updates"], a["lr"]) == (b["step"], b["updates"], b["lr"])
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 360)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert "final test accuracy" in proc.stdout and proc.stdout.count("final test accuracy") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_process_ends_the_others_within_the_timeout(tmp_path):
    timeout = 10
    port = str(_free_port())
    argv = [sys.executable, "-m", "lbkernels.train", "--model", "mlp", "--width", "0.25", "--epochs", "1000",
            "--batch-size", "64", "--checkpoint-every", "0", "--dist-timeout", str(timeout),
            "--out-dir", str(tmp_path)]
    procs = [
        subprocess.Popen(argv, env=train_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        # The first epoch line of process 0: both processes are training.
        line = procs[0].stdout.readline()
        assert line.startswith("epoch 1/1000"), line + procs[0].stderr.read()
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 1, err
    assert "lbk-train: error: process 0 of 2 stopped: " in err
    assert waited < timeout + 10

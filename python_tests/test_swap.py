"""SWAP and SWA: three gloo processes through SWAP's phases (averaging, divergence, no
collective across groups, batch-norm statistics, exact resume inside phase 2), and SWA
against ``torch.optim.swa_utils.AveragedModel``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lbkernels.distributed import SWAP
from lbkernels.train import checkpoint
from lbkernels.train.__main__ import main
from lbkernels.train.methods import swap as swap_method

WORLD = 3
# Small BN CNN on digits (1437 training samples). Phase 1: 1 epoch at batch 240 (6
# updates); phase 2: 1 epoch at batch 96 per process (15 updates), then the average.
SWAP_RUN = ["--method", "swap", "--model", "cnn", "--width", "0.25", "--epochs", "1",
            "--batch-size", "240", "--lr", "0.4", "--warmup-epochs", "0", "--swap-epochs", "1",
            "--swap-batch-size", "96", "--swap-lr", "0.05", "--quiet", "--dist-timeout", "60",
            "--base-batch-size", "256", "--decay", "poly", "--swap-stop-accuracy", "1"]  # not the recipe's
STOP_AT = 6 + 6  # inside phase 2; the last checkpoint (every 5 steps) is at step 10


class _Stop(RuntimeError):
    """Ends a run in the middle of phase 2, as a killed job would."""


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, ports: list[int], root: str, world: int = WORLD, flags: tuple = ()) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    log: dict = {"calls_in_phase_2": [], "before": {}, "after": {}}
    state = {"phase2": False, "run": None, "stop_at": None}

    # Every collective the Python side issues, with the phase it falls in.
    for name in ("all_reduce", "all_gather", "broadcast", "barrier", "reduce", "gather", "scatter",
                 "all_gather_object", "broadcast_object_list", "all_to_all", "reduce_scatter"):
        original = getattr(dist, name)

        def recorded(*a, _name=name, _original=original, **k):
            if state["phase2"]:
                group = k.get("group")
                ranks = list(range(world)) if group is None else dist.get_process_group_ranks(group)
                log["calls_in_phase_2"].append((state["run"], _name, ranks))
            return _original(*a, **k)

        setattr(dist, name, recorded)

    enter, average = swap_method.SwapPlan._enter_independent, SWAP.average

    def entering(self, fresh):
        state["phase2"] = True
        return enter(self, fresh)

    def averaging(self, model, *a, **k):
        state["phase2"] = False
        log["before"][state["run"]] = [p.detach().clone() for p in model.parameters()]
        average(self, model, *a, **k)
        params = [p.detach().clone() for p in model.parameters()]
        buffers = [b.detach().clone() for b in model.buffers()]
        # All-gathered digests: every rank checks every other's (written out below too).
        digest = torch.tensor(list(bytes.fromhex(_digest(params + buffers))), dtype=torch.uint8)
        everyone = [torch.empty_like(digest) for _ in range(world)]
        torch.distributed.distributed_c10d.all_gather(everyone, digest)
        log["after"][state["run"]] = {"params": params, "buffers": buffers,
                                      "digests": [bytes(t.tolist()).hex() for t in everyone]}

    swap_method.SwapPlan._enter_independent = entering
    SWAP.average = averaging
    from lbkernels.train import loop

    step = loop.Trainer._step

    def stopping(self, *a):
        step(self, *a)
        if state["stop_at"] is not None and self.steps == state["stop_at"]:
            raise _Stop(f"stopped at step {self.steps}")

    loop.Trainer._step = stopping

    def run(name, argv, port, stop_at=None):
        state.update(run=name, stop_at=stop_at, phase2=False)
        os.environ["MASTER_PORT"] = str(port)
        status = main(argv)
        # Phase 2 does not synchronise the processes: wait until every one has left
        # (and written its checkpoint), as a restarted job would.
        open(f"{root}/{name}.done.{rank}", "w").close()
        while not all(os.path.exists(f"{root}/{name}.done.{r}") for r in range(world)):
            time.sleep(0.01)
        return status

    log["status"] = [
        run("whole", SWAP_RUN + [*flags, "--out-dir", f"{root}/whole"], ports[0]),
        run("cut", SWAP_RUN + [*flags, "--out-dir", f"{root}/cut", "--checkpoint-every-steps", "5"], ports[1],
            stop_at=STOP_AT),
        run("resumed", ["--resume", f"{root}/cut"], ports[2]),
    ]
    torch.save(log, f"{root}/log.{rank}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.distributed
@pytest.mark.slow
def test_swap_three_processes(tmp_path):
    mp.spawn(_worker, args=(_free_ports(3), str(tmp_path)), nprocs=WORLD)
    logs = [torch.load(tmp_path / f"log.{r}", weights_only=False) for r in range(WORLD)]
    for r, log in enumerate(logs):
        # The interrupted run stops (status 1) mid-phase 2; the others finish.
        assert log["status"] == [0, 1, 0], (r, log["status"])
        # Groups of one process: phase 2 issues no collective at all.
        assert log["calls_in_phase_2"] == [], log["calls_in_phase_2"][:5]

    for run in ("whole", "resumed"):
        before = [log["before"][run] for log in logs]
        after = [log["after"][run] for log in logs]
        # Phase 2 diverged the ranks: different data orders from the same start.
        for a, b in zip(before[0], before[1]):
            assert (a - b).abs().max() > 1e-3
        # Every rank all-gathered the same digest of weights and BN statistics.
        assert len(set(after[0]["digests"])) == 1
        for a in after:
            assert a["digests"] == after[0]["digests"]
            for x, y in zip(a["params"] + a["buffers"], after[0]["params"] + after[0]["buffers"]):
                assert torch.equal(x, y)
        # ... and the weights are the mean of the phase-2 weights: fp32 sum of three,
        # divided in fp32 (a few ulps from the fp64 mean: |w| < 4, ulp 2^-22 ~ 2.4e-7).
        for i, w in enumerate(after[0]["params"]):
            mean = sum(b[i].double() for b in before) / WORLD
            torch.testing.assert_close(w.double(), mean, rtol=0, atol=1e-6)
    # The run resumed from its checkpoint inside phase 2 (per-process files) ends
    # bitwise where the uninterrupted one does, on every rank.
    for log in logs:
        for x, y in zip(log["after"]["resumed"]["params"], log["after"]["whole"]["params"]):
            assert torch.equal(x, y)
    cut = checkpoint.load(tmp_path / "cut/checkpoint.pt")
    assert [r["phase"] for r in cut["history"]] == ["large-batch", "averaged"]
    whole = json.loads((tmp_path / "whole/swap.json").read_text())
    assert whole == json.loads((tmp_path / "cut/swap.json").read_text())
    assert len(whole["worker_test_acc"]) == WORLD and whole["switch_epoch"] == 1
    assert whole["averaged_test_acc"] == cut["history"][-1]["test_acc"]


def test_swap_controller_phases_and_state():
    c = SWAP(max_large_batch_epochs=5, swap_epochs=2, stop_accuracy=0.9, seed=7)
    assert (c.phase, c.total_epochs(), c.num_groups, c.data_seed) == (1, 7, 1, 7)
    assert c.end_epoch(0.5) is None
    assert c.end_epoch(0.9) == 2  # the accuracy reached: phase 2 after epoch 2
    assert (c.phase, c.switch_epoch, c.total_epochs()) == (2, 2, 4)
    with pytest.raises(RuntimeError, match="after 0 of the 2 epochs of phase 2"):
        c.average(torch.nn.Linear(2, 2))
    assert c.end_epoch(1.0) is None and c.end_epoch(1.0) == 3
    resumed = SWAP(max_large_batch_epochs=5, swap_epochs=2, stop_accuracy=0.9)
    resumed.load_state_dict(c.state_dict())
    assert resumed.state_dict() == c.state_dict() == {"phase": 2, "epoch_in_phase": 2, "switch_epoch": 2,
                                                      "group_size": 1}
    c.average(torch.nn.Linear(2, 2))  # one process: nothing to average
    assert c.phase == 3
    # Without the accuracy, the epoch limit ends phase 1.
    limit = SWAP(max_large_batch_epochs=2, swap_epochs=1)
    assert [limit.end_epoch(0.99), limit.end_epoch(0.99), limit.switch_epoch] == [None, 2, 2]
    for kwargs, match in (({"swap_epochs": 0}, "swap_epochs"), ({"stop_accuracy": 0.0}, "stop_accuracy"),
                          ({"group_size": 2}, "does not divide")):
        with pytest.raises(ValueError, match=match):
            SWAP(**{"max_large_batch_epochs": 2, "swap_epochs": 1, **kwargs})


@pytest.mark.parametrize("flags, message", [
    (["--swap-group-size", "2"], "--swap-group-size: 2 does not divide the 1 processes"),
    (["--swap-batch-size", "5000"], "--swap-batch-size: 5000 is more than the 1437 training samples"),
    (["--swap-stop-accuracy", "0"], "--swap-stop-accuracy: expected a number in (0, 1], got '0'"),
])
def test_swap_option_errors(tmp_path, capsys, flags, message):
    try:
        status = main(SWAP_RUN + flags + ["--out-dir", str(tmp_path)])
    except SystemExit as e:  # argparse rejects a bad value of one option itself
        status = e.code
    assert status == 2
    assert message in capsys.readouterr().err


# -- swa -------------------------------------------------------------------------------------------
SWA_RUN = ["--method", "swa", "--model", "cnn", "--width", "0.25", "--epochs", "2", "--batch-size", "128",
           "--lr", "0.2", "--warmup-epochs", "0.5", "--swa-start", "1", "--swa-lr", "0.02", "--quiet",
           "--base-batch-size", "256", "--decay", "poly"]  # not the recipe's


@pytest.mark.slow
def test_swa_command_end_to_end(tmp_path):
    # Tail of one epoch (12 updates at batch 128), averaged every 4 updates: 3 snapshots.
    assert main(SWA_RUN + ["--swa-every", "4", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "swa.json").read_text())
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert result["n_averaged"] == 3
    assert [r["phase"] for r in state["history"]] == ["sgd", "averaged"]
    assert state["history"][-1]["test_acc"] == result["averaged_test_acc"]
    # The saved model is the average: its parameters are the averager's (as fp32 copies).
    averages = state["method"]["averager"]["averages"]
    names = [n for n, _ in state["model"].items() if not n.endswith(("running_mean", "running_var",
                                                                      "num_batches_tracked"))]
    assert len(names) == len(averages)
    for name, a in zip(names, averages):
        assert torch.equal(state["model"][name], a), name
    # ... and its BN statistics were recomputed: one pass over the 1437 samples in
    # batches of 128 (12 batches).
    tracked = [v for n, v in state["model"].items() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 12 for t in tracked)


@pytest.mark.slow
def test_swa_equals_averaged_model_on_the_same_trajectory(tmp_path):
    from lbkernels.train import cli, distributed, loop

    args, _ = cli.parse_args(SWA_RUN + ["--swa-schedule", "cyclic", "--swa-cycle", "3",
                                        "--out-dir", str(tmp_path)])
    trainer = loop.Trainer(args, distributed.setup(args))
    reference = torch.optim.swa_utils.AveragedModel(trainer.model)
    averager = trainer.plan.averager
    update, points = averager.update, []

    def both(*a, **k):
        update(*a, **k)
        reference.update_parameters(trainer.model)
        points.append(trainer.plan.scheduler.last_epoch)  # updates so far

    averager.update = both
    trainer.fit()
    # At the end of every 3-update cycle of the 12-update tail (after update 12), where
    # the update just taken had the cycle's lowest rate, --swa-lr.
    assert points == [15, 18, 21, 24] and averager.n_averaged == int(reference.n_averaged) == 4
    factor, peak = trainer.plan.scheduler.lr_lambdas[0], trainer.plan.scheduler.base_lrs[0]
    assert all(factor(n - 1) * peak == pytest.approx(0.02, rel=1e-12) for n in points)
    # Same recurrence avg += (w - avg) / (n + 1); AveragedModel multiplies by 1 / (n + 1)
    # (lerp) where average_ divides: each update may differ by an ulp of |w| < 4
    # (4.8e-7), 4 updates.
    for got, want in zip(trainer.model.parameters(), reference.module.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)

"""``--method growing-batch``: batches and rates follow the schedule, micro-batches change
nothing, a run resumed mid-epoch repeats the uninterrupted one, ghost batch norm."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import assert_same, assert_same_run, load_run
from lbkernels.nn import GhostBatchNorm2d
from lbkernels.schedules import noise_scale
from lbkernels.train import distributed
from lbkernels.train.__main__ import main
from lbkernels.train.cli import parse_args
from lbkernels.train.loop import Trainer

N = 1437  # training samples of digits
# 64 -> 320 -> 700 (1600 capped; the rate falls by 700/1600) at epochs 1 and 3.
GROWING = ["--method", "growing-batch", "--model", "mlp", "--width", "0.25", "--epochs", "4",
           "--batch-size", "64", "--base-batch-size", "64", "--lr", "0.1", "--warmup-epochs", "0",
           "--decay", "step", "--decay-epochs", "1", "3", "--decay-gamma", "0.2",
           "--max-batch", "700", "--quiet"]


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("schedule, batches, lrs", [
    ("increase", [64, 320, 320, 700], [0.1, 0.1, 0.1, 0.1 * 700 / 1600]),
    ("hybrid", [64, 320, 320, 320], [0.1, 0.1, 0.1, 0.02]),
    ("decay-lr", [64, 64, 64, 64], [0.1, 0.02, 0.02, 0.004]),
])
@pytest.mark.slow
def test_batch_size_and_rate_follow_the_schedule(tmp_path, schedule, batches, lrs):
    assert main(GROWING + ["--batch-schedule", schedule, "--out-dir", str(tmp_path)]) == 0
    rows = _metrics(tmp_path)
    assert [int(r["batch_size"]) for r in rows] == batches
    assert [float(r["lr"]) for r in rows] == pytest.approx(lrs, rel=1e-12)
    # The last batch of an epoch takes the N mod B samples left over.
    assert [int(r["updates"]) for r in rows] == [sum(math.ceil(N / b) for b in batches[:i + 1])
                                                 for i in range(4)]
    for r, b, lr in zip(rows, batches, lrs):
        assert float(r["noise_scale"]) == pytest.approx(noise_scale(lr, N, b, 0.9), rel=1e-12)
    assert all(float(r["test_acc"]) > 0.5 for r in rows[1:])
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_warmup_ramps_the_rate_within_the_first_epochs(tmp_path):
    argv = GROWING + ["--warmup-epochs", "1.5", "--epochs", "2", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    rows = _metrics(tmp_path)
    # Epoch 1 ends at position 22/23 of an epoch; epoch 2 (batch 320, 5 batches) at 1 + 4/5.
    assert float(rows[0]["lr"]) == pytest.approx(0.1 * (22 / 23) / 1.5)
    assert float(rows[1]["lr"]) == pytest.approx(0.1)


@pytest.mark.parametrize("model, extra", [
    ("mlp", []),
    # Ghost batches of 8 inside micro-batches of 16: BatchNorm sees the same chunks.
    ("cnn", ["--width", "0.125", "--ghost-batch", "8"]),
])
@pytest.mark.slow
def test_micro_batches_give_the_same_run(tmp_path, model, extra):
    base = GROWING + ["--model", model, "--epochs", "2", "--decay-epochs", "1", *extra]
    assert main(base + ["--out-dir", str(tmp_path / "whole")]) == 0
    assert main(base + ["--max-micro-batch", "16", "--out-dir", str(tmp_path / "micro")]) == 0
    whole, micro = load_run(tmp_path / "whole"), load_run(tmp_path / "micro")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert [r[key] for r in micro["history"]] == pytest.approx(
            [r[key] for r in whole["history"]], rel=1e-6, abs=1e-6), key
    for name, w in whole["model"].items():
        torch.testing.assert_close(micro["model"][name], w, rtol=1e-5, atol=1e-6, msg=name)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_resume_mid_epoch_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    # Warm-up over 1.5 epochs and micro-batches: the stop falls inside the ramp (epoch 2).
    argv = GROWING + ["--warmup-epochs", "1.5", "--max-micro-batch", "32", "--checkpoint-every-steps", "1"]
    assert main(argv + ["--out-dir", str(tmp_path / "ref")]) == 0
    ref = load_run(tmp_path / "ref")

    real_step, calls = Trainer._step, [0]

    def stopping_step(self, *a):
        real_step(self, *a)
        calls[0] += 1
        if calls[0] == 26:  # 23 batches of 64 in epoch 1, then 3 of 320 in epoch 2
            raise _Stop

    monkeypatch.setattr(Trainer, "_step", stopping_step)
    with pytest.raises(_Stop):
        main(argv + ["--out-dir", str(tmp_path / "run")])
    monkeypatch.undo()
    assert load_run(tmp_path / "run")["progress"]["steps"] == 25

    assert main(["--resume", str(tmp_path / "run")]) == 0
    out = load_run(tmp_path / "run")
    assert_same_run(ref, out)
    assert_same(ref["data"], out["data"], "data")


def test_ghost_batch_converts_every_batch_norm(tmp_path):
    args, _ = parse_args(GROWING + ["--model", "cnn", "--width", "0.125", "--ghost-batch", "16",
                                    "--out-dir", str(tmp_path)])
    trainer = Trainer(args, distributed.setup(args))
    norms = [m for m in trainer.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3
    assert all(isinstance(m, GhostBatchNorm2d) and m.ghost_batch_size == 16 for m in norms)
    # The optimizer steps the converted model's parameters.
    stepped = {id(p) for g in trainer.plan.optimizer.param_groups for p in g["params"]}
    assert stepped == {id(p) for p in trainer.model.parameters()}


@pytest.mark.parametrize("argv, message", [
    (["--decay", "poly", "--decay-epochs"], "--decay: --method growing-batch follows a step schedule"),
    (["--decay-gamma", "5"], "--decay-gamma: expected a factor below 1"),
    (["--max-batch", "0"], "--max-batch: the batch grows to 1600 at epoch 3"),
    (["--max-batch", "32"], "--max-batch: 32 is less than --batch-size 64"),
])
def test_bad_schedules_exit_2_naming_the_option(tmp_path, capsys, argv, message):
    assert main(GROWING + argv + ["--out-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err

"""The training methods delayed and async-sim: end to end on digits, their synchronous
limits (--delay 0 is plain SGD), exact resume of the simulator, and their option errors."""

from __future__ import annotations

import argparse

import pytest
import torch

from helpers import assert_same, history_rows, load_run, main_one_thread, torchrun
from lbkernels.optim import ShiftedMomentumSGD
from lbkernels.train.__main__ import main
from lbkernels.train.cli import ConfigError, build_parser
from lbkernels.train.methods import METHODS, Context
from lbkernels.train.models import build_model

# Small runs (no BatchNorm) with a batch small enough for ~23 steps per epoch, so that a
# delay of a few steps is a small part of an epoch. The base batch and the decay are
# pinned: the methods' recipes differ there, and the comparisons need the same schedule.
RUN = ["--model", "mlp", "--width", "0.25", "--epochs", "2", "--batch-size", "64",
       "--lr", "2", "--base-batch-size", "256", "--warmup-epochs", "0.5", "--decay", "poly",
       "--quiet"]


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory) -> dict:
    """The sgd method's run (standard momentum) that a delay of 0 must repeat."""
    out = tmp_path_factory.mktemp("sgd")
    assert main(RUN + ["--method", "sgd", "--no-nesterov", "--out-dir", str(out)]) == 0
    return load_run(out)


@pytest.mark.parametrize("method, extra", [
    ("delayed", ["--delay", "2"]),
    ("async-sim", ["--delay", "3", "--momentum-kind", "shifted"]),
    ("async-sim", ["--delay", "3", "--momentum-kind", "standard", "--lr-rule", "inverse"]),
])
@pytest.mark.slow
def test_method_trains_end_to_end(tmp_path, method, extra):
    assert main(RUN + ["--method", method, *extra, "--out-dir", str(tmp_path)]) == 0
    state = load_run(tmp_path)
    rows = state["history"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(torch.isfinite(w).all() for w in state["model"].values())
    # Far better than chance (10%) after two epochs, stale gradients or not.
    assert rows[-1]["test_acc"] > 0.5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # Updates count what changed the weights: the delayed queue's first tau steps do not.
    applied_nothing = 2 if method == "delayed" else 0
    assert rows[-1]["updates"] == rows[-1]["step"] - applied_nothing


@pytest.mark.parametrize("method", ["async-sim", "delayed"])
@pytest.mark.slow
def test_delay_zero_is_plain_sgd(tmp_path, method, sgd_run):
    # Standard momentum is torch.optim.SGD on the same groups, and the stability rule
    # leaves the rate alone at tau = 0: the run must be the sgd method's, bit for bit.
    assert main(RUN + ["--method", method, "--delay", "0", "--momentum-kind", "standard",
                       "--out-dir", str(tmp_path / "sim")]) == 0
    sgd, sim = sgd_run, load_run(tmp_path / "sim")
    assert history_rows(sim) == history_rows(sgd)
    assert_same(sim["model"], sgd["model"], "model")


@pytest.mark.slow
def test_async_sim_shifted_momentum_at_delay_zero_matches_sgd(tmp_path, sgd_run):
    # One shifted buffer is the ordinary momentum buffer; the fused update may round
    # differently from torch.optim.SGD.
    assert main(RUN + ["--method", "async-sim", "--delay", "0", "--out-dir", str(tmp_path / "sim")]) == 0
    sgd, sim = sgd_run, load_run(tmp_path / "sim")
    for a, b in zip(history_rows(sgd), history_rows(sim)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=1 / 360)
    for name, w in sgd["model"].items():
        torch.testing.assert_close(sim["model"][name], w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_async_sim_resumes_exactly(tmp_path):
    # A constant rate after warm-up, so that the schedule does not depend on --epochs.
    run = RUN + ["--method", "async-sim", "--delay", "4", "--decay", "step"]
    assert main(run + ["--out-dir", str(tmp_path / "ref")]) == 0
    assert main(run + ["--epochs", "1", "--out-dir", str(tmp_path / "cut")]) == 0
    assert main(["--resume", str(tmp_path / "cut"), "--epochs", "2"]) == 0
    ref, resumed = load_run(tmp_path / "ref"), load_run(tmp_path / "cut")
    assert history_rows(resumed) == history_rows(ref)
    assert_same(resumed["model"], ref["model"], "model")
    for a, b in zip(ref["method"]["simulator"]["held"], resumed["method"]["simulator"]["held"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert ref["method"]["simulator"]["step"] == resumed["method"]["simulator"]["step"]


def test_delayed_applies_nothing_for_the_first_delay_steps():
    args = build_parser().parse_args(["--method", "delayed", "--delay", "3", "--lr", "2"])
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, 0.25)
    recipe = METHODS["delayed"].build(Context(args, model, lambda b: 10, rank=0, world_size=1))
    assert isinstance(recipe.optimizer, ShiftedMomentumSGD) and recipe.optimizer.delay == 3
    assert recipe.comm_hook is None  # one process: the recipe queues the gradients itself
    trainer = argparse.Namespace(runtime=argparse.Namespace(world_size=1), net=model,
                                 scaler=torch.amp.GradScaler("cpu", enabled=False),
                                 autocast=lambda: torch.autocast("cpu", enabled=False))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    w0 = [p.detach().clone() for p in model.parameters()]
    for t in range(4):
        recipe.optimizer.zero_grad(set_to_none=True)
        recipe.forward_backward(trainer, x, y, 16)
        recipe.step(trainer.scaler)
        unchanged = all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
        assert unchanged == (t < 3), t


# -- option errors -------------------------------------------------------------------------------
def test_async_sim_refuses_several_processes():
    args = build_parser().parse_args(["--method", "async-sim"])
    model = build_model("mlp", (1, 8, 8), 10, 0.25)
    with pytest.raises(ConfigError, match="--method async-sim: .*single process.*--method delayed"):
        METHODS["async-sim"].build(Context(args, model, lambda b: 10, rank=0, world_size=2))


@pytest.mark.parametrize("method", ["delayed", "async-sim"])
def test_fp16_is_refused_with_a_clear_error(tmp_path, capsys, method):
    assert main(RUN + ["--method", method, "--amp", "fp16", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: --amp fp16: --method {method} steps the optimizer without the loss scaler" in err
    assert "bf16" in err


# -- two processes -------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_delayed_on_two_processes_trains_like_one(tmp_path):
    run = RUN + ["--method", "delayed", "--delay", "1", "--batch-size", "256", "--epochs", "3"]
    assert main_one_thread(run + ["--out-dir", str(tmp_path / "one")]) == 0
    torchrun(*run, "--out-dir", str(tmp_path / "two"))
    one, two = load_run(tmp_path / "one"), load_run(tmp_path / "two")
    # The comm hook queues what record() queues in one process: the same updates, up to
    # the order of the sums in the all-reduce.
    for name, w in one["model"].items():
        torch.testing.assert_close(two["model"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(one["history"], two["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


# -- non-finite losses ---------------------------------------------------------------------------
def _recipe_and_trainer(method: str, *flags: str):
    args = build_parser().parse_args(["--method", method, "--lr", "2", *flags])
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, 0.25)
    recipe = METHODS[method].build(Context(args, model, lambda b: 10, rank=0, world_size=1))
    trainer = argparse.Namespace(runtime=argparse.Namespace(world_size=1), net=model,
                                 scaler=torch.amp.GradScaler("cpu", enabled=False),
                                 autocast=lambda: torch.autocast("cpu", enabled=False))
    return recipe, trainer, model


def test_async_sim_leaves_a_non_finite_step_before_the_update():
    recipe, trainer, model = _recipe_and_trainer("async-sim", "--delay", "2")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    recipe.forward_backward(trainer, x, y, 16)
    recipe.step(trainer.scaler)
    before = recipe.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    loss, _ = recipe.forward_backward(trainer, bad, y, 16)
    assert not torch.isfinite(loss)  # the loop sees it and skips the step
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = recipe.state_dict()
    assert after["simulator"]["step"] == before["simulator"]["step"] == 1
    for a, b in zip(before["simulator"]["held"], after["simulator"]["held"]):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_delayed_never_applies_the_gradient_of_a_skipped_step():
    recipe, trainer, model = _recipe_and_trainer("delayed", "--delay", "1")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    for t, batch in enumerate([x, x, bad, x, x, x]):
        recipe.optimizer.zero_grad(set_to_none=True)
        loss, _ = recipe.forward_backward(trainer, batch, y, 16)
        if torch.isfinite(loss):  # what the loop does
            recipe.step(trainer.scaler)
        assert all(torch.isfinite(p).all() for p in model.parameters()), t

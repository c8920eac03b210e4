"""The training command never destroys a run and answers a user's error in one line:
resumes that would overwrite or misread a run, two runs in one directory, stale and
damaged checkpoints, values too large for the machine, runs that learn nothing, and
errors under torchrun."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import torchrun, train_env
from lbkernels.train import checkpoint
from lbkernels.train.__main__ import main

# One epoch of a small MLP on digits: about a second.
RUN = ["--model", "mlp", "--width", "0.25", "--epochs", "1", "--batch-size", "256", "--quiet"]


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes (to show that nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def lars_run(tmp_path_factory) -> Path:
    """A finished run to resume (copied by the tests that might change it)."""
    run = tmp_path_factory.mktemp("lars") / "run"
    assert main(RUN + ["--out-dir", str(run)]) == 0
    return run


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for name, data in _files(run).items():
        (to / name).write_bytes(data)
    return to


# -- resume ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_into_a_directory_holding_another_run_is_refused(lars_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(RUN + ["--method", "sgd", "--out-dir", str(other)]) == 0
    before = _files(other)
    capsys.readouterr()
    assert main(["--resume", str(lars_run), "--out-dir", str(other), "--epochs", "2"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--out-dir: {other} holds another run than the one --resume {lars_run} continues" in line
    assert _files(other) == before
    # An empty directory takes the continued run.
    assert main(["--resume", str(lars_run), "--out-dir", str(tmp_path / "branch"), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in checkpoint.load(tmp_path / "branch/checkpoint.pt")["history"]] == [1, 2]


@pytest.mark.parametrize("change, named", [
    # Loaded silently before: LARS's state trained on by SGD.
    (["--method", "sgd", "--width", "0.5"], "--width 0.5, --method sgd: the run in {run} was trained "
                                            "with --width 0.25, --method lars"),
    (["--seed", "3"], "--seed 3: the run in {run} was trained with --seed 0"),  # a ValueError traceback
    (["--batch-size", "128"], "--batch-size 128: "),  # silently counted its position in other batches
    # Ignored without a word before: the optimizer and schedule states bring back lr 5, momentum 0.9.
    (["--lr", "0.5", "--momentum", "0.5"], "--lr 0.5, --momentum 0.5: the run in {run} was trained "
                                           "with --lr 5.0, --momentum 0.9"),
])
@pytest.mark.slow
def test_resume_with_options_that_change_the_state_is_refused(lars_run, tmp_path, capsys, change, named):
    run = _copy(lars_run, tmp_path / "run")
    before = _files(run)
    assert main(["--resume", str(run), "--epochs", "2", *change]) == 2
    line = _one_line(capsys.readouterr().err)
    assert named.format(run=run) in line and "a resumed run keeps them" in line
    assert _files(run) == before


@pytest.mark.slow
def test_resume_with_a_delay_of_another_length_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(RUN + ["--method", "delayed", "--delay", "2", "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["--resume", str(run), "--epochs", "2", "--delay", "3"]) == 2
    assert "--delay 3: the run in" in _one_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_fails_at_once(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "lbkernels.train", *RUN, "--epochs", "1000", "--checkpoint-every", "0",
         "--out-dir", str(run)], env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.csv").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        start = time.monotonic()
        assert main(RUN + ["--out-dir", str(run)]) == 2
        assert time.monotonic() - start < 30
        line = _one_line(capsys.readouterr().err)
        assert f"--out-dir: {run} is in use by another run" in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.communicate()
    assert not (run / "checkpoint.pt").exists()  # the second run wrote none either


@pytest.mark.slow
def test_stale_temporary_checkpoints_are_removed_at_start(lars_run, tmp_path):
    run = _copy(lars_run, tmp_path / "run")
    stale = [run / ".checkpoint.pt.k1ll3d.tmp", run / ".checkpoint.rank1.pt.abc_12.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    kept = run / ".notes.tmp"
    kept.write_text("not ours")
    assert main(["--resume", str(run), "--epochs", "2"]) == 0
    assert not any(p.exists() for p in stale) and kept.exists()


def _flip_a_weight_byte(path: Path) -> None:
    weight = checkpoint.load(path)["model"]["1.weight"]
    data = path.read_bytes()
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    flipped = bytearray(data)
    flipped[at + weight.numel() * 2] ^= 0x10  # a middle element's byte
    path.write_bytes(bytes(flipped))


@pytest.mark.slow
def test_a_flipped_byte_in_the_checkpoint_is_refused_and_the_file_kept(lars_run, tmp_path, capsys):
    run = _copy(lars_run, tmp_path / "run")
    _flip_a_weight_byte(run / "checkpoint.pt")
    damaged = _files(run)
    assert main(["--resume", str(run), "--epochs", "2"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{run / 'checkpoint.pt'}: damaged checkpoint: its content no longer matches the checksum" in line
    assert _files(run) == damaged


def test_a_foreign_file_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": Path("x")}, path)  # any pickled object
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not a checkpoint of this command") and "\n" not in message
    assert "weights_only" not in message and "pathlib" in message


@pytest.mark.slow
def test_a_hand_edited_checkpoint_is_a_one_line_error(lars_run, tmp_path, capsys):
    run = _copy(lars_run, tmp_path / "run")
    state = checkpoint.load(run / "checkpoint.pt")
    del state["progress"]["updates"]  # edited, and saved with a checksum that fits
    checkpoint.save(run / "checkpoint.pt", state)
    edited = _files(run)
    assert main(["--resume", str(run), "--epochs", "2"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--resume: the checkpoint does not fit this run (no entry 'updates')" in line
    assert _files(run) == edited


# -- values no user means --------------------------------------------------------------------
@pytest.mark.slow
def test_a_delay_beyond_the_memory_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    from lbkernels.train import resources

    # 64 MiB available: --delay 1000 asks for 4 (every run) + 1000 (shifted momentum's
    # buffers beyond the first) + 1002 (AsyncSimulator's workers and scratch) + 1001 (the
    # workers' checkpoint copy) = 3,007 float32 copies of the MLP's 2 * (64 * 64 + 64) +
    # 64 * 10 + 10 = 8,970 parameters: 102.9 MiB.
    monkeypatch.setattr(resources, "available_bytes", lambda device: 64 * 2 ** 20)
    argv = RUN + ["--method", "async-sim", "--delay", "1000", "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == ("lbk-train: error: --delay: 1000 needs at least 102.9 MiB: 3,007 copies of the 8,970 "
                    "parameters of mlp at --width 0.25, but 64.0 MiB of cpu memory is available; "
                    "lower --delay")
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    assert main(argv[:-1] + [str(tmp_path / "small")]) == 0  # the machine's own memory holds it


@pytest.mark.parametrize("argv, start, hint", [
    # --model cnn at 1e6: 9.2e16 parameters (a traceback from the allocator before); at
    # 1e12 its sizes overflow int64.
    (["--model", "cnn", "--width", "1e6"], "--width: 1000000.0 needs at least ", "lower --width"),
    (["--model", "cnn", "--width", "1e12"], "--width: 1000000000000.0 makes cnn too large to build",
     "use a smaller --width"),
    # 2,048 synthetic images of 3 x 1e5 x 1e5 bytes: 55.9 TiB.
    (["--data", "synthetic", "--image-size", "100000"], "--image-size: 100000 needs 55.9 TiB", "available"),
], ids=["width", "width-overflow", "image-size"])
def test_values_beyond_the_memory_are_a_one_line_error(tmp_path, capsys, argv, start, hint):
    assert main(RUN + argv + ["--out-dir", str(tmp_path / "run")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"lbk-train: error: {start}") and hint in line
    assert not (tmp_path / "run").exists()


def test_an_out_dir_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run's parent directory should be")
    assert main(RUN + ["--out-dir", str(blocker / "run")]) == 2
    assert f"--out-dir: cannot write to {blocker / 'run'}: " in _one_line(capsys.readouterr().err)


def test_a_run_refused_while_it_is_built_leaves_no_directory(tmp_path, capsys):
    # The directory is locked before the model and method are built; a bad value found
    # while building them (here the batch) must not leave an empty run directory.
    run = tmp_path / "runs" / "new"
    assert main(RUN + ["--batch-size", "5000", "--out-dir", str(run)]) == 2
    assert "--batch-size: 5000 is more than the 1437 training samples" in _one_line(capsys.readouterr().err)
    assert not run.exists()


# -- runs that learn nothing ------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_at_chance_after_warm_up_stops_naming_the_learning_rate(tmp_path, capsys):
    run = tmp_path / "run"
    argv = RUN + ["--method", "sgd", "--lr", "0", "--warmup-epochs", "1", "--epochs", "40",
                  "--out-dir", str(run)]
    assert main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert "training accuracy stayed at chance after the warm-up" in line and "epochs 2-3" in line
    assert "--lr 0" in line
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",status") and len(rows) == 1 + 3
    assert [r.endswith(",training accuracy at chance") for r in rows[1:]] == [False, True, True]
    assert checkpoint.load(run / "checkpoint.pt")["progress"]["epoch"] == 3


@pytest.mark.slow
def test_healthy_runs_without_warm_up_are_never_stopped(tmp_path):
    # The first epochs count: no warm-up, small rates, so the line is nearest to them.
    for method, lr in [("sgd", "0.05"), ("lars", "1.0")]:
        run = tmp_path / method
        assert main(RUN + ["--method", method, "--lr", lr, "--warmup-epochs", "0", "--epochs", "3",
                           "--out-dir", str(run)]) == 0
        assert all(r["status"] == "" for r in checkpoint.load(run / "checkpoint.pt")["history"])


def test_skipped_steps_and_the_stop_are_in_metrics_csv(tmp_path):
    argv = RUN + ["--method", "sgd", "--lr", "1e30", "--warmup-epochs", "0", "--max-bad-steps", "2",
                  "--out-dir", str(tmp_path)]
    assert main(argv) == 1
    last = (tmp_path / "metrics.csv").read_text().splitlines()[-1]
    assert last.startswith("1,") and last.endswith(",stopped: 3 steps in a row with a non-finite loss")


# -- torchrun ------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_a_user_error_under_torchrun_is_one_line_from_the_first_process(tmp_path):
    # Found while the method is built, after the process group exists, on both processes.
    proc = torchrun(*RUN, "--method", "async-sim", "--out-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode != 0
    message = "lbk-train: error: --method async-sim: simulates asynchronous workers in a single process"
    assert proc.stderr.count(message) == 1, proc.stderr
    # The launcher's own summary has a traceback of the launcher; none comes from the command.
    assert "lbkernels/train" not in proc.stderr and "exitcode  : 2" in proc.stderr, proc.stderr


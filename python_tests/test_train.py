"""The training command: exact resume after SIGKILL, atomic checkpoints, options and
config files, the CIFAR reader, fault handling."""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import assert_same, assert_same_run, load_run
from lbkernels.train import checkpoint, data
from lbkernels.train.models import MODELS, build_model
from lbkernels.train.__main__ import main
from lbkernels.train.cli import parse_args

# Small runs that still cross epochs, BatchNorm and (synthetic) augmentation and cutout.
DIGITS = ["--model", "mlp", "--width", "0.25", "--epochs", "2", "--batch-size", "256", "--quiet"]
SYNTHETIC = ["--data", "synthetic", "--synthetic-samples", "256", "--image-size", "8", "--model", "cnn",
             "--width", "0.125", "--cutout", "3", "--batch-size", "32", "--epochs", "4", "--quiet"]


def _env() -> dict:
    # The same thread count in and out of process: kernels split work by thread.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}


# -- exact resume ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    assert main(SYNTHETIC + ["--out-dir", str(tmp_path / "ref")]) == 0
    ref = load_run(tmp_path / "ref")
    total = ref["progress"]["steps"]

    run = tmp_path / "run"
    target = random.Random(os.getpid()).randrange(3, total - 3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbkernels.train", *SYNTHETIC, "--out-dir", str(run),
         "--checkpoint-every-steps", "1"], env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "checkpoint.pt").exists() and load_run(run)["progress"]["steps"] >= target:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err}"
    killed_at = load_run(run)["progress"]["steps"]
    assert target <= killed_at < total

    assert main(["--resume", str(run)]) == 0
    out = load_run(run)
    assert_same_run(ref, out)
    assert_same(ref["data"], out["data"], "data")
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 4 and metrics[0].startswith("epoch,step,updates,lr")


@pytest.mark.slow
def test_resume_continues_with_more_epochs_and_keeps_the_record(tmp_path):
    assert main(DIGITS + ["--out-dir", str(tmp_path)]) == 0
    assert main(["--resume", str(tmp_path), "--epochs", "3"]) == 0
    state = load_run(tmp_path)
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]
    assert state["config"]["epochs"] == 3
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "epochs: 3" in (tmp_path / "config.yaml").read_text()


# -- atomic checkpoints ---------------------------------------------------------------------
def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"w": torch.arange(4.0)})

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped in the middle of the write

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": torch.zeros(4)})
    assert torch.equal(checkpoint.load(path)["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.save(tmp_path / "c.pt", {"rng": checkpoint.rng_state(torch.device("cpu"))})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"], torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"w": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint.pt: unreadable checkpoint"):
        checkpoint.load(path)


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, names", [
    (["--batch-size", "0"], "argument --batch-size: expected an integer > 0, got '0'"),
    (["--lr", "-1"], "argument --lr: expected a number >= 0"),
    (["--model", "resnet1000"], "argument --model: invalid choice: 'resnet1000'"),
    (["--momentum", "1.5"], "argument --momentum: expected a number in [0, 1)"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_exit_2_naming_the_option(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert names in capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["--decay-epochs", "10"], "--decay-epochs: only used with --decay step"),
    (["--decay", "step", "--decay-epochs", "20", "10"], "--decay-epochs: expected increasing epochs"),
    (["--cutout", "4"], "--cutout: digits are 8x8"),
    (["--batch-size", "5000", "--epochs", "1"], "--batch-size: 5000 is more than the 1437 training samples"),
    (["--resume", "no/such/run"], "no/such/run/checkpoint.pt: no checkpoint there"),
])
def test_bad_values_exit_2_naming_the_option(argv, names, capsys, tmp_path):
    assert main(argv + ["--out-dir", str(tmp_path / "run")]) == 2
    assert names in capsys.readouterr().err


def test_config_file_values_are_checked_and_flags_override_them(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "sgd"\nbatch-size = 128\ndecay = "step"\ndecay_epochs = [10, 20]\nnesterov = false\n')
    args, _ = parse_args(["--config", str(toml), "--batch-size", "64"])
    assert (args.method, args.batch_size, args.decay_epochs, args.nesterov) == ("sgd", 64, [10, 20], False)

    yml = tmp_path / "run.yaml"
    for text, message in [
        ("batch_szie: 64\n", "unknown option 'batch_szie' (did you mean batch_size?)"),
        ("batch_size: -3\n", "batch_size (--batch-size): expected an integer > 0, got '-3'"),
        ("quiet: 1\n", "quiet (--quiet): expected true or false"),
        ("model: [mlp]\n", "model (--model): expected a single value"),
        ("- 1\n", "expected a mapping"),
    ]:
        yml.write_text(text)
        assert main(["--config", str(yml)]) == 2
        err = capsys.readouterr().err
        assert f"--config {yml}" in err or str(yml) in err
        assert message in err


@pytest.mark.slow
def test_out_dir_holding_a_run_needs_resume(tmp_path, capsys):
    assert main(DIGITS + ["--epochs", "1", "--out-dir", str(tmp_path)]) == 0
    assert main(DIGITS + ["--out-dir", str(tmp_path)]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--resume", "--checkpoint-every-steps", "--max-bad-steps", "--cutout",
                 "--model", "--width", "--method", "--nesterov", "--trust-coefficient", "--amp",
                 "--dist-timeout"):
        assert flag in text


# -- faults ------------------------------------------------------------------------------------
def test_diverging_run_stops_after_max_bad_steps_with_a_checkpoint(tmp_path, capsys):
    argv = DIGITS + ["--method", "sgd", "--lr", "1e30", "--warmup-epochs", "0", "--max-bad-steps", "2",
                     "--out-dir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "update skipped (1 in a row)" in err
    assert "3 steps in a row had a non-finite loss (--max-bad-steps 2)" in err
    state = load_run(tmp_path)
    assert state["progress"]["bad_in_row"] == 3
    assert state["progress"]["updates"] + 3 == state["progress"]["steps"]


# -- data ----------------------------------------------------------------------------------------
def _pickled(d: dict) -> bytes:
    return pickle.dumps(d, protocol=2)


def _write_tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.mark.slow
def test_cifar10_reader_on_a_tiny_tarball(tmp_path):
    members = {f"cifar-10-batches-py/data_batch_{i}": _pickled({b"data": _images(4, i), b"labels": [i] * 4})
               for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = _pickled({b"data": _images(3, 9), b"labels": [7, 8, 9]})
    members["cifar-10-batches-py/batches.meta"] = _pickled({b"label_names": []})
    _write_tarball(tmp_path / "cifar-10-python.tar.gz", members)

    ds = data.load_cifar10(SimpleNamespace(data_dir=str(tmp_path)))
    assert ds.train_inputs.shape == (20, 3, 32, 32) and ds.train_inputs.dtype == torch.uint8
    assert ds.train_labels.tolist() == [i for i in range(1, 6) for _ in range(4)]
    assert ds.test_labels.tolist() == [7, 8, 9]
    # Rows hold the red, green, then blue planes, each row-major.
    row = _images(4, 1)[2]
    assert ds.train_inputs[2, 1, 3, 5] == row[1024 + 3 * 32 + 5]

    # And it trains: augmentation, cutout and a CIFAR model on it.
    argv = ["--data", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet20", "--width", "0.25",
            "--batch-size", "8", "--epochs", "1", "--cutout", "8", "--quiet", "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 0


def test_cifar100_reader_uses_fine_labels(tmp_path):
    _write_tarball(tmp_path / "cifar-100-python.tar.gz", {
        "cifar-100-python/train": _pickled({b"data": _images(5, 0), b"fine_labels": [99, 0, 1, 2, 3],
                                            b"coarse_labels": [0] * 5}),
        "cifar-100-python/test": _pickled({b"data": _images(2, 1), b"fine_labels": [5, 6], b"coarse_labels": [0] * 2}),
    })
    ds = data.load_cifar100(SimpleNamespace(data_dir=str(tmp_path)))
    assert ds.num_classes == 100 and ds.train_labels.tolist() == [99, 0, 1, 2, 3]


@pytest.mark.parametrize("content, message", [
    (None, "cifar-10-python.tar.gz: not found; expected the CIFAR-10 python tarball"),
    (b"not a tarball", "cifar-10-python.tar.gz: unreadable"),
    ({"x/data_batch_1": _pickled({b"data": _images(1, 0), b"labels": [0]})}, "no data_batch_2, data_batch_3"),
    ({f"x/{n}": _pickled({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
      for n in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]},
     "data_batch_1 holds data of shape (2, 10)"),
    ({"x/data_batch_1": pickle.dumps({b"data": SimpleNamespace()})}, "unexpected object types.SimpleNamespace"),
])
def test_bad_cifar_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "cifar-10-python.tar.gz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        _write_tarball(path, content)
    with pytest.raises(data.DataError, match=None) as e:
        data.load_cifar10(SimpleNamespace(data_dir=str(tmp_path)))
    assert message in str(e.value) and str(path) in str(e.value)


def test_crop_flip_and_cutout():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    # Offset 4 of 8 is the original image; offset 0 shifts it by the padding.
    same = data.random_crop_flip(x, torch.tensor([4, 4]), torch.tensor([4, 4]), torch.tensor([False, True]))
    assert torch.equal(same[0], x[0]) and torch.equal(same[1], x[1].flip(2))
    shifted = data.random_crop_flip(x, torch.tensor([3, 4]), torch.tensor([4, 5]), torch.tensor([False, False]))
    assert torch.equal(shifted[0, 0, 1:], x[0, 0, :3]) and (shifted[0, 0, 0] == 0).all()
    assert torch.equal(shifted[1, 0, :, :3], x[1, 0, :, 1:]) and (shifted[1, 0, :, 3] == 0).all()
    holes = data.cutout(torch.ones(1, 2, 6, 6), torch.tensor([0]), torch.tensor([3]), 2)
    assert holes.sum() == 2 * (36 - 2) and holes[0, :, 0, 2:4].eq(0).all()


# -- models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["digits", "cifar"])
def test_every_model_takes_digits_and_cifar_shapes(name, shape):
    model = build_model(name, shape, 7, width=0.25)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and out.isfinite().all()
    narrower = sum(p.numel() for p in build_model(name, shape, 7, width=0.125).parameters())
    assert narrower < sum(p.numel() for p in model.parameters())


def test_resnet_parameter_counts_match_the_papers():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("resnet20", (3, 32, 32), 10, 1.0)) == 269_722
    assert round(count(build_model("resnet9", (3, 32, 32), 10, 1.0)) / 1e6, 1) == 6.6

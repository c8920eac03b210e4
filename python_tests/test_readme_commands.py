"""Every command of the README's Training section runs as written.

The commands are read from README.md itself (the code block under "## Training", and
the CIFAR-10 block after it), so that the README and this test cannot drift apart. Each
runs with a short budget appended (two epochs, no progress output, a temporary run
directory): ``python -m lbkernels.train`` lines through the command's ``main`` in this
process, torchrun lines through ``python -m torch.distributed.run`` with the same
arguments. The CIFAR-10 command needs the CIFAR tarball, which a test cannot download:
it runs with only its data flags replaced by synthetic images, which proves that the
rest of its options parse and train.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import main_one_thread, train_env

README = Path(__file__).resolve().parents[1] / "README.md"
SHORT = ["--epochs", "2", "--quiet", "--checkpoint-every", "0"]
FINAL_LINE = re.compile(r"final test accuracy \d+\.\d+% after \d+ epochs")
# The CIFAR command's data flags -> synthetic data of the same image size and channels; 4096
# samples so that its batch of 4096 fits, at 8x8 pixels so that two epochs of resnet20 take
# seconds, not minutes.
SYNTHETIC = ["--data", "synthetic", "--synthetic-samples", "4096", "--image-size", "8"]


def _code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(the text before the block since the previous one, the block's lines) of each
    fenced code block."""
    blocks, before, inside, lines = [], [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append(("\n".join(before), lines))
                before, lines = [], []
            inside = not inside
        elif inside:
            lines.append(line)
        else:
            before.append(line)
    return blocks


def _commands(lines: list[str]) -> list[list[str]]:
    """Each non-empty line as arguments, without its trailing comment."""
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def _training_section() -> str:
    text = README.read_text()
    start = text.index("\n## Training\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def training_commands() -> list[list[str]]:
    """The commands of the section's first code block."""
    return _commands(_code_blocks(_training_section())[0][1])


def cifar_command() -> list[str]:
    """The one command of the block introduced as needing CIFAR-10 in data/."""
    blocks = [lines for before, lines in _code_blocks(_training_section()) if "CIFAR-10 in data/" in before]
    assert len(blocks) == 1, "the Training section has one block introduced with 'CIFAR-10 in data/'"
    (command,) = _commands(blocks[0])
    return command


def to_argv(command: list[str]) -> list[str]:
    """A README command as an argv for this interpreter (python -m / torchrun)."""
    if command[:3] == ["python", "-m", "lbkernels.train"]:
        return [sys.executable, "-m", "lbkernels.train", *command[3:]]
    assert command[0] == "torchrun", command
    i = command.index("-m")
    assert command[i + 1] == "lbkernels.train", command
    launcher = [a for a in command[1:i] if a.startswith("--nproc_per_node")]
    assert launcher == command[1:i], f"torchrun options other than --nproc_per_node: {command}"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher,
            "-m", "lbkernels.train", *command[i + 2:]]


def without_data_flags(args: list[str]) -> list[str]:
    """``args`` less --data and --data-dir (with their values)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--data", "--data-dir"):
            skip = True
        else:
            out.append(a)
    return out


def run(argv: list[str], out_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Runs ``argv`` with the short budget; ``python -m lbkernels.train`` in this process
    (its ``main`` with the same arguments: no interpreter start-up per command)."""
    argv = argv + SHORT + ["--out-dir", str(out_dir)]
    if argv[1:3] == ["-m", "lbkernels.train"]:
        status = main_one_thread(argv[3:])
        out = capsys.readouterr()
        stdout, stderr = out.out, out.err
    else:
        proc = subprocess.run(argv, env=train_env(), capture_output=True, text=True, timeout=300)
        status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    assert status == 0, f"{shlex.join(argv)}\n{stdout}\n{stderr}"
    assert FINAL_LINE.search(stdout), stdout
    assert (out_dir / "config.yaml").is_file()


def _params() -> list:
    params = []
    for command in training_commands():
        marks = [pytest.mark.distributed, pytest.mark.slow] if command[0] == "torchrun" else []
        params.append(pytest.param(command, marks=marks, id=shlex.join(command[1:])))
    return params


def test_the_readme_lists_the_training_commands():
    commands = training_commands()
    assert len(commands) >= 6, commands
    assert all(c[:3] == ["python", "-m", "lbkernels.train"] or c[0] == "torchrun" for c in commands)
    assert "cifar10" not in sum(commands, []), "the CIFAR command has its own block"


@pytest.mark.parametrize("command", _params())
@pytest.mark.slow
def test_readme_training_command_runs_as_written(command, tmp_path, capsys):
    run(to_argv(command), tmp_path / "run", capsys)


@pytest.mark.slow
def test_readme_cifar_command_runs_with_synthetic_data(tmp_path, capsys):
    command = cifar_command()
    assert command[command.index("--data") + 1] == "cifar10"
    run(without_data_flags(to_argv(command)) + SYNTHETIC, tmp_path / "run", capsys)

"""The run directory: one run at a time in it, no leftovers of killed saves, and no run
overwritten by another or resumed with options that do not fit its checkpoint.

The job's first process holds an exclusive ``flock`` on ``<out-dir>/.lock`` for the whole
run: it alone writes ``checkpoint.pt``, ``metrics.csv`` and the plots, and the other
processes of a ``torchrun`` job write their own files only while it runs, so its lock
covers them all (a lock per process would also shut out the job's own processes). The
kernel drops the lock when the process ends, however it ends, so a killed run never
leaves the directory locked. The lock file stays: removing it would let a second run
lock a new file while a third still waits on the old one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any

from .config import CHECKPOINT_NAME, FROM_RECIPE, ConfigError, flag

LOCK_NAME = ".lock"
# What checkpoint.save leaves behind when its process is killed mid-write:
# mkstemp(prefix=".checkpoint.pt.", suffix=".tmp"), and the same for checkpoint.rank<R>.pt.
STALE_PATTERN = ".checkpoint*.pt.*.tmp"

# Options a resumed run may change, and that take effect when it does: how long it goes on,
# how it reports, checkpoints and waits, where it reads its data, and the shape of the
# learning-rate schedule (rebuilt from the options; its peak rates come from the checkpoint).
# Every other option is held by the checkpoint or decides what it holds, and a change would
# fail to load, load into the wrong thing (LARS's state trained on by SGD: 83.6% -> 9.4% test
# accuracy) or be ignored without a word (--lr, --momentum: the optimizer and schedule states
# bring back the recorded values): refused, naming the options.
_MAY_CHANGE = frozenset({
    "out_dir", "epochs", "eval_every", "checkpoint_every", "checkpoint_every_steps",
    "max_bad_steps", "quiet", "device", "dist_timeout", "data_dir",
    "warmup_epochs", "decay", "poly_power", "decay_epochs", "decay_gamma", FROM_RECIPE,
})


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_resume(saved: dict[str, Any], args: argparse.Namespace, run_dir: Path) -> None:
    """Refuse to resume the run of ``saved`` (its checkpoint's config) with ``args`` that
    change an option outside ``_MAY_CHANGE``; the error names each, old and new."""
    changed = [name for name, value in saved.items()
               if name not in _MAY_CHANGE and hasattr(args, name) and getattr(args, name) != value]
    if changed:
        given = ", ".join(f"{flag(n)} {_shown(getattr(args, n))}" for n in changed)
        before = ", ".join(f"{flag(n)} {_shown(saved[n])}" for n in changed)
        raise ConfigError(f"{given}: the run in {run_dir} was trained with {before}, which its "
                          f"checkpoint holds or depends on; a resumed run keeps them and may change "
                          f"only its length, schedule shape, reporting and checkpointing (start a "
                          f"new run in another --out-dir to change them)")


class RunDirectory:
    """A run directory locked for this process (see :func:`claim`)."""

    def __init__(self, path: Path, fd: int, created: bool, removed: list[str]):
        self.path = path
        self.created = created  # by this claim
        self.removed = removed  # stale files deleted when the run started
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def abandon(self) -> None:
        """Release a directory whose run never started: one this claim created goes
        again (a run that another process opened the lock file of meanwhile sees it
        gone, and refuses to start, see claim)."""
        if self._fd is not None and self.created:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
                self.path.rmdir()  # only if empty
        self.release()


def claim(out_dir: str | os.PathLike, resumed_from: str | os.PathLike | None) -> RunDirectory:
    """Create ``out_dir`` if needed and lock it for this run; then, under the lock, refuse
    a directory holding another run and remove the temporary files of killed saves.

    ``resumed_from``: the run directory whose checkpoint this run continues (None: a new
    run). Raises ConfigError naming --out-dir, having written nothing but the lock file.
    """
    path = Path(out_dir)
    lock = path / LOCK_NAME
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        why = "a file, not a directory" if path.is_file() else (e.strerror or type(e).__name__)
        raise ConfigError(f"--out-dir: cannot write to {path}: {why}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A run that never started may have removed the lock file (RunDirectory.abandon)
            # between this process's open and its lock: a lock on a file no one else sees.
            if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise ConfigError(f"--out-dir: {path} is in use by another run (it holds the lock on "
                              f"{lock}); wait for that run to end or choose another --out-dir") from None
        _check_writable(path)
        _check_no_other_run(path, resumed_from)
        removed = _remove_stale(path)
    except BaseException:
        os.close(fd)
        raise
    return RunDirectory(path, fd, created, removed)


def _check_writable(path: Path) -> None:
    # The lock file may predate a change of permissions: the run writes new files here.
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"--out-dir: cannot write to {path}: {e.strerror or type(e).__name__}") from None


def _check_no_other_run(path: Path, resumed_from: str | os.PathLike | None) -> None:
    if not (path / CHECKPOINT_NAME).exists():
        return
    if resumed_from is None:
        raise ConfigError(f"--out-dir: {path} already holds a run; continue it with "
                          f"--resume {path} or choose another --out-dir")
    source = Path(resumed_from)
    if not (source.exists() and os.path.samefile(source, path)):
        raise ConfigError(f"--out-dir: {path} holds another run than the one --resume {source} "
                          f"continues, and its checkpoint would be overwritten; give an empty "
                          f"--out-dir, or none to continue in {source}")


def _remove_stale(path: Path) -> list[str]:
    """Delete what killed saves left (only the lock holder writes here, so no save is
    under way); returns their names."""
    removed = []
    for stale in sorted(path.glob(STALE_PATTERN)):
        try:
            stale.unlink()
            removed.append(stale.name)
        except FileNotFoundError:
            pass
    return removed

"""Entry point of ``python -m lbkernels.train`` and of the ``lbk-train`` script.

A user's error (a bad option, a run directory in use or holding another run, a
checkpoint that does not fit, a run too large for the memory) is one line on stderr
and exit status 2, with nothing of a run written. Under ``torchrun`` every process of
the job meets the same errors (they come from the same options), so only the first
one (``RANK`` 0) prints them and all exit with the same status.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from . import resources, rundir
from .checkpoint import CheckpointError
from .cli import parse_args
from .config import PROG, ConfigError
from .data import DataError
from .distributed import first_process, in_a_job, setup
from .loop import OwnCheckpointError, Trainer, TrainingStopped


def _error(message: str, *, every_process: bool = False) -> None:
    """One line on stderr: from the job's first process only, unless the error may be
    this process's alone (its own checkpoint, its peers lost)."""
    if every_process or first_process():
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


# torchrun stops every process as soon as one exits with an error: a process other than
# the first, stopping on an error the first one reports, leaves it this long to print it
# (the processes start together, and reading the options takes them about as long).
_REPORT_GRACE_S = 3.0


def _leave_after_first(status: int) -> int:
    """``status``, returned once the job's first process has reported the error all share
    (call it after :func:`_error`)."""
    if in_a_job():
        if dist.is_initialized():
            with contextlib.suppress(RuntimeError):  # a process that did not share the error
                dist.barrier()  # the first process reaches it after printing
        elif not first_process():
            time.sleep(_REPORT_GRACE_S)
    return status


def _parse_args_once(argv: list[str] | None) -> tuple:
    """parse_args, whose own output (argparse's usage and errors, --help) only the job's
    first process prints; the others exit as it does, once it has printed."""
    if first_process():
        return parse_args(argv)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
                contextlib.redirect_stderr(null):
            return parse_args(argv)
    except SystemExit as e:
        if e.code:
            _leave_after_first(e.code)
        raise


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (2: bad options, 1: the run failed)."""
    try:
        args, resume = _parse_args_once(argv)
        # The run a --resume continues: --resume RUN_DIR, or the --out-dir it names.
        resumed_from = None if resume is None else Path(args.resume or args.out_dir)
        if resume is not None:
            rundir.check_resume(resume.get("config", {}), args, resumed_from)
        runtime = setup(args)
    except (ConfigError, CheckpointError) as e:
        _error(str(e))
        return _leave_after_first(2)
    except dist.DistError as e:  # the other processes never came (rendezvous timeout)
        _error(f"could not join the other processes: {e}", every_process=True)
        return 1
    claimed, started, last = None, False, None
    try:
        # Before anything is allocated or written. Every process checks the memory (what
        # is available differs between them); the first one also locks and checks the run
        # directory; then all learn the first error, so that all stop or all go on.
        problem = None
        try:
            resources.check_memory(args, runtime.device,
                                   int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size)))
            if runtime.is_main:
                claimed = rundir.claim(args.out_dir, resumed_from)
        except ConfigError as e:
            problem = str(e)
        if (problem := runtime.first_error(problem)) is not None:
            raise ConfigError(problem)
        trainer = Trainer(args, runtime, resume)
        started = True
        last = trainer.fit()
    except OwnCheckpointError as e:
        _error(f"process {runtime.rank}: {e}" if runtime.rank else str(e), every_process=True)
        return 2
    except (ConfigError, CheckpointError) as e:  # the same on every process: from the options
        _error(str(e))
        return _leave_after_first(2)
    except (DataError, TrainingStopped) as e:  # the same files, the same global loss
        _error(str(e))
        return _leave_after_first(1)
    except RuntimeError as e:
        if not runtime.distributed:
            raise
        # Most often another process died (gloo and NCCL report a lost peer as a
        # RuntimeError); the details stay above the one-line summary.
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _error(f"process {runtime.rank} of {runtime.world_size} stopped: {first}", every_process=True)
        return 1
    finally:
        if claimed is not None:
            # A run that never started leaves no directory behind (a bad option found
            # while building it, say); one that started keeps its files.
            claimed.release() if started else claimed.abandon()
        runtime.close(finished=last is not None)
    if runtime.is_main:
        acc = last["test_acc"]
        print(f"final test accuracy {100 * acc:.2f}% after {last['epoch']} epochs, "
              f"{last['updates']} updates, {last['wall_time']:.1f}s of training; "
              f"run directory {args.out_dir}", flush=True)
    return 0


def _leave(status: int) -> None:
    """Exit with ``status``. After a run with DDP over gloo the process group outlives
    destroy_process_group: DDP's reducer keeps it (a 2-process probe: gloo's 3 threads
    still run after the wrapper and the model are deleted, the group destroyed and the
    garbage collected), and the interpreter's exit destroys it, which aborted about 1
    run in 7 ("terminate called without an active exception", SIGABRT) on a process
    other than the first. Every process has passed the final barrier and written
    everything by then, so the interpreter's teardown is skipped."""
    if dist.is_available() and in_a_job():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def run() -> None:
    """``python -m lbkernels.train`` and the ``lbk-train`` script: :func:`main`, then
    :func:`_leave` with its status."""
    _leave(main())


if __name__ == "__main__":
    run()

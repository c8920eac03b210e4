"""Entry point of ``python -m lbkernels.train`` and of the ``lbk-train`` script."""

from __future__ import annotations

import sys
import traceback

import torch.distributed as dist

from .checkpoint import CheckpointError
from .cli import PROG, ConfigError, parse_args


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (2: bad options, 1: the run failed)."""
    # Imported here so that --help and option errors come back without loading data or models.
    from . import distributed
    from .data import DataError
    from .loop import Trainer, TrainingStopped

    try:
        args, resume = parse_args(argv)
        runtime = distributed.setup(args)
    except (ConfigError, CheckpointError) as e:
        _error(str(e))
        return 2
    except dist.DistError as e:  # the other processes never came (rendezvous timeout)
        _error(f"could not join the other processes: {e}")
        return 1
    try:
        trainer = Trainer(args, runtime, resume)
        last = trainer.fit()
    except ConfigError as e:
        _error(str(e))
        return 2
    except (DataError, CheckpointError, TrainingStopped) as e:
        _error(str(e))
        return 1
    except RuntimeError as e:
        if not runtime.distributed:
            raise
        # Most often another process died (gloo and NCCL report a lost peer as a
        # RuntimeError); the details stay above the one-line summary.
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _error(f"process {runtime.rank} of {runtime.world_size} stopped: {first}")
        return 1
    finally:
        runtime.close()
    if runtime.is_main:
        acc = last["test_acc"]
        print(f"final test accuracy {100 * acc:.2f}% after {last['epoch']} epochs, "
              f"{last['updates']} updates, {last['wall_time']:.1f}s of training; "
              f"run directory {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

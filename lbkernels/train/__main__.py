"""Entry point of ``python -m lbkernels.train`` and of the ``lbk-train`` script."""

from __future__ import annotations

import sys

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
    try:
        trainer = Trainer(args, runtime, resume)
        last = trainer.fit()
    except ConfigError as e:
        _error(str(e))
        return 2
    except (DataError, CheckpointError, TrainingStopped) as e:
        _error(str(e))
        return 1
    except dist.DistError as e:
        _error(f"process {runtime.rank} of {runtime.world_size}: lost the other processes "
               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return 1
    finally:
        runtime.close() if "runtime" in locals() else None
    if runtime.is_main:
        acc = last["test_acc"]
        print(f"final test accuracy {100 * acc:.2f}% after {last['epoch']} epochs, "
              f"{last['updates']} updates, {last['wall_time']:.1f}s of training; "
              f"run directory {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

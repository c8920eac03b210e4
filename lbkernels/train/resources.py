"""Memory a run needs, estimated before anything is allocated.

A run holds a few copies of its parameters (weights, gradients, momentum, the copy a
checkpoint takes), and some methods many more: ``--delay tau`` keeps ``tau + 1`` momentum
buffers per parameter (shifted momentum) and ``tau + 1`` queued gradients (delayed) or
``tau + 2`` workers' weights, which a checkpoint copies once more (async-sim). Those
grow without bound with --delay and --width, and an allocation beyond the machine's
memory ends the process without a word (the kernel's OOM killer) or with a traceback.
The model is built on the meta device to count its parameters without allocating them.
The estimate leaves out activations and data, so it is a lower bound: a run it refuses
cannot fit, and one it lets through may still need more.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .config import ConfigError
from .models import build_model

# (channels, height, width) and classes of each data set, known without loading it.
_SHAPES = {
    "digits": lambda args: ((1, 8, 8), 10),
    "cifar10": lambda args: ((3, 32, 32), 10),
    "cifar100": lambda args: ((3, 32, 32), 100),
    "synthetic": lambda args: ((3, args.image_size, args.image_size), 10),
}
# Parameter copies of every run: weights, gradients, one momentum buffer, and the
# checkpoint's copy of the weights while it is written.
BASE_COPIES = 4
# Copies a method adds besides those of --delay (extrapolated SGD: anchors, extrapolated
# point and captured local gradients; SWA/SWAP: the average and its checkpoint copy).
_METHOD_COPIES = {"extrap": 3, "extrap-postlocal": 3, "swap": 2, "swa": 2}


def _size(n: float) -> str:
    unit = max((u for u in range(5) if n >= 1024 ** u or u == 0))
    return f"{n / 1024 ** unit:,.1f} {('bytes', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def delay_copies(args: argparse.Namespace) -> int:
    """Parameter copies --delay adds to --method delayed or async-sim (0 otherwise)."""
    if args.method not in ("delayed", "async-sim"):
        return 0
    tau = args.delay
    # Shifted momentum: tau + 1 buffers instead of the one in BASE_COPIES.
    buffers = tau if getattr(args, "momentum_kind", "shifted") == "shifted" else 0
    if args.method == "delayed":
        return buffers + tau + 1  # the queue's tau + 1 gradient slots
    # AsyncSimulator: tau + 1 workers' weights and a scratch copy, and its state_dict
    # clones the tau + 1 workers' weights for every checkpoint.
    return buffers + (tau + 2) + (tau + 1)


def parameter_count(args: argparse.Namespace) -> int:
    """Parameters and buffers of --model at --width for --data, counted on the meta device."""
    shape, classes = _SHAPES[args.data](args)
    try:
        with torch.device("meta"):
            model = build_model(args.model, shape, classes, args.width)
    except (RuntimeError, ValueError, OverflowError) as e:  # sizes beyond int64, say
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--width: {args.width} makes {args.model} too large to build ({first}); "
                          f"use a smaller --width") from None
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process's tensors on ``device`` (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def check_memory(args: argparse.Namespace, device: torch.device, processes_here: int = 1) -> None:
    """Raise ConfigError, naming the option to lower, when the parameter copies of the
    run (times the ``processes_here`` processes sharing the machine's memory on a CPU
    run) exceed the memory available now."""
    if args.data not in _SHAPES:
        return
    free = available_bytes(device)
    sharing = processes_here if device.type == "cpu" else 1
    if args.data == "synthetic" and free is not None:
        # Its pools of up to 1,024 training and 1,024 test images, uint8.
        images = (min(args.synthetic_samples, 1024) + 1024) * 3 * args.image_size ** 2 * sharing
        if images > free:
            raise ConfigError(f"--image-size: {args.image_size} needs {_size(images)} for the synthetic "
                              f"images alone, but {_size(free)} of {device.type} memory is available")
    count = parameter_count(args)
    delayed = delay_copies(args)
    copies = BASE_COPIES + _METHOD_COPIES.get(args.method, 0) + delayed
    need = count * 4 * copies * sharing  # float32 parameters and state
    if free is None or need <= free:
        return
    what = (f"at least {_size(need)}: {copies:,} copies of the {count:,} parameters of "
            f"{args.model} at --width {args.width}"
            + (f", for each of {sharing} processes" if sharing > 1 else "")
            + f", but {_size(free)} of {device.type} memory is available")
    if delayed > BASE_COPIES:
        raise ConfigError(f"--delay: {args.delay} needs {what}; lower --delay")
    raise ConfigError(f"--width: {args.width} needs {what}; lower --width or choose a smaller --model")

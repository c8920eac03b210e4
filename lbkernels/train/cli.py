"""Options of ``python -m lbkernels.train``: flags, config files and resumed runs.

The options are set in layers, each overriding the one before: the built-in defaults,
the method's recipe (``Method.recipe``: the values that make that method train well),
the configuration of a resumed run (``--resume``), a config file (``--config``, YAML or
TOML, keys named like the flags: ``batch-size`` or ``batch_size``), then the flags.
The result is one ``argparse.Namespace``; ``config.resolved(args)`` is what a run
directory's ``config.yaml`` records (with ``from_recipe``, the options the recipe set),
and that file is itself a valid ``--config`` (read by ``config.read_config_file``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint, sharded
from .argtypes import fraction, nonnegative_float, nonnegative_int, positive_float, positive_int
from .config import (CHECKPOINT_NAME, FROM_RECIPE, PROG, ConfigError, check_values, flag,
                     read_config_file, resolved)
from .data import DATASETS
from .distributed import first_process, job_world_size
from .methods import METHODS
from .models import MODELS

# Recipe options that detail the recipe's --decay: taken from it only with that --decay.
_DECAY_OPTIONS = ("decay_epochs", "decay_gamma", "poly_power")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # A default of None means "worked out at run time"; the help text says how.
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest in _recipe_options():
            default = action.default
            if isinstance(default, list):
                default = " ".join(map(str, default)) or "none"
            return f"{action.help} (default: the method's recipe, else {default})"
        return action.help if action.default is None else super()._get_help_string(action)


def _recipe_options() -> set[str]:
    """The options some method's recipe sets."""
    return {key for method in METHODS.values() for key in method.recipe}


def recipe_flags(recipe: dict[str, Any]) -> str:
    """A recipe as the flags that would give it (for --help and the docs)."""
    parts = []
    for key, value in recipe.items():
        spelled = flag(key)
        if isinstance(value, bool):
            parts.append(spelled if value else "--no-" + spelled[2:])
        elif isinstance(value, (list, tuple)):
            parts.append(f"{spelled} {' '.join(map(str, value))}")
        else:
            parts.append(f"{spelled} {value}")
    return " ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train a network with a large-batch method. With no arguments: a small CNN "
            "on scikit-learn's digits with LARS at batch 512 on the CPU (about a minute). "
            "Under `torchrun --nproc_per_node=K` the same command trains data-parallel; "
            "--batch-size stays the global batch."
        ),
        epilog=(
            "Options can also come from --config FILE (YAML or TOML; keys named like the "
            "flags without dashes, e.g. batch_size: 512); flags override the file. "
            "A run directory's config.yaml is such a file. Each --method has a recipe: the "
            "values it takes for the options given neither by a flag, nor by --config, nor by "
            "a resumed run (listed under the method below; --show-config prints them "
            "resolved). A recipe's --decay-epochs are epochs of its own --epochs and move in "
            "proportion with another --epochs."
        ),
        formatter_class=_HelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", default=None,
                     help="YAML (.yaml/.yml) or TOML (.toml) file of option values")
    run.add_argument("--out-dir", metavar="DIR", default=None,
                     help="run directory for config, metrics, plots and checkpoint "
                          "(default: runs/<date-time>)")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR (or in --out-dir) exactly where its "
                          "checkpoint left it; flags given now override its options")
    run.add_argument("--seed", type=nonnegative_int, default=0,
                     help="seed of initialisation, data order and augmentation")
    run.add_argument("--epochs", type=positive_int, default=40, help="training epochs")
    run.add_argument("--eval-every", type=positive_int, default=1, metavar="EPOCHS",
                     help="evaluate on the test set every this many epochs (and at the end)")
    run.add_argument("--checkpoint-every", type=nonnegative_int, default=1, metavar="EPOCHS",
                     help="checkpoint every this many epochs (0: only at the end)")
    run.add_argument("--checkpoint-every-steps", type=nonnegative_int, default=0, metavar="STEPS",
                     help="also checkpoint every this many steps, mid-epoch (0: never)")
    run.add_argument("--max-bad-steps", type=nonnegative_int, default=10, metavar="K",
                     help="stop when more than K steps in a row have a non-finite loss "
                          "(such steps are skipped)")
    run.add_argument("--quiet", action="store_true", default=False,
                     help="print only the final result (no progress bar, no epoch lines)")
    run.add_argument("--show-config", action="store_true", default=False,
                     help="print the resolved options (config.yaml's content) and exit "
                          "without training")

    data = p.add_argument_group("data")
    data.add_argument("--data", choices=sorted(DATASETS), default="digits",
                      help="data set: digits (ships with scikit-learn), cifar10/cifar100 "
                           "(python tarballs in --data-dir), synthetic (random, for throughput)")
    data.add_argument("--data-dir", metavar="DIR", default="data",
                      help="directory holding cifar-10-python.tar.gz / cifar-100-python.tar.gz")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="random crop (padding 4) and horizontal flip of image data sets "
                           "(not digits)")
    data.add_argument("--cutout", type=nonnegative_int, default=0, metavar="PIXELS",
                      help="side of a random square zeroed in each training image (0: off)")
    data.add_argument("--synthetic-samples", type=positive_int, default=50_000, metavar="N",
                      help="training samples of --data synthetic")
    data.add_argument("--image-size", type=positive_int, default=32, metavar="PIXELS",
                      help="image side of --data synthetic")

    model = p.add_argument_group("model")
    model.add_argument("--model", choices=list(MODELS), default="cnn",
                       help="; ".join(f"{name}: {m.summary}" for name, m in MODELS.items()))
    model.add_argument("--width", type=positive_float, default=1.0, metavar="FACTOR",
                       help="multiplier of every layer's width (e.g. 0.25 for a narrow VGG-11)")

    opt = p.add_argument_group("optimisation (every method)")
    opt.add_argument("--method", choices=list(METHODS), default="lars",
                     help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()))
    opt.add_argument("--batch-size", type=positive_int, default=512,
                     help="global batch: summed over all processes")
    opt.add_argument("--lr", type=nonnegative_float, default=5.0,
                     help="peak learning rate at --base-batch-size; the run's peak is "
                          "lr * batch-size / base-batch-size (linear scaling rule)")
    opt.add_argument("--base-batch-size", type=positive_int, default=256,
                     help="batch size at which --lr is given")
    opt.add_argument("--momentum", type=fraction, default=0.9, help="momentum")
    opt.add_argument("--weight-decay", type=nonnegative_float, default=5e-4,
                     help="L2 penalty of weights (not of biases and normalisation layers)")
    opt.add_argument("--warmup-epochs", type=nonnegative_float, default=5.0,
                     help="linear warm-up from 0 to the peak learning rate over this many epochs")
    opt.add_argument("--decay", choices=("poly", "step"), default="poly",
                     help="after warm-up: poly decays to 0 as (1 - t)^power; step multiplies "
                          "by --decay-gamma at each of --decay-epochs (Goyal et al.)")
    opt.add_argument("--poly-power", type=positive_float, default=2.0,
                     help="power of --decay poly")
    opt.add_argument("--decay-epochs", type=positive_int, nargs="*", default=[], metavar="EPOCH",
                     help="epochs at which --decay step multiplies the learning rate by --decay-gamma")
    opt.add_argument("--decay-gamma", type=positive_float, default=0.1,
                     help="factor of --decay step")

    for method in METHODS.values():
        recipe = f"recipe: {recipe_flags(method.recipe)}" if method.recipe else "recipe: the defaults"
        method.add_arguments(p.add_argument_group(f"--method {method.name}", recipe))
    dests = {a.dest for a in p._actions}
    unknown = _recipe_options() - dests
    if unknown:
        raise ValueError(f"recipes name options that do not exist: {sorted(unknown)}")

    system = p.add_argument_group("system")
    system.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available; under torchrun each process takes "
                             "the GPU of its LOCAL_RANK")
    system.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                        help="under torchrun: ddp replicates the model (DistributedDataParallel); "
                             "fsdp shards weights, gradients and optimizer state over the "
                             "processes (FSDP2 fully_shard; methods sgd, lars, lamb, growing-batch, swa)")
    system.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision (fp16 with dynamic loss scaling)")
    system.add_argument("--dist-timeout", type=positive_float, default=300.0, metavar="SECONDS",
                        help="how long a process waits for the others before failing "
                             "(a dead process ends the run after at most this)")
    return p


def _resume_dir(pre: argparse.Namespace, file_values: dict[str, Any]) -> Path:
    if pre.resume:
        return Path(pre.resume)
    out_dir = pre.out_dir or file_values.get("out_dir")
    if not out_dir:
        raise ConfigError("--resume: name the run to continue: --resume RUN_DIR (or --out-dir RUN_DIR)")
    return Path(out_dir)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None]:
    """The run's options and, with ``--resume``, the checkpoint to continue from.

    Bad flags exit through argparse (status 2); bad values from files raise ConfigError.
    """
    parser = build_parser()
    # Where the layers below the flags come from, read before the flags are applied.
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--resume", "--out-dir"):
        pre.add_argument(flag, **({"nargs": "?", "const": ""} if flag == "--resume" else {}))
    pre_args, _ = pre.parse_known_args(argv)

    file_values = read_config_file(pre_args.config, parser) if pre_args.config else {}
    file_values.pop(FROM_RECIPE, None)  # a file's values are the user's, wherever they came from
    state = None
    layers: dict[str, Any] = {}
    recorded: list[str] = []  # options a resumed run took from its recipe
    if pre_args.resume is not None:
        run_dir = _resume_dir(pre_args, file_values)
        state = checkpoint.load(run_dir / CHECKPOINT_NAME)
        layers.update(check_values(state["config"], parser, f"--resume {run_dir}"))
        recorded = layers.pop(FROM_RECIPE, [])
        layers["out_dir"] = str(run_dir)
    layers.update(file_values)
    parser.set_defaults(**layers)
    args, given = _parse_flags(parser, argv)
    # A resumed run keeps its recorded values (the recipe may have changed since), and
    # their origin, unless a file or a flag sets them now.
    kept = [k for k in recorded if k not in file_values and k not in given]
    filled = apply_recipe(args, set(layers) | given)
    setattr(args, FROM_RECIPE, sorted(set(kept) | set(filled)))
    if args.out_dir is None:
        args.out_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    _check_relations(args)
    sharded.check_options(args, job_world_size(), state)
    if args.show_config:
        if first_process():  # under torchrun, once
            print(yaml.safe_dump(resolved(args), sort_keys=False), end="", flush=True)
        raise SystemExit(0)
    return args, state


# Stands for "no flag gave this option" while the flags are parsed: argparse sets only
# the attributes it is given.
_UNSET = object()


def _parse_flags(parser: argparse.ArgumentParser,
                 argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """``parser.parse_args(argv)`` and the options set by flags (not by a default or a
    layer), in one parse: every option starts out unset, so argparse writes only those
    the flags give; the others then take their defaults, in the parser's order (that of
    config.yaml)."""
    actions = [a for a in parser._actions if a.default is not argparse.SUPPRESS]
    args = parser.parse_args(argv, argparse.Namespace(**{a.dest: _UNSET for a in actions}))
    given = {a.dest for a in actions if getattr(args, a.dest) is not _UNSET}
    for a in actions:
        if a.dest not in given:
            # As argparse treats a default: a string goes through the option's type.
            default = a.default
            setattr(args, a.dest, a.type(default) if isinstance(default, str) and a.type else default)
    return args, given


def apply_recipe(args: argparse.Namespace, fixed: set[str]) -> list[str]:
    """Sets the options not in ``fixed`` from ``args.method``'s recipe; returns their names.

    The recipe's ``decay_epochs`` are epochs of the recipe's own ``epochs``: with another
    --epochs they move in proportion (15 23 of 30 become 20 30 of 40), so that the decay
    keeps its place in the run. ``decay_epochs``, ``decay_gamma`` and ``poly_power`` detail
    the recipe's ``decay``: they come with it, not when --decay is set otherwise (``--decay
    step`` alone has no milestones, as without a recipe).
    """
    recipe = METHODS[args.method].recipe
    filled = []
    for key in sorted(recipe, key=lambda k: k in _DECAY_OPTIONS):  # epochs and decay first
        if key in fixed or (key in _DECAY_OPTIONS and "decay" not in filled):
            continue
        value = recipe[key]
        if key == "decay_epochs":
            value = _scale_epochs(list(value), recipe.get("epochs", args.epochs), args.epochs)
        setattr(args, key, list(value) if isinstance(value, tuple) else value)
        filled.append(key)
    return filled


def _scale_epochs(milestones: list[int], of: int, epochs: int) -> list[int]:
    """``milestones`` of a run of ``of`` epochs moved to one of ``epochs`` (rounded half up,
    within 1 .. epochs, repeats dropped)."""
    out: list[int] = []
    for m in milestones:
        e = min(max(1, int(m * epochs / of + 0.5)), epochs)
        if not out or e > out[-1]:
            out.append(e)
    return out


def _check_relations(args: argparse.Namespace) -> None:
    """Checks between options (each option alone was checked by its type)."""
    if args.decay == "step":
        if args.decay_epochs != sorted(set(args.decay_epochs)):
            raise ConfigError(f"--decay-epochs: expected increasing epochs, got {args.decay_epochs}")
    elif args.decay_epochs:
        raise ConfigError("--decay-epochs: only used with --decay step")
    if args.data == "digits" and args.cutout:
        raise ConfigError("--cutout: digits are 8x8 feature maps without augmentation; "
                          "use it with cifar10, cifar100 or synthetic")
    side = args.image_size if args.data == "synthetic" else 32
    if args.cutout > side:
        raise ConfigError(f"--cutout: {args.cutout} is larger than the {side}x{side} images")

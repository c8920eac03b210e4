"""The run's options as values: names shared by every layer, and the config files.

A leaf of the training command (it imports nothing of it): the methods, the loop, the
run directory and the option parser (``cli``) all name options, errors and files
through it. ``read_config_file`` reads a ``--config`` file (YAML or TOML, keys named
like the flags: ``batch-size`` or ``batch_size``) or a resumed run's recorded options
and checks each value as its flag would; ``resolved(args)`` is what a run directory's
``config.yaml`` records, and that file is itself a valid ``--config``.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PROG = "lbk-train"
CHECKPOINT_NAME = "checkpoint.pt"
# Options that say how to start this process rather than what the run is.
NOT_RECORDED = ("config", "resume", "show_config")
# The key of config.yaml that lists the options whose values came from the method's recipe.
FROM_RECIPE = "from_recipe"


class ConfigError(ValueError):
    """A bad option value; the message starts with the option's name."""


def flag(name: str) -> str:
    """The command-line spelling of option ``name`` (``batch_size``: ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def dest(key: Any) -> str:
    """The option name of a config file's key (``batch-size`` or ``batch_size``)."""
    return str(key).replace("-", "_")


def resolved(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define the run, as plain values (for config.yaml and checkpoints)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Option values from a YAML or TOML file, checked like the flags."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: {path}: no such file")
    try:
        if file.suffix == ".toml":
            with file.open("rb") as f:
                raw = tomllib.load(f)
        elif file.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(file.read_text()) or {}
        else:
            raise ConfigError(f"--config: {path}: expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as e:  # the parsers' own errors say where the syntax broke
        raise ConfigError(f"--config: {path}: cannot parse: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path}: expected a mapping of option names to values")
    return check_values(raw, parser, f"--config {path}")


def check_values(raw: dict, parser: argparse.ArgumentParser, source: str) -> dict[str, Any]:
    """``raw``'s option values (from ``source``: a file, a checkpoint) as the flags would
    have parsed them; an unknown name or a bad value raises ConfigError."""
    table = {a.dest: a for a in parser._actions if a.dest != "help"}
    out = {}
    for key, value in raw.items():
        name = dest(key)
        if name == FROM_RECIPE:
            # What config.yaml says about its own values: a record, not an option.
            if not isinstance(value, list) or not all(dest(v) in table for v in value):
                raise ConfigError(f"{source}: {key}: expected a list of option names, got {value!r}")
            out[name] = [dest(v) for v in value]
            continue
        if name not in table or name in NOT_RECORDED:
            known = [k for k in table if k not in NOT_RECORDED]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown option {key!r}{hint}")
        out[name] = _coerce(table[name], key, value, source)
    return out


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A config-file value as the flag would have parsed it."""
    spelled = action.option_strings[-1] if action.option_strings else key

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{source}: {key} (--{spelled.lstrip('-')}): {why}")

    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+"):
        values = value if isinstance(value, list) else [value]
        return [_coerce_one(action, v, fail) for v in values]
    if value is None and action.default is None:
        return None
    return _coerce_one(action, value, fail)


def _coerce_one(action: argparse.Action, value: Any, fail: Callable[[str], ConfigError]) -> Any:
    if isinstance(value, (bool, list, dict)):
        raise fail(f"expected a single value, got {value!r}")
    text = str(value)
    try:
        parsed = action.type(text) if action.type else text
    except argparse.ArgumentTypeError as e:
        raise fail(str(e)) from None
    if action.choices is not None and parsed not in action.choices:
        raise fail(f"expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return parsed

"""Value types of the command-line options: each rejects a bad value with a message
that says what was expected (argparse prefixes the option's name)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _number(kind: type, test: Callable[[Any], bool], expect: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}")
        return value

    parse.__name__ = expect  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer > 0")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")

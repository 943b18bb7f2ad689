"""The small vocabulary of config checks: each layer's `problems(config)` is written in it.

A check appends one line to `problems` naming the field, what it holds and what is allowed; the
entry point gathers every layer's lines and raises one `ConfigError` with all of them, so a typo
fails in a second with every mistake named, not after the training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any


def in_range(problems: list[str], path: str, value: Any, low=None, high=None, *,
             integer: bool = False, low_open: bool = False, high_open: bool = False) -> None:
    """Appends a message unless low <= value <= high (with open ends where asked)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{path}: must be an integer, got {value!r}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        problems.append(f"{path}: must be a finite number, got {value!r}")
        return
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        problems.append(f"{path}: must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")


def one_of(problems: list[str], path: str, value: Any, allowed: Sequence[Any]) -> None:
    """Appends a message unless `value` is one of `allowed`."""
    if value not in allowed:
        problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def folder_problem(path: str) -> str | None:
    """Why `path` cannot be a folder this process writes into (None: it can)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path} exists and is not a folder"
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        return f"cannot create {path}: {parent} is not a writable folder"
    return None

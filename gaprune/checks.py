"""Argument checks shared by the request objects and the Python API: each raises InputError with the
message the command line gives for the same value (the flag's name as ``name``)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from gaprune.errors import InputError


def number_in(value: object, name: str, low: float = 0.0, high: float = 1.0) -> float:
    """A finite real number in [low, high] (bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bounds = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise InputError(f"{name} must be {bounds}, got {value}")
    return float(value)


def whole_number(value: object, name: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise InputError(f"{name} must be a whole number of at least {least}, got {value!r}")
    return int(value)


def integer(value: object, name: str) -> int:
    """A whole number of any sign (bools refused): a seed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def optional_whole_number(value: object, name: str, least: int = 1) -> int | None:
    return None if value is None else whole_number(value, name, least)


def one_of(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} takes {', '.join(choices)}, not {value!r}")
    return value


def file_path(value: object, name: str, optional: bool = False) -> str | None:
    """A path given as a non-empty string (existence is checked where the file is read)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(f"{name} must be a file path, got {value!r}")
    return value


def layer_type_list(value: object, known: Sequence[str], name: str = "--sparsify_layers") -> tuple[str, ...]:
    """One or more known layer types, as a tuple."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise InputError(f"{name} takes one or more layer types, got {value!r}")
    unknown = [str(t) for t in value if t not in known]
    if unknown:
        raise InputError(f"unknown layer type(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return tuple(value)

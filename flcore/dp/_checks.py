"""Validation helpers shared by the DP modules (messages name the bad value, like dp_accounting's)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flcore.errors import FlcoreError


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def positive(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is finite and ``> 0``; raise FlcoreError naming it otherwise."""
    number = _finite_number(value)
    if number is None or number <= 0:
        raise FlcoreError(f"{name} must be a finite number above 0. Found {value!r}.")
    return number


def non_negative(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is finite and ``>= 0``; raise FlcoreError naming it otherwise."""
    number = _finite_number(value)
    if number is None or number < 0:
        raise FlcoreError(f"{name} must be a finite number of at least 0. Found {value!r}.")
    return number


def probability_open(name: str, value: Any) -> float:
    """Return ``value`` as a float if it lies in the open interval ``(0, 1)``."""
    number = _finite_number(value)
    if number is None or not 0 < number < 1:
        raise FlcoreError(f"{name} must be a number in (0, 1). Found {value!r}.")
    return number


def count(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 0:
        raise FlcoreError(f"{name} must be a non-negative integer. Found {value!r}.")
    return int(value)


def generator(rng: Any) -> np.random.Generator:
    """Return ``rng`` if it is a ``numpy.random.Generator``; raise FlcoreError otherwise."""
    if not isinstance(rng, np.random.Generator):
        raise FlcoreError(
            "rng must be a numpy.random.Generator (in production "
            f"np.random.default_rng(secrets.randbits(128))). Found {type(rng).__name__}."
        )
    return rng

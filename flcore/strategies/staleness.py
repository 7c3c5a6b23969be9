"""Staleness functions ``s(t - tau)`` that discount updates computed from an old global model.

From Xie, Koyejo and Gupta 2019, "Asynchronous Federated Optimization" (Section 5.2), where ``t`` is the
server's current version and ``tau`` the version the client started from:

- constant: ``s(t - tau) = 1``;
- polynomial: ``s_a(t - tau) = (t - tau + 1)^(-a)``, ``a > 0``;
- hinge: ``s_{a,b}(t - tau) = 1`` if ``t - tau <= b``, else ``1 / (a (t - tau - b) + 1)``.

FedBuff (Nguyen et al. 2022, Section 4) uses the polynomial one with ``a = 1/2``: ``1 / sqrt(1 + staleness)``.

Invariants: every function maps a staleness ``>= 0`` to a weight in ``(0, 1]``, equal to 1 at staleness 0 and
non-increasing; staleness is validated (a non-negative integer) before use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flcore.errors import FlcoreError
from flcore.strategies.base import Hyperparameter

__all__ = [
    "STALENESS_FUNCTIONS",
    "STALENESS_HYPERPARAMETERS",
    "StalenessFunction",
    "constant_staleness",
    "hinge_staleness",
    "polynomial_staleness",
]

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")
"""Names accepted by the ``staleness_function`` hyperparameter."""


def _check_staleness(staleness: int) -> int:
    if not isinstance(staleness, int | np.integer) or isinstance(staleness, bool) or staleness < 0:
        raise FlcoreError(
            f"staleness (current version minus the client's base version) must be a non-negative integer. "
            f"Found {staleness!r}."
        )
    return int(staleness)


def constant_staleness(staleness: int) -> float:
    """Return ``1`` whatever the staleness (FedAsync+Const)."""
    _check_staleness(staleness)
    return 1.0


def polynomial_staleness(staleness: int, a: float) -> float:
    """Return ``(staleness + 1)^(-a)`` (Xie et al. 2019, Section 5.2, FedAsync+Poly)."""
    return float((_check_staleness(staleness) + 1) ** (-a))


def hinge_staleness(staleness: int, a: float, b: float) -> float:
    """Return ``1`` if ``staleness <= b`` else ``1 / (a (staleness - b) + 1)`` (Xie et al. 2019, Hinge)."""
    value = _check_staleness(staleness)
    if value <= b:
        return 1.0
    return 1.0 / (a * (value - b) + 1.0)


STALENESS_HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("staleness_function", "str", "polynomial", choices=STALENESS_FUNCTIONS),
    Hyperparameter("polynomial_exponent", "float", 0.5, minimum=0.0, minimum_inclusive=False),
    Hyperparameter("hinge_slope", "float", 10.0, minimum=0.0, minimum_inclusive=False),
    Hyperparameter("hinge_cutoff", "float", 4.0, minimum=0.0),
)
"""Shared hyperparameters: the function (default polynomial), ``a`` of the polynomial (default 0.5, Xie et al.
2019 and FedBuff's ``1/sqrt(1 + staleness)``), and ``a``, ``b`` of the hinge (defaults 10 and 4, the values
of Xie et al. 2019's experiments)."""


@dataclass(frozen=True)
class StalenessFunction:
    """A configured staleness function; call it with a staleness to get its weight.

    Parameters
    ----------
    kind : {"constant", "polynomial", "hinge"}
        Which function.
    polynomial_exponent : float
        ``a`` of the polynomial function.
    hinge_slope, hinge_cutoff : float
        ``a`` and ``b`` of the hinge function.
    """

    kind: str = "polynomial"
    polynomial_exponent: float = 0.5
    hinge_slope: float = 10.0
    hinge_cutoff: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_FUNCTIONS:
            raise FlcoreError(
                f"Unknown staleness function {self.kind!r}; expected one of {STALENESS_FUNCTIONS}."
            )
        for name in ("polynomial_exponent", "hinge_slope", "hinge_cutoff"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise FlcoreError(f"Staleness parameter {name!r} must be finite and >= 0. Found {value!r}.")

    def __call__(self, staleness: int) -> float:
        """Return the weight in (0, 1] of an update ``staleness`` versions behind."""
        if self.kind == "constant":
            return constant_staleness(staleness)
        if self.kind == "polynomial":
            return polynomial_staleness(staleness, self.polynomial_exponent)
        return hinge_staleness(staleness, self.hinge_slope, self.hinge_cutoff)

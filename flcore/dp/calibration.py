"""Calibration of noise to a privacy target ``(epsilon, delta)`` for one release.

- Classical Gaussian mechanism: ``sigma = sqrt(2 ln(1.25 / delta)) * Delta_2 / epsilon`` gives
  ``(epsilon, delta)``-DP for ``epsilon in (0, 1)`` (Dwork and Roth 2014, "The Algorithmic Foundations of
  Differential Privacy", Appendix A, Theorem A.1); it does not hold for ``epsilon >= 1``.
- Analytic Gaussian mechanism (Balle and Wang 2018, "Improving the Gaussian Mechanism for Differential
  Privacy: Analytical Calibration and Optimal Denoising", ICML, Theorem 8 and Algorithm 1): ``N(0, sigma^2)``
  on a query of L2 sensitivity ``Delta`` is ``(epsilon, delta)``-DP if and only if

      Phi(Delta / (2 sigma) - epsilon sigma / Delta)
          - e^epsilon Phi(-Delta / (2 sigma) - epsilon sigma / Delta) <= delta,

  valid for every ``epsilon > 0``; :func:`gaussian_delta` evaluates the left side exactly and
  :func:`analytic_gaussian_sigma` finds the smallest such ``sigma`` by bisection.
- Laplace mechanism: ``b = Delta_1 / epsilon`` (Dwork and Roth 2014, Theorem 3.6).

Invariants: every function validates its arguments and raises :class:`~flcore.errors.FlcoreError` naming
the bad value; :func:`analytic_gaussian_sigma` returns a ``sigma`` with ``gaussian_delta(sigma) <= delta``
(never below the true optimum) within a relative tolerance ``rtol`` of the optimum.
"""

from __future__ import annotations

import math

from flcore.dp._checks import non_negative, positive, probability_open
from flcore.errors import FlcoreError

__all__ = [
    "ANALYTIC_RTOL",
    "analytic_gaussian_sigma",
    "classical_gaussian_sigma",
    "gaussian_delta",
    "laplace_scale",
]

ANALYTIC_RTOL = 1e-12
"""Default relative tolerance of :func:`analytic_gaussian_sigma` on ``sigma``."""

_MAX_DOUBLINGS = 2000


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Return ``sqrt(2 ln(1.25 / delta)) * sensitivity / epsilon`` (Dwork and Roth 2014, Theorem A.1).

    Parameters
    ----------
    epsilon : float
        In ``(0, 1)``: the theorem's proof needs ``epsilon < 1``.
    delta : float
        In ``(0, 1)``.
    sensitivity : float
        L2 sensitivity ``Delta_2 > 0``.

    Raises
    ------
    FlcoreError
        If ``epsilon`` is outside ``(0, 1)`` (use :func:`analytic_gaussian_sigma`, valid for any
        ``epsilon > 0``), or ``delta`` or ``sensitivity`` is invalid.
    """
    eps = positive("epsilon", epsilon)
    if eps >= 1.0:
        raise FlcoreError(
            f"The classical Gaussian mechanism (Dwork and Roth 2014, Theorem A.1) is only valid for "
            f"epsilon < 1. Found {epsilon!r}; use analytic_gaussian_sigma for epsilon >= 1."
        )
    d = probability_open("delta", delta)
    s = positive("sensitivity", sensitivity)
    return math.sqrt(2.0 * math.log(1.25 / d)) * s / eps


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """Return the smallest ``delta`` for which ``N(0, sigma^2)`` noise is ``(epsilon, delta)``-DP.

    Balle and Wang (2018, Theorem 8), with ``a = Delta / (2 sigma)`` and ``b = epsilon sigma / Delta``:
    ``delta = Phi(a - b) - e^epsilon Phi(-a - b)``. Evaluated in log space with
    ``log Phi`` (``scipy.special.log_ndtr``) as ``Phi(a - b) * (-expm1(epsilon + log Phi(-a - b) -
    log Phi(a - b)))``, which keeps full relative precision when both terms are tiny (large ``sigma``).

    Parameters
    ----------
    sigma : float
        Noise standard deviation ``> 0``.
    epsilon : float
        ``>= 0``.
    sensitivity : float
        L2 sensitivity ``Delta > 0``.
    """
    sd = positive("sigma", sigma)
    eps = non_negative("epsilon", epsilon)
    s = positive("sensitivity", sensitivity)
    a = s / (2.0 * sd)
    b = eps * sd / s
    from scipy.special import log_ndtr  # (on first use: SciPy costs every server process's start ~0.3 s)

    log_first = float(log_ndtr(a - b))
    log_second = float(log_ndtr(-a - b))
    exponent = eps + log_second - log_first  # < 0 whenever a > 0
    return max(0.0, math.exp(log_first) * -math.expm1(min(exponent, 0.0)))


def analytic_gaussian_sigma(
    epsilon: float, delta: float, sensitivity: float = 1.0, *, rtol: float = ANALYTIC_RTOL
) -> float:
    """Return the smallest ``sigma`` making the Gaussian mechanism ``(epsilon, delta)``-DP (analytic).

    Balle and Wang (2018), Algorithm 1 ("analytic Gaussian mechanism") solves the exact condition of their
    Theorem 8 (see :func:`gaussian_delta`) for ``sigma``. ``delta(sigma)`` is strictly decreasing in
    ``sigma``, so we bracket the root by doubling/halving and bisect on ``log sigma`` until the bracket
    ``[lo, hi]`` satisfies ``hi / lo - 1 <= rtol``, and return ``hi``: ``gaussian_delta(hi) <= delta``
    always holds and ``hi`` exceeds the optimal ``sigma`` by a relative ``rtol`` at most. Valid for every
    ``epsilon > 0`` (unlike :func:`classical_gaussian_sigma`), and smaller than the classical ``sigma``.

    Parameters
    ----------
    epsilon : float
        ``> 0``.
    delta : float
        In ``(0, 1)``.
    sensitivity : float
        L2 sensitivity ``Delta > 0``; ``sigma`` scales linearly with it.
    rtol : float
        Relative tolerance on ``sigma`` (default :data:`ANALYTIC_RTOL` = 1e-12; at least 1e-15).
    """
    eps = positive("epsilon", epsilon)
    target = probability_open("delta", delta)
    s = positive("sensitivity", sensitivity)
    tolerance = positive("rtol", rtol)
    if tolerance < 1e-15:
        raise FlcoreError(f"rtol must be at least 1e-15 (float64 resolution). Found {rtol!r}.")
    lo = hi = s
    for _ in range(_MAX_DOUBLINGS):
        if gaussian_delta(hi, eps, s) <= target:
            break
        lo, hi = hi, hi * 2.0
    else:  # pragma: no cover - delta(sigma) -> 0 as sigma grows, so this needs an absurd target
        raise FlcoreError(f"Could not bracket sigma for epsilon={epsilon!r}, delta={delta!r}.")
    if lo == hi:  # delta(s) <= target already: search downwards for a sigma that is too small
        for _ in range(_MAX_DOUBLINGS):
            lo = lo / 2.0
            if gaussian_delta(lo, eps, s) > target:
                break
            hi = lo
        else:  # pragma: no cover - delta(sigma) -> 1 as sigma -> 0
            raise FlcoreError(f"Could not bracket sigma for epsilon={epsilon!r}, delta={delta!r}.")
    while hi / lo - 1.0 > tolerance:
        middle = math.sqrt(lo * hi)
        if not lo < middle < hi:  # bracket at float resolution
            break
        if gaussian_delta(middle, eps, s) <= target:
            hi = middle
        else:
            lo = middle
    return hi


def laplace_scale(epsilon: float, sensitivity: float = 1.0) -> float:
    """Return ``b = sensitivity / epsilon``, the Laplace scale for ``epsilon``-DP (Dwork and Roth, Thm 3.6).

    Parameters
    ----------
    epsilon : float
        ``> 0``.
    sensitivity : float
        L1 sensitivity ``Delta_1 > 0``.
    """
    return positive("sensitivity", sensitivity) / positive("epsilon", epsilon)

"""Noise calibration: the classical formula by hand, the analytic Gaussian mechanism against the exact delta
(evaluated independently with mpmath at 50 digits), Laplace."""

from __future__ import annotations

import math
from typing import Any

import pytest

from flcore.dp.calibration import (
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    gaussian_delta,
    laplace_scale,
)
from flcore.errors import FlcoreError


def mp_delta_exact(sigma: Any, epsilon: float, sensitivity: float) -> Any:
    """Balle and Wang (2018), Theorem 8, in 50-digit arithmetic: Phi(a - b) - e^eps Phi(-a - b)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    a = mpmath.mpf(sensitivity) / (2 * mpmath.mpf(sigma))
    b = mpmath.mpf(epsilon) * mpmath.mpf(sigma) / mpmath.mpf(sensitivity)
    return mpmath.ncdf(a - b) - mpmath.exp(epsilon) * mpmath.ncdf(-a - b)


def mp_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    return float(mp_delta_exact(sigma, epsilon, sensitivity))


def test_classical_sigma_by_hand() -> None:
    # sqrt(2 ln(1.25 / 1e-5)) = sqrt(2 * 11.736069...) = 4.844805...; times Delta / eps = 2 / 0.5.
    expected = math.sqrt(2 * math.log(1.25e5)) * 2 / 0.5
    assert classical_gaussian_sigma(0.5, 1e-5, 2.0) == pytest.approx(expected, rel=1e-15)
    assert classical_gaussian_sigma(0.5, 1e-5, 2.0) == pytest.approx(19.37922, rel=1e-6)


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 0.0, -0.5])
def test_classical_sigma_refuses_epsilon_outside_0_1(epsilon: float) -> None:
    with pytest.raises(FlcoreError, match="epsilon"):
        classical_gaussian_sigma(epsilon, 1e-5)


@pytest.mark.parametrize(
    ("sigma", "epsilon", "sensitivity"),
    [(1.0, 0.5, 1.0), (3.73, 1.0, 1.0), (0.2, 4.0, 1.0), (50.0, 0.1, 2.0), (10.0, 3.0, 1.0)],
)
def test_gaussian_delta_matches_high_precision(sigma: float, epsilon: float, sensitivity: float) -> None:
    assert gaussian_delta(sigma, epsilon, sensitivity) == pytest.approx(
        mp_delta(sigma, epsilon, sensitivity), rel=1e-9
    )


@pytest.mark.parametrize("epsilon", [0.05, 0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-10])
@pytest.mark.parametrize("sensitivity", [1.0, 0.3])
def test_analytic_sigma_is_the_tight_solution(epsilon: float, delta: float, sensitivity: float) -> None:
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)

    assert gaussian_delta(sigma, epsilon, sensitivity) <= delta  # private
    assert gaussian_delta(0.999 * sigma, epsilon, sensitivity) > delta  # and tight
    assert mp_delta(sigma, epsilon, sensitivity) == pytest.approx(delta, rel=1e-6)


def test_analytic_sigma_reference_value() -> None:
    # (eps, delta, Delta) = (1, 1e-5, 1): sigma = 3.7306..., solved independently here with mpmath.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    reference = float(mpmath.findroot(lambda s: mp_delta_exact(s, 1.0, 1.0) - mpmath.mpf("1e-5"), 3.7))
    assert analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(reference, rel=1e-8)
    assert analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.7306, abs=5e-4)


@pytest.mark.parametrize("epsilon", [0.01, 0.1, 0.5, 0.9])
def test_analytic_sigma_is_below_the_classical_one(epsilon: float) -> None:
    assert analytic_gaussian_sigma(epsilon, 1e-5) < classical_gaussian_sigma(epsilon, 1e-5)


def test_analytic_sigma_is_monotone_and_linear_in_the_sensitivity() -> None:
    epsilons = [0.1, 0.3, 1.0, 3.0, 10.0]
    sigmas = [analytic_gaussian_sigma(e, 1e-6) for e in epsilons]
    assert sigmas == sorted(sigmas, reverse=True)
    deltas = [1e-2, 1e-4, 1e-8]
    assert [analytic_gaussian_sigma(1.0, d) for d in deltas] == sorted(
        analytic_gaussian_sigma(1.0, d) for d in deltas
    )
    assert analytic_gaussian_sigma(0.7, 1e-5, 3.0) == pytest.approx(
        3 * analytic_gaussian_sigma(0.7, 1e-5), rel=1e-10
    )


@pytest.mark.parametrize(("epsilon", "delta"), [(0.0, 1e-5), (1.0, 0.0), (1.0, 1.0), (-1.0, 1e-5)])
def test_analytic_sigma_rejects_bad_targets(epsilon: float, delta: float) -> None:
    with pytest.raises(FlcoreError):
        analytic_gaussian_sigma(epsilon, delta)


def test_laplace_scale() -> None:
    assert laplace_scale(0.5, 2.0) == 4.0
    with pytest.raises(FlcoreError, match="epsilon"):
        laplace_scale(0.0)

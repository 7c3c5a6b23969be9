"""Noise mechanisms: sample statistics with seeded generators, tolerances from the sampling distributions.

Every statistical check is a two-sided test at false-alarm rate ALPHA = 1e-6 (and the generators are
seeded, so a passing test passes deterministically).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flcore.dp.mechanisms import add_gaussian_noise, add_laplace_noise, gaussian_noise, laplace_noise
from flcore.errors import FlcoreError
from flcore.parameters import Parameters

ALPHA = 1e-6


def assert_std_matches(samples: np.ndarray, sigma: float) -> None:
    """(n-1) s^2 / sigma^2 ~ chi^2_{n-1} for i.i.d. N(mu, sigma^2) samples."""
    n = samples.size
    statistic = (n - 1) * float(np.var(samples, ddof=1)) / sigma**2
    low, high = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], n - 1)
    assert low <= statistic <= high, (statistic, low, high)


def assert_mean_zero(samples: np.ndarray, sigma: float) -> None:
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(samples.mean())) <= z * sigma / math.sqrt(samples.size)


def test_gaussian_noise_has_the_stated_std() -> None:
    noise = gaussian_noise((200, 500), 0.3, np.random.default_rng(1))
    assert noise.dtype == np.float64 and noise.shape == (200, 500)
    assert_std_matches(noise.ravel(), 0.3)
    assert_mean_zero(noise.ravel(), 0.3)


def test_laplace_noise_mean_absolute_deviation_is_the_scale() -> None:
    # |X| ~ Exponential(b): mean b, std b, so the sample mean of |X| is ~ N(b, b^2 / n).
    b, n = 0.7, 100_000
    noise = laplace_noise((n,), b, np.random.default_rng(2))
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(np.abs(noise).mean()) - b) <= z * b / math.sqrt(n)
    assert_mean_zero(noise, math.sqrt(2) * b)


def test_add_gaussian_noise_adds_in_float64_and_returns_float32(params: Parameters) -> None:
    noised = add_gaussian_noise(params, 0.5, np.random.default_rng(3))
    replay = np.random.default_rng(3)
    for name, array in params.items():
        expected = (array.astype(np.float64) + replay.normal(0.0, 0.5, size=array.shape)).astype(np.float32)
        assert noised[name].dtype == np.float32
        np.testing.assert_array_equal(noised[name], expected)
    assert list(noised) == list(params)


def test_add_noise_statistics_on_a_large_update() -> None:
    zeros = {"a": np.zeros(50_000, np.float32), "b": np.zeros((100, 300), np.float32)}
    noised = add_gaussian_noise(zeros, 2.0, np.random.default_rng(4))
    assert_std_matches(np.concatenate([v.ravel() for v in noised.values()]).astype(np.float64), 2.0)
    laplace = add_laplace_noise(zeros, 2.0, np.random.default_rng(5))
    values = np.concatenate([v.ravel() for v in laplace.values()]).astype(np.float64)
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(np.abs(values).mean()) - 2.0) <= z * 2.0 / math.sqrt(values.size)


def test_zero_noise_is_the_identity(params: Parameters) -> None:
    for name, value in add_gaussian_noise(params, 0.0, np.random.default_rng(0)).items():
        np.testing.assert_array_equal(value, params[name])


def test_inputs_are_not_modified(params: Parameters) -> None:
    before = {k: v.copy() for k, v in params.items()}
    add_laplace_noise(params, 1.0, np.random.default_rng(0))
    for name in params:
        np.testing.assert_array_equal(params[name], before[name])


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_mechanisms_reject_bad_scales(params: Parameters, bad: float) -> None:
    with pytest.raises(FlcoreError, match="stddev"):
        add_gaussian_noise(params, bad, np.random.default_rng(0))
    with pytest.raises(FlcoreError, match="scale"):
        add_laplace_noise(params, bad, np.random.default_rng(0))


def test_mechanisms_need_an_explicit_generator(params: Parameters) -> None:
    with pytest.raises(FlcoreError, match="Generator"):
        add_gaussian_noise(params, 1.0, 0)  # type: ignore[arg-type]

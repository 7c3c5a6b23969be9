"""Tests for the coordinate-wise median and trimmed mean against brute-force sorting references."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from flcore.errors import ConfigError, FlcoreError
from flcore.parameters import Parameters, ParameterSpec, flatten
from flcore.strategies import NotEnoughUpdates, build_strategy
from flcore.strategies.base import FlatLayout
from flcore.strategies.median import CoordinateMedian, median_of_rows, sorted_rows_are_finite
from flcore.strategies.trimmed_mean import TrimmedMean
from flcore.tests.strategy_cases import SPEC, StrategyContract, random_params, vec


class TestMedianOddContract(StrategyContract):
    algorithm = "median"
    hyperparameters: ClassVar[dict[str, Any]] = {}
    weighted = False
    num_updates = 7
    invalid_hyperparameters: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"server_learning_rate": -1}, "server_learning_rate")
    ]


class TestMedianEvenContract(TestMedianOddContract):
    num_updates = 6


class TestTrimmedMeanContract(StrategyContract):
    algorithm = "trimmed_mean"
    hyperparameters: ClassVar[dict[str, Any]] = {"trim_fraction": 0.2}
    weighted = False
    invalid_hyperparameters: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"trim_fraction": -0.1}, "trim_fraction"),
        ({"trim_fraction": "0.1"}, "trim_fraction"),
    ]


class TestTrimmedMeanNoTrimContract(TestTrimmedMeanContract):
    hyperparameters: ClassVar[dict[str, Any]] = {"trim_fraction": 0.0}


# ---- references ----------------------------------------------------------------------------------------


def brute_force_trimmed_mean(rows: np.ndarray, k: int) -> np.ndarray:
    """Full sort of every coordinate, drop k at each end, float64 mean."""
    result = np.empty(rows.shape[1])
    for j in range(rows.shape[1]):
        column = sorted(float(v) for v in rows[:, j])
        result[j] = sum(column[k : len(column) - k]) / (len(column) - 2 * k)
    return result


def brute_force_median(rows: np.ndarray) -> np.ndarray:
    result = np.empty(rows.shape[1])
    n = rows.shape[0]
    for j in range(rows.shape[1]):
        column = sorted(float(v) for v in rows[:, j])
        result[j] = column[n // 2] if n % 2 else (column[n // 2 - 1] + column[n // 2]) / 2
    return result


def stacked(updates: list[Parameters]) -> np.ndarray:
    return np.stack([flatten(u) for u in updates])


@pytest.mark.parametrize("n", [1, 2, 5, 8, 21])
@pytest.mark.parametrize("chunk_size", [1, 10, 1000])
def test_median_matches_np_median_and_sorting(n: int, chunk_size: int) -> None:
    rng = np.random.default_rng(n)
    updates = [random_params(rng) for _ in range(n)]
    if n > 2:  # ties: a repeated update
        updates[1] = {k: v.copy() for k, v in updates[0].items()}

    combined, _ = CoordinateMedian().combine(updates, [1] * n, chunk_size=chunk_size)

    np.testing.assert_allclose(flatten(combined), np.median(stacked(updates), axis=0), atol=1e-7, rtol=0)
    np.testing.assert_allclose(flatten(combined), brute_force_median(stacked(updates)), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("n", "beta", "k"), [(5, 0.2, 1), (10, 0.25, 2), (11, 0.45, 4), (100, 0.29, 29), (4, 0.0, 0)]
)
def test_trimmed_mean_matches_sorting(n: int, beta: float, k: int) -> None:
    rng = np.random.default_rng(n)
    updates = [random_params(rng) for _ in range(n)]
    strategy = TrimmedMean(trim_fraction=beta)

    combined, metrics = strategy.combine(updates, [1] * n, chunk_size=17)

    assert strategy.num_trimmed(n) == k and metrics["num_trimmed"] == k
    np.testing.assert_allclose(flatten(combined), brute_force_trimmed_mean(stacked(updates), k), atol=1e-6)


def test_hand_computed_values() -> None:
    # Median of (1, 5, 2, 100) = (2 + 5) / 2 = 3.5; of (1, 5, 2, 100, 3) = 3.
    # Trimmed mean beta = 0.2 of (1, 2, 3, 4, 100): k = 1, mean(2, 3, 4) = 3.
    median = CoordinateMedian()
    trimmed = TrimmedMean(trim_fraction=0.2)

    assert float(median.combine([vec(x) for x in (1, 5, 2, 100)], [1] * 4)[0]["w"][0]) == 3.5
    assert float(median.combine([vec(x) for x in (1, 5, 2, 100, 3)], [1] * 5)[0]["w"][0]) == 3.0
    assert float(trimmed.combine([vec(x) for x in (100, 2, 4, 1, 3)], [9, 1, 1, 1, 1])[0]["w"][0]) == 3.0


@pytest.mark.parametrize("algorithm", ["median", "trimmed_mean"])
def test_planted_outliers_stay_within_the_honest_range(algorithm: str) -> None:
    rng = np.random.default_rng(3)
    honest = [random_params(rng) for _ in range(8)]
    attackers = [{k: np.full_like(v, sign * 1e6) for k, v in honest[0].items()} for sign in (1, 1, -1)]
    strategy = build_strategy(algorithm, {"trim_fraction": 0.3} if algorithm == "trimmed_mean" else {})

    combined, _ = strategy.combine(attackers + honest, [10**6] * 3 + [1] * 8)

    low, high = stacked(honest).min(axis=0), stacked(honest).max(axis=0)
    result = flatten(combined)
    assert np.all(result >= low) and np.all(result <= high)


def test_trim_fraction_that_trims_nothing_is_an_error() -> None:
    with pytest.raises(NotEnoughUpdates, match=r"beta=0\.1.*n=5.*n >= 10"):
        TrimmedMean(trim_fraction=0.1).combine([vec(float(i)) for i in range(5)], [1] * 5)


def test_trim_fraction_is_required() -> None:
    with pytest.raises(ConfigError, match="'trim_fraction' is required"):
        build_strategy("trimmed_mean", {})


def test_chunk_matrix_is_not_modified() -> None:
    matrix = np.random.default_rng(0).standard_normal((6, 9)).astype(np.float32)
    saved = matrix.copy()

    CoordinateMedian().combine_chunk(matrix, np.ones(6))
    TrimmedMean(trim_fraction=0.2).combine_chunk(matrix, np.ones(6))

    np.testing.assert_array_equal(matrix, saved)
    assert SPEC.num_parameters == 94


@pytest.mark.parametrize("n", [7, 8])
def test_a_chunk_wider_than_a_cache_is_combined_block_by_block(n: int) -> None:
    # A server task's chunk is P / (4 * workers) wide; median and trimmed mean sort it in cache-sized blocks.
    rng = np.random.default_rng(30 + n)
    matrix = rng.standard_normal((n, 200_003)).astype(np.float32)  # > 2 MiB / (4 n) columns: several blocks
    weights = np.ones(n)

    median = CoordinateMedian().combine_chunk(matrix, weights)
    trimmed = TrimmedMean(trim_fraction=0.25).combine_chunk(matrix, weights)

    np.testing.assert_array_equal(median, np.median(matrix.astype(np.float64), axis=0).astype(np.float32))
    k = n // 4
    expected = np.sort(matrix, axis=0)[k : n - k].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(trimmed, expected, atol=1e-6, rtol=0)


# ---- the coordinate-major path: (c, n) chunks sorted in place ---------------------------------------------


def adversarial_rows(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """``(n, 600)`` float32 inputs that stress ranking: ties, constant columns, signed zeros, wide ranges."""
    columns = 600
    if kind == "random":
        return rng.standard_normal((n, columns)).astype(np.float32)
    if kind == "ties":  # few distinct values: the middle ranks fall inside runs of equal values
        return rng.integers(-2, 3, size=(n, columns)).astype(np.float32)
    if kind == "constant":
        return np.full((n, columns), 3.25, dtype=np.float32)
    if kind == "zeros":  # -0.0 and 0.0 compare equal
        return (rng.choice([-1.0, 1.0], size=(n, columns)) * 0.0).astype(np.float32)
    if kind == "wide":  # magnitudes from subnormal to near the float32 maximum, both signs
        exponents = rng.uniform(-44, 38, size=(n, columns))
        return (rng.choice([-1.0, 1.0], size=(n, columns)) * 10.0**exponents).astype(np.float32)
    if kind == "sorted":  # already ordered and reversed columns
        ordered = np.sort(rng.standard_normal((n, columns)).astype(np.float32), axis=0)
        ordered[:, ::2] = ordered[::-1, ::2]
        return ordered
    raise ValueError(kind)


KINDS = ["random", "ties", "constant", "zeros", "wide", "sorted"]


def as_updates(rows: np.ndarray) -> list[Parameters]:
    """Split each row into a 3-tensor update (sizes 250, 1, 349), so chunks cross tensor boundaries."""
    return [{"a": row[:250].reshape(25, 10), "b": row[250:251].copy(), "c": row[251:].copy()} for row in rows]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 99, 100, 101])
def test_median_of_rows_equals_np_median_in_float64(kind: str, n: int) -> None:
    rows = adversarial_rows(np.random.default_rng(n), n, kind)
    coordinates = np.ascontiguousarray(rows.T)

    result = median_of_rows(coordinates)

    expected = np.median(rows.astype(np.float64), axis=0).astype(np.float32)
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(coordinates, np.sort(rows.T, axis=1))  # sorted in place, as documented


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "threads", "chunk_size"), [(20, 1, None), (21, 2, 7), (100, 2, 64), (7, 3, 1)])
def test_median_combine_equals_brute_force(kind: str, n: int, threads: int, chunk_size: int | None) -> None:
    rows = adversarial_rows(np.random.default_rng(100 + n), n, kind)
    strategy = CoordinateMedian()

    combined, _ = strategy.combine(as_updates(rows), [1] * n, threads=threads, chunk_size=chunk_size)

    result = flatten(combined)
    np.testing.assert_array_equal(result, np.median(rows.astype(np.float64), axis=0).astype(np.float32))
    if kind in ("random", "ties"):
        np.testing.assert_array_equal(result, brute_force_median(rows).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("n", "beta", "threads", "chunk_size"),
    [(100, 0.2, 2, None), (10, 0.25, 1, 7), (11, 0.45, 2, 64), (4, 0.0, 2, 5), (9, 0.0, 1, None)],
)
def test_trimmed_mean_combine_equals_sorted_float64_brute_force(
    kind: str, n: int, beta: float, threads: int, chunk_size: int | None
) -> None:
    rows = adversarial_rows(np.random.default_rng(200 + n), n, kind)
    if kind == "wide":  # sums of values near the float32 maximum overflow any float32 result
        rows = rows * np.float32(1e-10)
    strategy = TrimmedMean(trim_fraction=beta)
    k = strategy.num_trimmed(n)

    combined, _ = strategy.combine(as_updates(rows), [1] * n, threads=threads, chunk_size=chunk_size)

    expected = np.sort(rows.astype(np.float64), axis=0)[k : n - k].mean(axis=0)
    result = flatten(combined)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-30)
    if kind == "random":
        np.testing.assert_allclose(result, brute_force_trimmed_mean(rows, k), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("algorithm", ["median", "trimmed_mean"])
def test_a_non_finite_value_in_a_late_chunk_is_refused_and_named(algorithm: str, bad: float) -> None:
    rows = adversarial_rows(np.random.default_rng(5), 12, "random")
    updates = as_updates(rows)
    updates[9]["c"][-1] = bad  # the last coordinate: the last chunk, on whichever thread gets it
    strategy = build_strategy(algorithm, {"trim_fraction": 0.25} if algorithm == "trimmed_mean" else {})

    with pytest.raises(FlcoreError, match="Update 9 contains NaN or Inf"):
        strategy.combine(updates, [1] * 12, threads=2, chunk_size=50)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    ("algorithm", "n", "hyperparameters"),
    [
        ("median", 1, {}),
        ("median", 2, {}),
        ("median", 101, {}),
        ("trimmed_mean", 12, {"trim_fraction": 0.25}),
        ("trimmed_mean", 7, {"trim_fraction": 0.0}),  # k = 0: rows not sorted, the mean is checked
    ],
)
def test_a_non_finite_value_anywhere_is_refused_without_a_separate_pass(
    algorithm: str, n: int, hyperparameters: dict[str, float], bad: float
) -> None:
    # Finiteness is read from the first and last value of each sorted row (or the k = 0 mean): a value
    # that sorts to the middle of its row would be missed if that were wrong. One bad value per case, at
    # an update, a coordinate and a rank drawn at random, among values of both signs.
    rng = np.random.default_rng(7 + n)
    strategy = build_strategy(algorithm, hyperparameters)
    for trial in range(6):
        rows = adversarial_rows(rng, n, "random")
        culprit, coordinate = int(rng.integers(n)), int(rng.integers(rows.shape[1]))
        rows[culprit, coordinate] = bad
        with pytest.raises(FlcoreError, match=f"Update {culprit} contains NaN or Inf"):
            strategy.combine(as_updates(rows), [1] * n, threads=1 + trial % 2, chunk_size=37)


def test_sorted_rows_are_finite_equals_a_full_check() -> None:
    rng = np.random.default_rng(8)
    for n in (1, 2, 5, 100):
        for _ in range(50):
            rows = rng.standard_normal((9, n)).astype(np.float32)
            for _ in range(int(rng.integers(0, 3))):
                rows[rng.integers(9), rng.integers(n)] = rng.choice([np.nan, np.inf, -np.inf, 0.0])
            rows.sort(axis=1)
            assert sorted_rows_are_finite(rows) == bool(np.isfinite(rows).all())
    assert sorted_rows_are_finite(np.zeros((0, 4), dtype=np.float32))


def test_float64_deltas_are_cast_as_an_assignment_would() -> None:
    # The Python API accepts float64 deltas; the coordinate-major gather casts them to float32 exactly as
    # the streaming and (n, c) paths do, so the median is that of the float32 values.
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((6, 600))
    combined, _ = CoordinateMedian().combine(as_updates(rows), [1] * 6, chunk_size=64)
    expected = np.median(rows.astype(np.float32).astype(np.float64), axis=0).astype(np.float32)
    np.testing.assert_array_equal(flatten(combined), expected)


def test_a_coordinate_major_server_range_applies_the_scales() -> None:
    # norm_bounded around the median: clipped columns of (c, n) chunks, as a server task combines them.
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((9, 600)).astype(np.float32) * rng.uniform(0.1, 3.0, size=(9, 1)).astype(
        np.float32
    )
    updates = as_updates(rows)
    strategy = build_strategy("norm_bounded", {"clip_norm": 20.0, "inner": "median"})
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    scales = np.array([strategy.update_scale(float(s)) for s in norms], dtype=np.float32)
    assert strategy.coordinate_major and 0 < np.count_nonzero(scales < 1) < 9
    layout = FlatLayout(ParameterSpec.from_parameters(updates[0]))

    ranges = [(0, 251), (251, 600)]
    flat = np.concatenate(
        [strategy.range_combine(layout, updates, a, b, np.ones(9), None, scales) for a, b in ranges]
    )
    combined, metrics = strategy.combine(updates, [1] * 9)

    expected = np.median((rows * scales[:, None]).astype(np.float64), axis=0).astype(np.float32)
    np.testing.assert_array_equal(flat, expected)
    np.testing.assert_array_equal(flatten(combined), expected)
    assert metrics["num_clipped"] == np.count_nonzero(scales < 1)

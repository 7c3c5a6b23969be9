"""Tests for Krum and Multi-Krum against a brute-force O(n^2) reference and planted outliers."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from flcore.errors import ConfigError
from flcore.parameters import Parameters, flatten
from flcore.strategies import NotEnoughUpdates, build_strategy
from flcore.strategies.krum import Krum, KrumSelection, MultiKrum
from flcore.tests.strategy_cases import SPEC, StrategyContract, random_params, scalar_spec, vec

KRUM_INVALID: list[tuple[dict[str, Any], str]] = [
    ({"num_malicious": -1}, "num_malicious"),
    ({"num_malicious": 1.5}, "num_malicious"),
    ({"num_malicious": True}, "num_malicious"),
]


class TestKrumContract(StrategyContract):
    algorithm = "krum"
    hyperparameters: ClassVar[dict[str, Any]] = {"num_malicious": 1}
    weighted = False
    invalid_hyperparameters = KRUM_INVALID


class TestMultiKrumContract(StrategyContract):
    algorithm = "multikrum"
    hyperparameters: ClassVar[dict[str, Any]] = {"num_malicious": 1}
    weighted = False
    invalid_hyperparameters = [
        *KRUM_INVALID,
        ({"num_selected": 0}, "num_selected"),
        ({"weighting": "examples"}, "weighting"),
    ]


class TestMultiKrumWeightedContract(StrategyContract):
    # f = 0 and m = n - f = n: every update is selected, so moving weight must move the mean.
    algorithm = "multikrum"
    hyperparameters: ClassVar[dict[str, Any]] = {"num_malicious": 0, "weighting": "num_examples"}


# ---- brute-force reference -----------------------------------------------------------------------------


def brute_force_krum(updates: list[Parameters], f: int, m: int, weights: list[float] | None = None) -> tuple:
    """Python loops over pairs, float64, full sort of each row: slow and obviously right."""
    vectors = [flatten(u).astype(np.float64) for u in updates]
    n = len(vectors)
    scores = []
    for i in range(n):
        distances = [float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i]
        scores.append(sum(sorted(distances)[: n - f - 2]))
    selected = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])
    w = [1.0] * n if weights is None else weights
    total = sum(w[i] for i in selected)
    mean = sum(w[i] * vectors[i] for i in selected) / total
    return scores, selected, mean


@pytest.mark.parametrize(("n", "f"), [(5, 1), (7, 2), (12, 3), (13, 0)])
@pytest.mark.parametrize("chunk_size", [1, 13, 1000])
def test_matches_brute_force_on_random_data(n: int, f: int, chunk_size: int) -> None:
    rng = np.random.default_rng(n * 100 + f)
    common = random_params(rng, 5.0)  # a large shared component, as when clients agree: stresses cancellation
    updates = [{k: common[k] + v for k, v in random_params(rng, 0.1 * (1 + i % 3)).items()} for i in range(n)]
    counts = [int(c) for c in rng.integers(1, 100, size=n)]

    for strategy, m, weights in [
        (Krum(num_malicious=f), 1, None),
        (MultiKrum(num_malicious=f), n - f, None),
        (MultiKrum(num_malicious=f, num_selected=2, weighting="num_examples"), 2, [float(c) for c in counts]),
    ]:
        scores, selected, mean = brute_force_krum(updates, f, m, weights)
        combined, metrics = strategy.combine(updates, counts, chunk_size=chunk_size)

        gram = sum(
            strategy.chunk_statistics(np.stack([flatten(u) for u in updates])[:, s : s + 50])
            for s in range(0, SPEC.num_parameters, 50)
        )
        selection = strategy.finalize_statistics(gram, np.array(counts, dtype=np.float64))
        assert list(selection.selected) == selected
        np.testing.assert_allclose(selection.scores, scores, rtol=1e-6)
        np.testing.assert_allclose(flatten(combined), mean, atol=1e-6)
        assert metrics["num_selected"] == m


def test_planted_outliers_are_never_selected() -> None:
    rng = np.random.default_rng(7)
    honest = [random_params(rng, 0.1) for _ in range(7)]
    attackers = [{k: v + 50.0 for k, v in random_params(rng, 0.1).items()} for _ in range(2)]
    updates = attackers[:1] + honest + attackers[1:]  # outliers at indices 0 and 8

    selection_krum = Krum(num_malicious=2).combine(updates, [1] * 9)[0]
    multi, metrics = MultiKrum(num_malicious=2).combine(updates, [1] * 9)

    honest_flat = np.stack([flatten(u) for u in honest])
    assert any(np.array_equal(flatten(selection_krum), row) for row in honest_flat)
    assert metrics["num_selected"] == 7
    np.testing.assert_allclose(flatten(multi), honest_flat.mean(axis=0), atol=1e-6)


def test_one_dimensional_case_by_hand() -> None:
    # Points 0, 1, 2, 4, 100 with f = 1: each score sums the n - f - 2 = 2 smallest squared distances.
    #   0: {1, 4} -> 5;  1: {1, 1} -> 2;  2: {1, 4} -> 5;  4: {4, 9} -> 13;  100: {96^2, 98^2} -> 18820
    # Krum picks 1; Multi-Krum with m = 3 averages {0, 1, 2} -> 1; with m = n - f = 4, {0, 1, 2, 4} -> 1.75.
    points = [vec(x) for x in (0.0, 1.0, 2.0, 4.0, 100.0)]
    strategy = MultiKrum(num_malicious=1, num_selected=3)
    gram = strategy.chunk_statistics(np.array([[0.0], [1.0], [2.0], [4.0], [100.0]], dtype=np.float32))

    selection = strategy.finalize_statistics(gram, np.ones(5))

    np.testing.assert_allclose(selection.scores, [5, 2, 5, 13, 96**2 + 98**2], rtol=1e-6)
    assert selection.selected == (0, 1, 2)
    assert float(Krum(num_malicious=1).combine(points, [1] * 5)[0]["w"][0]) == 1.0
    assert float(strategy.combine(points, [1] * 5)[0]["w"][0]) == pytest.approx(1.0)
    assert float(MultiKrum(num_malicious=1).combine(points, [1] * 5)[0]["w"][0]) == pytest.approx(1.75)


@pytest.mark.parametrize(("n", "f"), [(4, 1), (6, 2), (2, 0)])
def test_too_few_updates_name_n_and_f(n: int, f: int) -> None:
    updates = [vec(float(i)) for i in range(n)]

    with pytest.raises(NotEnoughUpdates, match=rf"2f \+ 3 = {2 * f + 3}.*n={n}"):
        Krum(num_malicious=f).combine(updates, [1] * n)


def test_num_selected_above_n_minus_f_is_rejected() -> None:
    with pytest.raises(NotEnoughUpdates, match="num_selected m=5"):
        MultiKrum(num_malicious=1, num_selected=5).combine([vec(float(i)) for i in range(5)], [1] * 5)


def test_num_malicious_is_required() -> None:
    with pytest.raises(ConfigError, match="'num_malicious' is required"):
        build_strategy("krum", {})


def test_selection_round_trips_as_json_between_workers() -> None:
    selection = KrumSelection((1, 3), (0.0, 0.25, 0.0, 0.75), (2.5, 1.0, 9.0, 1.5))

    assert KrumSelection.from_json(selection.to_json()) == selection


def test_state_is_spec_shaped_and_empty() -> None:
    assert Krum(num_malicious=0).init_state(scalar_spec()).tensors == {}


def test_a_huge_attacker_does_not_blur_honest_distances() -> None:
    rng = np.random.default_rng(11)
    honest = [random_params(rng, 1e-3) for _ in range(6)]
    attacker = {k: np.full_like(v, 1e15) for k, v in honest[0].items()}
    updates = [attacker, *honest]  # the attacker is also among the 2f + 1 rows used as the centre

    scores, selected, _ = brute_force_krum(updates, 1, 1)
    strategy = Krum(num_malicious=1)
    gram = strategy.chunk_statistics(np.stack([flatten(u) for u in updates]))
    selection = strategy.finalize_statistics(gram, np.ones(7))

    # float32 Gram blocks: honest scores to float32 precision (a mean centre would be off by ~1e30 here).
    np.testing.assert_allclose(selection.scores[1:], scores[1:], rtol=1e-6)
    assert list(selection.selected) == selected and selected != [0]


def test_a_block_whose_float32_gram_overflows_is_redone_in_float64() -> None:
    # |x| = 1e25 is a finite float32 whose square is not: that block's Gram is computed in float64.
    rng = np.random.default_rng(12)
    honest = [random_params(rng, 1.0) for _ in range(6)]
    attacker = {k: np.full_like(v, 1e25) for k, v in honest[0].items()}
    updates = [*honest[:3], attacker, *honest[3:]]

    scores, selected, _ = brute_force_krum(updates, 1, 1)
    strategy = Krum(num_malicious=1)
    gram = strategy.chunk_statistics(np.stack([flatten(u) for u in updates]))
    selection = strategy.finalize_statistics(gram, np.ones(7))

    assert np.isfinite(gram).all()
    assert list(selection.selected) == selected and selected != [3]
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-6)


def test_krum_agrees_with_float64_brute_force_at_a_realistic_size() -> None:
    # 30 updates of 20,000 coordinates, a shared component 10x the spread, 6 attackers: the float32 blocks
    # give the brute force's selection, scores to 1e-5 and the aggregate to 1e-5.
    rng = np.random.default_rng(13)
    spec = scalar_spec(20_000)
    common = 10.0 * rng.standard_normal(20_000)
    updates = []
    for i in range(30):
        noise = rng.standard_normal(20_000) * (0.5 + i / 30)
        if i % 5 == 0:
            noise += 3.0
        updates.append({"w": (common + noise).astype(np.float32)})
    assert spec.num_parameters == 20_000

    for strategy, m in [(Krum(num_malicious=6), 1), (MultiKrum(num_malicious=6), 24)]:
        scores, selected, mean = brute_force_krum(updates, 6, m)
        combined, _ = strategy.combine(updates, [1] * 30)
        gram = strategy.chunk_statistics(np.stack([u["w"] for u in updates]))
        selection = strategy.finalize_statistics(gram, np.ones(30))

        assert list(selection.selected) == selected
        np.testing.assert_allclose(selection.scores, scores, rtol=1e-5)
        np.testing.assert_allclose(combined["w"], mean, atol=1e-5)

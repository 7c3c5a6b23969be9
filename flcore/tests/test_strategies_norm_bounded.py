"""Tests for norm bounding (Sun et al. 2019): clipping before any inner rule."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from flcore.errors import ConfigError
from flcore.parameters import Parameters, flatten, l2_norm
from flcore.strategies import build_strategy
from flcore.strategies.norm_bounded import NormBounded
from flcore.tests.strategy_cases import StrategyContract, random_params, vec

NORM_BOUNDED_INVALID: list[tuple[dict[str, Any], str]] = [
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"inner": "norm_bounded"}, "inner"),
    ({"inner": "fedbuff"}, "inner"),
    ({"inner_hyperparameters": {"server_learning_rate": -1}}, "inner_hyperparameters"),
    ({"inner_hyperparameters": [1]}, "inner_hyperparameters"),
]


class TestNormBoundedFedAvgContract(StrategyContract):
    # clip_norm well above the test deltas' norms (~1): nothing clipped, so FedAvg's invariants hold.
    algorithm = "norm_bounded"
    hyperparameters: ClassVar[dict[str, Any]] = {"clip_norm": 100.0}
    invalid_hyperparameters = NORM_BOUNDED_INVALID


class TestNormBoundedClippingContract(StrategyContract):
    # Every delta (norm ~1) is clipped to 0.3 before FedAvgM: weights still count, momentum state persists.
    algorithm = "norm_bounded"
    hyperparameters: ClassVar[dict[str, Any]] = {
        "clip_norm": 0.3,
        "inner": "fedavgm",
        "inner_hyperparameters": {"server_momentum": 0.5},
    }

    def expected_first_step(self, base: Parameters, delta: Parameters) -> Parameters:
        factor = min(1.0, 0.3 / l2_norm(delta))
        return {k: base[k] + factor * delta[k] for k in base}


class TestNormBoundedMedianContract(StrategyContract):
    algorithm = "norm_bounded"
    hyperparameters: ClassVar[dict[str, Any]] = {"clip_norm": 0.5, "inner": "median"}
    weighted = False

    def expected_first_step(self, base: Parameters, delta: Parameters) -> Parameters:
        factor = min(1.0, 0.5 / l2_norm(delta))
        return {k: base[k] + factor * delta[k] for k in base}


class TestNormBoundedMultiKrumContract(TestNormBoundedMedianContract):
    hyperparameters: ClassVar[dict[str, Any]] = {
        "clip_norm": 0.5,
        "inner": "multikrum",
        "inner_hyperparameters": {"num_malicious": 1},
    }


def test_every_contribution_is_bounded() -> None:
    rng = np.random.default_rng(5)
    deltas = [random_params(rng, s) for s in (0.001, 0.01, 0.1, 1.0, 100.0)]
    strategy = NormBounded(clip_norm=0.5)

    norms = [l2_norm(d) for d in deltas]
    contributions = [strategy.update_scale(n) * n for n in norms]
    combined, metrics = strategy.combine(deltas, [1, 2, 3, 4, 5])

    assert all(c <= 0.5 * (1 + 1e-12) for c in contributions)
    assert contributions[0] == norms[0]  # small updates are untouched
    assert metrics["num_clipped"] == sum(n > 0.5 for n in norms) == 3
    assert l2_norm(combined) <= 0.5 + 1e-6


def test_clipping_by_hand() -> None:
    # Delta_1 = (3, 4), norm 5, clip 1 -> (0.6, 0.8); Delta_2 = (0.3, 0), untouched. Weights 1 and 3:
    # mean = (0.6 + 0.9, 0.8) / 4 = (0.375, 0.2).
    strategy = build_strategy("norm_bounded", {"clip_norm": 1.0})

    combined, metrics = strategy.combine([vec(3.0, 4.0), vec(0.3, 0.0)], [1, 3])

    np.testing.assert_allclose(combined["w"], [0.375, 0.2], rtol=1e-6)
    assert metrics["num_clipped"] == 1.0
    assert strategy.update_scale(0.0) == 1.0


def test_streaming_follows_the_inner_rule() -> None:
    assert NormBounded(clip_norm=1.0).streaming
    median = NormBounded(clip_norm=1.0, inner="median")
    krum = NormBounded(clip_norm=1.0, inner="krum", inner_hyperparameters={"num_malicious": 0})
    assert not median.streaming and not median.needs_statistics
    assert not krum.streaming and krum.needs_statistics
    assert NormBounded.streaming  # the class default is unchanged


def test_inner_configuration_is_normalised_and_forwarded() -> None:
    strategy = build_strategy(
        "norm_bounded", {"clip_norm": 2, "inner": "fedprox", "inner_hyperparameters": {"proximal_mu": 1}}
    )

    assert strategy.hyperparameters() == {
        "clip_norm": 2.0,
        "inner": "fedprox",
        "inner_hyperparameters": {"server_learning_rate": 1.0, "proximal_mu": 1.0},
    }
    assert strategy.client_config() == {"proximal_mu": 1.0}


def test_inner_errors_name_the_inner_field() -> None:
    with pytest.raises(ConfigError, match=r"inner_hyperparameters.*'num_malicious' is required"):
        build_strategy("norm_bounded", {"clip_norm": 1.0, "inner": "krum"})


def test_clipped_rows_reach_the_robust_rule() -> None:
    # Krum with f = 0 on 3 points; clip 1 maps (10, 0) to (1, 0), making it the most central point.
    strategy = NormBounded(clip_norm=1.0, inner="krum", inner_hyperparameters={"num_malicious": 0})

    combined, _ = strategy.combine([vec(10.0, 0.0), vec(0.0, 0.5), vec(2.0, 0.5)], [1, 1, 1])

    np.testing.assert_allclose(flatten(combined), [1.0, 0.0], rtol=1e-6)

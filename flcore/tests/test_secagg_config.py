"""The secure_aggregation configuration: validation naming the field, thresholds, compatible rules."""

from __future__ import annotations

from typing import Any

import pytest

from flcore.errors import ConfigError
from flcore.secagg.config import COMPATIBLE_ALGORITHMS, SecureAggregationConfig, check_strategy_compatible
from flcore.strategies.base import AggregationAlgorithm


def test_round_trip_and_defaults() -> None:
    config = SecureAggregationConfig.from_dict({"clip_norm": 2})
    assert config == SecureAggregationConfig(
        clip_norm=2.0, protocol="secagg+", threshold=None, neighbours=None, bits=32
    )
    assert isinstance(config.clip_norm, float)
    full = {"protocol": "secagg", "threshold": 0.6, "neighbours": None, "clip_norm": 1.5, "bits": 24}
    assert SecureAggregationConfig.from_dict(full).to_dict() == full


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"clip_norm": 1, "protocol": "secagg++"}, "protocol"),
        ({"clip_norm": 1, "threshold": 1}, "threshold"),
        ({"clip_norm": 1, "threshold": 0.0}, "threshold"),
        ({"clip_norm": 1, "threshold": 1.5}, "threshold"),
        ({"clip_norm": 1, "threshold": True}, "threshold"),
        ({"clip_norm": 1, "threshold": "half"}, "threshold"),
        ({"clip_norm": 1, "neighbours": 5}, "neighbours"),
        ({"clip_norm": 1, "neighbours": 0}, "neighbours"),
        ({"clip_norm": 1, "protocol": "secagg", "neighbours": 4}, "neighbours"),
        ({"clip_norm": -1}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"clip_norm": "1"}, "clip_norm"),
        ({}, "clip_norm"),
        ({"clip_norm": 1, "bits": 1}, "bits"),
        ({"clip_norm": 1, "bits": 49}, "bits"),
        ({"clip_norm": 1, "bits": 32.0}, "bits"),
        ({"clip_norm": 1, "bitz": 32}, "bitz"),
    ],
)
def test_errors_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        SecureAggregationConfig.from_dict(data)


def test_from_dict_refuses_a_non_object() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        SecureAggregationConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_threshold_per_neighbourhood() -> None:
    majority = SecureAggregationConfig(clip_norm=1.0)
    assert [majority.threshold_for(m) for m in (2, 3, 10, 11, 29)] == [2, 2, 6, 6, 15]
    # a strict majority: two disjoint groups of t cannot exist, so no server gathers both kinds of share
    assert all(2 * majority.threshold_for(m) > m for m in range(2, 200))
    fraction = SecureAggregationConfig(clip_norm=1.0, threshold=0.34)
    assert [fraction.threshold_for(m) for m in (3, 10, 29)] == [2, 4, 10]
    absolute = SecureAggregationConfig(clip_norm=1.0, threshold=5)
    assert absolute.threshold_for(7) == 5
    with pytest.raises(ConfigError, match=r"'threshold' = 5 asks for 5 shares.*only 4"):
        absolute.threshold_for(4)


def test_validate_for_a_round() -> None:
    config = SecureAggregationConfig(clip_norm=1.0, bits=8)
    config.validate_for(100)
    with pytest.raises(ConfigError, match="'bits' = 8 is too few for 200 parties"):
        config.validate_for(200)
    with pytest.raises(ConfigError, match="at least 2 parties"):
        config.validate_for(1)
    assert SecureAggregationConfig(clip_norm=1.0, protocol="secagg").neighbours_for(50) == 49
    assert SecureAggregationConfig(clip_norm=1.0).neighbours_for(500) == 28
    assert SecureAggregationConfig(clip_norm=1.0, neighbours=40).neighbours_for(10) == 9


def test_only_sum_based_rules_are_compatible() -> None:
    for algorithm in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        check_strategy_compatible(algorithm)
    for algorithm, why in [
        ("krum", "individual update"),
        ("multikrum", "individual update"),
        ("median", "median over individual updates"),
        ("trimmed_mean", "individual updates"),
        ("norm_bounded", "clip each individual update"),
        ("fedbuff", "asynchronous"),
        ("fedasync", "asynchronous"),
    ]:
        with pytest.raises(ConfigError, match=f"'{algorithm}' cannot run with secure_aggregation.*{why}"):
            check_strategy_compatible(algorithm)
    with pytest.raises(ConfigError, match="Unknown aggregation algorithm 'fedsgd'"):
        check_strategy_compatible("fedsgd")


def test_every_registered_algorithm_is_classified() -> None:
    for algorithm in AggregationAlgorithm:
        if algorithm in COMPATIBLE_ALGORITHMS:
            check_strategy_compatible(algorithm.value)
        else:
            with pytest.raises(ConfigError, match="cannot run"):
                check_strategy_compatible(algorithm.value)

"""The registry of aggregation strategies: algorithm name to :class:`~flcore.strategies.base.Strategy` class.

Invariants: every :class:`~flcore.strategies.base.AggregationAlgorithm` has exactly one strategy class, whose
``algorithm`` is that name; :func:`build_strategy` is the one place that turns a stored configuration
(algorithm name and JSON hyperparameters) into a validated strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from flcore.errors import ConfigError
from flcore.strategies.base import AggregationAlgorithm, Strategy
from flcore.strategies.fedasync import FedAsync
from flcore.strategies.fedavg import FedAvg
from flcore.strategies.fedavgm import FedAvgM
from flcore.strategies.fedbuff import FedBuff
from flcore.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from flcore.strategies.fedprox import FedProx
from flcore.strategies.krum import Krum, MultiKrum
from flcore.strategies.median import CoordinateMedian
from flcore.strategies.norm_bounded import NormBounded
from flcore.strategies.trimmed_mean import TrimmedMean

__all__ = ["STRATEGIES", "build_strategy"]

STRATEGIES: Mapping[AggregationAlgorithm, type[Strategy]] = MappingProxyType(
    {
        cls.algorithm: cls
        for cls in (
            FedAvg,
            FedAvgM,
            FedProx,
            FedAdam,
            FedYogi,
            FedAdagrad,
            Krum,
            MultiKrum,
            CoordinateMedian,
            TrimmedMean,
            NormBounded,
            FedBuff,
            FedAsync,
        )
    }
)
"""Strategy class of every algorithm."""


def build_strategy(algorithm: str, hyperparameters: Mapping[str, Any] | None = None) -> Strategy:
    """Return the validated strategy for ``algorithm`` configured by ``hyperparameters`` (defaults if None).

    Raises
    ------
    ConfigError
        If the algorithm is unknown or a hyperparameter is invalid (the message names the field).
    """
    try:
        key = AggregationAlgorithm(algorithm)
    except ValueError:
        raise ConfigError(
            f"Unknown aggregation algorithm {algorithm!r}; "
            f"available: {[a.value for a in AggregationAlgorithm]}."
        ) from None
    return STRATEGIES[key].from_hyperparameters({} if hyperparameters is None else hyperparameters)

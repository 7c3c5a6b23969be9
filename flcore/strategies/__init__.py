"""Aggregation strategies: one strategy per module, pure numpy.

Invariants: aggregators never mutate the updates given to them and validate every update's names and
shapes against the model's :class:`~flcore.parameters.ParameterSpec` before touching their state.
"""

import enum

from flcore.strategies.fedavg import FedAvgAccumulator, fedavg

__all__ = ["AggregationAlgorithm", "FedAvgAccumulator", "fedavg"]


class AggregationAlgorithm(enum.StrEnum):
    """Server-side aggregation algorithms, by stored name (a ``str`` subclass: ``str(x) == x.value``)."""

    FEDAVG = "fedavg"

"""Aggregation strategies: one strategy per module behind one interface, pure numpy.

Invariants: aggregators never mutate the updates given to them and validate every update's names and
shapes against the model's :class:`~flcore.parameters.ParameterSpec` before touching their state; every
:class:`AggregationAlgorithm` maps to one :class:`Strategy` in :data:`STRATEGIES`.
"""

from flcore.strategies.base import AggregationAlgorithm, NotEnoughUpdates, ServerState, Strategy
from flcore.strategies.fedavg import FedAvgAccumulator, fedavg
from flcore.strategies.registry import STRATEGIES, build_strategy

__all__ = [
    "STRATEGIES",
    "AggregationAlgorithm",
    "FedAvgAccumulator",
    "NotEnoughUpdates",
    "ServerState",
    "Strategy",
    "build_strategy",
    "fedavg",
]

"""Norm bounding: any rule applied to updates first clipped to a norm (Sun, Kairouz, Suresh and McMahan
2019, "Can You Really Backdoor Federated Learning?", Section 3, "norm thresholding of updates").

Each delta is scaled by ``min(1, M / ||Delta_i||_2)`` (``M = clip_norm``) so that no client's contribution
exceeds norm ``M``, and the scaled deltas are combined and stepped by an inner rule (default FedAvg, as in
the paper). Like Flower's DP wrappers, this is a wrapper around another strategy, not a new combination.

Invariants: every contribution the inner rule sees has norm ``<= clip_norm``; the inner rule's weights
(``num_examples`` or uniform) are NOT scaled, only the deltas, so the weighted mean of clipped deltas has norm
``<= clip_norm`` too; the wrapper streams exactly when its inner rule does; the inner cannot itself be
``norm_bounded`` or asynchronous.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from flcore.errors import ConfigError
from flcore.parameters import Parameters, ParameterSpec
from flcore.strategies.base import (
    STREAMING_CHUNK_SIZE,
    AggregationAlgorithm,
    Hyperparameter,
    ServerState,
    Strategy,
)
from flcore.strategies.fedavg import FedAvgAccumulator

__all__ = ["INNER_ALGORITHMS", "NormBounded"]

INNER_ALGORITHMS = tuple(
    a.value
    for a in AggregationAlgorithm
    if a
    not in (AggregationAlgorithm.NORM_BOUNDED, AggregationAlgorithm.FEDBUFF, AggregationAlgorithm.FEDASYNC)
)
"""Algorithms allowed as the inner rule: every synchronous one except ``norm_bounded`` itself."""


@dataclass(frozen=True)
class NormBounded(Strategy):
    """Clip every delta to ``clip_norm``, then delegate to an inner rule (Sun et al. 2019).

    Parameters
    ----------
    clip_norm : float
        ``M > 0``; required (the right bound depends on the model and the task: Sun et al. 2019 pick it
        from the norms of honest updates).
    inner : str
        The inner algorithm, one of :data:`INNER_ALGORITHMS`; default ``"fedavg"`` (Sun et al. 2019).
    inner_hyperparameters : mapping
        The inner rule's own hyperparameters, validated by it; default ``{}`` (its defaults).
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.NORM_BOUNDED
    needs_norms: ClassVar[bool] = True
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter("clip_norm", "float", minimum=0.0, minimum_inclusive=False),
        Hyperparameter("inner", "str", "fedavg", choices=INNER_ALGORITHMS),
        Hyperparameter("inner_hyperparameters", "mapping", {}),
    )

    clip_norm: float
    inner: str = "fedavg"
    inner_hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    inner_strategy: Strategy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        from flcore.strategies.registry import build_strategy  # the registry imports this module

        try:
            inner = build_strategy(self.inner, self.inner_hyperparameters)
        except ConfigError as exc:
            raise ConfigError(
                f"norm_bounded hyperparameter 'inner_hyperparameters' is invalid: {exc}"
            ) from None
        object.__setattr__(self, "inner_strategy", inner)
        object.__setattr__(self, "inner_hyperparameters", inner.hyperparameters())
        # The class defaults describe FedAvg; the instance follows its inner rule.
        object.__setattr__(self, "streaming", inner.streaming)
        object.__setattr__(self, "needs_statistics", inner.needs_statistics)
        object.__setattr__(self, "coordinate_major", inner.coordinate_major)
        object.__setattr__(self, "STATE_GROUPS", inner.STATE_GROUPS)

    def hyperparameters(self) -> dict[str, Any]:
        """Return ``clip_norm``, ``inner`` and the inner rule's normalised hyperparameters."""
        return {
            "clip_norm": self.clip_norm,
            "inner": self.inner,
            "inner_hyperparameters": self.inner_strategy.hyperparameters(),
        }

    def client_config(self) -> dict[str, Any]:
        """Return the inner rule's client configuration."""
        return self.inner_strategy.client_config()

    def init_state(self, spec: ParameterSpec) -> ServerState:
        """Return the inner rule's initial state."""
        return self.inner_strategy.init_state(spec)

    def check_state(self, state: ServerState, spec: ParameterSpec) -> None:
        """Check ``state`` against the inner rule."""
        self.inner_strategy.check_state(state, spec)

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Take the inner rule's server step."""
        return self.inner_strategy.apply(base, delta, state)

    def check_num_updates(self, num_updates: int) -> None:
        """Delegate to the inner rule."""
        self.inner_strategy.check_num_updates(num_updates)

    def update_weight(self, num_examples: int, norm: float) -> float:
        """Return the inner rule's weight (clipping does not change weights)."""
        return self.inner_strategy.update_weight(num_examples, norm)

    def update_scale(self, norm: float) -> float:
        """Return ``min(1, clip_norm / norm)`` (1 for a zero update)."""
        if norm <= self.clip_norm:
            return 1.0
        return self.clip_norm / norm

    def accumulator(
        self, spec: ParameterSpec, *, chunk_size: int = STREAMING_CHUNK_SIZE
    ) -> FedAvgAccumulator:
        """Return the inner rule's accumulator (add each update with ``scale=update_scale(norm)``)."""
        return self.inner_strategy.accumulator(spec, chunk_size=chunk_size)

    def chunk_statistics(self, matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Delegate to the inner rule (rows already scaled)."""
        return self.inner_strategy.chunk_statistics(matrix)

    def finalize_statistics(
        self, statistics: npt.NDArray[np.float64], weights: npt.NDArray[np.float64]
    ) -> Any:
        """Delegate to the inner rule."""
        return self.inner_strategy.finalize_statistics(statistics, weights)

    def combine_chunk(
        self, matrix: npt.NDArray[np.float32], weights: npt.NDArray[np.float64], context: Any = None
    ) -> npt.NDArray[np.float32]:
        """Delegate to the inner rule (rows already scaled)."""
        return self.inner_strategy.combine_chunk(matrix, weights, context)

    def combine_coordinates(
        self, coordinates: npt.NDArray[np.float32], weights: npt.NDArray[np.float64], context: Any = None
    ) -> npt.NDArray[np.float32]:
        """Delegate to the inner rule (columns already scaled)."""
        return self.inner_strategy.combine_coordinates(coordinates, weights, context)

    def combination_metrics(
        self, weights: npt.NDArray[np.float64], scales: npt.NDArray[np.float64], context: Any
    ) -> dict[str, float]:
        """Return the inner rule's metrics plus ``num_clipped``, the updates scaled down."""
        metrics = self.inner_strategy.combination_metrics(weights, scales, context)
        metrics["num_clipped"] = float(np.count_nonzero(scales < 1.0))
        return metrics

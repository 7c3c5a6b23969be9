"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification", Section 3).

``v_t = beta * v_{t-1} + Delta_t``; ``x_{t+1} = x_t + eta * v_t`` with ``v_0 = 0``, where ``Delta_t`` is the
example-weighted mean of the deltas (the paper writes ``Delta`` as the descent direction ``x - mean``;
our deltas are ``client - global``, so the signs of both lines flip together and the step is the same).

Invariants: the momentum ``v`` is stored as float32 in :class:`~flcore.strategies.base.ServerState`
group ``"momentum"``; the step is computed in float64 chunk by chunk and rounded once to float32, so a
resumed server reproduces a straight run bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from flcore.parameters import Parameters
from flcore.strategies.base import (
    ELEMENTWISE_CHUNK_SIZE,
    SERVER_LEARNING_RATE,
    AggregationAlgorithm,
    Hyperparameter,
    ServerState,
    Strategy,
    coordinate_chunks,
)

__all__ = ["FedAvgM"]


@dataclass(frozen=True)
class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al. 2019).

    Parameters
    ----------
    server_learning_rate : float
        ``eta > 0``; default 1.0 (Hsu et al. 2019 keep ``eta = 1`` and vary ``beta``; also Flower's default).
    server_momentum : float
        ``beta`` in [0, 1); default 0.9, the value Hsu et al. (2019, Figure 4) find robust across
        non-identical splits. ``beta = 0`` is FedAvg. (Flower defaults to 0.0, i.e. no momentum.)
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDAVGM
    STATE_GROUPS: ClassVar[tuple[str, ...]] = ("momentum",)
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (
        SERVER_LEARNING_RATE,
        Hyperparameter("server_momentum", "float", 0.9, minimum=0.0, maximum=1.0, maximum_inclusive=False),
    )

    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Return ``x + eta * v`` with ``v = beta * v + Delta``, and the new momentum."""
        spec = self._begin_apply(base, delta, state)
        momentum = state.tensors["momentum"]
        new_global: Parameters = {}
        new_momentum: Parameters = {}
        for tensor in spec.tensors:
            name = tensor.name
            x, d, v = (np.asarray(a[name]).reshape(-1) for a in (base, delta, momentum))
            x_out = np.empty(x.shape, dtype=np.float32)
            v_out = np.empty(x.shape, dtype=np.float32)
            for start, stop in coordinate_chunks(x.shape[0], ELEMENTWISE_CHUNK_SIZE):
                v64 = self.server_momentum * v[start:stop].astype(np.float64) + d[start:stop]
                x_out[start:stop] = x[start:stop] + self.server_learning_rate * v64
                v_out[start:stop] = v64
            new_global[name] = x_out.reshape(tensor.shape)
            new_momentum[name] = v_out.reshape(tensor.shape)
        return new_global, ServerState({"momentum": new_momentum}, self._next_scalars(state))

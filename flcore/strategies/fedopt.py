"""Adaptive server optimizers FedAdagrad, FedYogi and FedAdam (Reddi et al. 2021, "Adaptive Federated
Optimization", ICLR, Algorithm 2).

With the example-weighted mean of the client deltas as pseudo-gradient ``Delta_t`` (the paper's
``Delta_t = 1/|S| sum_i Delta_i^t``; we weight by ``num_examples`` like FedAvg), every coordinate follows::

    m_t = beta_1 m_{t-1} + (1 - beta_1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                                     (FedAdagrad)
    v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)              (FedYogi)
    v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2                                 (FedAdam)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the paper's initialisation "v_{-1} >= tau^2", taken with
equality) and no bias correction, exactly as Algorithm 2. (Flower starts from ``v = 0`` and, for FedAdam,
bias-corrects ``eta``; we do not.) ``eta_l``, the client learning rate, is not a server hyperparameter.

Defaults are Flower's (``flwr.server.strategy``), which follow the paper's recommended settings
(Reddi et al. 2021, Section 5 and Appendix D: ``beta_1 = 0.9``, ``beta_2 = 0.99``, ``tau`` and ``eta``
tuned on a log grid):

==============  =====  =======  =======  ======
strategy        eta    beta_1   beta_2   tau
==============  =====  =======  =======  ======
FedAdagrad      1e-1   0.0      (unused) 1e-9
FedYogi         1e-2   0.9      0.99     1e-3
FedAdam         1e-1   0.9      0.99     1e-9
==============  =====  =======  =======  ======

FedAdagrad's ``beta_1 = 0`` (no momentum) is Flower's choice; Algorithm 2 allows ``beta_1 > 0``.

Invariants: ``m`` and ``v`` are stored as float32 groups ``"m"`` and ``"v"`` of the
:class:`~flcore.strategies.base.ServerState` (float32 suffices: ``v >= tau^2 > 0`` stays a normal float32
for ``tau >= 1e-15``, and every step reads the stored float32 values, so a resumed server is bit-for-bit a
straight run); each step is computed in float64 chunk by chunk and rounded once.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from flcore.parameters import Parameters, ParameterSpec
from flcore.strategies.base import (
    ELEMENTWISE_CHUNK_SIZE,
    AggregationAlgorithm,
    Hyperparameter,
    ServerState,
    Strategy,
    coordinate_chunks,
)

__all__ = ["MIN_TAU", "FedAdagrad", "FedAdam", "FedOpt", "FedYogi"]

MIN_TAU = 1e-15
"""Smallest accepted ``tau``: ``v_{-1} = tau^2`` must stay a normal float32 (> 1.2e-38)."""


def _beta(name: str, default: float) -> Hyperparameter:
    return Hyperparameter(name, "float", default, minimum=0.0, maximum=1.0, maximum_inclusive=False)


def _hyperparameters(
    eta: float, beta_1: float, beta_2: float | None, tau: float
) -> tuple[Hyperparameter, ...]:
    fields = [
        Hyperparameter("server_learning_rate", "float", eta, minimum=0.0, minimum_inclusive=False),
        _beta("beta_1", beta_1),
    ]
    if beta_2 is not None:
        fields.append(_beta("beta_2", beta_2))
    fields.append(Hyperparameter("tau", "float", tau, minimum=MIN_TAU))
    return tuple(fields)


@dataclass(frozen=True)
class FedOpt(Strategy):
    """Shared step of Reddi et al. (2021) Algorithm 2; subclasses define the second-moment update."""

    STATE_GROUPS: ClassVar[tuple[str, ...]] = ("m", "v")

    server_learning_rate: float
    beta_1: float
    tau: float

    def init_state(self, spec: ParameterSpec) -> ServerState:
        """Return ``m_{-1} = 0``, ``v_{-1} = tau^2`` (float32) and ``step = 0``."""
        v0 = {t.name: np.full(t.shape, self.tau**2, dtype=np.float32) for t in spec.tensors}
        return ServerState({"m": spec.zeros(), "v": v0}, {"step": 0})

    @abc.abstractmethod
    def second_moment(
        self, v: npt.NDArray[np.float64], delta_squared: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Return ``v_t`` from ``v_{t-1}`` and ``Delta_t^2`` (float64)."""

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Return ``x + eta m_t / (sqrt(v_t) + tau)`` and the new ``m``, ``v`` (Algorithm 2)."""
        spec = self._begin_apply(base, delta, state)
        m_state, v_state = state.tensors["m"], state.tensors["v"]
        new_global: Parameters = {}
        new_m: Parameters = {}
        new_v: Parameters = {}
        for tensor in spec.tensors:
            name = tensor.name
            x, d, m, v = (np.asarray(a[name]).reshape(-1) for a in (base, delta, m_state, v_state))
            x_out, m_out, v_out = (np.empty(x.shape, dtype=np.float32) for _ in range(3))
            for start, stop in coordinate_chunks(x.shape[0], ELEMENTWISE_CHUNK_SIZE):
                d64 = d[start:stop].astype(np.float64)
                m64 = self.beta_1 * m[start:stop].astype(np.float64) + (1.0 - self.beta_1) * d64
                v64 = self.second_moment(v[start:stop].astype(np.float64), d64 * d64)
                x_out[start:stop] = x[start:stop] + self.server_learning_rate * m64 / (
                    np.sqrt(v64) + self.tau
                )
                m_out[start:stop] = m64
                v_out[start:stop] = v64
            new_global[name] = x_out.reshape(tensor.shape)
            new_m[name] = m_out.reshape(tensor.shape)
            new_v[name] = v_out.reshape(tensor.shape)
        return new_global, ServerState({"m": new_m, "v": new_v}, self._next_scalars(state))


@dataclass(frozen=True)
class FedAdagrad(FedOpt):
    """FedAdagrad: ``v_t = v_{t-1} + Delta_t^2`` (Reddi et al. 2021, Algorithm 2).

    Parameters
    ----------
    server_learning_rate : float
        ``eta > 0``; default 0.1 (Flower).
    beta_1 : float
        Momentum in [0, 1); default 0.0 (Flower: no momentum).
    tau : float
        Adaptivity ``tau >= 1e-15``; default 1e-9 (Flower).
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDADAGRAD
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = _hyperparameters(1e-1, 0.0, None, 1e-9)

    server_learning_rate: float = 1e-1
    beta_1: float = 0.0
    tau: float = 1e-9

    def second_moment(
        self, v: npt.NDArray[np.float64], delta_squared: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Return ``v + Delta^2``."""
        return v + delta_squared


@dataclass(frozen=True)
class FedYogi(FedOpt):
    """FedYogi: ``v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)`` (Reddi et al. 2021).

    Parameters
    ----------
    server_learning_rate : float
        ``eta > 0``; default 0.01 (Flower).
    beta_1, beta_2 : float
        In [0, 1); defaults 0.9 and 0.99 (Reddi et al. 2021, Section 5; Flower).
    tau : float
        Adaptivity ``tau >= 1e-15``; default 1e-3 (Flower).
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDYOGI
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = _hyperparameters(1e-2, 0.9, 0.99, 1e-3)

    server_learning_rate: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def second_moment(
        self, v: npt.NDArray[np.float64], delta_squared: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Return ``v - (1 - beta_2) Delta^2 sign(v - Delta^2)``; unchanged where ``v == Delta^2``."""
        result: npt.NDArray[np.float64] = v - (1.0 - self.beta_2) * delta_squared * np.sign(v - delta_squared)
        return result


@dataclass(frozen=True)
class FedAdam(FedOpt):
    """FedAdam: ``v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2`` (Reddi et al. 2021), no bias correction.

    Parameters
    ----------
    server_learning_rate : float
        ``eta > 0``; default 0.1 (Flower).
    beta_1, beta_2 : float
        In [0, 1); defaults 0.9 and 0.99 (Reddi et al. 2021, Section 5; Flower).
    tau : float
        Adaptivity ``tau >= 1e-15``; default 1e-9 (Flower).
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDADAM
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = _hyperparameters(1e-1, 0.9, 0.99, 1e-9)

    server_learning_rate: float = 1e-1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9

    def second_moment(
        self, v: npt.NDArray[np.float64], delta_squared: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Return ``beta_2 v + (1 - beta_2) Delta^2``."""
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_squared

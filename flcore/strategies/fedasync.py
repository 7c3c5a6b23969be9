"""FedAsync (Xie, Koyejo and Gupta 2019, "Asynchronous Federated Optimization", Algorithm 1).

The server mixes every client model into the global one as soon as it arrives::

    alpha_t = alpha * s(t - tau);      x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new

where ``x_new = x_tau + Delta`` is the client's model (the global version ``tau`` it started from plus its
delta) and ``s`` a staleness function (:mod:`flcore.strategies.staleness`).

Invariants: pure - :meth:`FedAsync.mix` returns new arrays and needs the client's base version, which the
server keeps as a stored model version; with staleness 0, ``x_tau = x_{t-1}`` and the mix is
``x + alpha * Delta`` (:meth:`FedAsync.apply`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec
from flcore.strategies.base import AggregationAlgorithm, Hyperparameter, ServerState, Strategy, sgd_step
from flcore.strategies.staleness import STALENESS_HYPERPARAMETERS, StalenessFunction

__all__ = ["FedAsync"]


@dataclass(frozen=True)
class FedAsync(Strategy):
    """Asynchronous mixing of client models into the global model (Xie et al. 2019).

    Parameters
    ----------
    mixing : float
        ``alpha`` in (0, 1]; default 0.6, a middle value of the range Xie et al. (2019, Section 6) sweep;
        the paper fixes no single recommendation, so tune it per task (smaller is safer under staleness).
    staleness_function, polynomial_exponent, hinge_slope, hinge_cutoff
        See :mod:`flcore.strategies.staleness`; default polynomial with ``a = 0.5`` (FedAsync+Poly).
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDASYNC
    asynchronous: ClassVar[bool] = True
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter("mixing", "float", 0.6, minimum=0.0, maximum=1.0, minimum_inclusive=False),
        *STALENESS_HYPERPARAMETERS,
    )

    mixing: float = 0.6
    staleness_function: str = "polynomial"
    polynomial_exponent: float = 0.5
    hinge_slope: float = 10.0
    hinge_cutoff: float = 4.0

    @property
    def staleness(self) -> StalenessFunction:
        """The configured staleness function ``s``."""
        return StalenessFunction(
            self.staleness_function, self.polynomial_exponent, self.hinge_slope, self.hinge_cutoff
        )

    def mixing_weight(self, staleness: int) -> float:
        """Return ``alpha_t = alpha * s(staleness)``."""
        return self.mixing * self.staleness(staleness)

    def mix(
        self,
        current: Mapping[str, npt.NDArray[Any]],
        client_base: Mapping[str, npt.NDArray[Any]],
        delta: Mapping[str, npt.NDArray[Any]],
        staleness: int,
    ) -> Parameters:
        """Return ``(1 - alpha_t) current + alpha_t (client_base + delta)``, computed in float64.

        Parameters
        ----------
        current : Parameters
            ``x_{t-1}``, the global model now.
        client_base : Parameters
            ``x_tau``, the global version the client started from.
        delta : Parameters
            The client's delta (its model minus ``x_tau``).
        staleness : int
            ``t - tau >= 0``.
        """
        spec = ParameterSpec.from_parameters(current)
        spec.validate(client_base)
        spec.validate(delta)
        alpha_t = self.mixing_weight(staleness)
        result: Parameters = {}
        for name in spec.names:
            x_new = np.asarray(client_base[name], dtype=np.float64) + np.asarray(
                delta[name], dtype=np.float64
            )
            if not np.isfinite(x_new).all():
                raise FlcoreError(f"Tensor {name!r} of the client model contains NaN or Inf.")
            mixed = (1.0 - alpha_t) * np.asarray(current[name], dtype=np.float64) + alpha_t * x_new
            result[name] = mixed.astype(np.float32)
        return result

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Mix a fresh (staleness 0) delta: return ``base + alpha * delta``, and ``step + 1``."""
        self._begin_apply(base, delta, state)
        return sgd_step(base, delta, self.mixing), ServerState({}, self._next_scalars(state))

    def combine_chunk(
        self, matrix: npt.NDArray[np.float32], weights: npt.NDArray[np.float64], context: Any = None
    ) -> npt.NDArray[np.float32]:
        """Not available: FedAsync mixes one client model at a time (:meth:`mix`)."""
        raise FlcoreError("fedasync is asynchronous; call mix() for each client model as it arrives.")

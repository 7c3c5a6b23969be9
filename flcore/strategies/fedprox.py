"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys), server side.

FedProx changes the *clients*: each minimises ``h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2`` (Algorithm 2,
equation (2)) inexactly, and may stop early. The server side is FedAvg's weighted mean, so this module only
adds ``proximal_mu`` to :meth:`FedProx.client_config`.

Invariants: the combination is FedAvg's (example-weighted, streaming); the server never discards a
straggler's partial work - a client that ran fewer local epochs still sends its delta and it is averaged
with its ``num_examples`` weight, which is what Algorithm 2 prescribes for "gamma-inexact" solutions
(Li et al. 2020, Section 3; dropping stragglers is the FedAvg baseline they compare against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from flcore.strategies.base import SERVER_LEARNING_RATE, AggregationAlgorithm, Hyperparameter
from flcore.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedProx: FedAvg on the server, a proximal term ``mu/2 ||w - w^t||^2`` on the clients.

    Parameters
    ----------
    server_learning_rate : float
        ``eta > 0`` of the server step ``x + eta * Delta``; default 1.0 (Li et al. 2020 use plain averaging).
    proximal_mu : float
        ``mu >= 0``, sent to agents via :meth:`client_config`; default 0.01, within the grid
        {0.001, 0.01, 0.1, 1} Li et al. (2020, Section 5.2) tune over and Flower's examples' value.
        ``mu = 0`` is FedAvg that tolerates partial work.
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDPROX
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (
        SERVER_LEARNING_RATE,
        Hyperparameter("proximal_mu", "float", 0.01, minimum=0.0),
    )

    proximal_mu: float = 0.01

    def client_config(self) -> dict[str, Any]:
        """Return ``{"proximal_mu": mu}``: agents add ``mu/2 ||w - w^t||^2`` to their local loss."""
        return {"proximal_mu": self.proximal_mu}

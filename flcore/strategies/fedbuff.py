"""FedBuff: buffered asynchronous aggregation (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek and Huba
2022, "Federated Learning with Buffered Asynchronous Aggregation", AISTATS, Algorithm 1).

Clients train from whatever global version is current and send their delta whenever they finish; the
server adds each delta, discounted by its staleness ``s(t - tau)`` (default ``1/sqrt(1 + staleness)``,
Section 4), to a buffer, and once ``K`` deltas are in it takes one step::

    Delta = (1 / K) sum_{i=1}^K s(t - tau_i) Delta_i;      x_{t+1} = x_t + eta_g Delta

(Algorithm 1 lines 11-16; the paper's ``Delta_i`` is ``y_0 - y_Q``, the negative of our client-minus-global
deltas, and its step ``x - eta_g Delta`` flips sign with it).

Invariants: :class:`FedBuffBuffer` holds one float32 model-sized accumulator whatever ``K``; it refuses a
``K+1``-th delta and refuses to step before ``K``; deltas are unweighted by ``num_examples`` as in the paper.
The buffer is not part of the persisted state: the server keeps the buffered deltas as blobs and can refill
a buffer after a restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec
from flcore.strategies.base import (
    SERVER_LEARNING_RATE,
    STREAMING_CHUNK_SIZE,
    AggregationAlgorithm,
    Hyperparameter,
    ServerState,
    Strategy,
    sgd_step,
)
from flcore.strategies.fedavg import FedAvgAccumulator
from flcore.strategies.staleness import STALENESS_HYPERPARAMETERS, StalenessFunction

__all__ = ["FedBuff", "FedBuffBuffer"]


class FedBuffBuffer:
    """Streaming sum of staleness-weighted deltas until ``buffer_size`` are in (FedBuff, Algorithm 1).

    Parameters
    ----------
    spec : ParameterSpec
        Names and shapes of every delta.
    buffer_size : int
        ``K``, the number of deltas per server step.
    staleness_function : StalenessFunction
        ``s``; each delta is multiplied by ``s(staleness)`` before it is added.
    chunk_size : int
        Elements per chunk of the streaming add.
    """

    def __init__(
        self,
        spec: ParameterSpec,
        buffer_size: int,
        staleness_function: StalenessFunction,
        *,
        chunk_size: int = STREAMING_CHUNK_SIZE,
    ) -> None:
        if buffer_size < 1:
            raise FlcoreError(f"buffer_size must be a positive integer. Found {buffer_size!r}.")
        self._accumulator = FedAvgAccumulator(spec, chunk_size=chunk_size)
        self._buffer_size = buffer_size
        self._staleness_function = staleness_function

    @property
    def count(self) -> int:
        """Number of deltas in the buffer."""
        return self._accumulator.count

    @property
    def buffer_size(self) -> int:
        """``K``."""
        return self._buffer_size

    def ready(self) -> bool:
        """Return whether ``K`` deltas are in and the server should step."""
        return self.count >= self._buffer_size

    def _check_room(self) -> None:
        if self.ready():
            raise FlcoreError(
                f"The FedBuff buffer already holds buffer_size={self._buffer_size} deltas; "
                "step before adding more."
            )

    def add(self, delta: Mapping[str, npt.NDArray[Any]], staleness: int) -> float:
        """Add ``s(staleness) * delta``; return the staleness weight used.

        Raises
        ------
        FlcoreError
            If the buffer is full, the staleness is invalid or the delta has NaN or Inf.
        """
        self._check_room()
        weight = self._staleness_function(staleness)
        self._accumulator.add(delta, 1.0, scale=weight)
        return weight

    def add_file(self, path: str | os.PathLike[str], staleness: int) -> float:
        """Add ``s(staleness) * delta`` read from a safetensors file, streaming; return the weight used."""
        self._check_room()
        weight = self._staleness_function(staleness)
        self._accumulator.add_file(path, 1.0, scale=weight)
        return weight

    def pseudo_gradient(self) -> Parameters:
        """Return ``(1/K) sum_i s(t - tau_i) Delta_i``.

        Raises
        ------
        FlcoreError
            If fewer than ``K`` deltas are in.
        """
        if not self.ready():
            raise FlcoreError(
                f"The FedBuff buffer holds {self.count} of buffer_size={self._buffer_size} deltas; "
                "the server steps only when it is full."
            )
        # Each delta was added with weight 1, so the accumulator's mean is the sum divided by count == K.
        return self._accumulator.result()


@dataclass(frozen=True)
class FedBuff(Strategy):
    """Buffered asynchronous aggregation (Nguyen et al. 2022).

    Parameters
    ----------
    buffer_size : int
        ``K >= 1``; default 10 (Nguyen et al. 2022 use K = 10 in most experiments, Section 6).
    server_learning_rate : float
        ``eta_g > 0``; default 1.0.
    staleness_function, polynomial_exponent, hinge_slope, hinge_cutoff
        See :mod:`flcore.strategies.staleness`; default polynomial with ``a = 0.5``, i.e.
        ``1 / sqrt(1 + staleness)`` as in the paper.
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDBUFF
    asynchronous: ClassVar[bool] = True
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter("buffer_size", "int", 10, minimum=1),
        SERVER_LEARNING_RATE,
        *STALENESS_HYPERPARAMETERS,
    )

    buffer_size: int = 10
    server_learning_rate: float = 1.0
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

    def staleness_weight(self, staleness: int) -> float:
        """Return ``s(staleness)``."""
        return self.staleness(staleness)

    def buffer(self, spec: ParameterSpec, *, chunk_size: int = STREAMING_CHUNK_SIZE) -> FedBuffBuffer:
        """Return an empty buffer of ``K`` deltas for a model described by ``spec``."""
        return FedBuffBuffer(spec, self.buffer_size, self.staleness, chunk_size=chunk_size)

    def step(self, base: Parameters, buffer: FedBuffBuffer) -> Parameters:
        """Return ``base + eta_g * (1/K) sum_i s_i Delta_i`` for a full buffer (Algorithm 1, line 15).

        Raises
        ------
        FlcoreError
            If the buffer is not full.
        """
        delta = buffer.pseudo_gradient()
        ParameterSpec.from_parameters(base).validate(delta)
        return sgd_step(base, delta, self.server_learning_rate)

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Return ``base + eta_g * delta`` for an already-buffered pseudo-gradient, and ``step + 1``."""
        self._begin_apply(base, delta, state)
        return sgd_step(base, delta, self.server_learning_rate), ServerState({}, self._next_scalars(state))

    def combine_chunk(
        self, matrix: npt.NDArray[np.float32], weights: npt.NDArray[np.float64], context: Any = None
    ) -> npt.NDArray[np.float32]:
        """Not available: FedBuff consumes deltas one at a time through :meth:`buffer`."""
        raise FlcoreError("fedbuff is asynchronous; add deltas to a FedBuffBuffer and call step().")

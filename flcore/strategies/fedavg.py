"""Federated Averaging: the example-weighted mean of client models (McMahan et al. 2017, Algorithm 1).

:class:`FedAvg` is the strategy: the pseudo-gradient is the example-weighted mean of the client deltas and the
server step is ``x + eta * Delta`` (``eta = server_learning_rate``, default 1.0, which is exactly
Algorithm 1; other values are the "FedAvg with server learning rate" of Reddi et al. 2021, Section 2).

Invariants: :class:`FedAvgAccumulator` holds exactly one float32 buffer of model size plus a scratch buffer
of ``chunk_size`` elements, whatever the number of updates; an update is validated (names, shapes, finite
values, positive finite weight) before any of it is added, so a rejected update leaves the state unchanged;
:meth:`FedAvgAccumulator.result` returns new arrays and does not change the state. The mean is invariant to
the order of updates up to float32 rounding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec, iter_file_tensors, read_header
from flcore.strategies.base import (
    SERVER_LEARNING_RATE,
    AggregationAlgorithm,
    Hyperparameter,
    ServerState,
    Strategy,
    sgd_step,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "FedAvg", "FedAvgAccumulator", "fedavg"]

DEFAULT_CHUNK_SIZE = 65536
"""Elements per chunk of the streaming weighted add (256 KiB of float32, cache-sized)."""


def _check_weight(weight: float) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise FlcoreError(f"An update's weight must be a number. Found {weight!r}.") from None
    if not (math.isfinite(value) and value > 0):
        raise FlcoreError(f"An update's weight must be positive and finite. Found {weight!r}.")
    return value


def _check_scale(scale: float) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise FlcoreError(f"An update's scale must be a number. Found {scale!r}.") from None
    if not (math.isfinite(value) and value > 0):
        raise FlcoreError(f"An update's scale must be positive and finite. Found {scale!r}.")
    return value


class FedAvgAccumulator:
    """Streaming weighted mean of model updates with one float32 accumulator of model size.

    Computes ``w = sum_k n_k w_k / sum_k n_k``, the server update of FederatedAveraging in McMahan et al.
    (2017), "Communication-Efficient Learning of Deep Networks from Decentralized Data", Algorithm 1, one
    client at a time, so that memory does not grow with the number of clients.

    Parameters
    ----------
    spec : ParameterSpec
        Names and shapes every update must have.
    chunk_size : int
        Elements per chunk of the weighted add; bounds the scratch memory.
    """

    def __init__(self, spec: ParameterSpec, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise FlcoreError(f"chunk_size must be a positive integer. Found {chunk_size!r}.")
        self._spec = spec
        self._chunk_size = chunk_size
        self._accumulator = np.zeros(spec.num_parameters, dtype=np.float32)
        self._scratch = np.empty(min(chunk_size, max(spec.num_parameters, 1)), dtype=np.float32)
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for tensor in spec.tensors:
            self._offsets[tensor.name] = (offset, offset + tensor.num_parameters)
            offset += tensor.num_parameters
        self._count = 0
        self._total_weight = 0.0

    @property
    def spec(self) -> ParameterSpec:
        """The expected names and shapes."""
        return self._spec

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far."""
        return self._total_weight

    def _chunks(self, size: int) -> Iterable[tuple[int, int]]:
        for start in range(0, size, self._chunk_size):
            yield start, min(start + self._chunk_size, size)

    def _check_finite_inplace(self, name: str, flat: npt.NDArray[Any]) -> None:
        for start, stop in self._chunks(flat.shape[0]):
            if not np.isfinite(flat[start:stop]).all():
                raise FlcoreError(
                    f"Tensor {name!r} of the update contains NaN or Inf; every value must be finite."
                )

    def _accumulate_inplace(self, name: str, flat: npt.NDArray[Any], weight: float) -> None:
        base, _ = self._offsets[name]
        for start, stop in self._chunks(flat.shape[0]):
            scratch = self._scratch[: stop - start]
            np.multiply(flat[start:stop], weight, out=scratch, casting="same_kind")
            self._accumulator[base + start : base + stop] += scratch

    def add(self, update: Mapping[str, npt.NDArray[Any]], weight: float, *, scale: float = 1.0) -> None:
        """Add ``weight * scale * update`` to the running sum (and ``weight`` to the total weight).

        Parameters
        ----------
        update : mapping of str to ndarray
            Client model with exactly the spec's names and shapes; finite values.
        weight : float
            Positive finite weight, usually the client's number of examples ``n_k``.
        scale : float
            Positive finite factor applied to the update only, not to the total weight; norm bounding
            passes ``min(1, clip_norm / ||update||)`` here.

        Raises
        ------
        FlcoreError
            If the weight or scale is not positive and finite, or the update has non-finite values.
        SerdeError
            If names or shapes differ from the spec (a subclass of FlcoreError).
        """
        value = _check_weight(weight)
        factor = _check_scale(scale)
        self._spec.validate(update)
        flats = {name: np.asarray(update[name]).reshape(-1) for name in self._spec.names}
        for name, flat in flats.items():
            self._check_finite_inplace(name, flat)
        for name, flat in flats.items():
            self._accumulate_inplace(name, flat, value * factor)
        self._count += 1
        self._total_weight += value

    def add_file(self, path: str | os.PathLike[str], weight: float, *, scale: float = 1.0) -> None:
        """Add ``weight * scale * update`` read from a safetensors file, streaming it through a memory map.

        The file's tensors are memory-mapped (:func:`~flcore.parameters.iter_file_tensors`) and added in
        chunks of ``chunk_size`` elements through one scratch buffer, so no second model-sized array is
        allocated. Names and shapes are checked from the header before anything is added.

        Raises
        ------
        FlcoreError
            If the weight or scale is invalid or the file holds NaN or Inf.
        SerdeError
            If the header is malformed or names or shapes differ from the spec.
        """
        value = _check_weight(weight)
        factor = _check_scale(scale)
        header = read_header(path)
        self._spec.validate_shapes({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
        for name, view in iter_file_tensors(path):
            self._check_finite_inplace(name, view.reshape(-1))
        for name, view in iter_file_tensors(path):
            self._accumulate_inplace(name, view.reshape(-1), value * factor)
        self._count += 1
        self._total_weight += value

    def result(self) -> Parameters:
        """Return the weighted mean as new float32 arrays in spec order.

        Raises
        ------
        FlcoreError
            If no update has been added.
        """
        if self._count == 0:
            raise FlcoreError("Cannot average zero updates; add at least one update first.")
        mean = self._accumulator / np.float32(self._total_weight)
        result: Parameters = {}
        for tensor in self._spec.tensors:
            start, stop = self._offsets[tensor.name]
            result[tensor.name] = mean[start:stop].reshape(tensor.shape).copy()
        return result


def fedavg(updates: Sequence[Mapping[str, npt.NDArray[Any]]], weights: Sequence[float]) -> Parameters:
    """Return the weighted mean of ``updates``, computed in float64 and returned as float32.

    Reference implementation of the FederatedAveraging server step (McMahan et al. 2017, Algorithm 1)
    that materialises every update; use :class:`FedAvgAccumulator` in production.

    Raises
    ------
    FlcoreError
        If there are no updates, the counts differ, a weight is invalid or names or shapes differ.
    """
    if not updates:
        raise FlcoreError("Cannot average zero updates; expected at least one.")
    if len(updates) != len(weights):
        raise FlcoreError(f"Got {len(updates)} updates but {len(weights)} weights; expected one weight each.")
    values = [_check_weight(w) for w in weights]
    spec = ParameterSpec.from_parameters(updates[0])
    for update in updates[1:]:
        spec.validate(update)
    total = math.fsum(values)
    result: Parameters = {}
    for name in spec.names:
        acc = np.zeros(spec.shape_of(name), dtype=np.float64)
        for update, w in zip(updates, values, strict=True):
            acc += w * np.asarray(update[name], dtype=np.float64)
        result[name] = (acc / total).astype(np.float32)
    return result


@dataclass(frozen=True)
class FedAvg(Strategy):
    """FederatedAveraging (McMahan et al. 2017, Algorithm 1) on deltas, with a server learning rate.

    ``Delta = sum_k n_k Delta_k / sum_k n_k`` (streamed through :class:`FedAvgAccumulator`), then
    ``x_{t+1} = x_t + eta * Delta``; ``eta = 1`` reproduces Algorithm 1's ``w_{t+1} = sum_k n_k/n w^k_{t+1}``.

    Parameters
    ----------
    server_learning_rate : float
        ``eta > 0``; default 1.0 (McMahan et al. 2017).
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDAVG
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (SERVER_LEARNING_RATE,)

    server_learning_rate: float = 1.0

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Return ``base + eta * delta`` and the state with ``step`` incremented."""
        self._begin_apply(base, delta, state)
        return sgd_step(base, delta, self.server_learning_rate), ServerState({}, self._next_scalars(state))

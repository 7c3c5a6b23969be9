"""Federated Averaging: the example-weighted mean of client models (McMahan et al. 2017, Algorithm 1).

:class:`FedAvg` is the strategy: the pseudo-gradient is the example-weighted mean of the client deltas and the
server step is ``x + eta * Delta`` (``eta = server_learning_rate``, default 1.0, which is exactly
Algorithm 1; other values are the "FedAvg with server learning rate" of Reddi et al. 2021, Section 2).

Invariants: :class:`FedAvgAccumulator` holds exactly one float32 buffer of model size (plus, only when an
update cannot go through BLAS ``saxpy``, a scratch buffer of ``chunk_size`` elements), whatever the number of
updates; an update is validated (names, shapes, finite values, positive finite weight) before any of it is
added, so a rejected update leaves the state unchanged, except that ``add_file(..., verified=True)`` defers
the finiteness check to :meth:`FedAvgAccumulator.result` (see there); :meth:`FedAvgAccumulator.result`
returns new arrays and does not change the state, and needs one more model-sized buffer (the result) only.
The mean is invariant to the order of updates up to float32 rounding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec, _header_length, _parse_header
from flcore.strategies.base import (
    SERVER_LEARNING_RATE,
    AggregationAlgorithm,
    Hyperparameter,
    ServerState,
    Strategy,
    sgd_step,
    single_threaded_blas,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "FedAvg", "FedAvgAccumulator", "fedavg"]

_LITTLE_F32 = np.dtype("<f4")

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


_Saxpy = Callable[..., npt.NDArray[np.float32]]


@functools.cache
def _saxpy() -> _Saxpy | None:
    """Return BLAS ``saxpy`` (``y += a * x`` in place, one pass) from scipy, or None without scipy.

    Imported on first use: ``scipy.linalg`` takes a few hundred milliseconds to import.
    """
    try:
        from scipy.linalg.blas import saxpy
    except ImportError:  # pragma: no cover - scipy is declared in requirements/agent.txt
        return None
    function: _Saxpy = saxpy
    return function


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
        self._scratch: npt.NDArray[np.float32] | None = None  # allocated only if an update needs it
        # The accumulator is laid out like a safetensors file written by to_bytes (tensors sorted by name),
        # so that a blob with exactly that layout is added in a single BLAS call over its whole data section.
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for tensor in sorted(spec.tensors, key=lambda t: t.name):
            self._offsets[tensor.name] = (offset, offset + tensor.num_parameters)
            offset += tensor.num_parameters
        # The JSON header entries (without "__metadata__") of a blob with exactly that layout.
        self._packed_header = {
            t.name: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [4 * self._offsets[t.name][0], 4 * self._offsets[t.name][1]],
            }
            for t in spec.tensors
        }
        self._count = 0
        self._total_weight = 0.0
        self._unchecked = False  # an update added with verified=True has not been checked for NaN/Inf yet
        self._reference: npt.NDArray[np.float32] | None = None
        self._reference_dot = 0.0
        self.reference_dots: list[float] = []

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

    def set_reference(self, reference: Mapping[str, npt.NDArray[Any]]) -> float:
        """Measure every later update against ``reference``: ``<update, reference>`` in the same pass.

        With a reference set, each update is added chunk by chunk and, while its chunk is in cache, its dot
        product with the reference's chunk (float32 per chunk of ``chunk_size`` elements, summed in float64)
        is taken; :attr:`reference_dots` gets one value per added update, in order, of the update as sent
        (before ``weight`` and ``scale``). The sum itself is unchanged bit for bit (``saxpy`` is elementwise).
        Costs one model-sized float32 buffer. Returns the reference's L2 norm (float64).

        Raises
        ------
        FlcoreError
            If updates were already added, or the reference has non-finite values.
        SerdeError
            If its names or shapes differ from the spec.
        """
        if self._count:
            raise FlcoreError("Set the reference before adding updates; its dots would miss some of them.")
        self._spec.validate(reference)
        flat = np.empty(self._spec.num_parameters, dtype=np.float32)
        for name, (start, stop) in self._offsets.items():
            flat[start:stop] = np.asarray(reference[name], dtype=np.float32).reshape(-1)
        if not np.isfinite(flat).all():
            raise FlcoreError("The reference direction contains NaN or Inf; every value must be finite.")
        self._reference = flat
        return float(np.sqrt(np.dot(flat.astype(np.float64), flat.astype(np.float64))))

    def _chunks(self, size: int) -> Iterable[tuple[int, int]]:
        for start in range(0, size, self._chunk_size):
            yield start, min(start + self._chunk_size, size)

    def _check_finite_inplace(self, name: str, flat: npt.NDArray[Any]) -> None:
        for start, stop in self._chunks(flat.shape[0]):
            if not np.isfinite(flat[start:stop]).all():
                raise FlcoreError(
                    f"Tensor {name!r} of the update contains NaN or Inf; every value must be finite."
                )

    def _axpy(self, base: int, flat: npt.NDArray[Any], weight: float) -> None:
        """``accumulator[base : base + len(flat)] += weight * flat``, one BLAS call per cache-sized chunk.

        Always in the same chunks, with or without a reference: a BLAS ``saxpy`` kernel may treat the tail
        of a call differently from its body (fused multiply-add in the vector loop, not in the scalar tail,
        as OpenBLAS's kernels for some CPUs do), so calls over other spans could differ in the last bit,
        and :meth:`Strategy.combine_measured` promises the same sum as ``combine``, bit for bit.
        """
        size = flat.shape[0]
        if size == 0:
            return
        reference = None if self._reference is None else self._reference[base : base + size]
        for start, stop in self._chunks(size):
            piece = flat[start:stop]
            self._axpy_piece(base + start, piece, weight)
            if reference is not None:  # the dot reads the chunk the add has just brought into cache
                self._reference_dot += float(np.dot(piece, reference[start:stop]))

    def _axpy_piece(self, base: int, flat: npt.NDArray[Any], weight: float) -> None:
        size = flat.shape[0]
        target = self._accumulator[base : base + size]
        saxpy = _saxpy()
        if saxpy is not None and flat.dtype == np.float32 and flat.flags.c_contiguous:
            # f2py hands the contiguous float32 target to BLAS as is and returns it: in place, no copy.
            out = saxpy(flat, target, a=weight)
            if out is not target:  # pragma: no cover - defensive: f2py worked on a copy of the target
                target[...] = out
            return
        if self._scratch is None:
            self._scratch = np.empty(min(self._chunk_size, max(self._spec.num_parameters, 1)), np.float32)
        for start, stop in self._chunks(size):
            scratch = self._scratch[: stop - start]
            np.multiply(flat[start:stop], weight, out=scratch, casting="same_kind")
            target[start:stop] += scratch

    def _accumulate_inplace(self, name: str, flat: npt.NDArray[Any], weight: float) -> None:
        self._axpy(self._offsets[name][0], flat, weight)

    def add(
        self,
        update: Mapping[str, npt.NDArray[Any]],
        weight: float,
        *,
        scale: float = 1.0,
        verified: bool = False,
    ) -> None:
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
        verified : bool
            ``False`` (default): every value is checked for NaN and Inf before anything is added.
            ``True``: the check is deferred to :meth:`result`, which checks the sum instead (as for
            :meth:`add_file`); one read of the update instead of two. ``Strategy.combine`` uses it and names
            the offending update itself when :meth:`result` refuses the sum.

        Raises
        ------
        FlcoreError
            If the weight or scale is not positive and finite, or (``verified=False``) the update has
            non-finite values.
        SerdeError
            If names or shapes differ from the spec (a subclass of FlcoreError).
        """
        value = _check_weight(weight)
        factor = _check_scale(scale)
        self._spec.validate(update)
        flats = {name: np.asarray(update[name]).reshape(-1) for name in self._spec.names}
        if not verified:
            for name, flat in flats.items():
                self._check_finite_inplace(name, flat)
        self._reference_dot = 0.0
        with single_threaded_blas():
            for name, flat in flats.items():
                self._accumulate_inplace(name, flat, value * factor)
        self._record_reference_dot()
        self._count += 1
        self._total_weight += value
        if verified:
            self._unchecked = True

    def add_file(
        self,
        path: str | os.PathLike[str],
        weight: float,
        *,
        scale: float = 1.0,
        verified: bool = False,
    ) -> None:
        """Add ``weight * scale * update`` read from a safetensors file, streaming it through a memory map.

        The file is opened once, its header parsed once and its data mapped once; each tensor is then added
        straight from the mapped page cache by BLAS ``saxpy``, chunk by chunk (one pass over the whole data
        section when the blob has the layout :func:`~flcore.parameters.to_bytes` writes), so no model-sized
        array is allocated. Names and shapes are checked from the header before anything is added.

        Parameters
        ----------
        path : path
            The safetensors file.
        weight : float
            Positive finite weight, usually the client's number of examples ``n_k``.
        scale : float
            Positive finite factor applied to the update only, not to the total weight.
        verified : bool
            ``False`` (default): every value is checked for NaN and Inf before anything is added (one extra
            read of the blob), so a non-finite file is refused here and leaves the state unchanged.
            ``True``: the caller vouches that the file's values were checked when it was stored (the server
            validates every upload with :func:`~flcore.parameters.from_bytes` and stores it under its
            sha256, so it cannot change); the per-blob pass is skipped and :meth:`result` checks the sum
            instead (with positive finite weights, a NaN or Inf in any update makes the sum non-finite), so
            a non-finite stored update makes :meth:`result` raise rather than this call.

        Raises
        ------
        FlcoreError
            If the weight or scale is invalid or (``verified=False``) the file holds NaN or Inf.
        SerdeError
            If the header is malformed or names or shapes differ from the spec.
        """
        value = _check_weight(weight)
        factor = _check_scale(scale)
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            length = _header_length(handle.read(8), size)
            header_bytes = handle.read(length)
            data_start = 8 + length
            mapping = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        try:
            packed = self._is_packed(header_bytes, size - data_start) if verified else False
            if packed:
                # Exactly the accumulator's layout: the data section is the flat model, in one call.
                pieces = [(0, 0, self._spec.num_parameters)]
            else:
                header = _parse_header(header_bytes, size)
                self._spec.validate_shapes({e.name: e.shape for e in header.entries})
                pieces = [(self._offsets[e.name][0], e.begin, (e.end - e.begin) // 4) for e in header.entries]
            self._reference_dot = 0.0
            with single_threaded_blas():
                self._add_mapped(mapping, data_start, pieces, value * factor, check=not verified)
            self._record_reference_dot()
        finally:
            # BufferError: a view is still referenced by the traceback of a refused update; the mapping is
            # then closed when that traceback is released.
            with contextlib.suppress(BufferError):
                mapping.close()
        self._count += 1
        self._total_weight += value
        if verified:
            self._unchecked = True

    def _record_reference_dot(self) -> None:
        if self._reference is not None:
            self.reference_dots.append(self._reference_dot)

    def _is_packed(self, header_bytes: bytes, data_size: int) -> bool:
        """Whether a header describes exactly the accumulator's layout (cheap: one JSON parse, one compare).

        Only for blobs validated when they were stored; any other header takes the fully validated path.
        """
        if data_size != self._spec.nbytes:
            return False
        try:
            raw = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return False
        if not isinstance(raw, dict):
            return False
        raw.pop("__metadata__", None)
        return bool(raw == self._packed_header)

    def _add_mapped(
        self,
        mapping: mmap.mmap,
        data_start: int,
        pieces: Sequence[tuple[int, int, int]],
        weight: float,
        *,
        check: bool,
    ) -> None:
        """Add ``weight *`` each ``(accumulator offset, data byte offset, count)`` piece of a mapped blob."""
        views = [
            (base, np.frombuffer(mapping, dtype=_LITTLE_F32, count=count, offset=data_start + begin))
            for base, begin, count in pieces
        ]
        if check:
            for base, view in views:
                self._check_finite_inplace(self._name_at(base), view)
        for base, view in views:
            self._axpy(base, view, weight)

    def _name_at(self, base: int) -> str:
        return next(name for name, (start, _) in self._offsets.items() if start == base)

    def _check_accumulator_finite(self) -> None:
        for start, stop in self._chunks(self._accumulator.shape[0]):
            if not np.isfinite(self._accumulator[start:stop]).all():
                raise FlcoreError(
                    "The weighted sum of the updates contains NaN or Inf: an update added with "
                    "add_file(..., verified=True) was not finite (a stored update holds NaN or Inf), or the "
                    "sum overflowed float32. Re-read the stored updates with flcore.parameters.load_file to "
                    "find it."
                )

    def result(self) -> Parameters:
        """Return the weighted mean as new float32 arrays in spec order.

        The mean is divided straight into the returned arrays: besides the accumulator, one model of memory.
        If an update was added with ``add_file(..., verified=True)``, the sum is checked for NaN and Inf
        first (one read of the accumulator).

        Raises
        ------
        FlcoreError
            If no update has been added, or the sum is not finite (a stored update added with
            ``verified=True`` held NaN or Inf).
        """
        if self._count == 0:
            raise FlcoreError("Cannot average zero updates; add at least one update first.")
        if self._unchecked:
            self._check_accumulator_finite()
            self._unchecked = False
        total = np.float32(self._total_weight)
        result: Parameters = {}
        for tensor in self._spec.tensors:
            start, stop = self._offsets[tensor.name]
            out = np.empty(tensor.shape, dtype=np.float32)
            np.divide(self._accumulator[start:stop].reshape(tensor.shape), total, out=out)
            result[tensor.name] = out
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

"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS, Section 4).

For ``n`` updates of which at most ``f`` are Byzantine, with ``n >= 2f + 3`` (the paper's ``2f + 2 < n``),
update ``i`` scores ``s(i) = sum_{i -> j} ||V_i - V_j||^2`` over its ``n - f - 2`` nearest neighbours
(Section 4, definition of Krum). Krum returns the update of smallest score; Multi-Krum averages the ``m``
updates of smallest scores (Section 4, "Multi-Krum"; uniformly as in the paper, or by ``num_examples``).

All pairwise squared distances come from ONE Gram matrix ``G = X X^T`` (``d_ij = G_ii + G_jj - 2 G_ij``),
which is additive over coordinate chunks, so workers each return the ``(n, n)`` Gram of their chunk
(:meth:`Krum.chunk_statistics`) and the server sums them before selecting (:meth:`Krum.finalize_statistics`).

Invariants: each chunk's Gram is float32 matrix products (BLAS ``sgemm``) of cache-sized column blocks
(:data:`GRAM_BLOCK`) of the chunk translated by a robust centre (:meth:`Krum.chunk_statistics`), so neither a
common component shared by all clients nor a huge attacker update makes honest distances cancel; a block
whose float32 Gram is not finite (values beyond ~1e19) is redone in float64; the block Grams are summed in
float64, so the float32 error is that of one block (relative ~1e-7 of the centred norms, which are of the
order of the distances), and scores agree with a float64 brute force to ~1e-6 relative; ties in score are
broken by the lower update index; the selection depends only on the multiset of updates, not on their
order, up to rounding at near-exact ties.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from flcore.errors import FlcoreError
from flcore.parameters import Parameters
from flcore.strategies.base import (
    SERVER_LEARNING_RATE,
    AggregationAlgorithm,
    Hyperparameter,
    NotEnoughUpdates,
    ServerState,
    Strategy,
    sgd_step,
)
from flcore.strategies.median import coordinate_median, middle_value

__all__ = ["GRAM_BLOCK", "Krum", "KrumSelection", "MultiKrum", "krum_scores"]

GRAM_BLOCK = 8192
"""Most columns per float32 Gram block (a chunk is cut into equal blocks of at most this width): float32
accumulation runs over at most 8192 terms before the float64 sum across blocks."""


@dataclass(frozen=True)
class KrumSelection:
    """Which updates Krum selected and with which coefficients (the context of :meth:`Krum.combine_chunk`).

    Parameters
    ----------
    selected : tuple of int
        Indices of the selected updates, ascending.
    coefficients : tuple of float
        One coefficient per update (zero for the rejected ones), summing to 1.
    scores : tuple of float
        Krum score of every update.
    """

    selected: tuple[int, ...]
    coefficients: tuple[float, ...]
    scores: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (floats round-trip exactly through ``json``)."""
        return {
            "selected": list(self.selected),
            "coefficients": list(self.coefficients),
            "scores": list(self.scores),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KrumSelection:
        """Rebuild a selection from :meth:`to_json` output (e.g. passed between Celery tasks)."""
        try:
            return cls(
                tuple(int(i) for i in data["selected"]),
                tuple(float(c) for c in data["coefficients"]),
                tuple(float(s) for s in data["scores"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FlcoreError(f"Invalid Krum selection {data!r}: {exc}.") from None


def krum_scores(gram: npt.NDArray[np.float64], num_malicious: int) -> npt.NDArray[np.float64]:
    """Return every update's Krum score from the Gram matrix of the updates.

    ``d_ij = G_ii + G_jj - 2 G_ij`` (clamped at 0 against rounding), the diagonal excluded, and
    ``s(i)`` the sum of the ``n - f - 2`` smallest ``d_ij`` of row ``i`` (Blanchard et al. 2017, Section 4).

    Raises
    ------
    NotEnoughUpdates
        If ``n < 2f + 3``.
    """
    n = gram.shape[0]
    _check_enough(n, num_malicious)
    diagonal = np.diag(gram)
    distances = diagonal[:, None] + diagonal[None, :] - 2.0 * gram
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, np.inf)
    neighbours = n - num_malicious - 2
    nearest = np.partition(distances, neighbours - 1, axis=1)[:, :neighbours]
    scores: npt.NDArray[np.float64] = nearest.sum(axis=1)
    return scores


def _centre(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The coordinate-wise median of ``rows`` as float32: the middle value itself for an odd count."""
    if rows.shape[0] % 2 == 1:
        return middle_value(rows)
    return coordinate_median(rows).astype(np.float32)


def _check_enough(num_updates: int, num_malicious: int) -> None:
    if num_updates < 2 * num_malicious + 3:
        raise NotEnoughUpdates(
            f"Krum with num_malicious f={num_malicious} needs at least 2f + 3 = {2 * num_malicious + 3} "
            f"updates; got n={num_updates}."
        )


@dataclass(frozen=True)
class Krum(Strategy):
    """Krum: the single update closest to its ``n - f - 2`` nearest neighbours (Blanchard et al. 2017).

    Parameters
    ----------
    num_malicious : int
        ``f >= 0``, the number of Byzantine clients tolerated. Required: Krum's guarantee is stated for a
        given ``f`` and there is no neutral default (Flower's 0 gives no robustness).
    server_learning_rate : float
        ``eta > 0`` of the server step ``x + eta * Delta``; default 1.0.
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.KRUM
    streaming: ClassVar[bool] = False
    needs_statistics: ClassVar[bool] = True
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter("num_malicious", "int", minimum=0),
        SERVER_LEARNING_RATE,
    )

    num_malicious: int
    server_learning_rate: float = 1.0

    def check_num_updates(self, num_updates: int) -> None:
        """Raise :class:`NotEnoughUpdates` unless ``n >= 2f + 3``."""
        _check_enough(num_updates, self.num_malicious)

    def num_selected_for(self, num_updates: int) -> int:
        """Return how many updates are averaged: 1 for Krum."""
        return 1

    def selection_weights(self, weights: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Return the weights the selected updates are averaged with (uniform for Krum)."""
        return np.ones_like(weights, dtype=np.float64)

    def chunk_statistics(self, matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Return the ``(n, n)`` float64 Gram matrix of this chunk's rows after a robust translation.

        The rows are shifted by the coordinate-wise median of the first ``min(n, 2f + 1)`` rows, which
        holds at most ``f`` Byzantine rows and so lies within the honest values of every coordinate: honest
        rows stay small however large an attacker's update is, and ``G_ii + G_jj - 2 G_ij`` does not cancel.
        Distances are translation invariant, so the shift changes nothing else. Column block by column block
        (:data:`GRAM_BLOCK`): the centred block in float32, its Gram through BLAS ``sgemm`` in float32
        (float64 if that overflowed), summed in float64.
        """
        n, columns = matrix.shape
        gram = np.zeros((n, n), dtype=np.float64)
        reference_rows = min(n, 2 * self.num_malicious + 1)
        width = -(-columns // max(1, -(-columns // GRAM_BLOCK)))  # equal blocks, none a thin remainder
        buffer = np.empty((n, min(columns, width)), dtype=np.float32)
        for start in range(0, columns, max(width, 1)):
            block = matrix[:, start : start + width]
            centred = buffer[:, : block.shape[1]]
            centre = _centre(block[:reference_rows])
            np.subtract(block, centre, out=centred)
            with np.errstate(over="ignore", invalid="ignore"):
                part = centred @ centred.T
            if np.isfinite(part).all():
                gram += part
            else:  # float32 overflow (|values| beyond ~1e19): this block in float64
                wide = block.astype(np.float64)
                wide -= centre
                gram += wide @ wide.T
        return gram

    def finalize_statistics(
        self, statistics: npt.NDArray[np.float64], weights: npt.NDArray[np.float64]
    ) -> KrumSelection:
        """Select the updates of smallest score from the summed Gram matrix; see :func:`krum_scores`."""
        n = statistics.shape[0]
        scores = krum_scores(statistics, self.num_malicious)
        count = self.num_selected_for(n)
        order = np.argsort(scores, kind="stable")  # ties: lower index first
        selected = np.sort(order[:count])
        chosen = self.selection_weights(np.asarray(weights, dtype=np.float64))[selected]
        coefficients = np.zeros(n, dtype=np.float64)
        coefficients[selected] = chosen / chosen.sum()
        return KrumSelection(
            tuple(int(i) for i in selected),
            tuple(float(c) for c in coefficients),
            tuple(float(s) for s in scores),
        )

    def combined_rows(self, context: Any) -> tuple[int, ...] | None:
        """Return the selected rows: :meth:`combine_chunk` reads no other."""
        return context.selected if isinstance(context, KrumSelection) else None

    def combine_chunk(
        self, matrix: npt.NDArray[np.float32], weights: npt.NDArray[np.float64], context: Any = None
    ) -> npt.NDArray[np.float32]:
        """Return the weighted sum of the selected rows; ``context`` is a :class:`KrumSelection`."""
        if not isinstance(context, KrumSelection):
            raise FlcoreError("Krum.combine_chunk needs the KrumSelection returned by finalize_statistics.")
        if len(context.coefficients) != matrix.shape[0]:
            raise FlcoreError(
                f"The Krum selection covers {len(context.coefficients)} updates but the chunk has "
                f"{matrix.shape[0]} rows."
            )
        rows = list(context.selected)
        coefficients = np.asarray(context.coefficients, dtype=np.float64)[rows]
        return np.asarray(coefficients @ matrix[rows].astype(np.float64), dtype=np.float32)

    def combination_metrics(
        self, weights: npt.NDArray[np.float64], scales: npt.NDArray[np.float64], context: Any
    ) -> dict[str, float]:
        """Return ``num_selected`` and the smallest and largest Krum scores."""
        if not isinstance(context, KrumSelection):
            return {}
        return {
            "num_selected": float(len(context.selected)),
            "min_score": float(min(context.scores)),
            "max_score": float(max(context.scores)),
        }

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Return ``base + eta * delta``."""
        self._begin_apply(base, delta, state)
        return sgd_step(base, delta, self.server_learning_rate), ServerState({}, self._next_scalars(state))


@dataclass(frozen=True)
class MultiKrum(Krum):
    """Multi-Krum: the mean of the ``m`` updates of smallest Krum score (Blanchard et al. 2017, Section 4).

    Parameters
    ----------
    num_malicious : int
        ``f >= 0``; required (see :class:`Krum`).
    num_selected : int or None
        ``m`` with ``1 <= m <= n - f`` (more would necessarily admit an attacker when ``f`` are present);
        ``None`` (default) means ``m = n - f``, the paper's choice.
    weighting : {"uniform", "num_examples"}
        How the selected updates are averaged; default ``"uniform"`` as in the paper.
    server_learning_rate : float
        ``eta > 0``; default 1.0.
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.MULTIKRUM
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter("num_malicious", "int", minimum=0),
        Hyperparameter("num_selected", "int", None, minimum=1, nullable=True),
        Hyperparameter("weighting", "str", "uniform", choices=("uniform", "num_examples")),
        SERVER_LEARNING_RATE,
    )

    num_selected: int | None = None
    weighting: str = "uniform"

    def check_num_updates(self, num_updates: int) -> None:
        """Raise :class:`NotEnoughUpdates` unless ``n >= 2f + 3`` and ``num_selected <= n - f``."""
        _check_enough(num_updates, self.num_malicious)
        if self.num_selected is not None and self.num_selected > num_updates - self.num_malicious:
            raise NotEnoughUpdates(
                f"Multi-Krum with num_selected m={self.num_selected} and num_malicious "
                f"f={self.num_malicious} needs n >= m + f = {self.num_selected + self.num_malicious} "
                f"updates; got n={num_updates}."
            )

    def num_selected_for(self, num_updates: int) -> int:
        """Return ``m``, or ``n - f`` when unset."""
        self.check_num_updates(num_updates)
        return self.num_selected if self.num_selected is not None else num_updates - self.num_malicious

    def selection_weights(self, weights: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Return ``num_examples`` weights or uniform ones, per :attr:`weighting`."""
        if self.weighting == "num_examples":
            return weights
        return np.ones_like(weights, dtype=np.float64)

"""Split aggregation: rules that need all updates at once, on large models, across Celery workers.

The flat coordinate range ``[0, P)`` of a round's updates is cut into chunks, one Celery task each (queue
``aggregation``, parallel up to the worker concurrency). Rules that need a global statistic first (Krum,
Multi-Krum: the Gram matrix of the updates, which is a sum over chunks) run two chords:

    statistics(chunk) for each chunk -> finalize (sum, select) -> combine(chunk) for each chunk -> join

coordinate-wise rules (median, trimmed mean) run only the second. Every task takes ids and ranges (JSON);
chunk results travel as safetensors blobs, never pickles. The join rebuilds the pseudo-gradient and calls
``trainings.services.round_finish``, which is idempotent like the in-process path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from celery import chord
from django.conf import settings

from fedsite.logs import log_event
from flcore.parameters import ParameterSpec, from_bytes, iter_file_tensors, to_bytes, unflatten
from flcore.stacked_files import map_files_stacked
from flcore.strategies import Strategy
from flcore.strategies.base import FlatLayout, coordinate_chunks, default_chunk_size
from trainings.models import ClientUpdate, Round
from versioning.blobs import blob_local_path, blob_read, blob_save

logger = logging.getLogger("trainings.chunked")

CHUNKS_PER_WORKER = 4


def _round_context(round_id: int) -> tuple[Round, Strategy, ParameterSpec, list[ClientUpdate]]:
    from trainings.configuration import TrainingConfiguration
    from trainings.services import round_updates  # services imports this module lazily too

    round_ = Round.objects.select_related("training").get(pk=round_id)
    strategy = TrainingConfiguration.from_dict(round_.training.config).strategy()
    spec = ParameterSpec.from_json(round_.training.parameter_spec)
    updates = round_updates(round_)
    return round_, strategy, spec, updates


def chunk_ranges(num_parameters: int, num_updates: int, workers: int) -> list[tuple[int, int]]:
    """Chunks of at least the cache-sized default, about ``CHUNKS_PER_WORKER`` per worker."""
    target = max(default_chunk_size(num_updates), -(-num_parameters // max(1, workers * CHUNKS_PER_WORKER)))
    return list(coordinate_chunks(num_parameters, target))


def _views(spec: ParameterSpec, updates: list[ClientUpdate]) -> Sequence[Mapping[str, Any]]:
    """Every update's tensors: zero-copy views of the memory-mapped blob when it is a local file.

    When every blob is a local file of the same layout (the usual round), they are mapped side by side as
    the rows of one matrix (:func:`flcore.stacked_files.map_files_stacked`), so a chunk of all of them is
    gathered in one copy per tensor instead of one per update and tensor.
    """
    paths = [blob_local_path(update.blob_name) for update in updates]
    local = [path for path in paths if path is not None]
    if local and len(local) == len(paths):
        stacked = map_files_stacked(local)
        if stacked is not None:
            return stacked
    views: list[Mapping[str, Any]] = []
    for update, path in zip(updates, paths, strict=True):
        if path is not None:
            views.append(dict(iter_file_tensors(path)))
        else:
            views.append(from_bytes(blob_read(update.blob_name), spec=spec, max_bytes=update.size_bytes))
    return views


def _scales(strategy: Strategy, updates: list[ClientUpdate]) -> Any:
    return np.array([strategy.update_scale(u.update_norm) for u in updates], dtype=np.float32)


def _weights(strategy: Strategy, updates: list[ClientUpdate]) -> Any:
    return np.array(
        [strategy.update_weight(u.num_examples, u.update_norm) for u in updates], dtype=np.float64
    )


def chunk_statistics(*, round_id: int, start: int, stop: int) -> list[float]:
    """This chunk's share of the rule's global statistic (Krum: a partial Gram matrix), flattened."""
    _, strategy, spec, updates = _round_context(round_id)
    # Gathered from the mapped blobs one cache-sized chunk at a time (Strategy.range_statistics).
    statistics = strategy.range_statistics(
        FlatLayout(spec), _views(spec, updates), start, stop, _scales(strategy, updates)
    )
    return [float(x) for x in statistics.ravel()]


def finalize_statistics(*, round_id: int, parts: list[list[float]]) -> dict[str, Any] | None:
    """Sum the chunks' statistics and let the rule decide (Krum: which updates are selected)."""
    _, strategy, _, updates = _round_context(round_id)
    n = len(updates)
    total = np.sum([np.asarray(part, dtype=np.float64).reshape(n, n) for part in parts], axis=0)
    context = strategy.finalize_statistics(total, _weights(strategy, updates))
    return _context_to_json(context)


def chunk_combine(*, round_id: int, start: int, stop: int, context: dict[str, Any] | None) -> str:
    """Combine one chunk and store it as a blob; return the blob name."""
    _, strategy, spec, updates = _round_context(round_id)
    # Cache-sized chunks of the mapped blobs, only the rows the rule reads (Strategy.range_combine).
    result = strategy.range_combine(
        FlatLayout(spec),
        _views(spec, updates),
        start,
        stop,
        _weights(strategy, updates),
        _context_from_json(context),
        _scales(strategy, updates),
    )
    name, _ = blob_save(
        to_bytes(
            {"chunk": np.ascontiguousarray(result, dtype=np.float32)},
            metadata={"round_id": str(round_id), "start": str(start), "stop": str(stop)},
        )
    )
    return name


def join_chunks(
    *,
    round_id: int,
    chunks: list[tuple[int, int]],
    blob_names: list[str],
    context: dict[str, Any] | None,
    started: float,
) -> str:
    """Stitch the combined chunks into the pseudo-gradient and finish the round."""
    from trainings.services import round_finish

    _, strategy, spec, updates = _round_context(round_id)
    flat = np.empty(spec.num_parameters, dtype=np.float32)
    for (start, stop), name in zip(chunks, blob_names, strict=True):
        part = from_bytes(blob_read(name), max_bytes=(stop - start) * 4 + 4096)["chunk"]
        if part.shape != (stop - start,):
            raise ValueError(f"chunk [{start}, {stop}) has shape {part.shape}")
        flat[start:stop] = part
    metrics = {"num_updates": float(len(updates)), "num_chunks": float(len(chunks))}
    weights = _weights(strategy, updates)
    scales = np.array([strategy.update_scale(u.update_norm) for u in updates], dtype=np.float64)
    metrics.update(strategy.combination_metrics(weights, scales, _context_from_json(context)))
    return round_finish(
        round_id=round_id, delta=unflatten(flat, spec), combination_metrics=metrics, started=started
    )


def _context_to_json(context: Any) -> dict[str, Any] | None:
    if context is None:
        return None
    if hasattr(context, "to_json"):
        return {"type": type(context).__name__, "data": context.to_json()}
    raise TypeError(f"cannot send a {type(context).__name__} between workers")


def _context_from_json(data: dict[str, Any] | None) -> Any:
    if data is None:
        return None
    from flcore.strategies.krum import KrumSelection

    known = {"KrumSelection": KrumSelection}
    return known[data["type"]].from_json(data["data"])


def dispatch_chunked_aggregation(*, round_id: int, started: float) -> None:
    """Start the chord(s) of a split aggregation on the ``aggregation`` queue."""
    from trainings import tasks

    _, strategy, spec, updates = _round_context(round_id)
    strategy.check_num_updates(len(updates))
    chunks = chunk_ranges(spec.num_parameters, len(updates), settings.CELERY_WORKER_CONCURRENCY)
    log_event(logger, "aggregation_split", round_id=round_id, chunks=len(chunks), updates=len(updates))
    if strategy.needs_statistics:
        header = [tasks.aggregate_chunk_statistics.s(round_id, start, stop) for start, stop in chunks]
        callback = tasks.aggregate_chunk_finalize.s(round_id, chunks, started)
        chord(header)(callback.on_error(tasks.aggregate_chunk_failed.s(round_id)))
    else:
        start_combine(round_id=round_id, chunks=chunks, context=None, started=started)


def start_combine(
    *, round_id: int, chunks: list[tuple[int, int]], context: dict[str, Any] | None, started: float
) -> None:
    from trainings import tasks

    header = [tasks.aggregate_chunk_combine.s(round_id, start, stop, context) for start, stop in chunks]
    callback = tasks.aggregate_chunk_join.s(round_id, chunks, context, started)
    chord(header)(callback.on_error(tasks.aggregate_chunk_failed.s(round_id)))

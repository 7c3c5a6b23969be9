"""The server's aggregation path from stored update blobs, without Django, for the benchmarks.

``trainings`` needs Django and a database, so the benchmarks cannot import it; this module makes the same
flcore calls, in the same order, on safetensors blobs in a directory:

- a streaming rule (FedAvg): ``trainings.services`` adds every blob with
  ``FedAvgAccumulator.add_file(path, weight, scale=..., verified=True)`` and calls ``result()``;
- a chunked rule (Krum, Multi-Krum, median, trimmed mean): ``trainings.chunked`` cuts ``[0, P)`` with
  :func:`chunk_ranges` (the same formula) into one Celery task per range; each task maps every blob
  (side by side as one matrix, ``map_files_stacked``, else one by one, ``iter_file_tensors``) and runs
  ``Strategy.range_statistics`` on its range (cache-sized chunks gathered from the mappings; sent back
  as a JSON list of floats), the finalize step sums them and calls
  ``finalize_statistics`` (the context travels as JSON), then each task maps the blobs again and runs
  ``Strategy.range_combine`` (only the rows ``combined_rows`` names; the result travels as a safetensors
  blob), and the join stitches the chunks. Here the tasks of each chord run on ``workers`` threads of this
  process (:func:`flcore.strategies.base.parallel_map`) instead of ``workers`` Celery processes: the same
  parallelism (numpy releases the GIL), none of Celery's or Redis's overhead (measured separately in
  ``bench/round_overhead.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flcore.parameters import (
    Parameters,
    ParameterSpec,
    from_bytes,
    iter_file_tensors,
    to_bytes,
    unflatten,
)
from flcore.stacked_files import map_files_stacked
from flcore.strategies import Strategy
from flcore.strategies.base import FlatLayout, coordinate_chunks, default_chunk_size, parallel_map
from flcore.strategies.krum import KrumSelection

CHUNKS_PER_WORKER = 4  # trainings.chunked.CHUNKS_PER_WORKER


def chunk_ranges(num_parameters: int, num_updates: int, workers: int) -> list[tuple[int, int]]:
    """``trainings.chunked.chunk_ranges``: at least the cache-sized default, ~4 chunks per worker."""
    target = max(default_chunk_size(num_updates), -(-num_parameters // max(1, workers * CHUNKS_PER_WORKER)))
    return list(coordinate_chunks(num_parameters, target))


def write_blobs(deltas: Sequence[Parameters], directory: str | os.PathLike[str]) -> list[Path]:
    """Write every delta as the server stores an upload (``flcore.parameters.to_bytes``); return the paths."""
    paths = []
    for i, delta in enumerate(deltas):
        path = Path(directory) / f"update-{i:04d}.safetensors"
        path.write_bytes(to_bytes(delta))
        paths.append(path)
    return paths


def combine_from_blobs(
    strategy: Strategy,
    spec: ParameterSpec,
    paths: Sequence[Path],
    num_examples: Sequence[int],
    *,
    workers: int,
) -> Parameters:
    """The pseudo-gradient the server computes from these stored (already validated) blobs."""
    norms = [0.0] * len(paths)  # the rules benchmarked ignore the stored norms
    weights = np.array([strategy.update_weight(k, s) for k, s in zip(num_examples, norms, strict=True)])
    if strategy.streaming:
        accumulator = strategy.accumulator(spec)
        for path, weight in zip(paths, weights, strict=True):
            accumulator.add_file(path, float(weight), scale=1.0, verified=True)
        return accumulator.result()
    strategy.check_num_updates(len(paths))
    ranges = chunk_ranges(spec.num_parameters, len(paths), workers)
    layout = FlatLayout(spec)

    def views() -> Sequence[Mapping[str, Any]]:
        # Each task maps every blob: side by side as one matrix when they share a layout, as
        # trainings.chunked._views does, else one by one.
        stacked = map_files_stacked(paths)
        if stacked is not None:
            return stacked
        return [dict(iter_file_tensors(path)) for path in paths]

    context: Any = None
    if strategy.needs_statistics:
        n = len(paths)

        def statistics(bounds: tuple[int, int]) -> list[float]:
            return [float(x) for x in strategy.range_statistics(layout, views(), *bounds).ravel()]

        parts = list(parallel_map(statistics, ranges, workers))
        total = np.sum([np.asarray(part, dtype=np.float64).reshape(n, n) for part in parts], axis=0)
        selection = strategy.finalize_statistics(total, weights)
        context = KrumSelection.from_json(selection.to_json())

    def combine(bounds: tuple[int, int]) -> bytes:
        result = strategy.range_combine(layout, views(), *bounds, weights, context)
        return to_bytes({"chunk": np.ascontiguousarray(result, dtype=np.float32)})

    blobs = list(parallel_map(combine, ranges, workers))
    flat = np.empty(spec.num_parameters, dtype=np.float32)
    for (start, stop), blob in zip(ranges, blobs, strict=True):
        flat[start:stop] = from_bytes(blob, max_bytes=(stop - start) * 4 + 4096)["chunk"]
    return unflatten(flat, spec)

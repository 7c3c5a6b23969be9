"""Shared by the micro-benchmarks that time two implementations of one step side by side
(``bench/upload_validation.py``, ``bench/serialise.py``): a 784-h-10 MLP update, the alternated timing
and the printed table."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt


def parse_args(doc: str) -> argparse.Namespace:
    """``--params``, ``--reps`` and ``--calls``, with the script's docstring as the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 parameters in the update")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions per side")
    parser.add_argument("--calls", type=int, default=50, help="calls timed per repetition")
    return parser.parse_args()


def mlp_update(params: int, seed: int = 0) -> dict[str, npt.NDArray[np.float32]]:
    """A 784-h-10 MLP's tensors with about ``params`` float32 parameters, standard normal values."""
    rng = np.random.default_rng(seed)
    hidden = max(1, params // 800)
    return {
        "layer0.weight": rng.standard_normal((784, hidden), dtype=np.float32),
        "layer0.bias": rng.standard_normal(hidden, dtype=np.float32),
        "layer1.weight": rng.standard_normal((hidden, 10), dtype=np.float32),
        "layer1.bias": rng.standard_normal(10, dtype=np.float32),
    }


def time_alternated(sides: dict[str, Callable[[], object]], reps: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each side, one figure per repetition: the sides alternate, ``calls`` each."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, side in sides.items():
            started = time.perf_counter()
            for _ in range(calls):
                side()
            times[name].append((time.perf_counter() - started) / calls)
    return times


def print_table(title: str, times: dict[str, list[float]], verb: str) -> None:
    """The table of medians (minima), then the second side's median as a multiple of the first's."""
    print(title)
    print()
    print("| side | ms per update |")
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {1e3 * statistics.median(values):.2f} ({1e3 * min(values):.2f}) |")
    before, now = (statistics.median(values) for values in times.values())
    print()
    print(f"{verb} {now / before:.2f}x the time of the first (medians)")

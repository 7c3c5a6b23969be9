"""fedsite's robust aggregation rules against Flower's reference functions, same inputs, same process.

For every rule and every N, a fresh worker process (``--worker``) draws N client deltas of an MLP-shaped
model (784-h-h-10, 6 tensors, P ~ 1M float32) and then, with the SAME arrays (no copies), times:

- fedsite: ``build_strategy(algorithm, hyperparameters).combine(deltas, num_examples)``, exactly what the
  server runs for a synchronous round (chunked path for Krum, Multi-Krum, median and trimmed mean; the
  streaming ``FedAvgAccumulator`` for FedAvg);
- Flower: the function its strategy calls, from ``flwr.server.strategy.aggregate`` on
  ``[(list_of_layer_arrays, num_examples), ...]``: ``aggregate`` (FedAvg), ``aggregate_krum`` (Krum with
  ``to_keep=0``, Multi-Krum with ``to_keep=m``), ``aggregate_median``, ``aggregate_trimmed_avg``.

Both are called once first (their results are compared: max |fedsite - Flower| over all coordinates, must be
<= 1e-5), then ``--reps`` timed repetitions alternate the order (fedsite first on even reps, Flower first on
odd ones), then one untimed call of each runs under ``tracemalloc``: its peak is the heap the call needed on
top of the inputs (numpy reports its buffers to tracemalloc), in units of the model size P * 4 bytes.
The workers run one after another (never two at once on the 2 cores), with one BLAS thread
(``OPENBLAS_NUM_THREADS=1``) for both sides.

Parameters are aligned so that both sides compute the same definition (see ``RULES``):

- Krum: the same ``f``; Flower scores with ``max(1, n - f - 2)`` neighbours (``argsort`` of each row,
  skipping position 0 as "self"), fedsite with ``n - f - 2`` and requires ``n >= 2f + 3`` (met here). Both
  pick the lowest index on an exact tie (``np.argmin``; stable ``argsort``).
- Multi-Krum: Flower averages the ``to_keep`` best updates WEIGHTED BY num_examples (``aggregate``);
  fedsite's default is the paper's uniform mean, so the fedsite side uses ``weighting="num_examples"`` and
  ``num_selected = to_keep = n - f``. Flower's tie order at the selection boundary is an unstable
  ``argsort``; with continuous random data there are no ties.
- Trimmed mean: Flower cuts ``int(beta * n)`` per end, fedsite ``floor(beta * n + 1e-9)``; they differ
  only where ``beta * n`` lands just below an integer in floating point (e.g. 0.29 * 100 = 28.999...: Flower
  trims 28, fedsite 29). ``beta = 0.2`` (the attacker fraction here) gives ``k = 4`` and ``20`` on both.
- Median: both average the two middle values for even n; Flower in float32, fedsite in float64.

The data: honest deltas ``g + s_i * e_i`` (``g``, ``e_i`` standard normal, ``s_i`` in [0.5, 1.5]) and
``f = N // 5`` attackers ``g + 5 + e_i``; ``num_examples`` uniform in [10, 1000).

Usage::

    .venv-bench/bin/python bench/strategies_vs_flower.py --sizes 20,100 --reps 5

(``.venv-bench`` holds ``requirements/agent.txt`` plus ``bench/requirements-flower.txt``: Flower is never a
dependency of fedsite.) ``BENCH_FLCORE_ROOT=DIR`` imports ``flcore`` from ``DIR`` instead of this checkout,
to measure an older revision in the same way.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One BLAS thread on both sides (set before numpy is imported; the workers inherit it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# BENCH_FLCORE_ROOT: import flcore from another tree (e.g. an older revision) for before/after comparisons.
FLCORE_ROOT = Path(os.environ.get("BENCH_FLCORE_ROOT", REPO_ROOT)).resolve()
if str(FLCORE_ROOT) not in sys.path:
    sys.path.insert(0, str(FLCORE_ROOT))

from flcore.parameters import ParameterSpec, TensorSpec  # noqa: E402
from flcore.strategies.registry import build_strategy  # noqa: E402

INPUT_DIM = 784
NUM_CLASSES = 10
TOLERANCE = 1e-5
RULES = ("fedavg", "krum", "multikrum", "median", "trimmed_mean")
TRIM_FRACTION = 0.2
TARGETS = {"krum": 3.0, "median": 2.0, "trimmed_mean": 2.0}
"""Required speed-up over Flower at the largest N (ratio of medians and ratio of minima)."""


# ----------------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------------
def mlp_spec(num_parameters: int) -> ParameterSpec:
    """An MLP 784-h-h-10 (6 tensors) whose hidden width h makes the count closest to ``num_parameters``."""

    def count(hidden: int) -> int:
        return INPUT_DIM * hidden + hidden + hidden * hidden + hidden + hidden * NUM_CLASSES + NUM_CLASSES

    b = INPUT_DIM + NUM_CLASSES + 2
    root = (-b + math.sqrt(b * b + 4 * max(num_parameters - NUM_CLASSES, 0))) / 2
    hidden = min((max(1, math.floor(root)), math.ceil(root)), key=lambda h: abs(count(h) - num_parameters))
    return ParameterSpec(
        (
            TensorSpec("layer0.weight", (hidden, INPUT_DIM)),
            TensorSpec("layer0.bias", (hidden,)),
            TensorSpec("layer1.weight", (hidden, hidden)),
            TensorSpec("layer1.bias", (hidden,)),
            TensorSpec("layer2.weight", (NUM_CLASSES, hidden)),
            TensorSpec("layer2.bias", (NUM_CLASSES,)),
        )
    )


def make_deltas(
    spec: ParameterSpec, n: int, num_malicious: int, seed: int
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """N deltas: ``n - f`` honest ``g + s_i e_i`` and ``f`` attackers ``g + 5 + e_i``; and num_examples."""
    rng = np.random.default_rng(seed)
    common = {t.name: rng.standard_normal(t.shape, dtype=np.float32) for t in spec.tensors}
    scales = rng.uniform(0.5, 1.5, size=n)
    attackers = set(rng.choice(n, size=num_malicious, replace=False).tolist())
    deltas: list[dict[str, np.ndarray]] = []
    for i in range(n):
        delta = {}
        for t in spec.tensors:
            noise = rng.standard_normal(t.shape, dtype=np.float32)
            if i in attackers:
                noise += np.float32(5.0)
            else:
                noise *= np.float32(scales[i])
            noise += common[t.name]
            delta[t.name] = noise
        deltas.append(delta)
    num_examples = [int(k) for k in rng.integers(10, 1000, size=n)]
    return deltas, num_examples


def rule_setup(
    rule: str, n: int, deltas: list[dict[str, np.ndarray]], num_examples: list[int]
) -> tuple[Callable[[], list[np.ndarray]], Callable[[], list[np.ndarray]], dict[str, Any]]:
    """Return the fedsite call, the Flower call (both giving the layers in spec order) and the settings."""
    from flwr.server.strategy import aggregate as flower

    names = list(deltas[0])
    results = [([d[name] for name in names], k) for d, k in zip(deltas, num_examples, strict=True)]
    f = n // 5
    if rule == "fedavg":
        params: dict[str, Any] = {}
        strategy = build_strategy("fedavg", params)
        theirs: Callable[[], list[np.ndarray]] = lambda: flower.aggregate(results)  # noqa: E731
    elif rule == "krum":
        params = {"num_malicious": f}
        strategy = build_strategy("krum", params)
        theirs = lambda: flower.aggregate_krum(results, num_malicious=f, to_keep=0)  # noqa: E731
    elif rule == "multikrum":
        params = {"num_malicious": f, "num_selected": n - f, "weighting": "num_examples"}
        strategy = build_strategy("multikrum", params)
        theirs = lambda: flower.aggregate_krum(results, num_malicious=f, to_keep=n - f)  # noqa: E731
    elif rule == "median":
        params = {}
        strategy = build_strategy("median", params)
        theirs = lambda: flower.aggregate_median(results)  # noqa: E731
    elif rule == "trimmed_mean":
        params = {"trim_fraction": TRIM_FRACTION}
        strategy = build_strategy("trimmed_mean", params)
        flower_cut = int(TRIM_FRACTION * n)
        ours_cut = strategy.num_trimmed(n)  # type: ignore[attr-defined]
        if flower_cut != ours_cut:
            raise SystemExit(f"trimmed mean: Flower cuts {flower_cut}, fedsite {ours_cut} at n={n}.")
        params = {**params, "cut_per_end": ours_cut}
        theirs = lambda: flower.aggregate_trimmed_avg(results, proportiontocut=TRIM_FRACTION)  # noqa: E731
    else:
        raise SystemExit(f"unknown rule {rule!r}")

    def ours() -> list[np.ndarray]:
        combined, _ = strategy.combine(deltas, num_examples)
        return [combined[name] for name in names]

    return ours, theirs, params


# ----------------------------------------------------------------------------------------------------------
# Worker: one rule and one N, both implementations interleaved
# ----------------------------------------------------------------------------------------------------------
def heap_peak(call: Callable[[], Any]) -> int:
    """Peak bytes traced by ``tracemalloc`` during one call, above what was allocated before it."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    result = call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return peak - before


def worker_main(args: argparse.Namespace) -> None:
    spec = mlp_spec(args.params)
    n = args.n
    deltas, num_examples = make_deltas(spec, n, n // 5, args.seed + n)
    ours, theirs, params = rule_setup(args.worker, n, deltas, num_examples)

    # 1. One call each (also the warm-up): agreement.
    mine = ours()
    reference = theirs()
    diff = max(
        float(np.max(np.abs(a.astype(np.float64) - np.asarray(b, dtype=np.float64).reshape(a.shape))))
        for a, b in zip(mine, reference, strict=True)
    )
    dtypes = sorted({str(np.asarray(b).dtype) for b in reference})
    del mine, reference
    gc.collect()

    # 2. Timed repetitions, order alternating.
    times: dict[str, list[float]] = {"fedsite": [], "flower": []}
    calls = {"fedsite": ours, "flower": theirs}
    for rep in range(args.reps):
        order = ("fedsite", "flower") if rep % 2 == 0 else ("flower", "fedsite")
        for side in order:
            gc.collect()
            started = time.perf_counter()
            result = calls[side]()
            times[side].append(time.perf_counter() - started)
            del result

    # 3. Untimed heap peaks.
    peaks = {side: heap_peak(call) for side, call in calls.items()}
    print(
        json.dumps(
            {
                "rule": args.worker,
                "n": n,
                "params": params,
                "times": times,
                "heap_peak": peaks,
                "model_bytes": spec.nbytes,
                "max_abs_diff": diff,
                "flower_dtypes": dtypes,
            }
        )
    )


def run_worker(rule: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        rule,
        "--n",
        str(n),
        "--reps",
        str(args.reps),
        "--params",
        str(args.params),
        "--seed",
        str(args.seed),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"worker {rule} N={n} failed with exit code {completed.returncode}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------------
def machine_line() -> str:
    from importlib.metadata import version

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, numpy {np.__version__}, "
        f"flwr {version('flwr')}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,100", help="comma-separated numbers of updates N")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated subset of {RULES}")
    parser.add_argument("--params", type=int, default=1_000_000, help="target parameter count P")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=RULES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rules = [r for r in args.rules.split(",") if r.strip()]
    spec = mlp_spec(args.params)
    hidden = spec.tensors[0].shape[0]
    print(f"machine: {machine_line()}")
    print(f"flcore: {Path(sys.modules['flcore'].__file__ or '').parent}")
    print(
        f"model: MLP 784-{hidden}-{hidden}-10, {len(spec.tensors)} tensors, P = {spec.num_parameters:,} "
        f"float32; N = {sizes}, f = N // 5; {args.reps} interleaved reps per side, one worker process "
        "per (rule, N)"
    )
    rows = []
    for n in sizes:
        for rule in rules:
            row = run_worker(rule, n, args)
            rows.append(row)
            print(f"  done {rule} N={n} ({row['params']})", file=sys.stderr)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print()
    print(
        "| rule | N | fedsite median (min) s | Flower median (min) s | speed-up median (min) "
        "| fedsite heap peak (models) | Flower heap peak (models) | max abs diff | agree (1e-5) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    verdicts = []
    for row in rows:
        mine, theirs = row["times"]["fedsite"], row["times"]["flower"]
        speed_median = statistics.median(theirs) / statistics.median(mine)
        speed_min = min(theirs) / min(mine)
        agree = row["max_abs_diff"] <= TOLERANCE
        model = row["model_bytes"]
        print(
            f"| {row['rule']} | {row['n']} | {statistics.median(mine):.3f} ({min(mine):.3f}) "
            f"| {statistics.median(theirs):.3f} ({min(theirs):.3f}) "
            f"| {speed_median:.1f}x ({speed_min:.1f}x) "
            f"| {row['heap_peak']['fedsite'] / model:.2f} | {row['heap_peak']['flower'] / model:.2f} "
            f"| {row['max_abs_diff']:.1e} | {'yes' if agree else 'NO'} |"
        )
        target = TARGETS.get(row["rule"])
        if target is not None and row["n"] == max(sizes):
            ok = agree and speed_median >= target and speed_min >= target
            verdicts.append(
                f"| {row['rule']} | N={row['n']}: >= {target:g}x faster, agree to 1e-5 "
                f"| {speed_median:.1f}x ({speed_min:.1f}x), diff {row['max_abs_diff']:.1e} "
                f"| {'PASS' if ok else 'FAIL'} |"
            )
    if verdicts:
        print()
        print("| rule | target | measured: speed-up median (min), max abs diff | verdict |")
        print("|---|---|---|---|")
        for line in verdicts:
            print(line)


if __name__ == "__main__":
    main()

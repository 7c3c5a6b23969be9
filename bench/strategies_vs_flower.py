"""fedsite's aggregation rules against Flower 1.42's current strategies, same inputs, same process.

For every rule and every N, a fresh worker process (``--worker``) draws N client deltas of an MLP-shaped
model (784-h-h-10, 6 tensors, P ~ 1M float32), writes them as safetensors blobs to a temporary directory
(the page cache is warm: this measures CPU and memory, not the disk) and then times, interleaved:

- ``fedsite``: ``build_strategy(algorithm, hyperparameters).combine(deltas, num_examples)`` on the
  in-memory deltas, what the Python API and the agent SDK run (the chunked path for Krum, Multi-Krum,
  median and trimmed mean, spread over ``--threads`` threads; the streaming ``FedAvgAccumulator`` for
  FedAvg);
- ``fedsite blobs``: the server's path from the stored blobs (``bench/_server_path.py``: the same flcore
  calls as ``trainings.services`` for FedAvg and ``trainings.chunked`` for the chunked rules, its tasks on
  ``--threads`` threads instead of Celery worker processes);
- ``Flower``: Flower's CURRENT strategy, ``flwr.serverapp.strategy.{FedAvg, Krum, MultiKrum, FedMedian,
  FedTrimmedAvg}.aggregate_train(server_round, replies)``, on ``Message`` replies as a ServerApp receives
  them: each reply's content is a ``RecordDict`` with one ``ArrayRecord`` (the delta's tensors, by name) and
  one ``MetricRecord`` (``num-examples``). The replies are built afresh before every call, untimed (an
  ``Array`` holds the serialised bytes, and ``FedMedian``/``FedTrimmedAvg`` pop the arrays out of the
  records); deserialising the arrays (``Array.numpy()``) happens inside ``aggregate_train`` and is timed;
- ``Flower legacy``: the functions of ``flwr.server.strategy.aggregate`` (``aggregate``, ``aggregate_krum``,
  ``aggregate_median``, ``aggregate_trimmed_avg``) on ``[(layers, num_examples), ...]``, which Flower's
  deprecated ``flwr.server.strategy`` classes call and the current strategies no longer use;
- two floors over the same bytes: ``np.add(acc, x, out=acc)`` over the N in-memory tensors (one thread:
  the FedAvg target), and the same split over ``--threads`` threads (each with its own accumulator); the
  read bandwidth is the N * P * 4 bytes over the faster of the two; and the float32 BLAS rate: ``sgemm``
  of an in-cache ``(N, 8192)`` block with itself, on ``--threads`` threads.

Every side is called once first (untimed; the results must agree with fedsite's to 1e-5, max |diff| over
all coordinates), then ``--reps`` repetitions rotate the order of the sides. Each rule's floor is the
bytes it must read over the measured bandwidth (N * P * 4 bytes; Krum and Multi-Krum read them twice, once
for the Gram matrix and once, only the selected rows, to combine) and, for Krum and Multi-Krum, the
``2 N^2 P`` flops of the Gram matrix over the measured BLAS rate, whichever is larger; the table prints
time / floor. Both fedsite and Flower run with the same BLAS threads (``OPENBLAS_NUM_THREADS =
--threads``, default: the CPUs of this process).

Parameters are aligned so that both sides compute the same definition:

- Krum: the same ``f = N // 5``; Flower scores with ``max(1, n - f - 2)`` neighbours (``argsort`` of each
  row, skipping position 0 as "self"), fedsite with ``n - f - 2`` and requires ``n >= 2f + 3`` (met here).
  Flower's Krum returns the selected update (its weighted mean of one).
- Multi-Krum: Flower (current and legacy) averages the ``m = n - f`` best updates WEIGHTED BY
  ``num-examples``; fedsite's default is the paper's uniform mean, so fedsite runs with
  ``weighting="num_examples"`` and ``num_selected = n - f``.
- Trimmed mean: Flower cuts ``int(beta * n)`` per end, fedsite ``floor(beta * n + 1e-9)``; ``beta = 0.2``
  gives the same cut (checked).
- Median: both average the two middle values for even n; Flower in float32, fedsite in float64.

The data: honest deltas ``g + s_i * e_i`` (``g``, ``e_i`` standard normal, ``s_i`` in [0.5, 1.5]) and
``f = N // 5`` attackers ``g + 5 + e_i``; ``num_examples`` uniform in [10, 1000).

Usage::

    .venv-bench/bin/python bench/strategies_vs_flower.py --sizes 20,100 --reps 5

(``.venv-bench`` holds ``requirements/agent.txt`` plus ``bench/requirements-flower.txt``: Flower is never a
dependency of fedsite.) ``BENCH_FLCORE_ROOT=DIR`` imports ``flcore`` from ``DIR`` instead of this checkout,
to measure an older revision in the same way (that revision needs ``bench/_server_path.py``'s imports).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _threads_from_argv() -> int:
    """``--threads`` (default: the CPUs of this process), read before numpy loads OpenBLAS."""
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return len(os.sched_getaffinity(0))


THREADS = _threads_from_argv()
os.environ["OPENBLAS_NUM_THREADS"] = str(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# BENCH_FLCORE_ROOT: import flcore from another tree (e.g. an older revision) for before/after comparisons.
FLCORE_ROOT = Path(os.environ.get("BENCH_FLCORE_ROOT", REPO_ROOT)).resolve()
for root in (FLCORE_ROOT, Path(__file__).resolve().parent):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

from _server_path import combine_from_blobs, write_blobs  # noqa: E402

from flcore.parameters import ParameterSpec, TensorSpec  # noqa: E402
from flcore.strategies.base import parallel_map  # noqa: E402
from flcore.strategies.registry import build_strategy  # noqa: E402

INPUT_DIM = 784
NUM_CLASSES = 10
TOLERANCE = 1e-5
RULES = ("fedavg", "krum", "multikrum", "median", "trimmed_mean")
TRIM_FRACTION = 0.2
SIDES = ("fedsite", "fedsite_blobs", "flower", "flower_legacy", "floor_add", "floor_threads")
TARGETS = {"krum": 3.0, "multikrum": 3.0, "median": 8.0, "trimmed_mean": 8.0}
"""Required speed-up over Flower's current strategy at the largest N (in memory and from blobs)."""
FEDAVG_FLOOR_TARGET = 1.5
"""fedsite's in-memory FedAvg within this factor of ``np.add`` over the same bytes (one thread)."""
GEMM_BLOCK = 8192


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


# ----------------------------------------------------------------------------------------------------------
# The sides
# ----------------------------------------------------------------------------------------------------------
def flower_replies(deltas: list[dict[str, np.ndarray]], num_examples: list[int]) -> list[Any]:
    """Fresh training replies as a ServerApp receives them: one ArrayRecord and one MetricRecord each."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.app.metadata import Metadata

    replies = []
    now = time.time()
    for i, (delta, count) in enumerate(zip(deltas, num_examples, strict=True)):
        content = RecordDict(
            {
                "arrays": ArrayRecord(array_dict={name: Array(array) for name, array in delta.items()}),
                "metrics": MetricRecord({"num-examples": count}),
            }
        )
        metadata = Metadata(
            run_id=1,
            message_id=f"reply-{i}",
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id=f"instruction-{i}",
            group_id="1",
            created_at=now,
            ttl=3600.0,
            message_type="train",
        )
        replies.append(Message(content=content, metadata=metadata))
    return replies


def rule_setup(
    rule: str, n: int, spec: ParameterSpec, deltas: list[dict[str, np.ndarray]], num_examples: list[int]
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any] | None], dict[str, Any]]:
    """Return each side's timed call, its untimed preparation (or None) and the rule's settings."""
    from flwr.server.strategy import aggregate as legacy
    from flwr.serverapp import strategy as current

    names = list(deltas[0])
    results = [([d[name] for name in names], k) for d, k in zip(deltas, num_examples, strict=True)]
    f = n // 5
    if rule == "fedavg":
        params: dict[str, Any] = {}
        flower: Any = current.FedAvg()
        theirs_legacy: Callable[[], Any] = lambda: legacy.aggregate(results)  # noqa: E731
    elif rule == "krum":
        params = {"num_malicious": f}
        flower = current.Krum(num_malicious_nodes=f)
        theirs_legacy = lambda: legacy.aggregate_krum(results, num_malicious=f, to_keep=0)  # noqa: E731
    elif rule == "multikrum":
        params = {"num_malicious": f, "num_selected": n - f, "weighting": "num_examples"}
        flower = current.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f)
        theirs_legacy = lambda: legacy.aggregate_krum(results, num_malicious=f, to_keep=n - f)  # noqa: E731
    elif rule == "median":
        params = {}
        flower = current.FedMedian()
        theirs_legacy = lambda: legacy.aggregate_median(results)  # noqa: E731
    elif rule == "trimmed_mean":
        params = {"trim_fraction": TRIM_FRACTION}
        flower = current.FedTrimmedAvg(beta=TRIM_FRACTION)
        theirs_legacy = lambda: legacy.aggregate_trimmed_avg(  # noqa: E731
            results, proportiontocut=TRIM_FRACTION
        )
    else:
        raise SystemExit(f"unknown rule {rule!r}")
    strategy = build_strategy(rule, params)
    if rule == "trimmed_mean":
        flower_cut, ours_cut = int(TRIM_FRACTION * n), strategy.num_trimmed(n)  # type: ignore[attr-defined]
        if flower_cut != ours_cut:
            raise SystemExit(f"trimmed mean: Flower cuts {flower_cut}, fedsite {ours_cut} at n={n}.")
        params = {**params, "cut_per_end": ours_cut}

    directory = tempfile.mkdtemp(prefix="bench-blobs-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # N x 4 MB of blobs per worker process
    paths = write_blobs(deltas, directory)
    replies: list[Any] = []

    def prepare_replies() -> None:
        replies[:] = flower_replies(deltas, num_examples)

    def theirs() -> Any:
        arrays, _ = flower.aggregate_train(1, replies)
        replies.clear()
        return arrays

    flats = [[np.asarray(d[name]).reshape(-1) for name in names] for d in deltas]

    def floor_add() -> Any:
        accumulators = [np.zeros_like(x) for x in flats[0]]
        for row in flats:
            for acc, x in zip(accumulators, row, strict=True):
                np.add(acc, x, out=acc)
        return accumulators

    groups = [flats[i::THREADS] for i in range(THREADS)]

    def floor_threads() -> Any:
        def add_group(rows: list[list[np.ndarray]]) -> Any:
            accumulators = [np.zeros_like(x) for x in flats[0]]
            for row in rows:
                for acc, x in zip(accumulators, row, strict=True):
                    np.add(acc, x, out=acc)
            return accumulators

        return list(parallel_map(add_group, groups, THREADS))

    calls: dict[str, Callable[[], Any]] = {
        "fedsite": lambda: strategy.combine(deltas, num_examples, threads=THREADS)[0],
        "fedsite_blobs": lambda: combine_from_blobs(strategy, spec, paths, num_examples, workers=THREADS),
        "flower": theirs,
        "flower_legacy": theirs_legacy,
        "floor_add": floor_add,
        "floor_threads": floor_threads,
    }
    prepares: dict[str, Callable[[], Any] | None] = {side: None for side in calls}
    prepares["flower"] = prepare_replies
    params["blob_dir"] = directory
    return calls, prepares, params


def as_layers(side: str, value: Any, names: list[str]) -> list[np.ndarray]:
    """The result of a side as float64 arrays in model order."""
    if side == "flower":
        return [np.asarray(value[name].numpy(), dtype=np.float64) for name in names]
    if side == "flower_legacy":
        return [np.asarray(array, dtype=np.float64) for array in value]
    return [np.asarray(value[name], dtype=np.float64) for name in names]


def blas_rate(n: int, threads: int) -> float:
    """Float32 flops per second of ``sgemm`` on an in-cache ``(n, 8192)`` block, on ``threads`` threads."""
    block = np.random.default_rng(0).standard_normal((n, GEMM_BLOCK), dtype=np.float32)
    calls = 64

    def one(_: int) -> None:
        block @ block.T

    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for _ in parallel_map(one, range(calls), threads):
            pass
        best = min(best, time.perf_counter() - started)
    return 2.0 * n * n * GEMM_BLOCK * calls / best


# ----------------------------------------------------------------------------------------------------------
# Worker: one rule and one N, all sides interleaved
# ----------------------------------------------------------------------------------------------------------
def worker_main(args: argparse.Namespace) -> None:
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO line per call otherwise
    spec = mlp_spec(args.params)
    n = args.n
    deltas, num_examples = make_deltas(spec, n, n // 5, args.seed + n)
    calls, prepares, params = rule_setup(args.worker, n, spec, deltas, num_examples)
    names = list(deltas[0])

    cpu: dict[str, list[float]] = {side: [] for side in SIDES}

    def run(side: str) -> tuple[float, Any]:
        prepare = prepares[side]
        if prepare is not None:
            prepare()
        gc.collect()
        started, started_cpu = time.perf_counter(), time.process_time()
        result = calls[side]()
        elapsed = time.perf_counter() - started
        cpu[side].append(time.process_time() - started_cpu)
        return elapsed, result

    # 1. One call each (also the warm-up): agreement with fedsite's in-memory result.
    reference = as_layers("fedsite", run("fedsite")[1], names)
    diffs = {}
    for side in ("fedsite_blobs", "flower", "flower_legacy"):
        layers = as_layers(side, run(side)[1], names)
        diffs[side] = max(
            float(np.max(np.abs(a - b.reshape(a.shape)))) for a, b in zip(reference, layers, strict=True)
        )
    for side in ("floor_add", "floor_threads"):
        run(side)
    del reference

    # 2. Timed repetitions, the order rotating (the CPU seconds of the warm-up calls are dropped).
    for values in cpu.values():
        values.clear()
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for rep in range(args.reps):
        for side in SIDES[rep % len(SIDES) :] + SIDES[: rep % len(SIDES)]:
            elapsed, result = run(side)
            times[side].append(elapsed)
            del result
    rate = blas_rate(n, THREADS)
    params.pop("blob_dir", None)
    print(
        json.dumps(
            {
                "rule": args.worker,
                "n": n,
                "params": params,
                "times": times,
                "cpu_seconds": cpu,
                "bytes": n * spec.nbytes,
                "blas_flops_per_s": rate,
                "max_abs_diff": diffs,
            }
        )
    )


def run_worker(rule: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
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
        "--threads",
        str(THREADS),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
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
        f"flwr {version('flwr')}, threads {THREADS} (fedsite; OPENBLAS_NUM_THREADS on both sides), "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def floor_seconds(row: dict[str, Any]) -> tuple[float, str]:
    """The rule's floor: bytes to read over the measured bandwidth, or the Gram's flops over the BLAS rate."""
    times = row["times"]
    bandwidth = row["bytes"] / min(min(times["floor_add"]), min(times["floor_threads"]))
    reads = row["bytes"] / bandwidth
    if row["rule"] in ("krum", "multikrum"):
        n = row["n"]
        num_params = row["bytes"] / (4 * n)
        selected = 1 if row["rule"] == "krum" else n - n // 5
        reads *= 1 + selected / n  # the Gram pass, then the selected rows
        flops = 2.0 * n * n * num_params / row["blas_flops_per_s"]
        if flops > reads:
            return flops, "flops"
    return reads, "bytes"


def summarise(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f})"


def ratio(slow: list[float], fast: list[float]) -> tuple[float, float]:
    return statistics.median(slow) / statistics.median(fast), min(slow) / min(fast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,100", help="comma-separated numbers of updates N")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated subset of {RULES}")
    parser.add_argument("--params", type=int, default=1_000_000, help="target parameter count P")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=THREADS, help="threads of fedsite and of BLAS")
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
        f"float32; N = {sizes}, f = N // 5; {args.reps} rotating reps per side, one worker process "
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
    print("Times in seconds, median (min) of the repetitions; speed-ups as ratios of medians (of minima).")
    print()
    print(
        "| rule | N | fedsite (memory) | fedsite (blobs) | Flower current | Flower legacy "
        "| vs current: memory | vs current: blobs | vs legacy: memory | floor s | memory / floor "
        "| blobs / floor | max abs diff (blobs, current, legacy) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    verdicts = []
    for row in rows:
        t = row["times"]
        floor, kind = floor_seconds(row)
        vs_memory = ratio(t["flower"], t["fedsite"])
        vs_blobs = ratio(t["flower"], t["fedsite_blobs"])
        vs_legacy = ratio(t["flower_legacy"], t["fedsite"])
        diffs = row["max_abs_diff"]
        agree = all(d <= TOLERANCE for d in diffs.values())
        print(
            f"| {row['rule']} | {row['n']} | {summarise(t['fedsite'])} | {summarise(t['fedsite_blobs'])} "
            f"| {summarise(t['flower'])} | {summarise(t['flower_legacy'])} "
            f"| {vs_memory[0]:.2f}x ({vs_memory[1]:.2f}x) | {vs_blobs[0]:.2f}x ({vs_blobs[1]:.2f}x) "
            f"| {vs_legacy[0]:.2f}x ({vs_legacy[1]:.2f}x) | {floor:.3f} ({kind}) "
            f"| {statistics.median(t['fedsite']) / floor:.1f}x "
            f"| {statistics.median(t['fedsite_blobs']) / floor:.1f}x "
            f"| {diffs['fedsite_blobs']:.1e}, {diffs['flower']:.1e}, {diffs['flower_legacy']:.1e} |"
        )
        if row["n"] != max(sizes):
            continue
        target = TARGETS.get(row["rule"])
        if target is not None:
            ok = agree and min(vs_memory + vs_blobs) >= target
            verdicts.append(
                f"| {row['rule']} | N={row['n']}: >= {target:g}x faster than Flower's current strategy, "
                f"in memory and from blobs, agreeing to 1e-5 | memory {vs_memory[0]:.2f}x "
                f"({vs_memory[1]:.2f}x), blobs {vs_blobs[0]:.2f}x ({vs_blobs[1]:.2f}x) "
                f"| {'met' if ok else 'NOT MET'} |"
            )
        elif row["rule"] == "fedavg":
            to_add = ratio(t["fedsite"], t["floor_add"])
            ok = agree and max(to_add) <= FEDAVG_FLOOR_TARGET
            verdicts.append(
                f"| fedavg | N={row['n']}: in-memory combine within {FEDAVG_FLOOR_TARGET:g}x of np.add over "
                f"the same bytes (floor {summarise(t['floor_add'])} s) | {to_add[0]:.2f}x ({to_add[1]:.2f}x) "
                f"| {'met' if ok else 'NOT MET'} |"
            )
    print()
    print(
        "CPU seconds of this process per call (all its threads), median (min): the work each side does, "
        "less sensitive than wall time to other processes on the machine (not what the goals are "
        "judged on)."
    )
    print()
    print(
        "| rule | N | fedsite (memory) | fedsite (blobs) | Flower current "
        "| vs current: memory | vs current: blobs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        c = row["cpu_seconds"]
        cpu_memory, cpu_blobs = ratio(c["flower"], c["fedsite"]), ratio(c["flower"], c["fedsite_blobs"])
        print(
            f"| {row['rule']} | {row['n']} | {summarise(c['fedsite'])} | {summarise(c['fedsite_blobs'])} "
            f"| {summarise(c['flower'])} | {cpu_memory[0]:.2f}x ({cpu_memory[1]:.2f}x) "
            f"| {cpu_blobs[0]:.2f}x ({cpu_blobs[1]:.2f}x) |"
        )
    if verdicts:
        print()
        print("| rule | goal | measured: median (min) | verdict |")
        print("|---|---|---|---|")
        for line in verdicts:
            print(line)


if __name__ == "__main__":
    main()

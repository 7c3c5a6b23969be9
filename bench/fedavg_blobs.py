"""FedAvg from stored update blobs: the server's streaming path against the memory floor and a naive one.

Measures, in one run with interleaved repetitions, for N updates of P float32 parameters written as
safetensors blobs by :func:`flcore.parameters.to_bytes` into a temporary directory (page cache warm: the
blobs are written, then read once, before any measurement):

(a) ``stream``  -- ``FedAvgAccumulator.add_file(path, weight, verified=True)`` per blob then
    :meth:`FedAvgAccumulator.result`, exactly what ``trainings.services.round_aggregate`` calls (its blobs
    were validated at upload): one header parse, one ``mmap`` and one BLAS ``saxpy`` per blob, one
    finiteness check of the sum in ``result()``, the mean divided straight into the output arrays;
(b) ``floor``   -- ``np.add(acc, x, out=acc)`` over the same N flat arrays already in memory (same bytes
    touched, no weighting, no checks): the memory-bandwidth floor;
(c) ``naive``   -- ``safetensors.numpy.load_file`` every blob, make a weighted copy of each, then sum and
    divide: what a materialising implementation does;
(b') ``mapped_floor`` -- ``np.add(acc, x, out=acc)`` with ``x`` a view of the memory-mapped blob (no
    weighting, no checks, no header parsing): what reading the same bytes from the page cache costs;
(b'') ``populated_floor`` -- as (b') but mapped with ``MAP_POPULATE`` (page tables filled by ``mmap``
    itself instead of by page faults): whether pre-faulting pays on this machine;
(a0) ``checked`` -- ``FedAvgAccumulator.add_file(path, weight)`` (default ``verified=False``): the same
    path plus a finiteness pass over every blob before it is added (refused before anything is added).

Every (variant, N, repetition) runs in a fresh Python process (``subprocess``), so peak memory is not
polluted by earlier runs. Inside it, after the setup (imports, spec, and for (b) the N input arrays) the
peak resident set is reset (``echo 5 > /proc/self/clear_refs``), the variant is timed once, and

- ``rss_peak_extra`` = VmHWM after - VmRSS before: everything resident, including the page-cache pages of
  memory-mapped blobs that the process touched (file-backed, shared, evictable: not allocations);
- ``heap_peak_extra`` = tracemalloc peak during a second, untimed call: numpy's own buffers (numpy reports
  its data allocations to tracemalloc) and Python objects; memory-mapped file pages are not counted.

Memory is reported in units of the model size (P * 4 bytes). The time of (a) includes ``result()``.
Targets (from the project): at N=100, time(a) <= 1.5 x time(b) and heap_peak_extra(a) <= 2 models.

Usage::

    .venv/bin/python bench/fedavg_blobs.py --sizes 10,100 --params 1000000 --reps 5
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One BLAS thread everywhere (the children get it from run_child too; this covers the in-process profile):
# the floor (numpy ufuncs) is single-threaded, so the BLAS path must be as well.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import safetensors.numpy  # noqa: E402

from flcore.parameters import ParameterSpec, TensorSpec, from_bytes, to_bytes  # noqa: E402
from flcore.strategies.fedavg import FedAvgAccumulator, fedavg  # noqa: E402

VARIANTS = ("stream", "floor", "naive", "checked", "mapped_floor", "populated_floor")
VARIANT_LABELS = {
    "stream": "(a) add_file(path, w, verified=True)",
    "floor": "(b) np.add floor (in memory)",
    "mapped_floor": "(b') np.add floor over mmapped blobs",
    "populated_floor": "(b'') as (b'), MAP_POPULATE",
    "naive": "(c) load_file + weighted copies",
    "checked": "(a0) add_file(path, w) (checks each blob)",
}
TARGET_TIME_RATIO = 1.5
TARGET_MEMORY_MODELS = 2.0
MEMORY_SLACK_MODELS = 0.05
"""Allowance for Python objects (parsed headers, dicts) on top of the model-sized buffers."""
INPUT_DIM = 784
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------------
def mlp_spec(num_parameters: int) -> ParameterSpec:
    """An MLP 784-h-h-10 (6 tensors) whose hidden width h makes the count closest to ``num_parameters``."""

    def count(hidden: int) -> int:
        return INPUT_DIM * hidden + hidden + hidden * hidden + hidden + hidden * NUM_CLASSES + NUM_CLASSES

    # count(h) = h^2 + (784 + 12) h + 10: solve the quadratic, then pick the closer neighbour.
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


def write_blobs(directory: Path, spec: ParameterSpec, count: int, seed: int) -> tuple[list[str], list[float]]:
    """Write ``count`` random updates with :func:`to_bytes`; return their paths and example counts."""
    rng = np.random.default_rng(seed)
    paths: list[str] = []
    weights: list[float] = []
    for k in range(count):
        update = {
            t.name: rng.standard_normal(t.shape, dtype=np.float32) * np.float32(0.01) for t in spec.tensors
        }
        path = directory / f"update-{k:04d}.safetensors"
        path.write_bytes(to_bytes(update, metadata={"num_examples": str(k)}))
        paths.append(str(path))
        weights.append(float(rng.integers(50, 600)))
    return paths, weights


def warm_page_cache(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 22):
                pass


# ----------------------------------------------------------------------------------------------------------
# The three variants; each returns the weighted mean (or, for the floor, the plain sum) as a dict
# ----------------------------------------------------------------------------------------------------------
def run_stream(spec: ParameterSpec, paths: list[str], weights: list[float]) -> dict[str, np.ndarray]:
    """Exactly what ``trainings.services.round_aggregate`` calls for blobs validated at upload."""
    accumulator = FedAvgAccumulator(spec)
    for path, weight in zip(paths, weights, strict=True):
        accumulator.add_file(path, weight, verified=True)
    return accumulator.result()


def run_checked(spec: ParameterSpec, paths: list[str], weights: list[float]) -> dict[str, np.ndarray]:
    """The default ``add_file``: every blob is checked for NaN/Inf before it is added."""
    accumulator = FedAvgAccumulator(spec)
    for path, weight in zip(paths, weights, strict=True):
        accumulator.add_file(path, weight)
    return accumulator.result()


def load_flat(paths: list[str], spec: ParameterSpec) -> list[np.ndarray]:
    """The N updates as flat float32 arrays in spec order, in memory (setup of the floor, untimed)."""
    flats = []
    for path in paths:
        loaded = safetensors.numpy.load_file(path)
        flats.append(np.concatenate([loaded[name].reshape(-1) for name in spec.names]))
    return flats


def run_floor(flats: list[np.ndarray]) -> np.ndarray:
    acc = np.zeros_like(flats[0])
    for x in flats:
        np.add(acc, x, out=acc)
    return acc


def run_mapped_floor(spec: ParameterSpec, paths: list[str], *, populate: bool = False) -> np.ndarray:
    acc = np.zeros(spec.num_parameters, dtype=np.float32)
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    for path in paths:
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        x = np.frombuffer(mapping, dtype="<f4", count=spec.num_parameters, offset=len(mapping) - spec.nbytes)
        np.add(acc, x, out=acc)
        del x
        mapping.close()
    return acc


def run_naive(spec: ParameterSpec, paths: list[str], weights: list[float]) -> dict[str, np.ndarray]:
    loaded = [safetensors.numpy.load_file(path) for path in paths]
    weighted = [
        {name: update[name] * np.float32(w) for name in spec.names}
        for update, w in zip(loaded, weights, strict=True)
    ]
    total = np.float32(math.fsum(weights))
    result: dict[str, np.ndarray] = {}
    for name in spec.names:
        acc = weighted[0][name].copy()
        for update in weighted[1:]:
            acc += update[name]
        result[name] = acc / total
    return result


# ----------------------------------------------------------------------------------------------------------
# Child process: one timed call with clean peak-memory accounting
# ----------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child_main(args: argparse.Namespace) -> None:
    manifest = json.loads(Path(args.manifest).read_text())
    spec = ParameterSpec.from_json(manifest["spec"])
    paths, weights = manifest["paths"], manifest["weights"]
    call: Callable[[], Any]
    if args.child in ("stream", "checked"):
        # scipy.linalg is imported by add_file on first use (a few hundred ms, once per worker process);
        # import it during the setup so that the cold call measures the aggregation, not the import.
        from flcore.strategies.fedavg import _saxpy

        _saxpy()
    if args.child == "stream":
        call = lambda: run_stream(spec, paths, weights)  # noqa: E731
    elif args.child == "floor":
        flats = load_flat(paths, spec)
        call = lambda: run_floor(flats)  # noqa: E731
    elif args.child == "mapped_floor":
        call = lambda: run_mapped_floor(spec, paths)  # noqa: E731
    elif args.child == "populated_floor":
        call = lambda: run_mapped_floor(spec, paths, populate=True)  # noqa: E731
    elif args.child == "naive":
        call = lambda: run_naive(spec, paths, weights)  # noqa: E731
    else:
        call = lambda: run_checked(spec, paths, weights)  # noqa: E731
    gc.collect()
    # 1. Cold call (first in this process): peak resident set.
    peak_reset = _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    hwm_before = _status_kib("VmHWM")
    started = time.perf_counter()
    result = call()
    cold_seconds = time.perf_counter() - started
    hwm_after = _status_kib("VmHWM")
    del result
    gc.collect()
    # 2. Warm call: the timed one (a Celery worker is a long-lived process).
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    del result
    gc.collect()
    # 3. Untimed call under tracemalloc: peak of numpy buffers and Python objects.
    tracemalloc.start()
    tracemalloc.reset_peak()
    base_heap, _ = tracemalloc.get_traced_memory()
    result = call()
    _, peak_heap = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cold_seconds": cold_seconds,
                "rss_peak_extra": (hwm_after - rss_before) * 1024 if peak_reset else None,
                "rss_peak_extra_upper": (hwm_after - min(rss_before, hwm_before)) * 1024,
                "heap_peak_extra": peak_heap - base_heap,
            }
        )
    )


def run_child(variant: str, manifest: Path) -> dict[str, Any]:
    # One BLAS thread: the floor (numpy ufuncs) is single-threaded, so the proposal must be too.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--manifest", str(manifest)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# Profile of (a): where its time goes (in-process, after the timed runs)
# ----------------------------------------------------------------------------------------------------------
def profile_stream(
    spec: ParameterSpec, paths: list[str], weights: list[float], reps: int
) -> list[tuple[str, float]]:
    """Time the stages of ``add_file(..., verified=True)`` and ``result()`` separately (median of reps).

    Repeats the accumulator's own steps (including its private helpers) one stage at a time.
    """
    from flcore.parameters import _header_length

    stages: dict[str, list[float]] = {k: [] for k in ("open+header", "mmap", "saxpy", "result")}
    for _ in range(reps):
        accumulator = FedAvgAccumulator(spec)
        t = {k: 0.0 for k in stages}
        for path, weight in zip(paths, weights, strict=True):
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                length = _header_length(handle.read(8), size)
                header_bytes = handle.read(length)
                if not accumulator._is_packed(header_bytes, size - 8 - length):
                    raise RuntimeError("blob not in the packed layout")
                t1 = time.perf_counter()
                mapping = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
            t2 = time.perf_counter()
            view = np.frombuffer(mapping, dtype="<f4", count=spec.num_parameters, offset=8 + length)
            accumulator._axpy(0, view, weight)
            del view
            mapping.close()
            t3 = time.perf_counter()
            t["open+header"] += t1 - t0
            t["mmap"] += t2 - t1
            t["saxpy"] += t3 - t2
        accumulator._count, accumulator._total_weight = len(paths), math.fsum(weights)
        accumulator._unchecked = True
        t0 = time.perf_counter()
        accumulator.result()
        t["result"] += time.perf_counter() - t0
        for k, v in t.items():
            stages[k].append(v)
    return [(k, statistics.median(v)) for k, v in stages.items()]


# ----------------------------------------------------------------------------------------------------------
# Parent: write blobs, verify, interleave repetitions, print tables
# ----------------------------------------------------------------------------------------------------------
def _fmt_models(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def machine_line() -> str:
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
        f"load average {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="comma-separated numbers of updates N")
    parser.add_argument("--params", type=int, default=1_000_000, help="target parameter count P")
    parser.add_argument(
        "--reps", type=int, default=5, help="repetitions of each variant (fresh process each)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    spec = mlp_spec(args.params)
    model_bytes = spec.nbytes
    hidden = spec.tensors[0].shape[0]
    print(f"machine: {machine_line()}")
    print(
        f"model: MLP 784-{hidden}-{hidden}-10, {len(spec.tensors)} tensors, "
        f"P = {spec.num_parameters:,} float32 = {model_bytes / 2**20:.2f} MiB; sizes N = {sizes}; "
        f"reps = {args.reps} (fresh process per variant and rep, interleaved)"
    )
    with tempfile.TemporaryDirectory(prefix="fedavg-bench-") as tmp:
        manifests: dict[int, Path] = {}
        inputs: dict[int, tuple[list[str], list[float]]] = {}
        for n in sizes:
            directory = Path(tmp) / f"n{n}"
            directory.mkdir()
            paths, weights = write_blobs(directory, spec, n, args.seed + n)
            inputs[n] = (paths, weights)
            manifest = Path(tmp) / f"manifest-{n}.json"
            manifest.write_text(json.dumps({"spec": spec.to_json(), "paths": paths, "weights": weights}))
            manifests[n] = manifest
            warm_page_cache(paths)
        print(f"blobs: {tmp} (written with flcore.parameters.to_bytes, then read once: page cache warm)")

        # Correctness: (a), (a0) and (c) against the float64 reference fedavg() within 1e-5.
        for n in sizes:
            paths, weights = inputs[n]
            updates = [from_bytes(Path(path).read_bytes(), spec=spec, max_bytes=1 << 40) for path in paths]
            reference = fedavg(updates, weights)
            del updates
            diffs = {}
            for label, run in (("a", run_stream), ("a0", run_checked), ("c", run_naive)):
                got = run(spec, paths, weights)
                diffs[label] = max(float(np.max(np.abs(got[k] - reference[k]))) for k in spec.names)
                del got
            status = "OK" if max(diffs.values()) <= 1e-5 else "MISMATCH"
            print(
                f"check N={n}: max |x - fedavg float64| for (a) {diffs['a']:.3e}, (a0) {diffs['a0']:.3e}, "
                f"(c) {diffs['c']:.3e} (tolerance 1e-5) {status}"
            )
            if status != "OK":
                sys.exit(1)
            del reference

        samples: dict[tuple[int, str], list[dict[str, Any]]] = {(n, v): [] for n in sizes for v in VARIANTS}
        for rep in range(args.reps):
            for n in sizes:
                shift = rep % len(VARIANTS)
                order = VARIANTS[shift:] + VARIANTS[:shift]
                for variant in order:
                    samples[(n, variant)].append(run_child(variant, manifests[n]))
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)

        print()
        header = (
            "| N | variant | warm median s | warm min s | ms/update | cold-call median s "
            "| heap peak extra (models) "
            "| RSS peak extra incl. mapped pages (models) |"
        )
        print(header)
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        summary: dict[tuple[int, str], dict[str, float | None]] = {}
        for n in sizes:
            for variant in VARIANTS:
                runs = samples[(n, variant)]
                times = [r["seconds"] for r in runs]
                heap = statistics.median(r["heap_peak_extra"] for r in runs) / model_bytes
                rss_values = [r["rss_peak_extra"] for r in runs if r["rss_peak_extra"] is not None]
                rss = statistics.median(rss_values) / model_bytes if rss_values else None
                cold = statistics.median(r["cold_seconds"] for r in runs)
                summary[(n, variant)] = {"median": statistics.median(times), "min": min(times), "heap": heap}
                print(
                    f"| {n} | {VARIANT_LABELS[variant]} | {statistics.median(times):.4f} | {min(times):.4f} "
                    f"| {1000 * statistics.median(times) / n:.2f} "
                    f"| {cold:.4f} | {heap:.2f} | {_fmt_models(rss)} |"
                )
        print()
        print(
            "| N | time(a)/time(b) median (min) | time(a)/time(c) median (min) | heap peak extra (a), models "
            "| time(a0)/time(b) median (min) | heap peak extra (a0), models | time(b')/time(b) median (min) "
            "| time(b'')/time(b) median (min) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in sizes:
            a, b, c, a0, bm, bp = (
                summary[(n, v)]
                for v in ("stream", "floor", "naive", "checked", "mapped_floor", "populated_floor")
            )
            print(
                f"| {n} | {a['median'] / b['median']:.2f} ({a['min'] / b['min']:.2f}) "
                f"| {a['median'] / c['median']:.2f} ({a['min'] / c['min']:.2f}) | {a['heap']:.2f} "
                f"| {a0['median'] / b['median']:.2f} ({a0['min'] / b['min']:.2f}) | {a0['heap']:.2f} "
                f"| {bm['median'] / b['median']:.2f} ({bm['min'] / b['min']:.2f}) "
                f"| {bp['median'] / b['median']:.2f} ({bp['min'] / b['min']:.2f}) |"
            )
        target_n = 100 if 100 in sizes else max(sizes)
        b = summary[(target_n, "floor")]
        print()
        # The verdict uses the ratio of the minima: on a shared machine the fastest of N runs is the one
        # least disturbed by other tenants; the ratio of the medians is shown beside it.
        print(f"| target (N={target_n}, P={spec.num_parameters:,}) | variant | measured | verdict |")
        print("|---|---|---:|---|")
        for variant in ("stream", "checked"):
            label = VARIANT_LABELS[variant]
            measured = summary[(target_n, variant)]
            time_ratio = measured["min"] / b["min"]
            memory = measured["heap"]
            print(
                f"| time <= {TARGET_TIME_RATIO}x time(b) (ratio of minima; of medians) | {label} "
                f"| {time_ratio:.2f}x ({measured['median'] / b['median']:.2f}x) "
                f"| {'PASS' if time_ratio <= TARGET_TIME_RATIO else 'FAIL'} |"
            )
            passed = memory <= TARGET_MEMORY_MODELS + MEMORY_SLACK_MODELS
            print(
                f"| heap peak extra <= {TARGET_MEMORY_MODELS:.0f} models (+{MEMORY_SLACK_MODELS} for Python "
                f"objects) | {label} | {memory:.2f} models | {'PASS' if passed else 'FAIL'} |"
            )

        paths, weights = inputs[target_n]
        stages = profile_stream(spec, paths, weights, reps=args.reps)
        total = sum(s for _, s in stages)
        print()
        print(f"profile of (a) at N={target_n} (stage by stage, in process, median of {args.reps}):")
        print("| stage | seconds | share |")
        print("|---|---:|---:|")
        for name, seconds in stages:
            print(f"| {name} | {seconds:.4f} | {100 * seconds / total:.0f}% |")
        print(f"| total | {total:.4f} | 100% |")


if __name__ == "__main__":
    main()
